"""Files and folders put into place atomically (harness.paths)."""
import pytest

from harness.paths import atomic_write_text, rename_into_place


def test_rename_into_place_keeps_a_complete_copy_and_refuses_an_incomplete_one(tmp_path):
    final = tmp_path / "abc"
    first, second = tmp_path / ".a.tmp", tmp_path / ".b.tmp"
    for d in (first, second):
        d.mkdir()
        (d / "manifest.json").write_text(d.name)
    (second / "extra").write_text("x")  # a non-empty folder: rename onto the first one fails
    rename_into_place(first, final, complete="manifest.json")
    rename_into_place(second, final, complete="manifest.json")  # lost the race: the first copy stays
    assert (final / "manifest.json").read_text() == ".a.tmp" and second.exists()
    (final / "partial").write_text("x")  # a non-empty folder there without its manifest: incomplete,
    (final / "manifest.json").unlink()  # so the rename's error stands
    with pytest.raises(OSError):
        rename_into_place(second, final, complete="manifest.json")


def test_atomic_write_text_leaves_no_temp_file(tmp_path):
    atomic_write_text(tmp_path / "r.md", "hello\n")
    assert [p.name for p in tmp_path.iterdir()] == ["r.md"] and (tmp_path / "r.md").read_text() == "hello\n"
