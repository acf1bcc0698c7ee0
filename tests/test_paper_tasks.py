"""The papers' task groups: care_eval (CARE Table 1) and mha2mla_eval (MHA2MLA Table 1, lighteval style).

    pytest -q tests/test_paper_tasks.py      # ~3 min on 2 CPU cores (tiny random Llama, a few docs per task)

Group means are checked on constructed lm-eval results; the lighteval prompts and the
acc_norm_nospace rule on constructed documents; the groups render and run on a tiny model; RACE
is left out (with a note in every table) until MLA_HARNESS_RACE names its rows.
"""
from __future__ import annotations

import importlib.util
import json

import pytest

from harness import tasks as T
from harness.errors import HarnessError
from harness.lmeval import add_entry_means, format_table, result_rows, run_lm_eval

_spec = importlib.util.spec_from_file_location("mha2mla_utils", T.TASKS_SOURCE / "mha2mla" / "utils.py")
U = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(U)


# --- group means on constructed results ----------------------------------------------------------


def _entry(acc, se, norm=None, norm_se=None, name="acc_norm"):
    e = {"acc,none": acc, "acc_stderr,none": se}
    if norm is not None:
        e[f"{name},none"], e[f"{name}_stderr,none"] = norm, norm_se
    return e


def test_care_eval_mean_uses_acc_norm_where_defined_else_acc():
    results = {
        "care_eval": {"alias": "care_eval"},
        "arc_challenge": _entry(0.20, 0.01, 0.25, 0.01), "arc_easy": _entry(0.40, 0.01, 0.35, 0.01),
        "hellaswag": _entry(0.30, 0.01, 0.38, 0.01), "piqa": _entry(0.60, 0.01, 0.62, 0.01),
        "mmlu": _entry(0.26, 0.004), "openbookqa": _entry(0.18, 0.02, 0.28, 0.02),
        "race": _entry(0.31, 0.014), "winogrande": _entry(0.52, 0.014),
    }
    children = ["arc_challenge", "arc_easy", "hellaswag", "piqa", "mmlu", "openbookqa", "race", "winogrande"]
    raw = {"results": results, "group_subtasks": {"care_eval": children, "mmlu": ["mmlu_a"]},
           "n-samples": {c: {"effective": 10} for c in children if c != "mmlu"} | {"mmlu_a": {"effective": 10}}}
    add_entry_means(raw)
    rows = {(r["task"], r["metric"]): r for r in result_rows(raw)}
    convention = [0.25, 0.35, 0.38, 0.62, 0.26, 0.28, 0.31, 0.52]  # MMLU, RACE, WinoGrande: acc
    assert rows["care_eval", "acc_norm"]["value"] == pytest.approx(sum(convention) / 8)
    assert rows["care_eval", "acc"]["value"] == pytest.approx((0.20 + 0.40 + 0.30 + 0.60 + 0.26 + 0.18 + 0.31 + 0.52) / 8)
    ses = [0.01, 0.01, 0.01, 0.01, 0.004, 0.02, 0.014, 0.014]
    assert rows["care_eval", "acc_norm"]["stderr"] == pytest.approx(sum(e * e for e in ses) ** 0.5 / 8)
    assert ("care_eval", "acc_norm_nospace") not in rows  # no entry defines it
    assert rows["care_eval", "acc"]["n"] == 80


def test_mha2mla_eval_mean_counts_arc_once_with_its_own_mean():
    nospace = "acc_norm_nospace"
    results = {
        "mha2mla_eval": {"alias": "mha2mla_eval"},
        "mha2mla_mmlu": _entry(0.25, 0.004, 0.30, 0.004, nospace),
        "mha2mla_arc": _entry(0.40, 0.01, 0.44, 0.01, nospace),  # lm-eval's own two-task mean
        "mha2mla_piqa": _entry(0.60, 0.01, 0.64, 0.01, nospace),
        "mha2mla_hellaswag": _entry(0.30, 0.005, 0.41, 0.005, nospace),
        "mha2mla_openbookqa": _entry(0.20, 0.02, 0.33, 0.02, nospace),
        "mha2mla_winogrande": _entry(0.51, 0.014, 0.52, 0.014, nospace),
        "mha2mla_arc_easy": _entry(0.50, 0.01, 0.55, 0.01, nospace),
        "mha2mla_arc_challenge": _entry(0.30, 0.01, 0.33, 0.01, nospace),
    }
    six = ["mha2mla_mmlu", "mha2mla_arc", "mha2mla_piqa", "mha2mla_hellaswag", "mha2mla_openbookqa", "mha2mla_winogrande"]
    raw = {"results": results, "n-samples": {},
           "group_subtasks": {"mha2mla_eval": six, "mha2mla_arc": ["mha2mla_arc_easy", "mha2mla_arc_challenge"]}}
    add_entry_means(raw)
    got = raw["results"]["mha2mla_eval"]
    assert got[f"{nospace},none"] == pytest.approx((0.30 + 0.44 + 0.64 + 0.41 + 0.33 + 0.52) / 6)  # ARC counts once
    assert got["acc,none"] == pytest.approx((0.25 + 0.40 + 0.60 + 0.30 + 0.20 + 0.51) / 6)
    assert "acc_norm,none" not in got  # a plain-acc mean under the acc_norm name would mislead


# --- lighteval prompts and acc_norm_nospace ------------------------------------------------------


def test_acc_norm_nospace_does_not_count_the_leading_space():
    # ll / chars: " ab" -> -3/2 = -1.5; "abcd" -> -4.4/4 = -1.1 (lm-eval's acc_norm, counting the space
    # of " ab", would give -1.0 and pick choice 0); plain acc picks the larger ll, choice 0.
    got = U.score([" ab", "abcd"], gold=1, results=[(-3.0, False), (-4.4, False)])
    assert got == {"acc": 0.0, "acc_norm_nospace": 1.0}
    assert U.score([" ab", "abcd"], gold=0, results=[(-3.0, False), (-4.4, False)]) == {"acc": 1.0, "acc_norm_nospace": 0.0}
    with pytest.raises(ValueError):
        U.score([" a", " b"], 0, [(-1.0, False)])


def test_lighteval_prompts_on_constructed_docs():
    hs = {"activity_label": "Roof shingle removal", "ctx_a": "A man is on a roof.", "ctx_b": "he",
          "endings": ["is [title] ripping tiles.", "sings."], "label": "1"}
    assert U.hellaswag_text(hs) == "Roof shingle removal: A man is on a roof. He "
    assert U.hellaswag_choices(hs) == [" is. ripping tiles.", " sings."] and U.hellaswag_gold(hs) == 1
    wg = {"sentence": "Sarah was better than Maria so _ got the easy cases.", "option1": "Sarah",
          "option2": "Maria", "answer": "2"}
    assert U.winogrande_text(wg) == "Sarah was better than Maria so "
    assert U.winogrande_choices(wg) == ["Sarah got the easy cases.", "Maria got the easy cases."]
    assert U.winogrande_gold(wg) == 1
    mmlu = {"subject": "high_school_physics", "question": "Q?", "choices": ["a", "b"], "answer": 1}
    assert U.mmlu_text(mmlu) == "The following are questions about high school physics.\nQuestion: Q?\nAnswer:"
    assert U.mmlu_choices(mmlu) == [" a", " b"] and U.mmlu_gold(mmlu) == 1
    obqa = {"question_stem": "Stem", "choices": {"text": ["x", "y"], "label": ["A", "B"]}, "answerKey": "B"}
    assert U.openbookqa_text(obqa) == "Stem" and U.arc_choices(obqa) == [" x", " y"] and U.openbookqa_gold(obqa) == 1


def test_every_winogrande_sentence_has_one_blank():
    import pyarrow.parquet as pq

    rows = pq.read_table(T.build_benchmarks() / "winogrande/validation.parquet").to_pylist()
    assert len(rows) == 1267 and all(r["sentence"].count("_") == 1 for r in rows)  # lighteval splits on it


# --- rendering and running on a tiny model -------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(smollm_tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(smollm_tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=2048)
    return LlamaForCausalLM(config), smollm_tokenizer


def test_groups_run_and_care_eval_says_race_is_missing(tiny, monkeypatch):
    monkeypatch.delenv("MLA_HARNESS_RACE", raising=False)
    model, tok = tiny
    rows, raw = run_lm_eval(model, tok, ["care_eval", "mha2mla_eval"], limit=2)
    got = {(r["task"], r["metric"]): r for r in rows}
    assert {"care_eval", "mha2mla_eval"} <= {t for t, _ in got}
    note = "RACE: no offline rows (7/8 tasks)"
    assert got["care_eval", "acc_norm"]["note"] == note and got["mha2mla_eval", "acc_norm_nospace"]["note"] is None
    assert raw["group_subtasks"]["care_eval"] == ["arc_challenge", "arc_easy", "hellaswag", "piqa", "mmlu",
                                                  "openbookqa", "winogrande"]
    assert len(raw["group_subtasks"]["mha2mla_eval"]) == 6
    for key in [("care_eval", "acc"), ("care_eval", "acc_norm"), ("mha2mla_eval", "acc"), ("mha2mla_eval", "acc_norm_nospace")]:
        assert 0.0 <= got[key]["value"] <= 1.0 and got[key]["stderr"] is not None
    assert got["mha2mla_mmlu", "acc"]["n"] == 2  # one task over all subjects, not 57
    table = format_table(raw)
    assert f"care_eval [{note}]" in table and f"Note: care_eval: {note}" in table
    with pytest.raises(HarnessError, match="MLA_HARNESS_RACE"):
        run_lm_eval(model, tok, ["race"], limit=1)


def test_arc_and_piqa_score_exactly_as_the_stock_acc_norm(tiny):
    """lighteval's ARC/PIQA prompts are lm-eval's, and acc_norm over choices without the separating
    space is nospace normalisation: the two implementations must agree request by request."""
    model, tok = tiny
    _, ours = run_lm_eval(model, tok, ["mha2mla_arc_easy", "mha2mla_piqa"], limit=8, log_samples=True)
    _, stock = run_lm_eval(model, tok, ["arc_easy", "piqa"], limit=8, log_samples=True)
    for mine, theirs in [("mha2mla_arc_easy", "arc_easy"), ("mha2mla_piqa", "piqa")]:
        a = [s["arguments"] for s in ours["samples"][mine]]
        b = [s["arguments"] for s in stock["samples"][theirs]]
        assert [[(ctx, cont) for ctx, cont in x] for x in a] == [[(ctx, cont) for ctx, cont in x] for x in b]
        assert ours["results"][mine]["acc_norm_nospace,none"] == stock["results"][theirs]["acc_norm,none"]
        assert ours["results"][mine]["acc,none"] == stock["results"][theirs]["acc,none"]


def _race_rows(path, n=3):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for i in range(n):
        problems = [{"question": "Who wrote it?", "options": ["Tom", "Ann", "Bob", "Eve"], "answer": "B"},
                    {"question": f"What did the {i}th child see?", "options": ["a dog", "a cat", "a car", "rain"],
                     "answer": "A"}]
        rows.append({"article": f"Article {i}. Ann wrote a story about a dog.", "problems": repr(problems),
                     "example_id": f"high{i}.txt"})
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_race_rows_from_the_environment_complete_care_eval(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    monkeypatch.setenv("MLA_HARNESS_RACE", str(_race_rows(tmp_path / "race.parquet")))
    folder = T.task_dir()
    notes = T.task_notes(folder)
    assert notes["missing"] == {} and "3 rows" in notes["notes"]["care_eval"]  # not the papers' 1045
    rows, raw = run_lm_eval(model, tok, ["race"], limit=3, log_samples=True)
    (acc,) = [r for r in rows if r["task"] == "race" and r["metric"] == "acc"]
    assert acc["n"] == 3 and 0.0 <= acc["value"] <= 1.0
    context = raw["samples"]["race"][0]["arguments"][0][0]
    assert context.startswith("Article: Article 0.") and "Question: Who wrote it?\nAnswer: Ann" in context


@pytest.mark.parametrize("content,message", [(None, "does not exist"), ("x", "unknown format"),
                                             ("cols", "no column(s) problems")])
def test_bad_race_source_is_one_line_naming_the_variable(tmp_path, monkeypatch, content, message):
    path = tmp_path / ("race.txt" if content == "x" else "race.jsonl")
    if content == "x":
        path.write_text("x")
    elif content == "cols":
        path.write_text(json.dumps({"article": "a"}) + "\n")
    monkeypatch.setenv("MLA_HARNESS_RACE", str(path))
    with pytest.raises(HarnessError) as err:
        T.optional_values()
    assert "MLA_HARNESS_RACE" in str(err.value) and message in str(err.value) and "\n" not in str(err.value)


def test_a_missing_task_reaches_the_sweep_row_and_every_leaderboard_table(tmp_path):
    import pandas as pd

    from harness.config import parse_sweep
    from harness.leaderboard import summary_table, write_leaderboard
    from harness.sweep import make_row

    job = parse_sweep({"models": ["smollm2-135m"], "baseline": True, "eval": {"tasks": ["care_eval"]}}).jobs[0]
    note = "RACE: no offline rows (7/8 tasks)"
    task_rows = [{"task": "care_eval", "metric": "acc_norm", "value": 0.4, "stderr": 0.01, "n": 10, "note": note},
                 {"task": "mha2mla_eval", "metric": "acc_norm_nospace", "value": 0.3, "stderr": 0.01, "n": 10,
                  "note": None}]
    acc = {"kv_save": 0.0, "cache_width": 1, "bytes_per_token": 4, "width_min": 1, "width_max": 1}
    row = make_row(job, "s", {"wiki": {"ppl": 10.0}}, acc, None, task_rows)
    assert row["tasks_note"] == f"care_eval: {note}" and row["mha2mla_eval/acc_norm_nospace"] == 0.3
    df = pd.DataFrame([{**row, "status": "ok"}])
    assert f"Note: care_eval: {note}." in summary_table(df)
    df.to_parquet(tmp_path / "rows.parquet")
    write_leaderboard(tmp_path, plots=False)
    for name in ("leaderboard.md", "leaderboard.html"):
        assert f"care_eval: {note}" in (tmp_path / name).read_text()


def test_paper_sweeps_validate_and_expand_as_documented():
    from harness.config import load_sweep, parse_sweep

    care = load_sweep(T.TASKS_SOURCE.parent / "sweeps" / "paper-care.yaml")
    mha = load_sweep(T.TASKS_SOURCE.parent / "sweeps" / "paper-mha2mla.yaml")
    assert len(care.jobs) == 2 * (1 + 2 * 7) and len(mha.jobs) == 2 * (1 + 3 * 4)
    job = care.jobs[1]
    assert (job.calib.corpus, job.calib.samples) == ("chat", 256)
    assert job.eval.tasks == ("care_eval",) and job.eval.limit is None and mha.jobs[1].eval.tasks == ("mha2mla_eval",)
    labels = {j.method.display for j in care.jobs if j.method}
    assert labels == {"palu-svd", "asvd", "svdllm", "mha2mla-matched", "mha2mla-care-halfbytes", "care-u", "care-e"}
    assert {j.budget.kv_save for j in mha.jobs if j.budget} == {0.6875, 0.8125, 0.875}
    assert {j.method.options["selection"] for j in mha.jobs if j.method} == {"2norm", "high", "low", "uniform"}
    # a CPU-sized override (what `--set eval.limit=...` does) is still a valid sweep
    import yaml

    raw = yaml.safe_load((T.TASKS_SOURCE.parent / "sweeps" / "paper-care.yaml").read_text())
    raw["eval"]["limit"] = 0.01
    assert parse_sweep(raw).jobs[1].eval.limit == 0.01
