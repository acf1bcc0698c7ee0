"""Paired comparisons against the baseline on the same documents (harness.paired), on constructed
per-document results, and the leaderboard cells they produce (± stderr, n.s.)."""
import json

import numpy as np
import pandas as pd
import pytest

from harness.leaderboard import leaderboard_frame, summary_table
from harness.paired import paired_difference

WEIGHTING = {"core": {"children": ["arc", "piqa"], "weight_by_size": False},
             "arc": {"children": ["arc_easy", "arc_challenge"], "weight_by_size": False}}


def docs(correct: dict[str, list[int]]) -> pd.DataFrame:
    return pd.DataFrame([{"task": t, "doc_id": i, "acc": float(c), "acc_norm": float(c)}
                         for t, cs in correct.items() for i, c in enumerate(cs)])


def flips(base: np.ndarray, k: int, seed: int) -> np.ndarray:
    """`base` with k right answers turned wrong (a model that is worse on exactly k documents)."""
    out = base.copy()
    right = np.flatnonzero(out == 1)
    out[np.random.default_rng(seed).choice(right, k, replace=False)] = 0
    return out


def test_identical_results_are_not_significant():
    rng = np.random.default_rng(0)
    b = {t: rng.integers(0, 2, 200) for t in ("arc_easy", "arc_challenge", "piqa")}
    r = paired_difference(docs(b), docs(b), ["core"], WEIGHTING)
    assert r["delta"] == 0 and r["lo"] == 0 and r["hi"] == 0 and not r["significant"] and r["n"] == 600


def test_a_large_paired_drop_is_significant_and_the_score_is_lm_evals():
    rng = np.random.default_rng(1)
    b = {t: rng.integers(0, 2, 300) for t in ("arc_easy", "arc_challenge", "piqa")}
    c = {t: flips(v, 40, i) for i, (t, v) in enumerate(b.items())}  # 40 of 300 worse in each task
    r = paired_difference(docs(b), docs(c), ["core"], WEIGHTING)
    # core = mean(arc, piqa), arc = mean(easy, challenge): every task lost 40/300
    assert r["delta"] == pytest.approx(-40 / 300)
    assert r["significant"] and r["hi"] < 0 < -r["lo"]


def test_a_small_difference_on_few_documents_is_not_significant():
    rng = np.random.default_rng(2)
    b = {"piqa": rng.integers(0, 2, 40)}
    c = {"piqa": flips(b["piqa"], 2, 0)}
    r = paired_difference(docs(b), docs(c), ["piqa"], {})
    assert r["delta"] == pytest.approx(-2 / 40) and not r["significant"]
    assert r["lo"] < 0 <= r["hi"]


def test_size_weighted_groups_pool_their_documents():
    b = {"m_a": [1] * 10, "m_b": [1] * 30}
    c = {"m_a": [0] * 10, "m_b": [1] * 30}
    by_size = {"m": {"children": ["m_a", "m_b"], "weight_by_size": True}}
    equal = {"m": {"children": ["m_a", "m_b"], "weight_by_size": False}}
    assert paired_difference(docs(b), docs(c), ["m"], by_size)["delta"] == pytest.approx(-10 / 40)
    assert paired_difference(docs(b), docs(c), ["m"], equal)["delta"] == pytest.approx(-0.5)


def test_other_documents_mean_no_comparison():
    assert paired_difference(docs({"piqa": [1, 0, 1]}), docs({"piqa": [1, 0]}), ["piqa"], {}) is None


def test_leaderboard_shows_stderr_and_marks_not_significant(tmp_path):
    rng = np.random.default_rng(3)
    base_docs = {"arc_easy": rng.integers(0, 2, 300), "piqa": rng.integers(0, 2, 300)}
    runs = {"b0": base_docs,
            "bad": {t: flips(v, 60, 1) for t, v in base_docs.items()},  # clearly worse
            "same": {t: flips(v, 1, 2) for t, v in base_docs.items()}}  # one document: noise
    rows = []
    for job, d in runs.items():
        folder = tmp_path / "runs" / job
        folder.mkdir(parents=True)
        docs(d).to_parquet(folder / "lm_eval_documents.parquet")
        (folder / "lm_eval_results.json").write_text(json.dumps({"group_weighting": {}}))
        accs = {t: float(np.mean(v)) for t, v in d.items()}
        rows.append({"job_id": job, "status": "ok", "model": "m", "method": "baseline" if job == "b0" else job,
                     "kv_save": 0.0 if job == "b0" else 0.5, "budget_kv_save": None if job == "b0" else 0.5,
                     "calib": None, "heal": "none", "ranks": "full", "tasks": "arc_easy,piqa",
                     **{f"{t}/acc": a for t, a in accs.items()},
                     **{f"{t}/acc_stderr": (a * (1 - a) / 299) ** 0.5 for t, a in accs.items()}})
    df = pd.DataFrame(rows)
    lb = leaderboard_frame(df, results=tmp_path).set_index("method")
    assert lb.loc["bad", "acc_mean_significant"] and not lb.loc["same", "acc_mean_significant"]
    assert lb.loc["bad", "acc_delta"] == pytest.approx(-60 / 300)
    assert lb.loc["baseline", "acc_mean_stderr"] == pytest.approx(
        (df.loc[0, "arc_easy/acc_stderr"] ** 2 + df.loc[0, "piqa/acc_stderr"] ** 2) ** 0.5 / 2)
    table = summary_table(df, tmp_path)
    same_line = next(line for line in table.splitlines() if "| same |" in line)
    bad_line = next(line for line in table.splitlines() if "| bad |" in line)
    assert " ± " in same_line and "n.s." in same_line and "n.s." not in bad_line
    assert "-20.0 [" in bad_line


def test_paper_groups_are_shown_and_averaged_in_their_papers_metric():
    from harness.leaderboard import task_columns

    row = {"job_id": "x", "status": "ok", "model": "m", "method": "baseline", "kv_save": 0.0, "heal": "none",
           "tasks": "care_eval", "care_eval/acc": 0.40, "care_eval/acc_norm": 0.45, "care_eval/acc_norm_stderr": 0.01,
           "mha2mla_eval/acc": 0.3, "mha2mla_eval/acc_norm_nospace": 0.35}
    df = pd.DataFrame([row])
    assert task_columns(df) == ["care_eval/acc_norm", "mha2mla_eval/acc_norm_nospace"]
    lb = leaderboard_frame(df)
    assert lb.loc[0, "acc_mean"] == 0.45 and lb.loc[0, "acc_mean_stderr"] == pytest.approx(0.01)
    assert "45.0 ± 1.0" in summary_table(df)


def test_group_weighting_follows_the_include_chain(tmp_path):
    """A group file that only includes the stock one (our mmlu) is weighted as the stock file says; a group
    with no aggregate list anywhere in its chain is a plain mean; an include cycle ends."""
    from types import SimpleNamespace

    from harness.lmeval import group_weighting

    stock = tmp_path / "stock"
    stock.mkdir()
    (stock / "_g.yaml").write_text("group: g\ntask: [a, b]\naggregate_metric_list:\n"
                                   "  - {metric: acc, weight_by_size: true}\n")
    (tmp_path / "g.yaml").write_text(f"include: {stock / '_g.yaml'}\ngroup: g\n")  # absolute, as rendered
    (tmp_path / "h.yaml").write_text("include: stock/_g.yaml\ngroup: h\n")  # relative to the file
    (tmp_path / "plain.yaml").write_text("group: plain\ntask: [a, b]\n")
    (tmp_path / "loop.yaml").write_text("include: loop.yaml\ngroup: loop\n")
    manager = SimpleNamespace(task_index={n: SimpleNamespace(yaml_path=str(tmp_path / f"{n}.yaml"))
                                          for n in ("g", "h", "plain", "loop")})
    raw = {"group_subtasks": {n: ["a", "b"] for n in ("g", "h", "plain", "loop")}}
    w = group_weighting(raw, manager)
    assert [w[n]["weight_by_size"] for n in ("g", "h", "plain", "loop")] == [True, True, False, False]
