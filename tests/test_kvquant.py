"""Quantized KV caches (harness.kvquant): bytes held equal the accounting, and int8 stays close.

    pytest -q tests/test_kvquant.py      # a few seconds
"""
from __future__ import annotations

import copy

import pytest
import torch

from harness.errors import HarnessError
from harness.kvquant import (KVQuantSpec, accounted_bytes, bytes_per_token, cached_tensors, full_bytes_per_token,
                             generate_split, group_layout, held_bytes, make_cache, quantized_bytes_per_token)
from harness.methods import convert
from harness.mla import Budget, LatentCache, cache_bytes
from harness.mla.cache import CACHE_ARG
from tiny import tiny_model, tiny_stats


@pytest.fixture(scope="module")
def models():
    base = tiny_model("llama")
    latent = copy.deepcopy(base)
    convert(latent, "mha2mla", Budget(kv_save=0.75), tiny_stats(base), rope_pairs=2)  # latent 24 + RoPE keys 8
    return {"original": base, "latent": latent}


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("which", ["original", "latent"])
def test_generate_holds_the_accounted_bytes(models, which, bits):
    """After a real generate(): codes + scales/zeros + the full-precision window == the accounting."""
    model = models[which]
    spec = KVQuantSpec(bits=bits, group=12, residual=4)  # 32-wide heads -> 3 groups of 12 (4 padding)
    x = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    cache = make_cache(model, spec)
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=11, min_new_tokens=11,
                         do_sample=False, **{CACHE_ARG: cache}, pad_token_id=0)
    quantized, window = generate_split(x.shape[1], out.shape[1] - x.shape[1], spec)
    assert (quantized, window) == (7 + 8, 2)  # 10 fed-back tokens: two windows of 4 flushed, 2 waiting
    assert cache.bytes_held() == accounted_bytes(model, spec, quantized, window, batch=2)
    # the unquantized cache of the same generation holds the accounted width x 4 bytes (fp32)
    plain = LatentCache(config=model.config)
    model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=11, min_new_tokens=11, do_sample=False,
                   **{CACHE_ARG: plain}, pad_token_id=0)
    assert cache_bytes(plain) == full_bytes_per_token(model) * (quantized + window) * 2
    # int8: 36 codes + 3 x 8 scale/zero bytes per 32 channels (47 %), int4: 18 + 24 (33 %), + the window
    assert cache.bytes_held() < cache_bytes(plain) * (0.55 if bits == 8 else 0.45)


def test_per_token_bytes_follow_the_group_rule(models):
    assert cached_tensors(models["original"]) == [((2, 32), (2, 32))] * 2
    assert cached_tensors(models["latent"]) == [((1, 24), (1, 8))] * 2
    # original, int4, group 12: 2 heads x 3 groups x (12 codes / 2 + scale 4 + zero 4), K and V, 2 layers
    assert quantized_bytes_per_token(models["original"], KVQuantSpec(bits=4, group=12)) == 2 * 2 * 2 * 3 * (6 + 8)
    # latent, int8, group 64: one group of 24 and one of 8 per layer
    assert quantized_bytes_per_token(models["latent"], KVQuantSpec(bits=8, group=64)) == 2 * ((24 + 8) + (8 + 8))
    spec = KVQuantSpec(bits=8, group=64, residual=128)
    q, full = quantized_bytes_per_token(models["original"], spec), full_bytes_per_token(models["original"])
    assert bytes_per_token(models["original"], spec, context=1024) == pytest.approx((896 * q + 128 * full) / 1024)
    assert bytes_per_token(models["original"], None) == full == 2 * 2 * 64 * 4


@pytest.mark.parametrize("width,group,bits,layout", [
    (64, 64, 4, (1, 64)), (168, 64, 4, (3, 56)), (24, 64, 4, (1, 24)), (33, 64, 4, (1, 34)),
    (97, 64, 2, (2, 52)), (97, 64, 8, (2, 49)), (0, 64, 4, (0, 0)),
])
def test_group_layout(width, group, bits, layout):
    assert group_layout(width, group, bits) == layout


@torch.no_grad()
def _decode_logits(model, x, cache, prefill=8):
    out = [model(x[:, :prefill], **{CACHE_ARG: cache}, use_cache=True).logits]
    out += [model(x[:, t:t + 1], **{CACHE_ARG: cache}, use_cache=True).logits for t in range(prefill, x.shape[1])]
    return torch.cat(out, 1)


def test_full_rank_mla_with_int8_cache_stays_close_to_the_original():
    base = tiny_model("llama")
    full = copy.deepcopy(base)
    convert(full, "care_joint", Budget(rank=64), tiny_stats(base))  # parity width: reproduces the original
    x = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    ref = _decode_logits(base, x, LatentCache(config=base.config))[:, 8:]
    errors = {}
    for name, model in (("original", base), ("full-rank MLA", full)):
        for bits in (8, 4):
            got = _decode_logits(model, x, make_cache(model, KVQuantSpec(bits=bits, group=32, residual=4)))[:, 8:]
            errors[name, bits] = float((got - ref).norm() / ref.norm())
    for name in ("original", "full-rank MLA"):
        assert 0 < errors[name, 8] < 0.01, errors  # int8: within 1 % of the original's decode logits
        assert errors[name, 4] > 3 * errors[name, 8], errors  # and int4 visibly coarser


def test_prefill_sees_full_precision_and_generation_matches_for_int8(models):
    model = models["original"]
    x = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(2))
    cache = make_cache(model, KVQuantSpec(bits=8, group=32, residual=4))
    assert torch.equal(model(x, **{CACHE_ARG: cache}, use_cache=True).logits, model(x).logits)
    assert cache.get_seq_length() == 9


def test_sliding_window_models_and_bad_specs_are_refused():
    with pytest.raises(HarnessError, match="sliding window"):
        make_cache(tiny_model("gemma3", sliding=True), KVQuantSpec(bits=8))
    with pytest.raises(HarnessError, match="bits: 3 is not one of 8, 4, 2"):
        make_cache(tiny_model("llama"), KVQuantSpec(bits=3))


def test_held_bytes_of_a_plain_cache_is_its_tensors(models):
    model = models["original"]
    cache = LatentCache(config=model.config)
    model(torch.randint(0, 128, (1, 5)), **{CACHE_ARG: cache}, use_cache=True)
    assert held_bytes(cache) == cache_bytes(cache) == full_bytes_per_token(model) * 5


def test_chunked_perplexity_is_the_single_pass_one_and_sees_the_quantized_cache(models):
    from harness.evaluate import chunked_perplexity, perplexity

    model = models["latent"]
    w = torch.randint(0, 128, (3, 50), generator=torch.Generator().manual_seed(0))
    for bos in (False, True):
        single, chunked = perplexity(model, w, bos=bos), chunked_perplexity(model, w, chunk=7, batch_size=2, bos=bos)
        assert chunked["tokens"] == single["tokens"] == 3 * (49 - bos)
        assert chunked["nll"] == pytest.approx(single["nll"], abs=1e-5)
    nll = {bits: chunked_perplexity(model, w, lambda b=bits: make_cache(model, KVQuantSpec(bits=b, group=32, residual=4)),
                                    chunk=7)["nll"] for bits in (8, 2)}
    exact = chunked_perplexity(model, w, chunk=7)["nll"]
    assert 0 < abs(nll[8] - exact) < abs(nll[2] - exact)
