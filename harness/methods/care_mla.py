"""`care_mla`: MHA2MLA's absorbable structure with CARE's covariance-aware factorization (DESIGN §11).

Per KV head, p RoPE pairs keep RoPE and are cached exactly (the mha2mla pair selections); the other
("NoPE") key rows and the value rows share ONE latent, factored in the sqrt-C metric:
    M = [W_k,nope; W_v],   S = (C + a*mean(diag C)*I)^p,   S M^T = U Sigma V^T,
    down = (S^-1 U_r Sigma_r)^T,   up = V_r split into up_k (NoPE rows) and up_v.
So the keys that carry position stay exact, the latent minimises the activation error
||X (M^T - Mhat^T)||_F (p = 1/2) rather than the weight error, and nothing RoPE touches is
rebuilt: up_k folds into the query and up_v follows the softmax (the absorbed decode path).
Cache width per layer = d_c + n_kv*2p (DESIGN §2); `waterfill` moves latent width between layers
at equal total (the RoPE keys stay n_kv*2p everywhere). power = 0 gives back `mha2mla` (joint).
"""
from __future__ import annotations

import torch

from harness.methods import register
from harness.methods._linalg import cov_power, spectrum, whitened_factor
from harness.methods.care import allocate
from harness.methods.mha2mla import joint_factors, latent_width, rope_pair_count, rope_split


@register("care_mla")
def care_mla(layers, stats, budget, *, rope_pairs: int | None = None, selection: str = "2norm",
             power: float = 0.5, damping: float = 0.01, allocation: str = "uniform"):
    """Partial RoPE (exact keys) + sqrt-C-weighted SVD of the stacked [W_k,nope; W_v]: absorbable CARE."""
    parts, whit, spectra, caps, d_cs = [], [], [], [], []
    for a in layers:
        p = rope_pair_count(a, rope_pairs)
        d_cs.append(latent_width(budget, a, p))
        rope_dims, latent_dims, k_rope, k_nope, Wv = rope_split(a, p, selection, stats)
        M = torch.cat([k_nope, Wv], 0)
        # (C + aI)^0 is the identity: the plain SVD, so power = 0 is mha2mla (joint) exactly.
        S, S_inv = cov_power(stats.cov[a.index], power, damping) if power != 0 else (None, None)
        parts.append((p, rope_dims, latent_dims, k_rope, k_nope.shape[0], M))
        whit.append((S, S_inv))
        caps.append(min(M.shape))  # the rank of M can be no higher
        if allocation != "uniform":  # only water-filling needs the spectra
            spectra.append(spectrum(M, S))
    # Every layer has the same shapes here, so one mean width and one cap serve all.
    d_c = min(d_cs[0], caps[0])
    ranks = allocate(spectra or [None] * len(layers), d_c, caps[0], allocation)
    out = []
    for a, (p, rope_dims, latent_dims, k_rope, nk, M), (S, S_inv), r in zip(layers, parts, whit, ranks):
        down, up, _ = whitened_factor(M, r, S, S_inv)
        info = {"rope_pairs": p, "selection": selection, "d_c": int(r)}
        out.append(joint_factors(a, rope_dims, latent_dims, k_rope, nk, down, up, info))
    return out
