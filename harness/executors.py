"""Executors: how a sweep's jobs run. One small interface:

    executor(jobs, run, fail, workdir, **options) -> None

`run(job) -> row` runs one job and publishes its run directory atomically; `fail(job, message)
-> row` records a job whose process died. The sweep hands both in (harness.sweep.execute_job and
record_failure, bound to its results folder), so an executor never imports the sweep, and any
back-end that calls `run` once per job is crash-safe and resumable. `workdir` is the sweep's
results folder (its name labels progress bars; submitit keeps its logs below it).

    serial    one job after another in this process (default)
    ray       one Ray task per job: `ray.init()` starts a local instance, or joins the cluster at
              `address` / $RAY_ADDRESS; num_cpus / num_gpus per task; a task whose worker dies is
              retried max_retries times
    submitit  a SLURM job array (submitit.AutoExecutor); cluster: local runs each job in a local
              process, debug runs them in this one (tests); a job whose process dies (time limit,
              out of memory, preemption) is resubmitted max_retries times

A sweep picks one with the `executor:` key, a name or a mapping of the name and its options:

    executor: {name: ray, num_cpus: 1, num_gpus: 0, max_retries: 2, address: null}
    executor: {name: submitit, cluster: slurm, slurm_partition: gpu, gpus_per_node: 1, timeout_min: 240}

or on the command line: `mla-harness sweep FILE --executor ray --executor-option address=auto`.
Options are the executor function's keyword-only arguments; submitit also passes on any of
submitit's own parameters (timeout_min, mem_gb, gpus_per_node, cpus_per_task, slurm_<name>, ...).
"""
from __future__ import annotations

import difflib
import importlib.util
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

RunJob = Callable[[Any], dict]  # job -> its row; runs it and publishes it atomically (harness.sweep.execute_job)
FailJob = Callable[[Any, str], dict]  # (job, message) -> the failed row recorded for a job whose process died

from harness.errors import HarnessError


@dataclass
class Executor:
    name: str
    fn: Callable
    requires: str | None  # the Python package the back-end needs (None: nothing beyond the harness)
    extra_options: Callable[[], set] | None  # further option names passed through to the back-end
    doc: str

    @property
    def options(self) -> dict:
        """Keyword-only options and their defaults."""
        sig = inspect.signature(self.fn)
        return {k: p.default for k, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY}

    @property
    def annotations(self) -> dict:
        sig = inspect.signature(self.fn)
        return {k: str(p.annotation) for k, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY}


EXECUTORS: dict[str, Executor] = {}
INSTALL_HINT = "pip install -e '.[distributed]' (or make setup)"


def register_executor(name: str, requires: str | None = None, extra_options: Callable[[], set] | None = None):
    def deco(fn):
        doc = (inspect.getdoc(fn) or "").split("\n")[0]
        EXECUTORS[name] = Executor(name=name, fn=fn, requires=requires, extra_options=extra_options, doc=doc)
        return fn
    return deco


def get_executor(name: str) -> Callable:
    """The executor function registered as `name` (raises with the available names)."""
    problems = check_executor(name, {})
    if problems:
        raise HarnessError(problems[0][1])
    return EXECUTORS[name].fn


def _type_ok(value, annotation: str) -> bool:
    if value is None:
        return "None" in annotation
    if isinstance(value, bool):
        return "bool" in annotation
    if isinstance(value, int):
        return "int" in annotation or "float" in annotation
    if isinstance(value, float):
        return "float" in annotation
    if isinstance(value, str):
        return "str" in annotation
    return False


def check_executor(name, options: dict) -> list[tuple[tuple, str]]:
    """Every problem of an executor name and its options as (key path below `executor`, message)."""
    if not isinstance(name, str) or name not in EXECUTORS:
        close = difflib.get_close_matches(str(name), list(EXECUTORS), n=1)
        return [(("name",) if options else (), f"unknown executor {name!r}; available: {', '.join(EXECUTORS)}"
                 + (f" (did you mean {close[0]!r}?)" if close else ""))]
    ex = EXECUTORS[name]
    if ex.requires and importlib.util.find_spec(ex.requires) is None:
        return [((), f"executor {name!r} needs the {ex.requires} package: {INSTALL_HINT}")]
    out = []
    known, ann = ex.options, ex.annotations
    extra = ex.extra_options() if ex.extra_options else set()
    for k, v in options.items():
        if k in known:
            if not _type_ok(v, ann[k]):
                out.append(((k,), f"expected {ann[k]}, got {v!r}"))
            elif isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0:
                out.append(((k,), f"{v!r} must be >= 0"))
        elif k not in extra:
            close = difflib.get_close_matches(str(k), list(known) + sorted(extra), n=1)
            out.append(((k,), f"executor {name!r} has no option {k!r}"
                              + (f" (did you mean {close[0]!r}?)" if close else "")
                              + f"; options: {', '.join(known) or '(none)'}"
                              + (" and submitit's parameters" if extra else "")))
    if name == "submitit" and options.get("cluster") not in (None, "slurm", "local", "debug"):
        out.append((("cluster",), f"{options['cluster']!r}: use slurm, local or debug (or leave it out: auto)"))
    return out


def _report(bar, job, row: dict) -> None:
    """One line per finished job under the progress bar."""
    status = row.get("status", "?")
    extra = ", ".join(f"{k}={row[k]:.3g}" for k in row if k.startswith("ppl_") and isinstance(row[k], (int, float)))
    err = f"  {row.get('error', '')}" if status != "ok" else ""
    bar.write(f"[{status}] {job.describe()}  {extra}{err}")


# --------------------------------------------------------------------------------- serial
@register_executor("serial")
def serial(jobs, run: RunJob, fail: FailJob, workdir: Path) -> None:
    """Run jobs one after another in this process (the base model is loaded once)."""
    from tqdm.auto import tqdm

    bar = tqdm(jobs, desc=f"sweep {Path(workdir).name}", unit="job")
    for job in bar:
        bar.set_postfix_str(job.describe()[:60])
        _report(bar, job, run(job))


# ------------------------------------------------------------------------------------ ray
def _call(fn: RunJob, job) -> dict:
    return fn(job)


# Variables a job reads; a worker of an existing cluster does not inherit the driver's environment.
FORWARDED_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "WANDB_MODE",
                 "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_API_KEY", "WANDB_SILENT", "MLA_HARNESS_CACHE",
                 "TOKENIZERS_PARALLELISM")


@register_executor("ray", requires="ray")
def ray_executor(jobs, run: RunJob, fail: FailJob, workdir: Path, *, num_cpus: float = 1,
                 num_gpus: float | None = None, max_retries: int = 2, address: str | None = None) -> None:
    """One Ray task per job, on a local Ray instance or an existing cluster.

    Args:
        num_cpus: CPUs reserved per task (Ray also sets the task's thread count to it).
        num_gpus: GPUs per task; None: 1 when the cluster has GPUs and the job does not ask for cpu, else 0.
        max_retries: times a task is rerun when its worker process dies (a job's own exception
            is not retried: it becomes a failed row, see harness.sweep.execute_job).
        address: cluster to join ("auto", "ray://host:10001", ...); None: $RAY_ADDRESS, else a local instance.
    """
    import ray
    from tqdm.auto import tqdm

    if not jobs:
        return
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        local = started and address is None and not os.environ.get("RAY_ADDRESS")
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        has_gpu = ray.cluster_resources().get("GPU", 0) > 0
        task = ray.remote(_call)  # ray.remote takes plain functions, not the bound `run`
        refs = {}
        for job in jobs:
            gpus = num_gpus if num_gpus is not None else (1 if has_gpu and job.device != "cpu" else 0)
            opts = dict(num_cpus=num_cpus, num_gpus=gpus, max_retries=max_retries, retry_exceptions=False,
                        name=f"mla-harness {job.job_id}")
            if not local and env:
                opts["runtime_env"] = {"env_vars": env}
            refs[task.options(**opts).remote(run, job)] = job
        bar = tqdm(total=len(jobs), desc=f"sweep {Path(workdir).name} (ray)", unit="job")
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                job = refs[ref]
                try:
                    row = ray.get(ref)
                except Exception as e:  # the worker died more than max_retries times
                    row = fail(job, f"ray task failed: {type(e).__name__}: {e}")
                _report(bar, job, row)
                bar.update(1)
        bar.close()
    finally:
        if started:
            ray.shutdown()


# ------------------------------------------------------------------------------- submitit
def _submitit_parameters() -> set:
    """submitit's own parameter names: the shared ones and <cluster>_<name> for each cluster."""
    from submitit import AutoExecutor
    from submitit.core import plugins

    generic = AutoExecutor._valid_parameters()
    out = set(generic)
    for cluster, cls in plugins.get_executors().items():
        out |= {f"{cluster}_{k}" for k in set(cls._valid_parameters()) | generic}
    return out


@register_executor("submitit", requires="submitit", extra_options=_submitit_parameters)
def submitit_executor(jobs, run: RunJob, fail: FailJob, workdir: Path, *, cluster: str | None = None,
                      folder: str | None = None, max_retries: int = 1, timeout_min: int = 24 * 60,
                      **parameters) -> None:
    """One SLURM array task per job through submitit (cluster local or debug for tests).

    Args:
        cluster: slurm | local | debug; None: what submitit detects (slurm when sbatch exists, else local).
        folder: submitit's logs and pickles; default <workdir>/submitit.
        max_retries: times a job whose process died (time limit, memory, preemption) is resubmitted.
        timeout_min: time limit per job.
        **parameters: submitit parameters (gpus_per_node, cpus_per_task, mem_gb, slurm_partition,
            slurm_array_parallelism, ...).
    """
    import submitit
    from submitit.helpers import as_completed
    from tqdm.auto import tqdm

    if not jobs:
        return
    workdir = Path(workdir).resolve()
    ex = submitit.AutoExecutor(folder=Path(folder) if folder else workdir / "submitit", cluster=cluster)
    ex.update_parameters(**{"name": f"mla-{workdir.name}", "timeout_min": timeout_min, **parameters})
    bar = tqdm(total=len(jobs), desc=f"sweep {workdir.name} (submitit {ex.cluster})", unit="job")
    todo, attempt = list(jobs), 0
    while todo:
        n = len(todo)
        subs = ex.map_array(run, todo)
        by_id = {id(s): j for s, j in zip(subs, todo)}
        retry = []
        for s in as_completed(subs, poll_frequency=1 if ex.cluster in ("local", "debug") else 15):
            job = by_id[id(s)]
            try:
                row = s.result()
            except Exception as e:  # the job's process died: resubmit, or record it
                if attempt < max_retries:
                    retry.append(job)
                    bar.write(f"[retry] {job.describe()}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                    continue
                row = fail(job, f"submitit job {s.job_id} failed: {type(e).__name__}: {e}")
            _report(bar, job, row)
            bar.update(1)
        todo, attempt = retry, attempt + 1
    bar.close()
