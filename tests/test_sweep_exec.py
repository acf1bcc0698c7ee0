"""Sweep execution: crash safety (kill -9 and resume), and the ray / submitit back-ends give the
same rows as serial. All on a tiny random Llama saved with the SmolLM2 tokenizer (~1 s per job).

    pytest -q tests/test_sweep_exec.py      # ~1 min on 2 CPUs (ray start ~10 s, submitit processes)
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from harness.cli import main
from harness.config import load_sweep
from harness.errors import HarnessError
from harness.sweep import clean_stale, is_done, run_sweep

TIMING_COLS = {"seconds", "stats_seconds", "stats_cached", "factor_seconds", "heal_seconds"}


# ------------------------------------------------------------------------------ helpers
def make_tiny_model_dir(folder: Path, tokenizer) -> Path:
    """A 2-layer random Llama (vocab = the SmolLM2 tokenizer's) saved as a plain HF directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128, head_dim=16, tie_word_embeddings=True,
                      max_position_embeddings=2048)
    LlamaForCausalLM(cfg).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_sweep(path: Path, model: Path | str, name: str = "tiny", budgets=(0.5, 0.75), methods=("svd", "care"),
                calib=("wiki",), executor: str = "", wandb: bool = False, tasks: str = "", models=None) -> Path:
    models = models or [str(model)]
    calibs = "".join(f"  - {{corpus: {c}, samples: 4, seq_len: 32, seed: 0}}\n" for c in calib)
    text = (f"# pytest sweep\n#   mla-harness sweep {path.name}\nname: {name}\nmodels: {json.dumps(models)}\n"
            f"calibration:\n{calibs}budgets: [{', '.join(f'{{kv_save: {b}}}' for b in budgets)}]\n"
            f"methods: [{', '.join(methods)}]\n"
            f"eval:\n  ppl: {{domains: [wiki], samples: 4, seq_len: 32, seed: 1, batch_size: 4}}\n"
            + (f"  tasks: [{tasks}]\n  limit: 4\n  batch_size: 4\n" if tasks else "")
            + f"wandb: {str(wandb).lower()}\n" + (f"executor: {executor}\n" if executor else ""))
    path.write_text(text)
    return path


def comparable(df: pd.DataFrame) -> pd.DataFrame:
    """Rows without timings, one per job id, in a fixed order."""
    df = df.drop(columns=[c for c in df.columns if c in TIMING_COLS])
    return df.sort_values("job_id").reset_index(drop=True)[sorted(df.columns)]


def assert_same_rows(got: pd.DataFrame, want: pd.DataFrame) -> None:
    assert got["job_id"].is_unique, "one row per job"
    assert sorted(got["job_id"]) == sorted(want["job_id"])
    assert (got["status"] == "ok").all(), got.get("error")
    pd.testing.assert_frame_equal(comparable(got), comparable(want), check_exact=True)


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp" in p.name or p.name.endswith(".failed")]


@pytest.fixture(scope="module", autouse=True)
def offline_env(tmp_path_factory):
    """A private statistics cache and offline settings, inherited by subprocesses and workers."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLA_HARNESS_CACHE", str(tmp_path_factory.mktemp("cache")))
        for k, v in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"),
                     ("WANDB_MODE", "offline"), ("TOKENIZERS_PARALLELISM", "false")):
            mp.setenv(k, v)
        yield


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm_tokenizer) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("model") / "tiny-llama", smollm_tokenizer)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_dir) -> pd.DataFrame:
    """The uninterrupted serial run of the 5-job sweep (baseline + 2 methods x 2 budgets)."""
    root = tmp_path_factory.mktemp("reference")
    df = run_sweep(load_sweep(write_sweep(root / "tiny.yaml", tiny_dir)), root)
    assert len(df) == 5 and (df["status"] == "ok").all()
    return df


# ------------------------------------------------------------------------- crash safety
def test_kill_9_then_rerun_gives_one_row_per_job_and_the_same_numbers(tmp_path, tiny_dir, reference):
    sweep_file = write_sweep(tmp_path / "tiny.yaml", tiny_dir)
    runs = tmp_path / "results" / "tiny" / "runs"
    cmd = [sys.executable, "-m", "harness", "sweep", str(sweep_file), "--results", str(tmp_path / "results"),
           "--no-wandb"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    try:
        while True:  # kill as soon as one job is published and the next one is half-way
            names = [d.name for d in runs.iterdir()] if runs.exists() else []
            if any(not n.startswith(".") for n in names) and any(".tmp-" in n for n in names):
                break
            if proc.poll() is not None:
                pytest.fail(f"the sweep ended before it could be killed (rc {proc.returncode}): "
                            f"{proc.stderr.read()[-2000:]}")
            assert time.monotonic() < deadline, "the sweep did not start a second job within 120 s"
            time.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    sweep = load_sweep(sweep_file)
    done = [j for j in sweep.jobs if is_done(runs.parent, j)]
    assert 1 <= len(done) < len(sweep.jobs)
    tmp_dirs = [d for d in runs.iterdir() if ".tmp-" in d.name]
    for d in tmp_dirs:  # a killed job's folder never looks finished
        job_id = d.name[1:13]
        assert not (runs / job_id).exists() and not any(j.job_id == job_id for j in done)

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{len(done)} already done, {len(sweep.jobs) - len(done)} to run" in rerun.stdout
    if tmp_dirs:  # (empty only if the job finished in the millisecond between the look and the kill)
        assert "leftover(s) of killed runs" in rerun.stdout
    rows = pd.read_parquet(runs.parent / "rows.parquet")
    assert len(rows) == len(sweep.jobs)
    assert_same_rows(rows, reference)
    assert leftovers(tmp_path / "results") == []


def test_failing_job_is_recorded_and_the_sweep_goes_on(tmp_path, tiny_dir):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')  # no weights, no tokenizer
    sweep_file = write_sweep(tmp_path / "s.yaml", tiny_dir, budgets=(0.5,), methods=("svd",),
                             models=[str(broken), str(tiny_dir)])
    df = run_sweep(load_sweep(sweep_file), tmp_path / "results")
    assert len(df) == 4
    failed = df[df["status"] == "failed"]
    assert set(failed["model"]) == {str(broken)} and (failed["error"].str.len() > 0).all()
    assert (df.loc[df["model"] == str(tiny_dir), "status"] == "ok").all()
    runs = tmp_path / "results" / "tiny" / "runs"
    assert len(list(runs.glob(".*.failed"))) == 2 and (next(runs.glob(".*.failed")) / "log.txt").exists()
    sweep = load_sweep(sweep_file)
    assert sum(is_done(runs.parent, j) for j in sweep.jobs) == 2  # failed jobs run again next time


def test_clean_stale_removes_only_dead_local_leftovers(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    host = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    names = {
        "dead": f".aaaaaaaaaaaa.tmp-{host}-{dead.pid}",
        "old_style_dead": f".bbbbbbbbbbbb.tmp-{dead.pid}",
        "alive": f".cccccccccccc.tmp-{host}-{os.getppid()}",
        "other_host": f".dddddddddddd.tmp-elsewhere-{dead.pid}",
        "other_host_rerun": f".eeeeeeeeeeee.tmp-elsewhere-{dead.pid}",
        "heal_checkpoint": ".ffffffffffff.heal",
    }
    for n in names.values():
        (runs / n).mkdir()
    (tmp_path / f".rows.parquet.tmp{dead.pid}").write_text("partial")
    removed = {p.name for p in clean_stale(tmp_path, job_ids={"eeeeeeeeeeee"})}
    assert removed == {names["dead"], names["old_style_dead"], names["other_host_rerun"],
                       f".rows.parquet.tmp{dead.pid}"}
    assert {p.name for p in runs.iterdir()} == {names["alive"], names["other_host"], names["heal_checkpoint"]}


# ------------------------------------------------------------------------- back-ends
def _executor_sweep(tmp_path, tiny_dir, executor: str) -> pd.DataFrame:
    """The reference sweep's first budget (baseline + care: 2 jobs) through another executor."""
    sweep_file = write_sweep(tmp_path / "tiny.yaml", tiny_dir, budgets=(0.5,), methods=("care",), executor=executor)
    return run_sweep(load_sweep(sweep_file), tmp_path / "results")


def test_ray_local_cpu_gives_the_same_rows_as_serial(tmp_path, tiny_dir, reference):
    pytest.importorskip("ray", reason="ray is not installed (pip install -e '.[dev]')")
    df = _executor_sweep(tmp_path, tiny_dir, "{name: ray, num_cpus: 1, num_gpus: 0, max_retries: 1}")
    assert len(df) == 2
    assert_same_rows(df, reference[reference["job_id"].isin(df["job_id"])])
    assert leftovers(tmp_path / "results") == []


@pytest.mark.parametrize("cluster", ["local", "debug"])
def test_submitit_gives_the_same_rows_as_serial(tmp_path, tiny_dir, reference, cluster):
    pytest.importorskip("submitit", reason="submitit is not installed (pip install -e '.[dev]')")
    df = _executor_sweep(tmp_path, tiny_dir, f"{{name: submitit, cluster: {cluster}, timeout_min: 10}}")
    assert len(df) == 2
    assert_same_rows(df, reference[reference["job_id"].isin(df["job_id"])])
    assert leftovers(tmp_path / "results") == []
    assert (tmp_path / "results" / "tiny" / "submitit").is_dir()  # submitit's logs


# ------------------------------------------------------------------------- configuration
def test_executor_key_accepts_a_name_or_a_mapping(tmp_path, tiny_dir):
    s = load_sweep(write_sweep(tmp_path / "a.yaml", tiny_dir, executor="ray"))
    assert (s.executor, s.executor_options) == ("ray", {})
    s = load_sweep(write_sweep(tmp_path / "b.yaml", tiny_dir,
                               executor="{name: ray, num_cpus: 2, num_gpus: 0.5, max_retries: 3, address: auto}"))
    assert s.executor == "ray" and s.executor_options == {"num_cpus": 2, "num_gpus": 0.5, "max_retries": 3,
                                                          "address": "auto"}
    s = load_sweep(write_sweep(tmp_path / "c.yaml", tiny_dir,
                               executor="{name: submitit, cluster: slurm, slurm_partition: gpu, gpus_per_node: 1}"))
    assert s.executor_options["slurm_partition"] == "gpu"


def test_bad_executor_settings_name_key_and_line(tmp_path, tiny_dir):
    p = write_sweep(tmp_path / "s.yaml", tiny_dir, executor="")
    p.write_text(p.read_text() + "executor:\n  name: ray\n  num_gpu: 1\n  max_retries: -1\n")
    with pytest.raises(HarnessError) as e:
        load_sweep(p)
    msg = str(e.value)
    assert "2 problem(s)" in msg
    assert f"s.yaml:{len(p.read_text().splitlines()) - 1}: executor.num_gpu: executor 'ray' has no option 'num_gpu' " \
           "(did you mean 'num_gpus'?)" in msg
    assert "executor.max_retries: -1 must be >= 0" in msg
    p.write_text(p.read_text().split("executor:")[0] + "executor: rey\n")
    with pytest.raises(HarnessError, match=r"s.yaml:\d+: executor: unknown executor 'rey'.*did you mean 'ray'"):
        load_sweep(p)


def test_cli_executor_override_is_checked(tmp_path, tiny_dir, capsys):
    p = write_sweep(tmp_path / "s.yaml", tiny_dir)
    assert main(["sweep", str(p), "--executor", "ray", "--executor-option", "num_cpu=1", "--dry-run"]) == 2
    assert "--executor ray --executor-option num_cpu: executor 'ray' has no option 'num_cpu'" in capsys.readouterr().err
    assert main(["sweep", str(p), "--executor", "submitit", "--executor-option", "cluster=debug",
                 "--results", str(tmp_path / "r"), "--dry-run"]) == 0
    assert "5 jobs, 0 done, 5 to run" in capsys.readouterr().out


def test_shards_in_parallel_processes_give_the_same_rows(tmp_path, tiny_dir, reference):
    """Three `--shard i/3` processes at once, then a plain run that only collects: the serial rows."""
    sweep_file = write_sweep(tmp_path / "tiny.yaml", tiny_dir)
    cmd = [sys.executable, "-m", "harness", "sweep", str(sweep_file), "--results", str(tmp_path), "--no-leaderboard"]
    procs = [subprocess.Popen(cmd + ["--shard", f"{i}/3"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(3)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert [f"shard {i}/3: {n} of them" in o for i, (o, n) in enumerate(zip(outs, (2, 2, 1)))] == [True] * 3
    df = run_sweep(load_sweep(sweep_file), tmp_path)
    assert_same_rows(df, reference)
    assert not leftovers(tmp_path)
    assert main(["sweep", str(sweep_file), "--results", str(tmp_path), "--shard", "3/3"]) == 2
