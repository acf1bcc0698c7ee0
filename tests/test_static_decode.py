"""StaticDecoder: greedy decode steps on a StaticCache (eager here; CUDA-graph replay on the GPU tier)."""
import copy

import pytest
import torch
from transformers import DynamicCache, StaticCache

from harness.errors import HarnessError
from harness.methods import convert
from harness.mla import Budget, set_path
from harness.mla.cache import CACHE_ARG
from harness.mla.static import StaticDecoder
from tiny import tiny_model, tiny_stats

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@torch.no_grad()
def _greedy(model, ids, n):
    """Reference: plain greedy decoding with a DynamicCache."""
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, **{CACHE_ARG: cache}, use_cache=True)
    toks = [out.logits[:, -1:].argmax(-1)]
    for _ in range(n - 1):
        out = model(input_ids=toks[-1], **{CACHE_ARG: cache}, use_cache=True)
        toks.append(out.logits[:, -1:].argmax(-1))
    return torch.cat(toks, 1)


def _static(model, ids, n, graph=False):
    B, T = ids.shape
    dec = StaticDecoder(model, StaticCache(config=model.config, max_cache_len=T + n + 1), B)
    toks = [dec.prefill(ids)]
    if graph:
        toks += dec.capture()
    while len(toks) < n:
        toks.append(dec.step().clone())
    return torch.cat(toks, 1)


def _models(device="cpu", dtype=torch.float32):
    base = tiny_model("qwen2")  # k/v biases
    stats = tiny_stats(base)
    eager = copy.deepcopy(base)
    eager.set_attn_implementation("eager")
    out = [("original-sdpa", base), ("original-eager", eager)]
    for path in ("reconstruct", "absorbed"):
        m = copy.deepcopy(base)
        convert(m, "care_mla", Budget(kv_save=0.5), stats, path=path)
        out.append((f"care_mla-{path}", m))
    return [(name, m.to(device, dtype)) for name, m in out]


def test_static_decoder_matches_dynamic_cache_greedy():
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    for name, m in _models():
        assert torch.equal(_static(m, ids, 8), _greedy(m, ids, 8)), name


def test_static_decoder_left_padding_matches_unpadded_rows():
    m = tiny_model("llama")
    convert(m, "care_mla", Budget(kv_save=0.5), tiny_stats(m), path="absorbed")
    long_row = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(1))
    short_row = torch.randint(0, 128, (1, 4), generator=torch.Generator().manual_seed(2))
    ids = torch.cat([long_row, torch.cat([torch.zeros(1, 3, dtype=torch.long), short_row], 1)])
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    dec = StaticDecoder(m, StaticCache(config=m.config, max_cache_len=16), 2)
    toks = [dec.prefill(ids, mask)]
    toks += [dec.step().clone() for _ in range(5)]
    toks = torch.cat(toks, 1)
    assert torch.equal(toks[:1], _greedy(m, long_row, 6))
    assert torch.equal(toks[1:], _greedy(m, short_row, 6))


def test_static_decoder_refuses_what_it_cannot_do():
    m = tiny_model("gemma3")
    with pytest.raises(HarnessError, match="full-attention"):
        StaticDecoder(m, StaticCache(config=m.config, max_cache_len=8), 1)
    m = tiny_model("llama")
    dec = StaticDecoder(m, StaticCache(config=m.config, max_cache_len=4), 1)
    dec.prefill(torch.zeros(1, 3, dtype=torch.long))
    dec.step()
    with pytest.raises(HarnessError, match="full"):
        dec.step()
    with pytest.raises(HarnessError, match="CUDA"):
        dec.capture()


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_graph_replay_decodes_the_eager_tokens(dtype):
    """The captured step (the fused Triton kernel on the absorbed path) gives the eager step's tokens."""
    ids = torch.randint(0, 128, (4, 9), generator=torch.Generator().manual_seed(3)).cuda()
    for name, m in _models("cuda", dtype):
        eager = _static(m, ids, 12)
        graph = _static(m, ids, 12, graph=True)
        if dtype == torch.float32:
            assert torch.equal(graph, eager) and torch.equal(eager, _greedy(m, ids, 12)), name
        else:  # bf16: a rounding-level difference may flip a near-tie argmax late in a random model
            assert torch.equal(graph[:, :4], eager[:, :4]), name


@cuda
@pytest.mark.gpu
def test_absorbed_kernel_path_matches_reconstruct_on_gpu():
    """Token-by-token logits of the absorbed path through the kernel vs the reconstruct path (fp32, CUDA)."""
    base = tiny_model("llama")
    m = copy.deepcopy(base)
    convert(m, "care_mla", Budget(kv_save=0.5), tiny_stats(base))
    m = m.cuda()
    x = torch.randint(0, 128, (3, 11), generator=torch.Generator().manual_seed(4)).cuda()
    with torch.no_grad():
        ref = m(x).logits
        set_path(m, "absorbed")
        cache = DynamicCache(config=m.config)
        dec = torch.cat([m(x[:, t:t + 1], **{CACHE_ARG: cache}, use_cache=True).logits for t in range(11)], 1)
    assert (dec - ref).abs().max() <= 1e-4
