"""`care`: covariance-aware factorization with adjusted ranks (Zhou et al. 2026; DESIGN §3.3).

W^T is factored in the metric of the input covariance C: SVD of S W^T with S = C^p (p = 1/2:
||X (W^T - What^T)||_F is minimised), split K and V latents. Ranks are either uniform (CARE-U)
or water-filled across layers from the spectra of S_l W_l^T (CARE-E), K and V budgets separately.
p = 0 gives back the plain `svd` method.
"""
from __future__ import annotations

from harness.errors import HarnessError
from harness.methods import register
from harness.options import Annotated, Literal, Range
from harness.methods._linalg import cov_power, factor_split, spectrum, waterfill
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


@register("care")
def care(layers, stats, budget, *, allocation: Literal["uniform", "waterfill"] = "waterfill",
         power: Annotated[float, Range(min=0)] = 0.5, damping: Annotated[float, Range(min=0)] = 0.01):
    """Covariance-aware (sqrt C) SVD of W_k and W_v, uniform or water-filled ranks."""
    ks, vs, sks, svs = [], [], [], []
    for a in layers:
        S, S_inv = cov_power(stats.cov[a.index], power, damping)
        ks.append((S, S_inv))
        sks.append(spectrum(a.module.k_proj.weight, S))
        svs.append(spectrum(a.module.v_proj.weight, S))
    a0 = layers[0]
    w = per_layer_width(budget, a0.n_kv, a0.d_h)
    cap = parity_rank(a0.n_kv, a0.d_h)
    rk = allocate(sks, w // 2, cap, allocation)
    rv = allocate(svs, w - w // 2, cap, allocation)
    out = []
    for a, (S, S_inv), r_k, r_v in zip(layers, ks, rk, rv):
        out.append(factor_split(a, r_k, r_v, S, S_inv))
    return out
