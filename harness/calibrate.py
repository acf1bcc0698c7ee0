"""Activation statistics for the conversion methods, collected with forward hooks and cached.

One pass over calibration windows collects, per layer l (every tensor is a per-token mean, so a
mixture of calibrations is the token-weighted sum of the parts' fields, DESIGN §8):
    cov[l]          (D, D) float64   C_l = (1/N) sum_t x_t^T x_t, x = input of k_proj/v_proj
    abs_mean[l]     (D,)             mean |x| per channel (ASVD)
    q_pair_norm[l]  (n_h, d_h/2)     mean over tokens of the L2 norm of each pre-RoPE q pair (MHA2MLA)
    k_pair_norm[l]  (n_kv, d_h/2)    same for k
    x_mean[l]       (D,)             mean x (centred statistics)
    q_pair_sq[l]    (n_h, d_h/2)     mean squared norm of each pre-RoPE q pair (attention-aware K metric)
    k_jac_sq[l]     (n_kv, d_h)      mean squared diagonal Jacobian of the attention's key w.r.t. the k_proj
                                     output: gamma_j^2 / (mean_d k^2 + eps) under a k-norm, 1 without
    cross_cov[l]    (D, D) float64   only in sequential statistics (`collect_sequential`): E[x~ x^T] with
                                     x~ the input in the partially converted model and x the original's
    x_mean_ref[l]   (D,) float64     with cross_cov: E[x], the original's mean input (x_mean is then E[x~])
The result is cached under $MLA_HARNESS_CACHE/stats keyed by (model weights fingerprint, corpus,
n, seq_len, seed; and a hash of the text for a user corpus, so an edited file is recomputed), so
every method and budget of a sweep reuses one pass; a file lock makes concurrent jobs of one
(model, corpus) compute it once. Sequential statistics depend on the conversion of the earlier
layers too, so their key adds the method, budget and options.

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
from typing import Callable

import torch
import torch.nn.functional as F

from harness.paths import cache_root
from harness.errors import HarnessError
from harness.arch import attention_layers, decoder_layers, weights_fingerprint

STATS_VERSION = 2


@dataclass
class Stats:
    """Calibration statistics; every tensor field is a per-token mean over the calibration tokens."""

    cov: torch.Tensor  # (L, D, D) float64
    abs_mean: torch.Tensor  # (L, D)
    q_pair_norm: torch.Tensor  # (L, n_h, d_h/2)
    k_pair_norm: torch.Tensor  # (L, n_kv, d_h/2)
    n_tokens: int
    meta: dict = field(default_factory=dict)
    x_mean: torch.Tensor | None = None  # (L, D) float64
    q_pair_sq: torch.Tensor | None = None  # (L, n_h, d_h/2)
    k_jac_sq: torch.Tensor | None = None  # (L, n_kv, d_h)
    cross_cov: torch.Tensor | None = None  # (L, D, D) float64, sequential statistics only
    x_mean_ref: torch.Tensor | None = None  # (L, D) float64, with cross_cov

    @classmethod
    def tensor_fields(cls) -> list[str]:
        """Names of the tensor fields (the per-token means), in declaration order."""
        return [f.name for f in dataclasses.fields(cls) if f.name not in ("n_tokens", "meta")]

    def to(self, device) -> "Stats":
        """The same statistics on `device` (dtypes kept), every tensor field."""
        return dataclasses.replace(self, **{k: v.to(device) for k, v in self.tensors().items()})

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensor fields that are present."""
        return {k: getattr(self, k) for k in self.tensor_fields() if getattr(self, k) is not None}

    @classmethod
    def from_dict(cls, d: dict, meta: dict | None = None) -> "Stats":
        """Rebuild from a saved dict (fields missing from an older file stay None)."""
        return cls(**{k: d[k] for k in cls.tensor_fields() if k in d}, n_tokens=int(d["n_tokens"]),
                   meta=dict(meta or {}))

    def check(self) -> None:
        for name, t in self.tensors().items():
            if not torch.isfinite(t).all():
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


def _pairs(x: torch.Tensor, d_h: int) -> torch.Tensor:
    """x (N, heads*d_h) -> squared pair norms (N, heads, d_h/2), float32."""
    x = x.reshape(x.shape[0], -1, d_h).float()
    half = d_h // 2
    return x[..., :half] ** 2 + x[..., half:] ** 2


def _norm_gain(norm: torch.nn.Module, d_h: int, like: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(gamma (d_h,), eps) of an RMS norm, gamma read by probing with ones (Gemma's 1 + w included)."""
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
    gamma = norm(torch.ones(1, d_h, dtype=like.dtype, device=like.device)).float()[0] * (1.0 + eps) ** 0.5
    return gamma, eps


class _Sums:
    """Running sums of the statistics of every layer; `finish` turns them into per-token means."""

    def __init__(self, L: int, D: int, n_h: int, n_kv: int, d_h: int, cross: bool = False):
        f64 = dict(dtype=torch.float64)
        self.d_h, self.n_h, self.n_kv = d_h, n_h, n_kv
        self.cov = torch.zeros(L, D, D, **f64)
        self.absm = torch.zeros(L, D, **f64)
        self.xm = torch.zeros(L, D, **f64)
        self.qn = torch.zeros(L, n_h, d_h // 2, **f64)
        self.qs = torch.zeros(L, n_h, d_h // 2, **f64)
        self.kn = torch.zeros(L, n_kv, d_h // 2, **f64)
        self.kj = torch.zeros(L, n_kv, d_h, **f64)
        self.has_kj = torch.zeros(L, dtype=torch.bool)
        self.cross = torch.zeros(L, D, D, **f64) if cross else None
        self.xm_ref = torch.zeros(L, D, **f64) if cross else None

    def add(self, a, x: torch.Tensor) -> None:
        """Add the tokens x (N, D) seen by attention layer `a` (an AttnLayer with its original module)."""
        l, m, d_h = a.index, a.module, self.d_h
        xd = x.double()
        self.cov[l] += (xd.T @ xd).cpu()
        self.absm[l] += x.abs().sum(0).double().cpu()
        self.xm[l] += xd.sum(0).cpu()
        # functional calls: a hook on k_proj itself must not fire again
        q = F.linear(x, m.q_proj.weight, m.q_proj.bias)
        if a.qk_norm:  # pre-RoPE q/k as attention sees them: after the per-head norm
            q = m.q_norm(q.view(x.shape[0], -1, d_h)).reshape(x.shape[0], -1)
        pq = _pairs(q, d_h)
        self.qn[l] += pq.sqrt().sum(0).double().cpu()
        self.qs[l] += pq.sum(0).double().cpu()
        k = F.linear(x, m.k_proj.weight, m.k_proj.bias)
        if a.qk_norm:
            kh = k.view(x.shape[0], -1, d_h)
            gamma, eps = _norm_gain(m.k_norm, d_h, k)
            ms = kh.float().pow(2).mean(-1, keepdim=True) + eps  # (N, n_kv, 1)
            self.kj[l] += (gamma.pow(2) / ms).sum(0).double().cpu()
            self.has_kj[l] = True
            k = m.k_norm(kh).reshape(x.shape[0], -1)
        self.kn[l] += _pairs(k, d_h).sqrt().sum(0).double().cpu()

    def add_cross(self, l: int, x_conv: torch.Tensor, x_orig: torch.Tensor) -> None:
        self.cross[l] += (x_conv.double().T @ x_orig.double()).cpu()
        self.xm_ref[l] += x_orig.double().sum(0).cpu()

    def finish(self, n: int) -> Stats:
        kj = torch.where(self.has_kj[:, None, None], self.kj / n, torch.ones_like(self.kj))
        st = Stats(cov=self.cov / n, abs_mean=(self.absm / n).float(), q_pair_norm=(self.qn / n).float(),
                   k_pair_norm=(self.kn / n).float(), n_tokens=n, x_mean=self.xm / n,
                   q_pair_sq=(self.qs / n).float(), k_jac_sq=kj.float(),
                   cross_cov=None if self.cross is None else self.cross / n,
                   x_mean_ref=None if self.xm_ref is None else self.xm_ref / n)
        st.check()
        return st


def _sums_for(layers, cross: bool = False) -> _Sums:
    a = layers[0]
    return _Sums(len(layers), a.hidden, a.n_h, a.n_kv, a.d_h, cross)


@torch.no_grad()
def collect_stats(model, windows: torch.Tensor, batch_size: int = 8, progress: bool = True) -> Stats:
    """Run the model over `windows` (n, seq_len) and accumulate the statistics with hooks."""
    layers = attention_layers(model)
    D = layers[0].hidden
    sums = _sums_for(layers)
    handles = []

    def on_input(a):
        def hook(_mod, args):
            sums.add(a, args[0].reshape(-1, D))
        return hook

    for a in layers:
        handles.append(a.module.k_proj.register_forward_pre_hook(on_input(a)))
    device = next(model.parameters()).device
    n_tok = 0
    try:
        from tqdm.auto import tqdm

        batches = list(windows.split(batch_size))
        body = getattr(model, "model", model)  # the decoder stack: no logits (Gemma's are 262k wide)
        for b in tqdm(batches, desc="calibration statistics", disable=not progress, unit="batch"):
            body(input_ids=b.to(device), use_cache=False)
            n_tok += b.numel()
    finally:
        for h in handles:
            h.remove()
    return sums.finish(n_tok)


# ---------------------------------------------------------------------------------- sequential
class _Stop(Exception):
    """Raised by a hook to end a forward pass early (its inputs were all we needed)."""


class LayerRunner:
    """Run a model's decoder layers one at a time on cached hidden states.

    One forward per distinct batch size records the keyword arguments the model passes to each
    decoder layer (masks, RoPE tables: they depend only on the batch shape), and one truncated
    forward per batch records the input of layer 0. `run(l, h)` then applies decoder layer l with
    whatever attention module it holds at the time, so a caller can swap in a converted layer,
    run it, and swap the original back.
    """

    def __init__(self, model, windows: torch.Tensor, batch_size: int):
        self.model, self.decs = model, decoder_layers(model)
        self.device = next(model.parameters()).device
        self.batches = list(windows.split(batch_size))
        self._kwargs: dict[int, list[dict]] = {}
        for b in self.batches:
            if b.shape[0] not in self._kwargs:
                self._kwargs[b.shape[0]] = self._record_kwargs(b)

    def _record_kwargs(self, b: torch.Tensor) -> list[dict]:
        seen: list[dict] = [None] * len(self.decs)

        def catch(i):
            def hook(_mod, _args, kwargs):
                seen[i] = dict(kwargs)
            return hook

        hs = [d.register_forward_pre_hook(catch(i), with_kwargs=True) for i, d in enumerate(self.decs)]
        try:
            self.model(input_ids=b.to(self.device), use_cache=False)
        finally:
            for h in hs:
                h.remove()
        return seen

    def inputs(self) -> list[torch.Tensor]:
        """Layer 0's input hidden states, one tensor per batch."""
        out = []

        def catch(_mod, args, kwargs):
            out.append(args[0] if args else kwargs["hidden_states"])
            raise _Stop

        h = self.decs[0].register_forward_pre_hook(catch, with_kwargs=True)
        try:
            for b in self.batches:
                try:
                    self.model(input_ids=b.to(self.device), use_cache=False)
                except _Stop:
                    pass
        finally:
            h.remove()
        return out

    def run(self, l: int, h: torch.Tensor) -> torch.Tensor:
        out = self.decs[l](h, **self._kwargs[h.shape[0]][l])
        return out[0] if isinstance(out, tuple) else out

    def attention_input(self, a, h: torch.Tensor) -> torch.Tensor:
        """The k/v projection input (N, D) of attention layer `a` for hidden states h entering its decoder layer."""
        got = []

        def catch(_mod, args):
            got.append(args[0].reshape(-1, args[0].shape[-1]))
            raise _Stop

        hk = a.module.k_proj.register_forward_pre_hook(catch)
        try:
            self.run(a.index, h)
        except _Stop:
            pass
        finally:
            hk.remove()
        return got[0]


@torch.no_grad()
def collect_sequential(model, windows: torch.Tensor, convert_layer: Callable, *, target: str = "original",
                       batch_size: int = 8, progress: bool = True) -> Stats:
    """Statistics of every layer l collected on the model whose layers < l are already converted.

    Layer by layer over cached hidden states (about one extra forward over the windows, two with
    target "original"): collect layer l's statistics from the partially converted model's
    hidden states, call `convert_layer(l, stats)` (stats: the per-token means of layers <= l
    filled in) for the converted attention module of layer l, run layer l with it to get the
    next hidden states, and put the original module back. The model is unchanged afterwards.

    Args:
        convert_layer: (layer index, Stats) -> an attention module to use for that layer.
        target: "original" also propagates the original model's hidden states and records
            cross_cov = E[x~ x^T] (so a method can fit the original's K/V from the drifted
            input); "self" records only the drifted statistics.
    """
    if target not in ("original", "self"):
        raise HarnessError(f"unknown sequential target '{target}'; use original or self")
    layers = attention_layers(model)
    decs = decoder_layers(model)
    runner = LayerRunner(model, windows, batch_size)
    h_conv = runner.inputs()
    h_orig = list(h_conv) if target == "original" else None
    sums = _sums_for(layers, cross=target == "original")
    n_tok = sum(b.numel() for b in runner.batches)
    from tqdm.auto import tqdm

    for a in tqdm(layers, desc="sequential calibration", disable=not progress, unit="layer"):
        l = a.index
        for i, h in enumerate(h_conv):
            xc = runner.attention_input(a, h)
            sums.add(a, xc)
            if h_orig is not None:
                sums.add_cross(l, xc, runner.attention_input(a, h_orig[i]))
        st = sums.finish(n_tok)
        if h_orig is not None:
            h_orig = [runner.run(l, h) for h in h_orig]
        original = decs[l].self_attn
        decs[l].self_attn = convert_layer(l, st)
        try:
            h_conv = [runner.run(l, h) for h in h_conv]
        finally:
            decs[l].self_attn = original
    return sums.finish(n_tok)


def stats_key(model, spec: CalibSpec, extra: dict | None = None) -> str:
    ident = {"v": STATS_VERSION, "weights": weights_fingerprint(model), "corpus": spec.corpus,
             "n": spec.samples, "seq_len": spec.seq_len, "seed": spec.seed,
             "dtype": str(next(model.parameters()).dtype)}
    if extra:
        ident["extra"] = extra
    from harness.data import corpus_fingerprint

    content = corpus_fingerprint(spec.corpus)
    if content is not None:  # a user corpus: its text, not only its name (registered keys unchanged)
        ident["content"] = content
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _cached(model, tokenizer, spec: CalibSpec, compute: Callable, *, extra: dict | None, cache: bool) -> Stats:
    """Load the statistics of (model, spec, extra) from the cache, or compute(windows) and store them."""
    from filelock import FileLock

    from harness.data import adds_bos, is_mixture, token_windows

    if is_mixture(spec.corpus):
        return mixture_stats(model, tokenizer, spec, cache=cache, progress=progress)
    bos = adds_bos(tokenizer)
    if bos:  # windows start with BOS (keys of BOS-less tokenizers are what they always were)
        extra = {**(extra or {}), "bos": True}
    key = stats_key(model, spec, extra)
    folder = cache_root() / "stats"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key}.pt"
    meta = {"key": key, "corpus": spec.corpus, "samples": spec.samples, "seq_len": spec.seq_len, "seed": spec.seed,
            "bos": bos}
    with FileLock(str(path) + ".lock"):
        if cache and path.exists():
            d = torch.load(path, map_location="cpu", weights_only=True)
            st = Stats.from_dict(d, {**meta, "seconds": float(d["seconds"]), "cached": True})
            st.check()
            return st
        windows = token_windows(tokenizer, spec.corpus, "calib", spec.samples, spec.seq_len, spec.seed, bos=bos)
        t0 = time.perf_counter()
        st = compute(windows)
        secs = time.perf_counter() - t0
        st.meta = {**meta, "seconds": secs, "cached": False}
        if cache:
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save({**st.tensors(), "n_tokens": st.n_tokens, "seconds": secs}, tmp)
            os.replace(tmp, path)
        return st


def get_stats(model, tokenizer, spec: CalibSpec, *, cache: bool = True, progress: bool = True) -> Stats:
    """Statistics for (model, calibration spec): loaded from the cache or computed and stored.

    Returns:
        Stats, with meta {key, corpus, samples, seq_len, seed, seconds, cached}; a mixture
        (mix:a=w,...) is the token-weighted sum of its parts' statistics (`mixture_stats`).
    """
    from harness.data import is_mixture

    if is_mixture(spec.corpus):
        return mixture_stats(model, tokenizer, spec, cache=cache, progress=progress)
    return _cached(model, tokenizer, spec, lambda w: collect_stats(model, w, spec.batch_size, progress=progress),
                   extra=None, cache=cache)


def get_sequential_stats(model, tokenizer, spec: CalibSpec, convert_layer: Callable, *, conversion: dict,
                         target: str = "original", cache: bool = True, progress: bool = True) -> Stats:
    """Sequential statistics (`collect_sequential`), cached under a key that adds `conversion`:
    everything that decides how the earlier layers were converted (method, budget, options, widths)."""
    st = _cached(model, tokenizer, spec,
                 lambda w: collect_sequential(model, w, convert_layer, target=target,
                                              batch_size=spec.batch_size, progress=progress),
                 extra={"sequential": target, **conversion}, cache=cache)
    st.meta["sequential"] = target
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
