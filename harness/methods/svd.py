"""`svd`: uniform weight-only SVD of W_k and W_v, split K/V latents (DESIGN §3.1, Palu-style)."""
from __future__ import annotations

from harness.methods import register
from harness.methods._linalg import factor_split
from harness.mla.accounting import per_layer_width


@register("svd", needs_stats=False)
def svd(layers, stats, budget):
    """Plain truncated SVD of each of W_k and W_v at the same rank in every layer."""
    out = []
    for a in layers:
        w = per_layer_width(budget, a.n_kv, a.d_h)
        out.append(factor_split(a, w // 2, w - w // 2))
    return out
