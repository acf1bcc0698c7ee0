"""Executors: how a sweep's jobs run. One small interface:

    executor(jobs, results_dir, sweep_name, use_wandb) -> None

Each job publishes its own run directory atomically (harness.sweep.execute_job), so any
back-end that calls `execute_job` once per job is crash-safe and resumable.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Callable

from harness.errors import HarnessError

EXECUTORS: dict[str, Callable] = {}


def register_executor(name: str):
    def deco(fn):
        EXECUTORS[name] = fn
        return fn
    return deco


def get_executor(name: str) -> Callable:
    if name not in EXECUTORS:
        close = difflib.get_close_matches(name, list(EXECUTORS), n=1)
        raise HarnessError(f"unknown executor '{name}'; available: {', '.join(EXECUTORS)}"
                           + (f" (did you mean '{close[0]}'?)" if close else ""))
    return EXECUTORS[name]


@register_executor("serial")
def serial(jobs, results: Path, sweep_name: str, use_wandb: bool) -> None:
    """Run jobs one after another in this process (the base model is loaded once)."""
    from tqdm.auto import tqdm

    from harness.sweep import execute_job

    bar = tqdm(jobs, desc=f"sweep {sweep_name}", unit="job")
    for job in bar:
        bar.set_postfix_str(job.describe()[:60])
        row = execute_job(job, results, sweep_name, use_wandb)
        status = row["status"]
        extra = ", ".join(f"{k}={row[k]:.3g}" for k in row if k.startswith("ppl_"))
        tqdm.write(f"[{status}] {job.describe()}  {extra}{'  ' + row.get('error', '') if status != 'ok' else ''}")
