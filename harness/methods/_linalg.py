"""Shared linear algebra of the methods: whitened truncated SVD and rank allocation."""
from __future__ import annotations

import heapq
import math

import torch

from harness.errors import HarnessError


def whitened_factor(W: torch.Tensor, r: int, S: torch.Tensor | None = None, S_inv: torch.Tensor | None = None,
                    G: torch.Tensor | None = None, G_inv: torch.Tensor | None = None):
    """Best rank-r factorization of W (out, D) in the metric ||S (W^T - What^T) G||_F.

    With S^T S = C (the input covariance) this minimises the output error on the calibration
    activations; S = None is the plain weight SVD. G (out, out), symmetric, weighs the output
    dims (the attention-aware metric of DESIGN §13); None is the identity. SVD S W^T G = U Sigma V^T,
    What^T = S^-1 U_r Sigma_r V_r^T G^-1.
    Returns:
        down (r, D), up (out, r), sigma (all singular values of S W^T G), all float64.
    """
    W = W.double()
    M = W.T if S is None else S @ W.T  # (D, out)
    if G is not None:
        M = M @ G
    U, sig, Vh = torch.linalg.svd(M, full_matrices=False)
    Ur = U[:, :r] * sig[:r]  # (D, r)
    down = (Ur if S_inv is None else S_inv @ Ur).T  # (r, D)
    up = Vh[:r].T  # (out, r)
    if G_inv is not None:
        up = G_inv @ up
    return down, up, sig


def drift_target(W: torch.Tensor, stats, l: int, damping: float, center: bool = False) -> torch.Tensor:
    """The weight to approximate in layer l: W itself, or, with sequential statistics that carry
    cross_cov = E[x~ x^T] (x~ the drifted input, x the original's), the ridge fit toward W of the
    original outputs W x from x~: W* = W + W (E[x x~^T] - C~)(C~ + a I)^-1, which is W when x~ = x.
    Minimising ||S (W*^T - What^T) G|| then minimises E||G (What x~ - W x)||^2 (up to a constant).
    With center, the second moments are centred (the means are matched by `mean_bias`)."""
    W = W.double()
    cross = getattr(stats, "cross_cov", None)
    if cross is None:
        return W
    C, X = stats.cov[l].double(), cross[l].double()
    if center:
        mu, mu_ref = stats.x_mean[l].double(), stats.x_mean_ref[l].double()
        C, X = C - torch.outer(mu, mu), X - torch.outer(mu, mu_ref)
    Cd = C + damping * C.diagonal().mean() * torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    return W + torch.linalg.solve(Cd, (W @ (X.T - C)).T).T


def mean_bias(W: torch.Tensor, down: torch.Tensor, up: torch.Tensor, stats, l: int,
              bias: torch.Tensor | None) -> torch.Tensor:
    """The bias that matches the mean output: b + W mu_ref - up down mu (mu the mean input the
    factors see, mu_ref the original's, equal except in sequential statistics)."""
    mu = stats.x_mean[l].double()
    ref = getattr(stats, "x_mean_ref", None)
    mu_ref = mu if ref is None else ref[l].double()
    b = W.double() @ mu_ref - up @ (down @ mu)
    return b if bias is None else bias + b


def sqrtm_psd(A: torch.Tensor, floor: float = 1e-10) -> tuple[torch.Tensor, torch.Tensor]:
    """A^(1/2) and A^(-1/2) of a symmetric PSD matrix (eigenvalues floored at floor*max)."""
    A = A.double()
    lam, Q = torch.linalg.eigh((A + A.T) / 2)
    lam = lam.clamp_min(floor * float(lam.max().clamp_min(1e-300)))
    return (Q * lam.sqrt()) @ Q.T, (Q * lam.rsqrt()) @ Q.T


def kv_biases(a) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The k/v projection biases of attention layer `a` (Qwen2), float64, or None."""
    k, v = a.module.k_proj.bias, a.module.v_proj.bias
    return (None if k is None else k.detach().double()), (None if v is None else v.detach().double())


def factor_split(a, r_k: int, r_v: int, S: torch.Tensor | None = None, S_inv: torch.Tensor | None = None):
    """Separate K and V latents of ranks r_k, r_v for attention layer `a` (an AttnLayer) in the
    metric S (None: plain SVD); biases stay on the up-projections."""
    from harness.mla.factors import split_factors

    dk, uk, _ = whitened_factor(a.module.k_proj.weight, r_k, S, S_inv)
    dv, uv, _ = whitened_factor(a.module.v_proj.weight, r_v, S, S_inv)
    return split_factors(dk, uk, dv, uv, a.n_kv, a.d_h, *kv_biases(a))


def spectrum(W: torch.Tensor, S: torch.Tensor | None = None) -> torch.Tensor:
    W = W.double()
    return torch.linalg.svdvals(W.T if S is None else S @ W.T)


def cov_power(C: torch.Tensor, p: float, damping: float):
    """S = (C + a*mean(diag C)*I)^p and its inverse, by symmetric eigendecomposition (float64)."""
    C = C.double()
    if not torch.isfinite(C).all():
        raise HarnessError("calibration statistics contain NaN/inf; delete the statistics cache "
                           "($MLA_HARNESS_CACHE/stats) and recompute, or use float32 on this device")
    D = C.shape[0]
    Cd = C + damping * C.diagonal().mean() * torch.eye(D, dtype=C.dtype, device=C.device)
    lam, Q = torch.linalg.eigh(Cd)
    lam = lam.clamp_min(1e-8)
    S = (Q * lam.pow(p)) @ Q.T
    S_inv = (Q * lam.pow(-p)) @ Q.T
    return S, S_inv


def waterfill(spectra: list[torch.Tensor], total: int, r_min: int, r_max: list[int] | int) -> list[int]:
    """Give ranks one at a time to the layer whose next singular value removes the largest
    fraction of its remaining energy: s_l(r) = sigma_{r+1}^2 / sum_{m>r} sigma_m^2 (CARE §3.3).

    Greedy on that score maximises the total drop of sum_l log(residual_l), i.e. it spends ranks
    where they cut a layer's relative error most. Exactly `total` ranks are spent.
    """
    L = len(spectra)
    r_max = [r_max] * L if isinstance(r_max, int) else list(r_max)
    if total < L * r_min or total > sum(r_max):
        raise HarnessError(f"rank budget {total} cannot be spread over {L} layers within [{r_min}, {max(r_max)}]")
    ranks = [r_min] * L
    tails = []
    for s in spectra:
        e = s.double() ** 2
        tails.append(torch.flip(torch.cumsum(torch.flip(e, [0]), 0), [0]))  # tails[r] = sum_{m>=r} e_m

    def score(l: int) -> float:
        r = ranks[l]
        if r >= r_max[l]:
            return -math.inf
        if r >= len(spectra[l]):
            return 0.0
        t = float(tails[l][r])
        return float(spectra[l][r] ** 2) / t if t > 0 else 0.0

    heap = [(-score(l), l) for l in range(L)]
    heapq.heapify(heap)
    for _ in range(total - L * r_min):
        _, l = heapq.heappop(heap)
        ranks[l] += 1
        heapq.heappush(heap, (-score(l), l))
    return ranks


def log_residual(spectra: list[torch.Tensor], ranks: list[int]) -> float:
    """sum_l log(sum_{m>r_l} sigma_m^2 / sum_m sigma_m^2): what water-filling minimises."""
    out = 0.0
    for s, r in zip(spectra, ranks):
        e = s.double() ** 2
        out += math.log(max(float(e[r:].sum()), 1e-300) / float(e.sum()))
    return out
