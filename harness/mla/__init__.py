"""The MLA attention module, its latent cache, KV accounting and persistence."""
from harness.mla.accounting import Budget, kv_summary, parity_rank, per_layer_width
from harness.mla.attention import MLAAttention
from harness.mla.cache import LatentCache, cache_bytes
from harness.mla.convert import accounted_width, apply_conversion, is_converted, set_path
from harness.mla.factors import LayerFactors, split_factors

__all__ = ["Budget", "kv_summary", "parity_rank", "per_layer_width", "MLAAttention", "LatentCache",
           "cache_bytes", "accounted_width", "apply_conversion", "is_converted", "set_path",
           "LayerFactors", "split_factors"]
