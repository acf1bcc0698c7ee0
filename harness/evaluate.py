"""Scoring: per-domain perplexity on held-out windows, KV accounting, and lm-eval tasks.

    mla-harness eval --model smollm2-135m --ppl wiki,code --tasks arc_easy --limit 100 --json out.json

Perplexity is token-weighted over `eval`-split windows of each corpus (documents disjoint from
every calibration window), exp(total NLL / total predicted tokens). lm-eval scoring lives in
`harness.lmeval` (HFLM over the in-memory model) and is re-exported here.

Long-window perplexity (`long_perplexities`, 2k-8k tokens) feeds each window in chunks through a
KV cache, so a quantized cache (harness.kvquant) is really used: every chunk attends to the
cached (quantized) earlier chunks and to itself at full precision. Windows join a corpus's
documents with EOS (harness.data.token_windows): wiki paragraphs are ~100 tokens, so a wiki
window is many unrelated paragraphs; essays (prose) and stdlib modules (code) run to thousands.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from harness.mla.accounting import kv_summary
from harness.mla.cache import CACHE_ARG
from harness.mla.convert import layer_widths
from harness.arch import attention_layers


@dataclass(frozen=True)
class PplSpec:
    """Held-out windows for perplexity."""

    samples: int = 32
    seq_len: int = 256
    seed: int = 1
    batch_size: int = 8


_LOGITS_BYTES = 2 * 2**30  # bf16 logits of one forward pass in perplexity(), at most (one window at least)
_LOSS_POSITIONS = 256  # positions per float32 slice of the loss


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
    # The logits of a batch are (batch, seq_len, vocab): Gemma-3's 262k vocabulary makes 8 windows of 2048
    # tokens 8.6 GB in bf16 and twice that in float32, which ran twelve processes sharing a GPU out of
    # memory. So the forward pass takes as many windows as fit _LOGITS_BYTES (SmolLM2 keeps its 8) and the
    # loss is taken over slices of positions in float32; each token's loss is the same either way.
    vocab = model.get_output_embeddings().weight.shape[0]
    step = max(1, min(batch_size, _LOGITS_BYTES // (2 * windows.shape[1] * vocab)))
    for b in windows.split(step):
        b = b.to(device)
        logits = model(input_ids=b, use_cache=False).logits[:, skip:-1]
        tgt = b[:, 1 + skip:]
        losses = torch.cat([F.cross_entropy(logits[:, i:i + _LOSS_POSITIONS].float().reshape(-1, vocab),
                                            tgt[:, i:i + _LOSS_POSITIONS].reshape(-1), reduction="none")
                            .view(len(b), -1) for i in range(0, tgt.shape[1], _LOSS_POSITIONS)], dim=1)
        del logits
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
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # hand the logits' memory back to the processes sharing the GPU
    return out


@dataclass(frozen=True)
class LongPplSpec:
    """Long held-out windows, scored chunk by chunk through a KV cache."""

    seq_lens: tuple = (2048, 4096, 8192)
    samples: int = 4  # windows per domain and length
    seed: int = 1
    batch_size: int = 1
    chunk: int = 512  # tokens per forward pass; each attends to the cache of the earlier ones


@torch.no_grad()
def chunked_perplexity(model, windows: torch.Tensor, cache_factory: Callable[[], Any] | None = None,
                       batch_size: int = 1, chunk: int = 512, bos: bool = False) -> dict:
    """Token-weighted perplexity of `model` on `windows` (n, T), fed `chunk` tokens at a time.

    Chunk by chunk, with a fresh cache from `cache_factory` per batch (default: transformers'
    DynamicCache, which gives the single-pass perplexity up to float rounding); the logits of
    one chunk at a time are held, never (T, vocab). With `bos`, as in `perplexity`, the
    prediction made at the BOS position is not scored.

    Returns:
        {"ppl": float, "nll": mean NLL per token, "tokens": predicted tokens}
    """
    from transformers import DynamicCache

    factory = cache_factory or (lambda: DynamicCache(config=model.config))
    device = next(model.parameters()).device
    T = windows.shape[1]
    nll, count = 0.0, 0
    for b in windows.split(batch_size):
        b = b.to(device)
        cache = factory()
        for start in range(0, T - 1, chunk):
            end = min(start + chunk, T - 1)  # logits at start..end-1 predict tokens start+1..end
            logits = model(input_ids=b[:, start:end], **{CACHE_ARG: cache}, use_cache=True).logits.float()
            first = 1 if bos and start == 0 else 0
            tgt = b[:, start + 1 + first:end + 1]
            nll += F.cross_entropy(logits[:, first:].reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                   reduction="sum").item()
            count += tgt.numel()
    mean = nll / count
    return {"ppl": math.exp(mean), "nll": mean, "tokens": count}


def long_perplexities(model, tokenizer, domains: list[str], spec: LongPplSpec = LongPplSpec(),
                      cache_factory: Callable[[], Any] | None = None) -> dict[str, dict]:
    """Perplexity per corpus and window length: {"<domain>@<len>": {ppl, nll, tokens, seconds, bos}}.

    The same windows for every model (they depend only on the corpus, length, count, seed and
    tokenizer), so rows are compared on the same tokens.
    """
    from harness.data import adds_bos, token_windows

    bos = adds_bos(tokenizer)
    out = {}
    for d in domains:
        for seq_len in spec.seq_lens:
            w = token_windows(tokenizer, d, "eval", spec.samples, seq_len, spec.seed, bos=bos)
            t0 = time.perf_counter()
            r = chunked_perplexity(model, w, cache_factory, spec.batch_size, spec.chunk, bos)
            r.update(seconds=time.perf_counter() - t0, bos=bos)
            out[f"{d}@{seq_len}"] = r
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
