"""RULER offline (harness.ruler, tasks/long_context) and its per-length scores (harness.lmeval).

    pytest -q tests/test_long_context.py     # ~1 min on 2 cores; no network (sockets are refused)

The end-to-end test runs the whole `long_context` group on a fresh cache folder with a tiny random
Llama and SmolLM2's tokenizer: every source (essays, SQuAD, HotpotQA, NLTK's sentence model) must
come from local files, since any connection attempt fails the test. The documents' disk cache, the
pre-build CLI and the generation time limit are tested on small lengths and counts.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from harness import ruler
from harness.errors import HarnessError
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


@pytest.fixture
def ruler_cache(tmp_path, monkeypatch):
    """A private, empty $MLA_HARNESS_CACHE and an empty per-process cache: a test of generation must
    not be answered by documents an earlier run left on disk, nor leave its own in the user's cache."""
    monkeypatch.setenv("MLA_HARNESS_CACHE", str(tmp_path / "cache"))
    ruler.generate.cache_clear()
    yield tmp_path / "cache" / "ruler"
    ruler.generate.cache_clear()


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


def test_essay_haystacks_hold_the_essays_and_the_needle(tok_dir, ruler_cache, no_network):
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


def test_qa_documents_hold_the_gold_paragraph_and_question(tok_dir, ruler_cache, no_network):
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


def test_documents_are_seeded_interleaved_and_independent_of_other_lengths(tok_dir, ruler_cache, tmp_path,
                                                                             monkeypatch):
    both = ruler.generate("niah_single_3", tok_dir, (1024, 2048), 2, 7)
    assert [d["max_length"] for d in both] == [1024, 2048, 1024, 2048]
    alone = ruler.generate("niah_single_3", tok_dir, (2048,), 2, 7)
    assert [d["input"] for d in both[1::2]] == [d["input"] for d in alone]
    monkeypatch.setenv("MLA_HARNESS_CACHE", str(tmp_path / "fresh"))  # neither kept on disk nor in the process
    ruler.generate.cache_clear()
    assert ruler.generate("niah_single_3", tok_dir, (2048,), 2, 7) == alone  # regenerated, same
    assert ruler.generate("niah_single_3", tok_dir, (2048,), 2, 8)[0]["outputs"] != alone[0]["outputs"]


def _generator_must_not_run(*args):
    raise AssertionError(f"documents generated again: {args[0]} at {args[2]} tokens")


def test_documents_come_back_from_disk_equal_without_generating(tok_dir, ruler_cache, monkeypatch):
    """The processes of a sweep (and a GPU machine given pre-built files) read the documents that one
    generation wrote, and must score exactly the same documents: same order, same fields, same values."""
    args = ("ruler_vt", tok_dir, (1024, 2048), 2, 42)
    fresh = ruler.generate(*args)
    path = ruler.cache_path(ruler.cache_fields(*args))
    assert path.parent == ruler_cache and path.is_file()
    assert not [p for p in ruler_cache.iterdir() if p.name.startswith(".")]  # no temp file left behind
    monkeypatch.setattr(ruler, "_one_length", _generator_must_not_run)
    path.unlink()
    assert ruler.generate(*args) is fresh  # the process keeps its own copy: no disk read at all
    assert not path.exists()
    ruler.generate.cache_clear()
    with pytest.raises(AssertionError, match="generated again"):  # nothing on disk: the generator runs
        ruler.generate(*args)
    monkeypatch.undo()
    monkeypatch.setenv("MLA_HARNESS_CACHE", str(ruler_cache.parent))
    ruler.generate.cache_clear()
    assert ruler.generate(*args) == fresh  # written again
    monkeypatch.setattr(ruler, "_one_length", _generator_must_not_run)
    ruler.generate.cache_clear()
    cached = ruler.generate(*args)
    assert isinstance(cached, tuple) and cached == fresh
    assert [list(d) for d in cached] == [list(d) for d in fresh]  # field order too
    assert [d["max_length"] for d in cached] == [1024, 2048, 1024, 2048]


def test_cache_key_follows_every_input_and_only_those(tok_dir, tmp_path, monkeypatch):
    """A key that missed an input would hand a sweep documents sized for another tokenizer, length or
    count. The tokenizer counts by content, not by folder (each machine saves it elsewhere), and
    save_pretrained's `local_files_only` (it follows HF_HUB_OFFLINE, which sweeps/long-context-gpu.sh
    sets and a CPU box may not) is not part of it: a pre-built file must match a sweep's key."""
    import lm_eval

    def key(name="ruler_vt", tok=None, lengths=(1024, 2048), samples=4, seed=42):
        return ruler.cache_path(ruler.cache_fields(name, str(tok or here), lengths, samples, seed)).name

    here, there = tmp_path / "a", tmp_path / "b"
    shutil.copytree(tok_dir, here)
    shutil.copytree(tok_dir, there)
    base = key()
    assert key(tok=there) == base  # same tokenizer files elsewhere
    config = json.loads((there / "tokenizer_config.json").read_text())
    config["local_files_only"] = not config.get("local_files_only", False)
    (there / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    assert key(tok=there) == base  # loader bookkeeping only
    (there / ".complete").write_text("a marker\n")
    (there / "model.safetensors").write_bytes(b"weights do not size documents")
    assert key(tok=there) == base
    config["pad_token"] = "<|endoftext|>"
    (there / "tokenizer_config.json").write_text(json.dumps(config))
    changed_config = key(tok=there)
    (here / "tokenizer.json").write_text((here / "tokenizer.json").read_text().replace('"<|im_end|>"', '"<|im_END|>"', 1))
    changed_vocab = key()
    keys = [base, changed_config, changed_vocab, key(tok=tok_dir + "-not-a-folder"), key(name="ruler_cwe"),
            key(lengths=(1024,)), key(lengths=(2048, 1024)), key(samples=5), key(seed=43)]
    monkeypatch.setattr(lm_eval, "__version__", "0.0.0")
    keys.append(key(tok=tok_dir))
    assert changed_vocab != key(tok=tok_dir)  # the edit above did change tokenizer.json
    assert len(set(keys)) == len(keys), keys


@pytest.mark.parametrize("damage", ["truncated", "not json", "other fields", "no documents"])
def test_damaged_cache_file_is_not_trusted(tok_dir, ruler_cache, monkeypatch, damage):
    """A file cut short (a copy between machines that stopped half-way), or one that is not the
    documents of this key, must never be scored: the documents are generated again and the file replaced."""
    args = ("niah_single_1", tok_dir, (1024,), 2, 42)
    fresh = ruler.generate(*args)
    fields = ruler.cache_fields(*args)
    path = ruler.cache_path(fields)
    text = path.read_text(encoding="utf-8")
    other = {**json.loads(text), "fields": {**fields, "seed": 7}}
    path.write_text({"truncated": text[: len(text) // 2], "not json": "",
                     "other fields": json.dumps(other),
                     "no documents": json.dumps({"fields": fields, "documents": {"0": fresh[0]}})}[damage])
    calls = []
    generator = ruler._one_length
    monkeypatch.setattr(ruler, "_one_length", lambda *a: calls.append(a[2]) or generator(*a))
    ruler.generate.cache_clear()
    assert ruler.generate(*args) == fresh and calls == [1024]
    assert json.loads(path.read_text(encoding="utf-8")) == {"fields": fields, "documents": list(fresh)}


def _sleep_forever(*args):
    time.sleep(3600)


def _retry_forever(*args):
    """lm-eval's vt_utils.sys_vartrack_w_noise_random: `while True: try ... except: retry` swallows the
    alarm's exception too; bounded (~10 s) so that a watchdog that fails lets this test fail, not hang."""
    for _ in range(200):
        try:
            time.sleep(0.05)
        except:  # noqa: E722
            pass
    return [{"index": 0}]


@pytest.mark.parametrize("stuck", [_sleep_forever, _retry_forever])
def test_watchdog_stops_a_stuck_generation_and_restores_the_alarm(tok_dir, ruler_cache, monkeypatch, stuck):
    """A generator that never returns (ten sweep processes sat in ruler_vt for > 10 min) must become an
    error naming the task and the length, in about the limit; whatever SIGALRM handler, timer and trace
    function were there before (pytest-timeout uses SIGALRM) are there again afterwards."""
    monkeypatch.setenv("MLA_HARNESS_RULER_TIMEOUT", "1")
    monkeypatch.setattr(ruler, "_one_length", stuck)
    fired = []
    outer = signal.signal(signal.SIGALRM, lambda *a: fired.append(a))
    signal.setitimer(signal.ITIMER_REAL, 30)
    trace = sys.gettrace()
    start = time.monotonic()
    try:
        with pytest.raises(HarnessError, match=r"ruler_cwe: .* 2048 tokens .* retries forever .*harness.ruler build"):
            ruler.generate("ruler_cwe", tok_dir, (2048,), 1, 42)
        assert time.monotonic() - start < 2.5
        assert sys.gettrace() is trace
        assert signal.getsignal(signal.SIGALRM) is not outer and 25 < signal.getitimer(signal.ITIMER_REAL)[0] < 30
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        handler = signal.signal(signal.SIGALRM, outer)
    assert handler.__name__ == "<lambda>" and not fired
    assert not ruler_cache.exists()  # nothing kept from a failed generation


def test_watchdog_stops_lm_evals_own_endless_retry(tok_dir, tmp_path):
    """The real thing: lm-eval's variable tracking at 128 tokens never fits a document and retries
    forever. In a child process, so that a watchdog that fails ends in a failed test, not a hung run."""
    import os

    code = ("import sys, time\nfrom harness import ruler\nstart = time.monotonic()\n"
            f"try:\n    ruler.generate('ruler_vt', {tok_dir!r}, (128,), 1, 42)\n"
            "except ruler.HarnessError as err:\n    print(f'{time.monotonic() - start:.1f}', err)\n    sys.exit(3)\n")
    env = {**os.environ, "MLA_HARNESS_RULER_TIMEOUT": "2", "MLA_HARNESS_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 3, out.stderr[-2000:]
    seconds, message = out.stdout.strip().splitlines()[-1].split(" ", 1)
    assert float(seconds) < 6 and message.startswith("ruler_vt: generating its documents of 128 tokens")


def test_watchdog_limits_only_the_main_thread_and_can_be_off(monkeypatch):
    """SIGALRM reaches only the main thread (signal.signal elsewhere raises): a generation in another
    thread runs unlimited. 0 turns the limit off; a value that is not seconds is refused by name."""
    probe = (lambda: signal.getsignal(signal.SIGALRM))
    monkeypatch.setenv("MLA_HARNESS_RULER_TIMEOUT", "5")
    assert ruler._time_limited("t", 1, probe) is not signal.SIG_DFL  # armed here
    assert signal.getsignal(signal.SIGALRM) is signal.SIG_DFL and signal.getitimer(signal.ITIMER_REAL)[0] == 0
    got = []
    worker = threading.Thread(target=lambda: got.append(ruler._time_limited("t", 1, probe)))
    worker.start()
    worker.join()
    assert got == [signal.SIG_DFL]
    monkeypatch.setenv("MLA_HARNESS_RULER_TIMEOUT", "0")
    assert ruler._time_limited("t", 1, probe) is signal.SIG_DFL
    monkeypatch.setenv("MLA_HARNESS_RULER_TIMEOUT", "ten")
    with pytest.raises(HarnessError, match="MLA_HARNESS_RULER_TIMEOUT='ten' is not a number of seconds"):
        ruler._time_limited("t", 1, probe)


def test_build_cli_fills_the_cache_that_a_sweep_reads(tok_dir, ruler_cache, monkeypatch, capsys):
    """`python -m harness.ruler build` on a CPU box, then the task hook as lm-eval calls it in a sweep
    (metadata from the YAML and eval.task_metadata): it must find every document without generating."""
    argv = ["build", "--tokenizer", tok_dir, "--lengths", "1024,2048", "--samples", "2",
            "--tasks", "ruler_vt,niah_single_1"]
    assert ruler.main(argv) == 0
    out = capsys.readouterr().out
    files = sorted(ruler_cache.glob("*.json"))
    assert len(files) == 2 and all(str(f) in out for f in files) and "generated in" in out
    monkeypatch.setattr(ruler, "_one_length", _generator_must_not_run)
    ruler.generate.cache_clear()
    for task in ("ruler_vt", "niah_single_1"):
        rows = ruler.dataset(task, tokenizer=tok_dir, max_seq_lengths=[1024, 2048], num_samples=2, seed=42)["test"]
        assert [r["max_length"] for r in rows] == [1024, 2048, 1024, 2048]
    assert ruler.main(argv) == 0 and capsys.readouterr().out.count("cached already") == 2
    assert ruler.main(["build", "--tokenizer", tok_dir, "--lengths", "1024,x", "--samples", "2",
                       "--tasks", "ruler_tv"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--lengths '1024,x'" in err and "did you mean ruler_vt" in err


def test_build_resolves_a_model_spec_as_a_sweep_does(smollm_tokenizer, ruler_cache, monkeypatch):
    """`--tokenizer smollm2-135m` must give the key a sweep of that model gives: the sweep loads the
    model (harness.models.load_model) and hands RULER run_lm_eval's saved copy (tokenizer_dir)."""
    import harness.models

    loaded = []
    monkeypatch.setattr(harness.models, "load_model", lambda spec, **kw: loaded.append(spec) or (None, smollm_tokenizer))
    assert ruler.main(["build", "--tokenizer", "smollm2-135m", "--lengths", "1024", "--samples", "1",
                       "--tasks", "niah_single_1"]) == 0
    assert loaded == ["smollm2-135m"]
    sweep_metadata = {"tokenizer": str(tokenizer_dir(smollm_tokenizer)), "max_seq_lengths": [1024], "num_samples": 1,
                      "seed": 42}  # run_lm_eval's tokenizer, eval.task_metadata, the YAML's seed
    options = ruler._options("niah_single_1", sweep_metadata)
    assert [p.name for p in ruler_cache.glob("*.json")] == [ruler.cache_path(ruler.cache_fields("niah_single_1",
                                                                                               *options)).name]


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
