"""The latent KV cache and a byte count of what any cache really holds.

`LatentCache` is a `DynamicCache`: MLA layers store their latent as the layer's "keys"
(B, 1, T, r) and their exact RoPE keys as the "values" (B, 1, T, n_kv*2p), so the bytes held are
exactly the accounted width x tokens x dtype size (sliding-window layers keep only their window,
as in the original). Pass one to `generate(**{CACHE_ARG: LatentCache(config=model.config)})`, or
let the model create a plain DynamicCache: both hold the same tensors. A transformers
`StaticCache` works the same way (preallocated: bytes = accounted width x slots x dtype size);
`harness.mla.static.StaticDecoder` decodes on one with each step captured as a CUDA graph.
"""
from __future__ import annotations

import transformers
from packaging.version import Version
from transformers import DynamicCache

# The keyword a model's forward and generate take the cache under. transformers 5.24 renamed
# `past_key_values` to `cache` (the old name warns, and goes in 5.40 / 6.0); the GPU image has 5.17.
CACHE_ARG = "cache" if Version(transformers.__version__).release >= (5, 24) else "past_key_values"


class LatentCache(DynamicCache):
    """A DynamicCache that reports the bytes its layers hold."""

    def bytes_held(self) -> int:
        return cache_bytes(self)


def cache_bytes(cache) -> int:
    """Bytes held by the tensors of a transformers cache (DynamicCache layout)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if t is not None and hasattr(t, "nbytes"):
                total += t.nbytes
    return total
