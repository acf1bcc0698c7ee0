"""Save and load converted models.

A converted directory holds
    config.json                  the base model's config with model_type "mla_harness" and the
                                 base type in "mla_base_model_type" (so a plain
                                 AutoModelForCausalLM.from_pretrained fails loudly instead of
                                 loading random k/v weights)
    mla_model.safetensors        the weights (state dict of the converted model; the name is not
                                 one transformers looks for, same reason)
    mla_conversion.json          method, options, budget, accounting and per-layer shapes
    tokenizer files

`harness.load_model(DIR)` rebuilds the base architecture, swaps in MLA modules of the recorded
shapes and loads the weights strictly.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from harness.errors import HarnessError

WEIGHTS = "mla_model.safetensors"
RECORD = "mla_conversion.json"


def save_converted(model, tokenizer, out: Path) -> None:
    """Write a converted model (atomically: into a temp dir renamed at the end)."""
    from safetensors.torch import save_file

    from harness.mla.convert import is_converted

    if not is_converted(model):
        raise HarnessError("save_converted needs a converted model; use model.save_pretrained for originals")
    out = Path(out)
    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    rec = model.config.mla_conversion
    cfg = model.config.to_dict()
    cfg.pop("mla_conversion", None)
    cfg["mla_base_model_type"] = cfg["model_type"]
    cfg["model_type"] = "mla_harness"
    cfg["architectures"] = ["MLAHarnessForCausalLM"]
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    (tmp / RECORD).write_text(json.dumps(rec, indent=2, default=str))
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    save_file(sd, str(tmp / WEIGHTS), metadata={"format": "pt", "producer": "mla-harness"})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)


def load_converted(path: Path, device=None, dtype=None):
    """Rebuild a converted model saved by `save_converted`; returns (model, tokenizer)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from harness.mla.convert import apply_conversion, empty_factors
    from harness.arch import attention_layers

    path = Path(path)
    if not (path / WEIGHTS).exists():
        raise HarnessError(f"{path} has {RECORD} but no {WEIGHTS}; re-run `mla-harness convert`")
    cfg = json.loads((path / "config.json").read_text())
    rec = json.loads((path / RECORD).read_text())
    base_type = cfg.pop("mla_base_model_type")
    cfg["model_type"] = base_type
    cfg.pop("architectures", None)
    config = AutoConfig.for_model(base_type, **{k: v for k, v in cfg.items() if k != "model_type"})
    dtype = dtype or torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    layers = attention_layers(model)
    a0 = layers[0]
    factors = [empty_factors(r, a0.hidden, a0.n_kv, a0.d_h) for r in rec["layers"]]
    apply_conversion(model, factors, {k: v for k, v in rec.items() if k not in ("layers", "path")},
                     path=rec.get("path", "reconstruct"))
    sd = load_file(str(path / WEIGHTS))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise HarnessError(f"{path}: weights do not match the recorded conversion "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]}); re-run `mla-harness convert`")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.to(device or "cpu").eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.config.mla_harness_source = str(path)
    return model, tok
