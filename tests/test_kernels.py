"""The fused latent-attention decode kernel against its PyTorch reference.

GPU tier (`-m gpu`, skipped without CUDA): the compiled Triton kernel across shapes and dtypes.
CPU tier: the same kernel under Triton's interpreter (TRITON_INTERPRET=1, CPU tensors) in a
subprocess, fp32/fp16 (the interpreter's bf16 tl.dot is wrong: bf16 is covered on the GPU tier).
"""
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from harness.errors import HarnessError
from harness.kernels.latent_decode import latent_decode_reference

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


# ----------------------------------------------------------------------------- CPU: Triton's interpreter
INTERPRETED = textwrap.dedent('''
    import time
    import triton.runtime.interpreter as ti
    # Triton 3.6's interpreter turns scalars into 1-element arrays and calls int() on them, which
    # numpy >= 2.4 refuses ("only 0-dimensional arrays"); read the element instead.
    _patch = ti._patch_lang_tensor
    def _patched(tensor, scope):
        _patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
    ti._patch_lang_tensor = _patched
    import torch
    from harness.kernels.latent_decode import latent_decode_reference, latent_decode_triton
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
    dec = torch.cat([m(x[:, t:t + 1], past_key_values=cache, use_cache=True).logits for t in range(4)], 1)
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
