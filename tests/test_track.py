"""W&B tracking: each job has an offline run whose config and summary read back, lm-eval's own
logger adds its tables, and `mla-harness sync` hands the runs to `wandb sync`.

    pytest -q tests/test_track.py     # ~20 s (two tiny jobs with 4 ARC-Easy documents each)
"""
from __future__ import annotations

import subprocess

import pytest

from harness.config import load_sweep
from harness.sweep import run_sweep
from harness.track import offline_runs, read_offline_run, sync
from test_sweep_exec import make_tiny_model_dir, write_sweep


SECRET = "local-0123456789abcdef0123456789abcdef01234567"  # looks like a W&B key (40 hex after a prefix)


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, smollm_tokenizer):
    """A 2-job sweep (baseline, svd at 50 %) with W&B on and lm-eval's arc_easy on 4 documents."""
    root = tmp_path_factory.mktemp("track")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        mp.setenv("WANDB_PROJECT", "mla-harness-test")
        mp.setenv("MLA_HARNESS_CACHE", str(root / "cache"))
        mp.setenv("WANDB_DATA_DIR", str(root / "wandb-data"))  # artifact staging (tables), kept for a sync
        mp.setenv("WANDB_CACHE_DIR", str(root / "wandb-cache"))
        mp.setenv("WANDB_API_KEY", SECRET)  # must never be written anywhere under results/
        mp.setenv("HF_TOKEN", SECRET)
        model = make_tiny_model_dir(root / "tiny-llama", smollm_tokenizer)
        sweep = load_sweep(write_sweep(root / "track.yaml", model, name="track", budgets=(0.5,), methods=("svd",),
                                       wandb=True, tasks="arc_easy"))
        df = run_sweep(sweep, root / "results")
    assert (df["status"] == "ok").all(), df.get("error")
    return root / "results" / "track", sweep, df


def test_each_job_has_an_offline_run_with_config_and_summary(tracked):
    results, sweep, df = tracked
    runs = offline_runs(results)
    assert len(runs) == len(sweep.jobs) == 2
    for job in sweep.jobs:
        (run_dir,) = [r for r in runs if r.is_relative_to(results / "runs" / job.job_id)]
        run = read_offline_run(run_dir)
        row = df.set_index("job_id").loc[job.job_id]
        assert run["finished"] and run["id"] == job.job_id and run["group"] == "track"
        assert run["project"] == "mla-harness-test" and run["name"] == job.describe()
        assert run["config"]["model"] == job.model
        assert run["config"]["eval"]["ppl"]["samples"] == 4
        assert (run["config"]["method"] or {}).get("name") == (None if job.is_baseline else "svd")
        s = run["summary"]
        assert s["ppl_wiki"] == row["ppl_wiki"] and s["kv_save"] == row["kv_save"] and s["method"] == row["method"]
        # lm-eval's WandbLogger: its per-task metrics, its results table and the task configs
        assert s["arc_easy/acc"] == row["arc_easy/acc"]
        assert "arc_easy" in run["config"]["task_configs"]
        assert list((run_dir / "files" / "media" / "table" / "evaluation").glob("eval_results_*.table.json"))
        if not job.is_baseline:
            table = s["ranks_per_layer"]
            assert table["_type"] == "table-file" and table["nrows"] == 2  # one row per layer


def test_sync_passes_every_offline_run_to_wandb_sync(tracked, monkeypatch, tmp_path, capsys):
    results, sweep, _ = tracked
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    assert sync(results) == 0
    (cmd,) = calls
    assert cmd[1:4] == ["-m", "wandb", "sync"] and sorted(cmd[4:]) == sorted(map(str, offline_runs(results)))
    assert sync(tmp_path) == 0 and "no offline W&B runs" in capsys.readouterr().out


def test_read_offline_run_refuses_other_files(tmp_path):
    (tmp_path / "run-x.wandb").write_bytes(b"not a log")
    with pytest.raises(ValueError, match="not a W&B transaction log"):
        read_offline_run(tmp_path)
    with pytest.raises(FileNotFoundError):
        read_offline_run(tmp_path / "missing")


def test_no_key_or_token_is_written_to_results(tracked):
    """Security: a W&B key or hub token in the environment reaches no result file, log or W&B run."""
    results, _, _ = tracked
    files = [p for p in results.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files) and any(p.name == "config.json" for p in files)
    leaked = [p for p in files if SECRET.encode() in p.read_bytes()]
    assert not leaked, leaked
