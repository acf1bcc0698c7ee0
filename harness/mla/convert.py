"""Swap a model's attention modules for MLA modules built from a method's factors."""
from __future__ import annotations

import inspect

import torch

from harness.mla.attention import MLAAttention
from harness.mla.factors import LayerFactors
from harness.arch import attention_layers, decoder_layers


def layer_record(f: LayerFactors) -> dict:
    """The shapes and index choices needed to rebuild a layer's module before loading weights."""
    return {
        "rank": int(f.down.shape[0]), "k_slice": list(f.k_slice), "v_slice": list(f.v_slice),
        "up_k_out": int(f.up_k.shape[0]), "up_v_out": int(f.up_v.shape[0]),
        "k_rope_out": int(f.k_rope.shape[0]) if f.k_rope is not None else 0,
        "rope_dims": f.rope_dims.tolist(), "latent_dims": f.latent_dims.tolist(),
        "rope_on_latent": bool(f.rope_on_latent), "k_bias": f.k_bias is not None,
        "v_bias": f.v_bias is not None, "cache_width": f.cache_width, **f.info,
    }


_SHAPE_KEYS = ("rank", "k_slice", "v_slice", "up_k_out", "up_v_out", "k_rope_out", "rope_dims", "latent_dims",
               "rope_on_latent", "k_bias", "v_bias", "cache_width")


def empty_factors(rec: dict, D: int, n_kv: int, d_h: int) -> LayerFactors:
    """Placeholder factors with a record's shapes (weights are loaded afterwards)."""
    z = torch.zeros
    kw, vw = rec["k_slice"][1] - rec["k_slice"][0], rec["v_slice"][1] - rec["v_slice"][0]
    return LayerFactors(
        down=z(rec["rank"], D), up_k=z(rec["up_k_out"], kw), up_v=z(rec["up_v_out"], vw),
        k_slice=tuple(rec["k_slice"]), v_slice=tuple(rec["v_slice"]),
        rope_dims=torch.tensor(rec["rope_dims"], dtype=torch.long).view(n_kv, -1),
        latent_dims=torch.tensor(rec["latent_dims"], dtype=torch.long).view(n_kv, -1),
        rope_on_latent=rec["rope_on_latent"],
        k_rope=z(rec["k_rope_out"], D) if rec["k_rope_out"] else None,
        k_bias=z(n_kv * d_h) if rec["k_bias"] else None, v_bias=z(n_kv * d_h) if rec["v_bias"] else None,
        info={k: v for k, v in rec.items() if k not in _SHAPE_KEYS},
    )


def build_attention(model, info, f: LayerFactors, path: str = "reconstruct") -> MLAAttention:
    """The MLA module of one layer (`info`: its AttnLayer, original module) bound to the model's RoPE."""
    rotary = model.model.rotary_emb
    layer_types = getattr(model.config, "layer_types", None)
    needs_type = "layer_type" in inspect.signature(rotary.forward).parameters  # Gemma3: local/global RoPE
    m = MLAAttention(info.module, f, n_h=info.n_h, n_kv=info.n_kv, d_h=info.d_h, path=path)
    m.bind_rotary(rotary, layer_types[info.index] if (needs_type and layer_types) else None)
    return m


def apply_conversion(model, factors: list[LayerFactors], record: dict | None = None, path: str = "reconstruct"):
    """Replace every layer's attention by an `MLAAttention` holding `factors[l]` (in place).

    Args:
        model: a supported causal LM (original attention).
        factors: one `LayerFactors` per layer.
        record: what to remember about the conversion (method, budget, ...); stored in
            ``model.config.mla_conversion`` together with the per-layer shapes.
        path: ``reconstruct`` or ``absorbed`` decode path.
    Returns:
        the same model, converted.
    """
    layers = attention_layers(model)
    assert len(factors) == len(layers), f"{len(factors)} factors for {len(layers)} layers"
    # Build every module first: a path that does not apply fails before any layer is swapped.
    mods = [build_attention(model, info, f, path) for info, f in zip(layers, factors)]
    for m, dec in zip(mods, decoder_layers(model)):
        dec.self_attn = m
    rec = dict(record or {})
    rec["layers"] = [layer_record(f) for f in factors]
    rec["path"] = path
    model.config.mla_conversion = rec
    return model


def set_path(model, path: str) -> None:
    """Switch every MLA layer between the reconstruct and absorbed decode paths."""
    for dec in decoder_layers(model):
        dec.self_attn.check_path(path)
    for dec in decoder_layers(model):
        dec.self_attn.path = path
    model.config.mla_conversion["path"] = path


def is_converted(model) -> bool:
    return any(isinstance(d.self_attn, MLAAttention) for d in decoder_layers(model))


def layer_widths(model) -> list[int]:
    """Cache width per token (elements) of each layer, from the modules themselves (DESIGN §2)."""
    return [d.self_attn.cache_width if isinstance(d.self_attn, MLAAttention) else 2 * d.self_attn.k_proj.out_features
            for d in decoder_layers(model)]


def accounted_width(model) -> int:
    """Sum over layers of the cache width per token (elements)."""
    return sum(layer_widths(model))
