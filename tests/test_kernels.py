"""The fused latent-attention decode kernel against its PyTorch reference.

GPU tier (`-m gpu`, skipped without CUDA): the compiled Triton kernel across shapes and dtypes.
CPU tier: the same kernel under Triton's interpreter (TRITON_INTERPRET=1, CPU tensors) in a
subprocess, fp32/fp16 (the interpreter's bf16 tl.dot is wrong: bf16 is covered on the GPU tier).
"""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from harness.errors import HarnessError
from harness.kernels.latent_decode import latent_decode_reference
from harness.mla.cache import CACHE_ARG

ROOT = Path(__file__).resolve().parents[1]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _inputs(B, H, n_kv, DL, DV, DR, S, shared, dtype, device="cpu", seed=0):
    """Random decode inputs; c_k/c_v are strided views of one latent row, as in the cache."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    lat = r(B, S, max(DL, DV) + 8)
    c_k = lat[..., :DL]
    c_v = lat[..., :DV] if shared else lat[..., 8:8 + DV]
    return r(B, H, DL) * 0.3, r(B, H, DR) * 0.3, c_k, c_v, r(B, S, n_kv * DR)


def test_reference_is_softmax_attention_over_rebuilt_keys():
    """The reference against the plain definition: keys = [c_k, k_rope of the head's group], one softmax."""
    B, H, n_kv, DL, DR, S = 2, 6, 3, 10, 4, 7
    ql, qr, ck, cv, kr = _inputs(B, H, n_kv, DL, DL, DR, S, True, torch.float64)
    keep = torch.rand(B, S, generator=torch.Generator().manual_seed(1)) > 0.3
    keep[:, 0] = True
    out = latent_decode_reference(ql, qr, ck, cv, kr, 0.7, keep)
    for b in range(B):
        for h in range(H):
            grp = h // (H // n_kv)
            k = torch.cat([ck[b], kr[b].view(S, n_kv, DR)[:, grp]], -1)  # (S, DL + DR)
            s = (k @ torch.cat([ql[b, h], qr[b, h]])) * 0.7
            s[~keep[b]] = float("-inf")
            assert torch.allclose(out[b, h], torch.softmax(s, 0) @ cv[b], atol=1e-12)


def test_reference_masks_length_and_empty_rows():
    ql, qr, ck, cv, kr = _inputs(2, 4, 2, 8, 8, 4, 9, True, torch.float64)
    full = latent_decode_reference(ql, qr, ck[:, :5], cv[:, :5], kr[:, :5], 0.5)
    cut = latent_decode_reference(ql, qr, ck, cv, kr, 0.5, kv_len=torch.tensor(5))
    assert torch.allclose(full, cut, atol=1e-12)
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[1] = False
    out = latent_decode_reference(ql, qr, ck, cv, kr, 0.5, keep)
    assert torch.equal(out[1], torch.zeros_like(out[1])), "a row with nothing to attend gives zeros, not NaN"
    with pytest.raises(HarnessError, match="k_rope"):
        latent_decode_reference(ql, qr, ck, cv, kr[..., :3], 0.5)


# ----------------------------------------------------------------------------- GPU tier
GPU_SHAPES = [  # B, H, n_kv, DL (= DV when shared), DR, S, shared
    (1, 9, 3, 96, 8, 1, True),          # SmolLM2-like, a single cached token
    (1, 32, 8, 384, 16, 4133, True),    # Llama-3.1-8B at kv_save 0.75: latent 384 (not a power of two)
    (4, 32, 8, 384, 16, 1000, True),
    (4, 9, 3, 200, 8, 777, False),      # separate K and V latents, odd widths
    (1, 32, 8, 512, 16, 33, True),
    (4, 32, 8, 120, 16, 5000, False),
]


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float32, 1e-5)], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "B{}-H{}-DL{}-S{}-{}".format(s[0], s[1], s[3], s[5], "shared" if s[6] else "split"))
def test_kernel_matches_reference_on_gpu(shape, dtype, tol):
    from harness.kernels.latent_decode import latent_decode_triton

    B, H, n_kv, DL, DR, S, shared = shape
    DV = DL if shared else DL + 24
    ql, qr, ck, cv, kr = _inputs(B, H, n_kv, DL, DV, DR, S, shared, dtype, "cuda")
    g = torch.Generator(device="cpu").manual_seed(3)
    keep = (torch.rand(B, S, generator=g) > 0.1).cuda()  # padded / unused slots
    kv_len = torch.tensor([max(1, S - 17 * b) for b in range(B)], device="cuda")
    for kw in ({}, {"keep": keep}, {"keep": keep, "kv_len": kv_len}):
        ref = latent_decode_reference(ql, qr, ck, cv, kr, 0.125, **kw).float()
        out = latent_decode_triton(ql, qr, ck, cv, kr, 0.125, **kw).float()
        assert out.shape == (B, H, DV)
        assert (out - ref).abs().max().item() <= tol, f"{kw.keys()}"
        for splits in (1, 7):  # one program per row, and an uneven split of the context
            out = latent_decode_triton(ql, qr, ck, cv, kr, 0.125, num_splits=splits, **kw).float()
            assert (out - ref).abs().max().item() <= tol


@cuda
@pytest.mark.gpu
def test_kernel_all_masked_row_and_static_length_on_gpu():
    from harness.kernels.latent_decode import latent_decode_triton

    ql, qr, ck, cv, kr = _inputs(2, 32, 8, 384, 384, 16, 3000, True, torch.bfloat16, "cuda")
    keep = torch.ones(2, 3000, dtype=torch.bool, device="cuda")
    keep[1] = False
    out = latent_decode_triton(ql, qr, ck, cv, kr, 0.1, keep, torch.tensor(1200, device="cuda"))
    ref = latent_decode_reference(ql, qr, ck, cv, kr, 0.1, keep, torch.tensor(1200, device="cuda"))
    assert torch.isfinite(out).all() and out[1].abs().max() == 0
    assert (out.float() - ref.float()).abs().max() <= 1e-2


GPU_CONFIGS = [  # every launch option, at shapes where it matters (latent 384 = 256 + 128, 32 heads)
    dict(), dict(split_dl=False), dict(block_h=16), dict(block_n=16), dict(block_n=64, num_stages=3),
    dict(num_stages=1), dict(num_stages=4), dict(num_warps=4), dict(waves=8, min_split_tokens=128),
    dict(block_h=16, block_n=64, num_stages=3, num_warps=4, waves=4), dict(num_splits=1),
]


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("opts", GPU_CONFIGS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("shape", [(16, 32, 8, 384, 16, 4133, True), (3, 32, 8, 200, 16, 1000, False)],
                         ids=["llama8b-kv0.75", "split-kv"])
def test_every_config_matches_reference_on_gpu(shape, opts):
    from harness.kernels import DecodeConfig
    from harness.kernels.latent_decode import latent_decode_triton, launched_config

    B, H, n_kv, DL, DR, S, shared = shape
    DV = DL if shared else DL + 48
    ql, qr, ck, cv, kr = _inputs(B, H, n_kv, DL, DV, DR, S, shared, torch.bfloat16, "cuda")
    keep = (torch.rand(B, S, generator=torch.Generator().manual_seed(3)) > 0.1).cuda()
    kv_len = torch.tensor([max(1, S - 97 * b) for b in range(B)], device="cuda")
    ref = latent_decode_reference(ql, qr, ck, cv, kr, 0.125, keep, kv_len).float()
    cfg = DecodeConfig(**opts)
    out = latent_decode_triton(ql, qr, ck, cv, kr, 0.125, keep, kv_len, config=cfg).float()
    assert (out - ref).abs().max().item() <= 1e-2
    assert launched_config(ql, qr, ck, cv, kr, keep, kv_len, config=cfg) is not None


@cuda
@pytest.mark.gpu
def test_tuning_picks_a_config_before_graph_capture(monkeypatch):
    """decode_tuning on: the first eager call of a new shape times candidates and keeps the fastest;
    the CUDA graph captured after it replays that configuration and matches the reference."""
    from harness.kernels import decode_config as dc
    from harness.kernels import decode_tuning, latent_decode_triton, tune_decode
    from harness.kernels.decode_config import tuned_config
    from harness.kernels.latent_decode import shape_key

    monkeypatch.setattr(dc, "_SHIPPED", {})  # no shipped or earlier entry: the tuning path must run
    monkeypatch.setattr(dc, "_TUNED", {})

    ql, qr, ck, cv, kr = _inputs(5, 32, 8, 384, 384, 16, 2999, True, torch.bfloat16, "cuda", seed=7)
    kv_len = torch.tensor(2500, device="cuda")
    key = shape_key(ql, qr, ck, cv, kr)
    assert tuned_config(key) is None
    best, timed = tune_decode(ql, qr, ck, cv, kr, 0.1, None, kv_len, record=False)
    assert len(timed) >= 3 and best == min(timed, key=lambda t: t[1])[0] and all(ms > 0 for _, ms in timed)
    assert tuned_config(key) is None  # record=False keeps nothing
    ref = latent_decode_reference(ql, qr, ck, cv, kr, 0.1, None, kv_len).float()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), decode_tuning():
        latent_decode_triton(ql, qr, ck, cv, kr, 0.1, None, kv_len)  # eager warm-up: tunes this shape
    torch.cuda.current_stream().wait_stream(side)
    chosen = tuned_config(key)
    assert chosen is not None
    g = torch.cuda.CUDAGraph()
    with decode_tuning(), torch.cuda.graph(g):
        out = latent_decode_triton(ql, qr, ck, cv, kr, 0.1, None, kv_len)
    g.replay()
    torch.cuda.synchronize()
    assert tuned_config(key) == chosen and (out.float() - ref).abs().max().item() <= 1e-2


# ----------------------------------------------------------------------------- launch configurations (CPU)
def test_latent_blocks_pad_less_than_one_block():
    from harness.kernels.latent_decode import latent_blocks

    assert latent_blocks(384, True) == (256, 128)  # Llama-3.1-8B at kv_save 0.75: no padded columns
    assert latent_blocks(384, False) == (512, 0)
    assert latent_blocks(96, True) == (64, 32)
    assert latent_blocks(200, True) == (256, 0)  # 128 + 128 pads as much as one block: keep one
    assert latent_blocks(512, True) == (512, 0) and latent_blocks(8, True) == (16, 0)
    for w in range(1, 700):
        a, b = latent_blocks(w, True)
        assert a + b >= w and a >= 16 and (b == 0 or b >= 16) and a + b <= latent_blocks(w, False)[0]


def test_wave_splits_fill_whole_waves():
    from harness.kernels.decode_config import wave_splits

    # The measured case: B=16 on 132 SMs. The old rule gave 17 splits (272 programs: 3 waves, 69% filled).
    s = wave_splits(16, 32768, 132)
    assert s == 16 and 16 * s / (132 * 2) > 0.96
    for B in (1, 2, 3, 4, 8, 16, 32, 64, 128):
        s = wave_splits(B, 32768, 132)
        progs = B * s
        fill = progs / (-(-progs // 132) * 132)
        assert fill >= 0.9 or progs < 132 and s == 32768 // 256, (B, s, fill)
    assert wave_splits(4, 600, 132, min_tokens=256) == 3  # capped: no split under min_tokens
    assert wave_splits(1, 10, 132) == 1
    assert wave_splits(16, 32768, 132, head_groups=2) == 8  # two programs per (row, split) already


def test_decode_config_validates_and_round_trips(tmp_path, monkeypatch):
    from harness.kernels import decode_config as dc

    with pytest.raises(HarnessError, match="block_n 48"):
        dc.DecodeConfig(block_n=48)
    with pytest.raises(HarnessError, match="block_h 8"):
        dc.DecodeConfig(block_h=8)
    with pytest.raises(HarnessError, match="unknown fields"):
        dc.DecodeConfig.from_dict({"block_m": 32})
    cfg = dc.DecodeConfig(block_n=64, num_stages=3, block_h=16)
    assert dc.DecodeConfig.from_dict(cfg.to_dict()) == cfg and cfg.name() == "block_n=64,num_stages=3,block_h=16"
    # The shipped table: the nearest (batch, context) of the same GPU model and layer shape.
    path = tmp_path / "tuned.json"
    k = dict(device="GPU X", dtype="bfloat16", H=32, DL=384, DV=384, DRF=128, shared=True)
    dc.save_tuned([{"shape": {**k, "B": 16, "S": 32768}, "config": cfg.to_dict()},
                   {"shape": {**k, "B": 1, "S": 32768}, "config": dc.DecodeConfig(num_warps=4).to_dict()}], path)
    dc.save_tuned([{"shape": {**k, "B": 1, "S": 32768}, "config": dc.DecodeConfig(num_stages=4).to_dict()}], path)
    assert len(json.loads(path.read_text())) == 2  # the same shape is replaced, not duplicated
    monkeypatch.setattr(dc, "_SHIPPED", dc._load_shipped(path))
    monkeypatch.setattr(dc, "_TUNED", {})
    assert dc.tuned_config(dc.ShapeKey(**k, B=16, S=30000)) == cfg
    assert dc.tuned_config(dc.ShapeKey(**k, B=2, S=32768)) == dc.DecodeConfig(num_stages=4)
    assert dc.tuned_config(dc.ShapeKey(**{**k, "device": "GPU Y"}, B=16, S=32768)) is None
    mine = dc.DecodeConfig(block_n=16)
    dc.record_tuned(dc.ShapeKey(**k, B=16, S=30000), mine)  # tuned in this process wins
    assert dc.tuned_config(dc.ShapeKey(**k, B=16, S=30000)) == mine


def test_shipped_tuned_table_parses():
    from harness.kernels import decode_config as dc

    if dc.TUNED_FILE.exists():
        for rows in dc._load_shipped().values():
            assert all(isinstance(c, dc.DecodeConfig) for _, c in rows)


# ----------------------------------------------------------------------------- CPU: Triton's interpreter
INTERPRETED = textwrap.dedent('''
    import time
    from harness.triton_interpreter import use_interpreter
    use_interpreter()
    import torch
    from harness.kernels import DecodeConfig
    from harness.kernels.latent_decode import latent_blocks, latent_decode_reference, latent_decode_triton
    from harness.mla.cache import CACHE_ARG
    from tests.test_kernels import _inputs
    t0 = time.time()
    cases = [  # B, H, n_kv, DL, DV, DR, S, shared, dtype, splits
        (1, 9, 3, 96, 96, 8, 37, True, torch.float32, None),
        (2, 4, 2, 20, 24, 4, 50, False, torch.float32, 3),
        (2, 32, 8, 40, 40, 16, 400, True, torch.float32, 20),   # 13 splits: the combine loops over chunks
        (1, 9, 3, 96, 96, 8, 37, True, torch.float16, 2),
    ]
    for B, H, n_kv, DL, DV, DR, S, shared, dt, splits in cases:
        ql, qr, ck, cv, kr = _inputs(B, H, n_kv, DL, DV, DR, S, shared, dt)
        keep = torch.rand(B, S, generator=torch.Generator().manual_seed(2)) > 0.2
        if B > 1:
            keep[-1] = False  # a row with nothing to attend
        kv_len = torch.tensor([S - 5] * B)
        ref = latent_decode_reference(ql, qr, ck, cv, kr, 0.3, keep, kv_len).float()
        out = latent_decode_triton(ql, qr, ck, cv, kr, 0.3, keep, kv_len, num_splits=splits).float()
        tol = 1e-5 if dt == torch.float32 else 2e-3
        err = (out - ref).abs().max().item()
        assert err <= tol and torch.isfinite(out).all(), (B, H, DL, S, dt, err)
    # Every launch option gives the reference's result: two latent blocks for K and for separate V
    # (40 = 32 + 16, 48 = 32 + 16), one padded block, 16 heads per program (32 heads over two
    # programs, four KV groups each), token steps of 16/64, pipeline depths, warps, split rules.
    assert latent_blocks(40, True) == (32, 16) and latent_blocks(48, True) == (32, 16)
    configs = [DecodeConfig(block_n=16), DecodeConfig(block_n=16, split_dl=False),
               DecodeConfig(block_n=16, block_h=16, num_splits=3), DecodeConfig(block_n=64, num_stages=3, num_warps=4),
               DecodeConfig(block_n=32, num_stages=1, waves=8, min_split_tokens=16)]
    for B, H, n_kv, DL, DV, DR, S, shared in [(2, 32, 8, 40, 40, 16, 90, True), (2, 32, 4, 40, 48, 8, 70, False)]:
        ql, qr, ck, cv, kr = _inputs(B, H, n_kv, DL, DV, DR, S, shared, torch.float32, seed=4)
        keep = torch.rand(B, S, generator=torch.Generator().manual_seed(5)) > 0.2
        kv_len = torch.tensor([S - 3, S - 20])
        ref = latent_decode_reference(ql, qr, ck, cv, kr, 0.3, keep, kv_len).float()
        for cfg in configs:
            err = (latent_decode_triton(ql, qr, ck, cv, kr, 0.3, keep, kv_len, config=cfg).float() - ref).abs().max().item()
            assert err <= 1e-5, (shared, cfg, err)
    # The wiring: a converted tiny model decoding token by token on the absorbed path through the
    # kernel gives the reconstruct path's logits.
    from harness.methods import convert
    from harness.mla import Budget, LatentCache, set_path
    from tests.tiny import tiny_model
    m = tiny_model("qwen2")  # k/v biases: the RoPE-key bias is rotated into the cache
    # (selection "high" needs no statistics: the wiring is the same for care_mla)
    convert(m, "mha2mla", Budget(kv_save=0.5), None, path="absorbed", selection="high")
    for d in m.model.layers:
        d.self_attn.decode_kernel = "triton"
    x = torch.randint(0, 128, (2, 4), generator=torch.Generator().manual_seed(0))
    cache = LatentCache(config=m.config)
    dec = torch.cat([m(x[:, t:t + 1], **{CACHE_ARG: cache}, use_cache=True).logits for t in range(4)], 1)
    set_path(m, "reconstruct")
    err = (dec - m(x).logits).abs().max().item()
    assert err <= 1e-4, err
    print("OK", round(time.time() - t0, 1))
''')


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_kernel_logic_under_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    p = subprocess.run([sys.executable, "-c", INTERPRETED], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=300)
    assert p.returncode == 0 and "OK" in p.stdout, p.stdout[-2000:] + p.stderr[-4000:]
