"""BatchedHFLM scores every request as lm-eval's HFLM does (harness.hflm)."""

import random

import pytest
import torch


def _requests(model, vocab: int, max_length: int):
    """Requests that exercise every branch of HFLM's scoring: multi-token continuations, one-token
    continuations sharing a context (the `contexts` cache, hits of 1 and of 4), two requests whose
    context + continuation[:-1] coincide with different context/continuation splits, inputs longer
    than the model's length (left truncation), and continuations the model predicts greedily."""
    rng = random.Random(0)
    tok = lambda n: [rng.randrange(3, vocab) for _ in range(n)]  # noqa: E731
    reqs = []
    for _ in range(12):
        reqs.append((tok(rng.randrange(1, 40)), tok(rng.randrange(1, 6))))
    shared = tok(17)
    reqs += [(shared, [t]) for t in tok(4)]  # one forward pass answers four requests
    ctx = tok(9)
    reqs += [(ctx, tok(1)), (ctx[:-3], ctx[-3:] + tok(1))]  # variable length in one cache group
    reqs += [(tok(max_length + 20), tok(3)), (tok(max_length - 2), tok(4))]  # truncated from the left
    with torch.no_grad():  # greedy continuations: is_greedy must come out True for these
        for n in (5, 11):
            c = tok(n)
            ids = torch.tensor([c], device=model.device)
            out = model.generate(ids, max_new_tokens=4, do_sample=False)[0, n:].tolist()
            reqs += [(c, out), (c, out[:1])]
    return [((f"ctx{i}", f"cont{i}"), c, k) for i, (c, k) in enumerate(reqs)]


@pytest.mark.parametrize("batch_size,keeps_logits", [(1, True), (4, True), (64, True), (4, False)])
def test_batched_scoring_equals_hflm(tiny_llama, smollm_tokenizer, batch_size, keeps_logits, monkeypatch):
    """Equal to HFLM with the output layer on the read positions only (the default for *ForCausalLM)
    and with full logits (a model whose forward lacks `logits_to_keep`)."""
    from lm_eval.models.huggingface import HFLM

    from harness.hflm import BatchedHFLM

    monkeypatch.setattr(BatchedHFLM, "_keeps_logits", keeps_logits)
    tiny_llama.eval()
    max_length = 48
    reqs = _requests(tiny_llama, len(smollm_tokenizer), max_length)
    kw = dict(pretrained=tiny_llama, tokenizer=smollm_tokenizer, batch_size=batch_size, max_length=max_length)
    ref = HFLM(**kw)._loglikelihood_tokens(reqs, disable_tqdm=True)
    got = BatchedHFLM(**kw)._loglikelihood_tokens(reqs, disable_tqdm=True)
    assert len(got) == len(ref) == len(reqs)
    assert [g for _, g in got] == [g for _, g in ref]
    assert sum(g for _, g in ref) >= 4  # the greedy continuations were recognised
    torch.testing.assert_close(torch.tensor([s for s, _ in got]), torch.tensor([s for s, _ in ref]),
                               rtol=1e-6, atol=1e-5)
    assert len({s for s, _ in ref}) > len(reqs) - 3  # distinct scores: a mis-ordered answer would show


def test_output_layer_runs_on_the_read_positions_only(tiny_llama, smollm_tokenizer, monkeypatch):
    """The forward pass gets `logits_to_keep` and returns logits for fewer positions than the batch has."""
    from harness.hflm import BatchedHFLM

    tiny_llama.eval()
    reqs = _requests(tiny_llama, len(smollm_tokenizer), 48)
    seen = []
    forward = tiny_llama.forward

    def spy(input_ids=None, **kw):
        out = forward(input_ids=input_ids, **kw)
        seen.append((input_ids.shape[1], out.logits.shape[1], kw.get("logits_to_keep")))
        return out

    monkeypatch.setattr(tiny_llama, "forward", spy)
    lm = BatchedHFLM(pretrained=tiny_llama, tokenizer=smollm_tokenizer, batch_size=4, max_length=48)
    lm._keeps_logits = True  # the spy's signature hides the parameter; the model's has it
    lm._loglikelihood_tokens(reqs, disable_tqdm=True)
    assert seen and all(k is not None and kept == len(k) for _, kept, k in seen)
    assert sum(kept for _, kept, _ in seen) < sum(n for n, _, _ in seen) / 2


def test_batch_size_probe_keeps_the_output_layer_on_the_read_positions(tiny_llama, smollm_tokenizer, monkeypatch):
    """On a GPU the batch size is lm-eval's search ("auto"). HFLM's probe asks for full-window logits,
    which for Gemma-3's 262k vocabulary picked 6-8 rows where the scoring pass fits 32; the probe here
    passes `logits_to_keep` as the scoring does, and still shrinks on out-of-memory."""
    from harness.hflm import BatchedHFLM

    tiny_llama.eval()
    reqs = _requests(tiny_llama, len(smollm_tokenizer), 48)
    seen = []
    forward = tiny_llama.forward

    def spy(input_ids=None, **kw):  # runs out of memory above 8 rows, or above 2 rows with full logits
        keep = kw.get("logits_to_keep")
        seen.append((input_ids.shape[0], input_ids.shape[1], None if keep is None else len(keep)))
        if input_ids.shape[0] > (8 if keep is not None else 2):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (test)")
        return forward(input_ids=input_ids, **kw)

    monkeypatch.setattr(tiny_llama, "forward", spy)
    lm = BatchedHFLM(pretrained=tiny_llama, tokenizer=smollm_tokenizer, batch_size="auto", max_batch_size=32,
                     max_length=48)
    lm._keeps_logits = True
    assert lm._detect_batch_size(reqs, pos=0) == 8
    sizes = [b for b, _, _ in seen]  # shrinking from max_batch_size until one fits (5 passes there)
    assert sizes[0] == 32 and sizes == sorted(sizes, reverse=True) and sizes[-5:] == [8] * 5
    _, ctx, cont = reqs[0]
    assert all(n == min(len(ctx) + len(cont) - 1, 48) and k == min(2 * len(cont), n) for _, n, k in seen)
    lm._keeps_logits = False  # a model without logits_to_keep: lm-eval's own probe, full logits
    seen.clear()
    assert lm._detect_batch_size(reqs, pos=0) == 2 and all(k is None for _, _, k in seen)


def test_run_lm_eval_scores_through_it_with_hflms_results(tiny_llama, smollm_tokenizer, monkeypatch):
    """run_lm_eval scores through BatchedHFLM, and every document's result equals HFLM's."""
    from lm_eval.models.huggingface import HFLM

    import harness.hflm
    from harness.lmeval import run_lm_eval

    calls = []
    orig = harness.hflm.BatchedHFLM._loglikelihood_tokens

    def spy(self, requests, *a, **k):
        calls.append(len(requests))
        return orig(self, requests, *a, **k)

    monkeypatch.setattr(harness.hflm.BatchedHFLM, "_loglikelihood_tokens", spy)
    tasks = ["arc_easy", "piqa"]
    _, got = run_lm_eval(tiny_llama, smollm_tokenizer, tasks, limit=6, batch_size=4)
    assert sum(calls) > 2 * 6  # every choice of every document went through the batched path
    n_calls = len(calls)
    monkeypatch.setattr(harness.hflm, "BatchedHFLM", HFLM)
    _, ref = run_lm_eval(tiny_llama, smollm_tokenizer, tasks, limit=6, batch_size=4)
    assert len(calls) == n_calls  # the reference run did not go through it
    assert got["per_document"] == ref["per_document"]
    for t in tasks:
        assert got["results"][t] == ref["results"][t]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_scoring_equals_hflm_on_cuda(tiny_llama, smollm_tokenizer, dtype):
    """On the device the batched gather and the one transfer give HFLM's answers (bf16 included)."""
    import copy

    from lm_eval.models.huggingface import HFLM

    from harness.hflm import BatchedHFLM

    model = copy.deepcopy(tiny_llama).to("cuda", dtype).eval()
    reqs = _requests(model, len(smollm_tokenizer), 48)
    kw = dict(pretrained=model, tokenizer=smollm_tokenizer, batch_size=8, max_length=48)
    ref = HFLM(**kw)._loglikelihood_tokens(reqs, disable_tqdm=True)
    got = BatchedHFLM(**kw)._loglikelihood_tokens(reqs, disable_tqdm=True)
    assert [g for _, g in got] == [g for _, g in ref]
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-2)  # bf16 sums: an ulp
    torch.testing.assert_close(torch.tensor([s for s, _ in got]), torch.tensor([s for s, _ in ref]), **tol)
