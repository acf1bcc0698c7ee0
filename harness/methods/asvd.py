"""`asvd`: activation-aware SVD baseline: scale input channels by mean|x|^alpha (DESIGN §3.4)."""
from __future__ import annotations

import torch

from harness.methods import register
from harness.options import Annotated, Range
from harness.methods._linalg import factor_split
from harness.mla.accounting import per_layer_width


@register("asvd")
def asvd(layers, stats, budget, *, alpha: Annotated[float, Range(min=0)] = 0.5):
    """SVD of W diag(s), s = mean|x|^alpha per input channel, split K/V at uniform rank."""
    out = []
    for a in layers:
        s = stats.abs_mean[a.index].double().clamp_min(1e-6) ** alpha
        S, S_inv = torch.diag(s), torch.diag(1.0 / s)
        w = per_layer_width(budget, a.n_kv, a.d_h)
        out.append(factor_split(a, w // 2, w - w // 2, S, S_inv))
    return out
