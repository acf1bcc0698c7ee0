"""What a job is: the dataclasses of a calibration, a method, a budget, healing, evaluation, a job, a sweep.

These are plain frozen dataclasses at the bottom of the package (like litgpt's `args.py`): the
training loop, the sweep runner and the CLI all take them, and none of them imports a registry.
Each field's trailing comment is its documentation: `field_help(cls)` reads it, so the YAML key,
the dataclass field, the `mla-harness heal --<flag>` and its help text are one declaration.

`check_fields(obj)` checks what a field can say about itself (type, range, choices); whether a
corpus, method or executor name exists is checked one layer up (`harness.config`), where the
registries are. A job's identity is a hash of its fields (`JobConfig.job_id`).
"""
from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import json
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from typing import ClassVar

from harness.options import Range

# ------------------------------------------------------------------------------------ helpers


@functools.lru_cache(maxsize=None)
def field_help(cls) -> dict[str, str]:
    """{field: the comment at the end of its declaration line} for a dataclass defined in a file."""
    source = inspect.getsource(cls)
    lines = source.splitlines()
    out = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            line = lines[node.end_lineno - 1]
            code, hash_, comment = line.partition("  # ")
            if hash_:
                out[node.target.id] = comment.strip()
    return out


def _type_problem(hint, v) -> str | None:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType")):
        args = typing.get_args(hint)
        if v is None and type(None) in args:
            return None
        problems = [_type_problem(a, v) for a in args if a is not type(None)]
        return None if any(p is None for p in problems) else problems[0]
    if hint is int:
        return None if isinstance(v, int) and not isinstance(v, bool) else f"expected an integer, got {v!r}"
    if hint is float:
        return None if isinstance(v, (int, float)) and not isinstance(v, bool) else f"expected a number, got {v!r}"
    if hint is str:
        return None if isinstance(v, str) else f"expected a string, got {v!r}"
    if hint is bool:
        return None if isinstance(v, bool) else f"expected true or false, got {v!r}"
    if origin is tuple or hint is tuple:
        if not isinstance(v, (tuple, list)):
            return f"expected a list, got {v!r}"
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        for item in v:
            p = _type_problem(args[0], item) if args else None
            if p:
                return f"in {list(v)!r}: {p}"
        return None
    if origin is dict or hint is dict:
        return None if isinstance(v, dict) else f"expected a mapping, got {v!r}"
    return None


def check_fields(obj) -> list[tuple[str, str]]:
    """Every problem a dataclass instance can see in itself: types, LIMITS ranges, CHOICES."""
    hints = typing.get_type_hints(type(obj))
    limits = getattr(obj, "LIMITS", {})
    choices = getattr(obj, "CHOICES", {})
    out = []
    for f in fields(obj):
        v = getattr(obj, f.name)
        p = _type_problem(hints[f.name], v)
        if p:
            out.append((f.name, p))
            continue
        if f.name in choices and v not in choices[f.name]:
            out.append((f.name, f"{v!r} is not one of {', '.join(map(str, choices[f.name]))}"))
        elif f.name in limits and isinstance(v, (int, float)) and not isinstance(v, bool):
            p = limits[f.name].problem(v)
            if p:
                out.append((f.name, p))
    return out


def tokens_text(t: int) -> str:
    return f"{t / 1e6:g}M" if t >= 1_000_000 else f"{t / 1e3:g}k" if t >= 1000 else str(t)


# ------------------------------------------------------------------------------- the specs
@dataclass(frozen=True)
class CalibConfig:
    corpus: str = "wiki"  # calibration corpus (mla-harness corpora)
    samples: int = 64  # number of windows
    seq_len: int = 256  # tokens per window
    seed: int = 0  # shuffles the corpus's calib split before windows are cut

    LIMITS: ClassVar[dict] = {"samples": Range(min=1), "seq_len": Range(min=2), "seed": Range(min=0)}


@dataclass(frozen=True)
class MethodConfig:
    name: str  # registered method (mla-harness methods)
    label: str = ""  # name shown in tables; default: name + options
    options: dict = field(default_factory=dict)  # the method's keyword options

    @property
    def display(self) -> str:
        if self.label:
            return self.label
        if not self.options:
            return self.name
        return self.name + "(" + ",".join(f"{k}={v}" for k, v in sorted(self.options.items())) + ")"


@dataclass(frozen=True)
class BudgetConfig:
    kv_save: float | None = None  # fraction of the KV cache saved
    rank: int | None = None  # or an explicit rank per K and per V

    LIMITS: ClassVar[dict] = {"kv_save": Range(min=0, max=1, open_max=True), "rank": Range(min=1)}

    def problems(self) -> list[tuple[str, str]]:
        if (self.kv_save is None) == (self.rank is None):
            return [("", "give exactly one of kv_save or rank")]
        return check_fields(self)


# ------------------------------------------------------------------------------- healing
HEAL_MODES = ("none", "lora", "full")
HEAL_SCHEDULES = ("cosine", "wsd")
MLA_TARGETS = ("down", "up_k", "up_v", "k_rope_proj")  # the MLA module's new projections
HEAL_TARGETS = MLA_TARGETS + ("q_proj", "o_proj")  # LoRA may also adapt the original q/o
FULL_TARGETS = ("all", "attention")  # full fine-tuning: every parameter, or attention modules only


@dataclass(frozen=True)
class HealConfig:
    """Healing after conversion: the sweep's `heal:` mapping, `harness.heal.heal`'s spec and the
    flags of `mla-harness heal` (same names; the comments are the flags' help)."""

    mode: str = "none"  # none | lora | full
    tokens: int = 0  # training-token budget, e.g. 300k (whole optimizer steps, never more)
    label: str = ""  # name shown in tables; default: mode and tokens ("lora-300k")
    lr: float = 1e-3  # peak learning rate (LoRA ~1e-3; full fine-tuning ~1e-4)
    lora_rank: int = 16  # LoRA rank
    lora_alpha: float = 32.0  # LoRA alpha (the update is scaled by alpha / rank)
    lora_dropout: float = 0.0  # LoRA dropout
    targets: tuple[str, ...] = MLA_TARGETS  # lora: of down, up_k, up_v, k_rope_proj, q_proj, o_proj; full: all | attention
    kd_weight: float = 0.0  # loss = CE + kd_weight * T^2 * KL(original || healed); 0: plain CE
    kd_temperature: float = 1.0  # distillation temperature T
    schedule: str = "cosine"  # cosine (warmup + cosine to 0) | wsd (warmup, constant, 1-sqrt decay; MHA2MLA)
    warmup_frac: float = 0.05  # share of optimizer steps spent warming up
    decay_frac: float = 0.2  # wsd: share of optimizer steps in the final 1-sqrt decay
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping norm (0: off)
    batch_size: int = 8  # windows per micro-batch
    seq_len: int = 256  # tokens per training window
    grad_accum: int = 1  # micro-batches per optimizer step
    corpora: tuple[str, ...] = ("wiki",)  # training mix: the calib split of each corpus, packed into windows
    weights: tuple[float, ...] = ()  # token share of each of corpora (empty: equal shares)
    seed: int = 0  # data order, LoRA init and dropout
    eval_every_tokens: tuple[int, ...] = ()  # token counts at which to measure the recovery curve, e.g. 0,5M,20M
    curve_tasks: bool = False  # the curve also scores the job's lm-eval tasks at each mark (not only perplexity)

    CHOICES: ClassVar[dict] = {"mode": HEAL_MODES, "schedule": HEAL_SCHEDULES}
    LIMITS: ClassVar[dict] = {
        **{k: Range(min=1) for k in ("tokens", "batch_size", "seq_len", "grad_accum", "lora_rank")},
        **{k: Range(min=0, open_min=True) for k in ("lr", "lora_alpha", "kd_temperature")},
        **{k: Range(min=0, max=1, open_max=True) for k in ("lora_dropout", "warmup_frac", "decay_frac")},
        **{k: Range(min=0) for k in ("kd_weight", "weight_decay", "max_grad_norm", "seed")},
    }

    @property
    def display(self) -> str:
        if self.label or self.mode == "none":
            return self.label or "none"
        return f"{self.mode}-{tokens_text(self.tokens)}"

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len

    def problems(self) -> list[tuple[str, str]]:
        """Every problem of this healing config as (field, message); corpus names are checked above."""
        if self.mode not in HEAL_MODES:
            return [("mode", f"unknown heal mode {self.mode!r}; use one of {', '.join(HEAL_MODES)}")]
        if self.mode == "none":
            return []
        out = check_fields(self)
        known = HEAL_TARGETS if self.mode == "lora" else FULL_TARGETS
        bad = [t for t in self.targets if t not in known]
        if not self.targets or bad:
            out.append(("targets", f"{bad or list(self.targets)!r} for mode {self.mode}: use "
                                   + ("a list of " + ", ".join(known) if self.mode == "lora" else "all or attention")))
        elif self.mode == "full" and len(self.targets) != 1:
            out.append(("targets", f"{list(self.targets)!r}: full fine-tuning takes one of all, attention"))
        if not self.corpora:
            out.append(("corpora", "give at least one training corpus (e.g. [wiki])"))
        if self.weights and (len(self.weights) != len(self.corpora)
                             or any(not isinstance(w, (int, float)) or w <= 0 for w in self.weights)):
            out.append(("weights", f"{list(self.weights)!r}: give one share > 0 per corpus of {list(self.corpora)}"))
        if any(isinstance(t, int) and t < 0 for t in self.eval_every_tokens):
            out.append(("eval_every_tokens", f"{list(self.eval_every_tokens)!r} must be token counts >= 0"))
        elif isinstance(self.tokens, int) and any(isinstance(t, int) and t > self.tokens
                                                  for t in self.eval_every_tokens):
            out.append(("eval_every_tokens", f"{list(self.eval_every_tokens)!r} goes past the budget "
                                             f"tokens={self.tokens}"))
        return out


def heal_config(raw: dict | None = None, **overrides) -> HealConfig:
    """A HealConfig with list fields made tuples (hashable, stable job ids); `none` is canonical."""
    d = {**(raw or {}), **overrides}
    for k in ("targets", "corpora"):
        if isinstance(d.get(k), str):
            d[k] = (d[k],)
    for k in ("targets", "corpora", "eval_every_tokens", "weights"):
        if isinstance(d.get(k), list):
            d[k] = tuple(d[k])
    h = HealConfig(**d)
    if h.mode == "none":  # every "none" is the same job, whatever else it says
        return HealConfig()
    if h.mode == "full" and h.targets == MLA_TARGETS:
        h = replace(h, targets=("all",))
    return h


# ------------------------------------------------------------------------------- evaluation
@dataclass(frozen=True)
class PplConfig:
    domains: tuple[str, ...] = ("wiki", "code")  # corpora scored on their eval split
    samples: int = 32  # windows per domain
    seq_len: int = 256  # tokens per window
    seed: int = 1  # shuffles the eval split before windows are cut
    batch_size: int = 8  # windows per forward pass

    LIMITS: ClassVar[dict] = {"samples": Range(min=1), "seq_len": Range(min=2), "seed": Range(min=0),
                              "batch_size": Range(min=1)}


@dataclass(frozen=True)
class EvalConfig:
    ppl: PplConfig = PplConfig()  # perplexity per domain
    tasks: tuple[str, ...] = ()  # lm-eval task or group names (tasks/), e.g. [mla_core]
    limit: float | None = None  # lm-eval --limit: documents per task (an integer), or a fraction < 1
    num_fewshot: int | None = None  # few-shot examples per prompt (None: each task's default)
    batch_size: int = 8  # lm-eval sequences per forward pass

    LIMITS: ClassVar[dict] = {"limit": Range(min=0, open_min=True), "num_fewshot": Range(min=0),
                              "batch_size": Range(min=1)}

    def problems(self) -> list[tuple[str, str]]:
        out = check_fields(self)
        if isinstance(self.limit, float) and not self.limit.is_integer() and self.limit > 1:
            out.append(("limit", f"{self.limit!r}: give a whole number of documents, or a fraction below 1"))
        return out


# ------------------------------------------------------------------------------- jobs and sweeps
@dataclass(frozen=True)
class JobConfig:
    """One unit of work; `job_id` hashes everything that changes its result."""

    model: str
    method: MethodConfig | None  # None: the unconverted baseline
    calib: CalibConfig | None
    budget: BudgetConfig | None
    heal: HealConfig = HealConfig()
    eval: EvalConfig = EvalConfig()
    device: str | None = None
    dtype: str | None = None

    @property
    def job_id(self) -> str:
        d = asdict(self)
        if self.heal.mode == "none":  # ids from before healing existed stay valid
            d["heal"] = {"mode": "none", "tokens": 0}
        blob = json.dumps(d, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def is_baseline(self) -> bool:
        return self.method is None

    def describe(self) -> str:
        heal = f" heal={self.heal.display}" if self.heal.mode != "none" else ""
        if self.is_baseline:
            return f"{self.model} baseline{heal}"
        b = f"kv_save={self.budget.kv_save}" if self.budget.kv_save is not None else f"rank={self.budget.rank}"
        return f"{self.model} {self.method.display} {b} calib={self.calib.corpus}{heal}"


@dataclass
class SweepConfig:
    name: str
    jobs: list[JobConfig]
    executor: str = "serial"  # serial | ray | submitit (harness.executors)
    wandb: bool = True
    source: str = ""
    executor_options: dict = field(default_factory=dict)  # the executor's keyword options
