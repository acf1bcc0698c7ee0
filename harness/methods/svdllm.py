"""`svdllm`: truncation-aware whitening by the Cholesky factor of C (SVD-LLM; DESIGN §3.4).

C = L L^T, S = L^T: ||S (W^T - What^T)|| = ||X (W^T - What^T)||. Any S with S^T S = C has the
same optimum, so this equals `care` (p = 1/2) up to damping and numerics; it is kept as the
published baseline.
"""
from __future__ import annotations

import torch

from harness.methods import register
from harness.options import Annotated, Range
from harness.methods._linalg import factor_split
from harness.mla.accounting import per_layer_width


@register("svdllm")
def svdllm(layers, stats, budget, *, damping: Annotated[float, Range(min=0)] = 0.01):
    """Cholesky-whitened SVD of W_k and W_v at uniform rank."""
    out = []
    for a in layers:
        C = stats.cov[a.index].double()
        eye = torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
        C = C + damping * C.diagonal().mean() * eye
        Lc = torch.linalg.cholesky(C)
        S = Lc.T
        S_inv = torch.linalg.solve_triangular(Lc, eye, upper=False).T
        w = per_layer_width(budget, a.n_kv, a.d_h)
        out.append(factor_split(a, w // 2, w - w // 2, S, S_inv))
    return out
