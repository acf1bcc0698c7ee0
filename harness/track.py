"""Weights & Biases tracking: one run per job, offline unless the user chose otherwise.

WANDB_MODE defaults to "offline" (set by the CLI when the user has not set it), so runs are
written under the job's directory and can be uploaded later with `mla-harness sync RESULTS_DIR`
(which wraps `wandb sync`). wandb is imported only when tracking is on.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path


def log_job(out: Path, sweep_name: str, job, row: dict, conversion: dict | None, task_rows: list) -> str:
    """Log config, summary metrics, ranks table and lm-eval table of one finished job.

    Returns:
        the W&B run id.
    """
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "mla-harness"), group=sweep_name or None,
                     name=f"{job.describe()}", id=job.job_id, config=json.loads(json.dumps(asdict(job), default=str)),
                     dir=str(out), reinit="finish_previous", resume="allow")
    summary = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    run.summary.update(summary)
    if conversion is not None:
        cols = ["layer", "cache_width", "rank", "r_k", "r_v"]
        data = [[i, l["cache_width"], l["rank"], l.get("r_k"), l.get("r_v")] for i, l in enumerate(conversion["layers"])]
        run.log({"ranks": wandb.Table(columns=cols, data=data)})
    if task_rows:
        cols = ["task", "metric", "value", "stderr", "n"]
        run.log({"lm_eval": wandb.Table(columns=cols, data=[[t.get(c) for c in cols] for t in task_rows])})
    run_id = run.id
    run.finish()
    return run_id


def sync(results_dir: Path) -> int:
    """Upload every offline run under `results_dir` (`wandb sync`); returns the exit code."""
    import subprocess
    import sys

    runs = sorted(str(p) for p in Path(results_dir).rglob("offline-run-*") if p.is_dir())
    if not runs:
        print(f"no offline W&B runs under {results_dir}")
        return 0
    return subprocess.call([sys.executable, "-m", "wandb", "sync", *runs])
