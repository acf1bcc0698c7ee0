"""Performance benchmarks (not tests): conversion cost, decode speed and memory, cache bytes.

    python -m harness.bench                      # CPU suite on SmolLM2 -> results/bench/REPORT.md
    python -m harness.bench --suite gpu          # GPU suite: random Llama-3.1-8B shapes
    python -m harness.bench --suite cpu --contexts 2048,8192 --new-tokens 32

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


def _llama8b_shapes(method: str | None, kv_save: float, path: str, device: str, dtype, layers: int):
    """Random weights with Llama-3.1-8B's attention shapes (speed/memory only)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from harness.methods import convert
    from harness.mla import Budget

    cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                      max_position_embeddings=131072, tie_word_embeddings=False)
    with torch.device(device):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    if method:
        # svd needs no statistics: speed and memory do not depend on which factorization filled the weights
        opts = {"selection": "high"} if method == "mha2mla" else {}
        convert(model, "mha2mla" if method == "mha2mla" else "svd", Budget(kv_save=kv_save), None, path=path, **opts)
    return model


# ----------------------------------------------------------------------------- one measurement
@torch.no_grad()
def decode_once(cfg: dict, model=None) -> dict:
    """Prefill `context` tokens, then greedily decode `new_tokens`; time and memory."""
    from harness.mla import LatentCache
    from harness.mla.cache import cache_bytes

    device = cfg["device"]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg["dtype"]]
    if model is None and cfg["model"] == "smollm2-135m":
        model = _smollm(cfg["method"], cfg["kv_save"], cfg["path"], device, dtype)
    elif model is None:
        model = _llama8b_shapes(cfg["method"], cfg["kv_save"], cfg["path"], device, dtype, cfg["layers"])
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
        out = model(input_ids=ids[:, s:s + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
    nxt = out.logits[:, -1:].argmax(-1)
    if device == "cuda":
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    for _ in range(N):
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True, logits_to_keep=1)
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


def gpu_suite(contexts: list[int], batches: list[int], new_tokens: int, layers: int) -> str:
    """In one process: the CUDA allocator's peak (reset per measurement) is exact per configuration."""
    from harness.mla.convert import set_path

    results = []
    bw = measure_bandwidth("cuda")
    print(f"measured bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    for method in (None, "svd", "mha2mla"):
        model = _llama8b_shapes(method, 0.75, "reconstruct", "cuda", torch.bfloat16, layers)
        wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        warm = {"model": "warmup", "method": method, "kv_save": 0.0, "path": "reconstruct", "device": "cuda",
                "dtype": "bf16", "batch": 1, "context": 512, "new_tokens": 4, "layers": layers}
        decode_once(warm, model)  # CUDA context, kernels and allocator warm before timing
        paths = ["reconstruct", "absorbed"] if method == "mha2mla" else ["reconstruct"]
        for path in paths:
            if method:
                set_path(model, path)
            for B in batches:
                for T in contexts:
                    cfg = {"model": "llama-3.1-8b-shapes", "method": method, "kv_save": 0.75 if method else 0.0,
                           "path": path, "device": "cuda", "dtype": "bf16", "batch": B, "context": T,
                           "new_tokens": new_tokens, "layers": layers}
                    try:
                        r = decode_once(cfg, model)
                    except torch.OutOfMemoryError:
                        torch.cuda.empty_cache()
                        print(f"out of memory: {cfg}", flush=True)
                        continue
                    torch.cuda.empty_cache()
                    add_floor(r, wbytes, bw)
                    print(json.dumps(r), flush=True)
                    results.append(r)
        del model
        torch.cuda.empty_cache()
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "?"
    return "\n".join([f"### Decode on {name} (random weights, Llama-3.1-8B shapes, {layers} layers, bf16, kv_save 0.75)", "",
                      f"Measured copy bandwidth: {bw / 1e12:.2f} TB/s. Floor = batch x bandwidth / (weight bytes + cache bytes) per step.", "",
                      decode_table(results)])


def write_section(report: Path, suite: str, text: str) -> None:
    """Replace this suite's section of the report (between its markers), keeping the others."""
    start, end = f"<!-- bench:{suite} -->", f"<!-- /bench:{suite} -->"
    old = report.read_text() if report.exists() else "# mla-harness benchmarks\n\n"
    block = f"{start}\n{text}{end}\n"
    if start in old and end in old:
        new = old[:old.index(start)] + block + old[old.index(end) + len(end) + 1:]
    else:
        new = old.rstrip("\n") + "\n\n" + block
    tmp = report.with_suffix(".tmp")
    tmp.write_text(new)
    os.replace(tmp, report)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--suite", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--contexts", default=None, help="comma-separated context lengths")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--out", default=str(REPORT))
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cmd = "python -m harness.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    if a.suite == "cpu":
        body = cpu_suite([int(x) for x in (a.contexts or "2048,8192").split(",")], a.new_tokens)
    else:
        body = gpu_suite([int(x) for x in (a.contexts or "4096,16384,32768").split(",")],
                         [int(x) for x in a.batches.split(",")], a.new_tokens, a.layers)
    head = (f"## {a.suite.upper()} suite\n\nCommand: `{cmd.strip()}`  \nMachine: {platform.node()} "
            f"({os.cpu_count()} CPUs, torch {torch.__version__})  \nDate: {time.strftime('%Y-%m-%d')}\n")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_section(out, a.suite, head + "\n" + body + "\n")
    print(head + "\n" + body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
