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

ID_COLS = ["model", "method", "budget", "calib", "heal"]


# ---------------------------------------------------------------------------------- the frame
def _with_ratios(df: pd.DataFrame) -> pd.DataFrame:
    """Finished rows, with ratio_<domain> = ppl / the same model's baseline ppl."""
    df = df[df["status"] == "ok"].copy() if "status" in df else df.copy()
    ppl_cols = [c for c in df.columns if c.startswith("ppl_")]
    base = df[df["method"] == "baseline"].drop_duplicates("model", keep="last").set_index("model")
    for c in ppl_cols:
        if c in base:
            df[c.replace("ppl_", "ratio_")] = df[c] / df["model"].map(base[c])
    return df


def task_columns(df: pd.DataFrame) -> list[str]:
    """`<task>/acc` columns to show: a group's subtasks are folded into it (mmlu_* into mmlu)."""
    tasks = [c[: -len("/acc")] for c in df.columns if c.endswith("/acc")]
    shown = [t for t in tasks if not any(g != t and t.startswith(g + "_") for g in tasks)]
    return [f"{t}/acc" for t in shown]


def _mean_acc(row: pd.Series, shown: list[str]) -> float:
    """Mean accuracy over the tasks the job asked for (a group counts once), else over `shown`."""
    asked = row.get("tasks")
    cols = [f"{t}/acc" for t in str(asked).split(",")] if isinstance(asked, str) and asked else shown
    vals = [row[c] for c in cols if c in row.index and pd.notna(row[c])]
    return sum(vals) / len(vals) if vals else float("nan")


def _budget_label(row: pd.Series) -> str:
    if row.get("method") == "baseline":
        return "-"
    kv, rank = row.get("budget_kv_save"), row.get("budget_rank")
    if kv is not None and pd.notna(kv):
        return f"kv_save={kv:g}"
    if rank is not None and pd.notna(rank):
        return f"rank={int(rank)}"
    return "?"


def leaderboard_frame(df: pd.DataFrame, all_columns: bool = False) -> pd.DataFrame:
    """The leaderboard: one row per model x method x budget x calib x heal, sorted.

    Args:
        all_columns: keep every column of the rows after the displayed ones (for the CSV).
    """
    df = _with_ratios(df)
    if not len(df):
        return df
    df["budget"] = df.apply(_budget_label, axis=1)
    for c in ("calib", "heal"):
        df[c] = df[c].fillna("-") if c in df else "-"
    df["calib"] = calib_label(df)
    shown = task_columns(df)
    if shown:
        df["acc_mean"] = df.apply(_mean_acc, axis=1, shown=shown)
        base = df[df["method"] == "baseline"].drop_duplicates("model", keep="last").set_index("model")["acc_mean"]
        df["acc_ratio"] = df["acc_mean"] / df["model"].map(base)
    ppl_cols = sorted(c for c in df.columns if c.startswith("ppl_"))
    cols = ID_COLS + ["kv_save", "ranks"] + (["acc_mean", "acc_ratio"] + shown if shown else [])
    for c in ppl_cols:
        cols += [c, c.replace("ppl_", "ratio_")]
    cols = [c for c in cols if c in df.columns]
    df = df.drop_duplicates(subset=[c for c in ID_COLS if c in df], keep="last")
    key = {"method": lambda s: s.str.lower().where(s != "baseline", "")}
    df = df.sort_values(["model", "kv_save", "method", "calib", "heal"], key=lambda s: key.get(s.name, lambda x: x)(s))
    if all_columns:
        cols += [c for c in df.columns if c not in cols]
    return df[cols].reset_index(drop=True)


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
    if col.startswith("ratio_") or col == "acc_ratio":
        return f"{v:.2f}x"
    if col.endswith("/acc") or col == "acc_mean":
        return f"{100 * v:.1f}"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.4g}"
    return str(v)


def _markdown(lb: pd.DataFrame) -> str:
    cols = list(lb.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in lb.iterrows():
        lines.append("| " + " | ".join(_fmt(c, r[c]) for c in cols) + " |")
    return "\n".join(lines)


def summary_table(df: pd.DataFrame) -> str:
    """Markdown table: method, budget, KV save, ranks, accuracy, ppl per domain, ratio to the baseline."""
    if not len(df):
        return "(no rows)"
    lb = leaderboard_frame(df)
    return _markdown(lb) if len(lb) else "(no finished rows)"


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
        p = out_dir / name
        tmp = out_dir / f".{name}.tmp{os.getpid()}.png"
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        os.replace(tmp, p)
        paths.append(p)

    for model, m in ok.groupby("model", sort=True):
        slug = _slug(model)
        conv = m[m["method"] != "baseline"]
        base = m[m["method"] == "baseline"]
        several_calib = conv["calib"].nunique() > 1
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


def render_html(lb: pd.DataFrame, title: str, images: list[Path] = (), note: str = "") -> str:
    """A self-contained page: the leaderboard table (click a header to sort) and inlined plots."""
    cols = list(lb.columns)
    num = {c: pd.api.types.is_numeric_dtype(lb[c]) for c in cols}
    head = "".join(f'<th data-type="{"num" if num[c] else "str"}">{html.escape(c)}</th>' for c in cols)
    body = []
    for _, r in lb.iterrows():
        cells = []
        for c in cols:
            v = r[c]
            raw = "" if v is None or (isinstance(v, float) and pd.isna(v)) else (repr(float(v)) if num[c] else str(v))
            cls = "" if num[c] else " class=s"
            cells.append(f'<td{cls} data-v="{html.escape(raw)}">{html.escape(_fmt(c, v))}</td>')
        cls = ' class="base"' if r.get("method") == "baseline" else ""
        body.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
    imgs = "".join(f'<img alt="{html.escape(p.name)}" src="data:image/png;base64,'
                   f'{base64.b64encode(p.read_bytes()).decode()}">' for p in images)
    return (f"<!doctype html>\n<html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>\n<h1>{html.escape(title)}</h1>\n"
            f"<p>{html.escape(note)} Accuracy in %, ratios against the same model's baseline; click a header to "
            "sort (or open with #sort=&lt;column&gt;).</p>\n"
            f'<table class="lb" id="leaderboard"><thead><tr>{head}</tr></thead><tbody>\n' + "\n".join(body)
            + "\n</tbody></table>\n" + (f"<h2>Plots</h2>{imgs}\n" if imgs else "")
            + f"<script>{_JS}</script>\n</body></html>\n")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_leaderboard(results: Path, plots: bool = True) -> str:
    """Write leaderboard.md, .csv, .html (and plots/) beside rows.parquet; return the markdown table."""
    results = Path(results)
    f = results / "rows.parquet"
    if not f.exists():
        raise HarnessError(f"{f} does not exist; run the sweep first (mla-harness sweep sweeps/<name>.yaml)")
    df = pd.read_parquet(f)
    lb = leaderboard_frame(df)
    failed = int((df["status"] != "ok").sum()) if "status" in df else 0
    note = f"{len(lb)} rows from {f}" + (f"; {failed} failed job(s) left out." if failed else ".")
    md = _markdown(lb) if len(lb) else "(no finished rows)"
    images = make_plots(df, results / "plots") if plots else []
    _atomic_write(results / "leaderboard.md", f"# Leaderboard: {results.name}\n\n{note}\n\n{md}\n")
    tmp = results / f".leaderboard.csv.tmp{os.getpid()}"
    leaderboard_frame(df, all_columns=True).to_csv(tmp, index=False)  # the table's rows, every column
    os.replace(tmp, results / "leaderboard.csv")
    _atomic_write(results / "leaderboard.html", render_html(lb, f"Leaderboard: {results.name}", images, note))
    return md
