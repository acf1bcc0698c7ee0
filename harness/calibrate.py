"""Activation statistics for the conversion methods, collected with forward hooks and cached.

One pass over calibration windows collects, per layer l:
    cov[l]          (D, D) float64   C_l = (1/N) sum_t x_t^T x_t, x = input of k_proj/v_proj
    abs_mean[l]     (D,)             mean |x| per channel (ASVD)
    q_pair_norm[l]  (n_h, d_h/2)     mean over tokens of the L2 norm of each pre-RoPE q pair (MHA2MLA)
    k_pair_norm[l]  (n_kv, d_h/2)    same for k
The result is cached under $MLA_HARNESS_CACHE/stats keyed by (model weights fingerprint, corpus,
n, seq_len, seed; and a hash of the text for a user corpus, so an edited file is recomputed), so
every method and budget of a sweep reuses one pass; a file lock makes concurrent jobs of one
(model, corpus) compute it once.

Every tensor field of `Stats` is a per-token mean, so the statistics of a mixture of corpora are
the token-weighted sum of its parts' (`combine_stats`, DESIGN §8): a mixture (`mix:wiki=1,code=1`)
takes each part's cached statistics and needs no forward pass of its own.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from harness import cache_root
from harness.errors import HarnessError
from harness.arch import attention_layers, weights_fingerprint

STATS_VERSION = 1


@dataclass
class Stats:
    cov: torch.Tensor  # (L, D, D) float64
    abs_mean: torch.Tensor  # (L, D)
    q_pair_norm: torch.Tensor  # (L, n_h, d_h/2)
    k_pair_norm: torch.Tensor  # (L, n_kv, d_h/2)
    n_tokens: int
    meta: dict = field(default_factory=dict)

    def check(self) -> None:
        for name in ("cov", "abs_mean", "q_pair_norm", "k_pair_norm"):
            if not torch.isfinite(getattr(self, name)).all():
                raise HarnessError(
                    f"calibration statistic '{name}' contains NaN/inf ({self.meta}); the model "
                    "overflows on this data/dtype: calibrate in float32 (--dtype fp32) or on other data"
                )


@dataclass(frozen=True)
class CalibSpec:
    """Which windows calibrate a conversion."""

    corpus: str = "wiki"
    samples: int = 64
    seq_len: int = 256
    seed: int = 0
    batch_size: int = 8


def _pair_norm_sum(x: torch.Tensor, d_h: int) -> torch.Tensor:
    """x (N, heads*d_h) -> sum over tokens of pair norms (heads, d_h/2)."""
    x = x.reshape(x.shape[0], -1, d_h).float()
    half = d_h // 2
    return torch.sqrt(x[..., :half] ** 2 + x[..., half:] ** 2).sum(0).double().cpu()


@torch.no_grad()
def collect_stats(model, windows: torch.Tensor, batch_size: int = 8, progress: bool = True) -> Stats:
    """Run the model over `windows` (n, seq_len) and accumulate the statistics with hooks."""
    layers = attention_layers(model)
    L, D = len(layers), layers[0].hidden
    n_h, n_kv, d_h = layers[0].n_h, layers[0].n_kv, layers[0].d_h
    cov = torch.zeros(L, D, D, dtype=torch.float64)
    absm = torch.zeros(L, D, dtype=torch.float64)
    qn = torch.zeros(L, n_h, d_h // 2, dtype=torch.float64)
    kn = torch.zeros(L, n_kv, d_h // 2, dtype=torch.float64)
    handles = []

    def on_input(l):
        def hook(_mod, args):
            x = args[0].reshape(-1, D)
            xd = x.double()
            cov[l] += (xd.T @ xd).cpu()
            absm[l] += x.abs().sum(0).double().cpu()
        return hook

    def on_q(l):
        def hook(_mod, _args, out):
            qn[l] += _pair_norm_sum(out.reshape(-1, n_h * d_h), d_h)
        return hook

    def on_k(l):
        def hook(_mod, _args, out):
            kn[l] += _pair_norm_sum(out.reshape(-1, n_kv * d_h), d_h)
        return hook

    for a in layers:
        m = a.module
        handles.append(m.k_proj.register_forward_pre_hook(on_input(a.index)))
        # pre-RoPE q/k as attention sees them: after the per-head norm where the model has one
        handles.append((m.q_norm if a.qk_norm else m.q_proj).register_forward_hook(on_q(a.index)))
        handles.append((m.k_norm if a.qk_norm else m.k_proj).register_forward_hook(on_k(a.index)))
    device = next(model.parameters()).device
    n_tok = 0
    try:
        from tqdm.auto import tqdm

        batches = list(windows.split(batch_size))
        for b in tqdm(batches, desc="calibration statistics", disable=not progress, unit="batch"):
            # the decoder stack alone: the hooks see the same inputs, and the LM head (a fifth of
            # SmolLM2's FLOPs, an (n, seq_len, vocab) logits tensor) is not needed
            model.model(input_ids=b.to(device), use_cache=False)
            n_tok += b.numel()
    finally:
        for h in handles:
            h.remove()
    st = Stats(cov=cov / n_tok, abs_mean=(absm / n_tok).float(), q_pair_norm=(qn / n_tok).float(),
               k_pair_norm=(kn / n_tok).float(), n_tokens=n_tok)
    st.check()
    return st


def stats_key(model, spec: CalibSpec, bos: bool = False) -> str:
    ident = {"v": STATS_VERSION, "weights": weights_fingerprint(model), "corpus": spec.corpus,
             "n": spec.samples, "seq_len": spec.seq_len, "seed": spec.seed,
             "dtype": str(next(model.parameters()).dtype)}
    if bos:  # windows start with BOS (keys of BOS-less tokenizers are what they always were)
        ident["bos"] = True
    from harness.data import corpus_fingerprint

    content = corpus_fingerprint(spec.corpus)
    if content is not None:  # a user corpus: its text, not only its name (registered keys unchanged)
        ident["content"] = content
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]


def get_stats(model, tokenizer, spec: CalibSpec, *, cache: bool = True, progress: bool = True) -> Stats:
    """Statistics for (model, calibration spec): loaded from the cache or computed and stored.

    Returns:
        Stats, with meta {key, corpus, samples, seq_len, seed, seconds, cached}.
    """
    from filelock import FileLock

    from harness.data import adds_bos, is_mixture, token_windows

    if is_mixture(spec.corpus):
        return mixture_stats(model, tokenizer, spec, cache=cache, progress=progress)
    bos = adds_bos(tokenizer)
    key = stats_key(model, spec, bos)
    folder = cache_root() / "stats"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key}.pt"
    meta = {"key": key, "corpus": spec.corpus, "samples": spec.samples, "seq_len": spec.seq_len, "seed": spec.seed,
            "bos": bos}
    with FileLock(str(path) + ".lock"):
        if cache and path.exists():
            d = torch.load(path, map_location="cpu", weights_only=True)
            st = Stats(**{k: d[k] for k in ("cov", "abs_mean", "q_pair_norm", "k_pair_norm")},
                       n_tokens=int(d["n_tokens"]), meta={**meta, "seconds": float(d["seconds"]), "cached": True})
            st.check()
            return st
        windows = token_windows(tokenizer, spec.corpus, "calib", spec.samples, spec.seq_len, spec.seed, bos=bos)
        t0 = time.perf_counter()
        st = collect_stats(model, windows, spec.batch_size, progress=progress)
        secs = time.perf_counter() - t0
        st.meta = {**meta, "seconds": secs, "cached": False}
        if cache:
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save({"cov": st.cov, "abs_mean": st.abs_mean, "q_pair_norm": st.q_pair_norm,
                        "k_pair_norm": st.k_pair_norm, "n_tokens": st.n_tokens, "seconds": secs}, tmp)
            os.replace(tmp, path)
        return st


# ------------------------------------------------------------------------------------- mixtures
def combine_stats(parts: list[Stats], weights: list[float] | None = None) -> Stats:
    """Sum_i w_i S_i of statistics, field by field: every tensor field of `Stats` is a per-token
    mean, so with w_i the token shares (the default) this is exactly the statistics of all the
    parts' tokens together (DESIGN §8: C_mix = sum_i w_i C_i; same for |x| means and pair norms).

    Tensors are summed and returned in float64 (exact to rounding); n_tokens add up; any other
    field must agree across the parts.
    """
    if not parts:
        raise HarnessError("combine_stats needs at least one part")
    if weights is None:
        total = sum(p.n_tokens for p in parts)
        weights = [p.n_tokens / total for p in parts]
    assert len(weights) == len(parts), f"{len(weights)} weights for {len(parts)} parts"
    out = {}
    for f in dataclasses.fields(Stats):
        values = [getattr(p, f.name) for p in parts]
        if f.name == "meta":
            out[f.name] = {}
        elif f.name == "n_tokens":
            out[f.name] = sum(values)
        elif all(isinstance(v, torch.Tensor) for v in values):
            acc = torch.zeros_like(values[0], dtype=torch.float64)
            for w, v in zip(weights, values):
                acc += w * v.double()
            out[f.name] = acc
        elif all(v == values[0] for v in values[1:]):
            out[f.name] = values[0]
        else:
            raise HarnessError(f"statistics to mix differ in their field {f.name!r}: {values!r}")
    st = Stats(**out)
    st.check()
    return st


def mixture_stats(model, tokenizer, spec: CalibSpec, *, cache: bool = True, progress: bool = True) -> Stats:
    """Statistics of a mixture `spec.corpus` (mix:a=w_a,...): each part's own statistics on its share
    of the windows (`harness.data.mixture_counts`, the same seed), loaded from the cache or computed
    and cached per part, summed with the token shares. No forward pass when every part is cached.

    Returns:
        Stats, with meta {key, corpus, samples, seq_len, seed, bos, seconds, cached, parts}.
    """
    from harness.data import mixture_counts

    parts = [get_stats(model, tokenizer, dataclasses.replace(spec, corpus=corpus, samples=n), cache=cache,
                       progress=progress) for corpus, n in mixture_counts(spec.corpus, spec.samples)]
    st = combine_stats(parts)
    total = sum(p.n_tokens for p in parts)
    keys = [p.meta["key"] for p in parts]
    st.meta = {"key": hashlib.sha256(json.dumps(keys).encode()).hexdigest()[:20], "corpus": spec.corpus,
               "samples": spec.samples, "seq_len": spec.seq_len, "seed": spec.seed, "bos": parts[0].meta.get("bos"),
               "seconds": sum(p.meta["seconds"] for p in parts), "cached": all(p.meta["cached"] for p in parts),
               "parts": [{"corpus": p.meta["corpus"], "samples": p.meta["samples"], "key": p.meta["key"],
                          "token_share": p.n_tokens / total, "cached": p.meta["cached"]} for p in parts]}
    return st
