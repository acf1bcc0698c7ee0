"""Quantized KV caches, for the original attention and for the MLA latent alike (HQQ int8/int4/int2).

    from harness.kvquant import KVQuantSpec, make_cache, held_bytes, bytes_per_token
    spec = KVQuantSpec(bits=4, group=64)      # harness.specs.KVQuantSpec, re-exported here
    cache = make_cache(model, spec)
    model.generate(ids, **{CACHE_ARG: cache}, max_new_tokens=32)   # harness.mla.cache.CACHE_ARG
    held_bytes(cache)                 # what the cache really holds: codes + scales/zeros + residual window
    bytes_per_token(model, spec)      # the accounting (DESIGN §12), per token, all layers

A cache layer stores whatever the attention hands to `update(keys, values)`: the original's K and
V (B, n_kv, T, d_h), or an MLA layer's latent "keys" (B, 1, T, r) and exact RoPE "values"
(B, 1, T, n_kv*2p) (harness.mla.cache). So one cache class quantizes both, with one byte rule:

    bytes/token = sum over layers and over {keys, values} of
                  heads * n_groups * (group_size * bits/8 + 2 * dtype bytes)      # codes + scale + zero
    plus, per sequence, the newest `residual` tokens kept at full precision (KIVI, transformers).

Groups: the channels of one token of one head, in at most `group` channels per group, the groups
of a row as equal as possible (n = ceil(w/group) groups of ceil(w/n) channels, rounded up to what
the bit packing needs; the few padding channels are stored and counted). A 64-wide head at
group 64 is one group; a latent of 168 is three of 56; a RoPE slice of 24 is one of 24.

Backend: HQQ (`hqq==0.2.8.post1`, pure PyTorch, runs on CPU and GPU), the quantizer transformers'
`HQQQuantizedCache` uses: affine min/max codes with HQQ's half-quadratic refinement of the zero
point, bit-packed uint8 codes, scale and zero in the cache's dtype. We call its `Quantizer` on our
own per-token layout instead of using transformers' HQQ layer, because that layer (5.17 and 5.23)
(1) groups the flattened (B, H, T, d) tensor, so its groups mix tokens and channels and change as
T grows, and it cannot quantize a latent whose size is not a multiple of the group (r = 168 at
group 64), nor 4-bit with an odd group count (axis=1: HQQ's packing fails); (2) re-quantizes the
whole dequantized cache at every residual flush; and (3) flushes on a rule that changed between
transformers 5.17 and 5.23, which would make CPU and GPU results differ. Here codes are appended
once per flush and never re-quantized, so measured bytes follow the accounting exactly.
optimum-quanto was not chosen: transformers' quanto cache takes 2 or 4 bits only (no int8).

Attention sees: the prefill's own K/V at full precision (they are quantized for later steps), then
the dequantized past + the residual window + the new tokens, as in transformers' quantized cache.
Loglikelihood scoring without a cache (lm-eval's multiple-choice tasks) is therefore unchanged by
cache quantization; generation (RULER) and chunked perplexity (harness.evaluate) are not.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicLayer

from harness.arch import attention_layers
from harness.errors import HarnessError
from harness.mla.attention import MLAAttention
from harness.specs import KVQuantSpec

HQQ = "hqq==0.2.8.post1"
KV_CONTEXT = 4096  # context at which a row's bytes_per_token spreads the full-precision window


def group_layout(width: int, group: int, bits: int) -> tuple[int, int]:
    """(groups per row, channels per group) for a row of `width` channels (0 groups for width 0)."""
    if width == 0:
        return 0, 0
    n = math.ceil(width / group)
    pack = 8 // bits  # codes per byte: HQQ packs along the group, so its size is a multiple of this
    return n, math.ceil(math.ceil(width / n) / pack) * pack


def _quantizer():
    try:
        from hqq.core.quantize import Quantizer
    except ImportError:
        raise HarnessError(f"KV-cache quantization needs the package {HQQ}; run `make setup` "
                           f"(or pip install {HQQ})") from None
    return Quantizer


# ---------------------------------------------------------------------------------------------
# The cache


class _Codes:
    """The quantized part of one cached tensor (B, H, T, w): codes, scale and zero, token-major.

    Layout: the tensor is padded to n*s channels and viewed as (T*B*H*n, s); its transpose
    (s, G) is what HQQ quantizes with axis=0, so each of the G columns is one group (s channels of
    one token and head) and new tokens are new columns, appended without touching the old ones.
    """

    def __init__(self, spec: KVQuantSpec, batch: int, heads: int, width: int, dtype, device):
        self.bits, self.B, self.H, self.w, self.dtype = spec.bits, batch, heads, width, dtype
        self.n, self.s = group_layout(width, spec.group, spec.bits)
        self.tokens = 0
        self.codes = torch.empty(self.s * spec.bits // 8, 0, dtype=torch.uint8, device=device)
        self.scale = torch.empty(1, 0, dtype=dtype, device=device)
        self.zero = torch.empty(1, 0, dtype=dtype, device=device)

    def append(self, x: torch.Tensor) -> None:
        """Quantize x (B, H, T, w) and append it."""
        T = x.shape[2]
        self.tokens += T
        if self.w == 0 or T == 0:
            return
        x = F.pad(x, (0, self.n * self.s - self.w))  # (B, H, T, n*s)
        groups = x.permute(2, 0, 1, 3).reshape(-1, self.s).t().contiguous()  # (s, T*B*H*n)
        q, meta = _quantizer().quantize(groups, nbits=self.bits, channel_wise=True, group_size=self.s,
                                        optimize=True, axis=0, compute_dtype=self.dtype, device=x.device)
        self.codes = torch.cat([self.codes, q], 1)
        self.scale = torch.cat([self.scale, meta["scale"].to(self.dtype)], 1)
        self.zero = torch.cat([self.zero, meta["zero"].to(self.dtype)], 1)

    def dequantize(self) -> torch.Tensor:
        """(B, H, tokens, w) in the cache dtype."""
        if self.w == 0 or self.tokens == 0:
            return torch.empty(self.B, self.H, self.tokens, self.w, dtype=self.dtype, device=self.codes.device)
        Q = _quantizer()
        packing = Q.bit_to_packing[self.bits]
        meta = {"nbits": self.bits, "group_size": self.s, "shape": (self.s, self.codes.shape[1]),
                "scale": self.scale, "zero": self.zero, "axis": 0, "packing": packing,
                "unpack_view_dtype": Q.unpack_view_dtype[packing], "view_as_float": False,
                "compute_dtype": self.dtype}
        groups = Q.dequantize(self.codes, meta)  # (s, T*B*H*n)
        x = groups.t().reshape(self.tokens, self.B, self.H, self.n * self.s)[..., : self.w]
        return x.permute(1, 2, 0, 3)  # (B, H, T, w)

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scale.nbytes + self.zero.nbytes


def _empty_like(x: torch.Tensor) -> torch.Tensor:
    """(B, H, 0, w): an empty window (a fresh tensor: a 0-token view would keep x's storage alive)."""
    return x.new_empty(x.shape[0], x.shape[1], 0, x.shape[3])


class QuantizedKVLayer(DynamicLayer):
    """One layer's cache: quantized past tokens + a full-precision window of the newest ones.

    `keys` / `values` hold the residual window (B, H, r, w); the quantized tokens are in
    `quantized["keys"]` / `quantized["values"]`. The first update (the prefill) is quantized at
    once; later tokens collect in the window and are quantized together when it reaches
    `spec.residual` tokens.
    """

    def __init__(self, spec: KVQuantSpec):
        super().__init__()
        self.spec = spec
        self.cumulative_length = 0
        self.quantized: dict[str, _Codes] = {}

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys, self.values = _empty_like(key_states), _empty_like(value_states)
        for name, x in (("keys", key_states), ("values", value_states)):
            B, H, _, w = x.shape
            self.quantized[name] = _Codes(self.spec, B, H, w, x.dtype, x.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:  # the prefill: attention uses it as is, the cache keeps its codes
            self.lazy_initialization(key_states, value_states)
            self.cumulative_length = key_states.shape[-2]
            self.quantized["keys"].append(key_states)
            self.quantized["values"].append(value_states)
            return key_states, value_states
        self.cumulative_length += key_states.shape[-2]
        window_k = torch.cat([self.keys, key_states], dim=-2)
        window_v = torch.cat([self.values, value_states], dim=-2)
        keys = torch.cat([self.quantized["keys"].dequantize(), window_k], dim=-2)
        values = torch.cat([self.quantized["values"].dequantize(), window_v], dim=-2)
        if window_k.shape[-2] >= self.spec.residual:  # flush the window into codes
            self.quantized["keys"].append(window_k)
            self.quantized["values"].append(window_v)
            window_k, window_v = _empty_like(window_k), _empty_like(window_v)
        self.keys, self.values = window_k, window_v
        return keys, values

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = 0
        self.quantized = {}

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a quantized KV cache cannot be cropped (no assisted decoding)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("a quantized KV cache does not support beam search; decode greedily")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("a quantized KV cache does not support expanding the batch")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("a quantized KV cache does not support selecting batch rows")

    @property
    def nbytes(self) -> int:
        """Bytes this layer holds: codes, scales and zeros, and the full-precision window."""
        held = sum(q.nbytes for q in self.quantized.values())
        return held + (self.keys.nbytes + self.values.nbytes if self.is_initialized else 0)


class QuantizedKVCache(Cache):
    """A transformers Cache of `QuantizedKVLayer`s, one per decoder layer."""

    def __init__(self, num_layers: int, spec: KVQuantSpec):
        super().__init__(layers=[QuantizedKVLayer(spec) for _ in range(num_layers)])
        self.spec = spec

    def bytes_held(self) -> int:
        return held_bytes(self)


def make_cache(model, spec: KVQuantSpec) -> QuantizedKVCache:
    """A fresh quantized cache for `model` (original or MLA-converted; full-attention layers only).

    Raises:
        HarnessError: a bad spec, or a model with sliding-window layers (its window is not kept).
    """
    problems = spec.problems()
    if problems:
        raise HarnessError("bad kv_quant: " + "; ".join(f"{k}: {m}" for k, m in problems))
    _quantizer()
    layers = attention_layers(model)
    sliding = [a.index for a in layers if a.sliding_window]
    if sliding:
        raise HarnessError(f"kv_quant needs full-attention layers (as transformers' QuantizedCache); layers "
                           f"{sliding[:4]}... of {model.config.model_type} use a sliding window: leave kv_quant out")
    return QuantizedKVCache(len(layers), spec)


def held_bytes(cache) -> int:
    """Bytes a cache holds: for a quantized cache codes + scales/zeros + window, else its K/V tensors."""
    total = 0
    for layer in getattr(cache, "layers", []):
        if isinstance(layer, QuantizedKVLayer):
            total += layer.nbytes
        else:
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                total += t.nbytes if t is not None and hasattr(t, "nbytes") else 0
    return total


# ---------------------------------------------------------------------------------------------
# Accounting


def cached_tensors(model) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Per layer: ((heads, width) of the cached "keys"), ((heads, width) of the "values")."""
    out = []
    for a in attention_layers(model):
        m = a.module
        if isinstance(m, MLAAttention):
            rope = m.k_rope_proj.out_features if m.k_rope_proj is not None else 0
            out.append(((1, m.rank), (1, rope)))
        else:
            out.append(((a.n_kv, a.d_h), (a.n_kv, a.d_h)))
    return out


def quantized_bytes_per_token(model, spec: KVQuantSpec, dtype_bytes: int | None = None) -> int:
    """Bytes per token of the quantized part, all layers: codes + scales + zeros (padding included)."""
    s_bytes = dtype_bytes or next(model.parameters()).element_size()
    total = 0
    for layer in cached_tensors(model):
        for heads, width in layer:
            n, s = group_layout(width, spec.group, spec.bits)
            total += heads * n * (s * spec.bits // 8 + 2 * s_bytes)
    return total


def full_bytes_per_token(model, dtype_bytes: int | None = None) -> int:
    """Bytes per token of the unquantized cache (the accounted width x dtype size)."""
    size = dtype_bytes or next(model.parameters()).element_size()
    return sum(h * w for layer in cached_tensors(model) for h, w in layer) * size


def accounted_bytes(model, spec: KVQuantSpec, quantized_tokens: int, window_tokens: int, batch: int = 1,
                    dtype_bytes: int | None = None) -> int:
    """Bytes a quantized cache should hold with this many quantized and full-precision tokens."""
    return batch * (quantized_tokens * quantized_bytes_per_token(model, spec, dtype_bytes)
                    + window_tokens * full_bytes_per_token(model, dtype_bytes))


def generate_split(prompt_tokens: int, new_tokens: int, spec: KVQuantSpec) -> tuple[int, int]:
    """(quantized, full-precision) tokens held after generate() of `new_tokens` from a prompt.

    The prefill is quantized at once; each of the new_tokens - 1 fed-back tokens joins the window,
    which is quantized whenever it reaches `spec.residual` tokens.
    """
    fed = max(new_tokens - 1, 0)
    window = fed % spec.residual
    return prompt_tokens + fed - window, window


def bytes_per_token(model, spec: KVQuantSpec | None, context: int = KV_CONTEXT,
                    dtype_bytes: int | None = None) -> float:
    """Cache bytes per token at `context` tokens: quantized bytes + the full window spread over them.

    The window is counted full (`spec.residual` tokens, its largest size) and amortised over the
    context; with spec None this is the unquantized accounted width x dtype size.
    """
    full = full_bytes_per_token(model, dtype_bytes)
    if spec is None:
        return float(full)
    window = min(spec.residual, context)
    return ((context - window) * quantized_bytes_per_token(model, spec, dtype_bytes) + window * full) / context
