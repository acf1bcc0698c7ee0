"""The healing report (DESIGN §10, issue 13): recovery against the fine-tuned original, REPORT.md + PNGs.

    mla-harness sweep sweeps/paper-mha2mla-heal.yaml
    mla-harness report healing results/paper-mha2mla-heal --machine "1x H100 80GB"
    mla-harness report healing RESULTS --partial heal_partial.json --sweep sweeps/paper-mha2mla-heal.yaml --set ...

Writes RESULTS/REPORT.md, recovery_acc.png (acc_mean vs training tokens, a panel per recipe) and
recovery_ppl.png (perplexity per domain). Each curve (harness.reports.healing_curves: 0 tokens from
the one-shot row, the healing's marks, the healed row at the end) is measured against the
fine-tuned original: the unconverted model healed with the same recipe on the same tokens (MHA2MLA's
44.25 row), never against the untrained original (drawn dashed for context). The report answers how
many tokens each initialisation needs to reach 95% of the fine-tuned original's final acc_mean
(linear interpolation between points), LoRA vs full vs KD at equal tokens, and whether a
covariance-aware start saves tokens, each number with its stderr (lm-eval's, and paired bootstraps
over documents and windows where the runs kept them). Partial runs (`--partial`) are drawn dotted.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from harness.reports.healing_curves import (Curve, Study, acc_col, as_float, approx_se, final_point, gather,
                                            kv_text, loglinear_reach, paired_acc, ppl_ratio_se, reference_for,
                                            tokens_str, tokens_to_reach)
from harness.reports.toolkit import atomic_write_text, markdown_table, pyplot, save_figure
from harness.specs import HealConfig

STUDY = "healing"
TARGET = 0.95  # of the fine-tuned original's final acc_mean (issue 13)
GOAL_KV, GOAL_TOKENS = 0.8125, 100_000_000  # the goal: >= 95% at -81.25% KV with <= 100M tokens
ACC_CELLS = ("start (0)", "fine-tuned original", "% of it", "paired Δ [95%]", "tokens to 95%")  # task-score columns


def _approx(text: str, recorded_se) -> str:
    """'± ≈s' where the stderr stands in from the nearest row point (a curve mark records none)."""
    return text.replace("± ", "± ≈") if pd.isna(recorded_se) else text


def pct(v, se=math.nan) -> str:
    if as_float(v) is None:
        return ""
    return f"{100 * v:.1f}" + (f" ± {100 * se:.1f}" if as_float(se) is not None else "")


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
        fig, axes = plt.subplots(1, len(recipes), figsize=(5.2 * len(recipes), 4.6), squeeze=False,
                                 layout="constrained")
        for ax, h in zip(axes[0], recipes):
            group = [c for c in curves if c.heal == h]
            for c in sorted(group, key=lambda c: (c.is_reference, c.method, c.kv_save or 0)):
                _draw(ax, c, col, colours, markers, col + "_se")
            ref = next((r for r in group if r.is_reference), None)
            if ref is not None and pd.notna(final_point(ref)[col]):
                ax.axhline(TARGET * final_point(ref)[col], color="black", linewidth=0.7, linestyle="-.",
                           label="95% of the fine-tuned original's last point")
            if untrained is not None and pd.notna(untrained[col]):
                ax.axhline(untrained[col], color="grey", linestyle="--", linewidth=1, label="untrained original")
            _token_axis(ax, group)
            ax.set_title(f"recipe {h}", fontsize=10)
            ax.set_ylabel("acc_mean, " + ("plain acc" if metric == "acc" else "each task's paper metric"))
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
        r = {"method": c.method, "KV save": kv_text(c.kv_save), "recipe": c.heal,
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
        r["last"] = r["last"] if st.metric != "none" else f"@ {tokens_str(last)}"
        r["tokens/s (median)"] = ("" if tps is None else f"{tps:,.0f}"
                                  + (" (last 20)" if not c.log and c.partial_at is not None else ""))
        r["peak GiB"] = "" if gib is None else f"{gib:.1f}"
        # perplexity only: no task score to start from, reach or compare
        out.append({k: v for k, v in r.items() if st.metric != "none" or k not in ACC_CELLS})
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


def recovery_at_marks(st: Study) -> pd.DataFrame:
    """Recovery(t) = acc_mean(converted, t) / acc_mean(fine-tuned original, t) in % (DESIGN §10), at every
    mark both curves have: the same tokens, whether or not either run finished."""
    col = acc_col(st.metric)
    data = {}
    for c in sorted((c for c in st.curves if not c.is_reference), key=lambda c: (c.heal, c.kv_save or 0, c.method)):
        ref = reference_for(st.curves, c)
        if ref is None:
            continue
        cells = {}
        for m in c.points["mark"]:
            a, b = _at_mark(c, int(m), col), _at_mark(ref, int(m), col)
            if a is not None and b:
                cells[int(m)] = a / b
        data[f"{c.heal}: {c.label}"] = cells
    frame = pd.DataFrame(data).T
    if not len(frame):
        return frame
    frame = frame.reindex(columns=sorted(frame.columns))
    frame.columns = [tokens_str(m) for m in frame.columns]
    return frame.map(lambda v: "" if pd.isna(v) else f"{100 * v:.1f}")


def recipes_section(st: Study) -> list[str]:
    """LoRA vs full vs KD at equal tokens (marks shared by several recipes)."""
    recipes = sorted({c.heal for c in st.curves})
    lines = ["## Recipes at equal tokens (LoRA vs full vs KD)", ""]
    if len(recipes) < 2:
        return lines + [f"This sweep has one recipe ({recipes[0]}): there is no comparison between recipes to make.",
                        ""]
    if st.metric == "none":
        return lines + ["No task scores in these runs: compare the perplexity tables above.", ""]
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
        table = markdown_table(pd.DataFrame(rows).T, fmt=str, index_name="recipe")
        lines += [f"**{method} @ {kv_text(kv)}**", "", table, ""]
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
    if st.metric == "none":
        return lines + ["No task scores in these runs: compare the perplexity tables above.", ""]
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
            lines += [f"- **{other.method} vs {base.method} @ {kv_text(kv)}, {heal}** (acc_mean %, {other.method} "
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
        lines += ["", "± is sqrt(se_a² + se_b²) from lm-eval's stderrs (unpaired, so conservative); ≈ marks a "
                  "curve "
                  "point, which records no stderr: the nearest row point's of the same curve stands in (the same "
                  "documents). Differences within 2 SE are not evidence either way.", ""]
    return lines


def goal_lines(st: Study, facts: list[dict]) -> list[str]:
    if st.metric == "none":
        return []
    at = [f for f in facts if f["curve"].kv_save is not None and abs(f["curve"].kv_save - GOAL_KV) < 1e-9]
    if not at:
        return []
    lines = [f"**Goal** (issue 13): ≥ 95% of the fine-tuned original's acc_mean at {kv_text(GOAL_KV)} with ≤ "
             f"{tokens_str(GOAL_TOKENS)} tokens (MHA2MLA: 94.6% after 2.25B tokens). Where the curves stand:", ""]
    for f in at:
        c = f["curve"]
        status = (f"reached at {tokens_str(f['reach'])} tokens" if f["reach"] is not None and f["reach"] <= GOAL_TOKENS
                  else f"not reached by {tokens_str(f['last'])} tokens")
        fit = (loglinear_reach(list(c.points["tokens"]), list(c.points[acc_col(st.metric)]), f["target"])
               if f["reach"] is None and pd.notna(f["target"]) else None)
        if fit is not None:  # how far off: the trend of the measured marks, stated as an extrapolation
            gain, at = fit
            status += (f" (a log-linear fit over its trained marks gains {100 * gain:+.1f} points per 10x tokens"
                       + (f" and would reach 95% near {tokens_str(at)} tokens: an extrapolation, not a measurement)"
                          if at is not None else ": it does not rise)"))
        ref_note = " (against a partial fine-tuned original)" if f["ref"] is not None and f["ref"].partial_at else ""
        lines.append(f"- {c.method}, {c.heal}{' (partial)' if c.partial_at else ''}: {f['share']}% "
                     f"of the fine-tuned original at {tokens_str(f['last'])} tokens{ref_note}; {status}"
                     if pd.notna(f["ratio"]) else f"- {c.method}, {c.heal}: no fine-tuned original with this recipe")
    return lines + [""]


def setup_lines(st: Study) -> list[str]:
    df = st.df
    models = ", ".join(sorted(df["model"].unique()))
    sweeps = ", ".join(sorted(df["sweep"].dropna().unique())) if "sweep" in df else "?"
    lines = ["## Setup", "", f"- model: {models}; rows from `{df.attrs.get('source', 'rows.parquet')}` "
             f"({len(df)} finished rows; sweep {sweeps})"]
    cfg = next((st.results / "runs" / str(j) / "config.json" for j in df["job_id"]
                if (st.results / "runs" / str(j) / "config.json").exists()), None)
    if cfg is not None:
        ev = json.loads(cfg.read_text())["eval"]
        p = ev["ppl"]
        lines.append(f"- evaluation, the same for every point: perplexity on {p['samples']} windows x "
                     f"{p['seq_len']} tokens of {', '.join(p['domains'])} (eval split, seed {p['seed']}); tasks "
                     f"{', '.join(ev['tasks'])}"
                     + (f", the first {ev['limit']} documents of each" if ev.get("limit") else " (full sets)"))
    from harness.tasks import task_metric

    tasks = sorted({t for c in st.curves for t in c.tasks})
    lines.append("- acc_mean: the mean over the job's tasks of " + (
        ", ".join(f"{t}/{task_metric(t)}" for t in tasks) + " (each paper's metric)" if st.metric == "primary" else
        "plain acc (" + ", ".join(f"{t}/acc" for t in tasks) + "): some curves here carry plain acc only (partial "
        "runs recorded before the healing curve averaged each task's paper metric), so every line uses plain acc"))
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
                     f"{s.get('schedule')} schedule, {tps:,} tokens/step ({s.get('batch_size')} x "
                     f"{s.get('grad_accum')} x {s.get('seq_len')}), mix {mix}"
                     + (f", KD weight {s['kd_weight']:g}" if s.get("kd_weight") else "")
                     + (f", LoRA r{s['lora_rank']} on {', '.join(s.get('targets', []))}"
                        if s.get("mode") == "lora" else "")
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
    acc_text = ("acc_mean in % ± lm-eval's stderr; *% of it* = last / the fine-tuned original's last point (± from "
                "both stderrs); *paired Δ* = the difference on the same documents, paired bootstrap 95% interval "
                "(finished rows only); " if st.metric != "none" else "")
    reach_text = ("*tokens to 95%* (of the fine-tuned original's last acc_mean) interpolates linearly between curve "
                  "points; " if st.metric != "none" else "")
    lines += ["## Recovery", "",
              "Each healed job against the fine-tuned original (the unconverted model trained with the same recipe on "
              f"the same tokens). {acc_text}*ppl ratio* = last ppl / the fine-tuned original's (± paired over "
              f"windows where the runs kept per-window NLLs); {reach_text}throughput: median tokens/s over the "
              "training steps and peak GPU memory of that process.", "",
              markdown_table(table.set_index("method"), fmt=str) if len(table) else "No converted job is healed yet.",
              ""]
    lines += goal_lines(st, facts)
    for f in figs:
        what = "acc_mean" if "acc" in f.name else "perplexity per domain (log scale)"
        caption = (f"{what} vs training tokens, a panel per recipe; black: the fine-tuned original; grey dashed: the "
                   "untrained original; dotted: partial runs" + ("; bars: lm-eval's stderr" if "acc" in f.name else ""))
        lines += [f"![{caption}]({f.name})", "", f"*{caption}* — regenerate with `{command}`", ""]
    order = sorted(st.curves, key=lambda c: (c.heal, not c.is_reference, c.method))
    lines += ["## The curves", ""]
    if st.metric == "none":
        lines += ["The runs scored no lm-eval task (the sweep's eval.tasks is empty, or heal.curve_tasks is off): this "
                  "report compares perplexities only; 0 is the one-shot row, the last point of a finished run its "
                  "healed row.", ""]
    else:
        lines += [f"acc_mean (%) at each mark ({'plain acc' if st.metric == 'acc' else 'paper metric'}); "
                  "0 is the one-shot row, the last column of a finished run its healed row.", "",
                  markdown_table(marks_table(st, order, col), fmt=str, index_name="recipe: curve"), ""]
    rec = recovery_at_marks(st) if st.metric != "none" else pd.DataFrame()
    if len(rec):
        lines += ["Recovery(t) = acc_mean(converted, t) / acc_mean(fine-tuned original, t), in %, at the marks both "
                  "curves have (DESIGN §10; the same tokens, so a partial fine-tuned original still compares):", "",
                  markdown_table(rec, fmt=str, index_name="recipe: curve"), ""]
    for d in st.doms:
        lines += [f"{d} perplexity at each mark:", "",
                  markdown_table(marks_table(st, order, f"ppl_{d}", "ppl"), fmt=str, index_name="recipe: curve"), ""]
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
                       "(acc_norm_nospace for MHA2MLA); every acc_mean in this report is therefore plain acc, so that "
                       "the "
                       "lines compare")
    if any(c.partial_at is not None for c in st.curves if c.is_reference):
        caveats.append("a fine-tuned original is itself partial: % of it and tokens to 95% are against its last "
                       "recorded point, not against the recipe's full budget")
    caveats.append("throughput is per process: a sharded sweep runs several jobs on one GPU at once, so tokens/s is "
                   "each process's share, comparable only within one session on one machine")
    caveats.append("one training seed per job: the spread over seeds is not measured, only the evaluation's noise")
    if len({c.budget_tokens for c in st.curves if c.budget_tokens}) > 1:
        caveats.append("recipes with different token budgets meet at equal tokens, not at equal schedules: a mark "
                       "inside a longer run is read before its learning rate decays, the last mark of a shorter run "
                       "after it has decayed")
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

