"""The paper-protocol report builds from constructed rows and per-document scores (no model), and its
numbers, rankings and verdicts are right.

    .venv/bin/python -m pytest tests/test_report_paper.py -q
"""
import json
import math

import numpy as np
import pandas as pd
import pytest

from harness.cli import main
from harness.reports import paper as pr

TASKS = ("arc_easy", "piqa", "winogrande")  # 3 of care_eval's 8 entries are scored here
N = 400  # documents per task
WEIGHTING = {"care_eval": {"children": list(TASKS), "weight_by_size": False}}
PPL = {"baseline": 20.0, "palu-svd": 900.0, "asvd": 60.0, "svdllm": 30.0, "care-u": 31.0,
       "mha2mla-care-halfbytes": 400.0}


def _flip(scores: np.ndarray, down: int, up: int) -> np.ndarray:
    """`scores` with `down` correct documents made wrong and `up` wrong ones made right (first ones)."""
    out = scores.copy()
    out[np.flatnonzero(out == 1)[:down]] = 0
    out[np.flatnonzero(scores == 0)[:up]] = 1
    return out


def _documents() -> dict[str, np.ndarray]:
    """Per method, 0/1 scores of the N*3 documents (task-major), built so that:
    svdllm >> asvd (significant), care-u = svdllm - 1 doc (n.s.), palu-svd = asvd - 2 docs (n.s.),
    mha2mla-care-halfbytes far below palu-svd (significant)."""
    rng = np.random.default_rng(0)
    docs = {"baseline": (rng.random(3 * N) < 0.65).astype(float), "svdllm": (rng.random(3 * N) < 0.60).astype(float),
            "asvd": (rng.random(3 * N) < 0.45).astype(float),
            "mha2mla-care-halfbytes": (rng.random(3 * N) < 0.25).astype(float)}
    docs["care-u"] = _flip(docs["svdllm"], down=4, up=3)
    docs["palu-svd"] = _flip(docs["asvd"], down=5, up=3)
    return docs


def _frame(scores: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"task": np.repeat(TASKS, N), "doc_id": np.tile(np.arange(N), len(TASKS)),
                         "acc": scores, "acc_norm": scores})


def _row(job: str, method: str, scores: np.ndarray, sweep: str) -> dict:
    row = {"job_id": job, "sweep": sweep, "status": "ok", "model": "smollm2-135m", "method": method,
           "budget_kv_save": None if method == "baseline" else 0.5, "heal": "none",
           "kv_save": {"baseline": 0.0, "mha2mla-care-halfbytes": 0.75}.get(method, 0.5),
           "ppl_wiki": PPL[method], "tasks": "care_eval", "seconds": 60.0,
           "tasks_note": "care_eval: RACE: no offline rows (7/8 tasks)"}
    means, ses = [], []
    for i, t in enumerate(TASKS):
        s = scores[i * N:(i + 1) * N]
        col = f"{t}/acc" if t == "winogrande" else f"{t}/acc_norm"  # the convention: acc where no acc_norm
        row[col], row[col + "_stderr"] = s.mean(), s.std(ddof=1) / math.sqrt(N)
        means.append(s.mean())
        ses.append(row[col + "_stderr"])
    row["care_eval/acc_norm"] = sum(means) / len(means)
    row["care_eval/acc_norm_stderr"] = math.sqrt(sum(e * e for e in ses)) / len(ses)
    return row


def _write(folder, sweep="paper-care", ids=None) -> dict:
    """A paper-care results folder: rows.parquet, per-document scores, care-u/svdllm window NLLs."""
    docs = _documents()
    ids = ids or {m: f"job-{m}" for m in docs}
    (folder / "runs").mkdir(parents=True)
    rows = []
    for m, s in docs.items():
        run = folder / "runs" / ids[m]
        run.mkdir()
        _frame(s).to_parquet(run / "lm_eval_documents.parquet")
        (run / "lm_eval_results.json").write_text(json.dumps({"group_weighting": WEIGHTING}))
        rows.append(_row(ids[m], m, s, sweep))
    nll = {"svdllm": [3.0, 3.5, 3.2, 3.4], "care-u": [3.1, 3.4, 3.3, 3.4]}  # diffs +.1 -.1 +.1 0: n.s.
    for m, w in nll.items():
        (folder / "runs" / ids[m] / "metrics.json").write_text(json.dumps(
            {"ppl": {"wiki": {"ppl": PPL[m], "nll_windows": w, "tokens": 4096, "seconds": 0.5}}}))
    pd.DataFrame(rows).to_parquet(folder / "rows.parquet")
    return docs


@pytest.fixture
def results(tmp_path):
    folder = tmp_path / "paper-care"
    _write(folder)
    return folder


def test_table_ratios_to_the_original_and_entries(results):
    df = pr.load_rows(results)
    entries = pr.entry_columns(df, "care_eval")
    assert list(entries) == ["arc_challenge", "arc_easy", "hellaswag", "piqa", "mmlu", "openbookqa", "race", "winogrande"]
    assert entries["arc_easy"] == "arc_easy/acc_norm" and entries["winogrande"] == "winogrande/acc"
    assert entries["race"] is None and entries["mmlu"] is None
    tbl = pr.paper_table(df, "care_eval", entries).set_index("method")
    docs = _documents()
    assert tbl.loc["svdllm", "ppl_ratio"] == pytest.approx(30.0 / 20.0)
    assert tbl.loc["palu-svd", "ppl_ratio"] == pytest.approx(45.0)
    assert tbl.loc["svdllm", "mean"] == pytest.approx(docs["svdllm"].mean())  # equal task sizes: the pooled mean
    assert tbl.loc["asvd", "mean_ratio"] == pytest.approx(docs["asvd"].mean() / docs["baseline"].mean())
    assert tbl.loc["baseline", "mean_ratio"] == 1.0 and tbl.loc["mha2mla-care-halfbytes", "kv_save"] == 0.75


def test_ranking_and_paired_neighbours(results):
    df = pr.load_rows(results)
    tbl = pr.paper_table(df, "care_eval", pr.entry_columns(df, "care_eval"))
    comp = pr.Comparisons(results, "care_eval")
    rk = pr.ranking(tbl, "mean", comp)
    assert list(rk["method"]) == ["svdllm", "care-u", "asvd", "palu-svd", "mha2mla-care-halfbytes"]
    d_cu, d_asvd, d_palu = rk["vs_above"][1], rk["vs_above"][2], rk["vs_above"][3]
    assert d_cu["delta"] == pytest.approx(-1 / (3 * N)) and not d_cu["significant"]  # one document apart: n.s.
    assert d_cu["lo"] < 0 < d_cu["hi"]
    assert d_asvd["significant"] and d_asvd["hi"] < 0
    assert d_palu["delta"] == pytest.approx(-2 / (3 * N)) and not d_palu["significant"]
    assert "n.s." in pr._diff_text(d_cu, "mean") and "n.s." not in pr._diff_text(d_asvd, "mean")
    by_ppl = pr.ranking(tbl, "ppl", comp)
    assert list(by_ppl["method"]) == ["svdllm", "care-u", "asvd", "mha2mla-care-halfbytes", "palu-svd"]
    p = by_ppl["vs_above"][1]  # care-u vs svdllm from the window NLLs: mean diff 0.025, n.s.
    assert p["delta"] == pytest.approx(0.025) and not p["significant"]
    assert by_ppl["vs_above"][2] is None  # asvd kept no window NLLs: no interval, never a made-up one


def test_claims_reproduced_not_reproduced_not_significant_not_measured(results):
    df = pr.load_rows(results)
    tbl = pr.paper_table(df, "care_eval", pr.entry_columns(df, "care_eval"))
    claims = pr.claim_rows(tbl, pr.PAPERS["care_eval"], pr.Comparisons(results, "care_eval")).set_index("claim")
    v = claims["verdict"]
    assert v["care-u @ 0.5 ≈ svdllm @ 0.5"] == "reproduced"  # one document apart
    assert v["svdllm @ 0.5 > asvd @ 0.5"] == "reproduced"
    assert v["asvd @ 0.5 ≫ palu-svd @ 0.5"] == "not significant"  # right side, but two documents
    assert v["palu-svd @ 0.5 ≈ mha2mla-care-halfbytes @ 0.5"] == "not reproduced"  # a real gap
    assert v["care-e @ 0.5 < care-u @ 0.5"].startswith("not measured (care-e @ 0.5 missing")
    assert v["care-e @ 0.75 > care-u @ 0.75"].startswith("not measured")
    p = claims["ppl verdict"]
    assert p["care-u @ 0.5 ≈ svdllm @ 0.5"] == "reproduced"  # 31 vs 30 but the paired windows cannot tell
    assert p["svdllm @ 0.5 > asvd @ 0.5"].startswith("reproduced (untested")  # 30 < 60, no window NLLs for asvd
    assert p["palu-svd @ 0.5 ≈ mha2mla-care-halfbytes @ 0.5"].startswith("not reproduced")  # paper 45.4 < 220; ours 900 > 400


def test_verdict_rules():
    sig_up = {"delta": 0.02, "lo": 0.01, "hi": 0.03, "significant": True}
    sig_down = {"delta": -0.02, "lo": -0.03, "hi": -0.01, "significant": True}
    ns = {"delta": 0.01, "lo": -0.01, "hi": 0.03, "significant": False}
    assert pr.verdict(">", sig_up) == "reproduced" and pr.verdict(">", sig_down) == "not reproduced"
    assert pr.verdict("<", sig_down) == "reproduced" and pr.verdict("<", ns) == "not significant"
    assert pr.verdict("≈", ns) == "reproduced" and pr.verdict("≈", sig_up) == "not reproduced"
    assert pr.verdict(">", None, math.nan) == "not measured"
    assert pr.verdict(">", None, -0.1) == "not reproduced (untested: no paired data)"
    # ppl: "<" = the paper's a has the lower perplexity; d = log(ppl_a / ppl_b)
    assert pr.ppl_verdict("<", {"delta": -0.5, "lo": -0.7, "hi": -0.3, "significant": True}, 0.6) == "reproduced"
    assert pr.ppl_verdict("<", {"delta": 0.5, "lo": 0.3, "hi": 0.7, "significant": True}, 1.6) == "not reproduced"
    assert pr.ppl_verdict(None, None, 1.0) == "paper gives none"


def test_cli_writes_report_and_figure_with_the_sweeps_command(tmp_path):
    from harness.config import load_sweep

    sweep = load_sweep(pr.SWEEPS_DIR / "paper-care.yaml", ["models=[smollm2-135m]"])
    by_cell = {("baseline" if j.is_baseline else j.method.display, None if j.budget is None else j.budget.kv_save): j.job_id
               for j in sweep.jobs}
    ids = {m: by_cell[(m, None if m == "baseline" else 0.5)] for m in _documents()}  # the real job ids
    folder = tmp_path / "paper-care+models=smollm2-135m"
    _write(folder, sweep=folder.name, ids=ids)
    assert main(["report", "paper", str(folder), "--machine", "a test box"]) == 0
    text = (folder / "REPORT.md").read_text()
    assert (folder / "paper_smollm2-135m.png").stat().st_size > 10_000
    assert "`mla-harness sweep sweeps/paper-care.yaml --set models=smollm2-135m`" in text
    assert "job ids match 6 of the 6 rows" in text and "a test box" in text
    assert "6 finished of 15 expected" in text and "smollm2-135m care-e @ 0.5" in text
    assert "scored 3/8" in text and "missing: arc_challenge, hellaswag, mmlu, openbookqa, race" in text
    assert "RACE: no offline rows (7/8 tasks)" in text
    assert "| 0.5 | care-e | not measured |" in text
    assert "(best first): svdllm > care-u > asvd > palu-svd > mha2mla-care-halfbytes" in text
    assert not list(folder.glob(".*tmp*"))  # atomic writes leave no temp files


def test_cli_unverified_grid_and_given_command(results):
    assert main(["report", "paper", str(results), "--command", "my exact command"]) == 0
    text = (results / "REPORT.md").read_text()
    assert "`my exact command` (given with --command)" in text
    assert "not recorded in the rows (pass --machine)" in text
    assert "6 finished of 15 expected" in text  # the file's grid over the rows' model, matched by label


def test_cli_no_rows_is_one_clear_error(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", "paper", str(empty)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "rows.parquet does not exist" in err and len(err.splitlines()) == 1
    assert not (empty / "REPORT.md").exists()
    pd.DataFrame([{"job_id": "x", "status": "failed", "model": "m", "method": "svd"}]).to_parquet(empty / "rows.parquet")
    assert main(["report", "paper", str(empty)]) == 2
    assert "no finished rows" in capsys.readouterr().err
    assert not (empty / "REPORT.md").exists()


def test_mha2mla_protocol_claims_across_budgets(tmp_path):
    """mha2mla_eval: the primary metric is acc_norm_nospace; the paper's claims compare budgets."""
    folder = tmp_path / "paper-mha2mla"
    (folder / "runs").mkdir(parents=True)
    rng = np.random.default_rng(1)
    cells = {("baseline", None): 0.60, ("mha2mla-2norm", 0.6875): 0.50, ("mha2mla-2norm", 0.8125): 0.40}
    rows = []
    for (m, kv), p in cells.items():
        job = f"{m}-{kv}"
        s = (rng.random(N) < p).astype(float)
        (folder / "runs" / job).mkdir()
        pd.DataFrame({"task": "mha2mla_piqa", "doc_id": np.arange(N), "acc": s, "acc_norm_nospace": s}).to_parquet(
            folder / "runs" / job / "lm_eval_documents.parquet")
        (folder / "runs" / job / "lm_eval_results.json").write_text(json.dumps(
            {"group_weighting": {"mha2mla_eval": {"children": ["mha2mla_piqa"], "weight_by_size": False}}}))
        rows.append({"job_id": job, "sweep": "paper-mha2mla", "status": "ok", "model": "smollm2-135m", "method": m,
                     "budget_kv_save": kv, "kv_save": kv or 0.0, "ppl_wiki": 20.0 / p, "tasks": "mha2mla_eval",
                     "mha2mla_piqa/acc": s.mean() - 0.01, "mha2mla_piqa/acc_norm_nospace": s.mean(),
                     "mha2mla_eval/acc_norm_nospace": s.mean(), "mha2mla_eval/acc_norm_nospace_stderr": 0.02})
    pd.DataFrame(rows).to_parquet(folder / "rows.parquet")
    df = pr.load_rows(folder)
    entries = pr.entry_columns(df, "mha2mla_eval")
    assert entries["mha2mla_piqa"] == "mha2mla_piqa/acc_norm_nospace" and entries["mha2mla_mmlu"] is None
    tbl = pr.paper_table(df, "mha2mla_eval", entries)
    claims = pr.claim_rows(tbl, pr.PAPERS["mha2mla_eval"], pr.Comparisons(folder, "mha2mla_eval")).set_index("claim")
    assert claims.loc["baseline > mha2mla-2norm @ 0.6875", "verdict"] == "reproduced"
    assert claims.loc["mha2mla-2norm @ 0.6875 > mha2mla-2norm @ 0.8125", "verdict"] == "reproduced"
    assert claims.loc["mha2mla-2norm @ 0.8125 > mha2mla-2norm @ 0.875", "verdict"].startswith("not measured")
    assert main(["report", "paper", str(folder)]) == 0
    text = (folder / "REPORT.md").read_text()
    assert "MHA2MLA (Ji et al. 2025)" in text and "primary metric acc_norm_nospace" in text
    assert "smollm2-135m mha2mla-2norm @ 0.875" in text and "3 finished of 13 expected" in text  # 1 + 4 selections x 3 budgets


def test_chance_level_names_the_rows_at_chance():
    """Uniform guessing over mha2mla_eval's entries (4, 4, 2, 4, 4, 2 options) scores 33.33; a row 1 point
    above it is named, one 8 points above it is not, and an entry of unknown option count gives no line."""
    entries = {e: f"{e}/acc_norm_nospace" for e in ("mha2mla_mmlu", "mha2mla_arc", "mha2mla_piqa", "mha2mla_hellaswag",
                                                     "mha2mla_openbookqa", "mha2mla_winogrande")}
    assert pr.chance_mean(entries) == pytest.approx(100 / 3)
    assert pr.chance_mean({**entries, "mha2mla_race": None}) == pytest.approx(100 / 3)  # unscored: left out
    assert pr.chance_mean({"some_new_task": "x/acc"}) is None
    tbl = pd.DataFrame({"budget": [math.nan, 0.75], "method": ["baseline", "mha2mla-2norm"], "mean": [0.4133, 0.3433]})
    text = pr._chance_lines(tbl, entries)[0]
    assert "33.33" in text and "1 of 2 rows" in text and "mha2mla-2norm @ 0.75" in text and "baseline" not in text
    assert pr._chance_lines(tbl, {"some_new_task": "x/acc"}) == []
