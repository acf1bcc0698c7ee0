"""mla-harness: convert GQA/MHA attention to multi-head latent attention and benchmark it.

    from harness import load_model
    model, tok = load_model("smollm2-135m")
"""
from harness.paths import cache_root  # noqa: F401  (re-exported for users)


def load_model(*args, **kwargs):
    """See `harness.models.load_model` (imported lazily: torch/transformers load on first use)."""
    from harness.models import load_model as _load

    return _load(*args, **kwargs)
