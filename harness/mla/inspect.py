"""`mla-harness inspect DIR|MODEL`: what a (converted) model caches, layer by layer."""
from __future__ import annotations

import torch

from harness.mla.attention import MLAAttention
from harness.mla.cache import CACHE_ARG, LatentCache, cache_bytes
from harness.arch import decoder_layers


@torch.no_grad()
def measured_cache_bytes(model, tokenizer, tokens: int = 64, prompt: str = "The history of the city") -> tuple[int, int]:
    """Generate `tokens` new tokens greedily; return (bytes held by the cache, tokens cached)."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(next(model.parameters()).device)
    cache = LatentCache(config=model.config)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
                         do_sample=False, **{CACHE_ARG: cache}, pad_token_id=tokenizer.pad_token_id)
    # the last generated token is returned but never fed back, so it is not cached
    return cache_bytes(cache), out.shape[1] - 1


def inspect_model(model, tok, tokens: int = 64) -> str:
    """Per-layer table of a (converted) model and its measured cache bytes after `tokens` generated tokens."""
    rec = getattr(model.config, "mla_conversion", None)
    lines = []
    if rec:
        lines.append(f"method {rec.get('method')} options {rec.get('options')} budget {rec.get('budget')} "
                     f"path {rec.get('path')}")
    lines.append(f"{'layer':>5s} {'latent':>6s} {'r_k':>5s} {'r_v':>5s} {'rope dims/head':>14s} {'width':>6s}")
    width = 0
    for i, d in enumerate(decoder_layers(model)):
        a = d.self_attn
        if isinstance(a, MLAAttention):
            rk = a.k_slice[1] - a.k_slice[0]
            rv = a.v_slice[1] - a.v_slice[0]
            rope = "all (rebuilt)" if a.rope_on_latent else str(a.rope_dims.shape[1])
            lines.append(f"{i:5d} {a.rank:6d} {rk:5d} {rv:5d} {rope:>14s} {a.cache_width:6d}")
            width += a.cache_width
        else:
            w = 2 * a.k_proj.out_features
            lines.append(f"{i:5d} {'-':>6s} {'-':>5s} {'-':>5s} {'all':>14s} {w:6d}")
            width += w
    esize = next(model.parameters()).element_size()
    held, T = measured_cache_bytes(model, tok, tokens)
    accounted = width * T * esize
    n_params = sum(p.numel() for p in model.parameters())
    lines.append(f"accounted: {width} elements/token = {width * esize} bytes/token; after generating, "
                 f"{T} cached tokens hold {held} bytes (accounted {accounted}: "
                 f"{'match' if held == accounted else 'MISMATCH (sliding-window layers keep only their window)'})")
    lines.append(f"parameters: {n_params:,}")
    return "\n".join(lines)
