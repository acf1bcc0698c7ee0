"""The fused latent-decode kernel alone: launch configurations timed at (batch, context) points.

    python -m harness.bench --suite kernel --points 1,32768 16,16384 16,32768 64,4096 [--save-tuned]

Inputs are random tensors of one converted layer's shapes (built the way the gpu suite builds its
model: random Llama weights converted by mha2mla/`high`, care_mla's module shapes), laid out as the
StaticDecoder passes them (a shared latent, rotated RoPE keys, a keep mask and the filled length).
Per point: the previous fixed configuration (before this suite existed), then a coordinate search
over `decode_config.SEARCH_AXES` from the default rule; every configuration's output is checked
against `latent_decode_reference`. Timings: median of CUDA-event times with L2 overwritten before
each rep (in a decode step the other layers' caches evict this one). Bytes read = the latent and
RoPE-key rows of the filled slots plus the keep mask; share = that per second over the measured copy
bandwidth. `--save-tuned` writes each point's winner into harness/kernels/decode_tuned.json, the
table the kernel consults for this GPU model (commit it to make the winners the defaults).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict

import torch

TOL = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-5}


def layer_shapes(kv_save: float, shapes: dict, device: str, dtype, build) -> dict:
    """One converted layer's decode shapes, read off a 1-layer random model converted as the gpu suite does
    (`build` is the gpu suite's model builder, passed in: this module sits below harness.bench)."""
    from harness.mla import MLAAttention

    model = build("mha2mla", kv_save, "absorbed", device, dtype, 1, shapes)
    a = next(m for m in model.modules() if isinstance(m, MLAAttention))
    DRF = a.k_rope_proj.out_features if a.k_rope_proj is not None else 0
    out = {"H": a.num_heads, "n_kv": a.num_kv_heads, "DL": a.k_slice[1] - a.k_slice[0],
           "DV": a.v_slice[1] - a.v_slice[0], "DR": DRF // a.num_kv_heads, "shared": tuple(a.k_slice) == tuple(a.v_slice),
           "scale": float(a.scaling)}
    del model
    return out


def make_inputs(shape: dict, B: int, T: int, device: str, dtype, seed: int = 0) -> dict:
    """Random decode inputs for one layer, as the StaticDecoder passes them (S = T filled slots)."""
    g = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device=device, dtype=dtype)  # noqa: E731
    H, DL, DV, n_kv, DR = shape["H"], shape["DL"], shape["DV"], shape["n_kv"], shape["DR"]
    if shape["shared"]:
        c_k = c_v = r(B, T, DL)
    else:
        lat = r(B, T, DL + DV)
        c_k, c_v = lat[..., :DL], lat[..., DL:]
    return {"q_lat": r(B, H, DL) * 0.05, "q_rope": r(B, H, DR) * 0.3, "c_k": c_k, "c_v": c_v,
            "k_rope": r(B, T, n_kv * DR), "scale": shape["scale"],
            "keep": torch.ones(B, T, dtype=torch.bool, device=device), "kv_len": torch.tensor(T, device=device)}


def bytes_read(shape: dict, B: int, T: int, esize: int) -> int:
    """Cache bytes one call reads: latent (+ value part when separate) and RoPE keys of every filled
    slot, and the keep mask (1 byte a slot). Queries and partials are < 1% at these shapes and left out."""
    row = shape["DL"] + (0 if shape["shared"] else shape["DV"]) + shape["n_kv"] * shape["DR"]
    return B * T * (row * esize + 1)


def _time(fn, device: str, reps: int) -> float:
    if device == "cuda":
        from harness.kernels.latent_decode import time_ms

        return time_ms(fn, reps)
    fn()
    ts = []
    for _ in range(reps):  # the interpreter: wall time (checks the code path, measures nothing useful)
        t0 = time.perf_counter()
        fn()
        ts.append(1e3 * (time.perf_counter() - t0))
    return sorted(ts)[len(ts) // 2]


def old_fixed_config(B: int, S: int, sms: int):
    """The configuration the kernel used before it was tunable: one padded latent block, 32-token
    steps, 8 warps, 2 stages, splits = ceil(2 x SMs / B) but no split under 512 tokens."""
    from harness.kernels.decode_config import DecodeConfig

    splits = max(1, min(max(1, -(-2 * sms // B)), -(-S // 512)))
    return DecodeConfig(split_dl=False, num_splits=splits)


def tune_point(shape: dict, B: int, T: int, device: str, dtype, bandwidth: float, reps: int,
               axes=None) -> tuple[list[dict], dict]:
    """The coordinate search at one point: rows (one per configuration timed) and the winner's row."""
    from harness.kernels.decode_config import SEARCH_AXES, axis_candidates
    from harness.kernels.latent_decode import (_launch, _sm_count, latent_decode_reference, launched_config,
                                               rule_config, shape_key)

    x = make_inputs(shape, B, T, device, dtype)
    args = (x["q_lat"], x["q_rope"], x["c_k"], x["c_v"], x["k_rope"], x["scale"], x["keep"], x["kv_len"])
    ref = latent_decode_reference(*args).float()
    nbytes = bytes_read(shape, B, T, x["c_k"].element_size())
    tol = TOL[dtype]
    rows: list[dict] = []
    seen: dict = {}

    def run(cfg, role: str) -> dict | None:
        if cfg in seen:
            return seen[cfg]
        row = {"batch": B, "context": T, "role": role, "config": cfg.to_dict(), "name": cfg.name()}
        try:
            out = _launch(*args, cfg).float()
            used = launched_config(*args[:5], x["keep"], x["kv_len"], config=cfg)
            if used is not None and used != cfg:
                row["fell_back_to"] = used.name()  # too much shared memory: smaller tiles ran instead
            row["max_abs_err"] = (out - ref).abs().max().item()
            row["ok"] = bool(row["max_abs_err"] <= tol and torch.isfinite(out).all())
            row["ms"] = _time(lambda: _launch(*args, cfg), device, reps)
            row["GB_s"] = nbytes / row["ms"] / 1e6
            row["share_of_bw"] = nbytes / (row["ms"] / 1e3) / bandwidth
        except Exception as e:  # one configuration's failure is a row of the table, not the end of the search
            row["ok"], row["error"] = False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
        print(json.dumps(row), flush=True)
        rows.append(row)
        seen[cfg] = row
        return row

    run(old_fixed_config(B, T, _sm_count(x["c_k"].device)), "previous fixed")
    best = rule_config(x["q_lat"], x["c_k"], x["c_v"])
    best_row = run(best, "default rule")
    for axis, overrides in (axes or SEARCH_AXES):
        for cfg in axis_candidates(best, overrides, shape["H"]):
            r = run(cfg, f"search: {axis}")
            usable = r.get("ok") and "fell_back_to" not in r  # a fallback is timed as its own candidate
            if usable and (not best_row.get("ok") or "fell_back_to" in best_row or r["ms"] < best_row["ms"]):
                best, best_row = cfg, r
    key = shape_key(*args[:5])
    winner = {**best_row, "shape_key": asdict(key)}
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows, winner


def kernel_suite(points: list[tuple[int, int]], kv_save: float, device: str, shapes: dict, smoke: bool,
                 reps: int | None = None, save_tuned: bool = False, *, build, measure_bandwidth
                 ) -> tuple[str, list[dict]]:
    """All points: the JSON rows, then the report section (best per point vs the previous fixed config).
    `build` and `measure_bandwidth` are harness.bench's model builder and copy-bandwidth probe."""
    import platform

    from harness.kernels.decode_config import SEARCH_AXES, save_tuned as save

    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # the interpreter's bf16 tl.dot is wrong
    reps = reps or (30 if device == "cuda" else 1)
    bw = measure_bandwidth(device, 1024 if device == "cuda" else 64)
    shape = layer_shapes(kv_save, shapes, device, dtype, build)
    print(f"measured copy bandwidth {bw / 1e12:.3f} TB/s; layer shape {shape}", flush=True)
    axes = SEARCH_AXES
    if smoke:  # the interpreter is slow: one option per axis still runs every kernel variant's code
        axes = [(name, opts[-1:]) for name, opts in SEARCH_AXES]
    t0 = time.perf_counter()
    rows, winners = [], []
    for B, T in points:
        r, w = tune_point(shape, B, T, device, dtype, bw, reps, axes)
        rows += r
        winners.append(w)
    secs = time.perf_counter() - t0
    if save_tuned:
        save([{"shape": w["shape_key"], "config": w["config"], "ms": round(w["ms"], 4), "GB_s": round(w["GB_s"], 1)}
              for w in winners if w.get("ok")])
    name = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or "CPU") + " (Triton interpreter)"
    lines = [f"### Fused latent-decode kernel alone on {name} ({str(dtype).replace('torch.', '')}, one layer of "
             f"{'Llama-3.1-8B' if not smoke else 'smoke-test'} shapes at kv_save {kv_save}: H={shape['H']}, "
             f"n_kv={shape['n_kv']}, latent {shape['DL']}{'' if shape['shared'] else ' + ' + str(shape['DV'])}, "
             f"RoPE {shape['n_kv']}x{shape['DR']})", "",
             f"Measured copy bandwidth {bw / 1e12:.2f} TB/s. Bytes = latent + RoPE-key rows of the filled slots + "
             f"keep mask. Median of {reps} reps, L2 overwritten before each. {len(rows)} configurations timed in "
             f"{secs:.0f} s (compiles included); every one checked against the PyTorch reference "
             f"(max abs error <= {TOL[dtype]:g}).", "",
             "| batch | context | previous fixed ms | GB/s | best ms | GB/s | share of bandwidth | speed-up | best config | max abs err |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (B, T), w in zip(points, winners):
        old = next(r for r in rows if r["batch"] == B and r["context"] == T and r["role"] == "previous fixed")
        fmt = lambda r, k, f: format(r[k], f) if k in r else "-"  # noqa: E731
        speed = f"{old['ms'] / w['ms']:.2f}x" if "ms" in old and "ms" in w else "-"
        lines.append(f"| {B} | {T} | {fmt(old, 'ms', '.3f')} | {fmt(old, 'GB_s', '.0f')} | {fmt(w, 'ms', '.3f')} "
                     f"| {fmt(w, 'GB_s', '.0f')} | {100 * w.get('share_of_bw', math.nan):.0f}% | {speed} "
                     f"| `{w['name']}`{' (fell back: ' + w['fell_back_to'] + ')' if 'fell_back_to' in w else ''} "
                     f"| {fmt(w, 'max_abs_err', '.1e')} |")
    bad = [r for r in rows if not r.get("ok")]
    lines += ["", f"Configurations failing the parity check or erroring: {len(bad)}"
              + ("" if not bad else " (" + "; ".join(f"{r['batch']}x{r['context']} `{r['name']}`: "
                                                    f"{r.get('error') or 'err ' + format(r.get('max_abs_err', math.nan), '.1e')}"
                                                    for r in bad[:8]) + ")")]
    if save_tuned:
        lines.append("Winners saved to harness/kernels/decode_tuned.json (the kernel's table for this GPU model).")
    lines += ["", "All configurations timed: `--json` file."]
    return "\n".join(lines), rows
