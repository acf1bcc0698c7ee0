"""Attention-aware factorization, sequential calibration, sensitivity allocation and tuning (DESIGN §13)."""
import copy
import math

import pytest
import torch

from harness.arch import attention_layers, lm_logits
from harness.calibrate import LayerRunner, Stats, collect_sequential, collect_stats, stats_key, CalibSpec
from harness.errors import HarnessError
from harness.methods import convert, get_method
from harness.methods._linalg import cov_power, drift_target, whitened_factor
from harness.methods._oneshot import allocate_by_curves, measure_sensitivity, sensitivity_widths, tune, TUNE_GRIDS
from harness.methods.aware import aware_joint, aware_split, key_weights, value_gram
from harness.methods.care import care
from harness.methods.care_joint import care_joint
from harness.mla import Budget
from harness.mla.convert import build_attention
from tiny import ARCHS, tiny_model, tiny_stats

NO_METRIC = dict(key_metric="none", value_metric="none", kv_balance="none", center=False)


def _windows(n=8, T=16, seed=0):
    return torch.randint(0, 128, (n, T), generator=torch.Generator().manual_seed(seed))


def _same(fa, fb):
    for a, b in zip(fa, fb):
        assert torch.equal(a.down, b.down) and torch.equal(a.up_k, b.up_k) and torch.equal(a.up_v, b.up_v)
        assert a.k_slice == b.k_slice and a.v_slice == b.v_slice


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("save", [0.5, 0.75])
def test_identity_metric_is_care_exactly(arch, save):
    m = tiny_model(arch)
    st = tiny_stats(m)
    layers = attention_layers(m)
    b = Budget(kv_save=save)
    _same(aware_joint(layers, st, b, **NO_METRIC), care_joint(layers, st, b))
    _same(aware_split(layers, st, b, **NO_METRIC), care(layers, st, b, allocation="uniform"))


def test_two_sided_svd_with_identity_is_one_sided_exactly():
    g = torch.Generator().manual_seed(0)
    W, A = torch.randn(24, 40, generator=g), torch.randn(40, 40, generator=g)
    S, S_inv = cov_power(A @ A.T / 40, 0.5, 0.01)
    eye = torch.eye(24, dtype=torch.float64)
    for x, y in zip(whitened_factor(W, 7, S, S_inv, eye, eye), whitened_factor(W, 7, S, S_inv)):
        assert torch.equal(x, y)


def test_two_sided_svd_is_optimal_in_its_metric():
    """The factorization minimises ||S (W^T - What^T) G||: it beats the one-sided one there, and
    its error is the tail of the weighted spectrum (Eckart-Young)."""
    g = torch.Generator().manual_seed(1)
    W, A, B = torch.randn(24, 40, generator=g), torch.randn(40, 40, generator=g), torch.randn(24, 24, generator=g)
    S, S_inv = cov_power(A @ A.T / 40, 0.5, 0.01)
    G = torch.linalg.matrix_exp(((B + B.T) / 8).double())  # symmetric positive definite
    G_inv = torch.linalg.inv(G)
    err = lambda d, u: float((S @ (W.double().T - (u @ d).T) @ G).norm())  # noqa: E731
    d2, u2, sig = whitened_factor(W, 7, S, S_inv, G, G_inv)
    d1, u1, _ = whitened_factor(W, 7, S, S_inv)
    assert err(d2, u2) < err(d1, u1)
    assert math.isclose(err(d2, u2) ** 2, float((sig[7:] ** 2).sum()), rel_tol=1e-9)


def test_key_metric_is_the_rotation_averaged_query_moment():
    """E_theta (q^T R_theta dk)^2 over independent uniform pair rotations = sum_j 1/2 |q_j|^2 |dk_j|^2,
    and key_weights holds 1/2 E|q_pair|^2 summed over the group's heads."""
    d, half = 8, 4
    g = torch.Generator().manual_seed(2)
    q, dk = torch.randn(d, generator=g).double(), torch.randn(d, generator=g).double()
    th = torch.rand(200000, half, generator=g).double() * 2 * math.pi
    c, s = torch.cos(th), torch.sin(th)
    rk1 = c * dk[:half] - s * dk[half:]  # rotate_half convention: pair j = dims (j, j + d/2)
    rk2 = s * dk[:half] + c * dk[half:]
    mc = ((q[:half] * rk1 + q[half:] * rk2).sum(1) ** 2).mean()
    pq = q[:half] ** 2 + q[half:] ** 2
    pk = dk[:half] ** 2 + dk[half:] ** 2
    assert math.isclose(float(mc), float((pq * pk).sum() / 2), rel_tol=2e-2)

    m = tiny_model("llama")
    x = _windows()
    st = collect_stats(m, x, batch_size=4, progress=False)
    a = attention_layers(m)[1]
    xs = []
    h = a.module.k_proj.register_forward_pre_hook(lambda _m, args: xs.append(args[0].reshape(-1, 128)))
    m(x)
    h.remove()
    qq = a.module.q_proj(torch.cat(xs)).view(-1, a.n_h, a.d_h // 2 * 2)
    pair = (qq[..., :16] ** 2 + qq[..., 16:] ** 2).mean(0).double()  # (n_h, 16)
    want = (pair.view(2, 2, 16).sum(1) / 2).repeat(1, 2).reshape(-1)  # group of 2 heads per KV head
    assert torch.allclose(key_weights(a, st), want, rtol=1e-4)


def test_value_metric_is_the_output_error():
    """dv^T G_V^2 dv = sum_h ||W_o,h dv_g(h)||^2: each query head h adds o_proj's block of its group's
    value error to the output (errors of different heads counted as uncorrelated, DESIGN §13)."""
    m = tiny_model("llama")
    a = attention_layers(m)[0]
    Wo = a.module.o_proj.weight.detach().double()
    dv = torch.randn(a.n_kv * a.d_h, dtype=torch.float64)
    g = a.n_h // a.n_kv
    want = sum(float((Wo[:, h * a.d_h:(h + 1) * a.d_h] @ dv[(h // g) * a.d_h:(h // g + 1) * a.d_h]).pow(2).sum())
               for h in range(a.n_h))
    assert math.isclose(float(dv @ value_gram(a) @ dv), want, rel_tol=1e-10)


def test_k_norm_jacobian_statistic():
    m = tiny_model("qwen3")
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.k_norm.weight.uniform_(0.5, 2.0)
    x = _windows()
    st = collect_stats(m, x, batch_size=4, progress=False)
    a = attention_layers(m)[0]
    xs = []
    h = a.module.k_proj.register_forward_pre_hook(lambda _m, args: xs.append(args[0].reshape(-1, 128)))
    m(x)
    h.remove()
    k = a.module.k_proj(torch.cat(xs)).view(-1, a.n_kv, a.d_h)
    norm = a.module.k_norm
    want = (norm.weight ** 2 / (k.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)).mean(0)
    assert torch.allclose(st.k_jac_sq[0], want.float(), rtol=1e-4)
    assert torch.equal(tiny_stats(tiny_model("llama")).k_jac_sq, torch.ones(2, 2, 32))  # no k-norm: 1


def test_stats_fields_are_token_weighted_means():
    """Statistics of windows A + B are the token-weighted mixture of those of A and of B, field by field
    (what mixture calibration relies on), and a saved dict round-trips every field."""
    m = tiny_model("qwen3")
    x = _windows(12)
    a = collect_stats(m, x[:4], batch_size=4, progress=False)
    b = collect_stats(m, x[4:], batch_size=4, progress=False)
    ab = collect_stats(m, x, batch_size=4, progress=False)
    wa = a.n_tokens / ab.n_tokens
    assert set(ab.tensors()) == {"cov", "abs_mean", "q_pair_norm", "k_pair_norm", "x_mean", "q_pair_sq", "k_jac_sq"}
    for name, t in ab.tensors().items():
        mix = wa * getattr(a, name).double() + (1 - wa) * getattr(b, name).double()
        assert torch.allclose(t.double(), mix, rtol=1e-4, atol=1e-6), name
    back = Stats.from_dict({**ab.tensors(), "n_tokens": ab.n_tokens})
    for name, t in ab.tensors().items():
        assert torch.equal(getattr(back, name), t)


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_runner_reproduces_the_forward(arch):
    m = tiny_model(arch, sliding=arch in ("mistral", "gemma3"))
    x = _windows(6, 12)
    runner = LayerRunner(m, x, batch_size=4)  # batches of 4 and 2: kwargs recorded per batch size
    hs = runner.inputs()
    for l in range(m.config.num_hidden_layers):
        hs = [runner.run(l, h) for h in hs]
    got = torch.cat([lm_logits(m, h) for h in hs])
    assert (got - m(x).logits).abs().max() <= 1e-5


def test_drift_target_is_w_without_drift():
    m = tiny_model("llama")
    st = tiny_stats(m)
    W = attention_layers(m)[0].module.k_proj.weight
    st.cross_cov = st.cov.clone()
    assert torch.allclose(drift_target(W, st, 0, 0.01), W.double(), atol=1e-12)
    st.cross_cov = None
    assert torch.equal(drift_target(W, st, 0, 0.01), W.double())


@pytest.mark.parametrize("target", ["original", "self"])
def test_sequential_statistics(target):
    base = tiny_model("qwen2")
    x = _windows()
    plain = collect_stats(base, x, batch_size=4, progress=False)
    layers = attention_layers(base)
    ref_logits = base(x).logits

    def converter(rank):
        meth = get_method("aware_joint")

        def convert_layer(l, st):
            f = meth.fn([layers[l]], st, Budget(rank=rank), widths=[2 * rank])[0]
            return build_attention(base, layers[l], f)
        return convert_layer

    full = collect_sequential(base, x, converter(64), target=target, batch_size=4, progress=False)
    assert (base(x).logits - ref_logits).abs().max() == 0, "the model is unchanged afterwards"
    # at full rank nothing drifts: the statistics are the plain ones
    assert torch.allclose(full.cov, plain.cov, rtol=1e-5, atol=1e-6)
    if target == "original":
        assert torch.allclose(full.cross_cov, plain.cov, rtol=1e-5, atol=1e-6)
    else:
        assert full.cross_cov is None
    low = collect_sequential(base, x, converter(16), target=target, batch_size=4, progress=False)
    assert torch.allclose(low.cov[0], plain.cov[0], rtol=1e-5, atol=1e-6)  # layer 0 sees the same input
    assert not torch.allclose(low.cov[1], plain.cov[1], rtol=1e-3)  # layer 1 sees the converted layer 0
    # the sequential conversion at full rank reproduces the original
    low.meta["sequential"] = target
    full.meta["sequential"] = target
    m = copy.deepcopy(base)
    convert(m, "aware_joint", Budget(rank=64), full, sequential=True)
    assert (m(x).logits - ref_logits).abs().max() <= 1e-4


def test_sequential_with_drift_correction_fits_the_original_better():
    """With cross-covariance statistics, layer 1 of the sequential conversion approximates the
    original's K/V outputs (from the original input) better than the plain conversion does."""
    base = tiny_model("llama")
    x = _windows(16)
    plain = collect_stats(base, x, batch_size=4, progress=False)
    layers = attention_layers(base)
    meth = get_method("care_joint")

    def convert_layer(l, st):
        return build_attention(base, layers[l], meth.fn([layers[l]], st, Budget(kv_save=0.75), widths=[32])[0])

    seq = collect_sequential(base, x, convert_layer, target="original", batch_size=4, progress=False)
    seq.meta["sequential"] = "original"
    b = Budget(kv_save=0.75)
    errs = {}
    for name, st in (("plain", plain), ("seq", seq)):
        m = copy.deepcopy(base)
        convert(m, "care_joint", b, st, widths=[32, 32], sequential=name == "seq")
        got, want = [], []
        h1 = m.model.layers[1].self_attn.down.register_forward_hook(lambda mod, i, o: got.append(o))
        h2 = base.model.layers[1].self_attn.k_proj.register_forward_pre_hook(lambda mod, i: want.append(i[0]))
        m(x)
        base(x)
        h1.remove()
        h2.remove()
        att = m.model.layers[1].self_attn
        kv = torch.cat([att.up_k(got[0]), att.up_v(got[0])], -1)
        a = base.model.layers[1].self_attn
        ref = torch.cat([a.k_proj(want[0]), a.v_proj(want[0])], -1)
        errs[name] = float((kv - ref).pow(2).mean())
    assert errs["seq"] < errs["plain"]


def test_sequential_cache_key_depends_on_the_conversion():
    m = tiny_model("llama")
    spec = CalibSpec("wiki", 4, 16, 0)
    k0 = stats_key(m, spec)
    k1 = stats_key(m, spec, {"sequential": "original", "method": "aware_joint", "options": {"widths": [32, 32]}})
    k2 = stats_key(m, spec, {"sequential": "original", "method": "aware_joint", "options": {"widths": [48, 16]}})
    k3 = stats_key(m, spec, {"sequential": "original", "method": "care_joint", "options": {"widths": [32, 32]}})
    assert len({k0, k1, k2, k3}) == 4


def test_sequential_option_needs_sequential_statistics():
    m = tiny_model("llama")
    with pytest.raises(HarnessError, match="sequential statistics"):
        convert(m, "aware_joint", Budget(kv_save=0.5), tiny_stats(m), sequential=True)


def test_allocator_spends_exactly_the_budget_within_bounds():
    g = torch.Generator().manual_seed(3)
    L, probe = 7, [16, 32, 64]
    curves = []
    for l in range(L):
        scale, decay = float(torch.rand(1, generator=g)) * 10 ** l % 7 + 0.01, float(torch.rand(1, generator=g)) / 8
        curves.append((probe, [scale * math.exp(-decay * w) for w in probe]))
    for total in (16 * L, 23 * L + 3, 32 * L, 64 * L):
        w = allocate_by_curves(curves, total, [16] * L, [64] * L)
        assert sum(w) == total and all(16 <= x <= 64 for x in w)
    with pytest.raises(HarnessError, match="cannot be spread"):
        allocate_by_curves(curves, 64 * L + 1, [16] * L, [64] * L)
    # a layer whose loss falls steeply gets more width than a flat one
    w = allocate_by_curves([(probe, [1.0, 0.1, 0.01]), (probe, [1.0, 0.9, 0.8])], 64, [16, 16], [64, 64])
    assert w[0] > w[1] and sum(w) == 64


def test_measured_sensitivity_and_widths(tmp_path, monkeypatch):
    monkeypatch.setenv("MLA_HARNESS_CACHE", str(tmp_path))
    m = tiny_model("llama")
    st = tiny_stats(m)
    st.meta["key"] = "tiny"
    layers = attention_layers(m)
    meth = get_method("aware_joint")
    x = _windows(4, 16, seed=5)
    kl = measure_sensitivity(m, layers, meth, st, Budget(kv_save=0.5), meth.check_options({}), x, [16, 128])
    assert all(row[1] < 1e-8 < row[0] for row in kl), "full width changes nothing; a narrow one does"
    opts = meth.check_options({"allocation": "sensitivity"})
    widths, rec = sensitivity_widths(m, layers, meth, st, Budget(kv_save=0.5), opts, x)
    assert sum(widths) == 2 * 64 and all(32 <= w <= 128 for w in widths)
    assert rec["probe_widths"] == [32, 64, 128] and rec["probes_reused"] == 0
    assert [r[-1] for r in rec["kl"]] == [0.0, 0.0], "full width (128 = 2 n_kv d_h) is exact: no probe"
    mm = copy.deepcopy(m)
    convert(mm, "aware_joint", Budget(kv_save=0.5), st, allocation="sensitivity", widths=widths)
    assert [d.self_attn.rank for d in mm.model.layers] == widths
    # another budget reuses the probes the two share (width 64 is the 75% bound's top)
    _, rec75 = sensitivity_widths(m, layers, meth, st, Budget(kv_save=0.75), opts, x)
    assert rec75["probe_widths"] == [16, 32, 64] and rec75["probes_reused"] == 4
    assert [r[1:] for r in rec75["kl"]] == [r[:2] for r in rec["kl"]]


def test_tune_picks_the_lowest_heldout_loss():
    m = tiny_model("llama")
    st = tiny_stats(m)
    meth = get_method("aware_joint")
    opts = meth.check_options({"tune": ["kv_scale"]})
    chosen, rec = tune(m, attention_layers(m), meth, st, Budget(kv_save=0.75), opts, _windows(4, 16, seed=6))
    losses = rec["losses"]["kv_scale"]
    assert set(losses) == {str(v) for v in TUNE_GRIDS["kv_scale"]}
    assert chosen["kv_scale"] == min(TUNE_GRIDS["kv_scale"], key=lambda v: losses[str(v)])
    assert len(set(losses.values())) > 1, "the K/V scale changes the joint factorization"


@pytest.mark.parametrize("opts,msg", [
    ({"key_metric": "keys"}, "key_metric"), ({"allocation": "fisher"}, "allocation"),
    ({"tune": ["alpha"]}, "tune"), ({"sequential": "yes"}, "sequential"), ({"kv_scale": 0}, "kv_scale"),
    ({"bounds": [2, 0.5]}, "bounds"),
])
def test_bad_option_values_fail_before_compute(opts, msg):
    with pytest.raises(HarnessError, match=msg):
        get_method("aware_joint").check_options(opts)


def test_centred_factorization_with_mean_bias_beats_uncentred():
    """With center, the mean input is reproduced by a bias and the rank goes to the variation: the
    K/V output error on the calibration tokens is lower at the same width."""
    m = tiny_model("qwen2")
    x = _windows(8)
    xs = []
    h = m.model.layers[1].self_attn.k_proj.register_forward_pre_hook(lambda _m, args: xs.append(args[0]))
    m(x)
    h.remove()
    X = torch.cat(xs).reshape(-1, 128).double()
    # shift the inputs' mean (as LLM residual streams have) through the statistics
    st = collect_stats(m, x, batch_size=4, progress=False)
    a = attention_layers(m)[1]
    ref = torch.cat([a.module.k_proj(X.float()), a.module.v_proj(X.float())], -1).double()
    errs = {}
    for center in (False, True):
        f = aware_joint([a], st, Budget(kv_save=0.75), **{**NO_METRIC, "center": center})[0]
        c = X @ f.down.T
        kv = torch.cat([c @ f.up_k.T + f.k_bias, c @ f.up_v.T + f.v_bias], -1)
        errs[center] = float((kv - ref).pow(2).mean())
    assert errs[True] < errs[False]
