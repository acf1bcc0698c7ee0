"""Conversion methods, registered by name. Each is a plain function over tensors:

    fn(layers: list[AttnLayer], stats: Stats | None, budget: Budget, *, <options>) -> list[LayerFactors]

Options are the function's keyword-only arguments (their defaults are the paper defaults); a
sweep or the CLI passes them by name, and unknown names are an error before any compute.

Add a method: write `harness/methods/<name>.py` with a function decorated by
``@register("<name>")`` and import the module at the bottom of this file.
"""
from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from typing import Callable

from harness.errors import HarnessError
from harness.options import declared_options, option_problems, resolve_options


@dataclass
class Method:
    name: str
    fn: Callable
    needs_stats: bool | Callable[[dict], bool]  # or a function of the resolved options
    doc: str
    validate: Callable[[dict], None] | None = None  # value checks of the resolved options (HarnessError)

    def requires_stats(self, opts: dict) -> bool:
        """Whether calibration statistics are needed with these (resolved) options."""
        return self.needs_stats(opts) if callable(self.needs_stats) else self.needs_stats

    @property
    def options(self) -> dict:
        """Keyword-only options and their defaults."""
        return {k: o.default for k, o in declared_options(self.fn).items()}

    def option_problems(self, opts: dict) -> list[tuple[str, str]]:
        """Every problem of `opts` (unknown name, type, range, choices) as (option, message)."""
        return option_problems(self.fn, opts, f"method '{self.name}'")

    def check_options(self, opts: dict) -> dict:
        """`opts` with defaults filled in and values converted; one HarnessError naming every problem
        (types, ranges and choices from the signature, then the method's own `validate` of the whole)."""
        resolved = resolve_options(self.fn, opts, f"method '{self.name}'")
        if self.validate is not None:
            self.validate(resolved)
        return resolved


METHODS: dict[str, Method] = {}


def register(name: str, needs_stats: bool | Callable[[dict], bool] = True,
             validate: Callable[[dict], None] | None = None):
    def deco(fn):
        doc = (inspect.getdoc(fn) or "").split("\n")[0]
        METHODS[name] = Method(name=name, fn=fn, needs_stats=needs_stats, doc=doc, validate=validate)
        return fn
    return deco


def get_method(name: str) -> Method:
    if name not in METHODS:
        close = difflib.get_close_matches(name, list(METHODS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise HarnessError(f"unknown method '{name}'; known methods: {', '.join(sorted(METHODS))}.{hint}")
    return METHODS[name]


def convert(model, method: str, budget, stats=None, *, path: str = "reconstruct", **options):
    """Convert `model` in place to MLA with a registered method at a KV budget.

    Args:
        model: a supported causal LM with its original attention.
        method: registered name (see `METHODS`).
        budget: `harness.mla.Budget` (kv_save or rank).
        stats: calibration `Stats` (required by every method but `svd`).
        path: decode path of the MLA modules (reconstruct | absorbed).
        **options: the method's keyword options.
    Returns:
        the conversion record (method, options, budget, per-layer shapes, accounting).
    """
    import time

    from harness.mla.accounting import kv_summary
    from harness.mla.convert import apply_conversion
    from harness.arch import attention_layers

    m = get_method(method)
    opts = m.check_options(options)
    if m.requires_stats(opts) and stats is None:
        raise HarnessError(f"method '{method}' needs calibration statistics; give a calibration corpus")
    layers = attention_layers(model)
    if stats is not None:  # factor where the weights are (float64 on CUDA too): no device mixing
        stats = stats.to(next(model.parameters()).device)
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    # The factorizations are many small float64 LAPACK calls: one thread is as fast and avoids
    # OpenMP spin contention (seen: eigh of 576x576 in 0.03 s on 1 thread, 7 s on 2 busy cores).
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            factors = m.fn(layers, stats, budget, **opts)
    finally:
        torch.set_num_threads(threads)
    secs = time.perf_counter() - t0
    a0 = layers[0]
    acc = kv_summary([f.cache_width for f in factors], a0.n_kv, a0.d_h)
    record = {"method": method, "options": opts, "budget": {"kv_save": budget.kv_save, "rank": budget.rank},
              "accounting": acc, "factor_seconds": secs}
    apply_conversion(model, factors, record, path=path)
    return model.config.mla_conversion


def calibrate_and_convert(model, tokenizer, method: str, budget, calib, *, path: str = "reconstruct",
                          progress: bool = True, **options):
    """Load or collect the statistics the method needs with these options, then `convert`.

    Args:
        calib: a `harness.calibrate.CalibSpec` (used only when the method needs statistics).
    Options that need the model itself (`tune`, `allocation: sensitivity`, `sequential`; see
    harness/methods/_oneshot.py) are carried out here, before the conversion, and what they chose
    is recorded (entries "tuned", "sensitivity", "sequential").
    Returns:
        the conversion record; its "calibration" entry holds the statistics' meta when they were used.
    """
    from harness.calibrate import get_stats
    from harness.data import adds_bos
    from harness.methods._oneshot import refine

    m = get_method(method)
    opts = m.check_options(options)
    stats = get_stats(model, tokenizer, calib, progress=progress) if m.requires_stats(opts) else None
    extra = {}
    if stats is not None:
        stats, opts, extra = refine(model, tokenizer, m, budget, calib, stats, opts, progress=progress)
    record = convert(model, method, budget, stats, path=path, **opts)
    record["bos"] = adds_bos(tokenizer)  # calibration windows (and every scored window) start with BOS
    record.update(extra)
    if stats is not None:
        record["calibration"] = stats.meta
    return record


import torch  # noqa: E402

from harness.methods import svd, care, care_joint, mha2mla, asvd, svdllm, aware  # noqa: E402,F401  (fill the registry)
from harness.methods import care_mla  # noqa: E402,F401
