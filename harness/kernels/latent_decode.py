"""Fused latent-attention decode: one new token per sequence against an MLA latent cache.

For query head h (of H) in KV group g(h) = h // (H / n_kv), batch row b, cached position s:

    score[b, h, s] = scale * (q_lat[b, h] . c_k[b, s]  +  q_rope[b, h] . k_rope[b, s, g(h)])
    o_lat[b, h]    = sum_s softmax_s(score[b, h, :]) * c_v[b, s]

q_lat is the NoPE query already folded through up_k (absorbed), c_k / c_v the latent's key and value
parts (often the same tensor: one shared latent), k_rope the exact RoPE keys, cached already rotated,
q_rope the rotated query dims that meet them. up_v and o_proj are applied after, by the caller.

Why a kernel: every query head of a layer reads the same latent, so a program that loads each
latent tile once for all H heads has H x the arithmetic intensity of GQA decode and is bound by
reading the cache once. Flash-decoding layout: the context is split over programs (grid = head
groups x batch x splits; split-K), each keeps an online softmax over its chunk and writes an unnormalised partial
(acc, running max, running sum); a second small kernel combines the splits. Scores and
accumulators are float32; inputs stay in the cache dtype. How it is launched (tile sizes, pipeline
depth, split count, heads per program) is a `DecodeConfig` (harness.kernels.decode_config: the
options, the default rule, the tuned table); `tune_decode` times candidates on real inputs.

`latent_decode_reference` is the PyTorch definition (same signature) the kernel is tested
against, and what `latent_decode` uses off CUDA. Pure tensors: nothing here knows about models.
"""
from __future__ import annotations

import math
import os
from dataclasses import replace

import torch

from harness.errors import HarnessError
from harness.kernels.decode_config import (DecodeConfig, ShapeKey, default_config, quick_candidates, record_tuned,
                                           tuned_config, tuning_enabled, wave_splits)

try:  # Triton ships with CUDA builds of torch; CPU-only installs may lack it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only on machines without triton
    triton = None
    tl = None



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
    def _tile(q_a, q_b, qr, m_i, l_i, acc_a, acc_b, start, hi, b, CK, CV, KR, KEEP, scale_log2,
              s_ckb, s_cks, s_cvb, s_cvs, s_krb, s_krs, s_keepb,
              offs_a, a_ok, offs_b, b_ok, offs_r, r_ok, offs_va, va_ok, offs_vb, vb_ok,
              BLOCK_N: tl.constexpr, HAS_B: tl.constexpr, HAS_VB: tl.constexpr, SHARED_KV: tl.constexpr,
              HAS_ROPE: tl.constexpr, HAS_KEEP: tl.constexpr, PRECISION: tl.constexpr):
        """One tile of BLOCK_N cached tokens: scores for the program's heads, online-softmax update.

        The latent row is read as one block (offs_a) or two (offs_a, offs_b: 384 = 256 + 128, no
        padded columns); the score is the sum of the blocks' dots, the value accumulator one per block."""
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        row_k = CK + b * s_ckb + offs_n[:, None] * s_cks
        k_a = tl.load(row_k + offs_a[None, :], mask=n_ok[:, None] & a_ok[None, :], other=0.0)
        s = tl.dot(q_a, tl.trans(k_a), input_precision=PRECISION)
        k_b = k_a
        if HAS_B:
            k_b = tl.load(row_k + offs_b[None, :], mask=n_ok[:, None] & b_ok[None, :], other=0.0)
            s += tl.dot(q_b, tl.trans(k_b), input_precision=PRECISION)
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
        if SHARED_KV:  # one shared latent: the tiles just read are also the values
            v_a = k_a
            v_b = k_b
        else:
            row_v = CV + b * s_cvb + offs_n[:, None] * s_cvs
            v_a = tl.load(row_v + offs_va[None, :], mask=n_ok[:, None] & va_ok[None, :], other=0.0)
            v_b = v_a
            if HAS_VB:
                v_b = tl.load(row_v + offs_vb[None, :], mask=n_ok[:, None] & vb_ok[None, :], other=0.0)
        pv = p.to(v_a.dtype)
        acc_a = acc_a * alpha[:, None] + tl.dot(pv, v_a, input_precision=PRECISION)
        if HAS_VB:
            acc_b = acc_b * alpha[:, None] + tl.dot(pv, v_b, input_precision=PRECISION)
        return m_new, l_i, acc_a, acc_b

    @triton.jit
    def _split_kernel(QL, QR, CK, CV, KR, KEEP, LEN, PO, PM, PL,
                      scale_log2, S, H, DL, DV, DR, DRF, G, tokens_per_split,
                      s_qlb, s_qlh, s_qrb, s_qrh, s_ckb, s_cks, s_cvb, s_cvs, s_krb, s_krs, s_keepb, s_len,
                      s_pob, s_pos, s_poh, s_pmb, s_pms,
                      BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
                      BLOCK_VA: tl.constexpr, BLOCK_VB: tl.constexpr, BLOCK_DR: tl.constexpr,
                      HAS_B: tl.constexpr, HAS_VB: tl.constexpr, SHARED_KV: tl.constexpr, HAS_ROPE: tl.constexpr,
                      HAS_KEEP: tl.constexpr,
                      HAS_LEN: tl.constexpr, PRECISION: tl.constexpr, DYNAMIC_LOOP: tl.constexpr):
        """One (head group, batch row, context split): online softmax over the split for the group's
        heads (all H by default). Head groups are the fastest grid axis, so the programs that read the
        same latent tiles run side by side and the later ones find them in L2."""
        hg = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        sp = tl.program_id(2)
        offs_h = hg * BLOCK_H + tl.arange(0, BLOCK_H)
        h_ok = offs_h < H
        q_row = QL + b * s_qlb + offs_h[:, None] * s_qlh
        offs_a = tl.arange(0, BLOCK_A)
        a_ok = offs_a < DL
        q_a = tl.load(q_row + offs_a[None, :], mask=h_ok[:, None] & a_ok[None, :], other=0.0)
        offs_b = offs_a
        b_ok = a_ok
        q_b = q_a  # placeholders when the latent is one block
        if HAS_B:
            offs_b = BLOCK_A + tl.arange(0, BLOCK_B)
            b_ok = offs_b < DL
            q_b = tl.load(q_row + offs_b[None, :], mask=h_ok[:, None] & b_ok[None, :], other=0.0)
        offs_r = tl.arange(0, BLOCK_DR)
        r_ok = offs_r < DRF
        qr = q_a  # placeholder when HAS_ROPE is off
        if HAS_ROPE:
            # Block-diagonal RoPE query over the whole cached RoPE row (n_kv*DR columns): head h is
            # non-zero only on its own KV group's DR columns, so one dot serves every group.
            own = (offs_r[None, :] // DR) == (offs_h[:, None] // G)
            qr = tl.load(QR + b * s_qrb + offs_h[:, None] * s_qrh + (offs_r % DR)[None, :],
                         mask=h_ok[:, None] & r_ok[None, :] & own, other=0.0)
        if SHARED_KV:
            offs_va = offs_a
            va_ok = a_ok
            offs_vb = offs_b
            vb_ok = b_ok
        else:
            offs_va = tl.arange(0, BLOCK_VA)
            va_ok = offs_va < DV
            offs_vb = offs_va
            vb_ok = va_ok
            if HAS_VB:
                offs_vb = BLOCK_VA + tl.arange(0, BLOCK_VB)
                vb_ok = offs_vb < DV
        end = S
        if HAS_LEN:
            end = tl.minimum(tl.load(LEN + b * s_len).to(tl.int32), S)
        lo = sp * tokens_per_split
        hi = tl.minimum(lo + tokens_per_split, end)
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc_a = tl.zeros([BLOCK_H, BLOCK_VA], tl.float32)
        acc_b = tl.zeros([BLOCK_H, 16], tl.float32)  # placeholder when the values are one block
        if HAS_VB:
            acc_b = tl.zeros([BLOCK_H, BLOCK_VB], tl.float32)
        if DYNAMIC_LOOP:  # compiled: stop at the split's valid end (a short kv_len skips its tiles)
            for start in range(lo, hi, BLOCK_N):
                m_i, l_i, acc_a, acc_b = _tile(
                    q_a, q_b, qr, m_i, l_i, acc_a, acc_b, start, hi, b, CK, CV, KR, KEEP, scale_log2,
                    s_ckb, s_cks, s_cvb, s_cvs, s_krb, s_krs, s_keepb,
                    offs_a, a_ok, offs_b, b_ok, offs_r, r_ok, offs_va, va_ok, offs_vb, vb_ok,
                    BLOCK_N, HAS_B, HAS_VB, SHARED_KV, HAS_ROPE, HAS_KEEP, PRECISION)
        else:  # the interpreter needs host-known loop bounds: whole split, masked past its end
            for off in range(0, tokens_per_split, BLOCK_N):
                m_i, l_i, acc_a, acc_b = _tile(
                    q_a, q_b, qr, m_i, l_i, acc_a, acc_b, lo + off, hi, b, CK, CV, KR, KEEP, scale_log2,
                    s_ckb, s_cks, s_cvb, s_cvs, s_krb, s_krs, s_keepb,
                    offs_a, a_ok, offs_b, b_ok, offs_r, r_ok, offs_va, va_ok, offs_vb, vb_ok,
                    BLOCK_N, HAS_B, HAS_VB, SHARED_KV, HAS_ROPE, HAS_KEEP, PRECISION)
        po_row = PO + b * s_pob + sp * s_pos + offs_h[:, None] * s_poh
        tl.store(po_row + offs_va[None, :], acc_a, mask=h_ok[:, None] & va_ok[None, :])
        if HAS_VB:
            tl.store(po_row + offs_vb[None, :], acc_b, mask=h_ok[:, None] & vb_ok[None, :])
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


def latent_blocks(width: int, split: bool) -> tuple[int, int]:
    """(first, second) power-of-two blocks covering `width` columns; second 0 for one block.

    Two blocks only where they pad less than one: 384 -> (256, 128), 96 -> (64, 32); 200 -> (256, 0)."""
    full = _pow2(width)
    if not split or width <= 16:
        return full, 0
    a = max(16, 1 << (int(width).bit_length() - 1))  # the largest power of two <= width
    if a >= width:
        return full, 0
    b = _pow2(width - a)
    return (a, b) if a + b < full else (full, 0)


def _is_shared(c_k, c_v) -> bool:
    """One tensor holds both the key and the value latent (the usual MLA cache): read once."""
    return c_k.data_ptr() == c_v.data_ptr() and c_k.shape == c_v.shape and c_k.stride() == c_v.stride()


def rule_config(q_lat, c_k, c_v) -> DecodeConfig:
    """`default_config` for these inputs (the rule when nothing was tuned)."""
    widest = max(_pow2(q_lat.shape[-1]), _pow2(c_v.shape[-1]))
    return default_config(c_k.element_size(), _pow2(q_lat.shape[1]), widest)


def _kernel_key(q_lat, c_k, c_v, DRF: int, keep, kv_len, config: DecodeConfig) -> tuple:
    """What a compiled launch depends on, with the configuration asked for (`_WORKING_CONFIG`'s key)."""
    return (c_k.dtype, q_lat.shape[1], q_lat.shape[-1], c_v.shape[-1], _pow2(DRF) if DRF else 16,
            _is_shared(c_k, c_v), DRF > 0, keep is not None, kv_len is not None, config)


_SM_COUNT: dict = {}
_WORKING_CONFIG: dict = {}  # (kernel shape key, asked config) -> the config that compiled (resource fallback)


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few splits exercise the combine step
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def default_splits(B: int, S: int, device: torch.device, config: DecodeConfig | None = None,
                   head_groups: int = 1) -> int:
    """The split count `config` asks for (its num_splits, else the whole-waves rule `wave_splits`)."""
    config = config or DecodeConfig()
    if config.num_splits:
        return config.num_splits
    return wave_splits(B, S, _sm_count(device), head_groups, config.waves, config.min_split_tokens)


_DEVICE_NAME: dict = {}


def _device_name(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu (triton interpreter)"
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _DEVICE_NAME:
        _DEVICE_NAME[idx] = torch.cuda.get_device_name(idx)
    return _DEVICE_NAME[idx]


def shape_key(q_lat, q_rope, c_k, c_v, k_rope) -> ShapeKey:
    """The tuning-table key of these inputs (GPU model, per-layer shape, batch, context)."""
    B, H, DL = q_lat.shape
    DRF = k_rope.shape[-1] if q_rope is not None and q_rope.shape[-1] else 0
    return ShapeKey(_device_name(c_k.device), str(c_k.dtype).replace("torch.", ""), H, DL, c_v.shape[-1], DRF,
                    _is_shared(c_k, c_v), B, c_k.shape[1])


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def latent_decode_triton(q_lat, q_rope, c_k, c_v, k_rope, scale: float, keep=None, kv_len=None, *,
                         num_splits: int | None = None, config: DecodeConfig | None = None):
    """The fused Triton kernel (same arguments and result as `latent_decode_reference`).

    config: the launch configuration; None picks one (decode_config's order: tuned in this process,
    tuning now if `decode_tuning` is on and no graph is being captured, the shipped table, the
    default rule). num_splits overrides the configuration's split count.
    """
    if triton is None:
        raise HarnessError("latent_decode_triton needs triton (pip install triton)")
    _check(q_lat, q_rope, c_k, c_v, k_rope, keep, kv_len)
    if config is None:
        key = shape_key(q_lat, q_rope, c_k, c_v, k_rope)
        config = tuned_config(key)
        if config is None and tuning_enabled() and not _interpreting() and not _capturing(c_k.device):
            config = tune_decode(q_lat, q_rope, c_k, c_v, k_rope, scale, keep, kv_len)[0]
    if num_splits is not None:
        config = replace(config or DecodeConfig(), num_splits=num_splits)
    return _launch(q_lat, q_rope, c_k, c_v, k_rope, scale, keep, kv_len, config)


def _launch(q_lat, q_rope, c_k, c_v, k_rope, scale, keep, kv_len, config: DecodeConfig | None):
    B, H, S, n_kv, DR = _check(q_lat, q_rope, c_k, c_v, k_rope, keep, kv_len)
    DL, DV = q_lat.shape[-1], c_v.shape[-1]
    dtype, dev = c_k.dtype, c_k.device
    if c_v.dtype != dtype or c_k.stride(-1) != 1 or c_v.stride(-1) != 1:
        raise HarnessError("latent_decode_triton: c_k and c_v need one dtype and contiguous last dims")
    q_lat = q_lat.to(dtype).contiguous()
    shared = _is_shared(c_k, c_v)
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

    full_h = _pow2(H)
    BLOCK_DV_ALL = _pow2(DL) if shared else _pow2(DV)
    config = config or rule_config(q_lat, c_k, c_v)
    BLOCK_DR = _pow2(DRF) if has_rope else 16
    kkey = _kernel_key(q_lat, c_k, c_v, DRF, keep, kv_len, config)
    # Too much shared memory for this GPU: the same configuration with smaller tiles, then fewer warps.
    candidates = [_WORKING_CONFIG[kkey]] if kkey in _WORKING_CONFIG else list(dict.fromkeys([
        config, replace(config, block_n=16, num_stages=1), replace(config, block_n=16, num_stages=1, num_warps=4)]))
    precision = "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored for bf16/fp16 inputs
    out = torch.empty(B, H, DV, dtype=dtype, device=dev)
    last_err = None
    for cfg in candidates:
        BLOCK_H = min(cfg.block_h or full_h, full_h)
        groups = -(-H // BLOCK_H)
        BLOCK_A, BLOCK_B = latent_blocks(DL, cfg.split_dl)
        BLOCK_VA, BLOCK_VB = (BLOCK_A, BLOCK_B) if shared else latent_blocks(DV, cfg.split_dl)
        splits_wanted = default_splits(B, S, dev, cfg, groups)
        per = -(-max(S, 1) // splits_wanted)
        tokens_per_split = -(-per // cfg.block_n) * cfg.block_n
        n_splits = max(1, -(-S // tokens_per_split))
        po = torch.empty(B, n_splits, H, DV, dtype=torch.float32, device=dev)
        pm = torch.empty(B, n_splits, H, dtype=torch.float32, device=dev)
        pl = torch.empty_like(pm)
        try:
            _split_kernel[(groups, B, n_splits)](
                q_lat, q_rope, c_k, c_v, k_rope, keep_u8 if keep_u8 is not None else c_k,
                kv_len if kv_len is not None else c_k, po, pm, pl,
                float(scale) * math.log2(math.e), S, H, DL, DV, max(DR, 1), max(DRF, 1), H // n_kv, tokens_per_split,
                q_lat.stride(0), q_lat.stride(1), q_rope.stride(0), q_rope.stride(1),
                c_k.stride(0), c_k.stride(1), c_v.stride(0), c_v.stride(1), k_rope.stride(0), k_rope.stride(1),
                s_keepb, s_len, po.stride(0), po.stride(1), po.stride(2), pm.stride(0), pm.stride(1),
                BLOCK_H=BLOCK_H, BLOCK_N=cfg.block_n, BLOCK_A=BLOCK_A, BLOCK_B=max(BLOCK_B, 16), BLOCK_VA=BLOCK_VA,
                BLOCK_VB=max(BLOCK_VB, 16), BLOCK_DR=BLOCK_DR, HAS_B=BLOCK_B > 0, HAS_VB=BLOCK_VB > 0,
                SHARED_KV=shared, HAS_ROPE=has_rope,
                HAS_KEEP=keep is not None, HAS_LEN=kv_len is not None, PRECISION=precision,
                DYNAMIC_LOOP=not _interpreting(), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
        except triton.runtime.errors.OutOfResources as e:
            last_err = e
            continue
        _WORKING_CONFIG[kkey] = cfg
        _combine_kernel[(B, H)](
            po, pm, pl, out, DV, n_splits, po.stride(0), po.stride(1), po.stride(2), pm.stride(0), pm.stride(1),
            out.stride(0), out.stride(1), BLOCK_S=16, BLOCK_ALL=_pow2(n_splits), BLOCK_DV=BLOCK_DV_ALL, num_warps=4,
        )
        return out
    raise HarnessError(f"latent_decode_triton: no tile configuration fits this GPU ({last_err})")


def launched_config(q_lat, q_rope, c_k, c_v, k_rope, keep=None, kv_len=None,
                    config: DecodeConfig | None = None) -> DecodeConfig | None:
    """The configuration a launch of `config` on these inputs actually used (after any fallback to
    smaller tiles); None before it ran."""
    DR = _check(q_lat, q_rope, c_k, c_v, k_rope, keep, kv_len)[-1]
    return _WORKING_CONFIG.get(_kernel_key(q_lat, c_k, c_v, k_rope.shape[-1] if DR else 0, keep, kv_len, config))


# ----------------------------------------------------------------------------- timing and tuning
def time_ms(fn, reps: int = 30, flush_bytes: int = 256 * 2**20) -> float:
    """Median CUDA-event time of fn() in ms. L2 is overwritten before every rep: in a real decode
    step the other layers' caches evict this one, so a cache small enough for L2 must not be timed
    warm."""
    flush = torch.empty(flush_bytes, dtype=torch.uint8, device="cuda")
    fn()
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for e0, e1 in ev:
        flush.zero_()
        e0.record()
        fn()
        e1.record()
    torch.cuda.synchronize()
    return sorted(e0.elapsed_time(e1) for e0, e1 in ev)[reps // 2]


def tune_decode(q_lat, q_rope, c_k, c_v, k_rope, scale: float, keep=None, kv_len=None,
                candidates: list[DecodeConfig] | None = None, reps: int = 20,
                record: bool = True) -> tuple[DecodeConfig, list[tuple[DecodeConfig, float]]]:
    """Time `candidates` (default `quick_candidates` around the default rule) on these inputs on
    their CUDA device and keep the fastest for this shape in this process. The kernel only reads
    its inputs, so real decode tensors can be used. Call it before a CUDA graph is captured, never
    inside (StaticDecoder tunes in its eager warm-up steps when tuning is on)."""
    if not c_k.is_cuda or _capturing(c_k.device):
        raise HarnessError("tune_decode times the kernel on a CUDA device, outside CUDA-graph capture")
    if candidates is None:
        candidates = quick_candidates(rule_config(q_lat, c_k, c_v), q_lat.shape[1])
    timed = []
    for cfg in candidates:
        run = lambda cfg=cfg: _launch(q_lat, q_rope, c_k, c_v, k_rope, scale, keep, kv_len, cfg)  # noqa: E731
        try:
            timed.append((cfg, time_ms(run, reps)))
        except HarnessError:  # no tile size of this configuration fits the GPU
            continue
    if not timed:
        raise HarnessError("tune_decode: no candidate configuration runs on this GPU")
    best = min(timed, key=lambda ct: ct[1])[0]
    if record:
        record_tuned(shape_key(q_lat, q_rope, c_k, c_v, k_rope), best)
    return best, timed


def latent_decode(q_lat, q_rope, c_k, c_v, k_rope, scale: float, keep=None, kv_len=None):
    """The Triton kernel on CUDA tensors, the PyTorch reference elsewhere (same result)."""
    if q_lat.is_cuda and triton is not None:
        return latent_decode_triton(q_lat, q_rope, c_k, c_v, k_rope, scale, keep, kv_len)
    return latent_decode_reference(q_lat, q_rope, c_k, c_v, k_rope, scale, keep, kv_len)
