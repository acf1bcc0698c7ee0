"""Tiny seeded random models of every supported architecture (unit-test tier)."""
from __future__ import annotations

import torch

ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gemma3")
COMMON = dict(vocab_size=128, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=256, head_dim=32)


def tiny_model(arch: str, seed: int = 0, sliding: bool = False):
    """A 2-layer random model; D=128 >= 2*n_kv*d_h so every method can reach full rank."""
    import transformers as tf

    torch.manual_seed(seed)
    if arch == "llama":
        cfg, cls = tf.LlamaConfig(**COMMON), tf.LlamaForCausalLM
    elif arch == "qwen2":
        cfg, cls = tf.Qwen2Config(**COMMON), tf.Qwen2ForCausalLM
    elif arch == "qwen3":
        cfg, cls = tf.Qwen3Config(**COMMON), tf.Qwen3ForCausalLM
    elif arch == "mistral":
        cfg, cls = tf.MistralConfig(**COMMON, sliding_window=6 if sliding else None), tf.MistralForCausalLM
    elif arch == "gemma3":
        cfg = tf.Gemma3TextConfig(**COMMON, query_pre_attn_scalar=32, sliding_window=6 if sliding else 4096,
                                  layer_types=["sliding_attention", "full_attention"])
        cls = tf.Gemma3ForCausalLM
    else:
        raise ValueError(arch)
    model = cls(cfg).eval()
    if arch == "qwen2":  # make the k/v biases matter
        for layer in model.model.layers:
            torch.nn.init.normal_(layer.self_attn.k_proj.bias, std=0.5)
            torch.nn.init.normal_(layer.self_attn.v_proj.bias, std=0.5)
    return model


def tiny_stats(model, seed: int = 0):
    from harness.calibrate import collect_stats

    g = torch.Generator().manual_seed(seed)
    return collect_stats(model, torch.randint(0, 128, (8, 16), generator=g), batch_size=4, progress=False)
