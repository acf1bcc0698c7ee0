"""Tiny seeded random models of every supported architecture (unit-test tier)."""
from __future__ import annotations

import torch

ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gemma3")
COMMON = dict(vocab_size=128, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=256, head_dim=32)


def tiny_model(arch: str, seed: int = 0, sliding: bool = False, vocab_size: int = 128):
    """A 2-layer random model; D=128 >= 2*n_kv*d_h so every method can reach full rank."""
    import transformers as tf

    torch.manual_seed(seed)
    COMMON = {**globals()["COMMON"], "vocab_size": vocab_size}
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


def tiny_tokenizer(bos: bool):
    """A byte-level tokenizer (256 byte tokens + <bos> 256 + <eos> 257) that puts <bos> in front of
    every text by default when `bos` (like Gemma's and Llama-3's), or never (like SmolLM2's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"<bos>": 256, "<eos>": 257})
    t = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    if bos:
        t.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                         special_tokens=[("<bos>", 256)])
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<bos>", eos_token="<eos>", pad_token="<eos>")
