"""`svd`: uniform weight-only SVD of W_k and W_v, split K/V latents (DESIGN §3.1, Palu-style)."""
from __future__ import annotations

from harness.methods import register
from harness.methods._linalg import whitened_factor
from harness.mla.accounting import per_layer_width
from harness.mla.factors import split_factors


@register("svd", needs_stats=False)
def svd(layers, stats, budget):
    """Plain truncated SVD of each of W_k and W_v at the same rank in every layer."""
    out = []
    for a in layers:
        w = per_layer_width(budget, a.n_kv, a.d_h)
        r_k, r_v = w // 2, w - w // 2
        dk, uk, _ = whitened_factor(a.module.k_proj.weight, r_k)
        dv, uv, _ = whitened_factor(a.module.v_proj.weight, r_v)
        out.append(split_factors(dk, uk, dv, uv, a.n_kv, a.d_h, _bias(a.module.k_proj), _bias(a.module.v_proj)))
    return out


def _bias(lin):
    return None if lin.bias is None else lin.bias.detach().double()
