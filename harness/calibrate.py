"""Activation statistics for the conversion methods, collected with forward hooks and cached.

One pass over calibration windows collects, per layer l:
    cov[l]          (D, D) float64   C_l = (1/N) sum_t x_t^T x_t, x = input of k_proj/v_proj
    abs_mean[l]     (D,)             mean |x| per channel (ASVD)
    q_pair_norm[l]  (n_h, d_h/2)     mean over tokens of the L2 norm of each pre-RoPE q pair (MHA2MLA)
    k_pair_norm[l]  (n_kv, d_h/2)    same for k
The result is cached under $MLA_HARNESS_CACHE/stats keyed by (model weights fingerprint, corpus,
n, seq_len, seed), so every method and budget of a sweep reuses one pass; a file lock makes
concurrent jobs of one (model, corpus) compute it once.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from harness.paths import cache_root
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

    def to(self, device) -> "Stats":
        """The same statistics on `device` (float64 kept): methods factor where the weights live."""
        import dataclasses

        return dataclasses.replace(self, cov=self.cov.to(device), abs_mean=self.abs_mean.to(device),
                                   q_pair_norm=self.q_pair_norm.to(device), k_pair_norm=self.k_pair_norm.to(device))

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
    """x (N, heads*d_h) -> sum over tokens of pair norms (heads, d_h/2), float64 on x's device."""
    x = x.reshape(x.shape[0], -1, d_h).float()
    half = d_h // 2
    return torch.sqrt(x[..., :half] ** 2 + x[..., half:] ** 2).sum(0).double()


@torch.no_grad()
def collect_stats(model, windows: torch.Tensor, batch_size: int = 8, progress: bool = True) -> Stats:
    """Run the model over `windows` (n, seq_len) and accumulate the statistics with hooks.

    Everything accumulates in float64 on the model's device (one D x D matrix per layer: 80 MB for
    SmolLM2, 59 MB for Gemma-3-270M) and comes to the CPU once at the end. Only the decoder stack
    runs: no logits (a batch of Gemma's 262k-token vocabulary would be 8.6 GB in bf16).
    """
    layers = attention_layers(model)
    L, D = len(layers), layers[0].hidden
    n_h, n_kv, d_h = layers[0].n_h, layers[0].n_kv, layers[0].d_h
    device = next(model.parameters()).device
    cov = torch.zeros(L, D, D, dtype=torch.float64, device=device)
    absm = torch.zeros(L, D, dtype=torch.float64, device=device)
    qn = torch.zeros(L, n_h, d_h // 2, dtype=torch.float64, device=device)
    kn = torch.zeros(L, n_kv, d_h // 2, dtype=torch.float64, device=device)
    handles = []

    def on_input(l):
        def hook(_mod, args):
            x = args[0].reshape(-1, D)
            xd = x.double()
            cov[l] += xd.T @ xd
            absm[l] += xd.abs().sum(0)
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
    body = getattr(model, "model", model)  # the decoder stack of every supported family
    n_tok = 0
    try:
        from tqdm.auto import tqdm

        batches = list(windows.split(batch_size))
        for b in tqdm(batches, desc="calibration statistics", disable=not progress, unit="batch"):
            body(input_ids=b.to(device), use_cache=False)
            n_tok += b.numel()
    finally:
        for h in handles:
            h.remove()
    st = Stats(cov=(cov / n_tok).cpu(), abs_mean=(absm / n_tok).float().cpu(), q_pair_norm=(qn / n_tok).float().cpu(),
               k_pair_norm=(kn / n_tok).float().cpu(), n_tokens=n_tok)
    st.check()
    return st


def stats_key(model, spec: CalibSpec, bos: bool = False) -> str:
    ident = {"v": STATS_VERSION, "weights": weights_fingerprint(model), "corpus": spec.corpus,
             "n": spec.samples, "seq_len": spec.seq_len, "seed": spec.seed,
             "dtype": str(next(model.parameters()).dtype)}
    if bos:  # windows start with BOS (keys of BOS-less tokenizers are what they always were)
        ident["bos"] = True
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]


def get_stats(model, tokenizer, spec: CalibSpec, *, cache: bool = True, progress: bool = True) -> Stats:
    """Statistics for (model, calibration spec): loaded from the cache or computed and stored.

    Returns:
        Stats, with meta {key, corpus, samples, seq_len, seed, seconds, cached}.
    """
    from filelock import FileLock

    from harness.data import adds_bos, token_windows

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
