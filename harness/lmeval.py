"""Score an in-memory HF causal LM on the offline lm-eval tasks (tasks/, rendered by harness.tasks).

The model (any `PreTrainedModel`, converted attention included) is wrapped as it is in lm-eval's
`HFLM` (`harness.hflm.BatchedHFLM`: the same scoring, read off the device once per batch), the tasks
come from `harness.tasks.task_dir()` only (`include_defaults=False`: a fast start, and no task can
silently reach for the network), and the results are flattened into rows.

    from harness.lmeval import run_lm_eval, format_table
    rows, raw = run_lm_eval(model, tokenizer, ["arc_easy", "piqa"], limit=100, out_dir="results/x")
    print(format_table(raw))   # rows: [{"task": "arc_easy", "metric": "acc_norm", "value": .., "stderr": .., "n": 100}, ...]

lm-eval is imported inside the functions: importing it takes seconds.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from harness.paths import cache_root, rename_into_place
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


def is_length_metric(metric: str) -> bool:
    """RULER's metrics are context lengths in tokens ("4096")."""
    return metric.isdigit()


def add_length_scores(raw: dict) -> dict:
    """Per-length scores with their uncertainty, from the per-document scores in raw["samples"].

    RULER's tasks (tasks/long_context) report one metric per context length: lm-eval gives its
    mean over the documents of that length but no stderr, and -1 for a length that was not run.
    Here each (task, length) gets mean, stderr = sd / sqrt(n) and n (`raw["n-length"]`); a group
    gets the unweighted mean over its tasks that have documents of that length (lm-eval's
    `weight_by_size: false`) and stderr sqrt(sum se^2) / k, and `raw["k-length"][group][length]`
    = k; lengths that were not run are removed. Written into `raw` in place.
    """
    per_task: dict[str, dict[str, list[float]]] = {}
    for task, samples in (raw.get("samples") or {}).items():
        for sample in samples:
            for metric in sample.get("metrics", []):
                value = _number(sample.get(metric))
                if is_length_metric(metric) and value is not None and value != -1:
                    per_task.setdefault(task, {}).setdefault(metric, []).append(value)
    results, groups = raw.setdefault("results", {}), raw.get("groups", {})
    lengths = raw.setdefault("n-length", {})
    for entry in list(results.values()) + list(groups.values()):  # drop lm-eval's values: recomputed below
        for key in [k for k in entry if "," in k and is_length_metric(k.split(",")[0].removesuffix("_stderr"))]:
            del entry[key]
    scores: dict[tuple[str, str], tuple[float, float | None, int]] = {}
    for task, metrics in per_task.items():
        for metric, values in metrics.items():
            n = len(values)
            mean = sum(values) / n
            sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
            scores[task, metric] = (mean, None if sd is None else sd / math.sqrt(n), n)
    subtasks = raw.get("group_subtasks", {})
    for group in subtasks:
        leaves = _leaves(group, subtasks)
        for metric in sorted({m for t in leaves for m in per_task.get(t, {})}, key=int):
            # over the tasks that have documents of this length (RULER's HotpotQA has none at 1024)
            means, errors, ns = zip(*(scores[t, metric] for t in leaves if (t, metric) in scores))
            k = len(means)
            se = None if None in errors else math.sqrt(sum(e * e for e in errors)) / k
            scores[group, metric] = (sum(means) / k, se, sum(ns))
            raw.setdefault("k-length", {}).setdefault(group, {})[metric] = k
    for (name, metric), (mean, se, n) in scores.items():
        entries = [results.setdefault(name, {"alias": name})]
        if name in subtasks:
            entries.append(raw.setdefault("groups", groups).setdefault(name, {"alias": name}))
        for entry in entries:
            entry[f"{metric},none"] = mean
            entry[f"{metric}_stderr,none"] = "N/A" if se is None else se
        lengths.setdefault(name, {})[metric] = n
    return raw


def result_rows(raw: dict) -> list[dict]:
    """Flatten lm-eval's results into rows {task, metric, value, stderr, n}, tasks then groups.

    `metric` drops the filter suffix when it is lm-eval's default ("acc,none" -> "acc"), and keeps
    it otherwise ("exact_match,strict-match"); `n` is the number of documents scored (for a group,
    the sum over its tasks; for a RULER length, the documents of that length, see add_length_scores);
    `note` says what a group lacks, e.g. "RACE: no offline rows (7/8 tasks)" (raw["notes"], from the
    rendered tasks), else None.
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
                "n": raw.get("n-length", {}).get(name, {}).get(metric, n) if is_length_metric(metric) else n,
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


def tokenizer_dir(tokenizer) -> Path:
    """A folder holding `tokenizer` (save_pretrained), for tasks that load one by name.

    RULER's generators size their documents with `AutoTokenizer.from_pretrained(<name>)`; an
    in-memory tokenizer (e.g. read from a GGUF file) is saved once under
    `$MLA_HARNESS_CACHE/tokenizers/<hash of its files>` and that folder is the name.
    """
    root = cache_root() / "tokenizers"
    tmp = root / f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tokenizer.save_pretrained(str(tmp))
        digest = hashlib.sha256()
        for path in sorted(tmp.iterdir()):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
        final = root / digest.hexdigest()[:16]
        if not final.is_dir():
            rename_into_place(tmp, final)  # or keep another process's copy of the same tokenizer
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


@contextlib.contextmanager
def generate_with_cache(model, cache_factory: Callable[[], Any] | None):
    """While active, `model.generate` gets `cache_factory()` as its cache (a fresh cache per call).

    lm-eval's HFLM calls `model.generate(...)` without a cache argument; this is how its
    generation tasks (RULER) run with a quantized KV cache (harness.kvquant).
    """
    if cache_factory is None:
        yield
        return
    from harness.mla.cache import CACHE_ARG

    original = model.generate

    def generate(*args, **kwargs):
        if "cache" not in kwargs and "past_key_values" not in kwargs:
            kwargs[CACHE_ARG] = cache_factory()
        return original(*args, **kwargs)

    model.generate = generate
    try:
        yield
    finally:
        del model.generate  # the class's method again


def _merge(raws: list[dict]) -> dict:
    """One results dict from several simple_evaluate calls over disjoint tasks."""
    merged = dict(raws[0])
    for raw in raws[1:]:
        for key, value in raw.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "config":
                merged[key] = {**merged[key], **value}
            else:
                merged.setdefault(key, value)
    return merged


def _limits(names: list[str], limit) -> list[tuple[int | float | None, list[str]]]:
    """[(limit, names)] for one simple_evaluate call per distinct limit."""
    if not isinstance(limit, dict):
        return [(limit, names)]
    unknown = sorted(set(limit) - set(names))
    if unknown:
        raise HarnessError(f"limit names task(s) {', '.join(unknown)} that are not evaluated ({', '.join(names)}); "
                           f"give a limit per evaluated task or group")
    calls: dict = {}
    for name in names:
        calls.setdefault(limit.get(name), []).append(name)
    return list(calls.items())


CUDA_MAX_BATCH = 64  # upper bound of lm-eval's batch-size search on a GPU


def lm_batch_size(batch_size: int | str | None, device) -> tuple[int | str, int]:
    """(batch_size, max_batch_size) for lm-eval's HFLM on `device`.

    On CUDA lm-eval searches the largest batch that fits ("auto", from `batch_size` down, at the
    longest request; None: 64), so the sweep's eval.batch_size is a ceiling: several processes
    sharing one GPU each stay under it instead of each sizing itself to the whole card. On CPU the
    given size is used (None: 8). Batch size changes only the order of float sums, never which
    requests are scored.
    """
    if isinstance(batch_size, str):
        return batch_size, CUDA_MAX_BATCH
    if getattr(device, "type", str(device)) == "cuda":
        return "auto", int(batch_size or CUDA_MAX_BATCH)
    return int(batch_size or 8), CUDA_MAX_BATCH


def run_lm_eval(
    model,
    tokenizer,
    tasks: list[str] | str,
    *,
    limit: int | float | dict | None = None,
    batch_size: int | str | None = None,
    num_fewshot: int | None = None,
    seed: int = 1234,
    out_dir: str | Path | None = None,
    device: str | None = None,
    log_samples: bool = False,
    bootstrap_iters: int = 1000,
    metadata: dict | None = None,
    cache_factory: Callable[[], Any] | None = None,
    gen_kwargs: dict | None = None,
) -> tuple[list[dict], dict]:
    """Run lm-eval tasks on an in-memory model.

    Args:
        model: a HF causal LM (`PreTrainedModel`); put in eval mode for the run, then restored.
        tokenizer: its tokenizer.
        tasks: task/group names (a list or "a,b"), e.g. ["mla_core"], ["arc_easy", "piqa"], "lambada_openai".
        limit: documents per task (an int), or a fraction of each task (a float < 1); None = all. A
            mapping {task or group: limit} gives each its own (unlisted: all); lm-eval takes one limit
            per call, so there is one call per distinct value.
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
        metadata: task metadata for lm-eval (RULER: max_seq_lengths, num_samples, seed); `tokenizer`
            defaults to a saved copy of `tokenizer` (tokenizer_dir).
        cache_factory: a function returning a fresh KV cache for each `generate` call (e.g. a
            quantized cache from harness.kvquant); loglikelihood scoring runs one forward pass
            without a cache and is not affected.
        gen_kwargs: overrides of the generation tasks' settings (e.g. {"max_gen_toks": 8} for a quick
            test); None keeps each task's own.
    Returns:
        (rows, raw): rows are {task, metric, value, stderr, n} for every task, then every group;
        raw is lm-eval's results dict, with `add_entry_means` (mla_core's average) and
        `add_length_scores` (RULER's per-length stderr) applied.
    Raises:
        HarnessError: an unknown task name, or a problem with the offline benchmarks (see harness.tasks).
    """
    names = _task_list(tasks)
    calls = _limits(names, limit)
    from harness.tasks import task_dir

    folder = task_dir()
    import lm_eval.evaluator
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from harness import hflm

    lm_eval.evaluator.get_git_commit_hash = _quiet_git_hash

    metadata = {"tokenizer": str(tokenizer_dir(tokenizer)), **(metadata or {})}
    manager = TaskManager(include_path=str(folder), include_defaults=False, metadata=metadata)
    _check_known(names, manager, folder)
    if device is not None:
        model.to(device)
    was_training = model.training
    model.eval()
    raws = []
    try:
        bs, max_bs = lm_batch_size(batch_size, next(model.parameters()).device)
        lm = hflm.BatchedHFLM(pretrained=model, tokenizer=tokenizer, batch_size=bs, max_batch_size=max_bs)
        with generate_with_cache(model, cache_factory):
            for call_limit, call_names in calls:
                raws.append(simple_evaluate(
                    model=lm,
                    tasks=call_names,
                    task_manager=manager,
                    limit=call_limit,
                    num_fewshot=num_fewshot,
                    gen_kwargs=gen_kwargs,
                    log_samples=True,  # per-document scores: paired comparisons, RULER per-length stderr
                    bootstrap_iters=bootstrap_iters,
                    random_seed=seed,
                    numpy_random_seed=seed,
                    torch_random_seed=seed,
                    fewshot_random_seed=seed,
                ))
    finally:
        model.train(was_training)
        import torch

        if torch.cuda.is_available():  # hand back lm-eval's batch-size search and scoring memory: processes
            torch.cuda.empty_cache()   # sharing a GPU (a healing run between its curve marks) need it back
    if any(raw is None for raw in raws):  # only on non-zero ranks of a multi-process launch
        raise HarnessError("lm-eval returned no results (is this a non-zero rank of a distributed launch?)")
    raw = _merge(raws)
    add_entry_means(raw)
    add_length_scores(raw)
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
    """One record per scored document of every leaf task: {task, doc_id, acc, acc_norm, acc_norm_nospace}; a
    task without a normalised metric gets its acc there (the papers' convention, as `add_entry_means`
    averages). What a paired comparison of two models on the same documents needs."""
    out = []
    for task, samples in (raw.get("samples") or {}).items():
        for s in samples:
            rec = {"task": task, "doc_id": int(s["doc_id"]),
                   **{m: (float(s[m]) if m in s and _number(s[m]) is not None else None) for m in PER_DOC_METRICS}}
            # the papers' averages count a task without a normalised accuracy by its acc (add_entry_means)
            rec["acc_norm"] = rec["acc_norm"] if rec["acc_norm"] is not None else rec["acc"]
            if rec["acc_norm_nospace"] is None:
                rec["acc_norm_nospace"] = rec["acc_norm"]
            out.append(rec)
    return out


def group_weighting(raw: dict, manager) -> dict[str, dict]:
    """{group: {"children": [...], "weight_by_size": bool}}: how each group's score is made of its
    children's, as lm-eval computed it (weight_by_size from the group's aggregate_metric_list, found
    through its `include:` chain, e.g. our mmlu includes the stock one that weights subjects by size;
    a group with none is the plain mean over its direct entries, `add_entry_means`)."""
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
            cfg, seen = {}, set()
            while path is not None and Path(path) not in seen:  # follow `include:` as lm-eval does
                seen.add(Path(path))
                part = yaml.load(Path(path).read_text(), Loader=_Loader) or {}  # noqa: S506 (a SafeLoader subclass)
                cfg = {**part, **cfg}  # the including file's keys win
                inc = part.get("include")
                path = None if inc is None else (Path(inc) if Path(inc).is_absolute() else Path(path).parent / inc)
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
