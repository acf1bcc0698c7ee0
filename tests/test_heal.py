"""Healing (harness.heal) on tiny random MLA models: loss goes down, KD weight 0 is plain CE,
LoRA merges exactly, an interrupted run resumes without counting its tokens twice."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

from harness.config import parse_sweep
from harness.specs import HealConfig
from harness.errors import HarnessError
from harness.heal import HealSpec, attach_lora, heal, heal_loss, lr_multiplier, merge_lora
from harness.methods import convert
from harness.mla import Budget, accounted_width
from harness.mla.persist import load_converted, save_converted
from tests.tiny import tiny_model, tiny_stats

SEQ = 32


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls on a shared 2-core box: one thread avoids OpenMP spin contention (10x here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def converted():
    """Tiny Llama converted with mha2mla (so down, up_k, up_v and k_rope_proj all exist)."""
    m = tiny_model("llama")
    convert(m, "mha2mla", Budget(kv_save=0.5), tiny_stats(m))
    return m


def repeated_windows(n=64, seed=0):
    """A tiny repeated corpus: one random 8-token phrase over and over, (n, SEQ)."""
    g = torch.Generator().manual_seed(seed)
    phrase = torch.randint(0, 128, (8,), generator=g)
    return phrase.repeat(n * SEQ // 8).view(n, SEQ)


def spec(**kw):
    base = dict(mode="lora", tokens=8 * 4 * SEQ, lr=1e-2, lora_rank=4, lora_alpha=8, batch_size=4, seq_len=SEQ,
                warmup_frac=0.0, seed=0)
    return HealSpec(**{**base, **kw})


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("mode,targets", [("lora", ("down", "up_k", "up_v", "k_rope_proj", "q_proj", "o_proj")),
                                          ("full", ("attention",))])
def test_loss_goes_down_on_repeated_corpus(converted, mode, targets):
    m = copy.deepcopy(converted)
    res = heal(m, None, spec(mode=mode, targets=targets, tokens=12 * 4 * SEQ, lr=1e-2 if mode == "lora" else 3e-3),
               windows=repeated_windows(48), progress=False)
    losses = [r["loss"] for r in res["log"]]
    assert res["steps"] == 12 and res["tokens_seen"] == 12 * 4 * SEQ
    assert sum(losses[-3:]) / 3 < 0.85 * losses[0], losses  # ln(128) = 4.85 at the start


def test_kd_weight_zero_is_plain_ce(converted):
    g = torch.Generator().manual_seed(0)
    logits, t_logits = torch.randn(2, SEQ, 128, generator=g), torch.randn(2, SEQ, 128, generator=g)
    ids = torch.randint(0, 128, (2, SEQ), generator=g)
    loss, ce, kd = heal_loss(logits, ids, t_logits, kd_weight=0.0, temperature=2.0)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))
    assert torch.equal(loss, ref) and torch.equal(ce, ref) and kd > 0
    # A whole run: teacher given with kd_weight 0 == no teacher (same losses, same weights).
    a, b = copy.deepcopy(converted), copy.deepcopy(converted)
    w = repeated_windows(32)
    ra = heal(a, None, spec(kd_weight=0.0), windows=w, progress=False)
    rb = heal(b, None, spec(kd_weight=0.0), teacher=copy.deepcopy(converted), windows=w, progress=False)
    assert [r["loss"] for r in ra["log"]] == [r["loss"] for r in rb["log"]]
    wa, wb = weights(a), weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_kd_is_zero_against_itself_and_changes_training(converted):
    s, t = copy.deepcopy(converted), copy.deepcopy(converted)
    res = heal(s, None, spec(kd_weight=1.0, kd_temperature=2.0), teacher=t, windows=repeated_windows(32),
               progress=False)
    assert res["log"][0]["kd"] < 1e-6  # LoRA starts at B = 0: student == teacher
    assert res["log"][-1]["kd"] > res["log"][0]["kd"]
    with pytest.raises(HarnessError, match="teacher"):
        heal(copy.deepcopy(converted), None, spec(kd_weight=1.0), windows=repeated_windows(32), progress=False)


def test_lora_merge_matches_unmerged_and_keeps_cache(converted, tmp_path, smollm_tokenizer):
    m = copy.deepcopy(converted)
    width = accounted_width(m)
    torch.manual_seed(1)
    peft_model = attach_lora(m, spec(targets=("down", "up_k", "up_v", "k_rope_proj", "q_proj", "o_proj")))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    ids = repeated_windows(2, seed=3)
    with torch.no_grad():
        before = peft_model(input_ids=ids).logits
        merged = merge_lora(peft_model)
        after = merged(input_ids=ids).logits
        base = converted(input_ids=ids).logits
    assert merged is m
    assert (before - after).abs().max() <= 1e-4
    assert (before - base).abs().max() > 1e-2, "the adapters should change the model"
    assert accounted_width(m) == width
    assert not any("lora" in n for n, _ in m.named_parameters())
    save_converted(m, smollm_tokenizer, tmp_path / "healed")  # the healed model is a plain converted one
    loaded, _ = load_converted(tmp_path / "healed")
    with torch.no_grad():
        assert (loaded(input_ids=ids).logits - after).abs().max() <= 1e-5
    assert accounted_width(loaded) == width


def test_heal_result_reports_merge_and_width(converted):
    m = copy.deepcopy(converted)
    res = heal(m, None, spec(), windows=repeated_windows(32), progress=False)
    assert res["merge_max_abs_diff"] <= 1e-4
    assert res["cache_width"] == accounted_width(m) == accounted_width(converted)
    assert m.config.mla_conversion["heal"]["tokens_seen"] == res["tokens_seen"]
    flags = {n: p.requires_grad for n, p in converted.named_parameters()}
    assert {n: p.requires_grad for n, p in m.named_parameters()} == flags, "requires_grad is restored"
    assert not m.training


class Interrupt(Exception):
    pass


def test_interrupted_run_resumes_without_double_counting(converted, tmp_path):
    s = spec(tokens=8 * 4 * SEQ, lora_dropout=0.1)  # dropout: the RNG state must resume too
    w = repeated_windows(32)
    ref_model = copy.deepcopy(converted)
    ref = heal(ref_model, None, s, windows=w, progress=False, out_dir=tmp_path / "ref", checkpoint_every=3)

    def stop_at_5(rec):
        if rec["step"] == 5:
            raise Interrupt

    m = copy.deepcopy(converted)
    with pytest.raises(Interrupt):
        heal(m, None, s, windows=w, progress=False, out_dir=tmp_path / "run", checkpoint_every=3, on_step=stop_at_5)
    assert not any("lora" in n for n, _ in m.named_parameters()), "an interrupted run leaves no adapters behind"
    m = copy.deepcopy(converted)  # a fresh process: the original converted model again
    res = heal(m, None, s, windows=w, progress=False, out_dir=tmp_path / "run", checkpoint_every=3)
    assert res["resumed_from_tokens"] == 3 * 4 * SEQ
    assert res["tokens_seen"] == s.tokens == ref["tokens_seen"]
    assert res["optimizer_steps"] == ref["optimizer_steps"] == ref["steps"] == 8
    assert [r["loss"] for r in res["log"]] == pytest.approx([r["loss"] for r in ref["log"]], abs=1e-6)
    wr, wm = weights(ref_model), weights(m)
    assert all(torch.allclose(wr[k], wm[k], atol=1e-6) for k in wr)
    # A finished run restarted does no more steps.
    again = heal(copy.deepcopy(converted), None, s, windows=w, progress=False, out_dir=tmp_path / "run")
    assert again["resumed_from_tokens"] == again["tokens_seen"] == s.tokens
    # A checkpoint of another config is refused, not silently reused.
    with pytest.raises(HarnessError, match="another healing config"):
        heal(copy.deepcopy(converted), None, spec(tokens=8 * 4 * SEQ, lr=5e-3), windows=w, progress=False,
             out_dir=tmp_path / "run")


def test_schedules():
    cos = [lr_multiplier(s, 100, "cosine", 0.1) for s in range(100)]
    assert cos[9] == 1.0 and cos[0] == 0.1 and all(a >= b for a, b in zip(cos[9:], cos[10:])) and cos[-1] < 0.01
    wsd = [lr_multiplier(s, 100, "wsd", 0.1, 0.2) for s in range(100)]
    assert wsd[9:80] == [1.0] * 71 and wsd[80] == 1.0 and wsd[-1] == pytest.approx(1 - (19 / 20) ** 0.5)
    assert all(a >= b for a, b in zip(wsd[80:], wsd[81:]))


def test_budget_smaller_than_one_step_is_an_error(converted):
    with pytest.raises(HarnessError, match="less than one optimizer step"):
        heal(copy.deepcopy(converted), None, spec(tokens=10), windows=repeated_windows(8), progress=False)


def test_sweep_heal_variants_and_validation():
    raw = {"models": ["smollm2-135m"], "budgets": [{"kv_save": 0.75}], "methods": ["care_joint"],
           "heal": [{"mode": "none", "lr": 5}, {"mode": "lora", "tokens": 1000, "lr": "2e-3", "corpora": "wiki"},
                    {"mode": "full", "tokens": 1000}]}
    s = parse_sweep(raw)
    heals = [j.heal for j in s.jobs if not j.is_baseline]
    assert [h.mode for h in heals] == ["none", "lora", "full"]
    assert heals[0] == HealConfig() and heals[1].lr == 2e-3 and heals[1].corpora == ("wiki",)
    assert heals[2].targets == ("all",) and heals[1].display == "lora-1k"
    bad = {**raw, "heal": [{"mode": "lora", "tokens": 0, "rank": 4, "schedule": "linear", "targets": ["v_proj"],
                            "corpora": ["wikki"], "eval_every_tokens": [5000]}]}
    with pytest.raises(HarnessError) as e:
        parse_sweep(bad)
    msg = str(e.value)
    for key in ("heal.0.rank: unknown key (did you mean 'lora_rank'?)", "heal.0.tokens", "heal.0.schedule",
                "heal.0.targets", "heal.0.corpora", "heal.0.eval_every_tokens"):
        assert key in msg, msg


def test_heal_none_keeps_job_ids():
    raw = {"models": ["smollm2-135m"], "budgets": [{"kv_save": 0.5}], "methods": ["svd"]}
    a = parse_sweep(raw)
    b = parse_sweep({**raw, "heal": [{"mode": "none"}]})
    assert [j.job_id for j in a.jobs] == [j.job_id for j in b.jobs]


def _sweep_on_a_tiny_model(monkeypatch):
    """run_job on a tiny Llama: its base model, cached statistics and the repeated training phrase."""
    import harness.calibrate
    import harness.heal
    import harness.sweep as sweep

    base = tiny_model("llama")
    stats = tiny_stats(base)
    stats.meta.update(seconds=0.0, cached=True)
    monkeypatch.setattr(sweep, "_base_model", lambda job: (base, None))
    monkeypatch.setattr(harness.calibrate, "get_stats", lambda *a, **k: stats)
    monkeypatch.setattr(harness.heal, "training_windows", lambda tok, spec, n: repeated_windows(n))
    return base


def test_run_job_heals_and_reports(converted, tmp_path, monkeypatch):
    """The sweep's run_job: one-shot and healed rows side by side, curve in metrics, checkpoint cleaned up."""
    import json

    import harness.evaluate
    import harness.sweep as sweep
    from harness.specs import BudgetConfig, CalibConfig, EvalConfig, JobConfig, MethodConfig, PplConfig, heal_config

    base = _sweep_on_a_tiny_model(monkeypatch)

    def fake_ppl(model, tok, domains, spec):  # the tiny model has no tokenizer
        ids = repeated_windows(2)  # the training phrase: healing must lower it
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss.item()
        return {d: {"ppl": float(torch.tensor(loss).exp()), "nll": loss, "tokens": 62, "seconds": 0.0} for d in domains}

    monkeypatch.setattr(harness.evaluate, "domain_perplexities", fake_ppl)
    job = dict(model="tiny", method=MethodConfig("mha2mla"), calib=CalibConfig(), budget=BudgetConfig(kv_save=0.5),
               eval=EvalConfig(ppl=PplConfig(domains=("wiki",))))
    one_shot = JobConfig(**job)
    healed = JobConfig(**job, heal=heal_config(mode="lora", tokens=4 * 4 * SEQ, lr=1e-2, lora_rank=4, batch_size=4,
                                               seq_len=SEQ, eval_every_tokens=[0, 4 * 4 * SEQ]))
    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / "runs" / "b").mkdir(parents=True)
    r0 = sweep.run_job(one_shot, tmp_path / "runs" / "a")
    r1 = sweep.run_job(healed, tmp_path / "runs" / "b")
    assert (r0["heal"], r0["heal_tokens"]) == ("none", 0)
    assert (r1["heal"], r1["heal_mode"], r1["heal_tokens"]) == ("lora-512", "lora", 4 * 4 * SEQ)
    assert r1["cache_width"] == r0["cache_width"]
    assert r1["ppl_wiki"] < r0["ppl_wiki"]
    curve = json.loads((tmp_path / "runs" / "b" / "metrics.json").read_text())["heal"]["curve"]
    assert [c["tokens"] for c in curve] == [0, 4 * 4 * SEQ] and curve[0]["ppl_wiki"] == pytest.approx(r0["ppl_wiki"])
    assert not (tmp_path / "runs" / f".{healed.job_id}.heal").exists()


def test_curve_scores_tasks_in_their_papers_metric(converted, tmp_path, monkeypatch):
    """With curve_tasks, each mark records every task's accuracies and acc_mean over the asked groups in
    the metric their paper reports (mha2mla_eval: acc_norm_nospace), as the leaderboard averages them."""
    import json

    import harness.evaluate
    import harness.lmeval
    import harness.sweep as sweep
    from harness.specs import BudgetConfig, CalibConfig, EvalConfig, JobConfig, MethodConfig, PplConfig, heal_config

    base = _sweep_on_a_tiny_model(monkeypatch)
    monkeypatch.setattr(harness.evaluate, "domain_perplexities",
                        lambda m, tok, d, s: {x: {"ppl": 2.0, "nll": 0.7, "tokens": 1, "seconds": 0.0} for x in d})
    calls = []

    def fake_lm_eval(model, tok, tasks, **kw):
        calls.append(tasks)
        k = len(calls)  # a different score at each call: the curve must record each mark's own
        return [{"task": "mha2mla_eval", "metric": "acc", "value": 0.30 + k / 100, "stderr": 0.01, "n": 10},
                {"task": "mha2mla_eval", "metric": "acc_norm_nospace", "value": 0.40 + k / 100, "stderr": 0.01, "n": 10},
                {"task": "mha2mla_piqa", "metric": "acc_norm_nospace", "value": 0.6, "stderr": 0.01, "n": 10},
                {"task": "mha2mla_eval", "metric": "perplexity", "value": 9.0, "stderr": 0.1, "n": 10}], {}

    monkeypatch.setattr(harness.lmeval, "run_lm_eval", fake_lm_eval)
    job = JobConfig(model="tiny", method=MethodConfig("mha2mla"), calib=CalibConfig(), budget=BudgetConfig(kv_save=0.5),
                    eval=EvalConfig(ppl=PplConfig(domains=("wiki",)), tasks=("mha2mla_eval",)),
                    heal=heal_config(mode="lora", tokens=4 * 4 * SEQ, lr=1e-2, lora_rank=4, batch_size=4, seq_len=SEQ,
                                     eval_every_tokens=[0, 4 * 4 * SEQ], curve_tasks=True))
    (tmp_path / "runs" / "c").mkdir(parents=True)
    sweep.run_job(job, tmp_path / "runs" / "c")
    curve = json.loads((tmp_path / "runs" / "c" / "metrics.json").read_text())["heal"]["curve"]
    assert len(curve) == 2 and len(calls) == 3  # two marks, then the final row's scoring
    for k, point in enumerate(curve, start=1):
        assert point["acc_mean"] == pytest.approx(0.40 + k / 100)  # acc_norm_nospace, not acc
        assert point["mha2mla_eval/acc"] == pytest.approx(0.30 + k / 100)
        assert point["mha2mla_piqa/acc_norm_nospace"] == 0.6 and "mha2mla_eval/perplexity" not in point


# ------------------------------------------------------------------ healing as a controlled experiment
def test_corpus_shares_follow_the_weights():
    from harness.heal import corpus_shares

    assert corpus_shares(spec(corpora=("wiki", "code", "math")), 10) == [4, 3, 3]
    assert corpus_shares(spec(corpora=("wiki", "code"), weights=(3.0, 1.0)), 10) == [8, 2]  # 7.5/2.5 -> 8/2
    assert sum(corpus_shares(spec(corpora=("a", "b", "c"), weights=(0.35, 0.45, 0.2)), 997)) == 997


def test_mixed_corpus_windows_are_cached_and_resume_exactly(tmp_path, monkeypatch):
    """The weighted mix of real corpora (tiny byte tokenizer): windows come from the calib splits in
    their shares, are cached, and an interrupted run on them resumes to the uninterrupted result."""
    from harness.heal import training_windows
    from tests.tiny import tiny_tokenizer

    monkeypatch.setenv("MLA_HARNESS_CACHE", str(tmp_path / "cache"))
    tok = tiny_tokenizer(bos=False)
    s = spec(tokens=6 * 4 * SEQ, corpora=("wiki", "code"), weights=(2.0, 1.0), lora_dropout=0.1)
    w = training_windows(tok, s, 24)
    assert w.shape == (24, SEQ) and list((tmp_path / "cache" / "windows").glob("*.pt"))
    assert torch.equal(training_windows(tok, s, 24), w)  # from the cache, identical
    base = tiny_model("llama", vocab_size=258)
    convert(base, "mha2mla", Budget(kv_save=0.5), tiny_stats(base))
    ref_model = copy.deepcopy(base)
    ref = heal(ref_model, tok, s, progress=False, out_dir=tmp_path / "ref")

    def stop_at_4(rec):
        if rec["step"] == 4:
            raise Interrupt

    with pytest.raises(Interrupt):
        heal(copy.deepcopy(base), tok, s, progress=False, out_dir=tmp_path / "run", checkpoint_every=2,
             on_step=stop_at_4)
    m = copy.deepcopy(base)
    res = heal(m, tok, s, progress=False, out_dir=tmp_path / "run", checkpoint_every=2)
    assert res["resumed_from_tokens"] == 4 * 4 * SEQ and res["windows_sha"] == ref["windows_sha"]
    assert [r["loss"] for r in res["log"]] == pytest.approx([r["loss"] for r in ref["log"]], abs=1e-6)
    wr, wm = weights(ref_model), weights(m)
    assert all(torch.allclose(wr[k], wm[k], atol=1e-6) for k in wr)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_the_fine_tuned_original_control_trains_on_the_same_windows_and_steps(tmp_path, monkeypatch, mode):
    """A healing sweep's baseline job with the same heal config: the unconverted model trained with the
    same recipe on exactly the same tokens (same windows, same steps) as the converted one."""
    import harness.sweep as sweep
    from harness.specs import BudgetConfig, CalibConfig, EvalConfig, JobConfig, MethodConfig, PplConfig, heal_config
    from tests.tiny import tiny_tokenizer

    monkeypatch.setenv("MLA_HARNESS_CACHE", str(tmp_path / "cache"))
    tok, base = tiny_tokenizer(bos=False), tiny_model("llama", vocab_size=258)
    monkeypatch.setattr(sweep, "_base_model", lambda job: (base, tok))
    h = heal_config(mode=mode, tokens=3 * 4 * SEQ, lr=1e-3, lora_rank=4, batch_size=4, seq_len=SEQ,
                    corpora=("wiki", "code"), targets=("down", "up_k", "up_v", "q_proj") if mode == "lora" else "all")
    ev = EvalConfig(ppl=PplConfig(domains=("wiki",), samples=2, seq_len=SEQ))
    converted = JobConfig("tiny", MethodConfig("care_joint"), CalibConfig(samples=2, seq_len=SEQ), BudgetConfig(0.5),
                          heal=h, eval=ev)
    control = JobConfig("tiny", None, None, None, heal=h, eval=ev)
    rows, metrics = [], []
    for job in (converted, control):
        out = tmp_path / job.job_id
        out.mkdir()
        rows.append(sweep.run_job(job, out))
        metrics.append(json.loads((out / "metrics.json").read_text())["heal"])
    assert metrics[0]["windows_sha"] == metrics[1]["windows_sha"]
    assert metrics[0]["steps"] == metrics[1]["steps"] == 3 and rows[0]["heal"] == rows[1]["heal"]
    assert rows[1]["method"] == "baseline" and rows[1]["heal_tokens"] == 3 * 4 * SEQ
    assert metrics[1]["trainable_params"] > 0 and metrics[1]["cache_width"] is None
    assert base.model.layers[0].self_attn.k_proj.weight.requires_grad  # the shared original is untouched
    assert not any("lora" in n for n, _ in base.named_parameters())


def test_sweep_adds_the_control_and_compares_healed_rows_with_it():
    import pandas as pd

    from harness.leaderboard import leaderboard_frame

    raw = {"models": ["smollm2-135m"], "budgets": [{"kv_save": 0.75}], "methods": ["care_joint"],
           "heal": [{"mode": "none"}, {"mode": "full", "tokens": "20M", "corpora": {"wiki": 0.4, "chat": 0.6}}]}
    s = parse_sweep(raw)
    kinds = [(j.is_baseline, j.heal.mode) for j in s.jobs]
    assert kinds == [(True, "none"), (True, "full"), (False, "none"), (False, "full")]
    h = s.jobs[1].heal
    assert h.tokens == 20_000_000 and h.corpora == ("wiki", "chat") and h.weights == (0.4, 0.6)
    assert len(parse_sweep({**raw, "heal_baseline": False}).jobs) == 3
    rows = pd.DataFrame([
        {"job_id": "a", "status": "ok", "model": "m", "method": "baseline", "heal": "none", "kv_save": 0.0, "ppl_wiki": 10.0},
        {"job_id": "b", "status": "ok", "model": "m", "method": "baseline", "heal": "full-20M", "kv_save": 0.0, "ppl_wiki": 8.0},
        {"job_id": "c", "status": "ok", "model": "m", "method": "cj", "heal": "none", "kv_save": 0.75, "ppl_wiki": 20.0},
        {"job_id": "d", "status": "ok", "model": "m", "method": "cj", "heal": "full-20M", "kv_save": 0.75, "ppl_wiki": 12.0}])
    lb = leaderboard_frame(rows).set_index(["method", "heal"])["ratio_wiki"]
    assert lb[("cj", "none")] == 2.0 and lb[("cj", "full-20M")] == 1.5  # against the original fine-tuned alike
    assert lb[("baseline", "full-20M")] == 1.0
