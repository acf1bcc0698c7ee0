"""The healing report (DESIGN §10): recovery curves against the fine-tuned original, REPORT.md + PNGs.

    mla-harness sweep sweeps/paper-mha2mla-heal.yaml
    mla-harness report healing results/paper-mha2mla-heal --machine "1x H100 80GB"
    mla-harness report healing RESULTS --partial heal_partial.json --sweep sweeps/paper-mha2mla-heal.yaml

A recovery curve is one healed job's scores against training tokens, assembled from three sources
on the same evaluation windows and documents: the 0-token point is the matching one-shot row (same
model, method, budget and calibration, heal none), the middle the marks its healing recorded
(runs/<job_id>/metrics.json["heal"]["curve"]; a curve may leave out 0 and the final mark), the last
point the healed row itself at heal_tokens. Where a row and a curve mark fall on the same token
count the row wins (it is the full evaluation, with stderr).

The reference is the fine-tuned original: the unconverted model healed with the same recipe on the
same tokens (MHA2MLA's 44.25 row), not the untrained original (drawn dashed for context). Recovery
= acc_mean(converted) / acc_mean(fine-tuned original, final); "tokens to 95%" interpolates linearly
between curve points. acc_mean is the mean over the job's tasks, each in its paper's metric
(harness.tasks.task_metric), as in the leaderboard.

Partial curves (`--partial`): {checkpoint path: {step, steps, tokens_seen, curve, [spec, log,
tokens_per_s_last20]}}, the path holding runs/.<job_id>.heal/; a job without a healed row is drawn
from its checkpoint's curve, dotted, "partial (stopped at N tokens)". Its job is found through
`--sweep` (the sweep's job ids), else the one-shot row whose perplexities equal the curve's 0-token
point (same windows give the same numbers), else its failed row's method where that has one budget.
"""
from __future__ import annotations

import json
import math
import re
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from harness.errors import HarnessError
from harness.specs import HealConfig
from harness.reports.toolkit import (atomic_write_text, domains, markdown_table, paired_log_se,
                                     pyplot, read_rows, save_figure, window_nll)

STUDY = "healing"
TARGET = 0.95  # of the fine-tuned original's final acc_mean (issue 13)
GOAL_KV, GOAL_TOKENS = 0.8125, 100_000_000  # the goal: >= 95% at -81.25% KV with <= 100M tokens
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
        if _num(row.get(col)) is None and metric == "primary" and not _is_curve_point(row):
            col = f"{t}/acc"
        v = _num(row.get(col))
        if v is None:
            return math.nan, math.nan
        vals.append(v)
        ses.append(_num(row.get(col + "_stderr")))
    if not vals:
        return math.nan, math.nan
    se = math.sqrt(sum(e * e for e in ses)) / len(ses) if all(e is not None for e in ses) else math.nan
    return sum(vals) / len(vals), se


def _is_curve_point(row) -> bool:
    return isinstance(row, dict) and "mark" in row


def _num(v) -> float | None:
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
        name = "fine-tuned original" if self.is_reference else f"{self.method} @ {_kv(self.kv_save)}"
        return name + (f" — partial (stopped at {tokens_str(self.partial_at)} tokens)" if self.partial_at is not None
                       else "")

    def throughput(self) -> tuple[float | None, float | None]:
        """(median tokens/s over the log's steps, peak GPU GiB)."""
        tps = [r["tokens_per_s"] for r in self.log if _num(r.get("tokens_per_s")) is not None]
        gib = [r["gpu_memory_gib"] for r in self.log if _num(r.get("gpu_memory_gib")) is not None]
        return (statistics.median(tps) if tps else self.tokens_per_s, max(gib) if gib else self.peak_gib)


def row_point(row, doms: list[str], tokens: int, mark: int, source: str) -> dict:
    """A curve point from a full evaluation (a one-shot or healed row): perplexities, acc_mean ± stderr."""
    p = {"tokens": int(tokens), "mark": int(mark), "source": source}
    p.update({f"ppl_{d}": _num(row.get(f"ppl_{d}")) for d in doms})
    tasks = asked_tasks(row)
    p["acc_primary"], p["acc_primary_se"] = acc_mean(row, tasks, "primary")
    p["acc_plain"], p["acc_plain_se"] = acc_mean(row, tasks, "acc")
    return p


def curve_point(c: dict, doms: list[str], tasks: list[str]) -> dict:
    """A point of a healing curve (no stderr recorded). Curves from before the curve averaged each task's
    paper metric recorded `<task>/acc` only and an acc_mean over it: that acc_mean is the plain-acc mean."""
    p = {"tokens": int(c["tokens"]), "mark": int(c.get("mark", c["tokens"])), "source": "curve"}
    p.update({f"ppl_{d}": _num(c.get(f"ppl_{d}")) for d in doms})
    p["acc_primary"] = acc_mean(c, tasks, "primary")[0]
    p["acc_plain"] = acc_mean(c, tasks, "acc")[0]
    given = _num(c.get("acc_mean"))
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
    shot = one_shot_rows(df)
    hits = [r for _, r in shot.iterrows() if _key(r) == key]
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
    final_tokens = int(_num(row.get("heal_tokens")) or info.get("tokens_seen") or 0)
    budget = info.get("tokens_budget") or (info.get("spec") or {}).get("tokens") or final_tokens
    zero = row_point(shot, doms, 0, 0, "one-shot row") if shot is not None else None
    middle = [curve_point(c, doms, tasks) for c in info.get("curve", [])]
    final = row_point(row, doms, final_tokens, int(budget), "healed row")
    note = None if shot is not None else (f"{row['method']} @ {_kv(row.get('budget_kv_save'))} {row['heal']}: no "
                                          "one-shot row (heal none) of the same job: its curve starts at its first mark")
    c = Curve(row["model"], row["method"], _num(row.get("budget_kv_save")), str(row["heal"]), str(row["job_id"]),
              tasks, assemble(zero, middle, final), int(budget), None, info.get("log") or [],
              _num(info.get("tokens_per_s")), _num(info.get("gpu_memory_gib")), info.get("spec") or {})
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
                or _num(entry.get("tokens_seen")) is None:
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
    a, b = _num(a), _num(b)
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
    gib = [_num(r.get("gpu_memory_gib")) for r in (log or entry.get("log_last") or [])]
    gib = [g for g in gib if g is not None]
    return Curve(key[0], key[1], _num(key[2]), heal, job_id, tasks, assemble(zero, middle, None),
                 spec.get("tokens"), int(entry["tokens_seen"]), log, _num(entry.get("tokens_per_s_last20")),
                 max(gib) if gib else None, spec)


# ------------------------------------------------------------------------------------- numbers
def tokens_to_reach(tokens: list[float], values: list[float], target: float) -> float | None:
    """The first token count at which the curve reaches `target`, interpolating linearly between
    points; None if it never does."""
    pts = [(t, v) for t, v in zip(tokens, values) if _num(v) is not None]
    for i, (t, v) in enumerate(pts):
        if v >= target:
            if i == 0:
                return float(t)
            t0, v0 = pts[i - 1]
            return t0 + (target - v0) * (t - t0) / (v - v0)
    return None


def choose_metric(curves: list[Curve]) -> str:
    """`primary` when every curve has its paper metric at every point, else `acc` (plain accuracy,
    which every row and curve records): one metric for the whole report, so lines compare."""
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
    return f"{t / 1e9:.3g}B" if t >= 1e9 else f"{t / 1e6:.3g}M" if t >= 1e6 else f"{t / 1e3:.3g}k" if t >= 1e3 \
        else f"{t:.0f}"


def _kv(v) -> str:
    v = _num(v)
    return "-" if v is None else f"-{100 * v:g}% KV"


def _approx(text: str, recorded_se) -> str:
    """'± ≈s' where the stderr stands in from the nearest row point (a curve mark records none)."""
    return text.replace("± ", "± ≈") if pd.isna(recorded_se) else text


def pct(v, se=math.nan) -> str:
    if _num(v) is None:
        return ""
    return f"{100 * v:.1f}" + (f" ± {100 * se:.1f}" if _num(se) is not None else "")


# ------------------------------------------------------------------------------------- figures
def _style(curves: list[Curve]):
    """Colour per method, marker per budget."""
    plt = pyplot()
    methods = sorted({c.method for c in curves if not c.is_reference}, key=str.lower)
    budgets = sorted({c.kv_save for c in curves if c.kv_save is not None})
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return ({m: colours[i % len(colours)] for i, m in enumerate(methods)},
            {b: "osD^v<>"[i % 7] for i, b in enumerate(budgets)})


def _token_axis(ax, curves: list[Curve]) -> None:
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ts = sorted({float(t) for c in curves for t in c.points["tokens"]})
    positive = [t for t in ts if t > 0]
    ax.set_xscale("symlog", linthresh=min(positive) if positive else 1.0, linscale=0.4)
    ax.xaxis.set_major_locator(FixedLocator(sorted({0.0} | {float(round(t, -5)) for t in positive})))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: tokens_str(x)))
    ax.tick_params(axis="x", labelsize=7)
    ax.set_xlabel("training tokens")


def _plain_y(ax) -> None:
    """Plain numbers on a log axis (20, 50, 100, not 2 x 10^1)."""
    from matplotlib.ticker import FuncFormatter

    fmt = FuncFormatter(lambda y, _: f"{y:.3g}")
    ax.yaxis.set_major_formatter(fmt)
    ax.yaxis.set_minor_formatter(fmt if ax.get_ylim()[1] / ax.get_ylim()[0] < 10 else FuncFormatter(lambda y, _: ""))


def _draw(ax, c: Curve, col: str, colours, markers, se_col: str | None = None) -> None:
    pts = c.points.dropna(subset=[col])
    if not len(pts):
        return
    kw = dict(color="black" if c.is_reference else colours[c.method],
              marker="*" if c.is_reference else markers.get(c.kv_save, "o"),
              linestyle=":" if c.partial_at is not None else "-", label=c.label, markersize=5, linewidth=1.5)
    ax.plot(pts["tokens"], pts[col], **kw)
    if se_col and se_col in pts:
        e = pts.dropna(subset=[se_col])
        ax.errorbar(e["tokens"], e[col], yerr=e[se_col], fmt="none", ecolor=kw["color"], capsize=2, linewidth=0.8)


def recovery_figures(results: Path, curves: list[Curve], untrained, doms: list[str], metric: str) -> list[Path]:
    """recovery_acc.png (acc_mean vs tokens, a panel per recipe) and recovery_ppl.png (a row per domain)."""
    plt = pyplot()
    recipes = sorted({c.heal for c in curves})
    colours, markers = _style(curves)
    out = []
    col = acc_col(metric)
    if any(c.points[col].notna().any() for c in curves):
        fig, axes = plt.subplots(1, len(recipes), figsize=(5.2 * len(recipes), 4.6), squeeze=False, layout="constrained")
        for ax, h in zip(axes[0], recipes):
            group = [c for c in curves if c.heal == h]
            for c in sorted(group, key=lambda c: (c.is_reference, c.method, c.kv_save or 0)):
                _draw(ax, c, col, colours, markers, col + "_se")
            ref = next((r for r in group if r.is_reference), None)
            if ref is not None and pd.notna(final_point(ref)[col]):
                ax.axhline(TARGET * final_point(ref)[col], color="black", linewidth=0.7, linestyle="-.",
                           label=f"95% of the fine-tuned original's last point")
            if untrained is not None and pd.notna(untrained[col]):
                ax.axhline(untrained[col], color="grey", linestyle="--", linewidth=1, label="untrained original")
            _token_axis(ax, group)
            ax.set_title(f"recipe {h}", fontsize=10)
            ax.set_ylabel("acc_mean" + (" (plain acc)" if metric == "acc" else ""))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6.5, loc="best")
        out.append(save_figure(fig, results / "recovery_acc.png"))
    fig, axes = plt.subplots(len(doms), len(recipes), figsize=(5.2 * len(recipes), 3.4 * len(doms)),
                             squeeze=False, layout="constrained")
    for i, d in enumerate(doms):
        for ax, h in zip(axes[i], recipes):
            group = [c for c in curves if c.heal == h]
            for c in sorted(group, key=lambda c: (c.is_reference, c.method, c.kv_save or 0)):
                _draw(ax, c, f"ppl_{d}", colours, markers)
            if untrained is not None and pd.notna(untrained.get(f"ppl_{d}")):
                ax.axhline(untrained[f"ppl_{d}"], color="grey", linestyle="--", linewidth=1, label="untrained original")
            ax.set_yscale("log")
            _plain_y(ax)
            _token_axis(ax, group)
            ax.set_title(f"{d} perplexity — recipe {h}", fontsize=10)
            ax.grid(alpha=0.3, which="both")
            if i == 0:
                ax.legend(fontsize=6.5, loc="best")
    out.append(save_figure(fig, results / "recovery_ppl.png"))
    return out


# ------------------------------------------------------------------------------------- the report
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
        notes.append(f"{c.label.split(' — ')[0]}, {heal}: partial run {job_id} ({steps}, {tokens_str(c.partial_at)} "
                     f"tokens; found by {how})" + (": training finished but the job has no row (its final "
                                                   "evaluation did not complete)" if entry.get("step") == entry.get("steps")
                                                   else ""))
    if not curves:
        raise HarnessError(f"{results} has no healed rows (heal other than none) among its {len(df)} finished rows"
                           + (" and no partial run that matches a job" if partial else "")
                           + "; run a healing sweep (e.g. mla-harness sweep sweeps/paper-mha2mla-heal.yaml) or pass "
                             "--partial heal_partial.json with the healing checkpoints' curves")
    metric = choose_metric(curves)
    base = one_shot_rows(df)[one_shot_rows(df)["method"] == "baseline"]
    untrained = row_point(base.iloc[-1], doms, 0, 0, "one-shot row") if len(base) else None
    if untrained is not None:
        untrained = {k: v for k, v in untrained.items()}
        untrained.update({acc_col(metric): untrained[acc_col(metric)]})
    return Study(results, df, doms, curves, metric, untrained, notes, Path(partial) if partial else None)


def recovery_table(st: Study) -> tuple[pd.DataFrame, list[dict]]:
    """One row per converted curve: start, final, the fine-tuned original's final, % of it (and ppl
    ratios), the paired difference, tokens to 95%, throughput."""
    col = acc_col(st.metric)
    out, facts = [], []
    for c in sorted((c for c in st.curves if not c.is_reference), key=lambda c: (c.kv_save or 0, c.heal, c.method)):
        ref = reference_for(st.curves, c)
        p0 = c.points.iloc[0]
        pf = final_point(c)
        rf = final_point(ref) if ref is not None else None
        se_f = approx_se(c, st.metric, len(c.points) - 1)
        se_r = approx_se(ref, st.metric, len(ref.points) - 1) if ref is not None else math.nan
        approx = pd.isna(pf[col + "_se"]) or rf is None or pd.isna(rf[col + "_se"])
        ratio = pf[col] / rf[col] if rf is not None else math.nan
        ratio_se = ratio * math.hypot(se_f / pf[col], se_r / rf[col]) if rf is not None else math.nan
        target = TARGET * rf[col] if rf is not None else math.nan
        reach = tokens_to_reach(list(c.points["tokens"]), list(c.points[col]), target) if rf is not None else None
        last = pf["tokens"]
        paired = None
        if rf is not None and c.partial_at is None and ref.partial_at is None:
            paired = paired_acc(st.results, ref.job_id, c.job_id, c.tasks, st.metric)
        tps, gib = c.throughput()
        r = {"method": c.method, "KV save": _kv(c.kv_save), "recipe": c.heal,
             "run": "finished" if c.partial_at is None else f"partial @ {tokens_str(c.partial_at)}",
             "start (0)": pct(p0[col], approx_se(c, st.metric, 0)) if p0["tokens"] == 0 else "",
             "last": f"{_approx(pct(pf[col], se_f), pf[col + '_se'])} @ {tokens_str(last)}",
             "fine-tuned original": "" if rf is None else
             f"{_approx(pct(rf[col], se_r), rf[col + '_se'])} @ {tokens_str(rf['tokens'])}"
             + (" (partial)" if ref.partial_at else ""),
             "% of it": pct(ratio, ratio_se).replace("± ", "± ≈" if approx else "± "),
             "paired Δ [95%]": "" if not paired else
             f"{100 * paired['delta']:+.1f} [{100 * paired['lo']:+.1f}, {100 * paired['hi']:+.1f}]"}
        for d in st.doms:
            v = pf[f"ppl_{d}"] / rf[f"ppl_{d}"] if rf is not None and rf[f"ppl_{d}"] else math.nan
            se = ppl_ratio_se(st.results, c.job_id, ref.job_id, d) if rf is not None and c.partial_at is None \
                and ref.partial_at is None else math.nan
            r[f"ppl ratio {d}"] = "" if pd.isna(v) else f"{v:.2f}" + (f" ± {v * se:.2f}" if pd.notna(se) else "")
        r["tokens to 95%"] = ("" if rf is None else tokens_str(reach) if reach is not None
                              else f"not reached by {tokens_str(last)}")
        r["tokens/s (median)"] = ("" if tps is None else f"{tps:,.0f}"
                                  + (" (last 20)" if not c.log and c.partial_at is not None else ""))
        r["peak GiB"] = "" if gib is None else f"{gib:.1f}"
        out.append(r)
        facts.append({"curve": c, "ref": ref, "ratio": ratio, "share": r["% of it"], "reach": reach, "last": last,
                      "target": target})
    return pd.DataFrame(out), facts


def marks_table(st: Study, curves: list[Curve], col: str, digits: str = "pct") -> pd.DataFrame:
    """Curves x marks: the value at each mark (rows a curve label)."""
    data = {}
    for c in curves:
        name = f"{c.heal}: {c.label}"
        data[name] = {int(m): v for m, v in zip(c.points["mark"], c.points[col]) if pd.notna(v)}
    frame = pd.DataFrame(data).T
    frame = frame.reindex(columns=sorted(frame.columns))
    frame.columns = [tokens_str(m) for m in frame.columns]
    return frame.map(lambda v: "" if pd.isna(v) else (f"{100 * v:.1f}" if digits == "pct" else f"{v:.2f}"))


def recipes_section(st: Study) -> list[str]:
    """LoRA vs full vs KD at equal tokens (marks shared by several recipes)."""
    recipes = sorted({c.heal for c in st.curves})
    lines = ["## Recipes at equal tokens (LoRA vs full vs KD)", ""]
    if len(recipes) < 2:
        return lines + [f"This sweep has one recipe ({recipes[0]}): there is no comparison between recipes to make.", ""]
    col = acc_col(st.metric)
    lines += [f"acc_mean (%) and its recovery against the fine-tuned original trained with the same recipe to the same "
              f"mark (DESIGN §10: score(converted, t) / score(original fine-tuned, t)), at the marks that several "
              f"recipes share. Recipes: {', '.join(recipes)}.", ""]
    groups: dict = {}
    for c in st.curves:
        if not c.is_reference:
            groups.setdefault((c.method, c.kv_save), []).append(c)
    for (method, kv), cs in sorted(groups.items(), key=lambda x: (x[0][1] or 0, x[0][0])):
        marks = {}
        for c in cs:
            for m in c.points["mark"]:
                marks[int(m)] = marks.get(int(m), 0) + 1
        shared = sorted(m for m, k in marks.items() if k > 1 and m > 0)
        if not shared:
            continue
        rows = {}
        for c in sorted(cs, key=lambda c: c.heal):
            ref = reference_for(st.curves, c)
            cells = {}
            for m in shared:
                v = _at_mark(c, m, col)
                r = _at_mark(ref, m, col) if ref is not None else None
                cells[tokens_str(m)] = "" if v is None else f"{100 * v:.1f}" + (f" ({100 * v / r:.0f}%)" if r else "")
            rows[c.heal + (" (partial)" if c.partial_at is not None else "")] = cells
        lines += [f"**{method} @ {_kv(kv)}**", "", markdown_table(pd.DataFrame(rows).T, fmt=str, index_name="recipe"), ""]
    if len(lines) == 4:
        lines += ["No two recipes share a mark yet.", ""]
    return lines


def _at_mark(c: Curve, mark: int, col: str) -> float | None:
    hit = c.points[c.points["mark"] == mark]
    return None if not len(hit) or pd.isna(hit[col].iloc[-1]) else float(hit[col].iloc[-1])


def init_section(st: Study, facts: list[dict]) -> list[str]:
    """Does a covariance-aware start save tokens? Each initialisation against the first (mha2mla-like)
    one at every shared mark, in numbers, with the stderr."""
    col = acc_col(st.metric)
    lines = ["## Does a covariance-aware start save tokens?", ""]
    groups: dict = {}
    for c in st.curves:
        if not c.is_reference:
            groups.setdefault((c.kv_save, c.heal), []).append(c)
    reach = {id(f["curve"]): f for f in facts}
    said = False
    for (kv, heal), cs in sorted(groups.items(), key=lambda x: (x[0][0] or 0, x[0][1])):
        if len({c.method for c in cs}) < 2:
            continue
        cs = sorted(cs, key=lambda c: (not c.method.lower().startswith("mha2mla"), c.method.lower()))
        base = cs[0]
        for other in cs[1:]:
            said = True
            marks = sorted(set(base.points["mark"]) & set(other.points["mark"]))
            cells, big = [], 0
            for m in marks:
                i = int((base.points["mark"] == m).to_numpy().nonzero()[0][-1])
                j = int((other.points["mark"] == m).to_numpy().nonzero()[0][-1])
                a, b = base.points[col].iloc[i], other.points[col].iloc[j]
                if pd.isna(a) or pd.isna(b):
                    continue
                se = math.hypot(approx_se(base, st.metric, i), approx_se(other, st.metric, j))
                approx = pd.isna(base.points[col + "_se"].iloc[i]) or pd.isna(other.points[col + "_se"].iloc[j])
                big += pd.notna(se) and abs(b - a) > 2 * se
                cells.append(f"{tokens_str(m)}: {100 * b:.1f} vs {100 * a:.1f} ({100 * (b - a):+.1f}"
                             + (f" ± {'≈' if approx else ''}{100 * se:.1f}" if pd.notna(se) else "") + ")")
            fa, fb = reach.get(id(base)), reach.get(id(other))
            reach_text = ""
            if fa and fb and pd.notna(fa["target"]):
                ra = tokens_str(fa["reach"]) if fa["reach"] is not None else f"not by {tokens_str(fa['last'])}"
                rb = tokens_str(fb["reach"]) if fb["reach"] is not None else f"not by {tokens_str(fb['last'])}"
                reach_text = f" Tokens to 95% of the fine-tuned original: {other.method} {rb}, {base.method} {ra}"
                if fa["reach"] is not None and fb["reach"] is not None:
                    reach_text += f" ({tokens_str(abs(fa['reach'] - fb['reach']))} " + \
                                  ("fewer" if fb["reach"] < fa["reach"] else "more") + f" for {other.method})"
                reach_text += "."
            paired = None
            if base.partial_at is None and other.partial_at is None:
                paired = paired_acc(st.results, base.job_id, other.job_id, base.tasks, st.metric)
            verdict = (f"{big} of {len(cells)} marks differ by more than 2 SE" if cells else "no shared mark")
            lines += [f"- **{other.method} vs {base.method} @ {_kv(kv)}, {heal}** (acc_mean %, {other.method} "
                      f"vs {base.method}, difference ± SE): " + "; ".join(cells) + f". {verdict}." + reach_text
                      + (f" Paired on the last point's documents: {100 * paired['delta']:+.1f} "
                         f"[{100 * paired['lo']:+.1f}, {100 * paired['hi']:+.1f}] (95%, "
                         f"{'significant' if paired['significant'] else 'not significant'})." if paired else "")]
            ppl = []
            for d in st.doms:
                pa, pb = _at_mark(base, int(base.points['mark'].iloc[-1]), f"ppl_{d}"), \
                    _at_mark(other, int(other.points['mark'].iloc[-1]), f"ppl_{d}")
                if pa and pb and base.points["tokens"].iloc[-1] == other.points["tokens"].iloc[-1]:
                    ppl.append(f"{d} {pb:.2f} vs {pa:.2f}")
            if ppl:
                lines[-1] += " Perplexity at the last shared point: " + ", ".join(ppl) + "."
    if not said:
        lines += ["The sweep has one initialisation per budget and recipe: nothing to compare.", ""]
    else:
        lines += ["", "± is sqrt(se_a² + se_b²) from lm-eval's stderrs (unpaired, so conservative); ≈ marks a curve "
                  "point, which records no stderr: the nearest row point's of the same curve stands in (the same "
                  "documents). Differences within 2 SE are not evidence either way.", ""]
    return lines


def goal_lines(st: Study, facts: list[dict]) -> list[str]:
    at = [f for f in facts if f["curve"].kv_save is not None and abs(f["curve"].kv_save - GOAL_KV) < 1e-9]
    if not at:
        return []
    lines = [f"**Goal** (issue 13): ≥ 95% of the fine-tuned original's acc_mean at {_kv(GOAL_KV)} with ≤ "
             f"{tokens_str(GOAL_TOKENS)} tokens (MHA2MLA: 94.6% after 2.25B tokens). Where the curves stand:", ""]
    for f in at:
        c = f["curve"]
        status = (f"reached at {tokens_str(f['reach'])} tokens" if f["reach"] is not None and f["reach"] <= GOAL_TOKENS
                  else f"not reached by {tokens_str(f['last'])} tokens")
        ref_note = " (against a partial fine-tuned original)" if f["ref"] is not None and f["ref"].partial_at else ""
        lines.append(f"- {c.method}, {c.heal}{' (partial)' if c.partial_at else ''}: {f['share']}% "
                     f"of the fine-tuned original at {tokens_str(f['last'])} tokens{ref_note}; {status}"
                     if pd.notna(f["ratio"]) else f"- {c.method}, {c.heal}: no fine-tuned original with this recipe")
    return lines + [""]


def setup_lines(st: Study) -> list[str]:
    df = st.df
    models = ", ".join(sorted(df["model"].unique()))
    lines = ["## Setup", "", f"- model: {models}; rows from `{df.attrs.get('source', 'rows.parquet')}` "
             f"({len(df)} finished rows; sweep {', '.join(sorted(df['sweep'].dropna().unique())) if 'sweep' in df else '?'})"]
    cfg = next((st.results / "runs" / str(j) / "config.json" for j in df["job_id"]
                if (st.results / "runs" / str(j) / "config.json").exists()), None)
    if cfg is not None:
        ev = json.loads(cfg.read_text())["eval"]
        p = ev["ppl"]
        lines.append(f"- evaluation, the same for every point: perplexity on {p['samples']} windows x {p['seq_len']} tokens "
                     f"of {', '.join(p['domains'])} (eval split, seed {p['seed']}); tasks {', '.join(ev['tasks'])}"
                     + (f", the first {ev['limit']} documents of each" if ev.get("limit") else " (full sets)"))
    from harness.tasks import task_metric

    tasks = sorted({t for c in st.curves for t in c.tasks})
    lines.append("- acc_mean: the mean over the job's tasks of " + (
        ", ".join(f"{t}/{task_metric(t)}" for t in tasks) + " (each paper's metric)" if st.metric == "primary" else
        "plain acc (" + ", ".join(f"{t}/acc" for t in tasks) + "): some curve here recorded no paper metric "
        "(partial runs from before the curve averaged each task's paper metric averaged acc), so every line uses acc"))
    seen = set()
    for c in sorted(st.curves, key=lambda c: c.heal):
        if c.heal in seen or not c.spec:
            continue
        seen.add(c.heal)
        s = {**asdict(HealConfig()), **c.spec}  # the defaults for what an older record lacks
        corpora = s.get("corpora") or []
        weights = s.get("weights") or []
        mix = ", ".join(f"{k} {w:g}" for k, w in zip(corpora, weights)) if weights else ", ".join(corpora)
        tps = s.get("batch_size", 0) * s.get("grad_accum", 0) * s.get("seq_len", 0)
        lines.append(f"- recipe {c.heal}: {s.get('mode')} on {tokens_str(s.get('tokens'))} tokens, lr {s.get('lr'):g}, "
                     f"{s.get('schedule')} schedule, {tps:,} tokens/step ({s.get('batch_size')} x {s.get('grad_accum')} "
                     f"x {s.get('seq_len')}), mix {mix}"
                     + (f", KD weight {s['kd_weight']:g}" if s.get("kd_weight") else "")
                     + (f", LoRA r{s['lora_rank']} on {', '.join(s.get('targets', []))}" if s.get("mode") == "lora" else "")
                     + f"; curve marks {', '.join(tokens_str(m) for m in s.get('eval_every_tokens', []))}")
    if st.untrained is not None:
        u = st.untrained
        lines.append("- untrained original: " + ", ".join(f"{d} ppl {u[f'ppl_{d}']:.2f}" for d in st.doms
                                                         if u.get(f"ppl_{d}")) +
                     (f", acc_mean {pct(u[acc_col(st.metric)], u[acc_col(st.metric) + '_se'])}"
                      if pd.notna(u[acc_col(st.metric)]) else ""))
    return lines + [""]


def machine_of(df: pd.DataFrame, given: str) -> str:
    for col in ("machine", "device_name", "gpu"):
        if col in df and df[col].notna().any():
            return ", ".join(sorted(df[col].dropna().astype(str).unique()))
    return given or "not recorded in the rows (pass --machine)"


def build_report(results: Path, partial: Path | None = None, machine: str = "", sweep: str | None = None,
                 overrides: list[str] = (), command: str = "") -> Path:
    """Write REPORT.md, recovery_acc.png and recovery_ppl.png into `results`; return REPORT.md's path."""
    results = Path(results)
    st = gather(results, partial, sweep, overrides)  # raises before anything is written
    command = command or f"mla-harness report {STUDY} {results}" + (f" --partial {partial}" if partial else "")
    table, facts = recovery_table(st)
    figs = recovery_figures(results, st.curves, st.untrained, st.doms, st.metric)
    col = acc_col(st.metric)
    partials = [c for c in st.curves if c.partial_at is not None]
    lines = [f"# Healing: recovery against the fine-tuned original ({', '.join(sorted(st.df['model'].unique()))})", "",
             f"Generated by `{command}`. Machine: {machine_of(st.df, machine)}. Spec: DESIGN §10; issue 13.", ""]
    lines += setup_lines(st)
    lines += ["## Recovery", "",
              "Each healed job against the fine-tuned original (the unconverted model trained with the same recipe on "
              "the same tokens). acc_mean in % ± lm-eval's stderr; *% of it* = last / the fine-tuned original's last "
              "point (± from both stderrs); *paired Δ* = the difference on the same documents, paired bootstrap 95% "
              "interval (finished rows only); *ppl ratio* = last ppl / the fine-tuned original's (± paired over "
              "windows where the runs kept per-window NLLs); *tokens to 95%* interpolates linearly between curve "
              "points; throughput: median tokens/s over the training steps and peak GPU memory of that process.", "",
              markdown_table(table.set_index("method"), fmt=str) if len(table) else "No converted job is healed yet.", ""]
    lines += goal_lines(st, facts)
    for f in figs:
        what = "acc_mean" if "acc" in f.name else "perplexity per domain (log scale)"
        caption = (f"{what} vs training tokens, a panel per recipe; black: the fine-tuned original; grey dashed: the "
                   "untrained original; dotted: partial runs" + ("; bars: lm-eval's stderr" if "acc" in f.name else ""))
        lines += [f"![{caption}]({f.name})", "", f"*{caption}* — regenerate with `{command}`", ""]
    lines += ["## The curves", "", f"acc_mean (%) at each mark ({'plain acc' if st.metric == 'acc' else 'paper metric'}); "
              "0 is the one-shot row, the last column of a finished run its healed row.", "",
              markdown_table(marks_table(st, sorted(st.curves, key=lambda c: (c.heal, not c.is_reference, c.method)), col),
                             fmt=str, index_name="recipe: curve"), ""]
    for d in st.doms:
        lines += [f"{d} perplexity at each mark:", "",
                  markdown_table(marks_table(st, sorted(st.curves, key=lambda c: (c.heal, not c.is_reference, c.method)),
                                             f"ppl_{d}", "ppl"), fmt=str, index_name="recipe: curve"), ""]
    lines += recipes_section(st)
    lines += init_section(st, facts)
    lines += ["## Caveats", ""]
    caveats = list(st.notes)
    if partials:
        caveats.append(f"{len(partials)} curve(s) come from healing checkpoints of jobs that did not finish "
                       f"(`{st.partial_file}`): drawn dotted; their points are what the checkpoint recorded, with no "
                       "stderr and no per-document scores, so no paired comparison is made for them")
    if st.metric == "acc":
        caveats.append("partial curves from before the curve's fix recorded each task's plain acc (e.g. "
                       "`mha2mla_eval/acc`) and averaged it: their acc_mean is plain accuracy, not the paper's metric "
                       "(acc_norm_nospace for MHA2MLA); every acc_mean in this report is therefore plain acc, so that the "
                       "lines compare")
    if any(c.partial_at is not None for c in st.curves if c.is_reference):
        caveats.append("a fine-tuned original is itself partial: % of it and tokens to 95% are against its last "
                       "recorded point, not against the recipe's full budget")
    caveats.append("throughput is per process: a sharded sweep runs several jobs on one GPU at once, so tokens/s is "
                   "each process's share, comparable only within one session on one machine")
    caveats.append("one training seed per job: the spread over seeds is not measured, only the evaluation's noise")
    lines += [f"- {c}" for c in caveats] + [""]
    out = results / "REPORT.md"
    atomic_write_text(out, "\n".join(lines).rstrip() + "\n")
    return out


# --------------------------------------------------------------------------------------- CLI
def cmd_healing(a) -> int:
    """Write REPORT.md and its recovery curves into a healing sweep's results folder."""
    parts = [f"mla-harness report {STUDY} {a.results_dir}"]
    parts += [f"--partial {a.partial}"] if a.partial else []
    parts += [f"--sweep {a.sweep}"] if a.sweep else []
    parts += [f"--set '{s}'" for s in a.set or []]
    parts += [f"--machine '{a.machine}'"] if a.machine else []
    out = build_report(Path(a.results_dir), a.partial, a.machine, a.sweep, a.set or [], " ".join(parts))
    print(f"wrote {out} and its figures")
    return 0


def add_parser(sub) -> None:
    """`mla-harness report healing RESULTS_DIR [--partial F] [--sweep YAML --set K=V] [--machine TEXT]`."""
    s = sub.add_parser(STUDY, help=cmd_healing.__doc__, description=__doc__.split("\n\n")[0])
    s.add_argument("results_dir", help="the healing sweep's results folder, e.g. results/paper-mha2mla-heal")
    s.add_argument("--partial", type=Path, help="heal_partial.json: the curves of healing checkpoints whose jobs "
                                                "did not finish (drawn dotted)")
    s.add_argument("--sweep", help="the sweep's YAML, to find the jobs of partial runs by their job ids")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="the sweep's overrides, as given to "
                                                                      "`mla-harness sweep` (repeatable)")
    s.add_argument("--machine", default="", help="where the rows were measured, for the header (rows do not record it)")
    s.set_defaults(report_func=cmd_healing)

