"""mla-harness: convert GQA/MHA attention to multi-head latent attention and benchmark it.

    from harness import load_model
    model, tok = load_model("smollm2-135m")
"""
import os
from pathlib import Path


def cache_root() -> Path:
    """Content-addressed cache shared by every job: `$MLA_HARNESS_CACHE`, default ~/.cache/mla-harness."""
    return Path(os.environ.get("MLA_HARNESS_CACHE") or "~/.cache/mla-harness").expanduser()


def load_model(*args, **kwargs):
    """See `harness.models.load_model` (imported lazily: torch/transformers load on first use)."""
    from harness.models import load_model as _load

    return _load(*args, **kwargs)
