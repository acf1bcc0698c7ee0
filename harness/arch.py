"""Architecture adapters: where attention lives in each supported family, and what it looks like.

This is the only module that knows the layout of a model family (decoder layers, the q/k/v/o
projections, q/k-norm, biases, sliding windows); everything downstream works on `AttnLayer`
records. A new family whose attention has the q/k/v/o (+ optional q/k-norm) layout needs only its
`model_type` in `SUPPORTED_TYPES`; a different layout needs an adapter in `attention_layers`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from harness.errors import HarnessError

# HF model_type values whose attention the MLA module supports (same q/k/v/o layout).
SUPPORTED_TYPES = ("llama", "qwen2", "qwen3", "mistral", "gemma3_text")


@dataclass
class AttnLayer:
    """What the conversion needs to know about one attention layer."""

    index: int
    module: nn.Module  # the attention module (original or MLA)
    n_h: int  # query heads
    n_kv: int  # key/value heads
    d_h: int  # head dim
    hidden: int  # D, the k/v projection input width
    qk_norm: bool  # Qwen3 / Gemma3 normalise q and k per head before RoPE
    kv_bias: bool  # Qwen2 has biases on q/k/v
    sliding_window: int | None


def check_supported(model) -> None:
    mt = getattr(model.config, "model_type", None)
    if mt not in SUPPORTED_TYPES:
        raise HarnessError(
            f"model type '{mt}' is not supported yet; supported: {', '.join(SUPPORTED_TYPES)} "
            "(add an adapter in harness/models.py: where the decoder layers are and their attention)"
        )


def decoder_layers(model) -> nn.ModuleList:
    """The decoder layers of a supported causal LM (all supported families use model.model.layers)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise HarnessError(f"cannot find decoder layers in {type(model).__name__}; add an adapter in harness/models.py")
    return layers


def attention_layers(model) -> list[AttnLayer]:
    """One `AttnLayer` per decoder layer, in order."""
    check_supported(model)
    cfg = model.config
    n_h = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_h
    d_h = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_h
    out = []
    for i, layer in enumerate(decoder_layers(model)):
        attn = layer.self_attn
        q_proj = attn.q_proj
        out.append(AttnLayer(
            index=i, module=attn, n_h=n_h, n_kv=n_kv, d_h=d_h, hidden=cfg.hidden_size,
            qk_norm=hasattr(attn, "k_norm"), kv_bias=q_proj.bias is not None,
            sliding_window=getattr(attn, "sliding_window", None),
        ))
    return out


def lm_logits(model, hidden):
    """Logits from the last decoder layer's output: final norm, LM head, and Gemma's soft-capping."""
    logits = model.lm_head(model.model.norm(hidden))
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def weights_fingerprint(model) -> str:
    """A cheap, stable fingerprint of the k/v-relevant weights (for statistics cache keys)."""
    import hashlib

    h = hashlib.sha256()
    h.update(str(model.config.model_type).encode())
    h.update(str(model.config.num_hidden_layers).encode())
    # Every parameter feeds some layer's k/v input, so all are sampled (strided: cheap, and any
    # real change of weights, e.g. healing or another checkpoint, changes the samples).
    for name, p in model.named_parameters():
        t = p.detach().flatten()
        h.update(name.encode())
        h.update(t[:: max(1, t.numel() // 1024)].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
