"""`aware_joint` / `aware_split`: attention-aware factorization (DESIGN §13).

care and care_joint minimise the error of K and V themselves, ||S (W^T - What^T)||_F. The model
sees K only through its group's query scores q^T k and V only through o_proj, so the error worth
minimising is two-sided:

    min ||S (W^T - What^T) G||_F,   S = (C + a*mean(diag C)*I)^p   (C: input covariance)

with G, for KV group g,
  * K: G_K = diag(sqrt(m)), m_j = 1/2 sum_{h in g} E||q_{h,j}||^2 for RoPE pair j (dims j and
    j + d_h/2): averaged over the rotation between query and key, E[q q^T] is m_j * I on each pair,
    so E(q^T dk)^2 = sum_j m_j |dk_j|^2. Under a k-norm (Qwen3, Gemma3) the error passes its
    Jacobian, so m is multiplied by E[gamma_j^2 / ms(k)].
  * V: G_V = (sum_{h in g} W_o,h^T W_o,h)^(1/2), so ||G_V dv|| = the error it adds to the output.
The SVD S W^T G = U Sigma V^T gives What^T = S^-1 U_r Sigma_r V_r^T G^-1 (down = (S^-1 U_r Sigma_r)^T,
up = G^-1 V_r); G = I is care / care_joint exactly.

`aware_joint` factors the stacked [W_k; W_v] into one latent with the block-diagonal metric
diag(b_K G_K, b_V G_V). Score errors and output errors are in different units: kv_balance
"energy" scales each block to unit weighted energy (b^2 = 1 / ||S W^T G||_F^2, neither block wins
by its units alone) and kv_scale multiplies the K block's squared weight; `tune: [kv_scale]`
picks it on held-out calibration windows. `aware_split` factors K and V separately, with the
layer's width split equally or (kv_split "metric") where the balanced weighted spectra say.

Options shared with the orchestration in `calibrate_and_convert`: `widths` (explicit per-layer
widths, also what the sensitivity allocation and sequential calibration pass down), `sequential`
(statistics of layer l on the model whose layers < l are converted; cross-covariance statistics
make the target the original's K/V from the drifted input, see `_linalg.drift_target`), `tune`
(settings chosen on held-out calibration windows). See harness/methods/_oneshot.py.
"""
from __future__ import annotations

import torch

from harness.errors import HarnessError
from harness.methods import register
from harness.methods._linalg import cov_power, drift_target, kv_biases, mean_bias, sqrtm_psd, whitened_factor
from harness.methods.care import allocate
from harness.mla.accounting import parity_rank, per_layer_width
from harness.mla.factors import LayerFactors, all_rope_dims, split_factors

ALLOCATIONS = ("uniform", "waterfill", "sensitivity")


def key_weights(a, stats) -> torch.Tensor:
    """Squared K metric, the diagonal of G_K^2 (n_kv*d_h,): rotation-averaged query second moment
    per RoPE pair summed over the group's query heads, times the k-norm Jacobian (1 without)."""
    if getattr(stats, "q_pair_sq", None) is None:
        raise HarnessError("the attention-aware K metric needs statistics with q_pair_sq (STATS_VERSION >= 2); "
                           "delete stale entries under $MLA_HARNESS_CACHE/stats or recompute them")
    n_kv, d_h = a.n_kv, a.d_h
    m = stats.q_pair_sq[a.index].double() / 2  # (n_h, d_h/2): per-dim share of the pair's second moment
    mk = m.view(n_kv, a.n_h // n_kv, d_h // 2).sum(1)  # (n_kv, d_h/2)
    w = torch.cat([mk, mk], 1) * stats.k_jac_sq[a.index].double()  # dims j and j + d_h/2 share pair j
    return w.reshape(-1)


def value_gram(a) -> torch.Tensor:
    """G_V^2 (n_kv*d_h, n_kv*d_h), block-diagonal: sum over the group's heads of W_o,h^T W_o,h."""
    n_kv, d_h, g = a.n_kv, a.d_h, a.n_h // a.n_kv
    Wo = a.module.o_proj.weight.detach().double()  # (D, n_h*d_h); head h = kv group h // g
    blocks = Wo.view(Wo.shape[0], n_kv, g, d_h)
    gram = torch.einsum("dkhi,dkhj->kij", blocks, blocks)  # (n_kv, d_h, d_h)
    return torch.block_diag(*gram)


def layer_metrics(a, stats, key_metric: str, value_metric: str):
    """(G_K, G_K^-1, G_V, G_V^-1) of one layer; None where the metric is "none" (identity)."""
    GK = GKi = GV = GVi = None
    if key_metric == "query":
        w = key_weights(a, stats)
        w = w.clamp_min(1e-10 * float(w.max().clamp_min(1e-300)))
        GK, GKi = torch.diag(w.sqrt()), torch.diag(w.rsqrt())
    if value_metric == "output":
        GV, GVi = sqrtm_psd(value_gram(a))
    return GK, GKi, GV, GVi


def input_metric(stats, l: int, power: float, damping: float, center: bool):
    """S = C^p and S^-1 for layer l; with center, C is the centred covariance C - mu mu^T (the mean
    input is then reproduced exactly by a bias, `mean_bias`, so no rank is spent on it)."""
    C = stats.cov[l].double()
    if center:
        if getattr(stats, "x_mean", None) is None:
            raise HarnessError("center: true needs statistics with x_mean (STATS_VERSION >= 2); recompute them")
        mu = stats.x_mean[l].double()
        C = C - torch.outer(mu, mu)
    return cov_power(C, power, damping)


def _energy(S: torch.Tensor, W: torch.Tensor, G: torch.Tensor | None) -> float:
    M = S @ W.T
    return float((M if G is None else M @ G).pow(2).sum())


def _eye_if_none(G: torch.Tensor | None, n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.eye(n, dtype=torch.float64, device=like.device) if G is None else G


def _block_scales(S, Wk, Wv, GK, GV, kv_balance: str, kv_scale: float) -> tuple[float, float]:
    """(b_K, b_V): multipliers of the K and V blocks of the metric."""
    bk2, bv2 = kv_scale, 1.0
    if kv_balance == "energy":
        bk2 /= max(_energy(S, Wk, GK), 1e-300)
        bv2 /= max(_energy(S, Wv, GV), 1e-300)
    return bk2 ** 0.5, bv2 ** 0.5


def check_options(opts: dict) -> None:
    """Value checks of the aware methods' options (names are checked by the registry)."""
    def one_of(name, allowed):
        if opts.get(name) not in allowed:
            raise HarnessError(f"option {name}={opts.get(name)!r} is not one of {', '.join(map(str, allowed))}")

    one_of("allocation", ALLOCATIONS)
    one_of("key_metric", ("query", "none"))
    one_of("value_metric", ("output", "none"))
    one_of("kv_balance", ("energy", "none"))
    if "kv_split" in opts:
        one_of("kv_split", ("equal", "metric"))
    if not (isinstance(opts["kv_scale"], (int, float)) and opts["kv_scale"] > 0):
        raise HarnessError(f"option kv_scale={opts['kv_scale']!r} must be a positive number (K block weight)")
    b = opts["bounds"]
    if not (isinstance(b, (list, tuple)) and len(b) == 2 and 0 < b[0] <= 1 <= b[1]):
        raise HarnessError(f"option bounds={b!r} must be [min_frac, max_mult] with 0 < min_frac <= 1 <= max_mult")
    from harness.methods._oneshot import check_shared_options

    check_shared_options(opts)


def _layer_widths(layers, budget, widths, allocation: str, spectra_fn, cap: int, bounds) -> list:
    """Per-layer widths: explicit, uniform, or water-filled on the spectra (computed only then)."""
    L = len(layers)
    a0 = layers[0]
    w = per_layer_width(budget, a0.n_kv, a0.d_h)
    if widths is not None:
        if len(widths) != L:
            raise HarnessError(f"option widths has {len(widths)} entries for {L} layers")
        return list(widths)
    if allocation == "sensitivity":
        raise HarnessError("allocation 'sensitivity' is measured on the model: convert through "
                           "calibrate_and_convert (the CLI and sweeps do), or pass widths explicitly")
    if allocation == "uniform":
        return [w] * L
    return allocate(spectra_fn(), w, cap, "waterfill", bounds[0], bounds[1])


def _sequential_check(stats, sequential: bool) -> None:
    if sequential and not (stats.meta or {}).get("sequential"):
        raise HarnessError("sequential: true needs sequential statistics: convert through calibrate_and_convert "
                           "(the CLI and sweeps do), which collects them layer by layer")


@register("aware_joint", validate=check_options)
def aware_joint(layers, stats, budget, *, allocation: str = "uniform", power: float = 0.5, damping: float = 0.01,
                key_metric: str = "query", value_metric: str = "output", kv_balance: str = "energy",
                kv_scale: float = 1.0, center: bool = True, bounds: list = (0.5, 2.0),
                widths: list | None = None, sequential: bool = False, tune: list | None = None):
    """Attention-aware SVD of the stacked [W_k; W_v] (query- and o_proj-weighted), one latent per layer."""
    check_options(dict(allocation=allocation, key_metric=key_metric, value_metric=value_metric,
                       kv_balance=kv_balance, kv_scale=kv_scale, bounds=bounds, widths=widths,
                       sequential=sequential, tune=tune))
    _sequential_check(stats, sequential)
    plain = key_metric == "none" and value_metric == "none" and kv_balance == "none" and kv_scale == 1.0
    prep = []
    for a in layers:
        S, S_inv = input_metric(stats, a.index, power, damping, center)
        Wk = drift_target(a.module.k_proj.weight, stats, a.index, damping, center)
        Wv = drift_target(a.module.v_proj.weight, stats, a.index, damping, center)
        G = G_inv = None
        if not plain:
            GK, GKi, GV, GVi = layer_metrics(a, stats, key_metric, value_metric)
            bk, bv = _block_scales(S, Wk, Wv, GK, GV, kv_balance, kv_scale)
            nk, nv = Wk.shape[0], Wv.shape[0]
            G = torch.block_diag(bk * _eye_if_none(GK, nk, S), bv * _eye_if_none(GV, nv, S))
            G_inv = torch.block_diag(_eye_if_none(GKi, nk, S) / bk, _eye_if_none(GVi, nv, S) / bv)
        prep.append((S, S_inv, torch.cat([Wk, Wv], 0), G, G_inv))

    def spectra():
        return [torch.linalg.svdvals(S @ W.T if G is None else S @ W.T @ G) for S, _, W, G, _ in prep]

    a0 = layers[0]
    cap = min(2 * a0.n_kv * a0.d_h, a0.hidden)
    ranks = _layer_widths(layers, budget, widths, allocation, spectra, cap, bounds)
    out = []
    for a, (S, S_inv, W, G, G_inv), r in zip(layers, prep, ranks):
        r = int(r)
        if not 1 <= r <= cap:
            raise HarnessError(f"layer {a.index}: width {r} outside [1, {cap}]")
        down, up, _ = whitened_factor(W, r, S, S_inv, G, G_inv)
        nk = a.n_kv * a.d_h
        rope, lat = all_rope_dims(a.n_kv, a.d_h)
        kb, vb = kv_biases(a)
        if center:
            kb = mean_bias(a.module.k_proj.weight, down, up[:nk], stats, a.index, kb)
            vb = mean_bias(a.module.v_proj.weight, down, up[nk:], stats, a.index, vb)
        out.append(LayerFactors(
            down=down, up_k=up[:nk], up_v=up[nk:], k_slice=(0, r), v_slice=(0, r),
            rope_dims=rope, latent_dims=lat, rope_on_latent=True,
            k_bias=kb, v_bias=vb, info={"r_joint": r},
        ))
    return out


def _split_width(sk: torch.Tensor, sv: torch.Tensor, w: int, cap: int) -> tuple[int, int]:
    """r_k + r_v = w minimising the dropped weighted energy: greedy over the merged sigma^2."""
    ek, ev = sk.double() ** 2, sv.double() ** 2
    rk = rv = 1
    for _ in range(w - 2):
        gk = float(ek[rk]) if rk < min(cap, len(ek)) else -1.0
        gv = float(ev[rv]) if rv < min(cap, len(ev)) else -1.0
        if gk >= gv:
            rk += 1
        else:
            rv += 1
    return rk, rv


@register("aware_split", validate=check_options)
def aware_split(layers, stats, budget, *, allocation: str = "uniform", power: float = 0.5, damping: float = 0.01,
                key_metric: str = "query", value_metric: str = "output", kv_balance: str = "energy",
                kv_scale: float = 1.0, kv_split: str = "equal", center: bool = True, bounds: list = (0.5, 2.0),
                widths: list | None = None, sequential: bool = False, tune: list | None = None):
    """Attention-aware SVD of W_k (query-weighted) and W_v (o_proj-weighted), separate latents."""
    check_options(dict(allocation=allocation, key_metric=key_metric, value_metric=value_metric,
                       kv_balance=kv_balance, kv_scale=kv_scale, kv_split=kv_split, bounds=bounds,
                       widths=widths, sequential=sequential, tune=tune))
    _sequential_check(stats, sequential)
    prep = []
    for a in layers:
        S, S_inv = input_metric(stats, a.index, power, damping, center)
        Wk = drift_target(a.module.k_proj.weight, stats, a.index, damping, center)
        Wv = drift_target(a.module.v_proj.weight, stats, a.index, damping, center)
        GK, GKi, GV, GVi = layer_metrics(a, stats, key_metric, value_metric)
        bk, bv = _block_scales(S, Wk, Wv, GK, GV, kv_balance, kv_scale)
        prep.append((S, S_inv, Wk, Wv, GK, GKi, GV, GVi, bk, bv))

    def spec(S, W, G, b):
        M = S @ W.T
        return b * torch.linalg.svdvals(M if G is None else M @ G)

    a0 = layers[0]
    cap = parity_rank(a0.n_kv, a0.d_h)
    w = per_layer_width(budget, a0.n_kv, a0.d_h)
    if widths is None and allocation == "waterfill":  # K and V budgets water-filled separately, as in care
        rk = allocate([spec(p[0], p[2], p[4], 1.0) for p in prep], w // 2, cap, "waterfill", *bounds)
        rv = allocate([spec(p[0], p[3], p[6], 1.0) for p in prep], w - w // 2, cap, "waterfill", *bounds)
        pairs = list(zip(rk, rv))
    else:
        totals = _layer_widths(layers, budget, widths, allocation, None, 2 * cap, bounds)
        pairs = []
        for p, t in zip(prep, totals):
            if isinstance(t, (list, tuple)):
                pairs.append(tuple(int(x) for x in t))
            elif kv_split == "metric":
                pairs.append(_split_width(spec(p[0], p[2], p[4], p[8]), spec(p[0], p[3], p[6], p[9]), int(t), cap))
            else:
                pairs.append((int(t) // 2, int(t) - int(t) // 2))
    out = []
    for a, (S, S_inv, Wk, Wv, GK, GKi, GV, GVi, _, _), (r_k, r_v) in zip(layers, prep, pairs):
        if not (1 <= r_k <= cap and 1 <= r_v <= cap):
            raise HarnessError(f"layer {a.index}: ranks ({r_k}, {r_v}) outside [1, {cap}]")
        dk, uk, _ = whitened_factor(Wk, r_k, S, S_inv, GK, GKi)
        dv, uv, _ = whitened_factor(Wv, r_v, S, S_inv, GV, GVi)
        kb, vb = kv_biases(a)
        if center:
            kb = mean_bias(a.module.k_proj.weight, dk, uk, stats, a.index, kb)
            vb = mean_bias(a.module.v_proj.weight, dv, uv, stats, a.index, vb)
        out.append(split_factors(dk, uk, dv, uv, a.n_kv, a.d_h, kb, vb))
    return out
