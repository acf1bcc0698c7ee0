"""Scoring: per-domain perplexity on held-out windows, KV accounting, and lm-eval tasks.

    mla-harness eval --model smollm2-135m --ppl wiki,code --tasks arc_easy --limit 100 --json out.json

Perplexity is token-weighted over `eval`-split windows of each corpus (documents disjoint from
every calibration window), exp(total NLL / total predicted tokens). lm-eval scoring lives in
`harness.lmeval` (HFLM over the in-memory model) and is re-exported here.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from harness.mla.accounting import kv_summary
from harness.mla.convert import layer_widths
from harness.arch import attention_layers


@dataclass(frozen=True)
class PplSpec:
    """Held-out windows for perplexity."""

    samples: int = 32
    seq_len: int = 256
    seed: int = 1
    batch_size: int = 8


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 8) -> dict:
    """Token-weighted perplexity of `model` on `windows` (n, seq_len).

    Returns:
        {"ppl": float, "nll": mean NLL per token, "tokens": predicted tokens}
    """
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for b in windows.split(batch_size):
        b = b.to(device)
        logits = model(input_ids=b, use_cache=False).logits[:, :-1].float()
        tgt = b[:, 1:]
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="sum").item()
        count += tgt.numel()
    mean = nll / count
    return {"ppl": math.exp(mean), "nll": mean, "tokens": count}


def domain_perplexities(model, tokenizer, domains: list[str], spec: PplSpec = PplSpec()) -> dict[str, dict]:
    """Perplexity per corpus on its eval split; {domain: {ppl, nll, tokens, seconds}}."""
    from harness.data import token_windows

    out = {}
    for d in domains:
        w = token_windows(tokenizer, d, "eval", spec.samples, spec.seq_len, spec.seed)
        t0 = time.perf_counter()
        r = perplexity(model, w, spec.batch_size)
        r["seconds"] = time.perf_counter() - t0
        out[d] = r
    return out


def kv_accounting(model) -> dict:
    """Accounted cache width (elements per token over all layers) and KV save of a model."""
    a0 = attention_layers(model)[0]
    acc = kv_summary(layer_widths(model), a0.n_kv, a0.d_h)
    dtype_bytes = next(model.parameters()).element_size()
    acc["bytes_per_token"] = acc["cache_width"] * dtype_bytes
    return acc


def run_lm_eval(*args, **kwargs):
    """lm-eval scoring of an in-memory model (see harness.lmeval.run_lm_eval)."""
    from harness.lmeval import run_lm_eval as _run

    return _run(*args, **kwargs)
