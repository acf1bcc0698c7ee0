"""One-shot refinements around a method that need the model, not only its statistics (DESIGN §13).

`calibrate_and_convert` runs these, in this order, when a method's options ask for them:
  1. `tune: [kv_scale, damping, ...]`: each named setting is picked, one after the other, from a
     fixed grid by the loss on held-out calibration windows (the windows of the calibration
     split right after the calibration windows: never evaluation data).
  2. `allocation: sensitivity`: per-layer widths from the measured effect of each layer's
     conversion on the loss: KL(original || model with only layer l converted) on held-out
     calibration windows at a few widths between the bounds, interpolated log-linearly, then
     widths given greedily where they cut the predicted loss most (exact budget, within bounds).
  3. `sequential: true`: statistics of layer l collected on the model whose layers < l are
     converted (`harness.calibrate.collect_sequential`), cached under a key with the method,
     budget and options; with target "original" the method fits the original's K/V from the
     drifted input (`_linalg.drift_target`).
Each step records what it chose in the conversion record.
"""
from __future__ import annotations

import contextlib
import hashlib
import heapq
import json
import math
import os
import time

import torch
import torch.nn.functional as F

from harness.errors import HarnessError

# Grids of the settings `tune` can pick (held-out calibration loss decides).
TUNE_GRIDS = {
    "key_metric": ["none", "query"],
    "kv_scale": [0.25, 0.5, 1.0, 2.0, 4.0],
    "damping": [0.001, 0.01, 0.1],
    "power": [0.5, 0.75, 1.0],
}
HELDOUT_WINDOWS = 8  # held-out calibration windows for tune (same seq_len as calibration)
SENSITIVITY_WINDOWS = 4  # the first of them, for the per-layer sensitivity probes
SENSITIVITY_POINTS = 2  # widths probed per layer, evenly spaced between the bounds (plus the mean width)


def check_shared_options(opts: dict) -> None:
    """Value checks of the options this module acts on."""
    seq = opts.get("sequential", False)
    if seq not in (False, True, "original", "self"):
        raise HarnessError(f"option sequential={seq!r} must be false, true (= original) or self")
    tune = opts.get("tune")
    if tune is not None:
        if isinstance(tune, str) or not all(t in TUNE_GRIDS for t in tune):
            raise HarnessError(f"option tune={tune!r} must be a list of settings from {', '.join(TUNE_GRIDS)}")
    w = opts.get("widths")
    if w is not None and not (isinstance(w, (list, tuple)) and all(
            isinstance(x, int) or (isinstance(x, (list, tuple)) and len(x) == 2) for x in w)):
        raise HarnessError("option widths must be a list with one width (or [r_k, r_v]) per layer")


def heldout_windows(tokenizer, calib, n: int = HELDOUT_WINDOWS) -> torch.Tensor:
    """n windows of the calibration split that follow the calibration windows (same stream, disjoint tokens)."""
    from harness.data import token_windows

    w = token_windows(tokenizer, calib.corpus, "calib", calib.samples + n, calib.seq_len, calib.seed)
    return w[calib.samples:]


@contextlib.contextmanager
def swapped(model, factors: dict):
    """Temporarily replace the attention of the layers in `factors` ({index: LayerFactors})."""
    from harness.arch import attention_layers, decoder_layers
    from harness.mla.convert import build_attention

    layers, decs = attention_layers(model), decoder_layers(model)
    orig = {}
    try:
        for i, f in factors.items():
            orig[i] = decs[i].self_attn
            decs[i].self_attn = build_attention(model, layers[i], f)
        yield model
    finally:
        for i, m in orig.items():
            decs[i].self_attn = m


@torch.no_grad()
def heldout_loss(model, windows: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token NLL of `model` on `windows`."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for b in windows.split(batch_size):
        b = b.to(device)
        logits = model(input_ids=b, use_cache=False).logits[:, :-1].float()
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1), reduction="sum").item()
        count += b[:, 1:].numel()
    return nll / count


def widths_of(factors) -> list:
    """Per-layer widths of a method's factors, as its `widths` option takes them back."""
    return [[f.info["r_k"], f.info["r_v"]] if "r_k" in f.info else int(f.down.shape[0]) for f in factors]


# ---------------------------------------------------------------------------------- 1. tune
def factors_of(method, layers, stats, budget, **opts):
    """method.fn with the statistics where the layers' weights are (`convert`'s rule: factor on the
    weights' device, float64 on CUDA too, never CPU statistics against GPU weights). A no-op move
    when they are there already (`refine` moves them once)."""
    return method.fn(layers, stats.to(next(layers[0].module.parameters()).device), budget, **opts)


def tune(model, layers, method, stats, budget, opts: dict, windows: torch.Tensor) -> tuple[dict, dict]:
    """Pick each setting in opts["tune"] from TUNE_GRIDS by held-out calibration loss (coordinate-wise)."""
    opts = dict(opts)
    fixed = {"tune": None, "sequential": False}
    if opts.get("allocation") == "sensitivity" and opts.get("widths") is None:
        fixed["allocation"] = "uniform"  # widths are measured after the settings are chosen
    rec = {"windows": list(windows.shape), "losses": {}, "chosen": {}}
    t0 = time.perf_counter()
    for name in opts["tune"]:
        losses = {}
        for v in TUNE_GRIDS[name]:
            factors = factors_of(method, layers, stats, budget, **{**opts, **fixed, name: v})
            with swapped(model, dict(enumerate(factors))):
                losses[v] = heldout_loss(model, windows)
        best = min(losses, key=losses.get)
        opts[name] = best
        rec["losses"][name] = {str(k): v for k, v in losses.items()}
        rec["chosen"][name] = best
    rec["seconds"] = time.perf_counter() - t0
    return opts, rec


# ---------------------------------------------------------------------------------- 2. sensitivity
def allocate_by_curves(curves: list[tuple[list[int], list[float]]], total: int, r_min: list[int],
                       r_max: list[int]) -> list[int]:
    """Widths w_l in [r_min_l, r_max_l] with sum exactly `total` that greedily minimise
    sum_l loss_l(w_l), loss_l interpolated log-linearly through its measured (widths, losses)
    (made non-increasing in w first). Exact for convex curves; always spends exactly `total`."""
    L = len(curves)
    if total < sum(r_min) or total > sum(r_max):
        raise HarnessError(f"width budget {total} cannot be spread over {L} layers within the bounds "
                           f"(sum of minima {sum(r_min)}, of maxima {sum(r_max)})")
    fns = []
    for ws, ls in curves:
        order = sorted(range(len(ws)), key=lambda i: ws[i])
        xs = [ws[i] for i in order]
        ys, run = [], math.inf
        for i in order:  # more width never predicts more loss
            run = min(run, max(ls[i], 1e-12))
            ys.append(math.log(run))
        fns.append((xs, ys))

    def loss(l: int, w: int) -> float:
        xs, ys = fns[l]
        if len(xs) == 1:
            return math.exp(ys[0])
        if w <= xs[0]:
            i = 0
        elif w >= xs[-1]:
            i = len(xs) - 2
        else:
            i = max(j for j in range(len(xs) - 1) if xs[j] <= w)
        t = (w - xs[i]) / (xs[i + 1] - xs[i])
        return math.exp(ys[i] + t * (ys[i + 1] - ys[i]))

    w = list(r_min)

    def gain(l: int) -> float:
        return loss(l, w[l]) - loss(l, w[l] + 1) if w[l] < r_max[l] else -math.inf

    heap = [(-gain(l), l) for l in range(L)]
    heapq.heapify(heap)
    for _ in range(total - sum(r_min)):
        _, l = heapq.heappop(heap)
        w[l] += 1
        heapq.heappush(heap, (-gain(l), l))
    return w


@torch.no_grad()
def measure_sensitivity(model, layers, method, stats, budget, opts: dict, windows: torch.Tensor,
                        probe: list[int], *, known: dict | None = None, exact_at: int | None = None,
                        on_layer=None, batch_size: int = 8) -> list[list[float]]:
    """KL(original || only layer l converted at width w) per token, for each layer l and w in probe.

    Runs layers l..L-1 from the original's cached hidden states at layer l, so a probe costs
    (L - l) / L of a forward pass. `known` {(l, w): kl} are reused (and filled in); a width equal
    to `exact_at` (full rank: the conversion is exact) is 0 without a probe. `on_layer(known)` is
    called after each layer (to save progress).
    """
    from harness.arch import decoder_layers, lm_logits
    from harness.calibrate import LayerRunner
    from harness.mla.convert import build_attention

    known = {} if known is None else known
    todo = [(a, w) for a in layers for w in probe if (a.index, w) not in known and w != exact_at]
    if todo:
        decs = decoder_layers(model)
        runner = LayerRunner(model, windows, batch_size)
        hs = [runner.inputs()]
        for l in range(len(layers)):
            hs.append([runner.run(l, h) for h in hs[-1]])
        ref = [F.log_softmax(lm_logits(model, h).float(), -1) for h in hs[-1]]
        ntok = sum(h.shape[0] * h.shape[1] for h in hs[-1])
        fixed = {"tune": None, "sequential": False, "allocation": "uniform"}
        for a in layers:
            l = a.index
            for w in probe:
                if (l, w) in known or w == exact_at:
                    continue
                f = factors_of(method, [a], stats, budget, **{**opts, **fixed, "widths": [w]})[0]
                orig = decs[l].self_attn
                decs[l].self_attn = build_attention(model, a, f)
                try:
                    kl = 0.0
                    for b, h in enumerate(hs[l]):
                        for j in range(l, len(layers)):
                            h = runner.run(j, h)
                        lp = F.log_softmax(lm_logits(model, h).float(), -1)
                        kl += float((ref[b].exp() * (ref[b] - lp)).sum())
                finally:
                    decs[l].self_attn = orig
                known[(l, w)] = kl / ntok
            if on_layer is not None:
                on_layer(known)
    return [[0.0 if w == exact_at else known[(a.index, w)] for w in probe] for a in layers]


# Options that do not change how one layer is factored at a given width (so not the probes' key).
_ALLOCATION_OPTIONS = ("allocation", "widths", "tune", "sequential", "bounds")


def sensitivity_widths(model, layers, method, stats, budget, opts: dict, windows: torch.Tensor) -> tuple[list, dict]:
    """Per-layer widths from measured sensitivities at the budget's bounds and mean width.

    Probes are cached per (layer, width) under $MLA_HARNESS_CACHE/sensitivity, keyed by the
    model, the calibration statistics, the held-out windows, the method and its factorization
    options, so another budget reuses the widths they share.
    """
    from harness import cache_root
    from harness.arch import weights_fingerprint
    from harness.mla.accounting import per_layer_width

    a0 = layers[0]
    w = per_layer_width(budget, a0.n_kv, a0.d_h)
    cap = min(2 * a0.n_kv * a0.d_h, a0.hidden)
    lo_f, hi_f = opts.get("bounds", (0.5, 2.0))
    r_min = max(1, int(w * lo_f))
    r_max = min(cap, max(w, int(w * hi_f)))
    n = SENSITIVITY_POINTS
    probe = sorted({round(r_min + (r_max - r_min) * i / (n - 1)) for i in range(n)} | {w})
    windows = windows[:SENSITIVITY_WINDOWS]
    ident = {"weights": weights_fingerprint(model), "stats": (stats.meta or {}).get("key"),
             "windows": hashlib.sha256(windows.contiguous().numpy().tobytes()).hexdigest()[:16],
             "method": method.name, "options": {k: v for k, v in opts.items() if k not in _ALLOCATION_OPTIONS}}
    key = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:20]
    path = cache_root() / "sensitivity" / f"{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    known = {}
    if path.exists():
        known = {tuple(map(int, k.split(","))): v for k, v in json.loads(path.read_text()).items()}
    n_known = len(known)

    def save(kn):
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps({f"{l},{ww}": v for (l, ww), v in kn.items()}))
        os.replace(tmp, path)

    t0 = time.perf_counter()
    kl = measure_sensitivity(model, layers, method, stats, budget, opts, windows, probe, known=known,
                             exact_at=cap, on_layer=save)
    L = len(layers)
    widths = allocate_by_curves([(probe, row) for row in kl], w * L, [r_min] * L, [r_max] * L)
    rec = {"probe_widths": probe, "kl": kl, "windows": list(windows.shape), "cache": str(path),
           "probes_reused": n_known, "seconds": time.perf_counter() - t0}
    return widths, rec


# ---------------------------------------------------------------------------------- 3. sequential
def sequential_stats(model, tokenizer, layers, method, stats, budget, calib, opts: dict, progress: bool = True):
    """Sequential statistics for the method at these options (widths fixed from the plain statistics)."""
    from harness.calibrate import get_sequential_stats
    from harness.mla.convert import build_attention

    target = "self" if opts["sequential"] == "self" else "original"
    fixed = {"tune": None, "sequential": False}
    widths = opts.get("widths") or widths_of(factors_of(method, layers, stats, budget, **{**opts, **fixed}))
    opts = {**opts, "widths": widths}

    def convert_layer(l, st):
        f = factors_of(method, [layers[l]], st, budget, **{**opts, **fixed, "widths": [widths[l]]})[0]
        return build_attention(model, layers[l], f)

    conversion = {"method": method.name, "budget": [budget.kv_save, budget.rank],
                  "options": {k: v for k, v in opts.items() if k != "tune"}}
    st = get_sequential_stats(model, tokenizer, calib, convert_layer, conversion=conversion, target=target,
                              progress=progress)
    return st, opts


def refine(model, tokenizer, method, budget, calib, stats, opts: dict, progress: bool = True):
    """Run the refinements opts ask for; returns (stats, opts, record entries)."""
    from harness.arch import attention_layers

    layers = attention_layers(model)
    stats = stats.to(next(model.parameters()).device)  # once here, not per candidate (see factors_of)
    extra = {}
    wants_sens = opts.get("allocation") == "sensitivity" and opts.get("widths") is None
    windows = heldout_windows(tokenizer, calib) if (opts.get("tune") or wants_sens) else None
    threads = torch.get_num_threads()
    with torch.no_grad():
        if opts.get("tune"):
            opts, extra["tuned"] = tune(model, layers, method, stats, budget, opts, windows)
        if wants_sens:
            widths, extra["sensitivity"] = sensitivity_widths(model, layers, method, stats, budget, opts, windows)
            opts = {**opts, "widths": widths}
        if opts.get("sequential"):
            t0 = time.perf_counter()
            stats, opts = sequential_stats(model, tokenizer, layers, method, stats, budget, calib, opts, progress)
            extra["sequential"] = {"target": stats.meta.get("sequential"), "key": stats.meta.get("key"),
                                   "cached": stats.meta.get("cached"), "seconds": time.perf_counter() - t0}
    torch.set_num_threads(threads)
    return stats, opts, extra
