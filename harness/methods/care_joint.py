"""`care_joint`: one shared latent for K and V, factored in the sqrt-C metric (DESIGN §3.4).

SVD of S [W_k; W_v]^T at rank w (the whole per-layer cache width): K and V share the latent, so
at equal width each sees twice the rank of the split variant.
"""
from __future__ import annotations

import torch

from harness.methods import register
from harness.errors import HarnessError
from harness.methods._linalg import cov_power, drift_target, kv_biases, spectrum, whitened_factor
from harness.methods.care import _care_check, allocate
from harness.options import Annotated, Literal, Range
from harness.mla.accounting import per_layer_width
from harness.mla.factors import LayerFactors, all_rope_dims


@register("care_joint", validate=_care_check)
def care_joint(layers, stats, budget, *, allocation: Literal["uniform", "waterfill"] = "uniform",
               power: Annotated[float, Range(min=0)] = 0.5, damping: Annotated[float, Range(min=0)] = 0.01,
               widths: list | None = None, sequential: bool = False):
    """Covariance-aware SVD of the stacked [W_k; W_v], one shared latent per layer."""
    if sequential and not (stats.meta or {}).get("sequential"):
        raise HarnessError("sequential: true needs sequential statistics: convert through calibrate_and_convert")
    mats, whit, spectra = [], [], []
    for a in layers:
        W = torch.cat([a.module.k_proj.weight, a.module.v_proj.weight], 0)
        W = drift_target(W, stats, a.index, damping)
        S, S_inv = cov_power(stats.cov[a.index], power, damping)
        mats.append(W)
        whit.append((S, S_inv))
        if widths is None:
            spectra.append(spectrum(W, S))
    a0 = layers[0]
    w = per_layer_width(budget, a0.n_kv, a0.d_h)
    if widths is not None:
        if len(widths) != len(layers):
            raise HarnessError(f"option widths has {len(widths)} entries for {len(layers)} layers")
        ranks = [int(x) for x in widths]
    else:
        ranks = allocate(spectra, w, min(2 * a0.n_kv * a0.d_h, a0.hidden), allocation)
    out = []
    for a, W, (S, S_inv), r in zip(layers, mats, whit, ranks):
        down, up, _ = whitened_factor(W, r, S, S_inv)
        nk = a.n_kv * a.d_h
        rope, lat = all_rope_dims(a.n_kv, a.d_h)
        kb, vb = kv_biases(a)
        out.append(LayerFactors(
            down=down, up_k=up[:nk], up_v=up[nk:], k_slice=(0, r), v_slice=(0, r),
            rope_dims=rope, latent_dims=lat, rope_on_latent=True,
            k_bias=kb, v_bias=vb, info={"r_joint": r},
        ))
    return out
