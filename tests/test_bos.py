"""Windows follow the tokenizer's BOS default (issue #10): Gemma-style tokenizers get a BOS in front of
every window, and exactly the same stream tokens are predicted and scored as without it."""
import pytest
import torch

from harness import data
from harness.calibrate import CalibSpec, get_stats, stats_key
from harness.evaluate import perplexity
from harness.heal import heal_loss
from tests.tiny import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def toks():
    return tiny_tokenizer(bos=True), tiny_tokenizer(bos=False)


def test_adds_bos_follows_the_tokenizer_default(toks, smollm_tokenizer):
    with_bos, without = toks
    assert data.adds_bos(with_bos) and not data.adds_bos(without)
    assert not data.adds_bos(smollm_tokenizer)  # SmolLM2: no BOS by default, so its numbers do not change


def test_windows_start_with_bos_and_hold_the_same_stream(toks):
    with_bos, without = toks
    a = data.token_windows(with_bos, "wiki", "eval", n=3, seq_len=40, seed=1)
    b = data.token_windows(without, "wiki", "eval", n=3, seq_len=40, seed=1)
    assert a.shape == (3, 41) and b.shape == (3, 40)
    assert (a[:, 0] == with_bos.bos_token_id).all()
    assert torch.equal(a[:, 1:], b)
    assert not (b == with_bos.bos_token_id).any()
    # an explicit choice overrides the default
    assert data.token_windows(without, "wiki", "eval", n=3, seq_len=40, seed=1, bos=True).shape == (3, 41)


def test_perplexity_with_bos_scores_the_same_tokens(toks):
    with_bos, without = toks
    model = tiny_model("llama", vocab_size=258)
    a = data.token_windows(with_bos, "wiki", "eval", n=2, seq_len=24, seed=0)
    b = data.token_windows(without, "wiki", "eval", n=2, seq_len=24, seed=0)
    ra, rb = perplexity(model, a, bos=True), perplexity(model, b)
    assert ra["tokens"] == rb["tokens"] == 2 * 23
    # the scored targets are b[:, 1:], predicted with the BOS in the context
    logits = model(input_ids=a).logits[:, 1:-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, 258), b[:, 1:].reshape(-1))
    assert abs(ra["nll"] - nll.item()) < 1e-5
    assert abs(ra["nll"] - rb["nll"]) > 1e-4  # the BOS really is in the context


def test_calibration_statistics_see_the_bos(toks, tmp_path, monkeypatch):
    monkeypatch.setenv("MLA_HARNESS_CACHE", str(tmp_path))
    with_bos, without = toks
    model = tiny_model("llama", vocab_size=258)
    spec = CalibSpec("wiki", samples=2, seq_len=16)
    sa = get_stats(model, with_bos, spec, progress=False)
    sb = get_stats(model, without, spec, progress=False)
    assert sa.n_tokens == 2 * 17 and sb.n_tokens == 2 * 16
    assert sa.meta["bos"] is True and sb.meta["bos"] is False
    assert sa.meta["key"] != sb.meta["key"] == stats_key(model, spec)
    assert not torch.allclose(sa.cov, sb.cov)


def test_heal_loss_skips_the_prediction_made_at_bos():
    torch.manual_seed(0)
    logits, ids = torch.randn(2, 6, 11), torch.randint(0, 11, (2, 6))
    full, _, _ = heal_loss(logits, ids)
    skipped, _, _ = heal_loss(logits, ids, skip=1)
    ref = torch.nn.functional.cross_entropy(logits[:, 1:-1].reshape(-1, 11), ids[:, 2:].reshape(-1))
    assert torch.allclose(skipped, ref) and not torch.allclose(full, skipped)


def test_conversion_record_says_whether_windows_had_bos(toks, tmp_path, monkeypatch):
    from harness.methods import calibrate_and_convert
    from harness.mla import Budget

    monkeypatch.setenv("MLA_HARNESS_CACHE", str(tmp_path))
    for tok, expect in zip(toks, (True, False)):
        model = tiny_model("llama", vocab_size=258)
        rec = calibrate_and_convert(model, tok, "care", Budget(kv_save=0.5), CalibSpec("wiki", 2, 16), progress=False)
        assert rec["bos"] is expect and rec["calibration"]["bos"] is expect


@pytest.mark.parametrize("bos", [False, True])
def test_perplexity_in_small_slices_scores_the_same_tokens(toks, monkeypatch, bos):
    """Gemma-3's 262k-wide logits make a batch of long windows too big for a shared GPU, so perplexity()
    runs fewer windows per forward pass and takes the loss over slices of positions: the numbers must
    not move (per window too), and the slicing must really happen."""
    import harness.evaluate as ev

    model = tiny_model("llama", vocab_size=258)
    w = data.token_windows(toks[0 if bos else 1], "wiki", "eval", n=5, seq_len=30, seed=0)
    ref = perplexity(model, w, batch_size=8, bos=bos)
    calls = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append(k["input_ids"].shape[0]) or forward(*a, **k))
    monkeypatch.setattr(ev, "_LOGITS_BYTES", 2 * 2 * w.shape[1] * 258)  # two windows of bf16 logits
    monkeypatch.setattr(ev, "_LOSS_POSITIONS", 7)
    got = perplexity(model, w, batch_size=8, bos=bos)
    assert calls == [2, 2, 1]
    assert got["tokens"] == ref["tokens"] == 5 * (w.shape[1] - 1 - bos)
    assert got["nll"] == pytest.approx(ref["nll"], abs=1e-6)
    assert got["nll_windows"] == pytest.approx(ref["nll_windows"], abs=1e-6)
