"""Run a sweep: expand the YAML into jobs, skip finished ones, run the rest, collect rows.

    mla-harness sweep sweeps/quick.yaml            # run (resumes: finished jobs are skipped)
    mla-harness sweep sweeps/quick.yaml --dry-run  # list jobs and which are done

Layout: results/<sweep>/runs/<job_id>/{config.json, conversion.json, metrics.json, row.json, log.txt}
and results/<sweep>/rows.parquet. A job writes into runs/.<job_id>.tmp-<pid>/ and renames it to
runs/<job_id>/ only when complete, so a killed job leaves nothing that looks finished.
A failing job is recorded (status=failed, its error) and does not stop the sweep.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import time
import traceback
from dataclasses import asdict
from pathlib import Path

from harness.config import JobConfig, SweepConfig
from harness.errors import HarnessError


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def job_dir(results: Path, job: JobConfig) -> Path:
    return results / "runs" / job.job_id


def is_done(results: Path, job: JobConfig) -> bool:
    return (job_dir(results, job) / "row.json").exists()


# ---------------------------------------------------------------------------------- one job
_MODEL_CACHE: dict = {}


def _base_model(job: JobConfig):
    """The unconverted model, loaded once per process per (model, device, dtype)."""
    from harness.models import load_model

    key = (job.model, job.device, job.dtype)
    if key not in _MODEL_CACHE:
        _MODEL_CACHE.clear()
        _MODEL_CACHE[key] = load_model(job.model, device=job.device, dtype=job.dtype)
    return _MODEL_CACHE[key]


def run_job(job: JobConfig, out: Path, sweep_name: str = "", use_wandb: bool = False) -> dict:
    """Load, calibrate, convert, score one job; write its files into `out`; return its row."""
    from harness.calibrate import CalibSpec, get_stats
    from harness.evaluate import PplSpec, domain_perplexities, kv_accounting
    from harness.methods import convert
    from harness.mla import Budget

    t0 = time.perf_counter()
    base, tok = _base_model(job)
    timings = {}
    conversion = None
    if job.is_baseline:
        model = base
    else:
        c = job.calib
        stats = get_stats(base, tok, CalibSpec(c.corpus, c.samples, c.seq_len, c.seed))
        timings["stats_seconds"] = stats.meta["seconds"]
        timings["stats_cached"] = stats.meta["cached"]
        model = copy.deepcopy(base)
        budget = Budget(kv_save=job.budget.kv_save, rank=job.budget.rank)
        conversion = convert(model, job.method.name, budget, stats, **job.method.options)
        timings["factor_seconds"] = conversion["factor_seconds"]
    p = job.eval.ppl
    ppl = domain_perplexities(model, tok, list(p.domains), PplSpec(p.samples, p.seq_len, p.seed, p.batch_size))
    acc = kv_accounting(model)
    task_rows = []
    if job.eval.tasks:
        from harness.lmeval import run_lm_eval

        task_rows, _ = run_lm_eval(model, tok, list(job.eval.tasks), limit=job.eval.limit,
                                   batch_size=job.eval.batch_size, num_fewshot=job.eval.num_fewshot,
                                   out_dir=out)
    row = make_row(job, sweep_name, ppl, acc, conversion, task_rows)
    row["seconds"] = time.perf_counter() - t0
    row.update(timings)
    metrics = {"ppl": ppl, "kv": acc, "tasks": task_rows, "timings": timings, "seconds": row["seconds"]}
    (out / "config.json").write_text(json.dumps(asdict(job), indent=2, default=str))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    if conversion is not None:
        (out / "conversion.json").write_text(json.dumps(conversion, indent=2, default=str))
    if use_wandb:
        from harness.track import log_job

        log_job(out, sweep_name, job, row, conversion, task_rows)
    if model is not base:
        del model
    return row


def make_row(job: JobConfig, sweep_name: str, ppl: dict, acc: dict, conversion: dict | None, task_rows: list) -> dict:
    row = {
        "job_id": job.job_id, "sweep": sweep_name, "status": "ok", "model": job.model,
        "method": "baseline" if job.is_baseline else job.method.display,
        "method_name": "baseline" if job.is_baseline else job.method.name,
        "method_options": json.dumps({} if job.is_baseline else job.method.options, sort_keys=True),
        "calib": None if job.calib is None else job.calib.corpus,
        "calib_samples": None if job.calib is None else job.calib.samples,
        "budget_kv_save": None if job.budget is None else job.budget.kv_save,
        "budget_rank": None if job.budget is None else job.budget.rank,
        "heal": job.heal.mode, "heal_tokens": job.heal.tokens,
        "kv_save": acc["kv_save"], "cache_width": acc["cache_width"], "bytes_per_token": acc["bytes_per_token"],
        "width_min": acc["width_min"], "width_max": acc["width_max"],
    }
    if conversion is not None:
        rk = [l.get("r_k", l.get("r_joint", l["rank"])) for l in conversion["layers"]]
        rv = [l.get("r_v", l.get("r_joint", l["rank"])) for l in conversion["layers"]]
        row["ranks"] = _range(rk) if rk == rv else f"K {_range(rk)} / V {_range(rv)}"
        row["ranks_per_layer"] = json.dumps([l["cache_width"] for l in conversion["layers"]])
    else:
        row["ranks"] = "full"
        row["ranks_per_layer"] = None
    for d, r in ppl.items():
        row[f"ppl_{d}"] = r["ppl"]
    for t in task_rows:
        if t["metric"] in ("acc", "acc_norm", "perplexity", "word_perplexity"):
            row[f"{t['task']}/{t['metric']}"] = t["value"]
    return row


def _range(v: list[int]) -> str:
    return str(v[0]) if min(v) == max(v) else f"{min(v)}-{max(v)}"


# ---------------------------------------------------------------------------------- the sweep
def execute_job(job: JobConfig, results: Path, sweep_name: str, use_wandb: bool) -> dict:
    """Run one job in a temp dir and publish it atomically; failures become a failed row."""
    final = job_dir(results, job)
    tmp = results / "runs" / f".{job.job_id}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        row = run_job(job, tmp, sweep_name, use_wandb)
    except Exception as e:  # recorded, the sweep goes on
        msg = str(e) if isinstance(e, HarnessError) else f"{type(e).__name__}: {e}"
        (tmp / "log.txt").write_text(traceback.format_exc())
        row = {"job_id": job.job_id, "sweep": sweep_name, "status": "failed", "error": msg,
               "model": job.model, "method": "baseline" if job.is_baseline else job.method.display}
        failed = results / "runs" / f".{job.job_id}.failed"
        if failed.exists():
            shutil.rmtree(failed)
        atomic_write_text(tmp / "row.json", json.dumps(row, default=str))
        os.replace(tmp, failed)
        return row
    atomic_write_text(tmp / "row.json", json.dumps(row, default=str))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return row


def collect_rows(results: Path, sweep: SweepConfig | None = None):
    """All finished rows (and failed ones, last attempt) as a DataFrame; writes rows.parquet atomically."""
    import pandas as pd

    rows = []
    runs = results / "runs"
    wanted = None if sweep is None else {j.job_id for j in sweep.jobs}
    for d in sorted(runs.glob("*")) if runs.exists() else []:
        if d.name.startswith(".") and not d.name.endswith(".failed"):
            continue
        jid = d.name.lstrip(".").removesuffix(".failed")
        if wanted is not None and jid not in wanted:
            continue
        if d.name.endswith(".failed") and (runs / jid / "row.json").exists():
            continue
        f = d / "row.json"
        if f.exists():
            rows.append(json.loads(f.read_text()))
    df = pd.DataFrame(rows)
    if len(df):
        tmp = results / f".rows.parquet.tmp{os.getpid()}"
        df.to_parquet(tmp, index=False)
        os.replace(tmp, results / "rows.parquet")
    return df


def run_sweep(sweep: SweepConfig, results_root: Path = Path("results"), dry_run: bool = False,
              only_missing: bool = True) -> "pd.DataFrame":  # noqa: F821
    """Run every job of `sweep` not already finished; return the collected rows."""
    results = results_root / sweep.name
    (results / "runs").mkdir(parents=True, exist_ok=True)
    todo = [j for j in sweep.jobs if not (only_missing and is_done(results, j))]
    if dry_run:
        for j in sweep.jobs:
            print(f"{j.job_id}  {'done ' if is_done(results, j) else 'to do'}  {j.describe()}")
        print(f"{len(sweep.jobs)} jobs, {len(sweep.jobs) - len(todo)} done, {len(todo)} to run -> {results}")
        return collect_rows(results, sweep)
    print(f"sweep {sweep.name}: {len(sweep.jobs)} jobs, {len(sweep.jobs) - len(todo)} already done, "
          f"{len(todo)} to run -> {results}", flush=True)
    from harness.executors import get_executor

    get_executor(sweep.executor)(todo, results, sweep.name, sweep.wandb)
    return collect_rows(results, sweep)
