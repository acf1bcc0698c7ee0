"""The MLA attention module: one class for every supported architecture.

A converted layer stores, per token, only
    c      = x @ down.T                    (B, T, r)         the latent(s): K part c[..., k_slice], V part c[..., v_slice]
    k_rope = RoPE(x @ k_rope_proj.T + b)   (B, T, n_kv*2p)   the key dims that keep RoPE exactly (MHA2MLA,
                                                            care_mla), rotated once when written, at their position
and rebuilds attention from them. Which key dims come from where is a per-layer choice recorded in
`LayerFactors` (harness.mla.factors):
  * svd / care / care_joint: every key dim comes from the latent and RoPE is applied after the
    key is rebuilt (``rope_on_latent=True``); nothing else is cached.
  * mha2mla / care_mla: 2p dims per KV head keep RoPE and are cached exactly; the others ("NoPE")
    come from the latent and get no RoPE on the query or the key side.

Two paths:
  * ``reconstruct`` (any method): rebuild K (B, n_kv, S, d_h) and V from the cache, apply the
    original q/k-norm and RoPE where needed, then call the model's own attention kernel.
  * ``absorbed`` (NoPE latent, no k-norm): never rebuild K/V; fold up_k into the query
    (q_lat = q_nope @ up_k, scores against the latent) and apply up_v after the softmax. One new
    token goes through the fused latent-attention kernel (`harness.kernels.latent_decode`: Triton
    on CUDA, its PyTorch reference elsewhere); a few new tokens materialise the scores.

The cache is any `transformers` cache (Dynamic or Static): we store the latent as its "key"
(B, 1, T, r) and the RoPE keys as its "value" (B, 1, T, n_kv*2p), so it holds exactly the
accounted elements.
"""
from __future__ import annotations

import sys
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init
from transformers.cache_utils import StaticLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from harness.errors import HarnessError
from harness.kernels import latent_decode, latent_decode_reference, latent_decode_triton
from harness.mla.factors import LayerFactors


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """RoPE on the dims where mask (heads, d_h) is True; x (B, heads, T, d_h), cos/sin (B, T, d_h)."""
    rot = x * cos.unsqueeze(1) + _rotate_half(x) * sin.unsqueeze(1)
    if mask is None:
        return rot
    return torch.where(mask[None, :, None, :], rot, x)


class MLAAttention(nn.Module):
    """Drop-in replacement of a Llama/Qwen2/Qwen3/Mistral/Gemma3 attention module.

    Built from the original module (q_proj, o_proj, q/k-norm, scaling and window are reused as
    they are) and one `LayerFactors` (the method's output for this layer).
    """

    def __init__(self, original: nn.Module, f: LayerFactors, *, n_h: int, n_kv: int, d_h: int,
                 path: str = "reconstruct"):
        super().__init__()
        self.config = original.config
        self.layer_idx = original.layer_idx
        self.head_dim = d_h
        self.num_heads, self.num_kv_heads = n_h, n_kv
        self.num_key_value_groups = n_h // n_kv
        self.scaling = original.scaling
        self.attention_dropout = getattr(original, "attention_dropout", 0.0)
        self.is_causal = getattr(original, "is_causal", True)
        self.sliding_window = getattr(original, "sliding_window", None)
        self.attn_logit_softcapping = getattr(original, "attn_logit_softcapping", None)
        self.q_proj, self.o_proj = original.q_proj, original.o_proj
        self.q_norm = getattr(original, "q_norm", None)
        self.k_norm = getattr(original, "k_norm", None)
        # The model's own eager kernel (Gemma's differs from Llama's) is the fallback interface.
        self._eager = getattr(sys.modules[type(original).__module__], "eager_attention_forward", None)

        D = original.q_proj.in_features
        dev, dt = original.q_proj.weight.device, original.q_proj.weight.dtype
        self.k_slice, self.v_slice = tuple(f.k_slice), tuple(f.v_slice)
        self.rope_on_latent = f.rope_on_latent
        self.rank = f.down.shape[0]
        def linear(i, o):  # weights are copied in below: skip the random init
            return skip_init(nn.Linear, i, o, bias=False, device=dev, dtype=dt)

        self.down = linear(D, self.rank)
        self.up_k = linear(self.k_slice[1] - self.k_slice[0], f.up_k.shape[0])
        self.up_v = linear(self.v_slice[1] - self.v_slice[0], f.up_v.shape[0])
        n_rope = f.k_rope.shape[0] if f.k_rope is not None else 0
        self.k_rope_proj = linear(D, n_rope) if n_rope else None
        with torch.no_grad():
            self.down.weight.copy_(f.down)
            self.up_k.weight.copy_(f.up_k)
            self.up_v.weight.copy_(f.up_v)
            if self.k_rope_proj is not None:
                self.k_rope_proj.weight.copy_(f.k_rope)
        self.k_bias = nn.Parameter(f.k_bias.to(dev, dt)) if f.k_bias is not None else None
        self.v_bias = nn.Parameter(f.v_bias.to(dev, dt)) if f.v_bias is not None else None

        # Within-head dim indices: rope_dims (n_kv, 2p) are cached exactly; latent_dims (n_kv, d_h-2p).
        self.register_buffer("rope_dims", f.rope_dims.to(dev), persistent=True)
        self.register_buffer("latent_dims", f.latent_dims.to(dev), persistent=True)
        k_mask = torch.zeros(n_kv, d_h, dtype=torch.bool, device=dev)
        k_mask.scatter_(1, f.rope_dims.to(dev), True)
        if self.rope_on_latent:
            k_mask[:] = True
        # None means "RoPE everywhere" (skip the where()).
        # Buffers (not saved): they follow the module to another device, as a model converted on the CPU
        # and moved to a GPU needs.
        partial = not bool(k_mask.all())
        self.register_buffer("_k_mask", k_mask if partial else None, persistent=False)
        self.register_buffer("_q_mask", k_mask.repeat_interleave(self.num_key_value_groups, 0) if partial else None,
                             persistent=False)
        self.path = path
        self.check_path(path)

    # ----------------------------------------------------------------------------- bookkeeping
    @property
    def cache_width(self) -> int:
        """Elements cached per token: latent + exact RoPE keys (the §2 accounting rule)."""
        return self.rank + (self.k_rope_proj.out_features if self.k_rope_proj is not None else 0)

    def supports_absorbed(self) -> bool:
        return self.absorbed_obstacle() is None

    def absorbed_obstacle(self) -> str | None:
        """Why this layer cannot take the absorbed path, or None when it can."""
        if self.rope_on_latent:
            return ("this conversion puts RoPE on keys rebuilt from the latent (svd/care/care_joint/asvd/svdllm), "
                    "so up_k cannot fold into the query; convert with mha2mla or care_mla")
        if self.k_norm is not None:
            return ("this model normalises each key head (q/k-norm: Qwen3, Gemma3), which mixes the latent and "
                    "RoPE dims, so up_k cannot fold into the query")
        if self.attn_logit_softcapping is not None:
            return "this model soft-caps attention logits"
        return None

    def check_path(self, path: str) -> None:
        if path not in ("reconstruct", "absorbed"):
            raise HarnessError(f"unknown MLA decode path '{path}'; use reconstruct or absorbed")
        why = self.absorbed_obstacle() if path == "absorbed" else None
        if why:
            raise HarnessError(f"the absorbed decode path does not apply: {why}; use path 'reconstruct' "
                               "(--path reconstruct) for this model and conversion")

    # ----------------------------------------------------------------------------- forward
    # Absorption pays off when few new tokens attend to a long latent; prefill goes through the
    # reconstruct path and the model's fused attention kernel (the absorbed scores are materialised).
    absorb_max_tokens: int = 16
    # One new token on the absorbed path: "auto" runs the fused Triton kernel on CUDA (its PyTorch
    # reference elsewhere); "torch" forces the reference, "triton" the kernel (also on CPU tensors
    # under TRITON_INTERPRET=1, which is how the CPU tests exercise this wiring).
    decode_kernel: str = "auto"

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                past_key_values=None, cache=None, **kwargs):
        # transformers 5.24 renamed the decoder layer's `past_key_values` argument to `cache`;
        # earlier releases (the GPU image's 5.17) pass the old name. Either holds the same object.
        past_key_values = cache if cache is not None else past_key_values
        B, T, _ = hidden_states.shape
        cos, sin = position_embeddings
        c = self.down(hidden_states)  # (B, T, r)
        kr = self._rope_keys(hidden_states, cos, sin)  # (B, T, n_kv*2p), rotated at their own positions
        kv_len = None
        if past_key_values is not None:
            c4, kr4 = past_key_values.update(c.unsqueeze(1), kr.unsqueeze(1), self.layer_idx)
            c, kr = c4.squeeze(1), kr4.squeeze(1)  # (B, S, r), (B, S, n_kv*2p)
            kv_len = _filled_length(past_key_values, self.layer_idx)
        S = c.shape[1]
        q = self.q_proj(hidden_states).view(B, T, self.num_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
        q = q.transpose(1, 2)  # (B, n_h, T, d_h)
        if self.path == "absorbed" and T == 1:
            out = self._absorbed_decode(q, c, kr, cos, sin, attention_mask, kv_len)
        elif self.path == "absorbed" and T <= self.absorb_max_tokens:
            out = self._absorbed(q, c, kr, cos, sin, attention_mask)
        else:
            out = self._reconstruct(q, c, kr, cos, sin, attention_mask, S, **kwargs)
        out = out.reshape(B, T, -1).contiguous()
        return self.o_proj(out), None

    def _rope_keys(self, x, cos, sin):
        """The exact RoPE key dims (bias included) of the new tokens, rotated once, at their positions.

        Cached rotated, so decoding never rebuilds position tables for the cached tokens. rope_dims
        is sorted [pairs, pairs + d_h/2], so rotate_half of the 2p-vector pairs each dim with its
        RoPE partner: the same arithmetic as the original's RoPE on those dims.
        """
        B, T, _ = x.shape
        if self.k_rope_proj is None:
            return x.new_zeros(B, T, 0)
        kr = self.k_rope_proj(x)
        if self.k_bias is not None:
            kr = kr + self.k_bias.view(self.num_kv_heads, -1).gather(1, self.rope_dims).reshape(-1)
        kr = kr.view(B, T, self.num_kv_heads, -1)
        kr = kr * cos[:, :, self.rope_dims] + _rotate_half(kr) * sin[:, :, self.rope_dims]
        return kr.reshape(B, T, -1)

    def _unrotate(self, kr, cos, sin):
        """Cached RoPE keys (B, S, n_kv*2p) back to pre-RoPE, for k-norm models (the norm acts before RoPE)."""
        B, S, _ = kr.shape
        kr = kr.view(B, S, self.num_kv_heads, -1)
        return (kr * cos[:, :, self.rope_dims] - _rotate_half(kr) * sin[:, :, self.rope_dims]).reshape(B, S, -1)

    def rebuild_kv(self, c, kr):
        """K and V (B, n_kv, S, d_h) from the cached tensors; K before any k-norm, its RoPE dims as in `kr`."""
        B, S, _ = c.shape
        n_kv, d_h = self.num_kv_heads, self.head_dim
        k_lat = self.up_k(c[..., self.k_slice[0]:self.k_slice[1]]).view(B, S, n_kv, -1)
        if self.k_bias is not None:  # the RoPE dims' bias is already in kr
            k_lat = k_lat + self.k_bias.view(n_kv, d_h).gather(1, self.latent_dims)
        if self.k_rope_proj is None:
            k = k_lat  # latent dims are all dims, in order
        else:
            k = c.new_zeros(B, S, n_kv, d_h)
            idx_lat = self.latent_dims[None, None].expand(B, S, -1, -1)
            idx_rope = self.rope_dims[None, None].expand(B, S, -1, -1)
            k = k.scatter(3, idx_lat, k_lat.to(k.dtype)).scatter(3, idx_rope, kr.view(B, S, n_kv, -1))
        v = self.up_v(c[..., self.v_slice[0]:self.v_slice[1]])
        if self.v_bias is not None:
            v = v + self.v_bias
        return k.transpose(1, 2), v.view(B, S, n_kv, d_h).transpose(1, 2)

    def _reconstruct(self, q, c, kr, cos, sin, attention_mask, S, **kwargs):
        q = _rope(q, cos, sin, self._q_mask)
        # Keys rebuilt from the latent need RoPE for all S cached positions when RoPE sits on the
        # latent dims (svd/care) or a k-norm must act before RoPE; otherwise the cached RoPE keys
        # are final and the NoPE dims get none.
        needs_table = self.rope_on_latent or self.k_norm is not None
        if needs_table:
            # The model's rotary module gave cos/sin for the T new tokens only.
            k_cos, k_sin = self._positions_table(cos, sin, S, kwargs.get("position_ids"))
            if kr.shape[-1]:
                kr = self._unrotate(kr, k_cos, k_sin)
        k, v = self.rebuild_kv(c, kr)
        if self.k_norm is not None:
            k = self.k_norm(k)
        if needs_table:
            k = _rope(k, k_cos, k_sin, self._k_mask)
        interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, self._eager)
        out, _ = interface(
            self, q, k.to(q.dtype), v.to(q.dtype), attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling, sliding_window=self.sliding_window, **kwargs,
        )
        return out  # (B, T, n_h, d_h)

    def _positions_table(self, cos, sin, S, position_ids):
        """cos/sin (B, S, d_h) for the S cached key positions.

        The model's rotary module gave tables for the T new tokens only. Cached tokens are
        consecutive positions ending at the last new one (also after left padding, whose pad
        slots are masked, and after a sliding-window cache dropped old slots).
        """
        T = cos.shape[1]
        if S == T:
            return cos, sin
        rotary, layer_type = self._rotary
        if position_ids is None:
            raise ValueError("MLAAttention needs position_ids to rotate cached keys; pass them to the model")
        pos = position_ids[:, -1:] - (S - 1) + torch.arange(S, device=cos.device)[None]  # (B, S)
        return rotary(cos, pos) if layer_type is None else rotary(cos, pos, layer_type)

    def bind_rotary(self, rotary: nn.Module, layer_type: str | None) -> None:
        """Give the module its model's rotary embedding without making it a submodule."""
        object.__setattr__(self, "_rotary", (rotary, layer_type))

    # ----------------------------------------------------------------------------- absorbed path
    # score = q_nope . (up_k c) + q_rope . k_rope = (q_nope up_k) . c + q_rope . k_rope; the NoPE
    # key bias adds q_nope . b to every score of a query row, which the softmax cancels, so it is
    # left out. The value bias passes through (softmax rows sum to 1).

    def _absorbed_queries(self, q, cos, sin):
        """q (B, n_h, T, d_h) -> q_lat (B, n_h, T, r_k) folded through up_k, q_r (B, n_h, T, 2p) rotated."""
        B, n_h, T, d_h = q.shape
        n_kv, g = self.num_kv_heads, self.num_key_value_groups
        lat_idx = self.latent_dims.repeat_interleave(g, 0)[None, :, None, :].expand(B, -1, T, -1)
        q_n = q.gather(3, lat_idx)  # (B, n_h, T, d_lat)
        d_lat, r_k = q_n.shape[-1], self.k_slice[1] - self.k_slice[0]
        up_k = self.up_k.weight.view(n_kv, d_lat, r_k)
        q_lat = (q_n.reshape(B, n_kv, g * T, d_lat) @ up_k).view(B, n_h, T, r_k)
        p2 = self.rope_dims.shape[1]
        if not p2:
            return q_lat, None
        rope_idx = self.rope_dims.repeat_interleave(g, 0)[None, :, None, :].expand(B, -1, T, -1)
        q_r = q.gather(3, rope_idx).view(B, n_kv, g, T, p2)
        kc = cos[:, :, self.rope_dims].permute(0, 2, 1, 3)[:, :, None]  # (B, n_kv, 1, T, 2p)
        ks = sin[:, :, self.rope_dims].permute(0, 2, 1, 3)[:, :, None]
        q_r = (q_r * kc + _rotate_half(q_r) * ks).view(B, n_h, T, p2)
        return q_lat, q_r

    def _apply_up_v(self, o_lat):
        """o_lat (B, n_h, T, r_v) -> per-head outputs (B, T, n_h, d_h)."""
        B, n_h, T, r_v = o_lat.shape
        n_kv, g, d_h = self.num_kv_heads, self.num_key_value_groups, self.head_dim
        up_v = self.up_v.weight.view(n_kv, d_h, r_v)
        out = (o_lat.reshape(B, n_kv, g * T, r_v).to(up_v.dtype) @ up_v.transpose(1, 2)).view(B, n_h, T, d_h)
        if self.v_bias is not None:
            out = out + self.v_bias.view(n_kv, d_h).repeat_interleave(g, 0)[None, :, None, :]
        return out.transpose(1, 2)

    def _absorbed_decode(self, q, c, kr, cos, sin, attention_mask, kv_len):
        """One new token: the fused latent-attention kernel (harness.kernels), then up_v."""
        B, n_h, _, _ = q.shape
        S = c.shape[1]
        q_lat, q_r = self._absorbed_queries(q, cos, sin)
        keep = _keep_row(attention_mask, B, S, self.sliding_window, c.device)
        fn = {"auto": latent_decode, "torch": latent_decode_reference, "triton": latent_decode_triton}[self.decode_kernel]
        if fn is latent_decode and torch.is_grad_enabled() and q_lat.requires_grad:
            fn = latent_decode_reference  # the kernel has no backward; the reference is differentiable
        o_lat = fn(q_lat[:, :, 0], None if q_r is None else q_r[:, :, 0],
                   c[..., self.k_slice[0]:self.k_slice[1]], c[..., self.v_slice[0]:self.v_slice[1]],
                   kr if q_r is not None else None, self.scaling, keep, kv_len)  # (B, n_h, r_v)
        return self._apply_up_v(o_lat[:, :, None])

    def _absorbed(self, q, c, kr, cos, sin, attention_mask):
        """A few new tokens (T <= absorb_max_tokens): the score matrix is materialised."""
        B, n_h, T, _ = q.shape
        S = c.shape[1]
        n_kv, g = self.num_kv_heads, self.num_key_value_groups
        q_lat, q_r = self._absorbed_queries(q, cos, sin)
        c_k = c[..., self.k_slice[0]:self.k_slice[1]]  # (B, S, r_k)
        scores = torch.einsum("bhtr,bsr->bhts", q_lat, c_k)
        if q_r is not None:
            k_r = kr.view(B, S, n_kv, -1).permute(0, 2, 3, 1)  # (B, n_kv, 2p, S)
            scores = scores + (q_r.reshape(B, n_kv, g * T, -1) @ k_r).view(B, n_h, T, S)
        scores = scores * self.scaling
        scores = scores + _additive_mask(attention_mask, T, S, scores, self.sliding_window)
        p = F.softmax(scores, dim=-1, dtype=torch.promote_types(q.dtype, torch.float32))
        # A query with nothing to attend (a left-pad token) gets zeros, not NaN: NaN would reach the
        # next layer's latent at that slot and, through 0 * NaN, every query that masks it.
        p = p.nan_to_num(0.0).to(q.dtype)
        o_lat = torch.einsum("bhts,bsr->bhtr", p, c[..., self.v_slice[0]:self.v_slice[1]])  # (B, n_h, T, r_v)
        return self._apply_up_v(o_lat)


def _filled_length(cache, layer_idx: int):
    """Tokens written so far to a static (preallocated) cache layer, as a device tensor; else None.

    Lets the decode kernel stop at the filled part of a long preallocated cache without a host sync.
    """
    layers = getattr(cache, "layers", None)
    if layers is None or layer_idx >= len(layers):
        return None
    layer = layers[layer_idx]
    return layer.cumulative_length if type(layer) is StaticLayer else None


def _keep_row(mask, B: int, S: int, window: int | None, device):
    """(B, S) bool of the cache slots the one new token may attend, from the model's mask (None: all)."""
    if mask is None:
        if window is None or S <= window:
            return None
        return (torch.arange(S, device=device) > S - 1 - window)[None].expand(B, S)
    row = mask[..., -1, -S:]
    row = row.reshape(row.shape[0], S) if row.dim() > 2 else row
    if row.dtype != torch.bool:
        row = row > torch.finfo(row.dtype).min / 2
    return row.expand(B, S) if row.shape[0] == 1 else row


def _additive_mask(mask, T, S, like, window):
    """An additive (…, T, S) mask from whatever the model passed: None (causal), bool, or float."""
    if mask is None:
        i = torch.arange(T, device=like.device)[:, None] + (S - T)
        j = torch.arange(S, device=like.device)[None, :]
        keep = j <= i
        if window is not None:
            keep = keep & (j > i - window)
        return torch.zeros(T, S, device=like.device, dtype=like.dtype).masked_fill(~keep, float("-inf"))
    mask = mask[..., -S:]
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=like.device, dtype=like.dtype).masked_fill(~mask, float("-inf"))
    return mask.to(like.dtype)
