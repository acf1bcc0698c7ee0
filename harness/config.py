"""Sweep and job configs: YAML validated into dataclasses before any compute.

A sweep file (see sweeps/quick.yaml) expands to the grid
    models x calibration x budgets x methods (x heal), plus one unconverted baseline per model.
Every problem in a file is reported at once, each with its YAML key path and line.
A job's identity is a hash of its resolved config, so the same job in another sweep file or
a rerun is recognised as done.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from harness.errors import HarnessError


@dataclass(frozen=True)
class CalibConfig:
    corpus: str = "wiki"  # calibration corpus (mla-harness corpora)
    samples: int = 64  # number of windows
    seq_len: int = 256  # tokens per window
    seed: int = 0


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


@dataclass(frozen=True)
class HealConfig:
    mode: str = "none"  # none | lora | full (healing lands with harness.heal)
    tokens: int = 0


@dataclass(frozen=True)
class PplConfig:
    domains: tuple = ("wiki", "code")
    samples: int = 32
    seq_len: int = 256
    seed: int = 1
    batch_size: int = 8


@dataclass(frozen=True)
class EvalConfig:
    ppl: PplConfig = PplConfig()
    tasks: tuple = ()  # lm-eval task or group names (tasks/), e.g. [mla_core]
    limit: float | None = None  # lm-eval --limit (docs per task, or a fraction)
    num_fewshot: int | None = None
    batch_size: int = 8


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
        blob = json.dumps(asdict(self), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def is_baseline(self) -> bool:
        return self.method is None

    def describe(self) -> str:
        if self.is_baseline:
            return f"{self.model} baseline"
        b = f"kv_save={self.budget.kv_save}" if self.budget.kv_save is not None else f"rank={self.budget.rank}"
        return f"{self.model} {self.method.display} {b} calib={self.calib.corpus}"


@dataclass
class SweepConfig:
    name: str
    jobs: list[JobConfig]
    executor: str = "serial"
    wandb: bool = True
    source: str = ""


# ----------------------------------------------------------------------------------- parsing
def _lines(text: str) -> dict[tuple, int]:
    """Line number (1-based) of every mapping key / sequence item, by key path."""
    out: dict[tuple, int] = {}

    def walk(node, path):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                p = path + (k.value,)
                out[p] = k.start_mark.line + 1
                walk(v, p)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                out[path + (i,)] = v.start_mark.line + 1
                walk(v, path + (i,))

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return out
    if root is not None:
        walk(root, ())
    return out


class _Problems:
    def __init__(self, source: str, lines: dict):
        self.source, self.lines, self.items = source, lines, []

    def add(self, path: tuple, msg: str):
        line = None
        for k in range(len(path), 0, -1):
            if path[:k] in self.lines:
                line = self.lines[path[:k]]
                break
        key = ".".join(str(p) for p in path) or "(top)"
        where = f"{self.source}:{line}" if line else self.source
        self.items.append(f"{where}: {key}: {msg}")

    def raise_if_any(self):
        if self.items:
            head = f"{len(self.items)} problem(s) in {self.source}:" if len(self.items) > 1 else ""
            raise HarnessError((head + "\n  " if head else "") + "\n  ".join(self.items))


def _typed(cls, data, path, probs: _Problems):
    """Build dataclass `cls` from a dict, reporting unknown keys and wrong types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        probs.add(path, f"expected a mapping with keys {', '.join(cls.__dataclass_fields__)}, got {type(data).__name__}")
        return None
    known = cls.__dataclass_fields__
    kwargs = {}
    for k, v in data.items():
        if k not in known:
            import difflib

            close = difflib.get_close_matches(str(k), list(known), n=1)
            probs.add(path + (k,), f"unknown key{f' (did you mean {close[0]!r}?)' if close else ''}; "
                                   f"known: {', '.join(known)}")
            continue
        kwargs[k] = v
    try:
        obj = cls(**kwargs)
    except TypeError as e:
        probs.add(path, str(e))
        return None
    # light type checks on scalar fields
    for k, f in known.items():
        v = getattr(obj, k)
        t = str(f.type)
        if v is None:
            continue
        if t.startswith("int") and (not isinstance(v, int) or isinstance(v, bool)):
            probs.add(path + (k,), f"expected an integer, got {v!r}")
        elif t.startswith("float") and not isinstance(v, (int, float)):
            probs.add(path + (k,), f"expected a number, got {v!r}")
        elif t == "str" and not isinstance(v, str):
            probs.add(path + (k,), f"expected a string, got {v!r}")
    return obj


TOP_KEYS = ("name", "models", "calibration", "budgets", "methods", "baseline", "heal", "eval",
            "executor", "wandb", "device", "dtype")


def load_sweep(path: str | Path) -> SweepConfig:
    """Read and validate a sweep YAML; raise one HarnessError listing every problem."""
    path = Path(path)
    if not path.exists():
        raise HarnessError(f"sweep file {path} does not exist; see sweeps/ for examples")
    text = path.read_text()
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise HarnessError(f"{where}: not valid YAML ({getattr(e, 'problem', e)}); fix the syntax") from None
    return parse_sweep(raw, source=str(path), lines=_lines(text))


def parse_sweep(raw, source: str = "<sweep>", lines: dict | None = None) -> SweepConfig:
    from harness.methods import METHODS
    from harness.models import EMBEDDED

    probs = _Problems(source, lines or {})
    if not isinstance(raw, dict):
        raise HarnessError(f"{source}: a sweep file is a mapping with keys {', '.join(TOP_KEYS)}")
    for k in raw:
        if k not in TOP_KEYS:
            probs.add((k,), f"unknown key; known: {', '.join(TOP_KEYS)}")
    name = raw.get("name") or Path(source).stem
    models = raw.get("models") or []
    if isinstance(models, str):
        models = [models]
    if not models:
        probs.add(("models",), "give at least one model (e.g. [smollm2-135m])")
    for i, m in enumerate(models):
        if not isinstance(m, str):
            probs.add(("models", i), f"expected a model name/path, got {m!r}")
        elif m not in EMBEDDED and not (Path(m).expanduser().exists() or m.count("/") == 1):
            probs.add(("models", i), f"'{m}' is not an embedded model ({', '.join(EMBEDDED)}), a path or a hub id")

    calibs = [_typed(CalibConfig, c, ("calibration", i), probs) for i, c in enumerate(raw.get("calibration") or [{}])]
    budgets = []
    for i, b in enumerate(raw.get("budgets") or []):
        bc = _typed(BudgetConfig, b, ("budgets", i), probs)
        if bc is None:
            continue
        if (bc.kv_save is None) == (bc.rank is None):
            probs.add(("budgets", i), "give exactly one of kv_save or rank")
        elif bc.kv_save is not None and not (isinstance(bc.kv_save, (int, float)) and 0 <= bc.kv_save < 1):
            probs.add(("budgets", i, "kv_save"), f"{bc.kv_save!r} is outside [0, 1)")
        elif bc.rank is not None and (not isinstance(bc.rank, int) or bc.rank < 1):
            probs.add(("budgets", i, "rank"), f"{bc.rank!r} must be an integer >= 1")
        budgets.append(bc)
    methods = []
    for i, m in enumerate(raw.get("methods") or []):
        if isinstance(m, str):
            m = {"name": m}
        mc = _typed(MethodConfig, m, ("methods", i), probs)
        if mc is None:
            continue
        if mc.name not in METHODS:
            import difflib

            close = difflib.get_close_matches(str(mc.name), list(METHODS), n=1)
            probs.add(("methods", i, "name"), f"unknown method {mc.name!r}; known: {', '.join(sorted(METHODS))}"
                      + (f" (did you mean {close[0]!r}?)" if close else ""))
        else:
            known = METHODS[mc.name].options
            for k in mc.options or {}:
                if k not in known:
                    probs.add(("methods", i, "options", k), f"method {mc.name!r} has no option {k!r}; "
                              f"options: {', '.join(known) or '(none)'}")
        methods.append(MethodConfig(name=mc.name, label=mc.label, options=dict(mc.options or {})))
    if methods and not budgets:
        probs.add(("budgets",), "methods need at least one budget (e.g. - {kv_save: 0.5})")
    heals = raw.get("heal") or [{"mode": "none"}]
    if isinstance(heals, dict):
        heals = [heals]
    heal_cfgs = [_typed(HealConfig, h, ("heal", i), probs) for i, h in enumerate(heals)]
    for i, h in enumerate(heal_cfgs):
        if h is not None and h.mode != "none":
            probs.add(("heal", i, "mode"), f"heal mode {h.mode!r} is not available yet; use none")
    ev = raw.get("eval") or {}
    ppl = _typed(PplConfig, ev.get("ppl") if isinstance(ev, dict) else None, ("eval", "ppl"), probs)
    if isinstance(ev, dict):
        ev_rest = {k: v for k, v in ev.items() if k != "ppl"}
        evc = _typed(EvalConfig, ev_rest, ("eval",), probs)
    else:
        probs.add(("eval",), "expected a mapping")
        evc = None
    if ppl is not None:
        from harness.data import CORPORA

        for j, d in enumerate(ppl.domains):
            if d not in CORPORA:
                probs.add(("eval", "ppl", "domains", j), f"unknown corpus {d!r}; known: {', '.join(sorted(CORPORA))}")
    for i, c in enumerate(calibs):
        if c is not None:
            from harness.data import CORPORA

            if c.corpus not in CORPORA:
                probs.add(("calibration", i, "corpus"), f"unknown corpus {c.corpus!r}; known: {', '.join(sorted(CORPORA))}")
    executor = raw.get("executor", "serial")
    if executor not in ("serial",):
        probs.add(("executor",), f"unknown executor {executor!r}; available: serial")
    probs.raise_if_any()

    evc = EvalConfig(ppl=PplConfig(**{**asdict(ppl), "domains": tuple(ppl.domains)}),
                     tasks=tuple(evc.tasks or ()), limit=evc.limit, num_fewshot=evc.num_fewshot,
                     batch_size=evc.batch_size)
    dev, dt = raw.get("device"), raw.get("dtype")
    jobs: list[JobConfig] = []
    for model in models:
        if raw.get("baseline", True):
            jobs.append(JobConfig(model=model, method=None, calib=None, budget=None, eval=evc, device=dev, dtype=dt))
        for c in calibs:
            for b in budgets:
                for m in methods:
                    for h in heal_cfgs:
                        jobs.append(JobConfig(model=model, method=m, calib=c, budget=b, heal=h, eval=evc,
                                              device=dev, dtype=dt))
    return SweepConfig(name=name, jobs=jobs, executor=executor, wandb=bool(raw.get("wandb", True)), source=source)
