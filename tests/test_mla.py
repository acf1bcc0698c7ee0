"""The MLA module on tiny random models of every architecture: parity, decoding, cache bytes."""
import copy

import pytest
import torch

from harness.methods import convert
from harness.mla import Budget, LatentCache, accounted_width, cache_bytes, set_path
from tiny import ARCHS, tiny_model, tiny_stats

FULL = 64  # parity rank per K and V: n_kv * d_h = 2 * 32
METHODS = [("svd", {}), ("care", {"allocation": "uniform"}), ("care", {"allocation": "waterfill"}),
           ("aware_joint", {}), ("aware_joint", {"center": True}), ("aware_split", {"center": True}),
           ("aware_split", {"kv_split": "metric"}),
           ("care_joint", {}), ("asvd", {}), ("svdllm", {}), ("mha2mla", {"rope_pairs": 16}),
           ("mha2mla", {"rope_pairs": 16, "lowrank": "split"})]


@pytest.fixture(scope="module", params=ARCHS)
def arch_model(request):
    m = tiny_model(request.param)
    return request.param, m, tiny_stats(m)


def _decode(model, x, cache=None):
    cache = cache if cache is not None else LatentCache(config=model.config)
    outs = [model(x[:, t:t + 1], past_key_values=cache, use_cache=True).logits for t in range(x.shape[1])]
    return torch.cat(outs, 1), cache


@pytest.mark.parametrize("method,opts", METHODS, ids=[f"{m}-{'-'.join(map(str, o.values()))}" for m, o in METHODS])
def test_full_rank_reproduces_original(arch_model, method, opts):
    arch, base, stats = arch_model
    x = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    ref = base(x).logits
    m = copy.deepcopy(base)
    rec = convert(m, method, Budget(rank=FULL), stats, **opts)
    assert rec["accounting"]["kv_save"] == 0.0
    out = m(x).logits
    assert (out - ref).abs().max() <= 1e-4
    dec, _ = _decode(m, x)
    assert (dec - ref).abs().max() <= 1e-4, "token-by-token decoding with the latent cache"


@pytest.mark.parametrize("arch", ARCHS)
def test_decode_matches_prefill_at_low_rank_and_paths_agree(arch):
    base = tiny_model(arch)
    stats = tiny_stats(base)
    x = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    for method, opts in [("care", {}), ("mha2mla", {"rope_pairs": 2})]:
        m = copy.deepcopy(base)
        convert(m, method, Budget(kv_save=0.5), stats, **opts)
        pre = m(x).logits
        assert (pre - base(x).logits).abs().max() > 1e-3, "a 50% budget must change the logits"
        dec, cache = _decode(m, x)
        assert (dec - pre).abs().max() <= 1e-4
        # bytes held == accounted width x tokens x batch x dtype size (no sliding window here)
        assert cache_bytes(cache) == accounted_width(m) * x.shape[1] * x.shape[0] * 4
        assert accounted_width(m) == 2 * 2 * 64 // 2  # L * (w/2)
        if m.model.layers[0].self_attn.supports_absorbed():
            set_path(m, "absorbed")
            assert (m(x).logits - pre).abs().max() <= 1e-4
            dec2, _ = _decode(m, x)
            assert (dec2 - pre).abs().max() <= 1e-4


def test_absorbed_refused_where_it_cannot_apply():
    m = tiny_model("llama")
    convert(m, "care", Budget(kv_save=0.5), tiny_stats(m))
    with pytest.raises(ValueError, match="absorbed"):
        set_path(m, "absorbed")


@pytest.mark.parametrize("arch", ["mistral", "gemma3"])
def test_sliding_window_parity_beyond_the_window(arch):
    base = tiny_model(arch, sliding=True)
    stats = tiny_stats(base)
    x = torch.randint(0, 128, (1, 14), generator=torch.Generator().manual_seed(3))
    m = copy.deepcopy(base)
    convert(m, "care", Budget(rank=FULL), stats)
    ref = base(x).logits
    assert (m(x).logits - ref).abs().max() <= 1e-4
    dec, cache = _decode(m, x)
    assert (dec - ref).abs().max() <= 1e-4
    _, ref_cache = _decode(base, x)
    # at parity the latent holds as many bytes as the original cache, window trimming included
    assert cache_bytes(cache) == cache_bytes(ref_cache)


def test_generate_with_latent_cache_holds_accounted_bytes():
    base = tiny_model("llama")
    m = copy.deepcopy(base)
    convert(m, "mha2mla", Budget(kv_save=0.75), tiny_stats(base), rope_pairs=2)
    x = torch.randint(0, 128, (1, 5))
    cache = LatentCache(config=m.config)
    out = m.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=9, min_new_tokens=9,
                     do_sample=False, past_key_values=cache)
    T = out.shape[1] - 1
    assert cache.bytes_held() == accounted_width(m) * T * 4
    assert accounted_width(m) == 64  # 25% of 2 layers x 2*n_kv*d_h = 256
