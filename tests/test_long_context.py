"""RULER offline (harness.ruler, tasks/long_context) and its per-length scores (harness.lmeval).

    pytest -q tests/test_long_context.py     # ~1 min on 2 cores; no network (sockets are refused)

The end-to-end test runs the whole `long_context` group on a fresh cache folder with a tiny random
Llama and SmolLM2's tokenizer: every source (essays, SQuAD, HotpotQA, NLTK's sentence model) must
come from local files, since any connection attempt fails the test.
"""
from __future__ import annotations

import math
import re
import socket

import pytest

from harness import ruler
from harness.lmeval import add_length_scores, result_rows, run_lm_eval, tokenizer_dir


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture(scope="module")
def tok_dir(smollm_tokenizer):
    return str(tokenizer_dir(smollm_tokenizer))


def test_long_context_runs_offline_on_a_fresh_cache(tiny_llama, smollm_tokenizer, tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("MLA_HARNESS_CACHE", str(tmp_path / "cache"))
    assert ruler.ensure_punkt() == tmp_path / "cache" / "nltk_data"  # NLTK's model, written fresh
    rows, raw = run_lm_eval(tiny_llama, smollm_tokenizer, ["long_context"], batch_size=8,
                            metadata={"max_seq_lengths": [1024, 2048], "num_samples": 2},
                            gen_kwargs={"max_gen_toks": 4})  # the answers of a random model: few tokens do
    got = {(r["task"], r["metric"]): r for r in rows}
    for length in ("1024", "2048"):
        group = got["long_context", length]
        assert 0.0 <= group["value"] <= 1.0 and group["stderr"] is not None
        assert group["n"] == sum(got[t, length]["n"] for t in ruler.TASKS if (t, length) in got)
    # HotpotQA's ten gold + distractor paragraphs never fit 1024 tokens: 12 tasks there, 13 at 2048
    assert raw["k-length"]["long_context"] == {"1024": 12, "2048": 13}
    assert ("ruler_qa_hotpot", "1024") not in got and got["ruler_qa_hotpot", "2048"]["n"] == 2
    assert not any(m == "4096" for _, m in got)  # a length not run is not reported (lm-eval says -1)
    assert "samples" not in raw


def test_essay_haystacks_hold_the_essays_and_the_needle(tok_dir, no_network):
    words = ruler.essay_words()
    for name in ("niah_single_2", "niah_multikey_1", "niah_multivalue"):
        docs = ruler.generate(name, tok_dir, (1024,), 3, 42)
        assert len(docs) == 3
        for doc in docs:
            text = doc["input"]
            needles = re.findall(r"One of the special magic numbers for [\w-]+ is: \d+\.", text)
            assert needles and all(value in text for value in doc["outputs"])
            assert all(any(value in n for n in needles) for value in doc["outputs"])
            haystack = text
            for needle in needles:  # needles go between sentences (two at one place leave two spaces)
                haystack = haystack.replace(needle, "")
            # the haystack is the start of the essays, word for word
            assert " ".join(words[:300]) in re.sub(" +", " ", haystack)
            assert 700 <= doc["length"] <= 1024 and doc["max_length"] == 1024


def test_qa_documents_hold_the_gold_paragraph_and_question(tok_dir, no_network):
    qas, docs = ruler.squad()
    for doc, qa in zip(ruler.generate("ruler_qa_squad", tok_dir, (2048,), 3, 42), qas):
        assert qa["query"] in doc["input"] and docs[qa["context"][0]] in doc["input"]
        assert doc["outputs"] == qa["outputs"]
    qas, docs = ruler.hotpotqa()
    for doc, qa in zip(ruler.generate("ruler_qa_hotpot", tok_dir, (2048,), 2, 42), qas):
        assert qa["query"] in doc["input"] and all(docs[i] in doc["input"] for i in qa["context"])


def test_local_readers_equal_lm_evals(monkeypatch):
    """Our readers give exactly what lm-eval's read_squad / read_hotpotqa build from the same JSON."""
    import json

    from lm_eval.tasks.ruler import qa_utils

    files = {"squad": "squad.json", "hotpot": "hotpotqa.json"}

    def local(url):
        name = "squad" if "squad" in url.lower() else "hotpot"
        return json.loads((ruler.source_dir() / files[name]).read_text(encoding="utf-8"))

    monkeypatch.setattr(qa_utils, "download_json", local)
    assert qa_utils.read_squad.__wrapped__() == ruler.squad()
    assert qa_utils.read_hotpotqa.__wrapped__() == ruler.hotpotqa()
    assert len(ruler.squad()[0]) == 5928 and len(ruler.hotpotqa()[0]) == 7405  # answerable dev / dev distractor


def test_documents_are_seeded_interleaved_and_independent_of_other_lengths(tok_dir):
    both = ruler.generate("niah_single_3", tok_dir, (1024, 2048), 2, 7)
    assert [d["max_length"] for d in both] == [1024, 2048, 1024, 2048]
    alone = ruler.generate("niah_single_3", tok_dir, (2048,), 2, 7)
    assert [d["input"] for d in both[1::2]] == [d["input"] for d in alone]
    ruler.generate.cache_clear()
    assert ruler.generate("niah_single_3", tok_dir, (2048,), 2, 7) == alone  # regenerated, same
    assert ruler.generate("niah_single_3", tok_dir, (2048,), 2, 8)[0]["outputs"] != alone[0]["outputs"]


def test_punkt_model_is_english():
    from nltk import sent_tokenize

    ruler.ensure_punkt()
    text = "Mr. Smith went to Washington. He arrived at 5 p.m. on Jan. 3 and met Dr. Who. It rained."
    assert sent_tokenize(text) == ["Mr. Smith went to Washington.", "He arrived at 5 p.m. on Jan. 3 and met Dr. Who.",
                                   "It rained."]


def test_missing_tokenizer_says_how_to_pass_one():
    from harness.errors import HarnessError

    with pytest.raises(HarnessError, match="tokenizer"):
        ruler.niah_single_1(max_seq_lengths=[1024], num_samples=1)


def test_length_scores_have_stderr_and_skip_lengths_not_run():
    def sample(length, score):
        return {"metrics": ["4096", str(length)], "4096": -1.0, str(length): score} if length != 4096 else \
            {"metrics": ["4096"], "4096": score}

    raw = {
        "results": {"a": {"1024,none": 0.5, "4096,none": -1}, "b": {"1024,none": 1.0}, "g": {"alias": "g"}},
        "groups": {"g": {"1024,none": 0.75, "4096,none": -1}},
        "group_subtasks": {"g": ["a", "b"]},
        "samples": {"a": [sample(1024, 1.0), sample(1024, 0.0)], "b": [sample(1024, 1.0), sample(1024, 1.0),
                                                                         sample(4096, 1.0)]},
        "n-samples": {"a": {"effective": 2}, "b": {"effective": 3}},
    }
    add_length_scores(raw)
    rows = {(r["task"], r["metric"]): r for r in result_rows(raw)}
    assert rows["a", "1024"]["value"] == 0.5 and rows["a", "1024"]["stderr"] == pytest.approx(0.5)
    assert rows["a", "1024"]["n"] == 2 and rows["b", "1024"]["stderr"] == 0.0
    assert rows["g", "1024"]["value"] == pytest.approx(0.75) and rows["g", "1024"]["n"] == 4
    assert rows["g", "1024"]["stderr"] == pytest.approx(math.sqrt(0.5**2 + 0) / 2)
    assert rows["g", "4096"]["value"] == 1.0 and raw["k-length"]["g"] == {"1024": 2, "4096": 1}
    assert ("a", "4096") not in rows  # -1: not run


def test_long_perplexities_per_domain_and_length(tiny_llama, smollm_tokenizer):
    from harness.evaluate import LongPplSpec, long_perplexities, perplexity
    from harness.data import token_windows

    spec = LongPplSpec(seq_lens=(64, 128), samples=2, chunk=48)
    got = long_perplexities(tiny_llama, smollm_tokenizer, ["wiki", "prose"], spec)
    assert set(got) == {"wiki@64", "wiki@128", "prose@64", "prose@128"}
    windows = token_windows(smollm_tokenizer, "prose", "eval", 2, 128, 1)
    assert got["prose@128"]["tokens"] == 2 * 127
    assert got["prose@128"]["nll"] == pytest.approx(perplexity(tiny_llama, windows)["nll"], abs=1e-5)
