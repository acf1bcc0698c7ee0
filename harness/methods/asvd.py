"""`asvd`: activation-aware SVD baseline: scale input channels by mean|x|^alpha (DESIGN §3.4)."""
from __future__ import annotations

import torch

from harness.methods import register
from harness.methods._linalg import whitened_factor
from harness.methods.svd import _bias
from harness.mla.accounting import per_layer_width
from harness.mla.factors import split_factors


@register("asvd")
def asvd(layers, stats, budget, *, alpha: float = 0.5):
    """SVD of W diag(s), s = mean|x|^alpha per input channel, split K/V at uniform rank."""
    out = []
    for a in layers:
        s = stats.abs_mean[a.index].double().clamp_min(1e-6) ** alpha
        S, S_inv = torch.diag(s), torch.diag(1.0 / s)
        w = per_layer_width(budget, a.n_kv, a.d_h)
        dk, uk, _ = whitened_factor(a.module.k_proj.weight, w // 2, S, S_inv)
        dv, uv, _ = whitened_factor(a.module.v_proj.weight, w - w // 2, S, S_inv)
        out.append(split_factors(dk, uk, dv, uv, a.n_kv, a.d_h, _bias(a.module.k_proj), _bias(a.module.v_proj)))
    return out
