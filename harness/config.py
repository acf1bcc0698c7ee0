"""Sweep files: YAML (plus `--set key=value` overrides) validated into `harness.specs` dataclasses.

A sweep file (see sweeps/quick.yaml) expands to the grid
    models x calibration x budgets x methods (x heal), plus one unconverted baseline per model.
Every problem in a file is reported at once, each with its YAML key path and line (or the
`--set` that caused it), before any model is loaded: field types and ranges (`specs.check_fields`),
and names checked against the registries they live in (corpora, methods and their options,
executors and theirs, lm-eval tasks are checked when they run). A job's identity is a hash of its
resolved config (`JobConfig.job_id`), so the same job in another sweep file or a rerun is done.

    load_sweep("sweeps/paper-care.yaml", overrides=["models=[gemma3-270m]", "eval.limit=null"])
"""
from __future__ import annotations

import difflib
import hashlib
import re
from dataclasses import asdict, fields, replace
from pathlib import Path

import yaml

from harness.errors import HarnessError
from harness.options import parse_assignments
from harness.specs import (BudgetConfig, CalibConfig, EvalConfig, HealConfig, JobConfig, KVQuantSpec, LongPplConfig,
                           MethodConfig, PplConfig, SweepConfig, check_fields, heal_config)

TOP_KEYS = ("name", "models", "calibration", "budgets", "methods", "baseline", "heal", "heal_baseline", "eval",
            "executor", "wandb", "device", "dtype", "kv_quant")
OVERRIDE = "--set"  # what the problems of an override are reported against, instead of a file line


# ----------------------------------------------------------------------------------- problems
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


class Problems:
    """Collects `where: key.path: message` lines; `raise_if_any` raises them as one HarnessError."""

    def __init__(self, source: str, lines: dict):
        self.source, self.lines, self.items = source, lines, []

    def add(self, path: tuple, msg: str):
        line = None
        for k in range(len(path), 0, -1):
            if path[:k] in self.lines:
                line = self.lines[path[:k]]
                break
        key = ".".join(str(p) for p in path if p != "") or "(top)"
        where = (f"{OVERRIDE} {key}" if line == OVERRIDE else f"{self.source}:{line}" if line else self.source)
        self.items.append(f"{where}: {key}: {msg}" if line != OVERRIDE else f"{where}: {msg}")

    def extend(self, path: tuple, problems: list[tuple[str, str]]):
        for key, msg in problems:
            self.add(path + ((key,) if key else ()), msg)

    def raise_if_any(self):
        if self.items:
            head = f"{len(self.items)} problem(s) in {self.source}:" if len(self.items) > 1 else ""
            raise HarnessError((head + "\n  " if head else "") + "\n  ".join(self.items))


def typed(cls, data, path, probs: Problems):
    """Build dataclass `cls` from a mapping, reporting unknown keys, wrong types and ranges."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        probs.add(path, f"expected a mapping with keys {', '.join(f.name for f in fields(cls))}, got {type(data).__name__}")
        return None
    known = [f.name for f in fields(cls)]
    kwargs = {}
    for k, v in data.items():
        if k not in known:
            close = difflib.get_close_matches(str(k), list(known), n=1)
            probs.add(path + (k,), f"unknown key{f' (did you mean {close[0]!r}?)' if close else ''}; "
                                   f"known: {', '.join(known)}")
            continue
        kwargs[k] = tuple(v) if isinstance(v, list) else v
    try:
        obj = cls(**kwargs)
    except TypeError as e:
        probs.add(path, str(e))
        return None
    problems = obj.problems() if hasattr(obj, "problems") else check_fields(obj)
    probs.extend(path, problems)
    return None if problems else obj


def _count(v):
    """Token counts may be written 20M, 300k or 1.5e6 in a sweep file."""
    if isinstance(v, str):
        t = v.strip().lower().replace("_", "")
        scale = {"k": 1_000, "m": 1_000_000}.get(t[-1:], 1)
        try:
            return int(round(float(t[:-1] if scale > 1 else t) * scale))
        except ValueError:
            return v
    return int(v) if isinstance(v, float) and v.is_integer() else v


def _number(v):
    """YAML 1.1 reads 1e-3 (no dot) as a string: accept it where a number is expected."""
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


# ----------------------------------------------------------------------------------- overrides
def apply_overrides(raw: dict, overrides: list[str], lines: dict) -> tuple[dict, str]:
    """Apply `key.path=value` assignments (value read as YAML) to a sweep mapping.

    Returns (the new mapping, a suffix for the sweep's name that says what was overridden, so
    results of an overridden sweep never land in the folder of the plain one). Lines of the
    overridden keys are marked so that their problems name the `--set`, not a file line.
    """
    if not overrides:
        return raw, ""
    raw = yaml.safe_load(yaml.safe_dump(raw))  # a deep copy
    parts = []
    for key, value in parse_assignments(overrides, OVERRIDE).items():
        path = key.split(".")
        node = raw
        for p in path[:-1]:
            nxt = node.get(p) if isinstance(node, dict) else None
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise HarnessError(f"{OVERRIDE} {key}: {p!r} is not a mapping in the sweep; set the whole key instead")
            node = nxt
        node[path[-1]] = value
        lines[tuple(path)] = OVERRIDE
        for k in [k for k in lines if k[:len(path)] == tuple(path) and len(k) > len(path)]:
            lines[k] = OVERRIDE
        if path != ["name"]:
            text = yaml.safe_dump(value, default_flow_style=True).strip()
            parts.append(f"{key}={text.removesuffix('...').strip()}")  # a scalar's dump ends with '...'

    if "name" in {k.split(".")[0] for k in parse_assignments(overrides, OVERRIDE)}:
        return raw, ""
    slug = re.sub(r"[^A-Za-z0-9_.=,+-]+", "", "+".join(parts).replace(" ", ""))
    if len(slug) > 48:
        slug = slug[:36] + "-" + hashlib.sha256("+".join(parts).encode()).hexdigest()[:8]
    return raw, "+" + slug if slug else ""


# ----------------------------------------------------------------------------------- sections
def _models(raw, probs) -> list[str]:
    from harness.models import EMBEDDED

    models = raw.get("models") or []
    if isinstance(models, str):
        models = [models]
    if not models:
        probs.add(("models",), "give at least one model (e.g. [smollm2-135m])")
    for i, m in enumerate(models):
        if not isinstance(m, str):
            probs.add(("models", i), f"expected a model name/path, got {m!r}")
        elif m not in EMBEDDED and not (Path(m).expanduser().exists() or m.count("/") == 1):
            close = difflib.get_close_matches(m, list(EMBEDDED), n=1)
            probs.add(("models", i), f"'{m}' is not an embedded model ({', '.join(EMBEDDED)}), a path or a hub id"
                      + (f" (did you mean {close[0]!r}?)" if close else ""))
    return models


def _corpus(name, path, probs) -> None:
    from harness.data import check_corpus

    msg = check_corpus(name) if isinstance(name, str) else f"expected a corpus name or mapping, got {name!r}"
    if msg:
        probs.add(path, msg)


def _methods(raw, probs) -> list[MethodConfig]:
    from harness.methods import METHODS

    out = []
    for i, m in enumerate(raw.get("methods") or []):
        if isinstance(m, str):
            m = {"name": m}
        mc = typed(MethodConfig, m, ("methods", i), probs)
        if mc is None:
            continue
        if mc.name not in METHODS:
            close = difflib.get_close_matches(str(mc.name), list(METHODS), n=1)
            probs.add(("methods", i, "name"), f"unknown method {mc.name!r}; known: {', '.join(sorted(METHODS))}"
                      + (f" (did you mean {close[0]!r}?)" if close else ""))
            continue
        opts = dict(mc.options or {})
        problems = METHODS[mc.name].option_problems(opts)
        probs.extend(("methods", i, "options"), problems)
        if not problems:  # numbers YAML read as strings are stored as numbers (stable job ids)
            try:  # and the method's own checks of the whole (its validate hook)
                opts = {k: v for k, v in METHODS[mc.name].check_options(opts).items() if k in opts}
            except HarnessError as e:
                probs.add(("methods", i, "options"), str(e))
        out.append(replace(mc, options=opts))
    return out


def _heals(raw, probs) -> list[HealConfig]:
    heals = raw.get("heal") or [{"mode": "none"}]
    if isinstance(heals, (dict, str)):
        heals = [heals]
    float_keys = {f for f, t in HealConfig.__annotations__.items() if t == "float"}
    out = []
    for i, h in enumerate(heals):
        if isinstance(h, str):
            h = {"mode": h}
        if isinstance(h, dict):
            h = {k: _number(v) if k in float_keys else [v] if k in ("targets", "corpora") and isinstance(v, str)
                 else _count(v) if k == "tokens" else [_count(t) for t in v]
                 if k == "eval_every_tokens" and isinstance(v, list) else v for k, v in h.items()}
            c = h.get("corpora")
            if isinstance(c, dict) and set(c) & {"mix", "path"}:  # one mixture or user corpus
                h["corpora"] = [c]
            elif isinstance(c, dict):  # {wiki: 0.4, chat: 0.6}: corpora with their token shares
                h["weights"] = [_number(w) for w in c.values()]
                h["corpora"] = list(c)
            if isinstance(h.get("corpora"), list):  # canonical names (mixtures, paths with a field)
                h["corpora"] = [_corpus_name_or_text(x) for x in h["corpora"]]
            if h.get("mode") == "full" and "targets" not in h:  # full fine-tuning's default scope
                h["targets"] = ["all"]
        hc = typed(HealConfig, h, ("heal", i), probs)
        corpora = h.get("corpora", HealConfig.corpora) if isinstance(h, dict) and h.get("mode") != "none" else ()
        for j, c in enumerate(corpora if isinstance(corpora, (list, tuple)) else ()):
            _corpus(c, ("heal", i, "corpora", j), probs)
        if hc is not None:
            out.append(heal_config(asdict(hc)))
    return list(dict.fromkeys(out))  # one "none" however often it is listed


def _eval(raw, probs) -> EvalConfig | None:
    ev = raw.get("eval") or {}
    if not isinstance(ev, dict):
        probs.add(("eval",), "expected a mapping")
        return None
    ev = {**ev, "ppl": _named_corpus(ev.get("ppl"), "domains", ("eval", "ppl"), probs)} if ev.get("ppl") else ev
    ppl = typed(PplConfig, ev.get("ppl"), ("eval", "ppl"), probs)
    long_ppl = _long_ppl(ev.get("long_ppl"), probs)
    rest = {k: v for k, v in ev.items() if k not in ("ppl", "long_ppl")}
    if isinstance(rest.get("tasks"), str):
        rest["tasks"] = [rest["tasks"]]
    evc = typed(EvalConfig, rest, ("eval",), probs)
    domains = (ev.get("ppl") or {}).get("domains", PplConfig.domains) if isinstance(ev.get("ppl"), (dict, type(None))) else ()
    for j, d in enumerate(domains if isinstance(domains, (list, tuple)) else ()):
        _corpus(d, ("eval", "ppl", "domains", j), probs)
    if ppl is None or evc is None:
        return None
    limit = int(evc.limit) if isinstance(evc.limit, float) and evc.limit.is_integer() and evc.limit >= 1 else evc.limit
    return replace(evc, ppl=replace(ppl, domains=tuple(ppl.domains)), tasks=tuple(evc.tasks or ()), limit=limit,
                   long_ppl=long_ppl)


def _executor(value, probs) -> tuple[str, dict]:
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


# ----------------------------------------------------------------------------------- loading
def load_sweep(path: str | Path, overrides: list[str] | None = None) -> SweepConfig:
    """Read and validate a sweep YAML (with `key.path=value` overrides); one HarnessError lists every problem."""
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
    return parse_sweep(raw, source=str(path), lines=_lines(text), overrides=overrides)


def parse_sweep(raw, source: str = "<sweep>", lines: dict | None = None,
                overrides: list[str] | None = None) -> SweepConfig:
    lines = dict(lines or {})
    if not isinstance(raw, dict):
        raise HarnessError(f"{source}: a sweep file is a mapping with keys {', '.join(TOP_KEYS)}")
    raw, suffix = apply_overrides(raw, overrides or [], lines)
    if "blocks" in raw:
        sweep = _parse_blocks(raw, source, lines)
        sweep.name += suffix
        return sweep
    probs = Problems(source, lines)
    for k in raw:
        if k not in TOP_KEYS:
            close = difflib.get_close_matches(str(k), TOP_KEYS, n=1)
            probs.add((k,), f"unknown key{f' (did you mean {close[0]!r}?)' if close else ''}; known: {', '.join(TOP_KEYS)}")
    name = str(raw.get("name") or Path(source).stem) + suffix
    models = _models(raw, probs)
    calibs = [typed(CalibConfig, _named_corpus(c, "corpus", ("calibration", i), probs), ("calibration", i), probs)
              for i, c in enumerate(raw.get("calibration") or [{}])]
    for i, c in enumerate(calibs):
        if c is not None:
            _corpus(c.corpus, ("calibration", i, "corpus"), probs)
    budgets = [typed(BudgetConfig, b, ("budgets", i), probs) for i, b in enumerate(raw.get("budgets") or [])]
    budgets = [b for b in budgets if b is not None]
    methods = _methods(raw, probs)
    if methods and not raw.get("budgets"):
        probs.add(("budgets",), "methods need at least one budget (e.g. - {kv_save: 0.5})")
    heal_cfgs = _heals(raw, probs)
    evc = _eval(raw, probs)
    executor, executor_options = _executor(raw.get("executor", "serial"), probs)
    kv_quants = _kv_quants(raw.get("kv_quant"), budgets, probs)
    probs.raise_if_any()

    dev, dt = raw.get("device"), raw.get("dtype")
    jobs: list[JobConfig] = []
    # The fair control of healing (DESIGN §10): the unconverted model trained with the same recipe on the
    # same tokens, so "recovered" is measured against the original fine-tuned on that data.
    heal_baseline = raw.get("heal_baseline", True)
    for model in models:
        if raw.get("baseline", True):
            for kv in _applying(kv_quants, None):
                jobs.append(JobConfig(model=model, method=None, calib=None, budget=None, eval=evc, device=dev,
                                      dtype=dt, kv_quant=kv))
            for h in heal_cfgs if heal_baseline else ():
                if h.mode != "none":
                    jobs.append(JobConfig(model=model, method=None, calib=None, budget=None, heal=h, eval=evc,
                                          device=dev, dtype=dt))
        for c in calibs:
            for b in budgets:
                for m in methods:
                    for h in heal_cfgs:
                        for kv in _applying(kv_quants, b):
                            jobs.append(JobConfig(model=model, method=m, calib=c, budget=b, heal=h, eval=evc,
                                                  device=dev, dtype=dt, kv_quant=kv))
    return SweepConfig(name=name, jobs=jobs, executor=executor, wandb=bool(raw.get("wandb", True)), source=source,
                       executor_options=executor_options)


# ----------------------------------------------------------------------------- long context (DESIGN §12)
def _long_ppl(value, probs) -> LongPplConfig | None:
    """`eval.long_ppl: {domains, seq_lens, samples, seed, batch_size, chunk}`; absent: not scored."""
    if value is None:
        return None
    lp = typed(LongPplConfig, value, ("eval", "long_ppl"), probs)
    domains = value.get("domains", LongPplConfig.domains) if isinstance(value, dict) else ()
    for j, d in enumerate(domains if isinstance(domains, (list, tuple)) else ()):
        _corpus(d, ("eval", "long_ppl", "domains", j), probs)
    return lp


def _kv_quants(value, budgets: list[BudgetConfig], probs) -> list[tuple[KVQuantSpec | None, tuple | None]]:
    """`kv_quant: [none, {bits: 8, group: 64, residual: 128, budgets: [baseline, 0.75]}, ...]`.

    An axis of the grid: each entry is a KV cache every job gets (none: full precision), or only
    the jobs of `budgets` (`baseline` = the unconverted model, numbers = kv_save of `budgets:`).
    Returns [(spec or None, budgets or None for all)]; absent: [(None, None)].
    """
    if value is None:
        return [(None, None)]
    known = {b.kv_save for b in budgets if b.kv_save is not None}
    out = []
    for i, item in enumerate(value if isinstance(value, list) else [value]):
        if item in (None, "none"):
            out.append((None, None))
            continue
        if not isinstance(item, dict):
            probs.add(("kv_quant", i), f"expected none or a mapping {{bits, group, residual, budgets}}, got {item!r}")
            continue
        only = item.get("budgets")
        spec = typed(KVQuantSpec, {k: v for k, v in item.items() if k != "budgets"}, ("kv_quant", i), probs)
        if only is not None:
            only = tuple(only) if isinstance(only, list) else (only,)
            for b in only:
                if b != "baseline" and b not in known:
                    probs.add(("kv_quant", i, "budgets"), f"{b!r} is neither baseline nor a kv_save of budgets: "
                                                          f"{', '.join(map(str, sorted(known))) or 'none'}")
        if spec is not None:
            out.append((spec, only))
    return out


def _applying(kv_quants: list, budget: BudgetConfig | None) -> list[KVQuantSpec | None]:
    """The kv_quant entries for the baseline (budget None) or for the jobs of one budget."""
    key = "baseline" if budget is None else budget.kv_save
    return [spec for spec, only in kv_quants if only is None or key in only]


# ------------------------------------------- corpora given as mappings; sweep blocks (issue #11)
def _corpus_name_or_text(value) -> str:
    """The canonical corpus name (harness.data.corpus_name), or the value as text for check_corpus to reject."""
    from harness.data import corpus_name

    try:
        return corpus_name(value)
    except HarnessError:
        return str(value)


def _named_corpus(entry, key: str, path: tuple, probs: Problems):
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


BLOCK_KEYS = ("models", "calibration", "budgets", "methods", "baseline", "heal", "heal_baseline", "eval", "device",
              "dtype")


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
