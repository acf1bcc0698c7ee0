"""Save -> load of converted models, and refusing the wrong loader."""
import copy

import pytest
import torch

from harness.errors import HarnessError
from harness.methods import convert
from harness.mla import Budget, set_path
from harness.mla.persist import save_converted
from harness.models import load_model
from tiny import tiny_model, tiny_stats


@pytest.mark.parametrize("arch,method,opts", [("llama", "mha2mla", {"rope_pairs": 2}), ("qwen2", "care", {}),
                                              ("gemma3", "care_joint", {}), ("qwen3", "mha2mla", {"rope_pairs": 4})])
def test_round_trip_identical_logits(tmp_path, smollm_tokenizer, arch, method, opts):
    base = tiny_model(arch)
    m = copy.deepcopy(base)
    convert(m, method, Budget(kv_save=0.5), tiny_stats(base), **opts)
    if method == "mha2mla" and arch == "llama":
        set_path(m, "absorbed")
    save_converted(m, smollm_tokenizer, tmp_path / "conv")
    loaded, tok = load_model(str(tmp_path / "conv"), device="cpu", dtype="fp32")
    x = torch.randint(0, 128, (2, 9))
    assert torch.equal(loaded(x).logits, m(x).logits)
    assert loaded.config.mla_conversion["layers"] == m.config.mla_conversion["layers"]
    assert loaded.config.mla_conversion["path"] == m.config.mla_conversion["path"]


def test_plain_from_pretrained_refuses_converted_dir(tmp_path, smollm_tokenizer):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    m = tiny_model("llama")
    convert(m, "care", Budget(kv_save=0.5), tiny_stats(m))
    save_converted(m, smollm_tokenizer, tmp_path / "conv")
    with pytest.raises((ValueError, OSError, KeyError)):
        AutoModelForCausalLM.from_pretrained(tmp_path / "conv")
    with pytest.raises((ValueError, OSError, KeyError)):
        LlamaForCausalLM.from_pretrained(tmp_path / "conv")


def test_save_needs_converted_model(tmp_path):
    with pytest.raises(HarnessError, match="converted"):
        save_converted(tiny_model("llama"), None, tmp_path / "x")
