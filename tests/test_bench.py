"""The GPU benchmark suite's code path, run on CPU with a tiny Llama (`--shapes smoke`)."""
import torch

from harness.bench import SMOKE, gpu_suite, gpu_table


def test_gpu_suite_code_path_on_cpu():
    threads = torch.get_num_threads()
    try:
        text, rows = gpu_suite([40], [2], 2, 1, 0.75, "cpu", SMOKE)
    finally:
        torch.set_num_threads(threads)
    assert [r["model"] for r in rows] == ["original", "original", "care_mla / mha2mla (kv_save 0.75)"]
    assert all(r["decode_tok_s"] > 0 and 0 < r["share_of_floor"] for r in rows)
    # 1 layer, n_kv 2, d_h 32, fp32: 2*2*32*4 bytes per token originally, a quarter converted
    assert [r["cache_bytes_per_token"] for r in rows] == [512, 512, 128]
    static = rows[0]
    assert static["cache_bytes"] == static["cache_slots"] * 512  # the static cache holds every slot's bytes
    assert rows[2]["cache_bytes"] == rows[2]["cache_slots"] * 128
    assert text.count("\n| ") == 4  # header + 3 rows


def test_gpu_table_says_what_did_not_fit():
    rows = [{"model": "original", "decode": "static", "batch": 16, "context": 32768, "oom": True,
             "floor_tok_s": 700.0, "cache_bytes_per_token": 131072},
            {"model": "care_mla", "decode": "static", "batch": 16, "context": 32768, "decode_tok_s": 800.0,
             "floor_tok_s": 1500.0, "share_of_floor": 800 / 1500, "step_ms": 20.0, "cache_bytes_per_token": 32768,
             "peak_mem_bytes": 40 * 2**30}]
    t = gpu_table(rows, int(79.2 * 2**30))
    assert "OOM (does not fit in 79.2 GiB)" in t and "nan" not in t
    assert "| 800.0 | original OOM | 1500 | 53% |" in t


def test_profile_sorts_kernels_by_kind_and_runs_on_cpu():
    from harness.bench import kernel_kind, profile_decode

    assert kernel_kind("_split_kernel_0d1d2d") == "fused latent attention (Triton)"
    assert kernel_kind("_combine_kernel") == "fused latent attention (Triton)"
    assert kernel_kind("sm90_xmma_gemm_bf16bf16_bf16f32") == "matmul (weights, absorptions)"
    assert kernel_kind("void at::native::vectorized_elementwise_kernel<4, ...>") == "norm / RoPE / elementwise"
    assert kernel_kind("some_new_kernel") == "other"
    threads = torch.get_num_threads()
    try:
        text, r = profile_decode(2, 40, 2, 1, 0.75, "cpu", SMOKE)
    finally:
        torch.set_num_threads(threads)
    assert r["step_ms"] > 0 and r["floor_ms"] > 0 and r["kernel_ms"] > 0
    assert abs(sum(r["kinds"].values()) - r["kernel_ms"]) < 1e-9  # every kernel counted once
    assert "| kernel kind | ms per step |" in text


def test_kernel_suite_smoke_under_triton_interpreter(tmp_path):
    """`--suite kernel --shapes smoke`: every configuration of the search runs, matches the reference,
    and the report section, the JSON rows and the saved winners are written (a subprocess: the
    interpreter must be on before the kernels are imported)."""
    import importlib.util
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import pytest

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    root = Path(__file__).resolve().parents[1]
    tuned = tmp_path / "tuned.json"
    code = ("import sys; from harness.kernels import decode_config as dc; dc.TUNED_FILE = dc.Path(sys.argv[1]); "
            "from harness.bench import main; sys.exit(main(sys.argv[2:]))")
    args = ["--suite", "kernel", "--shapes", "smoke", "--points", "2,100", "--save-tuned",
            "--out", str(tmp_path / "R.md"), "--json", str(tmp_path / "k.json")]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "TRITON_INTERPRET": "1"}
    p = subprocess.run([sys.executable, "-c", code, str(tuned), *args], capture_output=True, text=True, env=env,
                       cwd=root, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.loads((tmp_path / "k.json").read_text())
    assert len(rows) >= 5 and all(r["ok"] and r["max_abs_err"] <= 1e-5 and r["ms"] > 0 for r in rows)
    assert rows[0]["role"] == "previous fixed" and rows[1]["role"] == "default rule"
    report = (tmp_path / "R.md").read_text()
    assert "<!-- bench:kernel -->" in report and "| 2 | 100 |" in report
    saved = json.loads(tuned.read_text())
    assert len(saved) == 1 and saved[0]["shape"]["B"] == 2 and saved[0]["shape"]["DL"] == 24
    assert saved[0]["config"] in [r["config"] for r in rows]
