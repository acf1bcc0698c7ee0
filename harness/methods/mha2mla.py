"""`mha2mla`: partial RoPE + low-rank NoPE keys and values (Ji et al. 2025; DESIGN §3.2).

Per KV head keep RoPE on p frequency pairs (HF rotate_half layout: pair j = dims j, j + d_h/2),
cached exactly; drop RoPE on the other pairs and compress those key dims together with V into a
latent of width d_c (joint SVD of [W_k,nope; W_v]) or two latents of d_c/2 (split). Cache width
per layer = n_kv*2p + d_c, so for a budget d_c = width - n_kv*2p.
"""
from __future__ import annotations

import torch

from harness.errors import HarnessError
from harness.methods import register
from harness.options import Annotated, Literal, Range
from harness.methods._linalg import kv_biases, whitened_factor
from harness.mla.accounting import per_layer_width
from harness.mla.factors import LayerFactors

SELECTIONS = ("2norm", "high", "low", "uniform")


def select_pairs(selection: str, p: int, half: int, n_kv: int, n_h: int, layer: int, stats=None) -> torch.Tensor:
    """Indices (n_kv, p) of the RoPE pairs kept per KV head."""
    if selection == "high":
        idx = torch.arange(p)
    elif selection == "low":
        idx = torch.arange(half - p, half)
    elif selection == "uniform":
        idx = torch.arange(0, half, half // p)[:p]
    elif selection == "2norm":
        if stats is None or stats.q_pair_norm is None:
            raise HarnessError("mha2mla selection '2norm' needs calibration statistics with RoPE pair norms")
        q = stats.q_pair_norm[layer].double()  # (n_h, half)
        k = stats.k_pair_norm[layer].double()  # (n_kv, half)
        g = n_h // n_kv
        score = (q.view(n_kv, g, half) * k[:, None, :]).sum(1)  # (n_kv, half)
        return score.topk(p, dim=1).indices.sort(dim=1).values.cpu()  # index bookkeeping stays on the CPU
    else:
        raise HarnessError(f"unknown mha2mla selection '{selection}'; use one of {', '.join(SELECTIONS)}")
    return idx[None].expand(n_kv, -1).clone()


def rope_pair_count(a, rope_pairs: int | None) -> int:
    """p, the RoPE pairs kept per KV head: the option, or d_h/16 (the paper default)."""
    half = a.d_h // 2
    p = rope_pairs if rope_pairs is not None else max(1, a.d_h // 16)
    if not 1 <= p <= half:
        raise HarnessError(f"rope_pairs {p} must be in [1, {half}] (d_h/2) for d_h={a.d_h}")
    return p


def latent_width(budget, a, p: int, min_width: int = 1, fraction: float = 1.0) -> int:
    """d_c = per-layer cache width (times `fraction`) - n_kv*2p (the exact RoPE keys are cached too, DESIGN §2)."""
    w = round(per_layer_width(budget, a.n_kv, a.d_h) * fraction)
    d_c = w - a.n_kv * 2 * p
    if d_c < min_width:
        raise HarnessError(
            f"the budget gives {w} cache elements per layer but the RoPE keys take "
            f"n_kv*2p = {a.n_kv * 2 * p}; lower kv_save or rope_pairs"
        )
    return d_c


def rope_split(a, p: int, selection: str, stats=None):
    """Split layer `a`'s key rows into kept-RoPE rows and NoPE rows.

    Returns:
        rope_dims (n_kv, 2p), latent_dims (n_kv, d_h-2p) within-head indices (sorted),
        k_rope (n_kv*2p, D), k_nope (n_kv*(d_h-2p), D), W_v (n_kv*d_h, D), all float64.
    """
    n_kv, d_h, half = a.n_kv, a.d_h, a.d_h // 2
    pairs = select_pairs(selection, p, half, n_kv, a.n_h, a.index, stats)  # (n_kv, p)
    rope_dims = torch.cat([pairs, pairs + half], 1).sort(1).values  # (n_kv, 2p)
    keep = torch.ones(n_kv, d_h, dtype=torch.bool)
    keep.scatter_(1, rope_dims, False)
    latent_dims = torch.arange(d_h).expand(n_kv, -1)[keep].view(n_kv, d_h - 2 * p)
    Wk = a.module.k_proj.weight.detach().double().view(n_kv, d_h, -1)  # (n_kv, d_h, D)
    Wv = a.module.v_proj.weight.detach().double()
    D = Wk.shape[-1]
    rd, ld = rope_dims.to(Wk.device), latent_dims.to(Wk.device)
    k_rope = Wk.gather(1, rd[..., None].expand(-1, -1, D)).reshape(-1, D)
    k_nope = Wk.gather(1, ld[..., None].expand(-1, -1, D)).reshape(-1, D)
    return rope_dims, latent_dims, k_rope, k_nope, Wv


def joint_factors(a, rope_dims, latent_dims, k_rope, nk: int, down, up, info: dict) -> LayerFactors:
    """LayerFactors of one shared NoPE-key/value latent (up rows: nk NoPE-key rows, then V rows)."""
    r = down.shape[0]
    if nk == 0:  # every pair keeps RoPE: the latent serves V alone
        up_k, k_slice = up[:0, :1], (0, 1)
    else:
        up_k, k_slice = up[:nk], (0, r)
    kb, vb = kv_biases(a)
    return LayerFactors(
        down=down, up_k=up_k, up_v=up[nk:], k_slice=k_slice, v_slice=(0, r),
        rope_dims=rope_dims, latent_dims=latent_dims, rope_on_latent=False, k_rope=k_rope,
        k_bias=kb, v_bias=vb, info=info,
    )


@register("mha2mla", needs_stats=lambda opts: opts["selection"] == "2norm")  # RoPE pair norms
def mha2mla(layers, stats, budget, *, rope_pairs: Annotated[int, Range(min=1)] | None = None,
            selection: Literal["2norm", "high", "low", "uniform"] = "2norm",
            lowrank: Literal["joint", "split"] = "joint",
            width_fraction: Annotated[float, Range(min=0, max=1, open_min=True)] = 1.0):
    """Partial RoPE (2-norm selection) + joint SVD of the NoPE keys and the values.

    width_fraction < 1 caches that fraction of the budget's width: 0.5 is CARE's "MHA2MLA" baseline,
    a joint latent of rank r beside split methods with rank r per K and per V, i.e. half their bytes
    (DESIGN §9); the row's measured kv_save says what it really cached.
    """
    if lowrank not in ("joint", "split"):
        raise HarnessError(f"unknown mha2mla lowrank '{lowrank}'; use joint or split")
    out = []
    for a in layers:
        p = rope_pair_count(a, rope_pairs)
        d_c = latent_width(budget, a, p, 2 if lowrank == "split" else 1, width_fraction)
        rope_dims, latent_dims, k_rope, k_nope, Wv = rope_split(a, p, selection, stats)
        nk, D = k_nope.shape
        info = {"rope_pairs": p, "selection": selection}
        if lowrank == "joint" or nk == 0:
            r = min(d_c, nk + Wv.shape[0], D)
            down, up, _ = whitened_factor(torch.cat([k_nope, Wv], 0), r)
            out.append(joint_factors(a, rope_dims, latent_dims, k_rope, nk, down, up, {**info, "d_c": r}))
            continue
        r_k, r_v = d_c // 2, d_c - d_c // 2
        dk, up_k, _ = whitened_factor(k_nope, min(r_k, nk))
        dv, up_v, _ = whitened_factor(Wv, r_v)
        down = torch.cat([dk, dv], 0)
        kb, vb = kv_biases(a)
        out.append(LayerFactors(
            down=down, up_k=up_k, up_v=up_v, k_slice=(0, dk.shape[0]),
            v_slice=(dk.shape[0], dk.shape[0] + dv.shape[0]),
            rope_dims=rope_dims, latent_dims=latent_dims, rope_on_latent=False, k_rope=k_rope,
            k_bias=kb, v_bias=vb, info={**info, "d_c": int(down.shape[0])},
        ))
    return out
