"""Recovery curves of healing runs (DESIGN §10), assembled from a sweep's results for the healing report.

A recovery curve is one healed job's scores against training tokens, assembled from three sources
on the same evaluation windows and documents: the 0-token point is the matching one-shot row (same
model, method, budget and calibration, heal none), the middle the marks its healing recorded
(runs/<job_id>/metrics.json["heal"]["curve"]; a curve may leave out 0 and the final mark), the last
point the healed row itself at heal_tokens. Where a row and a curve mark fall on the same token
count the row wins (it is the full evaluation, with stderr). acc_mean is the mean over the job's
tasks, each in its paper's metric (harness.tasks.task_metric), as in the leaderboard.

Partial curves: a heal_partial.json {checkpoint path: {step, steps, tokens_seen, curve, [spec, log,
log_last, tokens_per_s_last20]}}, the path ending in <sweep folder>/runs/.<job_id>.heal/, gives the
curve of a job without a healed row. Its job is found through the sweep's job ids (`--sweep`), else
the one-shot row whose perplexities equal the curve's 0-token point (the same windows give the same
numbers), else its failed row's method where that method has one budget in the rows.

    from harness.reports.healing_curves import gather
    study = gather(results, partial=Path("heal_partial.json"))   # study.curves, study.notes
"""
from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from harness.errors import HarnessError
from harness.reports.toolkit import domains, paired_log_se, read_rows, window_nll

ROW_KEYS = ("model", "method", "budget_kv_save", "budget_rank", "calib", "calib_samples", "calib_seed", "kv_quant")
_PARTIAL_KEY = re.compile(r"(?:^|/)(?P<folder>[^/]*)/runs/\.(?P<job>[0-9a-f]+)\.heal/?$")


# ------------------------------------------------------------------------------- scores of a row
def asked_tasks(row) -> list[str]:
    """The lm-eval tasks a job asked for (its acc_mean averages them; a group counts once)."""
    t = row.get("tasks") if hasattr(row, "get") else None
    return [x for x in t.split(",") if x] if isinstance(t, str) else []


def acc_mean(row, tasks: list[str], metric: str = "primary") -> tuple[float, float]:
    """(mean, stderr) over `tasks` of a row or curve point: each task in its paper's metric (`primary`;
    `<task>/acc` where that is missing, as the leaderboard does) or in plain `acc`. The stderr is
    sqrt(sum se^2) / k (NaN where a task has none, e.g. curve points); NaN, NaN where a task is missing."""
    from harness.tasks import task_metric

    vals, ses = [], []
    for t in tasks:
        col = f"{t}/{task_metric(t) if metric == 'primary' else 'acc'}"
        if as_float(row.get(col)) is None and metric == "primary" and not _is_curve_point(row):
            col = f"{t}/acc"
        v = as_float(row.get(col))
        if v is None:
            return math.nan, math.nan
        vals.append(v)
        ses.append(as_float(row.get(col + "_stderr")))
    if not vals:
        return math.nan, math.nan
    se = math.sqrt(sum(e * e for e in ses)) / len(ses) if all(e is not None for e in ses) else math.nan
    return sum(vals) / len(vals), se


def _is_curve_point(row) -> bool:
    return isinstance(row, dict) and "mark" in row


def as_float(v) -> float | None:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


# ------------------------------------------------------------------------------------- the curves
@dataclass
class Curve:
    """One healed job's recovery curve (its points sorted by tokens)."""

    model: str
    method: str  # "baseline" for the fine-tuned original
    kv_save: float | None
    heal: str  # the recipe's label (full-20M, lora-5M, ...)
    job_id: str
    tasks: list[str]
    points: pd.DataFrame  # tokens, mark, source, ppl_<d>..., acc_primary[_se], acc_plain[_se]
    budget_tokens: int | None = None  # the recipe's token budget
    partial_at: int | None = None  # tokens seen when a partial run stopped (None: a finished job)
    log: list = field(default_factory=list)  # per-step training records
    tokens_per_s: float | None = None  # the run's own average, where it has no log
    peak_gib: float | None = None
    spec: dict = field(default_factory=dict)

    @property
    def is_reference(self) -> bool:
        return self.method == "baseline"

    @property
    def label(self) -> str:
        name = "fine-tuned original" if self.is_reference else f"{self.method} @ {kv_text(self.kv_save)}"
        return name + (f" — partial (stopped at {tokens_str(self.partial_at)} tokens)" if self.partial_at is not None
                       else "")

    def throughput(self) -> tuple[float | None, float | None]:
        """(median tokens/s over the log's steps, peak GPU GiB)."""
        tps = [r["tokens_per_s"] for r in self.log if as_float(r.get("tokens_per_s")) is not None]
        gib = [r["gpu_memory_gib"] for r in self.log if as_float(r.get("gpu_memory_gib")) is not None]
        return (statistics.median(tps) if tps else self.tokens_per_s, max(gib) if gib else self.peak_gib)


def row_point(row, doms: list[str], tokens: int, mark: int, source: str) -> dict:
    """A curve point from a full evaluation (a one-shot or healed row): perplexities, acc_mean ± stderr."""
    p = {"tokens": int(tokens), "mark": int(mark), "source": source}
    p.update({f"ppl_{d}": as_float(row.get(f"ppl_{d}")) for d in doms})
    tasks = asked_tasks(row)
    p["acc_primary"], p["acc_primary_se"] = acc_mean(row, tasks, "primary")
    p["acc_plain"], p["acc_plain_se"] = acc_mean(row, tasks, "acc")
    return p


def curve_point(c: dict, doms: list[str], tasks: list[str]) -> dict:
    """A point of a healing curve (no stderr recorded). Curves from before the curve averaged each task's
    paper metric recorded `<task>/acc` only and an acc_mean over it: that acc_mean is the plain-acc mean."""
    p = {"tokens": int(c["tokens"]), "mark": int(c.get("mark", c["tokens"])), "source": "curve"}
    p.update({f"ppl_{d}": as_float(c.get(f"ppl_{d}")) for d in doms})
    p["acc_primary"] = acc_mean(c, tasks, "primary")[0]
    p["acc_plain"] = acc_mean(c, tasks, "acc")[0]
    given = as_float(c.get("acc_mean"))
    if given is not None and math.isnan(p["acc_primary"]) and math.isnan(p["acc_plain"]):
        p["acc_plain"] = given  # the group's own columns missing: trust the recorded mean (pre-fix curves)
    p["acc_primary_se"] = p["acc_plain_se"] = math.nan
    return p


def assemble(zero: dict | None, middle: list[dict], final: dict | None) -> pd.DataFrame:
    """The points sorted by tokens; where sources share a token count the rows (zero, final) win."""
    pts = {}
    for p in middle:
        pts[p["tokens"]] = p
    for p in (zero, final):
        if p is not None:
            pts[p["tokens"]] = p
    return pd.DataFrame([pts[t] for t in sorted(pts)])


def _key(row) -> tuple:
    return tuple("" if (v := row.get(k)) is None or (isinstance(v, float) and math.isnan(v)) else v
                 for k in ROW_KEYS)


def one_shot_rows(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["heal"].fillna("none").isin(["none", "-"])]


def healed_rows(df: pd.DataFrame) -> pd.DataFrame:
    return df[~df["heal"].fillna("none").isin(["none", "-"])]


def one_shot_of(df: pd.DataFrame, key: tuple):
    """The one-shot row (heal none) with this model/method/budget/calibration key; None if absent."""
    shot = [r for _, r in one_shot_rows(df).iterrows()]
    hits = [r for r in shot if _key(r) == key]
    # A field one row does not record (rows written before calib_seed was) matches anything; model and
    # method always do. Exact matches win.
    hits = hits or [r for r in shot if _key(r)[:2] == key[:2]
                    and all(a == b or "" in (a, b) for a, b in zip(_key(r), key))]
    return hits[-1] if hits else None


def heal_metrics(results: Path, job_id: str) -> dict:
    """metrics.json["heal"] of a job, with its training log (heal_log.json) under "log"; {} if absent."""
    run = Path(results) / "runs" / str(job_id)
    f = run / "metrics.json"
    heal = json.loads(f.read_text()).get("heal") or {} if f.exists() else {}
    if "log" not in heal and (run / "heal_log.json").exists():
        heal["log"] = json.loads((run / "heal_log.json").read_text())
    return heal


def healed_curve(results: Path, df: pd.DataFrame, row, doms: list[str]) -> tuple[Curve, str | None]:
    """The curve of one healed row: zero from its one-shot row, middle from its metrics, final from itself."""
    info = heal_metrics(results, row["job_id"])
    tasks = asked_tasks(row)
    shot = one_shot_of(df, _key(row))
    final_tokens = int(as_float(row.get("heal_tokens")) or info.get("tokens_seen") or 0)
    budget = info.get("tokens_budget") or (info.get("spec") or {}).get("tokens") or final_tokens
    zero = row_point(shot, doms, 0, 0, "one-shot row") if shot is not None else None
    middle = [curve_point(c, doms, tasks) for c in info.get("curve", [])]
    final = row_point(row, doms, final_tokens, int(budget), "healed row")
    note = None if shot is not None else (f"{row['method']} @ {kv_text(row.get('budget_kv_save'))} {row['heal']}: "
                                          "no one-shot row (heal none) of the same job: its curve starts at its "
                                          "first mark")
    c = Curve(row["model"], row["method"], as_float(row.get("budget_kv_save")), str(row["heal"]), str(row["job_id"]),
              tasks, assemble(zero, middle, final), int(budget), None, info.get("log") or [],
              as_float(info.get("tokens_per_s")), as_float(info.get("gpu_memory_gib")), info.get("spec") or {})
    return c, note


# ------------------------------------------------------------------------------------- partial runs
def load_partials(path: Path) -> dict[str, dict]:
    """{job_id: entry} of a heal_partial.json (entry["folder"]: the results folder it was found in);
    HarnessError on anything else."""
    path = Path(path)
    fix = ("give {checkpoint path: {step, steps, tokens_seen, curve}} keyed by paths holding runs/.<job_id>.heal/ "
           "(as gpu_session.sh writes heal_partial.json)")
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise HarnessError(f"--partial {path} does not exist; {fix}") from None
    except json.JSONDecodeError as e:
        raise HarnessError(f"--partial {path} is not JSON ({e}); {fix}") from None
    out = {}
    for key, entry in raw.items() if isinstance(raw, dict) else [(None, None)]:
        m = _PARTIAL_KEY.search(str(key).rstrip("/") + "/") if key else None
        if m is None or not isinstance(entry, dict) or not isinstance(entry.get("curve"), list) \
                or as_float(entry.get("tokens_seen")) is None:
            raise HarnessError(f"--partial {path}: entry {key!r} is not a healing checkpoint's progress; {fix}")
        out[m["job"]] = {**entry, "folder": m["folder"]}
    return out


def sweep_jobs(sweep: str | None, overrides: list[str]) -> dict:
    """{job_id: JobConfig} of a sweep YAML (with --set overrides); {} without one."""
    if not sweep:
        return {}
    from harness.config import load_sweep

    return {j.job_id: j for j in load_sweep(sweep, overrides).jobs}


def identify_partial(results: Path, df: pd.DataFrame, job_id: str, entry: dict, doms: list[str],
                     jobs: dict) -> tuple[tuple | None, str, str]:
    """(one-shot key, recipe label, how it was found) of a partial run; key None when it cannot be found."""
    from harness.specs import heal_config

    spec = entry.get("spec") or {}
    heal = heal_config(spec).display if spec else ""
    if job_id in jobs:
        j = jobs[job_id]
        row = {"model": j.model, "method": "baseline" if j.is_baseline else j.method.display,
               "budget_kv_save": None if j.budget is None else j.budget.kv_save,
               "budget_rank": None if j.budget is None else j.budget.rank,
               "calib": None if j.calib is None else j.calib.corpus,
               "calib_samples": None if j.calib is None else j.calib.samples,
               "calib_seed": None if j.calib is None else j.calib.seed, "kv_quant": "none"}
        shot = next((r for _, r in one_shot_rows(df).iterrows() if _key(r)[:5] == _key(row)[:5]), None)
        return (_key(shot) if shot is not None else _key(row)), j.heal.display, "the sweep's job ids"
    zero = next((c for c in entry["curve"] if int(c.get("tokens", -1)) == 0), None)
    if not heal:  # a checkpoint that does not record its recipe (heal_state.pt has it only with its spec)
        return None, "recipe not recorded", ""
    if zero is not None:
        hits = {_key(r) for _, r in one_shot_rows(df).iterrows()
                if all(_close(zero.get(f"ppl_{d}"), r.get(f"ppl_{d}")) for d in doms)}
        if len(hits) == 1:
            return hits.pop(), heal, "its 0-token perplexities (equal to the one-shot row's)"
    failed = Path(results) / "runs" / f".{job_id}.failed" / "row.json"
    if failed.exists():
        method = json.loads(failed.read_text()).get("method")
        keys = {_key(r) for _, r in one_shot_rows(df).iterrows() if r["method"] == method}
        if len(keys) == 1:
            return keys.pop(), heal, "its failed row's method (one budget in the rows)"
    return None, heal, ""


def _close(a, b, rel: float = 1e-6) -> bool:
    a, b = as_float(a), as_float(b)
    return a is not None and b is not None and abs(a - b) <= rel * abs(b)


def partial_curve(df: pd.DataFrame, key: tuple, heal: str, job_id: str, entry: dict, doms: list[str],
                  spec: dict | None = None) -> Curve:
    """The curve of a job that did not finish: zero from its one-shot row, the rest from its checkpoint.
    Throughput: the median over the checkpoint's log, else its mean of the last 20 steps; memory: the
    log's peak (its last record holds the process's peak so far)."""
    shot = one_shot_of(df, key)
    tasks = asked_tasks(shot) if shot is not None else []
    zero = row_point(shot, doms, 0, 0, "one-shot row") if shot is not None else None
    middle = [curve_point(c, doms, tasks) for c in entry["curve"]]
    spec = entry.get("spec") or spec or {}
    log = entry.get("log") or []
    gib = [as_float(r.get("gpu_memory_gib")) for r in (log or entry.get("log_last") or [])]
    gib = [g for g in gib if g is not None]
    return Curve(key[0], key[1], as_float(key[2]), heal, job_id, tasks, assemble(zero, middle, None),
                 spec.get("tokens"), int(entry["tokens_seen"]), log, as_float(entry.get("tokens_per_s_last20")),
                 max(gib) if gib else None, spec)


# ------------------------------------------------------------------------------------- numbers
def tokens_to_reach(tokens: list[float], values: list[float], target: float) -> float | None:
    """The first token count at which the curve reaches `target`, interpolating linearly between
    points; None if it never does."""
    pts = [(t, v) for t, v in zip(tokens, values) if as_float(v) is not None]
    for i, (t, v) in enumerate(pts):
        if v >= target:
            if i == 0:
                return float(t)
            t0, v0 = pts[i - 1]
            return t0 + (target - v0) * (t - t0) / (v - v0)
    return None


def loglinear_reach(tokens: list[float], values: list[float], target: float) -> tuple[float, float | None] | None:
    """A least-squares line of value against log10(tokens) over the trained marks (tokens > 0) and the
    token count where that line meets `target`: (gain per 10x tokens, tokens or None where the line
    does not rise). None with fewer than three trained marks. Why: a curve that stops short of the
    goal still says how far off it is; healing curves flatten about log-linearly in tokens, so this
    is the honest one-number summary, and an extrapolation, never a measurement."""
    pts = [(math.log10(t), v) for t, v in zip(tokens, values) if t and t > 0 and as_float(v) is not None]
    if len(pts) < 3:
        return None
    n = len(pts)
    mx, my = sum(x for x, _ in pts) / n, sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    if sxx == 0:
        return None
    slope = sum((x - mx) * (y - my) for x, y in pts) / sxx
    if slope <= 0:
        return slope, None
    return slope, 10 ** (mx + (target - my) / slope)


def choose_metric(curves: list[Curve]) -> str:
    """`primary` when every curve has its paper metric at every point, else `acc` (plain accuracy,
    which every row and curve records): one metric for the whole report, so lines compare. `none`
    where no point has a task score (a healing sweep without lm-eval tasks: perplexity only)."""
    if not any(c.points[col].notna().any() for c in curves for col in ("acc_primary", "acc_plain")
               if col in c.points):
        return "none"
    for c in curves:
        if "acc_primary" not in c.points or c.points["acc_primary"].isna().any():
            return "acc"
    return "primary"


def acc_col(metric: str) -> str:
    return "acc_primary" if metric == "primary" else "acc_plain"


def final_point(c: Curve) -> pd.Series:
    return c.points.iloc[-1]


def approx_se(c: Curve, metric: str, i: int) -> float:
    """lm-eval's stderr of point i; for a curve mark (none recorded) that of the nearest row point of the
    same curve: the same documents, and a binomial stderr barely moves between nearby accuracies."""
    col = acc_col(metric) + "_se"
    se = c.points[col]
    if pd.notna(se.iloc[i]):
        return float(se.iloc[i])
    rows = [(abs(c.points["tokens"].iloc[j] - c.points["tokens"].iloc[i]), float(se.iloc[j]))
            for j in range(len(se)) if pd.notna(se.iloc[j])]
    return min(rows)[1] if rows else math.nan


def reference_for(curves: list[Curve], c: Curve) -> Curve | None:
    """The fine-tuned original of `c`: the baseline healed with the same recipe (a finished row first)."""
    refs = [r for r in curves if r.is_reference and r.model == c.model and r.heal == c.heal]
    refs.sort(key=lambda r: (r.partial_at is not None, -(r.partial_at or 0)))
    return refs[0] if refs else None


def paired_acc(results: Path, base_job: str, job: str, tasks: list[str], metric: str) -> dict | None:
    """Paired bootstrap of acc_mean(job) - acc_mean(base_job) on the documents both scored (harness.paired)."""
    from harness.paired import paired_difference
    from harness.tasks import task_metric

    loaded = []
    for j in (base_job, job):
        run = Path(results) / "runs" / str(j)
        f, meta = run / "lm_eval_documents.parquet", run / "lm_eval_results.json"
        if not (f.exists() and meta.exists()):
            return None
        loaded.append((pd.read_parquet(f), json.loads(meta.read_text()).get("group_weighting", {})))
    metrics = {task_metric(t) if metric == "primary" else "acc" for t in tasks}
    if len(metrics) != 1 or not tasks:
        return None
    return paired_difference(loaded[0][0], loaded[1][0], tasks, loaded[1][1], metric=metrics.pop())


def ppl_ratio_se(results: Path, job: str, ref_job: str, domain: str) -> float:
    a, b = window_nll(results, job).get(domain), window_nll(results, ref_job).get(domain)
    return paired_log_se(a, b) if a and b else math.nan


# ------------------------------------------------------------------------------------- formatting
def tokens_str(t) -> str:
    if t is None or (isinstance(t, float) and math.isnan(t)):
        return ""
    t = float(t)
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if t >= scale:
            return f"{t / scale:.3g}{unit}"
    return f"{t:.0f}"


def kv_text(v) -> str:
    v = as_float(v)
    return "-" if v is None else f"-{100 * v:g}% KV"


# ------------------------------------------------------------------------------------- the study
@dataclass
class Study:
    """Everything the report says, gathered before anything is written."""

    results: Path
    df: pd.DataFrame
    doms: list[str]
    curves: list[Curve]
    metric: str
    untrained: dict | None
    notes: list[str]  # caveats found while assembling
    partial_file: Path | None = None


def gather(results: Path, partial: Path | None = None, sweep: str | None = None,
           overrides: list[str] = ()) -> Study:
    """Rows, curves (healed rows and identified partial runs) and the caveats; HarnessError when there is
    nothing healed to report."""
    results = Path(results)
    df = read_rows(results)
    df = df[df["kv_quant"].fillna("none").isin(["none", "-"])] if "kv_quant" in df else df
    if "heal" not in df:
        df = df.assign(heal="none")
    doms = domains(df)
    notes: list[str] = []
    curves = []
    for _, row in healed_rows(df).iterrows():
        c, note = healed_curve(results, df, row, doms)
        curves.append(c)
        notes += [note] if note else []
    entries = load_partials(partial) if partial else {}
    jobs = sweep_jobs(sweep, list(overrides)) if entries else {}
    done = set(healed_rows(df)["job_id"])
    ours = {results.name, *df.get("sweep", pd.Series(dtype=str)).dropna().astype(str)}
    for job_id, entry in entries.items():
        if job_id in done:
            notes.append(f"partial run {job_id} left out: the job finished (its healed row is used)")
            continue
        if entry["folder"] not in ours:
            notes.append(f"partial run {job_id} left out: it belongs to another sweep's results ({entry['folder']})")
            continue
        key, heal, how = identify_partial(results, df, job_id, entry, doms, jobs)
        if key is None:
            notes.append(f"partial run {job_id} ({heal or 'recipe not recorded'}, stopped at "
                         f"{tokens_str(entry['tokens_seen'])} tokens) left out: no job matches it; pass --sweep with "
                         "the sweep's YAML (and its --set overrides)")
            continue
        spec = json.loads(json.dumps(asdict(jobs[job_id].heal), default=list)) if job_id in jobs else None
        c = partial_curve(df, key, heal, job_id, entry, doms, spec)
        curves.append(c)
        steps = f"{entry.get('step', '?')}/{entry.get('steps', '?')} steps"
        finished = entry.get("step") == entry.get("steps")
        notes.append(f"{c.label.split(' — ')[0]}, {heal}: partial run {job_id} ({steps}, {tokens_str(c.partial_at)} "
                     f"tokens; found by {how})" + (": training finished but the job has no row (its final "
                                                   "evaluation did not complete)" if finished else ""))
    if not curves:
        raise HarnessError(f"{results} has no healed rows (heal other than none) among its {len(df)} finished rows"
                           + (" and no partial run that matches a job" if partial else "")
                           + "; run a healing sweep (e.g. mla-harness sweep sweeps/paper-mha2mla-heal.yaml) or pass "
                             "--partial heal_partial.json with the healing checkpoints' curves")
    metric = choose_metric(curves)
    base = one_shot_rows(df)[one_shot_rows(df)["method"] == "baseline"]
    untrained = row_point(base.iloc[-1], doms, 0, 0, "one-shot row") if len(base) else None
    return Study(results, df, doms, curves, metric, untrained, notes, Path(partial) if partial else None)
