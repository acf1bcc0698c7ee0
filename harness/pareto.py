"""Quality against KV-cache bytes: each row as a point, the Pareto frontier, and its plot.

    from harness.pareto import quality_columns, frontier, pareto_plot
    pareto_plot(rows, ["mla_core/acc", "long_context@4096", "ppl_prose@4096"], Path("plots/pareto.png"))

x is `kv_bytes_fraction` (bytes per token, quantization and its full-precision window included, over
the original model's at the same dtype: harness.sweep), y a quality column: an accuracy or RULER
score (higher is better) or a perplexity (`ppl_*`, lower is better). A point is on the frontier when
no other point has fewer bytes and a quality at least as good. Error bars: the column's `_stderr`.
"""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from harness.paths import save_figure

_RULER = re.compile(r"^long_context@\d+$")
_LONG_PPL = re.compile(r"^ppl_\w+@\d+$")


def higher_is_better(col: str) -> bool:
    return not col.startswith("ppl_")


def quality_columns(df: pd.DataFrame) -> list[str]:
    """The quality columns a sweep has: mla_core/acc, long_context@<len>, ppl_<domain>@<len>."""
    cols = [c for c in ("mla_core/acc",) if c in df]
    cols += sorted((c for c in df if _RULER.match(c)), key=lambda c: int(c.split("@")[1]))
    cols += sorted((c for c in df if _LONG_PPL.match(c)), key=lambda c: (c.split("@")[0], int(c.split("@")[1])))
    return [c for c in cols if df[c].notna().any()]


def point_label(r: pd.Series) -> str:
    """'original', 'original int4', 'care_joint 75%', 'mha2mla 87.5% int4' ..."""
    kv = r.get("kv_quant")
    kv = "" if kv in (None, "none") or (isinstance(kv, float) and pd.isna(kv)) else f" {str(kv).split('-')[0]}"
    if r.get("method") == "baseline":
        return "original" + kv
    save = r.get("budget_kv_save")
    budget = f" {100 * save:g}%" if save is not None and pd.notna(save) else ""
    return f"{r.get('method')}{budget}{kv}"


def frontier(df: pd.DataFrame, col: str) -> pd.DataFrame:
    """The rows of `df` on the bytes/quality Pareto frontier for `col`, by increasing bytes."""
    pts = df.dropna(subset=["kv_bytes_fraction", col]).sort_values("kv_bytes_fraction")
    sign = 1 if higher_is_better(col) else -1
    keep, best = [], float("-inf")
    for i, r in pts.iterrows():
        if sign * r[col] > best:
            keep.append(i)
            best = sign * r[col]
    return pts.loc[keep]


def pareto_plot(df: pd.DataFrame, cols: list[str], path: Path, title: str = "") -> Path | None:
    """One panel per quality column: every row (x = % of the original's cache bytes), the frontier."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = df[df["status"] == "ok"] if "status" in df else df
    cols = [c for c in cols if c in df and df[c].notna().any()]
    if not cols or "kv_bytes_fraction" not in df:
        return None
    fig, axes = plt.subplots(1, len(cols), figsize=(5.2 * len(cols), 4.4), squeeze=False, layout="constrained")
    families = sorted({"original" if m == "baseline" else str(m) for m in df["method"]})
    colors = {f: plt.cm.tab10(i % 10) for i, f in enumerate(families)}
    markers = {"none": "o", "int8": "s", "int4": "^", "int2": "v"}
    for ax, col in zip(axes[0], cols):
        pts = df.dropna(subset=["kv_bytes_fraction", col])
        for _, r in pts.iterrows():
            family = "original" if r["method"] == "baseline" else str(r["method"])
            kv = str(r.get("kv_quant") or "none").split("-")[0]
            se = r.get(f"{col}_stderr")
            ax.errorbar(100 * r["kv_bytes_fraction"], r[col], yerr=se if se is not None and pd.notna(se) else None,
                        fmt=markers.get(kv, "o"), color=colors[family], ms=7, capsize=2, alpha=0.9)
            ax.annotate(point_label(r), (100 * r["kv_bytes_fraction"], r[col]), fontsize=6.5,
                        xytext=(3, 3), textcoords="offset points")
        front = frontier(pts, col)
        ax.plot(100 * front["kv_bytes_fraction"], front[col], "-", color="0.4", lw=1, zorder=0,
                label="Pareto frontier")
        ax.set_xscale("log")
        if not higher_is_better(col):  # perplexities span orders of magnitude across methods
            ax.set_yscale("log")
        ax.set_xlabel("KV-cache bytes per token, % of the original (log)")
        ax.set_ylabel(col + ("" if higher_is_better(col) else " (lower is better)"))
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=colors[f], marker="o", ls="", label=f) for f in families]
    handles += [plt.Line2D([], [], color="0.3", marker=m, ls="", label=k) for k, m in markers.items()
                if any(str(q).startswith(k) for q in df.get("kv_quant", pd.Series(["none"])).fillna("none"))]
    axes[0][0].legend(handles=handles, fontsize=7, loc="best")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)
