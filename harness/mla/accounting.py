"""KV accounting (DESIGN §2): one rule for every method, and budget <-> rank conversions.

The cache width w_l of layer l is the number of elements cached per token: every latent plus
every exact RoPE key. The original caches 2*n_kv*d_h. KV save = 1 - sum_l w_l / (L*2*n_kv*d_h).
Methods are compared at equal sum_l w_l.
"""
from __future__ import annotations

from dataclasses import dataclass

from harness.errors import HarnessError


@dataclass(frozen=True)
class Budget:
    """A KV budget: exactly one of kv_save (fraction saved) or rank (per K and per V, CARE notation)."""

    kv_save: float | None = None
    rank: int | None = None

    def __post_init__(self):
        if (self.kv_save is None) == (self.rank is None):
            raise HarnessError("give exactly one budget: kv_save (e.g. 0.5) or rank (e.g. 96)")
        if self.kv_save is not None and not (0.0 <= self.kv_save < 1.0):
            raise HarnessError(
                f"kv_save {self.kv_save} is outside [0, 1): 0 is parity (no saving), values near 1 keep almost nothing"
            )
        if self.rank is not None and self.rank < 1:
            raise HarnessError(f"rank {self.rank} is below 1; give a rank of at least 1 per K and V")

    def label(self) -> str:
        return f"kv_save={self.kv_save:g}" if self.kv_save is not None else f"rank={self.rank}"


def parity_rank(n_kv: int, d_h: int) -> int:
    """Rank per K and per V at which the latent is as wide as the original cache (no saving)."""
    return n_kv * d_h


def per_layer_width(budget: Budget, n_kv: int, d_h: int) -> int:
    """Target cache width per layer (elements per token) for a budget, before any reallocation."""
    full = 2 * n_kv * d_h
    if budget.rank is not None:
        if budget.rank > parity_rank(n_kv, d_h):
            raise HarnessError(
                f"rank {budget.rank} is above KV parity ({parity_rank(n_kv, d_h)} = n_kv*d_h); "
                "a latent wider than the original cache saves nothing: lower the rank"
            )
        return 2 * budget.rank
    w = round((1.0 - budget.kv_save) * full)
    if w < 2:
        raise HarnessError(f"kv_save {budget.kv_save} leaves {w} cache elements per layer; need at least 1 for K and 1 for V")
    return w


def kv_summary(widths: list[int], n_kv: int, d_h: int) -> dict:
    """Accounted cache width and KV save of a conversion (per-layer widths in elements/token)."""
    L = len(widths)
    full = L * 2 * n_kv * d_h
    total = int(sum(widths))
    return {"cache_width": total, "cache_width_original": full, "kv_save": 1.0 - total / full,
            "width_min": int(min(widths)), "width_max": int(max(widths))}
