"""Leaderboards from result rows: the console summary, leaderboard.md / .csv / .html and plots.

    mla-harness leaderboard results/quick      # or: make leaderboard

One row per model x method x budget (x calibration corpus, x healing): mean accuracy over the
requested lm-eval tasks, per-task accuracy, perplexity per domain and its ratio to the same
model's unconverted baseline, KV save and ranks. leaderboard.html is one self-contained file (a
table sortable by clicking its headers, the plots inlined). Plots go to <results>/plots/:
    ppl_vs_kv_<model>.png           perplexity vs KV save, a line per method (log y), a panel per domain
    ranks_<model>.png               cache width per layer, a line per method, a panel per budget
    calib_heatmap_<model>_<b>.png   calibration corpus x eval domain perplexity ratio, a panel per
                                    method (only when the sweep has several calibration corpora)
    pareto_bytes.png                quality vs KV-cache bytes per token (quantized caches included), the
                                    Pareto frontier, a panel per quality column (harness.pareto)
"""
from __future__ import annotations

import base64
import html
import json
import os
import re
from pathlib import Path

import pandas as pd

from harness.errors import HarnessError
from harness.paths import atomic_write_text, save_figure
from harness.pareto import pareto_plot, quality_columns
from harness.tasks import ACC_METRICS, PRIMARY_METRIC, task_metric  # noqa: F401  (each paper's metric, DESIGN §9)

ID_COLS = ["model", "method", "budget", "calib", "heal", "kv_quant"]


# ---------------------------------------------------------------------------------- the frame
def reference_rows(df: pd.DataFrame) -> pd.Series:
    """For each row, the index of the baseline row it is compared with: the same model, unconverted,
    trained with the same healing where the sweep has that control (a healed conversion is measured
    against the original fine-tuned on the same tokens, DESIGN §10), else the untrained original."""
    heal = (df["heal"] if "heal" in df else pd.Series("none", index=df.index)).fillna("none").replace("-", "none")
    base = df[(df["method"] == "baseline") & _unquantized(df)]
    by_key = {(m, h): i for i, m, h in zip(base.index, base["model"], heal[base.index])}  # the last row wins
    return pd.Series([by_key.get((m, h), by_key.get((m, "none"))) for m, h in zip(df["model"], heal)],
                     index=df.index, dtype="object")


def _unquantized(df: pd.DataFrame) -> pd.Series:
    """Rows with a full-precision KV cache (kv_quant none, or rows from before kv_quant existed)."""
    return df["kv_quant"].fillna("none").isin(["none", "-"]) if "kv_quant" in df else pd.Series(True, index=df.index)


def _against(df: pd.DataFrame, col: str) -> pd.Series:
    """Each row's value of `col` divided by its reference row's (`reference_rows`)."""
    ref = reference_rows(df)
    values = df[col].to_dict()
    return pd.Series([v / values[r] if r is not None and pd.notna(r) else float("nan")
                      for v, r in zip(df[col], ref)], index=df.index)


def _with_ratios(df: pd.DataFrame) -> pd.DataFrame:
    """Finished rows, with ratio_<domain> = ppl / the reference baseline's ppl (`reference_rows`)."""
    df = df[df["status"] == "ok"].copy() if "status" in df else df.copy()
    for c in [c for c in df.columns if c.startswith("ppl_")]:
        df[c.replace("ppl_", "ratio_")] = _against(df, c)
    return df


def _metric_col(row_or_cols, task: str) -> str:
    """`<task>/<its metric>`, or `<task>/acc` where the rows lack that metric."""
    col = f"{task}/{task_metric(task)}"
    cols = row_or_cols.index if isinstance(row_or_cols, pd.Series) else row_or_cols
    return col if col in cols else f"{task}/acc"


def task_columns(df: pd.DataFrame) -> list[str]:
    """`<task>/<metric>` columns to show: a group's subtasks are folded into it (mmlu_* into mmlu)."""
    tasks = [c[: -len("/acc")] for c in df.columns if c.endswith("/acc")]
    shown = [t for t in tasks if not any(g != t and t.startswith(g + "_") for g in tasks)]
    return [_metric_col(df.columns, t) for t in shown]


def _task(col: str) -> str:
    return col.rsplit("/", 1)[0]


def _asked(row: pd.Series, shown: list[str]) -> list[str]:
    """The tasks whose mean is the row's acc_mean: what the job asked for (a group counts once), else `shown`."""
    asked = row.get("tasks")
    names = [t for t in str(asked).split(",")] if isinstance(asked, str) and asked else [_task(c) for c in shown]
    return [t for t in names if _metric_col(row, t) in row.index and pd.notna(row[_metric_col(row, t)])]


def _mean_acc(row: pd.Series, shown: list[str]) -> pd.Series:
    """Mean accuracy over the asked tasks (each in its metric) and its stderr, sqrt(sum se^2) / k."""
    names = _asked(row, shown)
    if not names:
        return pd.Series({"acc_mean": float("nan"), "acc_mean_stderr": float("nan")})
    vals = [row[_metric_col(row, t)] for t in names]
    ses = [row.get(_metric_col(row, t) + "_stderr") for t in names]
    se = (sum(e * e for e in ses) ** 0.5 / len(ses)) if all(e is not None and pd.notna(e) for e in ses) else float("nan")
    return pd.Series({"acc_mean": sum(vals) / len(vals), "acc_mean_stderr": se})


def _paired(df: pd.DataFrame, results: Path, shown: list[str]) -> pd.DataFrame:
    """Paired bootstrap of each converted row against its model's baseline on the same documents:
    acc_delta [acc_delta_lo, acc_delta_hi] (95%), acc_mean_significant, and <task>/acc_significant."""
    from harness.paired import paired_difference

    docs: dict = {}

    def load(job_id):
        if job_id not in docs:
            run = Path(results) / "runs" / str(job_id)
            f, meta = run / "lm_eval_documents.parquet", run / "lm_eval_results.json"
            docs[job_id] = ((pd.read_parquet(f), json.loads(meta.read_text()).get("group_weighting", {}))
                            if f.exists() and meta.exists() else None)
        return docs[job_id]

    refs = reference_rows(df)
    out = pd.DataFrame(index=df.index)
    for i, r in df.iterrows():
        if refs[i] is None or refs[i] == i or pd.isna(refs[i]):
            continue
        b, c = load(df.loc[refs[i], "job_id"]), load(r["job_id"])
        if b is None or c is None:
            continue
        names = _asked(r, shown)
        metrics = {_metric_col(r, t).rsplit("/", 1)[1] for t in names}
        res = paired_difference(b[0], c[0], names, c[1], metric=metrics.pop()) if len(metrics) == 1 else None
        if res is not None:
            out.loc[i, ["acc_delta", "acc_delta_lo", "acc_delta_hi"]] = [res["delta"], res["lo"], res["hi"]]
            out.loc[i, "acc_mean_significant"] = res["significant"]
        for col in shown:
            one = paired_difference(b[0], c[0], [_task(col)], c[1], metric=col.rsplit("/", 1)[1])
            if one is not None:
                out.loc[i, col + "_significant"] = one["significant"]
    return out


def _budget_label(row: pd.Series) -> str:
    if row.get("method") == "baseline":
        return "-"
    kv, rank = row.get("budget_kv_save"), row.get("budget_rank")
    if kv is not None and pd.notna(kv):
        return f"kv_save={kv:g}"
    if rank is not None and pd.notna(rank):
        return f"rank={int(rank)}"
    return "?"


def leaderboard_frame(df: pd.DataFrame, all_columns: bool = False, results: Path | None = None) -> pd.DataFrame:
    """The leaderboard: one row per model x method x budget x calib x heal, sorted.

    Accuracies carry lm-eval's stderr (`<task>/acc_stderr`, `acc_mean_stderr`). With `results` (the
    sweep's folder, where each run kept its per-document scores) every converted row is compared
    with its model's baseline on the same documents (`harness.paired`): `acc_delta` and its 95%
    interval, and `*_significant` columns that say whether the difference is real.

    Args:
        all_columns: keep every column of the rows after the displayed ones (for the CSV).
        results: the sweep's results folder (enables the paired comparisons).
    """
    df = _with_ratios(df)
    if not len(df):
        return df
    df["budget"] = df.apply(_budget_label, axis=1)
    for c in ("calib", "heal"):
        df[c] = df[c].fillna("-") if c in df else "-"
    quantized = "kv_quant" in df  # sweeps with the kv_quant axis: bytes/token and RULER columns shown
    if quantized:
        df["kv_quant"] = df["kv_quant"].fillna("none")
    df["calib"] = calib_label(df)
    shown = task_columns(df)
    extra = []
    if shown:
        df[["acc_mean", "acc_mean_stderr"]] = df.apply(_mean_acc, axis=1, shown=shown)
        df["acc_ratio"] = _against(df, "acc_mean")
        if results is not None and "job_id" in df:
            paired = _paired(df, results, shown)
            for c in paired.columns:
                df[c] = paired[c]
        extra = ["acc_delta", "acc_delta_lo", "acc_delta_hi", "acc_mean_significant"]
        extra += [c + suffix for c in shown for suffix in ("_stderr", "_significant")]
    ppl_cols = sorted(c for c in df.columns if c.startswith("ppl_"))
    cols = ID_COLS + ["kv_save"] + (["bytes_per_token", "kv_bytes_fraction"] if quantized else []) + ["ranks"]
    cols += (["acc_mean", "acc_mean_stderr", "acc_delta", "acc_ratio"] + shown if shown else [])
    cols += [c for c in quality_columns(df) if c.startswith("long_context@")]  # RULER per length (± stderr)
    for c in ppl_cols:
        cols += [c, c.replace("ppl_", "ratio_")]
    cols += extra
    cols = list(dict.fromkeys(c for c in cols if c in df.columns))
    df = df.drop_duplicates(subset=[c for c in ID_COLS if c in df], keep="last")
    key = {"method": lambda s: s.str.lower().where(s != "baseline", "")}
    df = df.sort_values(["model", "kv_save", "method", "calib", "heal"], key=lambda s: key.get(s.name, lambda x: x)(s))
    table = list(cols)
    if all_columns:
        cols += [c for c in df.columns if c not in cols]
    out = df[cols].reset_index(drop=True)
    out.attrs["table_columns"] = table  # the leaderboard's own columns, first (the CSV has every column)
    return out


# Columns folded into another column's cell when a table is shown ("36.1 ± 1.2 n.s."): the CSV keeps them.
FOLDED = ("_stderr", "_significant", "acc_delta_lo", "acc_delta_hi")


def shown_columns(lb: pd.DataFrame) -> list[str]:
    return [c for c in lb.columns if not c.endswith(FOLDED[:2]) and c not in FOLDED[2:]]


def cell(r: pd.Series, col: str) -> str:
    """The text of one table cell: the value, its stderr ("± s"), and "n.s." where the difference from
    the model's baseline is not significant at 95%; acc_delta with its interval."""
    v = r.get(col)
    if col == "acc_delta":
        if v is None or pd.isna(v):
            return ""
        return f"{100 * v:+.1f} [{100 * r['acc_delta_lo']:+.1f}, {100 * r['acc_delta_hi']:+.1f}]"
    text = _fmt(col, v)
    se = r.get(f"{col}_stderr")
    if text and se is not None and pd.notna(se):
        text += f" ± {_fmt(col, se)}"
    sig = r.get(f"{col}_significant")
    if text and sig is not None and not pd.isna(sig) and not bool(sig):
        text += " n.s."
    return text


def calib_label(df: pd.DataFrame) -> pd.Series:
    """The calibration corpus, with its window count and seed where the rows vary them (a
    sample-size study): without them such rows would collapse into one."""
    out = df["calib"].astype(str)
    conv = df["method"] != "baseline"
    for col, name in (("calib_samples", "n"), ("calib_seed", "seed")):
        if col in df and df.loc[conv, col].nunique() > 1:
            out = out.where(df[col].isna(), out + f" {name}=" + df[col].map(lambda v: f"{v:g}" if pd.notna(v) else ""))
    return out


def _fmt(col: str, v) -> str:
    if v is None or (isinstance(v, float) and pd.isna(v)):
        return ""
    if col == "kv_save":
        return f"{v:.4f}"
    if col == "bytes_per_token":
        return f"{v:,.0f}"
    if col == "kv_bytes_fraction":
        return f"{100 * v:.1f}%"
    if col.startswith("long_context@"):
        return f"{100 * v:.1f}"
    if col.startswith("ratio_") or col == "acc_ratio":
        return f"{v:.2f}x"
    if col.rsplit("/", 1)[-1] in ACC_METRICS and "/" in col or col == "acc_mean":
        return f"{100 * v:.1f}"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.4g}"
    return str(v)


LEGEND = ("Accuracy in % ± lm-eval's stderr; acc_delta: accuracy minus the same model's baseline on the same "
          "documents, in points, with its 95% paired-bootstrap interval; n.s.: not significantly different from "
          "the baseline at 95% (the interval holds 0). Ratios: perplexity / the baseline's.")


def _markdown(lb: pd.DataFrame) -> str:
    cols = shown_columns(lb)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in lb.iterrows():
        lines.append("| " + " | ".join(cell(r, c) for c in cols) + " |")
    return "\n".join(lines)


def tasks_notes(df: pd.DataFrame) -> str:
    """What the rows' task groups lack ("care_eval: RACE: no offline rows (7/8 tasks)"), for every table."""
    notes = sorted(set(df["tasks_note"].dropna())) if "tasks_note" in df else []
    return " ".join(f"Note: {n}." for n in notes)


def summary_table(df: pd.DataFrame, results: Path | None = None) -> str:
    """Markdown table: method, budget, KV save, ranks, accuracy ± stderr (n.s. vs baseline), ppl per domain."""
    if not len(df):
        return "(no rows)"
    lb = leaderboard_frame(df, results=results)
    table = _markdown(lb) if len(lb) else "(no finished rows)"
    return table + (f"\n\n{tasks_notes(df)}" if tasks_notes(df) else "")


# ------------------------------------------------------------------------------------ plots
def _slug(text: str) -> str:
    name = Path(str(text).rstrip("/")).name or str(text)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "model"


def _series_label(r: pd.Series, several_calib: bool) -> str:
    label = r["method"]
    if several_calib and r["calib"] != "-":
        label += f" [{r['calib']}]"
    if r["heal"] not in ("-", "none"):
        label += f" +{r['heal']}"
    return label


def make_plots(df: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Write the leaderboard's plots into `out_dir`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    ok = _with_ratios(df)
    if not len(ok):
        return []
    ok["budget"] = ok.apply(_budget_label, axis=1)
    for c in ("calib", "heal"):
        ok[c] = ok[c].fillna("-") if c in ok else "-"
    ok["calib"] = calib_label(ok)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    ppl_cols = sorted(c for c in ok.columns if c.startswith("ppl_"))

    def save(fig, name):
        paths.append(save_figure(fig, out_dir / name))

    for model, m in ok.groupby("model", sort=True):
        slug = _slug(model)
        conv = m[m["method"] != "baseline"]
        base = m[(m["method"] == "baseline") & m["heal"].isin(["none", "-"]) & _unquantized(m)]
        several_calib = conv["calib"].nunique() > 1
        if conv.empty:  # only baseline rows (a sweep just started): nothing to draw for this model
            continue
        conv = conv.assign(series=conv.apply(_series_label, axis=1, several_calib=several_calib))
        # perplexity vs KV save
        if ppl_cols and len(conv):
            fig, axes = plt.subplots(1, len(ppl_cols), figsize=(5 * len(ppl_cols), 4), squeeze=False,
                                     layout="constrained")
            for ax, c in zip(axes[0], ppl_cols):
                for name, s in conv.groupby("series", sort=True):
                    s = s.sort_values("kv_save")
                    ax.plot(s["kv_save"], s[c], marker="o", label=name)
                if len(base) and pd.notna(base[c].iloc[-1]):
                    ax.axhline(base[c].iloc[-1], color="gray", ls="--", lw=1, label="baseline")
                ax.set_yscale("log")
                ax.set_xlabel("KV save")
                ax.set_ylabel(f"perplexity ({c[4:]})")
                ax.set_title(f"{c[4:]}")
                ax.grid(alpha=0.3, which="both")
            axes[0][-1].legend(fontsize=8)
            fig.suptitle(f"{slug}: perplexity vs KV save")
            save(fig, f"ppl_vs_kv_{slug}.png")
        # per-layer ranks
        ranked = conv[conv["ranks_per_layer"].notna()] if "ranks_per_layer" in conv else conv.iloc[:0]
        if len(ranked):
            mean_kv = ranked.groupby("budget")["kv_save"].mean()
            budgets = sorted(mean_kv.index, key=lambda b: mean_kv[b])
            fig, axes = plt.subplots(1, len(budgets), figsize=(4.5 * len(budgets), 3.6), squeeze=False, sharey=True,
                                     layout="constrained")
            for ax, b in zip(axes[0], budgets):
                for _, r in ranked[ranked["budget"] == b].sort_values("series").iterrows():
                    widths = json.loads(r["ranks_per_layer"])
                    ax.plot(range(len(widths)), widths, marker=".", label=r["series"])
                ax.set_title(b)
                ax.set_xlabel("layer")
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                ax.grid(alpha=0.3)
            axes[0][0].set_ylabel("cache width (elements/token)")
            axes[0][-1].legend(fontsize=8)
            fig.suptitle(f"{slug}: per-layer cache width")
            save(fig, f"ranks_{slug}.png")
        # calibration corpus x eval domain
        ratio_cols = [c.replace("ppl_", "ratio_") for c in ppl_cols if c.replace("ppl_", "ratio_") in conv]
        if several_calib and ratio_cols:
            for b, bdf in conv.groupby("budget", sort=True):
                labels = sorted(bdf.apply(lambda r: _series_label(r, False), axis=1).unique())
                calibs = sorted(bdf["calib"].unique())
                size = (max(4.0, (1.1 * len(ratio_cols) + 2.0) * len(labels)), 0.5 * len(calibs) + 2.2)
                fig, axes = plt.subplots(1, len(labels), figsize=size, squeeze=False, layout="constrained")
                series = bdf.apply(lambda r: _series_label(r, False), axis=1)
                grids = {lab: bdf[series == lab].groupby("calib")[ratio_cols].mean().reindex(calibs) for lab in labels}
                lo = min(float(g.min().min()) for g in grids.values())
                hi = max(float(g.max().max()) for g in grids.values())
                hi = hi if hi > lo else lo + 1e-9
                for ax, lab in zip(axes[0], labels):  # one colour scale for every method of the budget
                    grid = grids[lab]
                    im = ax.imshow(grid.values, cmap="viridis_r", aspect="auto", vmin=lo, vmax=hi)
                    ax.set_xticks(range(len(ratio_cols)), [c[6:] for c in ratio_cols])
                    ax.set_yticks(range(len(calibs)), calibs)
                    ax.set_xlabel("eval domain")
                    ax.set_ylabel("calibration corpus")
                    ax.set_title(lab, fontsize=9)
                    for i in range(len(calibs)):
                        for j in range(len(ratio_cols)):
                            v = grid.values[i, j]
                            if pd.notna(v):
                                dark = (v - lo) / (hi - lo) > 0.5  # viridis_r: high ratios are dark
                                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if dark else "k",
                                        fontsize=8)
                fig.colorbar(im, ax=list(axes[0]), fraction=0.046, pad=0.04, label="ppl / baseline ppl")
                fig.suptitle(f"{slug} {b}: perplexity / baseline")
                save(fig, f"calib_heatmap_{slug}_{_slug(b)}.png")
    return paths


# ------------------------------------------------------------------------------------- html
_CSS = """body{font-family:system-ui,sans-serif;margin:24px;color:#222}
table{border-collapse:collapse;font-size:13px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f0f0f0;cursor:pointer;user-select:none;position:sticky;top:0}th:hover{background:#e0e8ff}
td{white-space:nowrap}td.s{text-align:left}tr.base{background:#fafae6}tbody tr:hover{background:#eef4ff}
th.asc::after{content:" \\25B2"}th.desc::after{content:" \\25BC"}img{max-width:100%;margin:12px 0;display:block}"""
_JS = """document.querySelectorAll("table.lb th").forEach((th, i) => th.addEventListener("click", () => {
  const body = th.closest("table").tBodies[0], num = th.dataset.type === "num";
  const dir = th.classList.contains("asc") ? -1 : 1;
  th.parentNode.querySelectorAll("th").forEach(h => h.classList.remove("asc", "desc"));
  th.classList.add(dir > 0 ? "asc" : "desc");
  const key = r => { const v = r.cells[i].dataset.v; return num ? (v === "" ? Infinity : +v) : v; };
  [...body.rows].sort((a, b) => (key(a) < key(b) ? -1 : key(a) > key(b) ? 1 : 0) * dir)
    .forEach(r => body.appendChild(r));
}));
const sortBy = location.hash.match(/^#sort=(.+)$/);  // a link to a sorted view: leaderboard.html#sort=ppl_wiki
if (sortBy) document.querySelectorAll("table.lb th").forEach(th => {
  if (th.textContent === decodeURIComponent(sortBy[1])) th.click();
});"""


def table_html(lb: pd.DataFrame) -> str:
    """The leaderboard as a sortable HTML table: each cell shows `cell()`, sorts by its raw value."""
    cols = shown_columns(lb)
    num = {c: pd.api.types.is_numeric_dtype(lb[c]) for c in cols}
    head = "".join(f'<th data-type="{"num" if num[c] else "str"}">{html.escape(c)}</th>' for c in cols)
    body = []
    for _, r in lb.iterrows():
        cells = []
        for c in cols:
            v = r[c]
            raw = "" if v is None or (isinstance(v, float) and pd.isna(v)) else (repr(float(v)) if num[c] else str(v))
            cls = "" if num[c] else " class=s"
            cells.append(f'<td{cls} data-v="{html.escape(raw)}">{html.escape(cell(r, c))}</td>')
        cls = ' class="base"' if r.get("method") == "baseline" else ""
        body.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
    return (f'<table class="lb" id="leaderboard"><thead><tr>{head}</tr></thead><tbody>\n' + "\n".join(body)
            + "\n</tbody></table>\n")


def render_html(lb: pd.DataFrame, title: str, images: list[Path] = (), note: str = "") -> str:
    """A self-contained page: the leaderboard table (click a header to sort) and inlined plots."""
    imgs = "".join(f'<img alt="{html.escape(p.name)}" src="data:image/png;base64,'
                   f'{base64.b64encode(p.read_bytes()).decode()}">' for p in images)
    return (f"<!doctype html>\n<html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>\n<h1>{html.escape(title)}</h1>\n"
            f"<p>{html.escape(note)} {html.escape(LEGEND)} Click a header to sort (or open with "
            "#sort=&lt;column&gt;).</p>\n" + table_html(lb) + (f"<h2>Plots</h2>{imgs}\n" if imgs else "")
            + f"<script>{_JS}</script>\n</body></html>\n")


def write_leaderboard(results: Path, plots: bool = True) -> str:
    """Write leaderboard.md, .csv, .html (and plots/) beside rows.parquet; return the markdown table."""
    results = Path(results)
    f = results / "rows.parquet"
    if not f.exists():
        raise HarnessError(f"{f} does not exist; run the sweep first (mla-harness sweep sweeps/<name>.yaml)")
    df = pd.read_parquet(f)
    full = leaderboard_frame(df, all_columns=True, results=results)
    lb = full[full.attrs.get("table_columns", list(full.columns))]
    failed = int((df["status"] != "ok").sum()) if "status" in df else 0
    note = f"{len(lb)} rows from {f}" + (f"; {failed} failed job(s) left out." if failed else ".")
    note += f" {tasks_notes(df)}" if tasks_notes(df) else ""
    md = _markdown(lb) if len(lb) else "(no finished rows)"
    images = make_plots(df, results / "plots") if plots else []
    if plots and "kv_bytes_fraction" in df:  # quality against KV bytes (quantization included)
        pareto = pareto_plot(df, quality_columns(df), results / "plots" / "pareto_bytes.png",
                             f"{results.name}: quality vs KV-cache bytes")
        images += [pareto] if pareto else []
    atomic_write_text(results / "leaderboard.md", f"# Leaderboard: {results.name}\n\n{note} {LEGEND}\n\n{md}\n")
    tmp = results / f".leaderboard.csv.tmp{os.getpid()}"
    full.to_csv(tmp, index=False)  # the table's rows, every column
    os.replace(tmp, results / "leaderboard.csv")
    atomic_write_text(results / "leaderboard.html", render_html(lb, f"Leaderboard: {results.name}", images, note))
    return md
