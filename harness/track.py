"""Weights & Biases tracking: one run per job, offline unless the user chose otherwise.

WANDB_MODE defaults to "offline" (set by the CLI when the user has not set it), so runs are
written under the job's directory (runs/<job_id>/wandb/offline-run-*/) and can be uploaded later
with `mla-harness sync RESULTS_DIR` (which wraps `wandb sync`); with a key and WANDB_MODE=online
they go straight to the server. A run holds the job config, the row's numbers as its summary, a
per-layer ranks table and plot, and lm-eval's own tables (lm_eval.loggers.WandbLogger).
wandb is imported only when tracking is on.

    mla-harness sync results/quick                       # upload every offline run
    read_offline_run("results/quick/runs/<id>/wandb/offline-run-...")   # config + summary, offline
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import asdict
from pathlib import Path


def log_job(out: Path, sweep_name: str, job, row: dict, conversion: dict | None, task_rows: list) -> str:
    """Log config, summary metrics, ranks table/plot and the lm-eval tables of one finished job.

    Returns:
        the W&B run id (the job id).
    """
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "mla-harness"), group=sweep_name or None,
                     name=f"{job.describe()}", id=job.job_id, config=json.loads(json.dumps(asdict(job), default=str)),
                     dir=str(out), reinit="finish_previous", resume="allow", job_type="job")
    try:
        summary = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        summary.update({k: row[k] for k in ("method", "calib", "heal", "ranks", "status") if row.get(k) is not None})
        run.summary.update(summary)
        if conversion is not None:
            cols = ["layer", "cache_width", "rank", "r_k", "r_v"]
            data = [[i, l["cache_width"], l["rank"], l.get("r_k"), l.get("r_v")]
                    for i, l in enumerate(conversion["layers"])]
            table = wandb.Table(columns=cols, data=data)
            run.log({"ranks_per_layer": table,  # (the summary's "ranks" is the row's range, e.g. "K 8-24 / V 8-24")
                     "ranks_plot": wandb.plot.line(table, "layer", "cache_width", title="cache width per layer")})
        raw_file = out / "lm_eval_results.json"  # harness.lmeval.RESULTS_FILE, written by run_lm_eval
        if raw_file.exists():
            from lm_eval.loggers import WandbLogger

            logger = WandbLogger()  # attaches to the run above
            logger.post_init(json.loads(raw_file.read_text()))
            logger.log_eval_result()  # task configs, per-task metrics, results tables, results artifact
        elif task_rows:
            cols = ["task", "metric", "value", "stderr", "n"]
            run.log({"lm_eval": wandb.Table(columns=cols, data=[[t.get(c) for c in cols] for t in task_rows])})
        return run.id
    finally:
        run.finish()


def sync(results_dir: Path) -> int:
    """Upload every offline run under `results_dir` (`wandb sync`); returns the exit code."""
    import subprocess
    import sys

    runs = offline_runs(results_dir)
    if not runs:
        print(f"no offline W&B runs under {results_dir}")
        return 0
    return subprocess.call([sys.executable, "-m", "wandb", "sync", *map(str, runs)])


def offline_runs(results_dir: Path) -> list[Path]:
    """The offline run folders (offline-run-<time>-<id>) below `results_dir`, skipping jobs not yet published."""
    root = Path(results_dir)
    return sorted(p for p in root.rglob("offline-run-*") if p.is_dir()
                  and not any(part.startswith(".") and ".tmp-" in part for part in p.relative_to(root).parts))


# ------------------------------------------------------------------ reading an offline run back
# W&B has no reader for offline runs (wandb.Api needs the server, and the offline folder has no
# config.yaml / wandb-summary.json), so the run's transaction log, run-<id>.wandb, is read here: a
# LevelDB-style log (a 7-byte ":W&B" header, 32 KiB blocks of chunks with a 7-byte header each:
# crc32, length, type FULL/FIRST/MIDDLE/LAST) of protobuf `wandb_internal_pb2.Record`s.
_BLOCK, _HEADER = 32768, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _records(path: Path):
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B transaction log (no :W&B header)")
    pos, parts = _HEADER, []
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # block trailer: padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        pos += _HEADER
        if kind == 0 and n == 0:  # zero-filled rest of the block
            pos += left - _HEADER
            continue
        chunk = data[pos:pos + n]
        pos += n
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            parts = [chunk]
        elif kind == _MIDDLE:
            parts.append(chunk)
        elif kind == _LAST:
            yield b"".join(parts + [chunk])
            parts = []


def read_offline_run(run_dir: Path) -> dict:
    """Config and summary of an offline run, read from its run-<id>.wandb file.

    Args:
        run_dir: an `offline-run-<time>-<id>` folder.
    Returns:
        {"id", "name", "group", "project", "job_type", "config": {..}, "summary": {..}, "finished": bool}
    """
    from wandb.proto import wandb_internal_pb2 as pb

    files = sorted(Path(run_dir).glob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no run-*.wandb file in {run_dir}")
    out = {"config": {}, "summary": {}, "finished": False}

    def config_update(items):
        for it in items:
            if it.key != "_wandb":
                out["config"][it.key or ".".join(it.nested_key)] = json.loads(it.value_json)

    for blob in _records(files[0]):
        rec = pb.Record()
        rec.ParseFromString(blob)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            out.update(id=r.run_id, name=r.display_name, group=r.run_group, project=r.project, job_type=r.job_type)
            config_update(r.config.update)
        elif kind == "config":
            config_update(rec.config.update)
            for it in rec.config.remove:
                out["config"].pop(it.key, None)
        elif kind == "summary":
            for it in rec.summary.update:
                keys = [it.key] if it.key else list(it.nested_key)
                node = out["summary"]
                for k in keys[:-1]:
                    if not isinstance(node.get(k), dict):
                        node[k] = {}
                    node = node[k]
                node[keys[-1]] = json.loads(it.value_json)
            for it in rec.summary.remove:
                out["summary"].pop(it.key, None)
        elif kind == "exit":
            out["finished"] = True
    return out
