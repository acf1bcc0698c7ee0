"""Fused latent-attention decode: one new token per sequence against an MLA latent cache.

For query head h (of H) in KV group g(h) = h // (H / n_kv), batch row b, cached position s:

    score[b, h, s] = scale * (q_lat[b, h] . c_k[b, s]  +  q_rope[b, h] . k_rope[b, s, g(h)])
    o_lat[b, h]    = sum_s softmax_s(score[b, h, :]) * c_v[b, s]

q_lat is the NoPE query already folded through up_k (absorbed), c_k / c_v the latent's key and value
parts (often the same tensor: one shared latent), k_rope the exact RoPE keys, cached already rotated,
q_rope the rotated query dims that meet them. up_v and o_proj are applied after, by the caller.

Why a kernel: every query head of a layer reads the same latent, so a program that loads each
latent tile once for all H heads has H x the arithmetic intensity of GQA decode and is bound by
reading the cache once. Flash-decoding layout: the context is split over programs (grid = batch x
splits; split-K), each keeps an online softmax over its chunk and writes an unnormalised partial
(acc, running max, running sum); a second small kernel combines the splits. Scores and
accumulators are float32; inputs stay in the cache dtype.

`latent_decode_reference` is the PyTorch definition (same signature) the kernel is tested
against, and what `latent_decode` uses off CUDA. Pure tensors: nothing here knows about models.
"""
from __future__ import annotations

import math
import os

import torch

from harness.errors import HarnessError

try:  # Triton ships with CUDA builds of torch; CPU-only installs may lack it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only on machines without triton
    triton = None
    tl = None

MIN_TOKENS_PER_SPLIT = 512  # partials (H x DV fp32 per split) then cost <= ~10% of the latent bytes read


def _check(q_lat, q_rope, c_k, c_v, k_rope, keep, kv_len) -> tuple[int, int, int, int, int]:
    """Shapes (B, H, S, n_kv, DR) after checking that the arguments agree."""
    if q_lat.dim() != 3 or c_k.dim() != 3 or c_v.dim() != 3:
        raise HarnessError("latent_decode needs q_lat (B, H, DL), c_k (B, S, DL), c_v (B, S, DV)")
    B, H, DL = q_lat.shape
    S = c_k.shape[1]
    if c_k.shape != (B, S, DL) or c_v.shape[:2] != (B, S):
        raise HarnessError(f"latent_decode: c_k {tuple(c_k.shape)} / c_v {tuple(c_v.shape)} do not match "
                           f"q_lat {tuple(q_lat.shape)}")
    n_kv, DR = 1, 0
    if q_rope is not None and q_rope.shape[-1]:
        DR = q_rope.shape[-1]
        if k_rope is None or k_rope.shape[:2] != (B, S) or k_rope.shape[-1] % DR or q_rope.shape[:2] != (B, H):
            raise HarnessError("latent_decode: k_rope must be (B, S, n_kv*DR) for q_rope (B, H, DR)")
        n_kv = k_rope.shape[-1] // DR
        if H % n_kv:
            raise HarnessError(f"latent_decode: {H} query heads do not split into {n_kv} KV groups")
    if keep is not None and (keep.dim() != 2 or keep.shape[1] != S or keep.shape[0] not in (1, B)):
        raise HarnessError(f"latent_decode: keep must be (B, S) or (1, S); got {tuple(keep.shape)}")
    if kv_len is not None and kv_len.numel() not in (1, B):
        raise HarnessError("latent_decode: kv_len must hold one length or one per batch row")
    return B, H, S, n_kv, DR


def _valid(keep, kv_len, B: int, S: int, device) -> torch.Tensor | None:
    """(B, S) bool: which cache slots take part (None: all)."""
    valid = None if keep is None else keep.bool().expand(B, S)
    if kv_len is not None:
        in_len = torch.arange(S, device=device)[None, :] < kv_len.reshape(-1, 1).to(device)
        valid = in_len.expand(B, S) if valid is None else valid & in_len
    return valid


def latent_decode_reference(q_lat, q_rope, c_k, c_v, k_rope, scale: float, keep=None, kv_len=None):
    """PyTorch definition of the fused decode (float32 inside).

    Args:
        q_lat: (B, H, DL) absorbed NoPE queries.
        q_rope: (B, H, DR) rotated RoPE query dims, or None.
        c_k: (B, S, DL) latent key part; c_v: (B, S, DV) latent value part (may be the same tensor).
        k_rope: (B, S, n_kv*DR) cached RoPE keys (already rotated), or None.
        scale: softmax scale.
        keep: (B, S) or (1, S) bool, False for slots that must not be attended (padding, unused
            slots of a static cache, outside a sliding window); None keeps all.
        kv_len: () or (B,) integer tensor: only slots s < kv_len take part; None: all S.
    Returns:
        o_lat (B, H, DV) in c_v's dtype; rows with no valid slot are zero.
    """
    B, H, S, n_kv, DR = _check(q_lat, q_rope, c_k, c_v, k_rope, keep, kv_len)
    s = torch.einsum("bhd,bsd->bhs", q_lat.float(), c_k.float())
    if DR:
        g = H // n_kv
        kr = k_rope.float().view(B, S, n_kv, DR)
        s = s + torch.einsum("bkgd,bskd->bkgs", q_rope.float().reshape(B, n_kv, g, DR), kr).reshape(B, H, S)
    s = s * scale
    valid = _valid(keep, kv_len, B, S, s.device)
    if valid is not None:
        s = s.masked_fill(~valid[:, None, :], float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    den = p.sum(-1, keepdim=True)
    o = torch.einsum("bhs,bsd->bhd", p, c_v.float())
    o = torch.where(den > 0, o / den.clamp_min(1e-30), torch.zeros_like(o))
    return o.to(c_v.dtype)


if triton is not None:

    @triton.jit
    def _tile(q, qr, m_i, l_i, acc, start, hi, b, CK, CV, KR, KEEP, scale_log2,
              s_ckb, s_cks, s_cvb, s_cvs, s_krb, s_krs, s_keepb,
              offs_l, l_ok, offs_r, r_ok, offs_v, v_ok, BLOCK_N: tl.constexpr, SHARED_KV: tl.constexpr,
              HAS_ROPE: tl.constexpr, HAS_KEEP: tl.constexpr, PRECISION: tl.constexpr):
        """One tile of BLOCK_N cached tokens: scores for all heads, online-softmax update."""
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        k = tl.load(CK + b * s_ckb + offs_n[:, None] * s_cks + offs_l[None, :],
                    mask=n_ok[:, None] & l_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if HAS_ROPE:
            kr = tl.load(KR + b * s_krb + offs_n[:, None] * s_krs + offs_r[None, :],
                         mask=n_ok[:, None] & r_ok[None, :], other=0.0)
            s += tl.dot(qr, tl.trans(kr), input_precision=PRECISION)
        ok = n_ok
        if HAS_KEEP:
            ok = ok & (tl.load(KEEP + b * s_keepb + offs_n, mask=n_ok, other=0) != 0)
        s = tl.where(ok[None, :], s * scale_log2, float("-inf"))  # log2 units: exp2 below
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing valid yet
        alpha = tl.math.exp2(m_i - m_use)
        p = tl.math.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if SHARED_KV:
            v = k  # one shared latent: the tile just read is also the values
        else:
            v = tl.load(CV + b * s_cvb + offs_n[:, None] * s_cvs + offs_v[None, :],
                        mask=n_ok[:, None] & v_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        return m_new, l_i, acc

    @triton.jit
    def _split_kernel(QL, QR, CK, CV, KR, KEEP, LEN, PO, PM, PL,
                      scale_log2, S, H, DL, DV, DR, DRF, G, tokens_per_split,
                      s_qlb, s_qlh, s_qrb, s_qrh, s_ckb, s_cks, s_cvb, s_cvs, s_krb, s_krs, s_keepb, s_len,
                      s_pob, s_pos, s_poh, s_pmb, s_pms,
                      BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DL: tl.constexpr,
                      BLOCK_DV: tl.constexpr, BLOCK_DR: tl.constexpr, SHARED_KV: tl.constexpr,
                      HAS_ROPE: tl.constexpr, HAS_KEEP: tl.constexpr, HAS_LEN: tl.constexpr,
                      PRECISION: tl.constexpr, DYNAMIC_LOOP: tl.constexpr):
        """One (batch row, context split): online softmax over the split for all H heads at once."""
        b = tl.program_id(0).to(tl.int64)
        sp = tl.program_id(1)
        offs_h = tl.arange(0, BLOCK_H)
        h_ok = offs_h < H
        offs_l = tl.arange(0, BLOCK_DL)
        l_ok = offs_l < DL
        q = tl.load(QL + b * s_qlb + offs_h[:, None] * s_qlh + offs_l[None, :],
                    mask=h_ok[:, None] & l_ok[None, :], other=0.0)
        offs_r = tl.arange(0, BLOCK_DR)
        r_ok = offs_r < DRF
        qr = q  # placeholder when HAS_ROPE is off
        if HAS_ROPE:
            # Block-diagonal RoPE query over the whole cached RoPE row (n_kv*DR columns): head h is
            # non-zero only on its own KV group's DR columns, so one dot serves every group.
            own = (offs_r[None, :] // DR) == (offs_h[:, None] // G)
            qr = tl.load(QR + b * s_qrb + offs_h[:, None] * s_qrh + (offs_r % DR)[None, :],
                         mask=h_ok[:, None] & r_ok[None, :] & own, other=0.0)
        if SHARED_KV:
            offs_v = offs_l
            v_ok = l_ok
        else:
            offs_v = tl.arange(0, BLOCK_DV)
            v_ok = offs_v < DV
        end = S
        if HAS_LEN:
            end = tl.minimum(tl.load(LEN + b * s_len).to(tl.int32), S)
        lo = sp * tokens_per_split
        hi = tl.minimum(lo + tokens_per_split, end)
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)
        if DYNAMIC_LOOP:  # compiled: stop at the split's valid end (a short kv_len skips its tiles)
            for start in range(lo, hi, BLOCK_N):
                m_i, l_i, acc = _tile(q, qr, m_i, l_i, acc, start, hi, b, CK, CV, KR, KEEP, scale_log2,
                                      s_ckb, s_cks, s_cvb, s_cvs, s_krb, s_krs, s_keepb,
                                      offs_l, l_ok, offs_r, r_ok, offs_v, v_ok, BLOCK_N, SHARED_KV, HAS_ROPE,
                                      HAS_KEEP, PRECISION)
        else:  # the interpreter needs host-known loop bounds: whole split, masked past its end
            for off in range(0, tokens_per_split, BLOCK_N):
                m_i, l_i, acc = _tile(q, qr, m_i, l_i, acc, lo + off, hi, b, CK, CV, KR, KEEP, scale_log2,
                                      s_ckb, s_cks, s_cvb, s_cvs, s_krb, s_krs, s_keepb,
                                      offs_l, l_ok, offs_r, r_ok, offs_v, v_ok, BLOCK_N, SHARED_KV, HAS_ROPE,
                                      HAS_KEEP, PRECISION)
        tl.store(PO + b * s_pob + sp * s_pos + offs_h[:, None] * s_poh + offs_v[None, :], acc,
                 mask=h_ok[:, None] & v_ok[None, :])
        tl.store(PM + b * s_pmb + sp * s_pms + offs_h, m_i, mask=h_ok)
        tl.store(PL + b * s_pmb + sp * s_pms + offs_h, l_i, mask=h_ok)

    @triton.jit
    def _combine_kernel(PO, PM, PL, O, DV, n_splits, s_pob, s_pos, s_poh, s_pmb, s_pms, s_ob, s_oh,
                        BLOCK_S: tl.constexpr, BLOCK_ALL: tl.constexpr, BLOCK_DV: tl.constexpr):
        """One (batch row, head): rescale the splits' partials to one max and normalise."""
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        offs_all = tl.arange(0, BLOCK_ALL)
        m_all = tl.load(PM + b * s_pmb + offs_all * s_pms + h, mask=offs_all < n_splits, other=float("-inf"))
        m_max = tl.max(m_all, 0)
        m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
        offs_v = tl.arange(0, BLOCK_DV)
        v_ok = offs_v < DV
        acc = tl.zeros([BLOCK_DV], tl.float32)
        den = tl.zeros([BLOCK_S], tl.float32)
        for s0 in range(0, n_splits, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            s_ok = offs_s < n_splits
            m = tl.load(PM + b * s_pmb + offs_s * s_pms + h, mask=s_ok, other=float("-inf"))
            l_s = tl.load(PL + b * s_pmb + offs_s * s_pms + h, mask=s_ok, other=0.0)
            w = tl.math.exp2(m - m_max)
            o = tl.load(PO + b * s_pob + offs_s[:, None] * s_pos + h * s_poh + offs_v[None, :],
                        mask=s_ok[:, None] & v_ok[None, :], other=0.0)
            acc += tl.sum(w[:, None] * o, 0)
            den += w * l_s
        total = tl.sum(den, 0)
        out = tl.where(total > 0, acc / tl.maximum(total, 1e-30), 0.0)
        tl.store(O + b * s_ob + h * s_oh + offs_v, out.to(O.dtype.element_ty), mask=v_ok)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _pow2(n: int, lo: int = 16) -> int:
    """Triton block sizes are powers of two; tl.dot needs every dimension >= 16."""
    return max(lo, 1 << max(0, int(n) - 1).bit_length())


_SM_COUNT: dict = {}
_WORKING_CONFIG: dict = {}  # kernel shape key -> (BLOCK_N, num_warps, num_stages) that compiled


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few splits exercise the combine step
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def default_splits(B: int, S: int, device: torch.device) -> int:
    """About two programs per SM over the batch, but never splits shorter than MIN_TOKENS_PER_SPLIT."""
    want = max(1, -(-2 * _sm_count(device) // B))
    return max(1, min(want, -(-S // MIN_TOKENS_PER_SPLIT)))


def latent_decode_triton(q_lat, q_rope, c_k, c_v, k_rope, scale: float, keep=None, kv_len=None, *,
                         num_splits: int | None = None):
    """The fused Triton kernel (same arguments and result as `latent_decode_reference`)."""
    if triton is None:
        raise HarnessError("latent_decode_triton needs triton (pip install triton)")
    B, H, S, n_kv, DR = _check(q_lat, q_rope, c_k, c_v, k_rope, keep, kv_len)
    DL, DV = q_lat.shape[-1], c_v.shape[-1]
    dtype, dev = c_k.dtype, c_k.device
    if c_v.dtype != dtype or c_k.stride(-1) != 1 or c_v.stride(-1) != 1:
        raise HarnessError("latent_decode_triton: c_k and c_v need one dtype and contiguous last dims")
    q_lat = q_lat.to(dtype).contiguous()
    shared = (c_k.data_ptr() == c_v.data_ptr() and c_k.shape == c_v.shape and c_k.stride() == c_v.stride())
    has_rope = DR > 0
    if has_rope:
        q_rope = q_rope.to(dtype).contiguous()
        if k_rope.stride(-1) != 1 or k_rope.dtype != dtype:
            raise HarnessError("latent_decode_triton: k_rope needs the latent's dtype and a contiguous last dim")
    else:
        q_rope, k_rope = q_lat, c_k  # unused placeholders (HAS_ROPE is off)
    DRF = k_rope.shape[-1] if has_rope else 0
    keep = keep.to(dev) if keep is not None else None  # no-ops for tensors already there (graph-safe)
    kv_len = kv_len.to(dev) if kv_len is not None else None
    keep_u8 = keep.view(torch.uint8) if keep is not None and keep.dtype == torch.bool else keep
    s_keepb = 0 if keep_u8 is None or keep_u8.shape[0] == 1 else keep_u8.stride(0)
    s_len = 0 if kv_len is None or kv_len.numel() == 1 else kv_len.stride(0)

    BLOCK_H, BLOCK_DL = _pow2(H), _pow2(DL)
    BLOCK_DV = BLOCK_DL if shared else _pow2(DV)
    BLOCK_DR = _pow2(DRF) if has_rope else 16
    wide = BLOCK_H * max(BLOCK_DL, BLOCK_DV)
    num_warps = 8 if wide >= 16384 else 4
    # Register/shared-memory budget: bf16 tiles of 32 tokens, fp32 tiles of 16; fall back smaller.
    first_n = 32 if (c_k.element_size() <= 2 and wide <= 16384) else 16
    candidates = [(first_n, num_warps, 2), (16, num_warps, 1), (16, 4, 1)]
    key = (dtype, BLOCK_H, BLOCK_DL, BLOCK_DV, BLOCK_DR, shared, has_rope, keep is not None, kv_len is not None)
    if key in _WORKING_CONFIG:
        candidates = [_WORKING_CONFIG[key]]
    splits_wanted = num_splits or default_splits(B, S, dev)
    precision = "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored for bf16/fp16 inputs
    out = torch.empty(B, H, DV, dtype=dtype, device=dev)
    last_err = None
    for BLOCK_N, warps, stages in candidates:
        per = -(-max(S, 1) // splits_wanted)
        tokens_per_split = -(-per // BLOCK_N) * BLOCK_N
        n_splits = max(1, -(-S // tokens_per_split))
        po = torch.empty(B, n_splits, H, DV, dtype=torch.float32, device=dev)
        pm = torch.empty(B, n_splits, H, dtype=torch.float32, device=dev)
        pl = torch.empty_like(pm)
        try:
            _split_kernel[(B, n_splits)](
                q_lat, q_rope, c_k, c_v, k_rope, keep_u8 if keep_u8 is not None else c_k,
                kv_len if kv_len is not None else c_k, po, pm, pl,
                float(scale) * math.log2(math.e), S, H, DL, DV, max(DR, 1), max(DRF, 1), H // n_kv, tokens_per_split,
                q_lat.stride(0), q_lat.stride(1), q_rope.stride(0), q_rope.stride(1),
                c_k.stride(0), c_k.stride(1), c_v.stride(0), c_v.stride(1), k_rope.stride(0), k_rope.stride(1),
                s_keepb, s_len, po.stride(0), po.stride(1), po.stride(2), pm.stride(0), pm.stride(1),
                BLOCK_H=BLOCK_H, BLOCK_N=BLOCK_N, BLOCK_DL=BLOCK_DL, BLOCK_DV=BLOCK_DV, BLOCK_DR=BLOCK_DR,
                SHARED_KV=shared, HAS_ROPE=has_rope, HAS_KEEP=keep is not None, HAS_LEN=kv_len is not None,
                PRECISION=precision, DYNAMIC_LOOP=not _interpreting(), num_warps=warps, num_stages=stages,
            )
        except triton.runtime.errors.OutOfResources as e:  # too much shared memory for this GPU: smaller tiles
            last_err = e
            continue
        _WORKING_CONFIG[key] = (BLOCK_N, warps, stages)
        _combine_kernel[(B, H)](
            po, pm, pl, out, DV, n_splits, po.stride(0), po.stride(1), po.stride(2), pm.stride(0), pm.stride(1),
            out.stride(0), out.stride(1), BLOCK_S=16, BLOCK_ALL=_pow2(n_splits), BLOCK_DV=BLOCK_DV, num_warps=4,
        )
        return out
    raise HarnessError(f"latent_decode_triton: no tile configuration fits this GPU ({last_err})")


def latent_decode(q_lat, q_rope, c_k, c_v, k_rope, scale: float, keep=None, kv_len=None):
    """The Triton kernel on CUDA tensors, the PyTorch reference elsewhere (same result)."""
    if q_lat.is_cuda and triton is not None:
        return latent_decode_triton(q_lat, q_rope, c_k, c_v, k_rope, scale, keep, kv_len)
    return latent_decode_reference(q_lat, q_rope, c_k, c_v, k_rope, scale, keep, kv_len)
