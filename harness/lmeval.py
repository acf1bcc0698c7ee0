"""Score an in-memory HF causal LM on the offline lm-eval tasks (tasks/, rendered by harness.tasks).

The model is wrapped in lm-eval's `HFLM` as is (any `PreTrainedModel`, converted attention
included), the tasks come from `harness.tasks.task_dir()` only (`include_defaults=False`: a fast
start, and no task can silently reach for the network), and the results are flattened into rows.

    from harness.lmeval import run_lm_eval, format_table
    rows, raw = run_lm_eval(model, tokenizer, ["arc_easy", "piqa"], limit=100, out_dir="results/x")
    print(format_table(raw))   # rows: [{"task": "arc_easy", "metric": "acc_norm", "value": .., "stderr": .., "n": 100}, ...]

lm-eval is imported inside the functions: importing it takes seconds.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from pathlib import Path
from typing import Any

from harness.errors import HarnessError

RESULTS_FILE = "lm_eval_results.json"


def _task_list(tasks: list[str] | str) -> list[str]:
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [str(t).strip() for t in tasks]
    names = [t for t in names if t]
    if not names:
        raise HarnessError("no lm-eval task given; name one or more, e.g. tasks: [mla_core] or arc_easy,piqa")
    return names


def _check_known(names: list[str], manager: Any, folder: Path) -> None:
    from harness.tasks import OPTIONAL_SOURCES, task_notes

    missing = task_notes(folder)["missing"]
    for name in names:
        if name in missing:
            src = next(s for s in OPTIONAL_SOURCES if s.label == missing[name])
            raise HarnessError(f"lm-eval task '{name}' has no offline rows here; set {src.env} to a file of "
                               f"{src.what}")
    known = set(manager.all_tasks)
    unknown = [n for n in names if n not in known]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            hints.append(f"'{name}'" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        listed = sorted(n for n in {*manager.all_groups, *manager.all_subtasks} if not n.startswith("mmlu_"))
        raise HarnessError(f"unknown lm-eval task {', '.join(hints)}; the offline tasks (from {folder}) are "
                           f"{', '.join(listed)} and mmlu_<subject>")


def check_tasks(tasks: list[str] | str) -> list[str]:
    """The task names, checked against the offline tasks before any model is loaded (raises with hints)."""
    from harness.tasks import task_dir

    names = _task_list(tasks)
    folder = task_dir()
    from lm_eval.tasks import TaskManager

    _check_known(names, TaskManager(include_path=str(folder), include_defaults=False), folder)
    return names


def _quiet_git_hash() -> str | None:
    """lm-eval's results record `git describe`; outside a checkout its own call prints `fatal: not a git
    repository` into every log. The same question, asked without the noise."""
    import subprocess

    try:
        out = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _number(x: Any) -> float | None:
    """A metric value as a float, or None for lm-eval's "N/A" and non-finite values."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _leaves(name: str, subtasks: dict[str, list[str]]) -> list[str]:
    if name not in subtasks:
        return [name]
    return [leaf for child in subtasks[name] for leaf in _leaves(child, subtasks)]


ENTRY_MEAN_METRICS = ("acc", "acc_norm", "acc_norm_nospace")


def add_entry_means(raw: dict) -> dict:
    """Give each group that lm-eval left unaggregated the unweighted mean over its direct entries.

    lm-eval averages a group over its *leaf* tasks, so in `mla_core` MMLU's 57 subjects would
    outweigh the other five entries. Groups without `aggregate_metric_list` (mla_core, care_eval,
    mha2mla_eval) get instead, for each of acc, acc_norm and acc_norm_nospace that at least one
    entry reports, the plain mean over their direct entries (a sub-group counts once with its own
    aggregate; an entry without that metric, e.g. MMLU or WinoGrande for acc_norm, contributes its
    acc), with stderr sqrt(sum se^2) / k. The values are written into `raw` ("acc,none", ...) in place.
    """
    subtasks = raw.get("group_subtasks", {})
    results = raw.get("results", {})
    for group, children in subtasks.items():
        entry = results.get(group)
        if entry is None or not children or any("," in key for key in entry):
            continue  # not reported, or lm-eval aggregated it already
        for metric in ENTRY_MEAN_METRICS:
            if not any(f"{metric},none" in results.get(child, {}) for child in children):
                continue  # no entry defines it: a mean of plain acc under its name would mislead
            values, errors = [], []
            for child in children:
                child_entry = results.get(child, {})
                key = f"{metric},none" if f"{metric},none" in child_entry else "acc,none"
                value = _number(child_entry.get(key))
                if value is None:
                    break
                values.append(value)
                errors.append(_number(child_entry.get(key.replace(",", "_stderr,", 1))))
            else:
                k = len(values)
                entry[f"{metric},none"] = sum(values) / k
                entry[f"{metric}_stderr,none"] = (
                    "N/A" if None in errors else math.sqrt(sum(e * e for e in errors)) / k
                )
        if any("," in key for key in entry):
            raw.setdefault("groups", {})[group] = entry  # lm-eval lists only groups it aggregated
    return raw


def result_rows(raw: dict) -> list[dict]:
    """Flatten lm-eval's results into rows {task, metric, value, stderr, n}, tasks then groups.

    `metric` drops the filter suffix when it is lm-eval's default ("acc,none" -> "acc"), and keeps
    it otherwise ("exact_match,strict-match"); `n` is the number of documents scored (for a group,
    the sum over its tasks); `note` says what a group lacks, e.g. "RACE: no offline rows (7/8 tasks)"
    (raw["notes"], from the rendered tasks), else None.
    """
    samples = {name: int(v.get("effective", v.get("original", 0))) for name, v in raw.get("n-samples", {}).items()}
    subtasks = raw.get("group_subtasks", {})
    notes = raw.get("notes", {})
    entries = dict(raw.get("results", {}))
    for name, entry in raw.get("groups", {}).items():
        entries.setdefault(name, entry)
    rows = []
    for name in sorted(entries, key=lambda n: (n in subtasks, n)):
        entry = entries[name]
        n = sum(samples.get(leaf, 0) for leaf in _leaves(name, subtasks))
        for key, value in entry.items():
            if "," not in key:  # "alias", "name", "sample_len", ...
                continue
            metric, filt = key.split(",", 1)
            if metric.endswith("_stderr"):
                continue
            rows.append({
                "task": name,
                "metric": metric if filt == "none" else key,
                "value": _number(value),
                "stderr": _number(entry.get(f"{metric}_stderr,{filt}")),
                "n": n,
                "note": notes.get(name),
            })
    return rows


def _write_json(raw: dict, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS_FILE
    tmp = out / f".{RESULTS_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(raw, indent=1, default=str) + "\n")  # config holds the model object etc.
    os.replace(tmp, path)
    return path


CUDA_MAX_BATCH = 64  # upper bound of lm-eval's batch-size search on a GPU


def lm_batch_size(batch_size: int | str | None, device) -> tuple[int | str, int]:
    """(batch_size, max_batch_size) for lm-eval's HFLM on `device`.

    On CUDA lm-eval searches the largest batch that fits ("auto", from max(batch_size, 64) down,
    at the longest request): a 135M model scores in batches of 64, Gemma's 262k-token vocabulary
    halves that where its logits would not fit. On CPU the given size is used (None: 8). Batch
    size changes only the order of float sums, never which requests are scored.
    """
    if isinstance(batch_size, str):
        return batch_size, CUDA_MAX_BATCH
    if getattr(device, "type", str(device)) == "cuda":
        return "auto", max(int(batch_size or 0), CUDA_MAX_BATCH)
    return int(batch_size or 8), CUDA_MAX_BATCH


def run_lm_eval(
    model,
    tokenizer,
    tasks: list[str] | str,
    *,
    limit: int | float | None = None,
    batch_size: int | str | None = None,
    num_fewshot: int | None = None,
    seed: int = 1234,
    out_dir: str | Path | None = None,
    device: str | None = None,
    log_samples: bool = False,
    bootstrap_iters: int = 1000,
) -> tuple[list[dict], dict]:
    """Run lm-eval tasks on an in-memory model.

    Args:
        model: a HF causal LM (`PreTrainedModel`); put in eval mode for the run, then restored.
        tokenizer: its tokenizer.
        tasks: task/group names (a list or "a,b"), e.g. ["mla_core"], ["arc_easy", "piqa"], "lambada_openai".
        limit: documents per task (an int), or a fraction of each task (a float < 1); None = all.
        batch_size: sequences per forward pass on CPU (None: 8); on CUDA lm-eval finds the largest
            that fits, up to max(batch_size, 64) (`lm_batch_size`); a string ("auto:4") is passed as is.
        num_fewshot: few-shot examples per prompt; None = each task's default (0 for all shipped tasks).
        seed: seeds python, numpy, torch and the few-shot sampler.
        out_dir: if given, the full lm-eval results are written to `<out_dir>/lm_eval_results.json`.
        device: move the model there first (in place); None = leave it where it is.
        log_samples: keep lm-eval's per-document outputs (prompts, responses) in the raw results
            (large). Per-document correctness is always kept (raw["per_document"], and
            lm_eval_documents.parquet in out_dir) for paired comparisons.
        bootstrap_iters: resamples for the stderr of non-mean metrics (LAMBADA perplexity); lm-eval's
            default 100000 takes minutes on a CPU.
    Returns:
        (rows, raw): rows are {task, metric, value, stderr, n} for every task, then every group;
        raw is lm-eval's results dict, with `add_entry_means` applied (mla_core's average).
    Raises:
        HarnessError: an unknown task name, or a problem with the offline benchmarks (see harness.tasks).
    """
    names = _task_list(tasks)
    from harness.tasks import task_dir

    folder = task_dir()
    import lm_eval.evaluator
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm_eval.evaluator.get_git_commit_hash = _quiet_git_hash

    manager = TaskManager(include_path=str(folder), include_defaults=False)
    _check_known(names, manager, folder)
    if device is not None:
        model.to(device)
    was_training = model.training
    model.eval()
    try:
        bs, max_bs = lm_batch_size(batch_size, next(model.parameters()).device)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=bs, max_batch_size=max_bs)
        raw = simple_evaluate(
            model=lm,
            tasks=names,
            task_manager=manager,
            limit=limit,
            num_fewshot=num_fewshot,
            log_samples=True,  # per-document correctness: the paired comparisons against the baseline
            bootstrap_iters=bootstrap_iters,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    finally:
        model.train(was_training)
    if raw is None:  # only on non-zero ranks of a multi-process launch
        raise HarnessError("lm-eval returned no results (is this a non-zero rank of a distributed launch?)")
    add_entry_means(raw)
    from harness.tasks import task_notes

    notes = {g: n for g, n in task_notes(folder)["notes"].items() if g in raw.get("results", {})}
    if notes:
        raw["notes"] = notes
    raw["per_document"] = per_document(raw)
    raw["group_weighting"] = group_weighting(raw, manager)
    samples = raw.pop("samples", None)
    if log_samples:
        raw["samples"] = samples
    if out_dir is not None:
        _write_json({k: v for k, v in raw.items() if k not in ("samples", "per_document")}, out_dir)
        write_per_document(raw, out_dir)
    return result_rows(raw), raw


PER_DOCUMENT_FILE = "lm_eval_documents.parquet"  # task, doc_id, acc, acc_norm(_nospace): one row per scored document
PER_DOC_METRICS = ("acc", "acc_norm", "acc_norm_nospace")


def per_document(raw: dict) -> list[dict]:
    """One record per scored document of every leaf task: {task, doc_id, acc, acc_norm, acc_norm_nospace} (None where
    the task has no such metric). What a paired comparison of two models on the same documents needs."""
    out = []
    for task, samples in (raw.get("samples") or {}).items():
        for s in samples:
            out.append({"task": task, "doc_id": int(s["doc_id"]),
                        **{m: (float(s[m]) if m in s and _number(s[m]) is not None else None)
                           for m in PER_DOC_METRICS}})
    return out


def group_weighting(raw: dict, manager) -> dict[str, dict]:
    """{group: {"children": [...], "weight_by_size": bool}}: how each group's score is made of its
    children's, as lm-eval computed it (weight_by_size from the group's aggregate_metric_list; a group
    with none is the plain mean over its direct entries, `add_entry_means`)."""
    import yaml

    out = {}
    for group, children in raw.get("group_subtasks", {}).items():
        by_size = False
        entry = manager.task_index.get(group)
        path = getattr(entry, "yaml_path", None)
        if path is not None:
            class _Loader(yaml.SafeLoader):
                pass

            _Loader.add_constructor("!function", lambda loader, node: None)
            cfg = yaml.load(Path(path).read_text(), Loader=_Loader) or {}  # noqa: S506 (a SafeLoader subclass)
            aggs = cfg.get("aggregate_metric_list") or []
            by_size = bool(aggs) and all(a.get("weight_by_size", True) for a in aggs)
        out[group] = {"children": list(children), "weight_by_size": by_size}
    return out


def write_per_document(raw: dict, out_dir: str | Path) -> Path:
    """`<out_dir>/lm_eval_documents.parquet` (atomically) and the group weighting beside the results."""
    import pandas as pd

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / PER_DOCUMENT_FILE
    tmp = out / f".{PER_DOCUMENT_FILE}.tmp-{os.getpid()}"
    pd.DataFrame(raw["per_document"], columns=["task", "doc_id", *PER_DOC_METRICS]).to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return path


def format_table(raw_results: dict) -> str:
    """lm-eval's markdown table of the task results, then of the group results if there are any."""
    from lm_eval.utils import make_table

    table = make_table(raw_results)
    if raw_results.get("groups"):
        table += "\n" + make_table(raw_results, "groups")
    for group, note in sorted(raw_results.get("notes", {}).items()):
        table += f"\nNote: {group}: {note}"
    return table
