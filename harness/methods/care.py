"""`care`: covariance-aware factorization with adjusted ranks (Zhou et al. 2026; DESIGN §3.3).

W^T is factored in the metric of the input covariance C: SVD of S W^T with S = C^p (p = 1/2:
||X (W^T - What^T)||_F is minimised), split K and V latents. Ranks are either uniform (CARE-U)
or water-filled across layers from the spectra of S_l W_l^T (CARE-E), K and V budgets separately.
p = 0 gives back the plain `svd` method.
"""
from __future__ import annotations

from harness.errors import HarnessError
from harness.methods import register
from harness.methods._linalg import cov_power, drift_target, kv_biases, spectrum, waterfill, whitened_factor
from harness.mla.factors import split_factors
from harness.options import Annotated, Literal, Range
from harness.mla.accounting import parity_rank, per_layer_width


def allocate(spectra, r: int, cap: int, allocation: str, min_frac: float = 0.5, max_mult: float = 2.0):
    """Per-layer ranks for a mean rank r: uniform, or water-filled within [r*min_frac, min(r*max_mult, cap)]."""
    L = len(spectra)
    if allocation == "uniform":
        return [r] * L
    if allocation != "waterfill":
        raise HarnessError(f"unknown allocation '{allocation}'; use uniform or waterfill")
    r_min = max(1, int(r * min_frac))
    r_max = min(cap, max(r, int(r * max_mult)))
    return waterfill(spectra, r * L, r_min, r_max)


def explicit_pairs(widths, L: int) -> tuple[list[int], list[int]]:
    """(r_k per layer, r_v per layer) from a `widths` option: [r_k, r_v] pairs or totals split in half."""
    if len(widths) != L:
        raise HarnessError(f"option widths has {len(widths)} entries for {L} layers")
    rk = [int(w[0]) if isinstance(w, (list, tuple)) else int(w) // 2 for w in widths]
    rv = [int(w[1]) if isinstance(w, (list, tuple)) else int(w) - int(w) // 2 for w in widths]
    return rk, rv


def _care_check(opts):
    from harness.methods._oneshot import check_shared_options

    if opts["allocation"] not in ("uniform", "waterfill"):
        raise HarnessError(f"unknown allocation '{opts['allocation']}'; use uniform or waterfill")
    check_shared_options(opts)


@register("care", validate=_care_check)
def care(layers, stats, budget, *, allocation: Literal["uniform", "waterfill"] = "waterfill",
         power: Annotated[float, Range(min=0)] = 0.5, damping: Annotated[float, Range(min=0)] = 0.01,
         widths: list | None = None, sequential: bool = False):
    """Covariance-aware (sqrt C) SVD of W_k and W_v, uniform or water-filled ranks."""
    if sequential and not (stats.meta or {}).get("sequential"):
        raise HarnessError("sequential: true needs sequential statistics: convert through calibrate_and_convert")
    ks, sks, svs = [], [], []
    for a in layers:
        S, S_inv = cov_power(stats.cov[a.index], power, damping)
        Wk = drift_target(a.module.k_proj.weight, stats, a.index, damping)
        Wv = drift_target(a.module.v_proj.weight, stats, a.index, damping)
        ks.append((S, S_inv, Wk, Wv))
        if widths is None:
            sks.append(spectrum(Wk, S))
            svs.append(spectrum(Wv, S))
    a0 = layers[0]
    w = per_layer_width(budget, a0.n_kv, a0.d_h)
    cap = parity_rank(a0.n_kv, a0.d_h)
    if widths is not None:
        rk, rv = explicit_pairs(widths, len(layers))
    else:
        rk = allocate(sks, w // 2, cap, allocation)
        rv = allocate(svs, w - w // 2, cap, allocation)
    out = []
    for a, (S, S_inv, Wk, Wv), r_k, r_v in zip(layers, ks, rk, rv):
        dk, uk, _ = whitened_factor(Wk, r_k, S, S_inv)
        dv, uv, _ = whitened_factor(Wv, r_v, S, S_inv)
        out.append(split_factors(dk, uk, dv, uv, a.n_kv, a.d_h, *kv_biases(a)))
    return out
