"""What every study report shares: reading a sweep's rows, ratios to the baseline with paired
uncertainties, markdown tables, figures saved atomically, and the command that regenerates them.

A report is code (STYLE 13): one command over `<results>/rows.parquet` (and the per-window NLLs in
`<results>/runs/<job_id>/metrics.json`) writes `<results>/REPORT.md` and its PNG figures; every
figure sits beside the command that regenerates it.

    from harness.reports.toolkit import read_rows, markdown_table, save_figure, regenerate_line
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import pandas as pd

from harness.errors import HarnessError
from harness.paths import atomic_write_text, save_figure  # noqa: F401 (the reports import them from here)


# ----------------------------------------------------------------------------------- the rows
def run_rows(results: Path) -> list[dict]:
    """The row.json of every finished job (runs/<job_id>/; the dot-folders of failed, running or killed
    jobs are not finished), as `mla-harness sweep` collects them into rows.parquet."""
    runs = Path(results) / "runs"
    done = [d for d in sorted(runs.iterdir()) if not d.name.startswith(".")] if runs.exists() else []
    return [json.loads((d / "row.json").read_text()) for d in done if (d / "row.json").exists()]


def read_rows(results: Path) -> pd.DataFrame:
    """The finished rows of a sweep's results folder (status ok).

    From rows.parquet, or from runs/*/row.json where rows.parquet is missing or stale (a job finished
    after the last collection, e.g. one shard of a sweep still running): `df.attrs["source"]` says which.

    Raises:
        HarnessError: no rows.parquet and no finished job (the sweep has not run), or no finished row.
    """
    f = Path(results) / "rows.parquet"
    runs = run_rows(results)
    if f.exists():
        df = pd.read_parquet(f)
        missing = {r["job_id"] for r in runs} - set(df.get("job_id", pd.Series(dtype=str)))
        source = "rows.parquet"
        if missing:
            df, source = pd.DataFrame(runs), f"runs/*/row.json ({len(missing)} finished job(s) not in rows.parquet)"
    elif runs:
        df, source = pd.DataFrame(runs), "runs/*/row.json (no rows.parquet)"
    else:
        raise HarnessError(f"{f} does not exist; run the sweep first (mla-harness sweep sweeps/<name>.yaml)")
    if "status" in df:
        df = df[df["status"] == "ok"]
    if not len(df):
        raise HarnessError(f"{f} has no finished rows; run the sweep (failed jobs are in runs/.<job_id>.failed)")
    df = df.reset_index(drop=True)
    df.attrs["source"] = source
    return df


def domains(df: pd.DataFrame) -> list[str]:
    """Evaluation domains: the `ppl_<domain>` columns, in column order."""
    return [c[4:] for c in df.columns if c.startswith("ppl_")]


def with_ratios(df: pd.DataFrame) -> pd.DataFrame:
    """`ratio_<domain>` = ppl / the same model's baseline ppl on that domain (NaN without one)."""
    df = df.copy()
    base = df[df["method"] == "baseline"]
    for d in domains(df):
        ref = base.dropna(subset=[f"ppl_{d}"]).drop_duplicates("model", keep="last").set_index("model")[f"ppl_{d}"]
        df[f"ratio_{d}"] = df[f"ppl_{d}"] / df["model"].map(ref)
    return df


# --------------------------------------------------------------------- per-window uncertainties
def window_nll(results: Path, job_id: str) -> dict[str, list[float]]:
    """{domain: mean NLL of each eval window} of one job (runs/<job_id>/metrics.json); {} if absent."""
    f = Path(results) / "runs" / str(job_id) / "metrics.json"
    if not f.exists():
        return {}
    ppl = json.loads(f.read_text()).get("ppl", {})
    return {d: r["nll_windows"] for d, r in ppl.items() if isinstance(r, dict) and r.get("nll_windows")}


def paired_log_se(a: list[float], b: list[float]) -> float:
    """Standard error of log(ppl_a / ppl_b) from the two models' NLLs on the same windows.

    log(ppl_a / ppl_b) is the mean over windows of nll_a - nll_b (windows of equal length), so its
    standard error is sd(nll_a - nll_b) / sqrt(n): the window-to-window difficulty cancels. For a
    ratio near 1 it is also the relative standard error of the ratio. NaN with fewer than 2 windows
    or windows that do not pair.
    """
    if len(a) != len(b) or len(a) < 2:
        return math.nan
    diff = [x - y for x, y in zip(a, b)]
    mean = sum(diff) / len(diff)
    var = sum((x - mean) ** 2 for x in diff) / (len(diff) - 1)
    return math.sqrt(var / len(diff))


# ------------------------------------------------------------------------------------ markdown
def fmt_num(v, digits: int = 2) -> str:
    """A number for a table: '' for missing, fixed digits, 4 significant digits when large."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, (int,)) and not isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) < 1000 else f"{v:.4g}"
    return str(v)


def markdown_table(frame: pd.DataFrame, fmt: Callable | None = None, index: bool = True,
                   index_name: str | None = None) -> str:
    """A pipe table of `frame` (its index as the first column when `index`); cells through `fmt`."""
    fmt = fmt or fmt_num
    cols = [str(c) for c in frame.columns]
    head = ([index_name if index_name is not None else (frame.index.name or "")] if index else []) + cols
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, row in frame.iterrows():
        cells = ([str(key)] if index else []) + [fmt(v) for v in row.tolist()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- figures
def pyplot():
    """matplotlib.pyplot on the Agg back-end (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt




def regenerate_line(study: str, results: Path) -> str:
    """The command that rewrites a report and all its figures, as a markdown line."""
    return f"Regenerate with: `mla-harness report {study} {results}`"


def figure_block(path: Path, caption: str, study: str, results: Path) -> str:
    """Markdown for one figure (relative to REPORT.md), its caption and the command that regenerates it."""
    return f"![{caption}]({Path(path).name})\n\n*{caption}* — {regenerate_line(study, results)}\n"
