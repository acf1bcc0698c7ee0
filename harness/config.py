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


# ------------------------------------------------------------------ healing (harness.heal)
HEAL_MODES = ("none", "lora", "full")
HEAL_SCHEDULES = ("cosine", "wsd")
MLA_TARGETS = ("down", "up_k", "up_v", "k_rope_proj")  # the MLA module's new projections
HEAL_TARGETS = MLA_TARGETS + ("q_proj", "o_proj")  # LoRA may also adapt the original q/o
FULL_TARGETS = ("all", "attention")  # full fine-tuning: every parameter, or attention modules only


@dataclass(frozen=True)
class HealConfig:
    """Healing after conversion (`heal:` in a sweep; `harness.heal.HealSpec` is this class).

    The sweep key, the field and the `python -m harness.heal` flag share one name.
    """

    mode: str = "none"  # none | lora | full
    tokens: int = 0  # training-token budget (input tokens; whole optimizer steps, never more)
    label: str = ""  # name shown in tables; default: mode and tokens ("lora-300k")
    lr: float = 1e-3  # peak learning rate (LoRA ~1e-3; full fine-tuning ~1e-4)
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    targets: tuple = MLA_TARGETS  # lora: module names (of HEAL_TARGETS); full: all | attention
    kd_weight: float = 0.0  # loss = CE + kd_weight * T^2 * KL(teacher || student), teacher = original model
    kd_temperature: float = 1.0
    schedule: str = "cosine"  # cosine (warmup + cosine to 0) | wsd (warmup, constant, 1-sqrt decay; MHA2MLA)
    warmup_frac: float = 0.05  # share of optimizer steps spent warming up
    decay_frac: float = 0.2  # wsd: share of optimizer steps in the final 1-sqrt decay
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # gradient clipping (0: off)
    batch_size: int = 8  # windows per micro-batch
    seq_len: int = 256
    grad_accum: int = 1  # micro-batches per optimizer step
    corpora: tuple = ("wiki",)  # training mix: equal shares of each corpus's calib split
    seed: int = 0
    eval_every_tokens: tuple = ()  # token counts at which to measure perplexity (the healing curve)

    @property
    def display(self) -> str:
        if self.label or self.mode == "none":
            return self.label or "none"
        t = self.tokens
        size = f"{t / 1e6:g}M" if t >= 1_000_000 else f"{t / 1e3:g}k" if t >= 1000 else str(t)
        return f"{self.mode}-{size}"

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len


def _names(v) -> list:
    return [v] if isinstance(v, str) else list(v) if isinstance(v, (list, tuple)) else [repr(v)]


def check_heal(h: HealConfig) -> list[tuple[str, str]]:
    """Every problem of a heal config as (key, message); empty when it is valid."""
    if h.mode not in HEAL_MODES:
        return [("mode", f"unknown heal mode {h.mode!r}; use one of {', '.join(HEAL_MODES)}")]
    if h.mode == "none":
        return []
    out = []

    def positive(key, integer):
        v = getattr(h, key)
        ok = isinstance(v, int) and not isinstance(v, bool) if integer else isinstance(v, (int, float))
        if not ok or v <= 0:
            out.append((key, f"{v!r} must be a positive {'integer' if integer else 'number'}"))

    for k in ("tokens", "batch_size", "seq_len", "grad_accum", "lora_rank"):
        positive(k, True)
    for k in ("lr", "lora_alpha", "kd_temperature"):
        positive(k, False)
    for k in ("lora_dropout", "warmup_frac", "decay_frac"):
        v = getattr(h, k)
        if not isinstance(v, (int, float)) or not 0 <= v < 1:
            out.append((k, f"{v!r} must be in [0, 1)"))
    for k in ("kd_weight", "weight_decay", "max_grad_norm"):
        v = getattr(h, k)
        if not isinstance(v, (int, float)) or v < 0:
            out.append((k, f"{v!r} must be a number >= 0"))
    if h.schedule not in HEAL_SCHEDULES:
        out.append(("schedule", f"unknown schedule {h.schedule!r}; use one of {', '.join(HEAL_SCHEDULES)}"))
    targets = _names(h.targets)
    known = HEAL_TARGETS if h.mode == "lora" else FULL_TARGETS
    bad = [t for t in targets if t not in known]
    if not targets or bad:
        out.append(("targets", f"{bad or targets!r} for mode {h.mode}: use "
                               + ("a list of " + ", ".join(known) if h.mode == "lora" else "all or attention")))
    elif h.mode == "full" and len(targets) != 1:
        out.append(("targets", f"{targets!r}: full fine-tuning takes one of all, attention"))
    from harness.data import check_corpus

    corpora = _names(h.corpora)
    if not corpora:
        out.append(("corpora", "give at least one training corpus (e.g. [wiki])"))
    for c in corpora:
        problem = check_corpus(c)
        if problem:
            out.append(("corpora", problem))
    marks = list(h.eval_every_tokens) if isinstance(h.eval_every_tokens, (list, tuple)) else [h.eval_every_tokens]
    if any(not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in marks):
        out.append(("eval_every_tokens", f"{marks!r} must be a list of token counts >= 0"))
    elif isinstance(h.tokens, int) and any(t > h.tokens for t in marks):
        out.append(("eval_every_tokens", f"{marks!r} goes past the budget tokens={h.tokens}"))
    return out


HEAL_FLOAT_KEYS = ("lr", "lora_alpha", "lora_dropout", "kd_weight", "kd_temperature", "warmup_frac",
                   "decay_frac", "weight_decay", "max_grad_norm")


def _number(v):
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def heal_config(raw: dict | None = None, **overrides) -> HealConfig:
    """A HealConfig with list fields made tuples (hashable, stable job ids); `none` is canonical."""
    d = {**(raw or {}), **overrides}
    for k in ("targets", "corpora", "eval_every_tokens"):
        if isinstance(d.get(k), str) and k != "eval_every_tokens":
            d[k] = (d[k],)
        elif isinstance(d.get(k), list):
            d[k] = tuple(d[k])
    if isinstance(d.get("corpora"), dict):  # one {mix: ...} or {path: ...} corpus
        d["corpora"] = (d["corpora"],)
    if isinstance(d.get("corpora"), tuple):  # canonical names (mixtures, paths with a field)
        d["corpora"] = tuple(_corpus_name_or_text(c) for c in d["corpora"])
    h = HealConfig(**d)
    if h.mode == "none":  # every "none" is the same job, whatever else it says
        return HealConfig()
    if h.mode == "full" and h.targets == MLA_TARGETS:
        import dataclasses

        h = dataclasses.replace(h, targets=("all",))
    return h


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
        d = asdict(self)
        if self.heal.mode == "none":  # ids from before healing existed stay valid
            d["heal"] = {"mode": "none", "tokens": 0}
        blob = json.dumps(d, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def is_baseline(self) -> bool:
        return self.method is None

    def describe(self) -> str:
        if self.is_baseline:
            return f"{self.model} baseline"
        b = f"kv_save={self.budget.kv_save}" if self.budget.kv_save is not None else f"rank={self.budget.rank}"
        heal = f" heal={self.heal.display}" if self.heal.mode != "none" else ""
        return f"{self.model} {self.method.display} {b} calib={self.calib.corpus}{heal}"


@dataclass
class SweepConfig:
    name: str
    jobs: list[JobConfig]
    executor: str = "serial"  # serial | ray | submitit (harness.executors)
    wandb: bool = True
    source: str = ""
    executor_options: dict = field(default_factory=dict)  # the executor's keyword options


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


def parse_executor(value, probs: _Problems) -> tuple[str, dict]:
    """`executor: ray` or `executor: {name: ray, num_gpus: 1, ...}` -> (name, options)."""
    from harness.executors import check_executor

    if isinstance(value, str):
        name, options = value, {}
    elif isinstance(value, dict):
        options = dict(value)
        name = options.pop("name", None)
        if name is None:
            probs.add(("executor",), "a mapping needs name: serial | ray | submitit, e.g. {name: ray, num_gpus: 1}")
            return "serial", {}
    else:
        probs.add(("executor",), f"expected an executor name or a mapping with name and options, got {value!r}")
        return "serial", {}
    for key, msg in check_executor(name, options):
        probs.add(("executor",) + key, msg)
    return name, options


TOP_KEYS = ("name", "models", "calibration", "budgets", "methods", "baseline", "heal", "eval",
            "executor", "wandb", "device", "dtype", "blocks")


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

    if isinstance(raw, dict) and "blocks" in raw:
        return _parse_blocks(raw, source, lines or {})
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

    calibs = [_typed(CalibConfig, _named_corpus(c, "corpus", ("calibration", i), probs), ("calibration", i), probs)
              for i, c in enumerate(raw.get("calibration") or [{}])]
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
    heal_cfgs = []
    for i, h in enumerate(heals):
        if isinstance(h, str):
            h = {"mode": h}
        if isinstance(h, dict):  # YAML reads 1e-3 (no dot) as a string: accept it for number fields
            h = {k: _number(v) if k in HEAL_FLOAT_KEYS else v for k, v in h.items()}
        hc = _typed(HealConfig, h, ("heal", i), probs)
        if hc is None:
            continue
        hc = heal_config(asdict(hc))
        for key, msg in check_heal(hc):
            probs.add(("heal", i, key), msg)
        heal_cfgs.append(hc)
    ev = raw.get("eval") or {}
    ppl = _typed(PplConfig, _named_corpus(ev.get("ppl") if isinstance(ev, dict) else None, "domains", ("eval", "ppl"),
                                          probs), ("eval", "ppl"), probs)
    if isinstance(ev, dict):
        ev_rest = {k: v for k, v in ev.items() if k != "ppl"}
        evc = _typed(EvalConfig, ev_rest, ("eval",), probs)
    else:
        probs.add(("eval",), "expected a mapping")
        evc = None
    from harness.data import check_corpus

    if ppl is not None:
        for j, d in enumerate(ppl.domains):
            problem = check_corpus(d)
            if problem:
                probs.add(("eval", "ppl", "domains", j), problem)
    for i, c in enumerate(calibs):
        if c is not None:
            problem = check_corpus(c.corpus)
            if problem:
                probs.add(("calibration", i, "corpus"), problem)
    executor, executor_options = parse_executor(raw.get("executor", "serial"), probs)
    probs.raise_if_any()

    heal_cfgs = list(dict.fromkeys(heal_cfgs))  # one "none" however often it is listed
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
    return SweepConfig(name=name, jobs=jobs, executor=executor, wandb=bool(raw.get("wandb", True)), source=source,
                       executor_options=executor_options)


# ------------------------------------------- corpora given as mappings; sweep blocks (issue #11)
def _corpus_name_or_text(value) -> str:
    """The canonical corpus name (harness.data.corpus_name), or the value as text for check_corpus to reject."""
    from harness.data import corpus_name

    try:
        return corpus_name(value)
    except HarnessError:
        return str(value)


def _named_corpus(entry, key: str, path: tuple, probs: _Problems):
    """`entry` with its corpus (key corpus) or corpora (key domains) as canonical names:
    `{mix: {wiki: 1, code: 1}}` -> 'mix:code=1,wiki=1', `{path: f, field: x}` -> 'f#x'."""
    from harness.data import corpus_name

    if not isinstance(entry, dict) or key not in entry:
        return entry
    values = entry[key]
    many = isinstance(values, (list, tuple))
    names = []
    for j, v in enumerate(values if many else [values]):
        try:
            names.append(corpus_name(v))
        except HarnessError as e:
            probs.add(path + (key,) + ((j,) if many else ()), str(e))
            names.append("wiki")  # a placeholder: the problem above stops the sweep before any job
    return {**entry, key: names if many else names[0]}


BLOCK_KEYS = ("models", "calibration", "budgets", "methods", "baseline", "heal", "eval", "device", "dtype")


def _parse_blocks(raw: dict, source: str, lines: dict) -> SweepConfig:
    """A sweep of several blocks: `blocks:` lists partial sweeps; each block's keys replace the
    file's shared ones (name, models, eval, executor, ...). The jobs are the union of the blocks'
    grids; a job two blocks share runs once (one job id)."""
    blocks = raw["blocks"]
    if not isinstance(blocks, list) or not blocks or not all(isinstance(b, dict) for b in blocks):
        where = f"{source}:{lines[('blocks',)]}" if ("blocks",) in lines else source
        raise HarnessError(f"{where}: blocks: give a list of mappings with keys {', '.join(BLOCK_KEYS)}")
    shared = {k: v for k, v in raw.items() if k != "blocks"}
    errors: list[str] = []
    jobs: dict[str, JobConfig] = {}
    sweep = None
    for i, block in enumerate(blocks):
        bad = [k for k in block if k not in BLOCK_KEYS]
        if bad:
            line = lines.get(("blocks", i, bad[0]))
            errors.append(f"{source}{f':{line}' if line else ''}: blocks.{i}.{bad[0]}: not a block key; "
                          f"a block has {', '.join(BLOCK_KEYS)}")
            continue
        block_lines = {**lines, **{p[2:]: n for p, n in lines.items() if p[:2] == ("blocks", i) and len(p) > 2}}
        try:
            sweep = parse_sweep({**shared, **block}, source, block_lines)
        except HarnessError as e:
            errors.extend(f"block {i}: {line.strip()}" for line in str(e).splitlines() if "problem(s) in" not in line)
            continue
        for job in sweep.jobs:
            jobs.setdefault(job.job_id, job)
    if errors:
        errors = list(dict.fromkeys(errors))
        head = f"{len(errors)} problem(s) in {source}:\n  " if len(errors) > 1 else ""
        raise HarnessError(head + "\n  ".join(errors))
    sweep.jobs = list(jobs.values())
    return sweep
