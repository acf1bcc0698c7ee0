"""Tables from result rows: the sweep's console summary and leaderboard.md / .csv.

    mla-harness leaderboard results/quick

One row per model x method x budget (x calibration, x healing): KV save, ranks, perplexity per
domain and its ratio to the same model's unconverted baseline, lm-eval scores where present.
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from harness.errors import HarnessError


def _with_ratios(df: pd.DataFrame) -> pd.DataFrame:
    df = df[df.get("status", "ok") == "ok"].copy() if "status" in df else df.copy()
    ppl_cols = [c for c in df.columns if c.startswith("ppl_")]
    base = df[df["method"] == "baseline"].set_index("model")
    for c in ppl_cols:
        ref = df["model"].map(base[c]) if c in base else None
        if ref is not None:
            df[c.replace("ppl_", "ratio_")] = df[c] / ref
    return df


def summary_table(df: pd.DataFrame) -> str:
    """Markdown table: method, KV save, ranks, ppl per domain, ratio to the baseline."""
    if not len(df):
        return "(no rows)"
    df = _with_ratios(df)
    ppl_cols = [c for c in df.columns if c.startswith("ppl_")]
    acc_cols = [c for c in df.columns if c.endswith("/acc") or c.endswith("/acc_norm")]
    cols = ["model", "method", "calib", "heal", "kv_save", "ranks"]
    for c in ppl_cols:
        cols += [c, c.replace("ppl_", "ratio_")]
    cols += acc_cols
    cols = [c for c in cols if c in df.columns]
    df = df.sort_values(["model", "kv_save", "method"], key=lambda s: s if s.name != "method" else s.str.lower())
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df[cols].iterrows():
        cells = []
        for c in cols:
            v = r[c]
            if v is None or (isinstance(v, float) and pd.isna(v)):
                cells.append("")
            elif c == "kv_save":
                cells.append(f"{v:.4f}")
            elif c.startswith("ratio_"):
                cells.append(f"{v:.2f}x")
            elif isinstance(v, float):
                cells.append(f"{v:.3f}" if v < 1000 else f"{v:.4g}")
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_leaderboard(results: Path) -> str:
    """Write leaderboard.md and leaderboard.csv beside rows.parquet; return the markdown."""
    f = results / "rows.parquet"
    if not f.exists():
        raise HarnessError(f"{f} does not exist; run the sweep first (mla-harness sweep sweeps/<name>.yaml)")
    df = pd.read_parquet(f)
    md = summary_table(df)
    for name, text in (("leaderboard.md", md + "\n"),):
        tmp = results / f".{name}.tmp{os.getpid()}"
        tmp.write_text(text)
        os.replace(tmp, results / name)
    tmp = results / f".leaderboard.csv.tmp{os.getpid()}"
    _with_ratios(df).to_csv(tmp, index=False)
    os.replace(tmp, results / "leaderboard.csv")
    return md
