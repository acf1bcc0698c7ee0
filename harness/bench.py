"""Performance benchmarks (not tests): conversion cost, decode speed and memory, cache bytes.

    python -m harness.bench                      # CPU suite on SmolLM2 -> results/bench/REPORT.md
    python -m harness.bench --suite gpu          # GPU suite: random Llama-3.1-8B shapes
    python -m harness.bench --suite cpu --contexts 2048,8192 --new-tokens 32
    python -m harness.bench --suite kernel --points 1,32768 16,32768   # the decode kernel's launch configs

Every figure is reported beside the original model's, measured in the same run. CPU decode
measurements run in fresh subprocesses; peak memory is the rise of the process's peak RSS over
prefill + decode (Linux VmHWM, reset just before), or the CUDA allocator's peak on GPU.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from harness.paths import atomic_write_text

REPORT = Path("results/bench/REPORT.md")

# ----------------------------------------------------------------------------- model builders


def _smollm(method: str | None, kv_save: float, path: str, device: str, dtype):
    from harness.calibrate import CalibSpec, get_stats
    from harness.methods import convert
    from harness.mla import Budget
    from harness.models import load_model

    model, tok = load_model("smollm2-135m", device=device, dtype=dtype)
    if method:
        stats = get_stats(model, tok, CalibSpec("wiki", 64, 256), progress=False)
        opts = {"allocation": "uniform"} if method == "care" else {}
        convert(model, method, Budget(kv_save=kv_save), stats, path=path, **opts)
    return model


LLAMA_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128)
# A few-MB Llama with the same structure: `--shapes smoke` runs the GPU suite's code path on CPU in seconds.
SMOKE = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_attention_heads=8,
             num_key_value_heads=2, head_dim=32)


def _llama_shapes(method: str | None, kv_save: float, path: str, device: str, dtype, layers: int,
                  shapes: dict = LLAMA_8B):
    """Random weights with Llama-3.1-8B's shapes (speed/memory only: they do not depend on the values)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**shapes, num_hidden_layers=layers, rope_theta=500000.0, max_position_embeddings=131072,
                      tie_word_embeddings=False)
    with torch.device(device):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    if method:
        _convert_for_speed(model, method, kv_save, path)
    return model


def _convert_for_speed(model, method: str, kv_save: float, path: str) -> dict:
    """Convert random-weight models without calibration statistics (speed and memory need none):
    mha2mla with the `high` pair selection has exactly care_mla's module shapes (same RoPE keys,
    same shared latent width); svd stands for the split-latent methods."""
    from harness.methods import convert
    from harness.mla import Budget

    opts = {"selection": "high"} if method == "mha2mla" else {}
    return convert(model, "mha2mla" if method == "mha2mla" else "svd", Budget(kv_save=kv_save), None, path=path,
                   **opts)




# ----------------------------------------------------------------------------- one measurement
@torch.no_grad()
def decode_once(cfg: dict, model=None) -> dict:
    """Prefill `context` tokens, then greedily decode `new_tokens`; time and memory."""
    from harness.mla import LatentCache
    from harness.mla.cache import CACHE_ARG, cache_bytes

    device = cfg["device"]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg["dtype"]]
    if model is None and cfg["model"] == "smollm2-135m":
        model = _smollm(cfg["method"], cfg["kv_save"], cfg["path"], device, dtype)
    elif model is None:
        model = _llama_shapes(cfg["method"], cfg["kv_save"], cfg["path"], device, dtype, cfg["layers"])
    B, T, N = cfg["batch"], cfg["context"], cfg["new_tokens"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(model.config.vocab_size, 32000), (B, T), generator=g).to(device)
    model(input_ids=ids[:, :16], use_cache=False, logits_to_keep=1)  # page in lazily loaded weights
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
    else:
        base_mem = _reset_peak_rss()
    cache = LatentCache(config=model.config)
    chunk = cfg.get("prefill_chunk", 4096)
    t0 = time.perf_counter()
    for s in range(0, T, chunk):  # chunked prefill keeps activations small at long context
        out = model(input_ids=ids[:, s:s + chunk], **{CACHE_ARG: cache}, use_cache=True, logits_to_keep=1)
    nxt = out.logits[:, -1:].argmax(-1)
    if device == "cuda":
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    for _ in range(N):
        out = model(input_ids=nxt, **{CACHE_ARG: cache}, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1:].argmax(-1)
    if device == "cuda":
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    res = {**cfg, "prefill_s": t1 - t0, "decode_tok_s": B * N / (t2 - t1), "cache_bytes": cache_bytes(cache),
           "cache_bytes_per_token": cache_bytes(cache) / (B * (T + N))}
    if device == "cuda":
        res["peak_mem_bytes"] = torch.cuda.max_memory_allocated() - base_mem
    else:
        res["peak_mem_bytes"] = _peak_rss() - base_mem
    return res


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> int:
    """Reset the process's peak RSS (Linux clear_refs 5) and return the current RSS in bytes.

    The decode's peak is then measured over inference alone, not the model load before it.
    """
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") * 1024


def _peak_rss() -> int:
    return _status_kib("VmHWM") * 1024


def _subprocess(cfg: dict) -> dict:
    """Run `decode_once(cfg)` in a fresh interpreter (clean peak memory)."""
    code = "import json,sys; from harness.bench import decode_once; print('RESULT'+json.dumps(decode_once(json.loads(sys.argv[1]))))"
    p = subprocess.run([sys.executable, "-c", code, json.dumps(cfg)], capture_output=True, text=True)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT"):
            return json.loads(line[6:])
    raise RuntimeError(f"bench subprocess failed for {cfg}:\n{p.stderr[-3000:]}")


def measure_bandwidth(device: str, mib: int = 1024) -> float:
    """Memory bandwidth in bytes/s from a large copy (bytes read + written)."""
    n = mib * 2**20 // 4
    a = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(5):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        b.copy_(a)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * a.nbytes / best


def add_floor(r: dict, weight_bytes: int, bandwidth: float) -> dict:
    """Memory-bound decode floor: each step reads the weights once and the whole cache."""
    step_bytes = weight_bytes + r["cache_bytes"]
    r["floor_tok_s"] = r["batch"] * bandwidth / step_bytes
    r["cache_read_ms_per_step"] = 1e3 * r["cache_bytes"] / bandwidth
    return r


# ----------------------------------------------------------------------------- conversion cost
@torch.no_grad()
def conversion_cost(samples: int = 64, seq_len: int = 256) -> list[dict]:
    """Wall time of statistics collection and of each method's factorization vs one forward pass."""
    from harness.calibrate import collect_stats
    from harness.data import token_windows
    from harness.methods import convert
    from harness.mla import Budget
    from harness.models import load_model

    model, tok = load_model("smollm2-135m", device="cpu", dtype="fp32")
    w = token_windows(tok, "wiki", "calib", samples, seq_len, 0)
    t0 = time.perf_counter()
    for b in w.split(8):
        model(input_ids=b, use_cache=False)
    fwd = time.perf_counter() - t0
    t0 = time.perf_counter()
    stats = collect_stats(model, w, 8, progress=False)
    st = time.perf_counter() - t0
    rows = [{"what": "forward pass (reference)", "seconds": fwd},
            {"what": "statistics collection (forward + hooks)", "seconds": st}]
    for method, opts in [("svd", {}), ("care", {"allocation": "uniform"}), ("care", {"allocation": "waterfill"}),
                         ("care_joint", {}), ("mha2mla", {}), ("asvd", {}), ("svdllm", {})]:
        m = copy.deepcopy(model)
        rec = convert(m, method, Budget(kv_save=0.5), stats, **opts)
        name = method + (f"({opts['allocation']})" if opts else "")
        total = st + rec["factor_seconds"] if method != "svd" else rec["factor_seconds"]
        rows.append({"what": f"factorization: {name}", "seconds": rec["factor_seconds"],
                     "conversion_total_s": total, "ratio_to_forward": total / fwd})
        del m
    return rows


# ----------------------------------------------------------------------------- eval throughput
def eval_throughput(task: str = "arc_easy", limit: int = 40, batch_size: int = 8) -> list[dict]:
    """lm-eval requests/s of the original vs converted SmolLM2 at the same batch size."""
    from harness.lmeval import run_lm_eval

    rows = []
    for method in (None, "care", "mha2mla"):
        model = _smollm(method, 0.75, "reconstruct", "cpu", torch.float32)
        t0 = time.perf_counter()
        _, raw = run_lm_eval(model, _smollm_tokenizer(), [task], limit=limit, batch_size=batch_size, log_samples=True)
        secs = time.perf_counter() - t0
        n_req = sum(len(s["arguments"]) for s in raw["samples"][task])
        rows.append({"method": method or "original", "requests": n_req, "seconds": secs,
                     "requests_per_s": n_req / secs})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _smollm_tokenizer():
    from harness.models import load_model

    if not hasattr(_smollm_tokenizer, "tok"):
        _smollm_tokenizer.tok = load_model("smollm2-135m", device="cpu", dtype="fp32")[1]
    return _smollm_tokenizer.tok


# ----------------------------------------------------------------------------- report
def _fmt_bytes(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(b) < 1024:
            return f"{b:.1f} {unit}"
        b /= 1024
    return f"{b:.1f} TiB"


def decode_table(results: list[dict]) -> str:
    lines = ["| model | method | path | batch | context | decode tok/s | vs orig | memory-bound floor tok/s (cache read ms/step) | cache bytes/token | vs orig | cache total | peak mem | vs orig |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    ref = {(r["model"], r["batch"], r["context"]): r for r in results if r["method"] is None}
    for r in results:
        o = ref.get((r["model"], r["batch"], r["context"]))
        if o is None:  # the original did not fit: report the converted figure alone
            o = {"decode_tok_s": float("nan"), "cache_bytes_per_token": float("nan"), "peak_mem_bytes": float("nan")}
        lines.append(
            f"| {r['model']} | {r['method'] or 'original'} | {r['path'] if r['method'] else '-'} | {r['batch']} | {r['context']} "
            f"| {r['decode_tok_s']:.1f} | {r['decode_tok_s'] / o['decode_tok_s']:.2f}x "
            f"| {r.get('floor_tok_s', float('nan')):.0f} ({r.get('cache_read_ms_per_step', float('nan')):.2f}) "
            f"| {r['cache_bytes_per_token']:.0f} | {r['cache_bytes_per_token'] / o['cache_bytes_per_token']:.3f} "
            f"| {_fmt_bytes(r['cache_bytes'])} | {_fmt_bytes(r['peak_mem_bytes'])} | {r['peak_mem_bytes'] / o['peak_mem_bytes']:.2f}x |")
    return "\n".join(lines)


def cpu_suite(contexts: list[int], new_tokens: int, batch: int = 1) -> str:
    cost = conversion_cost()
    evals = eval_throughput()
    bw = measure_bandwidth("cpu", 512)
    results = []
    for T in contexts:
        for method, path in [(None, "reconstruct"), ("care", "reconstruct"), ("mha2mla", "reconstruct"),
                             ("mha2mla", "absorbed")]:
            cfg = {"model": "smollm2-135m", "method": method, "kv_save": 0.75 if method else 0.0, "path": path,
                   "device": "cpu", "dtype": "fp32", "batch": batch, "context": T, "new_tokens": new_tokens}
            r = add_floor(_subprocess(cfg), 135_000_000 * 4, bw)
            print(json.dumps(r), flush=True)
            results.append(r)
    lines = ["### Conversion cost (SmolLM2-135M, 64 x 256 wiki calibration tokens, CPU fp32)", "",
             "| step | seconds | conversion total (stats + factorization) | ratio to one forward pass |",
             "|---|---|---|---|"]
    for r in cost:
        lines.append(f"| {r['what']} | {r['seconds']:.2f} | {r.get('conversion_total_s', float('nan')):.2f} "
                     f"| {r.get('ratio_to_forward', float('nan')):.2f} |")
    lines += ["", "### lm-eval throughput (SmolLM2-135M, CPU fp32, arc_easy, 40 docs, batch 8, kv_save 0.75)", "",
              "| model | requests | seconds | requests/s | vs original |", "|---|---|---|---|---|"]
    for r in evals:
        lines.append(f"| {r['method']} | {r['requests']} | {r['seconds']:.1f} | {r['requests_per_s']:.2f} "
                     f"| {r['requests_per_s'] / evals[0]['requests_per_s']:.2f}x |")
    lines += ["", f"### Decode (SmolLM2-135M, CPU fp32, kv_save 0.75, {new_tokens} new tokens after the context)", "",
              f"Measured copy bandwidth: {bw / 1e9:.1f} GB/s.", "", decode_table(results)]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- GPU decode suite
def _cache_rows(model) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Per layer, the (heads, width) of what the cache stores as keys and as values per token."""
    from harness.arch import decoder_layers
    from harness.mla import MLAAttention

    out = []
    for d in decoder_layers(model):
        a = d.self_attn
        if isinstance(a, MLAAttention):
            out.append(((1, a.rank), (1, a.cache_width - a.rank)))
        else:
            n_kv = a.k_proj.out_features // a.head_dim
            out.append(((n_kv, a.head_dim), (n_kv, a.head_dim)))
    return out


def fill_cache(model, cache, B: int, T: int) -> None:
    """Write T random tokens per row into every layer of `cache` (a long prefill of an 8B model would
    take minutes; decode speed and memory do not depend on the cached values)."""
    p = next(model.parameters())
    g = torch.Generator(device=p.device).manual_seed(0)
    for i, ((hk, wk), (hv, wv)) in enumerate(_cache_rows(model)):
        k = torch.randn(B, hk, T, wk, generator=g, device=p.device, dtype=p.dtype)
        v = torch.randn(B, hv, T, wv, generator=g, device=p.device, dtype=p.dtype)
        cache.update(k, v, i)
        del k, v


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _static_decoder(model, B: int, T: int, N: int):
    """A StaticDecoder over a StaticCache holding T random tokens per row, started for N more steps."""
    from transformers import StaticCache

    from harness.mla.static import StaticDecoder

    device = next(model.parameters()).device.type
    cache = StaticCache(config=model.config, max_cache_len=T + N + 3)
    fill_cache(model, cache, B, T)
    dec = StaticDecoder(model, cache, B)
    dec.start(torch.randint(0, min(1000, model.config.vocab_size), (B, 1), device=device), T)
    return dec, cache


@torch.no_grad()
def decode_static(model, B: int, T: int, N: int, graphs: bool = True) -> dict:
    """N greedy steps after T cached tokens: StaticCache + (CUDA graph of the step); time and memory."""
    from harness.mla.cache import CACHE_ARG, cache_bytes

    device = next(model.parameters()).device.type
    dec, cache = _static_decoder(model, B, T, N)
    if graphs and device == "cuda":
        dec.capture(warmup=2)
    else:
        for _ in range(2):
            dec.step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(N):
        dec.step()
    _sync(device)
    secs = time.perf_counter() - t0
    return {"step_ms": 1e3 * secs / N, "decode_tok_s": B * N / secs,
            "cache_bytes": cache_bytes(cache), "cache_slots": B * dec.max_len}


@torch.no_grad()
def decode_dynamic(model, B: int, T: int, N: int) -> dict:
    """N greedy steps after T cached tokens, plain HF: DynamicCache, eager modules, no mask (SDPA
    picks its flash kernel with native GQA), the cache grown by concatenation every step."""
    from transformers import DynamicCache

    from harness.mla.cache import CACHE_ARG, cache_bytes

    device = next(model.parameters()).device.type
    cache = DynamicCache(config=model.config)
    fill_cache(model, cache, B, T)
    nxt = torch.randint(0, min(1000, model.config.vocab_size), (B, 1), device=device)
    for i in range(N + 2):
        if i == 2:
            _sync(device)
            t0 = time.perf_counter()
        out = model(input_ids=nxt, **{CACHE_ARG: cache}, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1:].argmax(-1)
    _sync(device)
    secs = time.perf_counter() - t0
    return {"step_ms": 1e3 * secs / N, "decode_tok_s": B * N / secs, "cache_bytes": cache_bytes(cache),
            "cache_slots": B * (T + N + 2)}


def _measure(fn, model, label: dict, B: int, T: int, N: int, weight_bytes: int, bandwidth: float,
             device: str, **kw) -> dict:
    """One configuration: the floor, and the measurement or the OOM it hit."""
    import gc

    from harness.mla import accounted_width

    width = accounted_width(model)
    esize = next(model.parameters()).element_size()
    cache_read = B * T * width * esize  # DESIGN §11: weight bytes + B*S*L*w*dtype per step
    row = {**label, "batch": B, "context": T, "new_tokens": N, "cache_width": width,
           "cache_bytes_per_token": width * esize, "floor_tok_s": B * bandwidth / (weight_bytes + cache_read)}
    if device == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        row.update(fn(model, B, T, N, **kw))
        row["share_of_floor"] = row["decode_tok_s"] / row["floor_tok_s"]
        if device == "cuda":
            row["peak_mem_bytes"] = torch.cuda.max_memory_allocated()
    except torch.OutOfMemoryError:
        row["oom"] = True
    except Exception as e:  # keep the other rows: report the failure in the table and the log
        import traceback

        traceback.print_exc()
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
    finally:
        if device == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
    print(json.dumps(row), flush=True)
    return row


def weight_bytes_per_step(model) -> int:
    """Parameter bytes a decode step reads: all weights but the input embedding (B rows of it)."""
    emb = model.get_input_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is emb
    return total if tied else total - emb.numel() * emb.element_size()


def gpu_suite(contexts: list[int], batches: list[int], new_tokens: int, layers: int, kv_save: float = 0.75,
              device: str = "cuda", shapes: dict = LLAMA_8B) -> tuple[str, list[dict]]:
    """Decode speed of the original (two ways) and of care_mla/mha2mla on the absorbed path with the
    fused kernel, in one process and one run: tok/s, the memory-bound floor, share of it, peak memory."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if device == "cpu":  # the smoke run: tiny ops, where OpenMP barriers on a busy machine cost more than the math
        torch.set_num_threads(1)
    bw = measure_bandwidth(device, 1024 if device == "cuda" else 64)
    total = torch.cuda.get_device_properties(0).total_memory if device == "cuda" else None
    print(f"measured copy bandwidth {bw / 1e12:.3f} TB/s", flush=True)
    t0 = time.perf_counter()
    model = _llama_shapes(None, 0.0, "reconstruct", device, dtype, layers, shapes)
    print(f"built the random-weight model in {time.perf_counter() - t0:.1f} s", flush=True)
    rows = []
    wb = weight_bytes_per_step(model)
    static = "StaticCache + CUDA graph" if device == "cuda" else "StaticCache (no graph on CPU)"
    for B in batches:
        for T in contexts:
            rows.append(_measure(decode_static, model, {"model": "original", "decode": f"{static}, SDPA"},
                                 B, T, new_tokens, wb, bw, device, graphs=device == "cuda"))
            rows.append(_measure(decode_dynamic, model, {"model": "original", "decode": "DynamicCache, eager, SDPA (flash, GQA)"},
                                 B, T, new_tokens, wb, bw, device))
    t0 = time.perf_counter()
    rec = _convert_for_speed(model, "mha2mla", kv_save, "absorbed")
    print(f"converted in {time.perf_counter() - t0:.1f} s: {rec['accounting']}", flush=True)
    wb = weight_bytes_per_step(model)
    for B in batches:
        for T in contexts:
            rows.append(_measure(decode_static, model, {"model": f"care_mla / mha2mla (kv_save {kv_save})",
                                                        "decode": f"{static}, absorbed, "
                                                                  + ("fused kernel" if device == "cuda" else "reference")},
                                 B, T, new_tokens, wb, bw, device, graphs=device == "cuda"))
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "CPU"
    what = "Llama-3.1-8B shapes" if shapes is LLAMA_8B else "smoke-test shapes"
    text = "\n".join([
        f"### Decode on {name} (random weights, {what}, {layers} layers, {str(dtype).replace('torch.', '')}, kv_save {kv_save})",
        "",
        f"Measured copy bandwidth: {bw / 1e12:.2f} TB/s. Floor = batch x bandwidth / (weight bytes + batch x context "
        f"x cache bytes/token) per step, weight bytes = all parameters but the input embedding "
        f"({wb / 2**30:.2f} GiB converted). The cache holds `context` random tokens (no prefill: decode speed and "
        f"memory do not depend on the values), then {new_tokens} greedy steps are timed after 2 warm-up steps. "
        "vs original = against the faster of the two original rows at that batch and context. Peak memory is "
        "the CUDA allocator's peak over the run, weights included.",
        "",
        gpu_table(rows, total),
    ])
    return text, rows


# ----------------------------------------------------------------------------- where a step's time goes
KERNEL_KINDS = (  # (kind, substrings of the kernel name), first match wins; names differ across torch builds
    ("fused latent attention (Triton)", ("latent_decode", "_split_kernel", "_combine_kernel")),
    ("matmul (weights, absorptions)", ("gemm", "gemv", "cutlass", "cublas", "sm90_xmma", "nvjet", "matmul")),
    ("attention (SDPA)", ("flash", "fmha", "attention")),
    ("norm / RoPE / elementwise", ("elementwise", "vectorized", "norm", "reduce", "cat", "copy", "index",
                                   "softmax", "mul", "add")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other")


def profile_decode(B: int, T: int, steps: int, layers: int, kv_save: float, device: str,
                   shapes: dict = LLAMA_8B) -> tuple[str, dict]:
    """One (batch, context) point of the converted model: the step time under its CUDA graph, then
    `steps` eager steps under torch.profiler, device time by kernel kind and the top kernels, against
    the memory-bound floor. Eager steps launch the same kernels the graph replays (the graph removes
    launch gaps, not kernel time), so the kernel table says where the graph's step time goes."""
    from torch.profiler import ProfilerActivity, profile

    from harness.mla import accounted_width

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    bw = measure_bandwidth(device, 1024 if device == "cuda" else 64)
    model = _llama_shapes("mha2mla", kv_save, "absorbed", device, dtype, layers, shapes)
    wb = weight_bytes_per_step(model)
    esize = next(model.parameters()).element_size()
    floor_ms = 1e3 * (wb + B * T * accounted_width(model) * esize) / bw
    graphed = decode_static(model, B, T, steps, graphs=device == "cuda")
    dec, _ = _static_decoder(model, B, T, steps)  # a second one, not captured: eager steps to profile
    for _ in range(2):
        dec.step()
    _sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.no_grad(), profile(activities=acts) as prof:
        for _ in range(steps):
            dec.step()
        _sync(device)
    attr = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    if device == "cuda":  # kernels only (their names are not aten ops); on CPU the ops stand in
        events = [e for e in events if not e.key.startswith("aten::")]
    per_step = {e.key: getattr(e, attr) / 1e3 / steps for e in events}  # ms per step
    kinds: dict[str, float] = {}
    for k, ms in per_step.items():
        kinds[kernel_kind(k)] = kinds.get(kernel_kind(k), 0.0) + ms
    total = sum(per_step.values())
    lines = [f"Converted model (kv_save {kv_save}, absorbed, fused kernel) at batch {B} x context {T}, {layers} "
             f"layers, {str(dtype).replace('torch.', '')}: step {graphed['step_ms']:.2f} ms under the CUDA graph; "
             f"memory-bound floor {floor_ms:.2f} ms (weights {wb / 2**30:.2f} GiB + cache "
             f"{B * T * accounted_width(model) * esize / 2**30:.2f} GiB at {bw / 1e12:.2f} TB/s); device time of "
             f"the kernels in {steps} eager steps: {total:.2f} ms per step.", "",
             "| kernel kind | ms per step | share of kernel time |", "|---|---|---|"]
    lines += [f"| {k} | {v:.2f} | {100 * v / total:.0f}% |" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])]
    lines += ["", "| kernel (top 12) | kind | ms per step |", "|---|---|---|"]
    lines += [f"| `{k[:90]}` | {kernel_kind(k)} | {v:.3f} |"
              for k, v in sorted(per_step.items(), key=lambda kv: -kv[1])[:12]]
    return "\n".join(lines), {"step_ms": graphed["step_ms"], "floor_ms": floor_ms, "kernel_ms": total, "kinds": kinds}


def gpu_table(rows: list[dict], total_mem: int | None) -> str:
    lines = ["| model | decode | batch | context | tok/s | vs original | floor tok/s | share of floor | step ms | "
             "cache bytes/token | peak mem |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    best = {}
    for r in rows:
        if r["model"] == "original" and "decode_tok_s" in r:
            k = (r["batch"], r["context"])
            best[k] = max(best.get(k, 0.0), r["decode_tok_s"])
    fits = f"does not fit in {total_mem / 2**30:.1f} GiB" if total_mem else "does not fit"
    for r in rows:
        head = f"| {r['model']} | {r['decode']} | {r['batch']} | {r['context']} "
        if r.get("oom") or r.get("error"):
            what = f"OOM ({fits})" if r.get("oom") else f"ERROR ({r['error']})"
            lines.append(head + f"| {what} | - | {r['floor_tok_s']:.0f} | - | - | {r['cache_bytes_per_token']} | - |")
            continue
        ref = best.get((r["batch"], r["context"]))
        vs = f"{r['decode_tok_s'] / ref:.2f}x" if ref else "original OOM"
        peak = _fmt_bytes(r["peak_mem_bytes"]) if "peak_mem_bytes" in r else "-"
        lines.append(head + f"| {r['decode_tok_s']:.1f} | {vs} | {r['floor_tok_s']:.0f} | {100 * r['share_of_floor']:.0f}% "
                     f"| {r['step_ms']:.2f} | {r['cache_bytes_per_token']} | {peak} |")
    return "\n".join(lines)


def write_section(report: Path, suite: str, text: str) -> None:
    """Replace this suite's section of the report (between its markers), keeping the others."""
    start, end = f"<!-- bench:{suite} -->", f"<!-- /bench:{suite} -->"
    old = report.read_text() if report.exists() else "# mla-harness benchmarks\n\n"
    block = f"{start}\n{text}{end}\n"
    if start in old and end in old:
        new = old[:old.index(start)] + block + old[old.index(end) + len(end) + 1:]
    else:
        new = old.rstrip("\n") + "\n\n" + block
    atomic_write_text(report, new)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--suite", default="cpu", choices=["cpu", "gpu", "profile", "kernel"],
                   help="profile: where one decode step of the converted model spends its time (--point); "
                        "kernel: the fused decode kernel's launch configurations timed alone (--points)")
    p.add_argument("--point", default="16,32768", help="profile suite: batch,context")
    p.add_argument("--points", nargs="+", default=None,
                   help="kernel suite: batch,context points (default 1,32768 16,16384 16,32768 64,4096; "
                        "smoke 1,40 2,100)")
    p.add_argument("--reps", type=int, default=None, help="kernel suite: timed reps per configuration (30)")
    p.add_argument("--save-tuned", action="store_true",
                   help="kernel suite: write each point's best configuration to harness/kernels/decode_tuned.json")
    p.add_argument("--contexts", default=None, help="comma-separated context lengths")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (gpu default 1,16,64)")
    p.add_argument("--new-tokens", type=int, default=None, help="decode steps timed (cpu 16, gpu 32)")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--kv-save", type=float, default=0.75)
    p.add_argument("--shapes", default="llama-3.1-8b", choices=["llama-3.1-8b", "smoke"],
                   help="gpu suite model shapes; smoke: a tiny Llama that runs the code path on CPU")
    p.add_argument("--out", default=str(REPORT))
    p.add_argument("--json", default=None, help="also write the gpu or kernel suite's rows here")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cmd = "python -m harness.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    rows = None
    if a.suite == "kernel":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        smoke = a.shapes == "smoke"
        try:
            points = [tuple(int(v) for v in x.split(",")) for x in
                      (a.points or (["1,40", "2,100"] if smoke else ["1,32768", "16,16384", "16,32768", "64,4096"]))]
            assert all(len(pt) == 2 and min(pt) > 0 for pt in points)
        except (ValueError, AssertionError):
            from harness.errors import HarnessError

            raise HarnessError(f"--points takes batch,context pairs such as 16,32768; got {a.points}") from None
        if device == "cpu":
            if not smoke:
                from harness.errors import HarnessError

                raise HarnessError("the kernel suite needs CUDA; on a CPU machine use --shapes smoke (Triton interpreter)")
            from harness.triton_interpreter import use_interpreter

            use_interpreter()  # before the kernels are imported
            torch.set_num_threads(1)
        from harness.kernel_bench import kernel_suite

        body, rows = kernel_suite(points, a.kv_save, device, SMOKE if smoke else LLAMA_8B, smoke, a.reps,
                                  a.save_tuned, build=_llama_shapes, measure_bandwidth=measure_bandwidth)
    elif a.suite == "cpu":
        body = cpu_suite([int(x) for x in (a.contexts or "2048,8192").split(",")], a.new_tokens or 16)
    elif a.suite == "profile":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu" and a.shapes != "smoke":
            from harness.errors import HarnessError

            raise HarnessError("the profile suite needs CUDA; on a CPU machine use --shapes smoke to check its code path")
        B, T = (int(x) for x in a.point.split(","))
        body, rows = profile_decode(B, T, a.new_tokens or 8, a.layers, a.kv_save, device,
                                    SMOKE if a.shapes == "smoke" else LLAMA_8B)
    else:
        smoke = a.shapes == "smoke"
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu" and not smoke:
            from harness.errors import HarnessError

            raise HarnessError("the gpu suite needs CUDA; on a CPU machine use --shapes smoke to check its code path")
        body, rows = gpu_suite([int(x) for x in (a.contexts or "4096,16384,32768").split(",")],
                               [int(x) for x in (a.batches or "1,16,64").split(",")], a.new_tokens or 32,
                               a.layers, a.kv_save, device, SMOKE if smoke else LLAMA_8B)
    if a.json and rows is not None:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(a.json), json.dumps(rows, indent=1))
    head = (f"## {a.suite.upper()} suite\n\nCommand: `{cmd.strip()}`  \nMachine: {platform.node()} "
            f"({os.cpu_count()} CPUs, torch {torch.__version__})  \nDate: {time.strftime('%Y-%m-%d')}\n")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_section(out, a.suite, head + "\n" + body + "\n")
    print(head + "\n" + body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
