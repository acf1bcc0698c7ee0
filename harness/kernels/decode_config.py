"""Launch configurations of the fused latent-decode kernel: what can be chosen, the default rule,
and the table of configurations tuned on real GPUs.

Every field of `DecodeConfig` changes speed only, never the result (the kernel's parity tests run
each option). Which configuration a call uses, first match wins:
  1. the `config=` argument of `latent_decode_triton`;
  2. one tuned in this process (`tune_decode`, or automatically on the first eager call of a new
     shape while tuning is on: `decode_tuning()` or MLA_DECODE_TUNE=1; never inside a CUDA-graph
     capture, which replays whatever the eager warm-up steps chose);
  3. the shipped table `decode_tuned.json` (written by `python -m harness.bench --suite kernel
     --save-tuned`): an entry for this GPU model and per-layer shape, the nearest (batch, context);
  4. `default_config`: the rule below.

Why these knobs (the kernel reads the latent cache once; its speed is bytes read per second):
  * splits: grid = head groups x batch x splits programs, one program per SM at a time (the tile
    and accumulator fill an SM). 272 programs on 132 SMs run in three waves, the last one nearly
    empty (a third of the time at 2/3 of the SMs idle): `wave_splits` rounds the split count so the
    programs fill whole waves.
  * block_n / num_stages: tokens per loop step and how many steps of latent loads are in flight
    (software pipelining): the bytes in flight per SM that hide memory latency.
  * split_dl: the latent width as two power-of-two blocks (384 = 256 + 128) instead of one padded
    512 block: a quarter fewer tensor-core FLOPs and accumulator registers for nothing.
  * block_h: heads per program. All heads (default) read each latent tile once; 16 heads splits a
    layer's 32 heads over two programs that read the same tile (the second mostly from L2) with half
    the accumulator registers each.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from harness.errors import HarnessError
from harness.paths import atomic_write_text

TUNED_FILE = Path(__file__).with_name("decode_tuned.json")


@dataclass(frozen=True)
class DecodeConfig:
    """How the split kernel is launched (speed only; the result does not depend on it)."""
    block_n: int = 32  # cached tokens per loop step
    num_warps: int = 8
    num_stages: int = 2  # loop steps whose latent loads are in flight at once
    block_h: int | None = None  # query heads per program; None: all of the layer's heads
    split_dl: bool = True  # latent width as two power-of-two blocks rather than one padded block
    num_splits: int | None = None  # context splits per batch row; None: `wave_splits`
    waves: float = 2.0  # wave rule: about waves x SMs programs, rounded to fill whole waves
    min_split_tokens: int = 256  # no split shorter (its partial output is H x DV fp32)

    def __post_init__(self):
        pow2 = lambda n: n > 0 and n & (n - 1) == 0  # noqa: E731
        bad = []
        if self.block_n not in (16, 32, 64, 128):
            bad.append(f"block_n {self.block_n} (16, 32, 64 or 128)")
        if self.num_warps not in (1, 2, 4, 8, 16):
            bad.append(f"num_warps {self.num_warps} (1, 2, 4, 8 or 16)")
        if not 1 <= self.num_stages <= 6:
            bad.append(f"num_stages {self.num_stages} (1 to 6)")
        if self.block_h is not None and (self.block_h < 16 or not pow2(self.block_h)):
            bad.append(f"block_h {self.block_h} (a power of two >= 16, or None)")
        if self.num_splits is not None and self.num_splits < 1:
            bad.append(f"num_splits {self.num_splits} (>= 1 or None)")
        if not self.waves > 0 or self.min_split_tokens < 1:
            bad.append(f"waves {self.waves} / min_split_tokens {self.min_split_tokens} (both > 0)")
        if bad:
            raise HarnessError("DecodeConfig: bad " + "; ".join(bad))

    def name(self) -> str:
        """Short label for tables: only the fields that differ from the defaults."""
        d = DecodeConfig()
        parts = [f"{f.name}={getattr(self, f.name)}" for f in fields(self) if getattr(self, f.name) != getattr(d, f.name)]
        return ",".join(parts) or "default"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DecodeConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise HarnessError(f"DecodeConfig: unknown fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


@functools.lru_cache(maxsize=4096)  # called per layer per eager step: keep it off the host's critical path
def wave_splits(B: int, S: int, sms: int, head_groups: int = 1, waves: float = 2.0,
                min_tokens: int = 256) -> int:
    """Context splits per batch row so that B x head_groups x splits programs fill whole waves of
    `sms` programs: near waves x sms programs, at most S / min_tokens splits.

    Among split counts from half to twice the target, the best wave fill (programs / slots of the
    waves they occupy) wins, within 5 points of it the count nearest the target. B=16 on 132 SMs:
    16 splits (256 programs, 97% of two waves), not 17 (272: three waves, 69%).
    """
    cap = max(1, -(-S // max(1, min_tokens)))
    per = max(1, B * head_groups)
    target = max(1.0, waves * sms / per)
    lo, hi = max(1, math.floor(target / 2)), min(cap, math.ceil(2 * target))
    if hi < lo:
        return cap
    fill = {s: per * s / (math.ceil(per * s / sms) * sms) for s in range(lo, hi + 1)}
    best = max(fill.values())
    return min((s for s in fill if fill[s] >= best - 0.05), key=lambda s: (abs(s - target), s))


def default_config(dtype_bytes: int, block_h: int, block_d: int) -> DecodeConfig:
    """The rule when nothing was tuned: 8 warps for wide tiles (heads x latent >= 16k elements),
    32-token steps for 2-byte caches whose tiles fit the register budget, else 16."""
    wide = block_h * block_d
    return DecodeConfig(block_n=32 if (dtype_bytes <= 2 and wide <= 16384) else 16,
                        num_warps=8 if wide >= 16384 else 4, num_stages=2)


# ----------------------------------------------------------------------------- shape keys and tables
@dataclass(frozen=True)
class ShapeKey:
    """What a tuned configuration is for: the GPU model, the per-layer shape, batch and context."""
    device: str
    dtype: str
    H: int
    DL: int
    DV: int
    DRF: int  # RoPE columns of the cache row (n_kv x DR)
    shared: bool
    B: int
    S: int

    def family(self) -> tuple:
        return (self.device, self.dtype, self.H, self.DL, self.DV, self.DRF, self.shared)

    def distance(self, other: "ShapeKey") -> float:
        return abs(math.log2(self.B / other.B)) + abs(math.log2(max(self.S, 1) / max(other.S, 1)))


_TUNED: dict[ShapeKey, DecodeConfig] = {}  # this process: tune_decode / automatic tuning
_SHIPPED: dict[tuple, list[tuple[ShapeKey, DecodeConfig]]] | None = None  # decode_tuned.json, by family
_TUNING = [os.environ.get("MLA_DECODE_TUNE", "0") == "1"]


def _load_shipped(path: Path | None = None) -> dict:
    path = path or TUNED_FILE
    table: dict[tuple, list] = {}
    if not path.exists():
        return table
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise HarnessError(f"{path} is not valid JSON ({e}); restore it from git or delete it") from e
    for r in rows:
        k = ShapeKey(**r["shape"])
        table.setdefault(k.family(), []).append((k, DecodeConfig.from_dict(r["config"])))
    return table


def tuned_config(key: ShapeKey) -> DecodeConfig | None:
    """A configuration tuned for this shape: in this process exactly, else the shipped table's
    entry for this GPU model and layer shape at the nearest (batch, context); None when neither."""
    global _SHIPPED
    if key in _TUNED:
        return _TUNED[key]
    if _SHIPPED is None:
        _SHIPPED = _load_shipped()
    near = _SHIPPED.get(key.family())
    return min(near, key=lambda kc: kc[0].distance(key))[1] if near else None


def record_tuned(key: ShapeKey, config: DecodeConfig) -> None:
    _TUNED[key] = config


def save_tuned(entries: list[dict], path: Path | None = None) -> None:
    """Merge {"shape": ShapeKey fields, "config": DecodeConfig fields, ...} rows into the shipped
    table (an entry for the same shape is replaced), atomically."""
    global _SHIPPED
    path = path or TUNED_FILE
    old = json.loads(path.read_text()) if path.exists() else []
    new_keys = {json.dumps(e["shape"], sort_keys=True) for e in entries}
    rows = [r for r in old if json.dumps(r["shape"], sort_keys=True) not in new_keys] + entries
    rows.sort(key=lambda r: (r["shape"]["device"], r["shape"]["DL"], r["shape"]["B"], r["shape"]["S"]))
    atomic_write_text(path, json.dumps(rows, indent=1) + "\n")
    _SHIPPED = None  # reload on next lookup


def tuning_enabled() -> bool:
    return _TUNING[-1]


@contextlib.contextmanager
def decode_tuning(on: bool = True):
    """While on, the first eager kernel call of a shape with no tuned configuration times the
    candidates on its own inputs (the kernel only reads them) and keeps the fastest."""
    _TUNING.append(bool(on))
    try:
        yield
    finally:
        _TUNING.pop()


# ----------------------------------------------------------------------------- candidates
SEARCH_AXES: list[tuple[str, list[dict]]] = [
    # The search, one axis at a time, the best so far carried to the next axis: ~20 configurations
    # per shape instead of the ~150 of the full product. block_n x num_stages (shared memory per
    # stage) interact, so they are searched together.
    ("latent blocks", [{"split_dl": True}, {"split_dl": False}]),
    ("tokens per step x stages", [{"block_n": n, "num_stages": st} for n, st in
                                  ((16, 2), (32, 1), (32, 2), (32, 3), (32, 4), (64, 2), (64, 3))]),
    ("warps", [{"num_warps": 4}, {"num_warps": 8}]),
    ("heads per program", [{"block_h": None}, {"block_h": 16}]),
    ("splits", [{"waves": w, "min_split_tokens": m} for w, m in ((1, 256), (2, 256), (4, 256), (8, 128), (2, 512))]),
]


def axis_candidates(best: DecodeConfig, overrides: list[dict], H: int) -> list[DecodeConfig]:
    """The axis's configurations around `best` (block_h below the head count only where it splits them)."""
    out = [replace(best, **o) for o in overrides if o.get("block_h") is None or o["block_h"] < H]
    return list(dict.fromkeys(out))


def quick_candidates(base: DecodeConfig, H: int) -> list[DecodeConfig]:
    """A few configurations for automatic tuning at run time (every one costs a compile once)."""
    out = [base, replace(base, num_stages=3), replace(base, block_n=64, num_stages=2),
           replace(base, num_stages=3, waves=4), replace(base, num_warps=4)]
    if H > 16:
        out.append(replace(base, block_h=16))
    return list(dict.fromkeys(out))
