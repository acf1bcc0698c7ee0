"""What a conversion method returns for one layer: the factors of its latent attention.

Shapes (D hidden, n_kv KV heads, d_h head dim, r latent width, p RoPE pairs kept per KV head):
    down        (r, D)                 latent = x @ down.T; K part c[k_slice], V part c[v_slice]
    up_k        (n_kv*d_lat, r_k)      rebuilds the latent key dims (d_lat = d_h - 2p per head)
    up_v        (n_kv*d_h, r_v)        rebuilds V
    k_rope      (n_kv*2p, D) | None    exact rows of W_k for the dims that keep RoPE (MHA2MLA)
    rope_dims   (n_kv, 2p) long        within-head dims served by k_rope
    latent_dims (n_kv, d_lat) long     within-head dims served by up_k
    k_bias/v_bias (n_kv*d_h,) | None   original biases (Qwen2), added after the rebuild
    rope_on_latent                     RoPE also on the latent dims (svd/care) or not (mha2mla NoPE)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LayerFactors:
    down: torch.Tensor
    up_k: torch.Tensor
    up_v: torch.Tensor
    k_slice: tuple[int, int]
    v_slice: tuple[int, int]
    rope_dims: torch.Tensor
    latent_dims: torch.Tensor
    rope_on_latent: bool = True
    k_rope: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    info: dict = field(default_factory=dict)  # e.g. {"r_k": .., "r_v": ..} for reports

    @property
    def cache_width(self) -> int:
        """Elements per token this layer caches: the latent plus exact RoPE keys (DESIGN §2)."""
        return self.down.shape[0] + (self.k_rope.shape[0] if self.k_rope is not None else 0)

    def __post_init__(self):
        r = self.down.shape[0]
        for name, (lo, hi) in (("k_slice", self.k_slice), ("v_slice", self.v_slice)):
            assert 0 <= lo < hi <= r, f"{name} {(lo, hi)} outside latent width {r}"
        assert self.up_k.shape[1] == self.k_slice[1] - self.k_slice[0], "up_k width != k_slice"
        assert self.up_v.shape[1] == self.v_slice[1] - self.v_slice[0], "up_v width != v_slice"


def all_rope_dims(n_kv: int, d_h: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rope_dims, latent_dims) for methods that rebuild every key dim from the latent."""
    return torch.zeros(n_kv, 0, dtype=torch.long), torch.arange(d_h).repeat(n_kv, 1)


def split_factors(down_k, up_k, down_v, up_v, n_kv, d_h, k_bias=None, v_bias=None, info=None) -> LayerFactors:
    """Separate K and V latents stacked into one cache row [c_k | c_v] (svd, care, asvd, svdllm)."""
    r_k, r_v = down_k.shape[0], down_v.shape[0]
    rope, lat = all_rope_dims(n_kv, d_h)
    return LayerFactors(
        down=torch.cat([down_k, down_v], 0), up_k=up_k, up_v=up_v,
        k_slice=(0, r_k), v_slice=(r_k, r_k + r_v), rope_dims=rope, latent_dims=lat,
        rope_on_latent=True, k_bias=k_bias, v_bias=v_bias,
        info={"r_k": r_k, "r_v": r_v, **(info or {})},
    )
