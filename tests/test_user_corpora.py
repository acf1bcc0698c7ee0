"""User corpora (files, folders) and mixtures: loading, the disjoint split, windows, statistics, errors.

    .venv/bin/python -m pytest tests/test_user_corpora.py -q
"""
import json
import re
import os

import pandas as pd
import pytest
import torch

from harness import data
from harness.calibrate import CalibSpec, Stats, combine_stats, get_stats
from harness.errors import HarnessError
from tests.tiny import tiny_model, tiny_tokenizer

DOCS = [f"Document {i}: " + " ".join(f"word{(i * 7 + j) % 50}" for j in range(30)) for i in range(120)]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(bos=False)


def _write(tmp_path, kind: str, docs=DOCS) -> str:
    if kind == "txt":
        path = tmp_path / "notes.txt"
        path.write_text("\n\n  \n".join(docs) + "\n")  # blank lines (some with spaces) between documents
    elif kind == "jsonl":
        path = tmp_path / "rows.jsonl"
        path.write_text("".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs)) + "\n")
    elif kind == "parquet":
        path = tmp_path / "rows.parquet"
        pd.DataFrame({"body": docs}).to_parquet(path)
        return f"{path}#body"
    else:  # a folder: every .txt/.md/.py file is one document, other files and hidden folders are skipped
        path = tmp_path / "repo"
        for i, d in enumerate(docs):
            sub = path / f"part{i % 3}"
            sub.mkdir(parents=True, exist_ok=True)
            (sub / f"f{i}{('.txt', '.md', '.py')[i % 3]}").write_text(d)
        (path / "skip.csv").write_text("not a document")
        (path / ".git").mkdir()
        (path / ".git" / "x.txt").write_text("hidden")
    return str(path)


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet", "folder"])
def test_user_corpus_loads_and_splits_disjointly(tmp_path, kind):
    name = _write(tmp_path, kind)
    calib, evals = data.load_documents(name, "calib"), data.load_documents(name, "eval")
    assert sorted(calib + evals) == sorted(DOCS)  # every document once, nothing else (no csv, no hidden file)
    assert not set(calib) & set(evals)
    assert evals == [d for d in data.load_documents(name, "eval") if data._is_eval(d)]  # the shared hash rule
    assert all(data._is_eval(d) for d in evals) and not any(data._is_eval(d) for d in calib)
    if kind != "folder":  # file order is kept
        assert calib == [d for d in DOCS if not data._is_eval(d)]


def test_user_corpus_windows_are_deterministic(tmp_path, tok):
    name = _write(tmp_path, "txt")
    a = data.token_windows(tok, name, "calib", n=4, seq_len=64, seed=0)
    assert a.shape == (4, 64)
    assert torch.equal(a, data.token_windows(tok, name, "calib", n=4, seq_len=64, seed=0))
    assert not torch.equal(a, data.token_windows(tok, name, "calib", n=4, seq_len=64, seed=1))


def test_content_fingerprint_follows_the_text(tmp_path):
    name = _write(tmp_path, "txt")
    before = data.corpus_fingerprint(name)
    assert data.corpus_fingerprint(name) == before and data.corpus_fingerprint("wiki") is None
    with open(name, "a") as f:
        f.write("\n\nOne more document.\n")
    os.utime(name, ns=(1, 1))  # a new stamp even where mtime resolution is coarse
    assert data.corpus_fingerprint(name) != before
    assert "One more document." in data.load_documents(name, "calib") + data.load_documents(name, "eval")


def test_stats_key_holds_the_content(tmp_path, tok, monkeypatch):
    from harness.calibrate import stats_key

    model = tiny_model("llama", vocab_size=258)
    name = _write(tmp_path, "txt")
    spec = CalibSpec(name, samples=2, seq_len=16)
    k1 = stats_key(model, spec)
    (tmp_path / "notes.txt").write_text("\n\n".join(DOCS[:60]))
    os.utime(name, ns=(2, 2))
    assert stats_key(model, spec) != k1
    assert stats_key(model, CalibSpec("wiki", samples=2, seq_len=16)) == stats_key(model, CalibSpec("wiki", 2, 16))


@pytest.mark.parametrize("setup, message", [
    (lambda p: str(p / "nope.txt"), r"corpus path .*nope\.txt does not exist"),
    (lambda p: (p / "a.csv").write_text("x") and str(p / "a.csv"), r"unknown extension \.csv"),
    (lambda p: (p / "e.txt").write_text("\n \n\n") and str(p / "e.txt"), r"is empty: no non-blank documents"),
    (lambda p: (p / "d").mkdir() or str(p / "d"), r"corpus folder .* is empty"),
    (lambda p: (p / "r.jsonl").write_text('{"body": "x"}\n') and str(p / "r.jsonl"), r":1: no field 'text' \(has: body\)"),
    (lambda p: (p / "b.jsonl").write_text('{"text": "x"}\nnot json\n') and str(p / "b.jsonl"), r":2: not valid JSON"),
    (lambda p: "wikk", r"unknown corpus wikk; .*did you mean wiki\?"),
    (lambda p: "mix:wiki=1,code=0", r"the weight of code is '0'; give a number > 0"),
    (lambda p: "mix:wiki", r"part 'wiki' must look like corpus=weight"),
])
def test_bad_corpus_is_one_line(tmp_path, setup, message):
    name = setup(tmp_path)
    problem = data.check_corpus(name)
    assert problem is not None and "\n" not in problem
    assert re.search(message, problem), problem


def test_too_few_tokens_for_the_windows(tmp_path, tok):
    name = _write(tmp_path, "txt", DOCS[:40])
    with pytest.raises(HarnessError, match=r"has only \d+ tokens, fewer than n\*seq_len = 1000\*64"):
        data.token_windows(tok, name, "calib", n=1000, seq_len=64)


def test_a_split_without_documents(tmp_path):
    path = tmp_path / "one.txt"
    doc = next(d for d in DOCS if not data._is_eval(d))  # lands in calib
    path.write_text(doc)
    assert data.load_documents(str(path), "calib") == [doc]
    with pytest.raises(HarnessError, match=r"no documents in its 'eval' split \(1 documents in all"):
        data.load_documents(str(path), "eval")


def test_cli_bad_corpus_exits_2_with_one_line(tmp_path, capsys):
    from harness.cli import main

    (tmp_path / "empty.txt").write_text("")
    for argv in (["eval", "--model", "no-such-model", "--ppl", f"wiki,{tmp_path / 'missing.jsonl'}"],
                 ["convert", "--model", "no-such-model", "--method", "care", "--kv-save", "0.5",
                  "--calib", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "out")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        # one line naming the flag and the corpus, before the model (which does not exist) is looked at
        assert err.count("\n") == 0 and err.startswith(("error: --ppl: corpus", "error: --calib: corpus")), err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ mixtures
def test_mixture_names_are_canonical():
    assert data.corpus_name({"mix": {"wiki": 1, "code": 2.5}}) == "mix:code=2.5,wiki=1"
    assert data.corpus_name("mix: wiki=2, code=2.0") == "mix:code=2,wiki=2"
    assert data.corpus_name({"path": "a.jsonl", "field": "body"}) == "a.jsonl#body"
    assert data.split_corpus_list("wiki,mix:wiki=1,code=1,chat") == ["wiki", "mix:code=1,wiki=1", "chat"]
    with pytest.raises(HarnessError, match="a mapping is"):
        data.corpus_name({"mixture": {"wiki": 1}})


def test_mixture_counts_follow_the_weights():
    assert data.mixture_counts("mix:chat=1,code=1,math=1,prose=1,wiki=1", 64) == [
        ("chat", 13), ("code", 13), ("math", 13), ("prose", 13), ("wiki", 12)]
    assert data.mixture_counts("mix:code=3,wiki=1", 10) == [("code", 8), ("wiki", 2)]  # 7.5/2.5: tie -> first
    assert sum(n for _, n in data.mixture_counts("mix:a.txt=0.2,b.txt=0.3,c.txt=0.5", 7)) == 7
    with pytest.raises(HarnessError, match="get\\(s\\) 0 of 4 windows"):
        data.mixture_counts("mix:code=1,wiki=100", 4)


def test_mixture_windows_are_the_parts_own(tmp_path, tok):
    a, b = _write(tmp_path, "txt"), _write(tmp_path, "jsonl", DOCS[::-1])
    mix = data.corpus_name({"mix": {a: 1, b: 3}})
    w = data.token_windows(tok, mix, "calib", n=4, seq_len=32, seed=5)
    parts = data.mixture_counts(mix, 4)
    assert [p for p, _ in parts] == sorted([a, b]) and dict(parts) == {a: 1, b: 3}
    expected = torch.cat([data.token_windows(tok, p, "calib", k, 32, 5) for p, k in parts])
    assert torch.equal(w, expected)


def _stats(seed: int, n_tokens: int) -> Stats:
    g = torch.Generator().manual_seed(seed)
    return Stats(cov=torch.randn(2, 6, 6, dtype=torch.float64, generator=g), abs_mean=torch.rand(2, 6, generator=g),
                 q_pair_norm=torch.rand(2, 4, 3, generator=g), k_pair_norm=torch.rand(2, 2, 3, generator=g),
                 n_tokens=n_tokens)


def test_combine_stats_is_the_token_weighted_sum_of_every_tensor_field():
    parts = [_stats(0, 100), _stats(1, 300)]
    mixed = combine_stats(parts)
    assert mixed.n_tokens == 400
    tensor_fields = [f for f in Stats.__dataclass_fields__ if isinstance(getattr(parts[0], f), torch.Tensor)]
    assert set(tensor_fields) >= {"cov", "abs_mean", "q_pair_norm", "k_pair_norm"}
    for f in tensor_fields:
        want = 0.25 * getattr(parts[0], f).double() + 0.75 * getattr(parts[1], f).double()
        assert (getattr(mixed, f) - want).abs().max() < 1e-10, f


def test_mixture_statistics_reuse_the_parts_and_equal_their_weighted_sum(tmp_path, tok, monkeypatch):
    import harness.calibrate as calibrate

    monkeypatch.setenv("MLA_HARNESS_CACHE", str(tmp_path / "cache"))
    model = tiny_model("llama", vocab_size=258)
    a, b = _write(tmp_path, "txt"), _write(tmp_path, "jsonl", DOCS[::-1])
    mix = data.corpus_name({"mix": {a: 1, b: 3}})
    spec = CalibSpec(mix, samples=4, seq_len=16, seed=3, batch_size=2)
    part_stats = [get_stats(model, tok, CalibSpec(p, k, 16, 3, 2), progress=False) for p, k in data.mixture_counts(mix, 4)]

    def no_forward(*args, **kwargs):
        raise AssertionError("a mixture of cached parts ran a forward pass")

    monkeypatch.setattr(calibrate, "collect_stats", no_forward)
    mixed = get_stats(model, tok, spec, progress=False)
    assert mixed.meta["cached"] and [p["token_share"] for p in mixed.meta["parts"]] == [0.25, 0.75]
    for f in ("cov", "abs_mean", "q_pair_norm", "k_pair_norm"):
        want = 0.25 * getattr(part_stats[0], f).double() + 0.75 * getattr(part_stats[1], f).double()
        assert (getattr(mixed, f) - want).abs().max() < 1e-10, f
    monkeypatch.undo()
    # and it is the statistics of the mixture's windows, computed in one pass (cov in float64)
    direct = calibrate.collect_stats(model, data.token_windows(tok, mix, "calib", 4, 16, 3), 2, progress=False)
    assert (mixed.cov - direct.cov).abs().max() < 1e-10
    assert torch.allclose(mixed.abs_mean.float(), direct.abs_mean, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ hub datasets
def test_hub_corpus_reads_the_named_field(monkeypatch):
    from datasets import Dataset

    calls = []

    def fake(dataset, config, split):  # the hub is not reachable here: the loader's contract only
        calls.append((dataset, config, split))
        return Dataset.from_dict({"body": DOCS, "n": list(range(len(DOCS)))})

    monkeypatch.setattr(data, "_hf_dataset", fake)
    name = "hf:someone/notes:en@validation#body"
    docs = data.load_documents(name, "calib") + data.load_documents(name, "eval")
    assert sorted(docs) == sorted(DOCS) and calls[0] == ("someone/notes", "en", "validation")
    assert data._parse_hf("hf:ds") == ("ds", None, "train", "text")
    assert data.check_corpus("hf:other") is None  # checking a hub name never loads it
    with pytest.raises(HarnessError, match=r"no field 'text' \(has: body, n\)"):
        data.load_documents("hf:other", "calib")


def test_unreachable_hub_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data._hf_dataset.cache_clear()
    with pytest.raises(HarnessError) as err:
        data.load_documents("hf:no-such-user/no-such-dataset#text", "calib")
    msg = str(err.value)
    assert msg.startswith("corpus hf:no-such-user/no-such-dataset@train: could not load it (") and "\n" not in msg
    assert "HF_DATASETS_OFFLINE" in msg
