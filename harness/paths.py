"""Where the harness keeps what it can recompute (one content-addressed cache root), and how it puts
a file or folder there: written aside, then renamed into place, so a reader never sees half of one
and a killed process leaves only a dot-file behind."""
import os
from pathlib import Path


def cache_root() -> Path:
    """Content-addressed cache shared by every job: `$MLA_HARNESS_CACHE`, default ~/.cache/mla-harness."""
    return Path(os.environ.get("MLA_HARNESS_CACHE") or "~/.cache/mla-harness").expanduser()


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temp file in the same folder, renamed into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_figure(fig, path: Path, dpi: int = 110) -> Path:
    """Write a matplotlib figure to `path` atomically (its folder made) and close the figure."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=dpi)
    finally:
        plt.close(fig)
    os.replace(tmp, path)
    return path


def rename_into_place(tmp: Path, final: Path, complete: str | None = None) -> None:
    """Move the folder built at `tmp` to `final`. Where a concurrent process got there first, keep its
    folder (the names are content-addressed: it holds the same content) if it is complete, i.e. is
    a folder, or holds the file `complete` when given; otherwise the rename's error stands."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not ((Path(final) / complete).exists() if complete else Path(final).is_dir()):
            raise
