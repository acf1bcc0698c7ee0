"""The paper-protocol report (DESIGN §9): a paper's table, its orderings and whether they reproduce.

    mla-harness sweep sweeps/paper-care.yaml --set models=[smollm2-135m]
    mla-harness report paper "results/paper-care+models=smollm2-135m" --machine "1x H100 80GB (lent)"

From a paper sweep's rows (sweeps/paper-care.yaml: CARE Table 1, task group `care_eval`;
sweeps/paper-mha2mla.yaml: MHA2MLA Table 1, `mha2mla_eval`) it writes REPORT.md and one PNG per model:
the run (command, machine, rows present and missing, tasks scored and missing), the paper's table
per model x KV budget x method (wiki perplexity, each task's primary metric, the group mean ± stderr,
ratios to the original), the ranking of the methods at each budget with paired comparisons between
neighbours, and a verdict on each ordering DESIGN §9 says the paper claims.

Uncertainty: accuracy differences come from a paired bootstrap over the documents both rows scored
(`harness.paired`, the leaderboard's test); perplexity ratios from the per-window NLLs of both rows
on the same windows (`toolkit.paired_log_se`), where the runs kept them. "n.s.": the 95% interval
holds 0. A row the sweep should have but that is not there is "not measured", never guessed.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from harness.errors import HarnessError
from harness.reports.toolkit import (atomic_write_text, figure_block, markdown_table, paired_log_se, pyplot, read_rows,
                                     regenerate_line, save_figure, window_nll)
from harness.tasks import group_entries, task_metric

STUDY = "paper"
SWEEPS_DIR = Path(__file__).resolve().parents[2] / "sweeps"
Z95 = 1.959964


# ------------------------------------------------------------------------ the papers (DESIGN §9)
@dataclass(frozen=True)
class Claim:
    """An ordering a paper reports: cell a `rel` cell b on the group mean; a cell is (method, KV budget).

    rel: ">" / "≫" (a scores higher), "<" (lower), "≈" (no difference). ppl_rel: how the paper's
    perplexities of a and b compare ("<": a lower), or None where the paper gives none.
    """

    a: tuple[str, float | None]
    rel: str
    b: tuple[str, float | None]
    ppl_rel: str | None = None


@dataclass(frozen=True)
class Paper:
    name: str
    table: str  # what the paper's numbers are
    scores: dict  # {(method, budget): (mean accuracy in %, wiki ppl or None)}
    claims: tuple[Claim, ...]
    caveat: str


PAPERS = {
    "care_eval": Paper(
        "CARE (Zhou et al. 2026), Table 1",
        "Llama-3.1-8B-Instruct, one-shot, Alpaca calibration; mean of 8 lm-eval tasks, WikiText ppl",
        {("baseline", None): (58.24, 7.21),
         ("mha2mla-care-halfbytes", 0.5): (37.88, 220.0), ("palu-svd", 0.5): (39.33, 45.4),
         ("asvd", 0.5): (55.20, 12.0), ("svdllm", 0.5): (62.21, 9.63), ("care-u", 0.5): (62.33, 9.64),
         ("care-e", 0.5): (57.82, 19.5),
         ("mha2mla-care-halfbytes", 0.75): (math.nan, 1634.0), ("palu-svd", 0.75): (math.nan, 538.0),
         ("asvd", 0.75): (math.nan, 313.0), ("svdllm", 0.75): (math.nan, 47.3), ("care-u", 0.75): (50.00, 48.4),
         ("care-e", 0.75): (52.62, 49.4)},
        (Claim(("care-u", 0.5), "≈", ("svdllm", 0.5), "≈"),
         Claim(("svdllm", 0.5), ">", ("asvd", 0.5), "<"),
         Claim(("asvd", 0.5), "≫", ("palu-svd", 0.5), "<"),
         Claim(("palu-svd", 0.5), "≈", ("mha2mla-care-halfbytes", 0.5), "<"),
         Claim(("care-e", 0.5), "<", ("care-u", 0.5), ">"),
         Claim(("care-e", 0.75), ">", ("care-u", 0.75), ">")),
        "The paper's model is Llama-3.1-8B-Instruct; compare orderings, not absolute scores. Its \"MHA2MLA\" is a "
        "joint latent of rank r beside r per K and per V (half the others' cache: `mha2mla-care-halfbytes`, whose "
        "kv_save column says so); `mha2mla-matched` is the same method at the others' bytes. Its \"Palu\" is plain "
        "weight SVD (`palu-svd`). Its original row mixes metrics (HellaSwag 60.15 there vs 73.98 in converted rows), so "
        "its ×orig ratios above 1 are that artefact, not gains."),
    "mha2mla_eval": Paper(
        "MHA2MLA (Ji et al. 2025), Table 1",
        "SmolLM-135M, 2-norm RoPE selection, after 2.25B tokens of healing; mean of 6 lighteval tasks",
        {("baseline", None): (44.50, None), ("mha2mla-2norm", 0.6875): (43.06, None),
         ("mha2mla-2norm", 0.8125): (41.84, None), ("mha2mla-2norm", 0.875): (40.97, None)},
        (Claim(("baseline", None), ">", ("mha2mla-2norm", 0.6875)),
         Claim(("mha2mla-2norm", 0.6875), ">", ("mha2mla-2norm", 0.8125)),
         Claim(("mha2mla-2norm", 0.8125), ">", ("mha2mla-2norm", 0.875))),
        "The paper's rows are healed (2.25B tokens) and its model is SmolLM-135M; rows without healing here are "
        "one-shot and the model SmolLM2-135M-Instruct: compare orderings and ratios to the original, not scores."),
}


# ------------------------------------------------------------------------------------ the rows
def load_rows(results: Path) -> pd.DataFrame:
    """The finished rows, one per (model, label, budget) (the last one wins): `label` is the method's
    (with its healing where there is one), `budget` the sweep's KV save (None for the original).

    Raises:
        HarnessError: no rows (read_rows), or rows without the columns a paper sweep writes.
    """
    df = read_rows(results)
    missing = [c for c in ("job_id", "model", "method", "budget_kv_save") if c not in df]
    if missing:
        raise HarnessError(f"{Path(results) / 'rows.parquet'} lacks {', '.join(missing)}: not a sweep's rows; "
                           "give the folder of a paper sweep (results/paper-care...)")
    heal = df["heal"].fillna("none").astype(str) if "heal" in df else pd.Series("none", index=df.index)
    df = df.assign(label=[m if h in ("none", "-") else f"{m} [heal {h}]" for m, h in zip(df["method"], heal)],
                   budget=[None if m == "baseline" or pd.isna(b) else float(b)
                           for m, b in zip(df["method"], df["budget_kv_save"])])
    df = df.drop_duplicates(["model", "label", "budget"], keep="last")
    return df.reset_index(drop=True)


def task_group(df: pd.DataFrame) -> str | None:
    """The rows' task group: a paper's (care_eval, mha2mla_eval) if asked, else the first asked task."""
    asked = [t for v in df.get("tasks", pd.Series(dtype=object)).dropna() for t in str(v).split(",") if t]
    for t in asked:
        if t in PAPERS:
            return t
    return asked[0] if asked else None


def entry_columns(df: pd.DataFrame, group: str) -> dict[str, str | None]:
    """{entry of the group: its score column, or None where no row scored it} under the group's convention
    (the primary metric where the entry has it, else acc: tasks/README.md)."""
    metric = task_metric(group)
    out = {}
    for e in group_entries(group) or [group]:
        cols = [c for c in (f"{e}/{metric}", f"{e}/acc") if c in df and df[c].notna().any()]
        out[e] = cols[0] if cols else None
    return out


def expected_cells(sweep_file: Path | None, overrides: list[str], rows: pd.DataFrame,
                   given: bool = False) -> tuple[pd.DataFrame, str]:
    """The (model, label, budget, job_id) one-shot cells the sweep asked for, and how that grid was found.

    With the sweep file and overrides that made the rows, the job ids match the rows' ("verified");
    otherwise the file's grid over the rows' models is used and the match is by label.

    Raises:
        HarnessError: a sweep file the user `given` does not load (read off the sweep name, it is skipped).
    """
    from harness.config import load_sweep

    unknown = pd.DataFrame(columns=["model", "label", "budget", "job_id"])
    if sweep_file is None or not Path(sweep_file).exists():
        if given:
            raise HarnessError(f"--sweep {sweep_file} does not exist; give the sweep YAML that produced the rows")
        return unknown, "expected rows unknown (no sweep file: give --sweep)"
    try:
        sweep = load_sweep(sweep_file, overrides)
    except HarnessError:
        if given:
            raise
        try:
            sweep, overrides = load_sweep(sweep_file), []
        except HarnessError as e:
            return unknown, f"expected rows unknown ({Path(sweep_file).name} does not load here: {e})"
    cells = pd.DataFrame([{"model": j.model, "label": "baseline" if j.is_baseline else j.method.display,
                           "budget": None if j.budget is None else j.budget.kv_save, "job_id": j.job_id}
                          for j in sweep.jobs if j.heal.mode == "none"])
    ids = set(rows["job_id"])
    hits = len(ids & set(cells["job_id"]))
    if hits:
        return cells, f"this command's job ids match {hits} of the {len(ids)} rows"
    cells = cells[cells["model"].isin(set(rows["model"]))].drop_duplicates(["model", "label", "budget"])
    made = " ".join([Path(sweep_file).name] + [f"--set {o}" for o in overrides])
    return cells, (f"not verified: no job id of {made} matches the rows'; "
                   "expected rows: that file's methods and budgets over the rows' models")


def sweep_source(rows: pd.DataFrame, sweep_file: str | None, overrides: list[str]) -> tuple[Path | None, list[str]]:
    """The sweep file and `--set` overrides: as given, else read off the sweep name ("paper-care+models=x")."""
    if sweep_file:
        return Path(sweep_file), list(overrides)
    names = rows["sweep"].dropna().unique() if "sweep" in rows else []
    if len(names) != 1:
        return None, list(overrides)
    base, *parts = str(names[0]).split("+")
    return SWEEPS_DIR / f"{base}.yaml", parts + list(overrides)


def machine_of(rows: pd.DataFrame, given: str | None) -> str:
    """The machine: what the rows record (a `machine`/`device` column) and what --machine says."""
    parts = [", ".join(sorted(rows[c].dropna().astype(str).unique())) + f" (rows' `{c}`)"
             for c in ("machine", "device_name", "device") if c in rows and rows[c].notna().any()]
    parts += [given] if given else []
    return "; ".join(parts) or "not recorded in the rows (pass --machine)"


# ------------------------------------------------------------------------------ paired tests
class Comparisons:
    """Paired differences between two rows' scores on the same documents / windows, cached."""

    def __init__(self, results: Path, group: str | None):
        self.results, self.group = Path(results), group
        self.metric = task_metric(group) if group else "acc"
        self._docs: dict = {}

    def _load(self, job):
        if job not in self._docs:
            run = self.results / "runs" / str(job)
            f, meta = run / "lm_eval_documents.parquet", run / "lm_eval_results.json"
            self._docs[job] = ((pd.read_parquet(f), json.loads(meta.read_text()).get("group_weighting", {}))
                               if f.exists() and meta.exists() else None)
        return self._docs[job]

    def accuracy(self, job_a: str, job_b: str) -> dict | None:
        """mean(a) - mean(b) over the group, {"delta", "lo", "hi", "significant"}; None without documents."""
        from harness.paired import paired_difference

        a, b = self._load(job_a), self._load(job_b)
        if a is None or b is None or self.group is None:
            return None
        return paired_difference(b[0], a[0], [self.group], a[1], metric=self.metric)

    def ppl(self, job_a: str, job_b: str, domain: str = "wiki") -> dict | None:
        """log(ppl_a / ppl_b) on the same windows with its 95% interval; None without per-window NLLs."""
        a, b = window_nll(self.results, job_a).get(domain), window_nll(self.results, job_b).get(domain)
        if not a or not b:
            return None
        se = paired_log_se(a, b)
        if math.isnan(se):
            return None
        d = sum(a) / len(a) - sum(b) / len(b)
        return {"delta": d, "lo": d - Z95 * se, "hi": d + Z95 * se, "significant": abs(d) > Z95 * se}


# ------------------------------------------------------------------------------ the table
def paper_table(df: pd.DataFrame, group: str | None, entries: dict[str, str | None]) -> pd.DataFrame:
    """One row per model x budget x method: ppl, its ratio to the model's original, each entry's score,
    the group mean ± stderr and its ratio to the original (fractions; NaN where not scored)."""
    metric = task_metric(group) if group else "acc"
    mean_col = f"{group}/{metric}" if group and f"{group}/{metric}" in df else None
    base = df[df["label"] == "baseline"].drop_duplicates("model", keep="last").set_index("model")  # the original
    out = []
    for _, r in df.iterrows():
        b = base.loc[r["model"]] if r["model"] in base.index else None
        row = {"model": r["model"], "budget": r["budget"], "method": r["label"], "job_id": r["job_id"],
               "kv_save": r.get("kv_save"), "ppl": r.get("ppl_wiki", math.nan)}
        row["ppl_ratio"] = row["ppl"] / b["ppl_wiki"] if b is not None and "ppl_wiki" in b else math.nan
        for e, col in entries.items():
            row[e] = r[col] if col else math.nan
        row["mean"] = r[mean_col] if mean_col else math.nan
        row["mean_se"] = r.get(f"{mean_col}_stderr", math.nan) if mean_col else math.nan
        row["mean_ratio"] = row["mean"] / b[mean_col] if b is not None and mean_col else math.nan
        out.append(row)
    return pd.DataFrame(out)


def method_order(labels, grid: pd.DataFrame) -> list[str]:
    """baseline, then the sweep's method order, then any other label by name."""
    sweep = [m for m in dict.fromkeys(grid["label"]) if m != "baseline"] if len(grid) else []
    return ["baseline"] + sweep + sorted(set(labels) - set(sweep) - {"baseline"})


def ranking(tbl: pd.DataFrame, key: str, comp: Comparisons) -> pd.DataFrame:
    """The converted rows of one model and budget best first on `key` ("mean": higher is better,
    "ppl": lower), each with its paired difference to the row ranked just above it."""
    rows = tbl[(tbl["method"] != "baseline") & tbl[key].notna()]
    rows = rows.sort_values(key, ascending=(key == "ppl")).reset_index(drop=True)
    diffs = [None] + [(comp.accuracy if key == "mean" else comp.ppl)(rows.loc[i, "job_id"], rows.loc[i - 1, "job_id"])
                      for i in range(1, len(rows))]
    return rows.assign(vs_above=diffs)


def _diff_text(d: dict | None, key: str) -> str:
    if d is None:
        return "no paired data"
    if key == "mean":
        text = f"{100 * d['delta']:+.2f} [{100 * d['lo']:+.2f}, {100 * d['hi']:+.2f}]"
    else:
        text = f"×{math.exp(d['delta']):.3f} [{math.exp(d['lo']):.3f}, {math.exp(d['hi']):.3f}]"
    return text + ("" if d["significant"] else " n.s.")


# ------------------------------------------------------------------------------ the verdicts
def verdict(rel: str, d: dict | None, fallback: float | None = None) -> str:
    """Whether a measured difference d = a - b bears out `a rel b`.

    Strict orderings (>, ≫, <): reproduced when the 95% interval lies on the claimed side, not
    reproduced when it lies on the other, not significant when it holds 0. "≈": reproduced when the
    interval holds 0, else not reproduced. Without paired data, the sign of `fallback` (a - b of the
    means) decides, marked "(untested)".
    """
    if d is None:
        if fallback is None or math.isnan(fallback):
            return "not measured"
        if rel == "≈":
            return "not tested (no paired data)"
        same = fallback > 0 if rel in (">", "≫") else fallback < 0
        return ("reproduced" if same else "not reproduced") + " (untested: no paired data)"
    if rel == "≈":
        return "not reproduced" if d["significant"] else "reproduced"
    if not d["significant"]:
        return "not significant"
    return "reproduced" if (d["delta"] > 0) == (rel in (">", "≫")) else "not reproduced"


def ppl_verdict(rel: str | None, d: dict | None, ratio: float) -> str:
    """The same for perplexity (rel compares ppl_a with ppl_b: "<" a lower); d is log(ppl_a / ppl_b)."""
    if rel is None:
        return "paper gives none"
    if math.isnan(ratio):
        return "not measured"
    if d is None:
        if rel == "≈":
            return "not tested (no per-window NLLs)"
        return ("reproduced" if (ratio < 1) == (rel == "<") else "not reproduced") + " (untested: no per-window NLLs)"
    return verdict({"<": ">", ">": "<", "≈": "≈"}[rel], {**d, "delta": -d["delta"]})


def claim_rows(tbl: pd.DataFrame, paper: Paper, comp: Comparisons) -> pd.DataFrame:
    """One row per claim of the paper for one model's table: the paper's and our numbers and verdicts."""
    cells = {(m, None if pd.isna(b) else float(b)): r for (m, b), r in
             zip(zip(tbl["method"], tbl["budget"]), tbl.to_dict("records"))}
    out = []
    for c in paper.claims:
        ra, rb = cells.get(c.a), cells.get(c.b)
        pa, pb = paper.scores.get(c.a, (math.nan, None)), paper.scores.get(c.b, (math.nan, None))
        row = {"claim": f"{_cell(c.a)} {c.rel} {_cell(c.b)}",
               "paper": f"{pa[0]:.2f} vs {pb[0]:.2f}" + (f"; ppl {pa[1]:g} vs {pb[1]:g}" if pa[1] and pb[1] else "")}
        if ra is None or rb is None:
            lost = [_cell(x) for x, r in ((c.a, ra), (c.b, rb)) if r is None]
            row.update({"ours": "", "Δ mean [95%]": "", "verdict": f"not measured ({', '.join(lost)} missing)",
                        "ppl ratio a/b [95%]": "", "ppl verdict": "not measured"})
            out.append(row)
            continue
        d = comp.accuracy(ra["job_id"], rb["job_id"])
        dp = comp.ppl(ra["job_id"], rb["job_id"])
        ratio = ra["ppl"] / rb["ppl"]
        row["ours"] = (f"{100 * ra['mean']:.2f} vs {100 * rb['mean']:.2f}; ppl {ra['ppl']:.4g} vs {rb['ppl']:.4g}")
        row["Δ mean [95%]"] = _diff_text(d, "mean") if d else f"{100 * (ra['mean'] - rb['mean']):+.2f} (no paired data)"
        row["verdict"] = verdict(c.rel, d, ra["mean"] - rb["mean"])
        row["ppl ratio a/b [95%]"] = _diff_text(dp, "ppl") if dp else f"×{ratio:.3f} (no per-window NLLs)"
        row["ppl verdict"] = ppl_verdict(c.ppl_rel, dp, ratio)
        out.append(row)
    return pd.DataFrame(out)


def _cell(c: tuple) -> str:
    return c[0] if c[1] is None else f"{c[0]} @ {c[1]:g}"


# ------------------------------------------------------------------------------ the figure
def plot_model(tbl: pd.DataFrame, missing: pd.DataFrame, order: list[str], model: str, path: Path) -> Path:
    """Mean accuracy ± stderr (top) and wiki ppl (bottom, log) per method, side by side within each KV
    budget; the original as a dashed line; a row the sweep lacks as "n/m" at its place."""
    plt = pyplot()
    budgets = sorted({float(b) for b in list(tbl["budget"]) + list(missing["budget"]) if pd.notna(b)})
    methods = [m for m in order if m != "baseline" and (m in set(tbl["method"]) or m in set(missing["label"]))]
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    step = 0.8 / max(len(methods), 1)
    fig, axes = plt.subplots(2, 1, figsize=(max(6.5, 1.5 + 0.5 * len(methods) * len(budgets)), 6.4), sharex=True,
                             layout="constrained")
    base = tbl[tbl["method"] == "baseline"]
    for ax, key, scale in ((axes[0], "mean", 100.0), (axes[1], "ppl", 1.0)):
        for j, m in enumerate(methods):
            for i, b in enumerate(budgets):
                x = i + (j - (len(methods) - 1) / 2) * step
                r = tbl[(tbl["method"] == m) & (tbl["budget"] == b)]
                if len(r) and pd.notna(r[key].iloc[0]):
                    err = scale * r["mean_se"].iloc[0] if key == "mean" else None
                    ax.errorbar(x, scale * r[key].iloc[0], yerr=err, fmt="o", capsize=3, color=colours[m])
                elif len(missing[(missing["label"] == m) & (missing["budget"] == b)]):
                    ax.text(x, 0.04, "n/m", transform=ax.get_xaxis_transform(), ha="center", fontsize=7,
                            color=colours[m], rotation=90)
        if len(base) and pd.notna(base[key].iloc[0]):
            ax.axhline(scale * base[key].iloc[0], color="k", ls="--", lw=1)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("mean accuracy (%) ± stderr")
    axes[1].set_ylabel("wiki perplexity (log)")
    axes[1].set_yscale("log")
    axes[1].set_xticks(range(len(budgets)), [f"KV budget {b:g}" for b in budgets])
    axes[1].set_xlim(-0.5, len(budgets) - 0.5)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="k", ls="--", label="original")]
    handles += [Line2D([], [], color=colours[m], marker="o", ls="", label=m) for m in methods]
    fig.legend(handles=handles, loc="outside right upper", fontsize=7)
    fig.suptitle(f"{model}: paper protocol (n/m: not measured)")
    return save_figure(fig, path)


# ------------------------------------------------------------------------------ the report
def build_report(results: Path, command: str | None = None, machine: str | None = None,
                 sweep_file: str | None = None, overrides: list[str] | None = None) -> Path:
    """Write REPORT.md and paper_<model>.png into `results` (a paper sweep's results folder).

    Raises:
        HarnessError: the folder has no finished rows.
    """
    results = Path(results)
    df = load_rows(results)
    group = task_group(df)
    paper = PAPERS.get(group)
    entries = entry_columns(df, group) if group else {}
    sweep_path, sets = sweep_source(df, sweep_file, overrides or [])
    grid, grid_how = expected_cells(sweep_path, sets, df, given=bool(sweep_file))
    present = {(m, lab, _bkey(b)) for m, lab, b in zip(df["model"], df["label"], df["budget"])}
    missing = grid[[(m, lab, _bkey(b)) not in present for m, lab, b in zip(grid["model"], grid["label"], grid["budget"])]]
    if command is not None:
        how = "(given with --command)"
    elif sweep_path is not None:
        shown = sweep_path.relative_to(SWEEPS_DIR.parent) if sweep_path.is_relative_to(SWEEPS_DIR.parent) else sweep_path
        command = f"mla-harness sweep {shown}" + "".join(f" --set {s}" for s in sets)
        how = f"({'from --sweep/--set' if sweep_file else 'read off the sweep name'}; {grid_how})"
    else:
        command, how = "", "not recorded (pass --command)"
    comp = Comparisons(results, group)
    tbl_all = paper_table(df, group, entries)
    order = method_order(set(tbl_all["method"]), grid)
    lines = [f"# Paper protocol: {paper.name if paper else group or 'perplexity only'}", "",
             f"{regenerate_line(STUDY, results)}. Protocol and the paper's known flaws: DESIGN §9.", ""]
    lines += _run_section(results, df, group, entries, (command, how), machine_of(df, machine), grid, missing, paper)
    figs = []
    for model, tbl in tbl_all.groupby("model", sort=True):
        miss = missing[missing["model"] == model]
        lines += _table_section(model, tbl, miss, entries, order, group, paper)
        lines += _ordering_section(tbl, comp, order, paper)
        if paper:
            lines += _claims_section(tbl, paper, comp, model)
        path = plot_model(tbl, miss, order, model, results / f"paper_{_slug(model)}.png")
        figs.append(path.name)
        lines.append(figure_block(path, f"{model}: mean accuracy ± stderr and wiki perplexity per method and KV budget",
                                  STUDY, results))
    lines += ["## Notes", "",
              "- Scores in %; ratios ×original are the row's value over the same model's unconverted row.",
              "- Δ mean: a paired bootstrap over the documents both rows scored (2000 resamples, stratified by task, "
              "the group's weighting as recorded by the run); 95% interval; n.s.: it holds 0. Δ is recomputed from "
              "the documents and can differ from the difference of the table's means in the last digit.",
              "- ppl ratios: from the per-window NLLs on the same windows where the runs kept them "
              "(metrics.json `nll_windows`), else no interval.",
              f"- Figures: {', '.join(figs)}, rewritten by the same command.", ""]
    out = results / "REPORT.md"
    atomic_write_text(out, "\n".join(lines).rstrip() + "\n")
    return out


def _bkey(b) -> float | None:
    """A KV budget as a comparable key: None for the original (None or NaN in a frame)."""
    return None if b is None or pd.isna(b) else round(float(b), 6)


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in Path(str(text)).name)


def _run_section(results, df, group, entries, command, machine, grid, missing, paper) -> list[str]:
    lines = ["## Run", "", f"- command: `{command[0]}` {command[1]}" if command[0] else f"- command: {command[1]}",
             f"- machine: {machine}",
             f"- sweep: {', '.join(sorted(df['sweep'].dropna().astype(str).unique())) if 'sweep' in df else '?'}; "
             f"models: {', '.join(sorted(df['model'].unique()))}"]
    expected = f" of {len(grid)} expected" if len(grid) else " (the expected grid is unknown)"
    lines.append(f"- rows: {len(df)} finished{expected}" + (
        "; not measured: " + ", ".join(f"{m} {_cell((lab, b))}" for m, lab, b in
                                       zip(missing["model"], missing["label"], missing["budget"])) if len(missing) else ""))
    if "seconds" in df and df["seconds"].notna().any():
        s = df["seconds"].dropna()
        lines.append(f"- wall time: {s.sum() / 60:.1f} min, the sum over {len(s)} jobs ({s.min():.0f}-{s.max():.0f} s "
                     "per job: conversion + perplexity + lm-eval)" + _throughput(results, df))
    if group:
        metric = task_metric(group)
        scored = [f"{e} ({c.rsplit('/', 1)[1]})" for e, c in entries.items() if c]
        lost = [e for e, c in entries.items() if not c]
        lines.append(f"- tasks: `{group}`, primary metric {metric} (an entry without it: acc); scored "
                     f"{len(scored)}/{len(entries)}: {', '.join(scored)}"
                     + (f"; **missing: {', '.join(lost)}**" if lost else ""))
        notes = sorted(set(df["tasks_note"].dropna())) if "tasks_note" in df else []
        lines += [f"- Note: {n}." for n in notes]
    else:
        lines.append("- tasks: none asked (perplexity only)")
    if paper:
        lines += [f"- paper: {paper.name}: {paper.table}. {paper.caveat}"]
    return lines + [""]


def _throughput(results: Path, df: pd.DataFrame) -> str:
    """"; perplexity at N tokens/s" (median over the jobs' metrics.json), or "" where not recorded."""
    rates = []
    for job in df["job_id"]:
        f = Path(results) / "runs" / str(job) / "metrics.json"
        ppl = json.loads(f.read_text()).get("ppl", {}) if f.exists() else {}
        rates += [r["tokens"] / r["seconds"] for r in ppl.values() if isinstance(r, dict) and r.get("seconds")]
    if not rates:
        return ""
    rates.sort()
    return f"; perplexity forward passes at {rates[len(rates) // 2]:,.0f} tokens/s (median over jobs and domains)"


def _table_section(model, tbl, miss, entries, order, group, paper) -> list[str]:
    rows = []
    budgets = [None] + sorted({b for b in list(tbl["budget"]) + list(miss["budget"]) if b is not None and pd.notna(b)})
    for b in budgets:
        for m in order:
            r = tbl[(tbl["method"] == m) & ((tbl["budget"] == b) if b is not None else tbl["budget"].isna())]
            key = "original" if b is None else f"{b:g}"
            if len(r):
                r = r.iloc[0]
                cells = {"KV budget": key, "method": m, "kv_save": f"{r['kv_save']:.4g}",
                         "wiki ppl": _num(r["ppl"]), "ppl ×orig": f"{r['ppl_ratio']:.2f}"}
                cells.update({e: _pct(r[e]) if c else "—" for e, c in entries.items()})
                cells["mean ± se"] = f"{_pct(r['mean'])} ± {_pct(r['mean_se'])}" if pd.notna(r["mean"]) else ""
                cells["mean ×orig"] = f"{r['mean_ratio']:.3f}" if pd.notna(r["mean_ratio"]) else ""
            elif any(lab == m and _bkey(v) == _bkey(b) for lab, v in zip(miss["label"], miss["budget"])):
                cells = {"KV budget": key, "method": m, "kv_save": "not measured"}
            else:
                continue
            if paper:
                cells["paper mean (×orig); ppl"] = _paper_cell(paper, m, b)
            rows.append(cells)
    frame = pd.DataFrame(rows).fillna("")
    metric = task_metric(group) if group else ""
    return [f"## {model}: the paper's table", "",
            f"Per KV budget (the sweep's `budgets`; `kv_save` is what the row's cache saves) and method: wiki "
            f"perplexity, each `{group}` entry's score (column metric: {metric}, acc where the entry has none), "
            "the group mean ± stderr, and ratios to the original. \"—\": entry not scored."
            + (" Last column: the paper's numbers (its model, not ours)." if paper else ""), "",
            markdown_table(frame, fmt=str, index=False), ""] + _chance_lines(tbl, entries)


# Answer options of each paper-group entry, a property of the benchmark: uniform guessing scores 100/options
# (ARC mixes a few 3- and 5-option questions into its 4-option ones: about 25).
OPTIONS = {"mmlu": 4, "arc": 4, "arc_easy": 4, "arc_challenge": 4, "piqa": 2, "hellaswag": 4, "openbookqa": 4,
           "winogrande": 2, "race": 4, "boolq": 2}
NEAR_CHANCE = 2.0  # points


def chance_mean(entries: dict[str, str | None]) -> float | None:
    """The group mean uniform guessing would score (the scored entries' 100/options, averaged); None when an
    entry's option count is unknown. Why: one-shot conversions at small budgets can fall to chance, where
    the orderings between rows are noise, and a reader should see that before reading them."""
    rates = []
    for e, col in entries.items():
        if not col:
            continue
        base = e.split("_", 1)[1] if e.startswith(("mha2mla_", "care_")) else e
        if base not in OPTIONS:
            return None
        rates.append(100.0 / OPTIONS[base])
    return sum(rates) / len(rates) if rates else None


def _chance_lines(tbl: pd.DataFrame, entries: dict[str, str | None]) -> list[str]:
    chance = chance_mean(entries)
    if chance is None or "mean" not in tbl or tbl["mean"].isna().all():
        return []
    rows = sorted(zip(tbl["budget"], tbl["method"], tbl["mean"]), key=lambda r: (_bkey(r[0]) or 0.0, r[1]))
    near = [f"{m} @ {b:g}" if pd.notna(b) else m for b, m, v in rows if pd.notna(v) and 100 * v - chance <= NEAR_CHANCE]
    text = (f"Chance level: uniform guessing scores {chance:.2f} on this group mean (each scored entry's "
            f"100/options, averaged). ")
    if near:
        text += (f"{len(near)} of {tbl['mean'].notna().sum()} rows are within {NEAR_CHANCE:g} points of it "
                 f"({', '.join(near)}): at that level the orderings between them are noise, not a method's effect.")
    else:
        text += f"No row is within {NEAR_CHANCE:g} points of it."
    return [text, ""]


def _paper_cell(paper: Paper, method: str, budget) -> str:
    """The paper's "mean (×original); ppl" for one cell, "" where the paper has no such row."""
    p, orig = paper.scores.get((method, budget)), paper.scores.get(("baseline", None))
    if p is None:
        return ""
    mean = "—" if pd.isna(p[0]) else f"{p[0]:g}" + (f" (×{p[0] / orig[0]:.3f})" if orig and method != "baseline" else "")
    return f"{mean}; {'—' if p[1] is None or pd.isna(p[1]) else f'{p[1]:g}'}"


def _ordering_section(tbl, comp, order, paper) -> list[str]:
    lines = ["### Orderings", "",
             "Best first; each row's difference to the row ranked just above it (mean: points; ppl: ratio), 95% "
             "paired interval, n.s. where it holds 0.", ""]
    for b in sorted(x for x in tbl["budget"].dropna().unique()):
        sub = tbl[(tbl["budget"] == b) | (tbl["method"] == "baseline")]
        for key, what in (("mean", "group mean"), ("ppl", "wiki perplexity")):
            rk = ranking(sub, key, comp)
            if not len(rk):
                continue
            text = " > ".join(f"{m}" for m in rk["method"])
            frame = pd.DataFrame({"rank": range(1, len(rk) + 1), "method": rk["method"],
                                  "kv_save": [f"{v:.4g}" for v in rk["kv_save"]],
                                  what: [(_pct(v) if key == "mean" else _num(v)) for v in rk[key]],
                                  "vs the rank above": ["" if d is None and i == 0 else _diff_text(d, key)
                                                        for i, d in enumerate(rk["vs_above"])]})
            lines += [f"**KV budget {b:g}, by {what}** (best first): {text}", "", markdown_table(frame, fmt=str, index=False), ""]
        if paper:
            pap = {m: v for (m, pb), v in paper.scores.items() if pb == b}
            for i, what in ((0, "mean"), (1, "ppl")):
                vals = {m: v[i] for m, v in pap.items() if v[i] is not None and pd.notna(v[i])}
                if len(vals) > 1:
                    ranked = sorted(vals, key=vals.get, reverse=(i == 0))
                    lines += [f"Paper at {b:g}, by {what} (best first): " + " > ".join(f"{m} ({vals[m]:g})" for m in ranked), ""]
    return lines


def _claims_section(tbl, paper, comp, model) -> list[str]:
    claims = claim_rows(tbl, paper, comp)
    counts = claims["verdict"].str.split(" [(]", regex=True).str[0].value_counts()
    lines = [f"### Does the paper's ordering reproduce? ({model})", "",
             "The orderings DESIGN §9 lists for " + paper.name + ", checked on the group mean (verdict) and on wiki "
             "perplexity (ppl verdict: does ours order the two as the paper's perplexities do). Strict orderings: "
             "reproduced / not reproduced when the 95% paired interval excludes 0 on the claimed / the other side, "
             "not significant when it holds 0; \"≈\": reproduced when the interval holds 0. Not measured: a row is "
             "missing. Verdicts: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + ".", "",
             markdown_table(claims, fmt=str, index=False), ""]
    if "mha2mla-matched" in set(tbl["method"]) or "mha2mla-care-halfbytes" in set(tbl["method"]):
        lines += _matched_lines(tbl, comp)
    return lines


def _matched_lines(tbl, comp) -> list[str]:
    """The matched-bytes correction of CARE's MHA2MLA baseline: measurements, not paper claims."""
    out = []
    for b in sorted(tbl["budget"].dropna().unique()):
        cells = {m: tbl[(tbl["method"] == m) & (tbl["budget"] == b)] for m in
                 ("mha2mla-matched", "mha2mla-care-halfbytes", "palu-svd")}
        for a, other in (("mha2mla-matched", "mha2mla-care-halfbytes"), ("mha2mla-matched", "palu-svd")):
            ra, rb = cells[a], cells[other]
            if not len(ra) or not len(rb):
                out.append(f"- KV budget {b:g}: {a} vs {other}: not measured")
                continue
            ra, rb = ra.iloc[0], rb.iloc[0]
            d, dp = comp.accuracy(ra["job_id"], rb["job_id"]), comp.ppl(ra["job_id"], rb["job_id"])
            out.append(f"- KV budget {b:g}: {a} (kv_save {ra['kv_save']:.4g}) vs {other} (kv_save {rb['kv_save']:.4g}): "
                       f"mean {_pct(ra['mean'])} vs {_pct(rb['mean'])}, Δ "
                       f"{_diff_text(d, 'mean') if d else 'no paired data'}; ppl {_num(ra['ppl'])} vs {_num(rb['ppl'])}"
                       f" ({_diff_text(dp, 'ppl') if dp else _ratio_text(ra['ppl'] / rb['ppl'])})")
    return ["**CARE's MHA2MLA baseline at matched bytes** (DESIGN §9: their \"MHA2MLA\" holds half the others' "
            "cache; measured here, not a claim of the paper):", ""] + out + [""]


def _ratio_text(r: float) -> str:
    return f"×{r:.3f}, no per-window NLLs"


def _pct(v) -> str:
    return "" if v is None or pd.isna(v) else f"{100 * v:.2f}"


def _num(v) -> str:
    return "" if v is None or pd.isna(v) else (f"{v:.2f}" if v < 1000 else f"{v:.4g}")


# ------------------------------------------------------------------------------------- CLI
def cmd_paper(a) -> int:
    """Write REPORT.md and its figures into a paper-protocol sweep's results folder."""
    out = build_report(Path(a.results_dir), command=a.rows_command, machine=a.rows_machine, sweep_file=a.rows_sweep,
                       overrides=a.rows_set or [])
    print(f"wrote {out} and its figures")
    return 0


def add_parser(sub) -> None:
    """`mla-harness report paper RESULTS_DIR [--command ...] [--machine ...] [--sweep FILE --set K=V]`."""
    s = sub.add_parser(STUDY, help=cmd_paper.__doc__, description=__doc__.split("\n\n")[0])
    s.add_argument("results_dir", help="the paper sweep's results folder, e.g. results/paper-care")
    s.add_argument("--command", dest="rows_command", help="the command that produced the rows (default: read off the sweep name)")
    s.add_argument("--machine", dest="rows_machine", help="the machine the rows ran on, where the rows do not record it")
    s.add_argument("--sweep", dest="rows_sweep", help="the sweep YAML that produced the rows (default: sweeps/<sweep name>.yaml)")
    s.add_argument("--set", dest="rows_set", action="append", metavar="KEY=VALUE",
                   help="an override the sweep ran with (repeat); gives the expected rows")
    s.set_defaults(report_func=cmd_paper)
