"""Run a sweep: expand the YAML into jobs, skip finished ones, run the rest, collect rows.

    mla-harness sweep sweeps/quick.yaml            # run (resumes: finished jobs are skipped)
    mla-harness sweep sweeps/quick.yaml --dry-run  # list jobs and which are done

Layout: results/<sweep>/runs/<job_id>/{config.json, conversion.json, metrics.json, row.json, log.txt}
and results/<sweep>/rows.parquet. A job writes into runs/.<job_id>.tmp-<host>-<pid>/ and renames it
to runs/<job_id>/ only when complete, so a killed job leaves nothing that looks finished; the next
run of the sweep (or of that job) removes such leftovers. A failing job is recorded
(runs/.<job_id>.failed/, status=failed, its error) and does not stop the sweep.
"""
from __future__ import annotations

import copy
import functools
import json
import os
import re
import shutil
import socket
import time
import traceback
from dataclasses import asdict
from pathlib import Path

from harness.specs import JobConfig, SweepConfig
from harness.errors import HarnessError
from harness.paths import atomic_write_text


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
    from harness.calibrate import CalibSpec
    from harness.data import adds_bos
    from harness.evaluate import PplSpec, domain_perplexities, kv_accounting
    from harness.methods import calibrate_and_convert
    from harness.mla import Budget

    t0 = time.perf_counter()
    base, tok = _base_model(job)
    timings = {}
    conversion = None
    if job.is_baseline:
        model = base if job.heal.mode == "none" else copy.deepcopy(base)  # the fine-tuned-original control
    else:
        c = job.calib
        model = copy.deepcopy(base)
        budget = Budget(kv_save=job.budget.kv_save, rank=job.budget.rank)
        conversion = calibrate_and_convert(model, tok, job.method.name, budget,
                                           CalibSpec(c.corpus, c.samples, c.seq_len, c.seed), **job.method.options)
        if "calibration" in conversion:  # methods that need no statistics (svd) skip the pass
            timings["stats_seconds"] = conversion["calibration"]["seconds"]
            timings["stats_cached"] = conversion["calibration"]["cached"]
        timings["factor_seconds"] = conversion["factor_seconds"]
    healing = None
    if job.heal.mode != "none":
        healing = _heal_job(job, model, base, tok, out, sweep_name, use_wandb)
        timings["heal_seconds"] = healing["seconds"]
    p = job.eval.ppl
    ppl = domain_perplexities(model, tok, list(p.domains), PplSpec(p.samples, p.seq_len, p.seed, p.batch_size))
    acc = kv_accounting(model)
    cache_factory = _kv_cache_factory(job, model)  # long context: a quantized KV cache per generate()
    task_rows = []
    if job.eval.tasks:
        from harness.lmeval import run_lm_eval

        task_rows, _ = run_lm_eval(model, tok, list(job.eval.tasks), limit=job.eval.limit,
                                   batch_size=job.eval.batch_size, num_fewshot=job.eval.num_fewshot,
                                   out_dir=out, metadata=dict(job.eval.task_metadata) or None,
                                   cache_factory=cache_factory)
    row = make_row(job, sweep_name, ppl, acc, conversion, task_rows)
    row["bos"] = adds_bos(tok)  # windows (calibration, perplexity, healing) start with the tokenizer's BOS
    long_ppl = _long_context_fields(job, model, tok, acc, row, cache_factory)
    row["seconds"] = time.perf_counter() - t0
    row.update(timings)
    metrics = {"ppl": ppl, "kv": acc, "tasks": task_rows, "timings": timings, "seconds": row["seconds"]}
    if long_ppl:
        metrics["long_ppl"] = long_ppl
    if healing is not None:
        row.update(heal_tokens=healing["tokens_seen"], heal_steps=healing["steps"],
                   heal_loss_first=healing["loss_first"], heal_loss_last=healing["loss_last"],
                   heal_trainable_params=healing["trainable_params"])
        metrics["heal"] = {k: v for k, v in healing.items() if k != "log"}
        (out / "heal_log.json").write_text(json.dumps(healing["log"], default=str))
    (out / "config.json").write_text(json.dumps(asdict(job), indent=2, default=str))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    if conversion is not None:
        (out / "conversion.json").write_text(json.dumps(conversion, indent=2, default=str))
    if use_wandb:
        from harness.track import log_job

        log_job(out, sweep_name, job, row, conversion, task_rows)
    if model is not base:
        del model
    if healing is not None:  # the job is complete: its healing checkpoint is no longer needed
        shutil.rmtree(_heal_checkpoint_dir(out, job), ignore_errors=True)
    return row


def _heal_checkpoint_dir(out: Path, job: JobConfig) -> Path:
    """Outside the job's temp dir (named by pid), so a restarted job resumes its healing."""
    return out.parent / f".{job.job_id}.heal"


def _heal_job(job: JobConfig, model, base, tok, out: Path, sweep_name: str, use_wandb: bool) -> dict:
    """Heal the converted `model` in place (harness.heal); its W&B run (loss curve) is <job_id>-heal."""
    from harness.evaluate import PplSpec, domain_perplexities
    from harness.heal import heal

    p = job.eval.ppl
    ppl_spec = PplSpec(p.samples, p.seq_len, p.seed, p.batch_size)

    def evaluate(m) -> dict:
        """The recovery curve's point: perplexity per domain, and with heal.curve_tasks the job's lm-eval
        tasks (each task's accuracies and the mean of the asked tasks' primary metrics, as in the leaderboard)."""
        out = {f"ppl_{d}": r["ppl"] for d, r in domain_perplexities(m, tok, list(p.domains), ppl_spec).items()}
        if job.heal.curve_tasks and job.eval.tasks:
            from harness.tasks import ACC_METRICS, task_metric
            from harness.lmeval import run_lm_eval

            rows, _ = run_lm_eval(m, tok, list(job.eval.tasks), limit=job.eval.limit,
                                  batch_size=job.eval.batch_size, num_fewshot=job.eval.num_fewshot)
            # Every task's accuracy metrics; the mean is over the asked tasks, each in the metric its
            # paper reports (mha2mla_eval: acc_norm_nospace), as in the leaderboard's acc_mean.
            out.update({f"{t['task']}/{t['metric']}": t["value"] for t in rows if t["metric"] in ACC_METRICS})
            primary = [out.get(f"{t}/{task_metric(t)}", out.get(f"{t}/acc")) for t in job.eval.tasks]
            if primary and all(v is not None for v in primary):
                out["acc_mean"] = sum(primary) / len(primary)
        return out

    run = None
    if use_wandb:
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        run = wandb.init(project=os.environ.get("WANDB_PROJECT", "mla-harness"), group=sweep_name or None,
                         name=f"{job.describe()} (healing)", id=f"{job.job_id}-heal", job_type="heal",
                         config=json.loads(json.dumps(asdict(job), default=str)), dir=str(out),
                         reinit="finish_previous", resume="allow")
    try:
        return heal(model, tok, job.heal, teacher=base if job.heal.kd_weight > 0 else None,
                    out_dir=_heal_checkpoint_dir(out, job), evaluate=evaluate, progress=True)
    finally:
        if run is not None:
            run.finish()


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
        "heal": job.heal.display, "heal_mode": job.heal.mode, "heal_tokens": 0,
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
    # calibration-robustness report (harness.reports.robustness): the seed, mha2mla's kept RoPE pairs
    row["calib_seed"] = None if job.calib is None else job.calib.seed
    if conversion is not None and any(l.get("k_rope_out") for l in conversion["layers"]):
        row["rope_pairs_per_layer"] = json.dumps([[dims[: len(dims) // 2] for dims in l["rope_dims"]]
                                                  for l in conversion["layers"]])  # (L, n_kv, p)
    for d, r in ppl.items():
        row[f"ppl_{d}"] = r["ppl"]
    row["tasks"] = ",".join(job.eval.tasks) or None  # the requested lm-eval tasks (the leaderboard's mean)
    for t in task_rows:
        if t["metric"] in ("acc", "acc_norm", "acc_norm_nospace", "perplexity", "word_perplexity"):
            row[f"{t['task']}/{t['metric']}"] = t["value"]
            if t.get("stderr") is not None:
                row[f"{t['task']}/{t['metric']}_stderr"] = t["stderr"]
        elif t["metric"].isdigit():  # RULER: one score per context length (tasks/long_context)
            row[f"{t['task']}@{t['metric']}"] = t["value"]
            row[f"{t['task']}@{t['metric']}_stderr"] = t["stderr"]
            row[f"{t['task']}@{t['metric']}_n"] = t["n"]
    # what a task group lacks, e.g. "care_eval: RACE: no offline rows (7/8 tasks)" (harness.lmeval)
    row["tasks_note"] = "; ".join(sorted({f"{t['task']}: {t['note']}" for t in task_rows if t.get("note")})) or None
    return row


# ---------------------------------------------------------------------- long context (DESIGN §12)
def _kv_cache_factory(job: JobConfig, model):
    """A function returning a fresh quantized KV cache for `model` (None without kv_quant)."""
    if job.kv_quant is None:
        return None
    from harness.kvquant import make_cache

    make_cache(model, job.kv_quant)  # refuse a sliding-window model now, not in the middle of the evaluation
    return lambda: make_cache(model, job.kv_quant)


def _long_context_fields(job: JobConfig, model, tok, acc: dict, row: dict, cache_factory) -> dict:
    """Add kv_quant, bytes_per_token (quantization included) and ppl_<domain>@<len> to `row`.

    bytes_per_token: at a 4096-token context, the codes + scales/zeros of the quantized tokens and
    the full-precision residual window spread over the context (harness.kvquant.bytes_per_token);
    kv_bytes_fraction: that over the original model's bytes per token at the same dtype. Returns
    the long-window perplexities (for metrics.json).
    """
    from harness.kvquant import KV_CONTEXT, bytes_per_token

    size = next(model.parameters()).element_size()
    row["kv_quant"] = "none" if job.kv_quant is None else job.kv_quant.label
    row["bytes_per_token_unquantized"] = acc["bytes_per_token"]
    row["bytes_per_token"] = bytes_per_token(model, job.kv_quant, KV_CONTEXT)
    row["kv_bytes_fraction"] = row["bytes_per_token"] / (acc["cache_width_original"] * size)
    lp = job.eval.long_ppl
    if lp is None:
        return {}
    from harness.evaluate import LongPplSpec, long_perplexities

    spec = LongPplSpec(tuple(lp.seq_lens), lp.samples, lp.seed, lp.batch_size, lp.chunk)
    out = long_perplexities(model, tok, list(lp.domains), spec, cache_factory)
    for key, r in out.items():
        row[f"ppl_{key}"] = r["ppl"]
    return out


def _range(v: list[int]) -> str:
    return str(v[0]) if min(v) == max(v) else f"{min(v)}-{max(v)}"


# ---------------------------------------------------------------------------------- the sweep
_TMP = re.compile(r"^\.(?P<job>[0-9a-f]{12})\.tmp-(?:(?P<host>.+)-)?(?P<pid>\d+)$")
_TMP_FILE = re.compile(r"^\..+\.tmp-?(?P<pid>\d+)$")  # atomic_write_text / rows.parquet leftovers


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(results: Path, job_ids: set[str] | None = None) -> list[Path]:
    """Remove what killed processes of this host left behind: job temp dirs and temp files.

    A temp dir of another host is removed only for a job in `job_ids` (one that is about to run
    again, so its earlier attempt is over). Returns the removed paths.
    """
    host, removed = socket.gethostname(), []
    runs = results / "runs"
    for d in sorted(runs.iterdir()) if runs.exists() else []:
        m = _TMP.match(d.name)
        if not m or int(m["pid"]) == os.getpid():
            continue
        here = m["host"] in (None, host)
        if (here and not _pid_alive(int(m["pid"]))) or (not here and job_ids and m["job"] in job_ids):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    for f in sorted(results.iterdir()) if results.exists() else []:
        m = _TMP_FILE.match(f.name)
        if m and f.is_file() and int(m["pid"]) != os.getpid() and not _pid_alive(int(m["pid"])):
            f.unlink(missing_ok=True)
            removed.append(f)
    return removed


def record_failure(job: JobConfig, msg: str, *, results: Path, sweep_name: str, log: str = "") -> dict:
    """Record a job that failed outside `execute_job` (its process died) as runs/.<job_id>.failed."""
    row = {"job_id": job.job_id, "sweep": sweep_name, "status": "failed", "error": msg,
           "model": job.model, "method": "baseline" if job.is_baseline else job.method.display}
    tmp = results / "runs" / f".{job.job_id}.tmp-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "log.txt").write_text(log or msg)
    atomic_write_text(tmp / "row.json", json.dumps(row, default=str))
    failed = results / "runs" / f".{job.job_id}.failed"
    if failed.exists():
        shutil.rmtree(failed)
    os.replace(tmp, failed)
    return row


def execute_job(job: JobConfig, results: Path, sweep_name: str, use_wandb: bool) -> dict:
    """Run one job in a temp dir and publish it atomically; failures become a failed row."""
    final = job_dir(results, job)
    for old in (results / "runs").glob(f".{job.job_id}.tmp-*"):  # earlier attempts of this job are over
        shutil.rmtree(old, ignore_errors=True)
    tmp = results / "runs" / f".{job.job_id}.tmp-{socket.gethostname()}-{os.getpid()}"
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
    shutil.rmtree(results / "runs" / f".{job.job_id}.failed", ignore_errors=True)  # an earlier failure
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
              only_missing: bool = True, shard: tuple[int, int] | None = None) -> "pd.DataFrame":  # noqa: F821
    """Run every job of `sweep` not already finished; return the collected rows.

    Args:
        shard: (i, n): run only the jobs whose position in the sweep is i modulo n, so that n
            processes (on one GPU that a small model leaves mostly idle, or on n machines sharing the
            results folder) split a sweep without a scheduler; every job still publishes atomically,
            and a last unsharded run collects the rows and skips what is done.
    """
    results = results_root / sweep.name
    (results / "runs").mkdir(parents=True, exist_ok=True)
    mine = [j for k, j in enumerate(sweep.jobs) if shard is None or k % shard[1] == shard[0]]
    todo = [j for j in mine if not (only_missing and is_done(results, j))]
    if dry_run:
        for j in sweep.jobs:
            print(f"{j.job_id}  {'done ' if is_done(results, j) else 'to do'}  {j.describe()}")
        print(f"{len(sweep.jobs)} jobs, {len(sweep.jobs) - len(todo)} done, {len(todo)} to run -> {results}")
        return collect_rows(results, sweep)
    part = f" (shard {shard[0]}/{shard[1]}: {len(mine)} of them)" if shard else ""
    print(f"sweep {sweep.name}: {len(sweep.jobs)} jobs{part}, {len(mine) - len(todo)} already done, "
          f"{len(todo)} to run -> {results}", flush=True)
    stale = clean_stale(results, {j.job_id for j in todo})
    if stale:
        print(f"removed {len(stale)} leftover(s) of killed runs: {', '.join(p.name for p in stale)}", flush=True)
    from harness.executors import get_executor

    results = results.resolve()  # workers may run elsewhere
    run = functools.partial(execute_job, results=results, sweep_name=sweep.name, use_wandb=sweep.wandb)
    fail = functools.partial(record_failure, results=results, sweep_name=sweep.name)
    get_executor(sweep.executor)(todo, run, fail, results, **sweep.executor_options)
    return collect_rows(results, sweep)
