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
def perplexity(model, windows: torch.Tensor, batch_size: int = 8, bos: bool = False) -> dict:
    """Token-weighted perplexity of `model` on `windows` (n, seq_len).

    With `bos` the windows carry the tokenizer's BOS in column 0 (`harness.data.token_windows`):
    the prediction made at the BOS position (of the first stream token) is not scored, so exactly
    the tokens scored without BOS are scored, now with the context the model was trained on.

    Returns:
        {"ppl": float, "nll": mean NLL per token, "tokens": predicted tokens,
         "nll_windows": mean NLL of each window (paired uncertainties of ratios between models)}
    """
    device = next(model.parameters()).device
    skip = 1 if bos else 0
    nll, count, per_window = 0.0, 0, []
    for b in windows.split(batch_size):
        b = b.to(device)
        logits = model(input_ids=b, use_cache=False).logits[:, skip:-1].float()
        tgt = b[:, 1 + skip:]
        losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none")
        losses = losses.view(tgt.shape)  # (batch, predicted tokens per window)
        nll += losses.sum().item()
        count += tgt.numel()
        per_window += losses.double().mean(1).tolist()
    mean = nll / count
    return {"ppl": math.exp(mean), "nll": mean, "tokens": count, "nll_windows": per_window}


def domain_perplexities(model, tokenizer, domains: list[str], spec: PplSpec = PplSpec()) -> dict[str, dict]:
    """Perplexity per corpus on its eval split; {domain: {ppl, nll, tokens, seconds, bos}}."""
    from harness.data import adds_bos, token_windows

    bos = adds_bos(tokenizer)
    out = {}
    for d in domains:
        w = token_windows(tokenizer, d, "eval", spec.samples, spec.seq_len, spec.seed, bos=bos)
        t0 = time.perf_counter()
        r = perplexity(model, w, spec.batch_size, bos=bos)
        r["seconds"] = time.perf_counter() - t0
        r["bos"] = bos
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
