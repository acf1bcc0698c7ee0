"""Methods: equivalences, rank allocation, budgets, errors."""
import copy
import math

import pytest
import torch

from harness.errors import HarnessError
from harness.methods import convert, get_method
from harness.methods._linalg import log_residual, waterfill
from harness.methods.care import care
from harness.methods.care_mla import care_mla
from harness.methods.mha2mla import mha2mla
from harness.methods.mha2mla import select_pairs
from harness.methods.svd import svd
from harness.mla import Budget, per_layer_width
from harness.arch import attention_layers
from tiny import tiny_model, tiny_stats


def _products(factors):
    return [(f.up_k @ f.down[f.k_slice[0]:f.k_slice[1]], f.up_v @ f.down[f.v_slice[0]:f.v_slice[1]]) for f in factors]


def test_care_with_power_zero_is_svd():
    m = tiny_model("llama")
    stats = tiny_stats(m)
    layers = attention_layers(m)
    a = _products(svd(layers, stats, Budget(kv_save=0.5)))
    b = _products(care(layers, stats, Budget(kv_save=0.5), allocation="uniform", power=0.0, damping=0.0))
    for (ka, va), (kb, vb) in zip(a, b):
        assert torch.allclose(ka, kb, atol=1e-8) and torch.allclose(va, vb, atol=1e-8)


def test_care_beats_svd_on_activation_error():
    """The sqrt-C factorization minimises ||X (W - What)^T||: it must beat plain SVD there."""
    m = tiny_model("llama")
    stats = tiny_stats(m)
    layers = attention_layers(m)
    s = _products(svd(layers, stats, Budget(kv_save=0.75)))
    c = _products(care(layers, stats, Budget(kv_save=0.75), allocation="uniform"))
    for a, (ks, _), (kc, _) in zip(layers, s, c):
        W = a.module.k_proj.weight.double()
        C = stats.cov[a.index]
        err = lambda What: torch.trace((W - What) @ C @ (W - What).T).item()  # noqa: E731
        assert err(kc) < err(ks)


def test_waterfill_spends_budget_within_bounds_and_beats_uniform():
    # layer 0: energy in a few directions; layer 1: flat spectrum
    steep = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5, 0.2, 0.1, 0.05])
    flat = torch.ones(8)
    spectra = [steep, flat, steep * 0.3]
    r = 4
    ranks = waterfill(spectra, total=r * 3, r_min=2, r_max=8)
    assert sum(ranks) == 12 and all(2 <= x <= 8 for x in ranks)
    assert log_residual(spectra, ranks) < log_residual(spectra, [r] * 3)
    assert ranks[0] > r and ranks[1] < r  # ranks move to where they cut the relative error most


def test_waterfill_on_real_spectra_respects_bounds():
    m = tiny_model("qwen2")
    stats = tiny_stats(m)
    layers = attention_layers(m)
    fs = care(layers, stats, Budget(kv_save=0.5), allocation="waterfill")
    rk = [f.info["r_k"] for f in fs]
    assert sum(rk) == 2 * 32 and all(16 <= x <= 64 for x in rk)


def test_mha2mla_budget_matches_paper_widths():
    # SmolLM2 shapes: n_kv 3, d_h 64, 2r = 8 dims per head: kv_save 0.6875 -> d_c = n_kv * d_h / 2 = 96
    for s, d_kv in ((0.6875, 32), (0.8125, 16), (0.875, 8)):
        w = per_layer_width(Budget(kv_save=s), 3, 64)
        assert w - 3 * 8 == 3 * d_kv


def test_pair_selections():
    assert select_pairs("high", 2, 16, 1, 1, 0).tolist() == [[0, 1]]
    assert select_pairs("low", 2, 16, 1, 1, 0).tolist() == [[14, 15]]
    assert select_pairs("uniform", 4, 16, 1, 1, 0).tolist() == [[0, 4, 8, 12]]

    class S:
        q_pair_norm = torch.zeros(1, 2, 16)
        k_pair_norm = torch.zeros(1, 1, 16)
    S.q_pair_norm[0, :, 5] = 3.0
    S.k_pair_norm[0, 0, [5, 9]] = 1.0
    S.q_pair_norm[0, 0, 9] = 1.0
    assert select_pairs("2norm", 2, 16, 1, 2, 0, S).tolist() == [[5, 9]]


@pytest.mark.parametrize("budget,msg", [
    (dict(rank=65), "above KV parity"), (dict(kv_save=1.0), "outside"), (dict(kv_save=-0.1), "outside"),
    (dict(rank=0), "below 1"), (dict(kv_save=0.999), "at least 1"),
])
def test_bad_budgets(budget, msg):
    m = tiny_model("llama")
    with pytest.raises(HarnessError, match=msg):
        convert(m, "svd", Budget(**budget))


def test_unknown_method_and_option():
    with pytest.raises(HarnessError, match="Did you mean 'care'"):
        get_method("caer")
    m = tiny_model("llama")
    with pytest.raises(HarnessError, match="no option"):
        convert(m, "care", Budget(kv_save=0.5), tiny_stats(m), alloc="uniform")


def test_nan_statistics_are_refused():
    m = tiny_model("llama")
    stats = tiny_stats(m)
    stats.cov[0, 0, 0] = math.nan
    with pytest.raises(HarnessError, match="NaN"):
        convert(m, "care", Budget(kv_save=0.5), stats)


def test_mha2mla_needs_statistics_only_for_2norm():
    m = get_method("mha2mla")
    assert m.requires_stats(m.check_options({})) and not m.requires_stats(m.check_options({"selection": "low"}))
    model = tiny_model("llama")
    with pytest.raises(HarnessError, match="needs calibration statistics"):
        convert(model, "mha2mla", Budget(kv_save=0.5), None)
    convert(model, "mha2mla", Budget(kv_save=0.5), None, selection="low")


def test_mha2mla_width_fraction_caches_that_share_of_the_budget():
    """CARE's MHA2MLA baseline: half the bytes of the split methods at the same "rank r"."""
    from harness.mla import accounted_width

    model = tiny_model("llama")  # n_kv 2, d_h 32, 2 layers: kv_save 0.5 -> 64 per layer
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    convert(a, "mha2mla", Budget(kv_save=0.5), None, selection="high")
    convert(b, "mha2mla", Budget(kv_save=0.5), None, selection="high", width_fraction=0.5)
    assert accounted_width(a) == 2 * 64 and accounted_width(b) == 2 * 32
    assert b.config.mla_conversion["accounting"]["kv_save"] == 0.75
    with pytest.raises(HarnessError, match="width_fraction"):
        convert(copy.deepcopy(model), "mha2mla", Budget(kv_save=0.5), None, selection="high", width_fraction=1.5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_care_mla_with_power_zero_is_mha2mla(arch):
    m = tiny_model(arch)
    stats = tiny_stats(m)
    layers = attention_layers(m)
    a = mha2mla(layers, stats, Budget(kv_save=0.5))
    b = care_mla(layers, stats, Budget(kv_save=0.5), power=0.0)
    for fa, fb in zip(a, b):
        for name in ("down", "up_k", "up_v", "k_rope", "rope_dims", "latent_dims", "k_bias", "v_bias"):
            ta, tb = getattr(fa, name), getattr(fb, name)
            assert (ta is None and tb is None) or torch.equal(ta, tb), name
        assert (fa.k_slice, fa.v_slice, fa.cache_width) == (fb.k_slice, fb.v_slice, fb.cache_width)


def test_care_mla_beats_mha2mla_on_activation_error():
    """Same RoPE rows, same latent width: the sqrt-C factorization must cut ||X (M - Mhat)^T|| for M = [W_k,nope; W_v]."""
    m = tiny_model("llama")
    stats = tiny_stats(m)
    layers = attention_layers(m)
    budget = Budget(kv_save=0.75)
    for a, fm, fc in zip(layers, mha2mla(layers, stats, budget), care_mla(layers, stats, budget)):
        assert torch.equal(fm.rope_dims, fc.rope_dims) and fm.cache_width == fc.cache_width
        C = stats.cov[a.index]
        M = torch.cat([fm.up_k @ fm.down, fm.up_v @ fm.down])  # what mha2mla rebuilds (NoPE K rows, V rows)
        Wk = a.module.k_proj.weight.double().view(a.n_kv, a.d_h, -1)
        k_nope = Wk.gather(1, fm.latent_dims[..., None].expand(-1, -1, Wk.shape[-1])).reshape(-1, Wk.shape[-1])
        W = torch.cat([k_nope, a.module.v_proj.weight.double()])
        err = lambda What: torch.trace((W - What) @ C @ (W - What).T).item()  # noqa: E731
        assert err(torch.cat([fc.up_k @ fc.down, fc.up_v @ fc.down])) < err(M)


def test_care_mla_waterfill_moves_latent_width_at_equal_total():
    m = tiny_model("qwen2")
    stats = tiny_stats(m)
    layers = attention_layers(m)
    u = care_mla(layers, stats, Budget(kv_save=0.5))
    w = care_mla(layers, stats, Budget(kv_save=0.5), allocation="waterfill")
    assert sum(f.cache_width for f in w) == sum(f.cache_width for f in u) == 2 * 64  # L x half of 2*n_kv*d_h
    assert [f.info["d_c"] for f in u] == [56, 56]  # 64 - n_kv*2p with p = d_h/16 = 2
    assert [f.info["d_c"] for f in w] != [56, 56] and all(28 <= f.info["d_c"] <= 112 for f in w)
    assert all(f.k_rope.shape[0] == 8 for f in w), "the exact RoPE keys are not reallocated"
