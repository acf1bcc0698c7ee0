"""Where the harness keeps what it can recompute: one content-addressed cache root."""
import os
from pathlib import Path


def cache_root() -> Path:
    """Content-addressed cache shared by every job: `$MLA_HARNESS_CACHE`, default ~/.cache/mla-harness."""
    return Path(os.environ.get("MLA_HARNESS_CACHE") or "~/.cache/mla-harness").expanduser()
