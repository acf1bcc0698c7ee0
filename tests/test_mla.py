"""The MLA module on tiny random models of every architecture: parity, decoding, cache bytes."""
import copy
import warnings

import pytest
import torch

from harness.errors import HarnessError
from harness.methods import convert
from harness.mla import Budget, LatentCache, accounted_width, cache_bytes, set_path
from harness.mla.cache import CACHE_ARG
from tiny import ARCHS, tiny_model, tiny_stats

FULL = 64  # parity rank per K and V: n_kv * d_h = 2 * 32
METHODS = [("svd", {}), ("care", {"allocation": "uniform"}), ("care", {"allocation": "waterfill"}),
           ("aware_joint", {}), ("aware_joint", {"center": True}), ("aware_split", {"center": True}),
           ("aware_split", {"kv_split": "metric"}),
           ("care_joint", {}), ("asvd", {}), ("svdllm", {}), ("mha2mla", {"rope_pairs": 16}),
           ("mha2mla", {"rope_pairs": 16, "lowrank": "split"}), ("care_mla", {"rope_pairs": 16}),
           ("care_mla", {"rope_pairs": 16, "allocation": "waterfill"})]


@pytest.fixture(scope="module", params=ARCHS)
def arch_model(request):
    m = tiny_model(request.param)
    return request.param, m, tiny_stats(m)


def _decode(model, x, cache=None):
    cache = cache if cache is not None else LatentCache(config=model.config)
    outs = [model(x[:, t:t + 1], **{CACHE_ARG: cache}, use_cache=True).logits for t in range(x.shape[1])]
    return torch.cat(outs, 1), cache


def test_the_cache_reaches_the_mla_layers_under_the_installed_transformers_name():
    """transformers 5.24 renamed `past_key_values` to `cache` down to the attention call; an MLA layer
    that read only the old name decoded without its cache. CACHE_ARG is the name the installed release
    takes without a deprecation warning, and the latent cache fills through it."""
    m = tiny_model("llama")
    convert(m, "care", Budget(kv_save=0.5), tiny_stats(m))
    x = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(3))
    cache = LatentCache(config=m.config)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        m(x, **{CACHE_ARG: cache}, use_cache=True)
        out = m.generate(x, **{CACHE_ARG: LatentCache(config=m.config)}, max_new_tokens=3, do_sample=False,
                         pad_token_id=0, return_dict_in_generate=True)
    assert cache.get_seq_length() == 7 and cache_bytes(cache) == 7 * accounted_width(m) * 4
    assert out.sequences.shape[1] == 10


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
    for method, opts in [("care", {}), ("mha2mla", {"rope_pairs": 2}), ("care_mla", {"rope_pairs": 2})]:
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
    with pytest.raises(HarnessError, match="absorbed decode path does not apply.*RoPE on keys rebuilt"):
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
                     do_sample=False, **{CACHE_ARG: cache})
    T = out.shape[1] - 1
    assert cache.bytes_held() == accounted_width(m) * T * 4
    assert accounted_width(m) == 64  # 25% of 2 layers x 2*n_kv*d_h = 256


NO_KNORM = ("llama", "qwen2", "mistral")


def _check_both_paths(m, ref, x, tol=1e-4):
    """Prefill and token-by-token decode through the latent cache, reconstruct then absorbed, equal `ref`."""
    for path in ("reconstruct", "absorbed"):
        set_path(m, path)
        assert (m(x).logits - ref).abs().max() <= tol, f"{path} prefill"
        dec, _ = _decode(m, x)
        assert (dec - ref).abs().max() <= tol, f"{path} decode"


@pytest.mark.parametrize("arch", NO_KNORM)
def test_care_mla_full_rank_reproduces_original_on_both_paths(arch):
    """All pairs keep RoPE (rope_pairs = d_h/2): the sqrt-C-whitened latent then serves V alone and must be exact."""
    base = tiny_model(arch)
    stats = tiny_stats(base)
    x = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(4))
    m = copy.deepcopy(base)
    convert(m, "care_mla", Budget(rank=FULL), stats, rope_pairs=16)
    _check_both_paths(m, base(x).logits, x)


@pytest.mark.parametrize("arch", NO_KNORM)
def test_care_mla_full_rank_partial_rope_equals_mha2mla_on_both_paths(arch):
    """With p < d_h/2 pairs the model itself changes (NoPE dims lose RoPE: MHA2MLA's partial RoPE), so the
    reference is mha2mla at full rank; care_mla's whitened latent (NoPE keys + values) must reproduce it."""
    base = tiny_model(arch)
    stats = tiny_stats(base)
    x = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(5))
    ref_m = copy.deepcopy(base)
    convert(ref_m, "mha2mla", Budget(rank=FULL), stats, rope_pairs=2)
    ref = ref_m(x).logits
    assert (ref - base(x).logits).abs().max() > 1e-3, "partial RoPE must change the model"
    m = copy.deepcopy(base)
    rec = convert(m, "care_mla", Budget(rank=FULL), stats, rope_pairs=2)
    assert rec["accounting"]["kv_save"] == 0.0 and all(l["d_c"] == 120 for l in rec["layers"])  # 2*28 + 64
    _check_both_paths(m, ref, x)


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_care_mla_on_qk_norm_models_reconstructs_and_refuses_absorbed(arch):
    base = tiny_model(arch)
    stats = tiny_stats(base)
    x = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(6))
    m = copy.deepcopy(base)
    with pytest.raises(HarnessError, match="absorbed decode path does not apply.*q/k-norm.*reconstruct"):
        convert(m, "care_mla", Budget(kv_save=0.5), stats, path="absorbed")
    assert not any(type(d.self_attn).__name__ == "MLAAttention" for d in m.model.layers), "nothing half-converted"
    convert(m, "care_mla", Budget(rank=FULL), stats, rope_pairs=16)
    assert (m(x).logits - base(x).logits).abs().max() <= 1e-4
    with pytest.raises(HarnessError, match="q/k-norm"):
        set_path(m, "absorbed")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_rope_keys_are_cached_rotated_like_the_original_keys(arch):
    """The cached RoPE keys are the original's post-RoPE keys on the kept dims (bias included), at
    every position: rotated once when written, never again."""
    base = tiny_model(arch)
    x = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(7))
    _, ref_cache = _decode(base, x)
    # kv_save 0.5, 2 pairs: layer 0 sees the original's input; full rank with every pair: all layers do
    for budget, pairs, n_layers in ((Budget(kv_save=0.5), 2, 1), (Budget(rank=FULL), 16, 2)):
        m = copy.deepcopy(base)
        convert(m, "mha2mla", budget, None, selection="low", rope_pairs=pairs)
        _, cache = _decode(m, x)
        for layer, ref_layer, dec in list(zip(cache.layers, ref_cache.layers, m.model.layers))[:n_layers]:
            rope_dims = dec.self_attn.rope_dims  # (n_kv, 2p)
            B, n_kv, S, d_h = ref_layer.keys.shape
            want = ref_layer.keys.gather(3, rope_dims[None, :, None, :].expand(B, -1, S, -1))  # (B, n_kv, S, 2p)
            got = layer.values.view(B, S, n_kv, -1).transpose(1, 2)
            assert (got - want).abs().max() <= 1e-5


class _NoTables(torch.nn.Module):
    def forward(self, *a, **k):
        raise AssertionError("position tables rebuilt for the cached keys")


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_decoding_with_nope_latent_never_rebuilds_position_tables(arch):
    """Absorbed and (no k-norm) reconstruct decoding read the cached RoPE keys as they are: the
    rotary module is never asked for the cached positions' tables, and no position_ids are needed."""
    base = tiny_model(arch)
    x = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(8))
    m = copy.deepcopy(base)
    convert(m, "care_mla", Budget(kv_save=0.5), tiny_stats(base))
    ref = m(x).logits
    for dec in m.model.layers:
        dec.self_attn.bind_rotary(_NoTables(), None)
    for path in ("reconstruct", "absorbed"):
        set_path(m, path)
        out, _ = _decode(m, x)
        assert (out - ref).abs().max() <= 1e-4, path


def test_static_cache_decoding_holds_accounted_bytes_on_both_paths():
    """A transformers StaticCache holds the latent and RoPE keys: bytes = accounted width x slots."""
    from transformers import StaticCache

    base = tiny_model("qwen2")
    x = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(9))
    m = copy.deepcopy(base)
    convert(m, "care_mla", Budget(kv_save=0.5), tiny_stats(base))
    pre = m(x).logits
    for path in ("reconstruct", "absorbed"):
        set_path(m, path)
        cache = StaticCache(config=m.config, max_cache_len=16)
        dec, _ = _decode(m, x, cache)
        assert (dec - pre).abs().max() <= 1e-4, path
        assert cache_bytes(cache) == accounted_width(m) * 16 * 2 * 4


def test_partial_rope_masks_follow_the_module_to_another_device():
    """A model converted in one place and moved (.to) must carry its RoPE masks along (seen on CUDA:
    plain attributes stayed on the CPU). Checked with a dtype move, which touches the same buffers."""
    m = tiny_model("llama")
    convert(m, "mha2mla", Budget(kv_save=0.5), tiny_stats(m))
    attn = m.model.layers[0].self_attn
    names = {n for n, _ in attn.named_buffers()}
    assert {"_k_mask", "_q_mask"} <= names and "_k_mask" not in attn.state_dict()
    m.to(torch.float64)
    x = torch.randint(0, 128, (1, 5))
    assert torch.isfinite(m(x).logits).all()
