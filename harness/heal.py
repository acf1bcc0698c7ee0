"""Heal a converted (MLA) model: LoRA (peft) or full fine-tuning on a token budget, optionally
distilling from the original model (DESIGN §3.2 step 5, §3.3 step 5, §10).

    mla-harness heal --model smollm2-135m --method care_joint --kv-save 0.75 \\
        --mode lora --tokens 300k --lr 1e-3 --lora-rank 32 \\
        --eval-every-tokens 0,50k,100k,300k --out results/heal/care_joint-75

    from harness.heal import HealSpec, heal
    result = heal(model, tok, HealSpec(mode="lora", tokens=300_000), teacher=original, out_dir=run_dir)

Training text: windows of `seq_len` tokens from the `calib` split of each corpus in `corpora`
(equal shares, shuffled together), drawn with another seed than calibration. The `eval` split,
which every perplexity window comes from, never shares a document with them (harness.data).

One optimizer step sees batch_size * grad_accum * seq_len tokens; the run takes
tokens // that many steps, so it never trains on more than `tokens`.
Loss: CE + kd_weight * T^2 * KL(teacher_T || student_T) per token (T = kd_temperature; the
teacher is the original model; kd_weight 0 is plain CE and never runs the teacher).
AdamW (betas 0.9, 0.95) with `cosine` (linear warmup, cosine to 0) or `wsd` (MHA2MLA: warmup,
constant, 1-sqrt decay over the last decay_frac of steps); gradient clipping; bf16 autocast on
CUDA, fp32 on CPU.

Checkpoints: with `out_dir`, every `checkpoint_every` steps (and at the end) one file
`heal_state.pt` is replaced atomically: trainable tensors, optimizer, scheduler, tokens_seen, the
log, the curve and the RNG states. A restarted run resumes from it, so the token budget is never
counted twice and the result equals an uninterrupted run.

LoRA is merged with `merge_and_unload` at the end: the model is again a plain converted MLA model
(same modules, same latent cache width) that `harness.mla.persist` saves and loads.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from harness.errors import HarnessError
from harness.specs import HealConfig, heal_config

HealSpec = HealConfig  # one dataclass: the sweep's `heal:` mapping is the spec of a healing run

SEED_OFFSET = 7919  # training windows are shuffled with seed + this (calibration uses seed 0, 1, ...)
STATE_FILE = "heal_state.pt"
RESULT_FILE = "heal.json"
BETAS = (0.9, 0.95)  # MHA2MLA's AdamW betas


# ----------------------------------------------------------------------------------- data
def corpus_shares(spec: HealSpec, n: int) -> list[int]:
    """Windows per corpus: `spec.weights` as token shares (empty: equal), largest remainders rounded up."""
    k = len(spec.corpora)
    w = [float(x) for x in spec.weights] if spec.weights else [1.0] * k
    exact = [n * x / sum(w) for x in w]
    shares = [int(e) for e in exact]
    for i in sorted(range(k), key=lambda i: exact[i] - shares[i], reverse=True)[: n - sum(shares)]:
        shares[i] += 1
    return shares


def training_windows(tokenizer, spec: HealSpec, n: int) -> torch.Tensor:
    """`n` training windows (n, seq_len), BOS in front where the tokenizer adds one (n, 1 + seq_len):
    each corpus's calib split in its share (`corpus_shares`), packed (documents joined with EOS and cut
    into windows), shuffled together.

    The windows of a large budget take a while to tokenize (20M tokens: ~30 s), and every run of a
    healing sweep (the converted models and the fine-tuned original) trains on the same ones, so they
    are cached under $MLA_HARNESS_CACHE/windows, keyed by the spec's data fields and the tokenizer.
    """
    from harness.data import token_windows, tokenizer_fingerprint
    from harness.paths import cache_root

    shares = corpus_shares(spec, n)
    key = hashlib.sha256(json.dumps({"corpora": list(spec.corpora), "shares": shares, "seq_len": spec.seq_len,
                                      "seed": spec.seed, "offset": SEED_OFFSET,
                                      "tokenizer": tokenizer_fingerprint(tokenizer)}).encode()).hexdigest()[:20]
    path = cache_root() / "windows" / f"{key}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    parts = [token_windows(tokenizer, c, "calib", m, spec.seq_len, seed=spec.seed + SEED_OFFSET)
             for c, m in zip(spec.corpora, shares) if m]
    w = torch.cat(parts)  # (n, seq_len)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(spec.seed))
    w = w[perm].contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(w, tmp)
    os.replace(tmp, path)
    return w


# ----------------------------------------------------------------------------------- loss
def heal_loss(logits: torch.Tensor, ids: torch.Tensor, teacher_logits: torch.Tensor | None = None,
              kd_weight: float = 0.0, temperature: float = 1.0, skip: int = 0):
    """Next-token CE, plus kd_weight * T^2 * KL(teacher || student) at temperature T when a teacher is given.

    Args:
        logits / teacher_logits: (B, T, V); ids: (B, T), position t predicts ids[:, t + 1].
        skip: leading positions whose prediction is not a target (1 when ids[:, 0] is a BOS put in
            front of a window cut mid-document: what follows a BOS there is no document's start).
    Returns:
        (loss, ce, kd) as 0-dim tensors (kd is None without teacher logits).
    """
    V = logits.shape[-1]
    s = logits[:, skip:-1].float().reshape(-1, V)  # (B*(T-1-skip), V)
    ce = F.cross_entropy(s, ids[:, 1 + skip:].reshape(-1))
    if teacher_logits is None:
        return ce, ce, None
    t = teacher_logits[:, skip:-1].float().reshape(-1, V)
    T = temperature
    kd = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True,
                  reduction="batchmean") * T * T  # mean over tokens of the per-token KL
    return ce + kd_weight * kd, ce, kd


# ----------------------------------------------------------------------------------- schedule
def lr_multiplier(step: int, steps: int, schedule: str = "cosine", warmup_frac: float = 0.05,
                  decay_frac: float = 0.2) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based) of `steps`."""
    warm = int(round(warmup_frac * steps))
    if step < warm:
        return (step + 1) / warm
    if schedule == "cosine":
        progress = (step - warm) / max(1, steps - warm)
        return 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "wsd":
        decay = max(1, int(round(decay_frac * steps))) if decay_frac > 0 else 0
        start = steps - decay
        if step < start or decay == 0:
            return 1.0
        return 1 - math.sqrt((step - start) / decay)
    raise HarnessError(f"unknown schedule {schedule!r}; use cosine or wsd")


# ----------------------------------------------------------------------------------- trainables
# On an unconverted model (the fine-tuned-original control of a healing sweep) the MLA projections
# do not exist; their counterparts are the original key and value projections.
ORIGINAL_COUNTERPART = {"down": ("k_proj", "v_proj"), "up_k": ("k_proj",), "up_v": ("v_proj",), "k_rope_proj": ("k_proj",)}


def present_targets(model, names) -> list[str]:
    """The attention submodule names (of `names`) that exist in `model`; on an unconverted model the
    MLA targets stand for k_proj / v_proj, so the control trains the same kind of adapters."""
    have = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if ".self_attn." in n}
    out = []
    for t in names:
        for c in (t,) if t in have else ORIGINAL_COUNTERPART.get(t, ()):
            if c in have and c not in out:
                out.append(c)
    return out


def attach_lora(model, spec: HealSpec):
    """Wrap `model` with LoRA adapters on its attention submodules named in `spec.targets`.

    Returns:
        the peft model (the adapters live inside `model`; `merge_lora` undoes the wrapping).
    Raises:
        HarnessError: none of the targets exists (e.g. an unconverted model with MLA targets).
    """
    from peft import LoraConfig, get_peft_model

    names = present_targets(model, spec.targets)
    if not names:
        raise HarnessError(f"LoRA targets {list(spec.targets)} match no attention module of this model; "
                           "heal a converted model (its MLA modules have down, up_k, up_v, k_rope_proj) "
                           "or add q_proj/o_proj to targets")
    cfg = LoraConfig(r=spec.lora_rank, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout, bias="none",
                     target_modules=r".*\.self_attn\.(" + "|".join(names) + ")")
    return get_peft_model(model, cfg)


def merge_lora(peft_model):
    """Fold the adapters into the base weights; returns the plain (converted) model."""
    return peft_model.merge_and_unload()


def _select_full(model, spec: HealSpec) -> None:
    scope = spec.targets[0]
    for name, p in model.named_parameters():
        p.requires_grad_(scope == "all" or ".self_attn." in name)


# ----------------------------------------------------------------------------------- checkpoint
def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _save_state(path: Path, trainable: dict, opt, sched, progress: dict) -> None:
    """One file, written to a temp name and renamed: a kill leaves the previous checkpoint intact."""
    state = {"trainable": {n: p.detach().cpu() for n, p in trainable.items()}, "optimizer": opt.state_dict(),
             "scheduler": sched.state_dict(), "rng": _rng_state(), **progress}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _spec_key(spec: HealSpec) -> dict:
    return json.loads(json.dumps(asdict(spec), default=list))


# ----------------------------------------------------------------------------------- healing
@dataclass
class _Run:
    """One healing run's state, shared by the steps of `heal`."""

    spec: HealSpec
    model: torch.nn.Module  # the model healed in place
    net: torch.nn.Module  # what trains: the peft wrapper (lora) or the model itself
    windows: torch.Tensor  # (n, skip + seq_len) training ids
    skip: int  # 1 when windows start with BOS: its prediction is not a target
    steps: int  # optimizer steps of the whole run
    trainable: dict
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    restore: Callable[[], None]  # puts requires_grad, train mode and the decode path back
    width: int | None  # the latent cache width before healing (None: an unconverted model)
    step: int = 0
    log: list = field(default_factory=list)
    curve: list = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return self.step * self.spec.tokens_per_step


def heal(model, tokenizer, spec: HealSpec, *, teacher=None, out_dir: str | Path | None = None,
         progress: bool = True, windows: torch.Tensor | None = None,
         evaluate: Callable | None = None, checkpoint_every: int = 50,
         on_step: Callable[[dict], None] | None = None, save_model: bool = False) -> dict:
    """Heal `model` in place on `spec.tokens` training tokens.

    Args:
        model: a converted MLA model (LoRA needs its MLA modules; full also works on an original,
            which is how the fine-tuned-original control of a healing sweep is trained).
        tokenizer: builds the training windows (and the default perplexity curve).
        spec: mode, budget, optimizer and data settings (`HealSpec`, the sweep's `heal:` mapping).
        teacher: the original model, needed when spec.kd_weight > 0.
        out_dir: checkpoint folder (`heal_state.pt`, `heal.json`); a run restarted with the same
            out_dir and spec resumes there. None: no checkpoints.
        progress: tqdm bar with tokens/s.
        windows: (n, seq_len) training ids to use instead of the corpus mix (tests, custom data).
        evaluate: fn(model) -> {metric: float} for the curve at spec.eval_every_tokens; default
            perplexity on the eval split of spec.corpora (harness.evaluate.PplSpec defaults).
        checkpoint_every: optimizer steps between checkpoints.
        on_step: called with each step's log record after it is checkpointed (tests use it to
            interrupt a run).
        save_model: also write the healed model to out_dir/model (harness.mla.persist).
    Returns:
        {mode, tokens_budget, tokens_seen, steps, optimizer_steps, resumed_from_tokens, seconds,
         tokens_per_s, loss_first, loss_last, trainable_params, curve, log, merge_max_abs_diff, ...}
    Raises:
        HarnessError: an invalid spec, a missing teacher, or a checkpoint of another spec.
    """
    spec = _checked(spec, teacher)
    if spec.mode == "none":
        return {"mode": "none", "tokens_seen": 0}
    t_start = time.perf_counter()
    run = _prepare(model, tokenizer, spec, windows)
    state_path = _resume(run, out_dir)
    resumed_from = run.tokens
    if evaluate is None and spec.eval_every_tokens:
        evaluate = _default_evaluate(tokenizer, list(spec.corpora))
    try:
        t_loop = time.perf_counter()
        _train(run, teacher, evaluate, state_path, checkpoint_every, on_step, progress)
        loop_seconds = time.perf_counter() - t_loop
    except BaseException:  # interrupted or failed: no adapters left behind (full mode keeps its partial update)
        if spec.mode == "lora":
            run.net.unload()
        run.restore()
        raise
    result = _result(run, resumed_from, loop_seconds, time.perf_counter() - t_start)
    result["merge_max_abs_diff"] = _merge(run) if spec.mode == "lora" else None
    run.restore()
    _record(run, result, tokenizer, out_dir, save_model)
    return result


def _checked(spec: HealSpec, teacher) -> HealSpec:
    """The spec in canonical form (lists -> tuples, full mode's default targets); every problem at once."""
    from harness.data import check_corpus

    spec = heal_config(asdict(spec))
    problems = spec.problems() + [("corpora", m) for c in (spec.corpora if spec.mode != "none" else ())
                                  if (m := check_corpus(c))]
    if problems:
        raise HarnessError("heal spec: " + "; ".join(f"{k}: {m}" for k, m in problems))
    if spec.kd_weight > 0 and teacher is None:
        raise HarnessError(f"kd_weight={spec.kd_weight} needs the original model: pass teacher=, or set kd_weight 0")
    return spec


def _prepare(model, tokenizer, spec: HealSpec, windows: torch.Tensor | None) -> _Run:
    """Data, trainable parameters (adapters or a scope of the model), optimizer and schedule."""
    from harness.data import adds_bos
    from harness.mla.convert import accounted_width, is_converted, set_path

    tps = spec.tokens_per_step
    steps = spec.tokens // tps
    if steps < 1:
        raise HarnessError(f"tokens={spec.tokens} is less than one optimizer step (batch_size*grad_accum*seq_len "
                           f"= {tps}); raise tokens or lower batch_size/grad_accum/seq_len")
    n = steps * spec.batch_size * spec.grad_accum
    skip = int(adds_bos(tokenizer))
    if windows is None:
        windows = training_windows(tokenizer, spec, n)
    elif windows.shape[0] < n or windows.shape[1] != spec.seq_len + skip:
        raise HarnessError(f"windows {tuple(windows.shape)} are too few or not seq_len={spec.seq_len} "
                           f"(+1 for BOS) long: {steps} steps need ({n}, {spec.seq_len + skip})")
    # The absorbed path reads up_k/up_v weights directly, bypassing LoRA: train on reconstruct.
    path = model.config.mla_conversion.get("path", "reconstruct") if is_converted(model) else None
    if path not in (None, "reconstruct"):
        set_path(model, "reconstruct")
    was_training = model.training
    grad_flags = {n: p.requires_grad for n, p in model.named_parameters()}

    def restore() -> None:
        for name, p in model.named_parameters():
            p.requires_grad_(grad_flags.get(name, p.requires_grad))
        model.train(was_training)
        if path not in (None, "reconstruct"):
            set_path(model, path)

    # Seeded first: LoRA's A init and dropout draw from torch's RNG.
    torch.manual_seed(spec.seed)
    random.seed(spec.seed)
    net = attach_lora(model, spec) if spec.mode == "lora" else model
    if spec.mode == "full":
        _select_full(model, spec)
    trainable = {n: p for n, p in net.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(list(trainable.values()), lr=spec.lr, betas=BETAS, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_multiplier(s, steps, spec.schedule, spec.warmup_frac, spec.decay_frac))
    width = accounted_width(model) if is_converted(model) else None
    return _Run(spec, model, net, windows, skip, steps, trainable, opt, sched, restore, width)


def _resume(run: _Run, out_dir) -> Path | None:
    """Continue from `out_dir/heal_state.pt` when a run of the same spec left one; the checkpoint path."""
    if out_dir is None:
        return None
    path = Path(out_dir) / STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        return path
    st = torch.load(path, map_location="cpu", weights_only=True)
    if st["spec"] != _spec_key(run.spec) or st["steps"] != run.steps:
        raise HarnessError(f"{path} was written by another healing config; delete it to start over, "
                           "or give another out_dir")
    with torch.no_grad():
        for n, p in run.trainable.items():
            p.copy_(st["trainable"][n])
    run.opt.load_state_dict(st["optimizer"])
    run.sched.load_state_dict(st["scheduler"])
    run.step, run.log, run.curve = st["step"], st["log"], st["curve"]
    _set_rng_state(st["rng"])
    assert st["tokens_seen"] == run.tokens, "checkpoint tokens_seen disagrees with its step count"
    return path


def _train(run: _Run, teacher, evaluate, state_path, checkpoint_every, on_step, progress) -> None:
    """The optimizer steps left, with the curve's evaluations and the checkpoints between them."""
    from tqdm.auto import tqdm

    spec, tps = run.spec, run.spec.tokens_per_step
    device = next(run.model.parameters()).device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    marks = sorted(set(spec.eval_every_tokens))
    done_marks = {c["mark"] for c in run.curve}

    def evaluate_due(final: bool) -> None:
        due = [m for m in marks if m not in done_marks and (m <= run.tokens or final)]
        if not due:
            return
        run.net.eval()
        metrics = evaluate(run.model)  # LoRA adapters live inside the model: it is what the peft wrapper runs
        run.net.train()
        done_marks.update(due)
        run.curve.append({"mark": due[-1], "tokens": run.tokens, **metrics})
        _wandb_log({f"heal/{k}": v for k, v in metrics.items()} | {"heal/tokens": run.tokens})
        if progress:
            tqdm.write(f"heal: {run.tokens} tokens: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))

    run.net.train()
    if teacher is not None:
        teacher.eval()
    bar = tqdm(total=run.steps * tps, initial=run.tokens, unit="tok", unit_scale=True, desc=f"heal {spec.mode}",
               disable=not progress, dynamic_ncols=True)
    try:
        evaluate_due(final=False)
        while run.step < run.steps:
            t0 = time.perf_counter()
            losses = _step(run, teacher, device, autocast)
            rec = {"step": run.step, "tokens": run.tokens, **losses, "tokens_per_s": tps / (time.perf_counter() - t0)}
            if device.type == "cuda":
                rec["gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            run.log.append(rec)
            _wandb_log({f"heal/{k}": v for k, v in rec.items()})
            bar.update(tps)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.2e}")
            evaluate_due(final=run.step == run.steps)
            if state_path is not None and (run.step % checkpoint_every == 0 or run.step == run.steps):
                _save_state(state_path, run.trainable, run.opt, run.sched,
                            {"spec": _spec_key(spec), "steps": run.steps, "step": run.step,
                             "tokens_seen": run.tokens, "log": run.log, "curve": run.curve})
            if on_step is not None:
                on_step(rec)
    finally:
        bar.close()


def _step(run: _Run, teacher, device, autocast) -> dict:
    """One optimizer step over grad_accum micro-batches; its losses, lr and gradient norm."""
    spec = run.spec
    loss_sum = ce_sum = kd_sum = 0.0
    for a in range(spec.grad_accum):
        i0 = (run.step * spec.grad_accum + a) * spec.batch_size
        ids = run.windows[i0: i0 + spec.batch_size].to(device)  # (B, T)
        with autocast:
            logits = run.net(input_ids=ids, use_cache=False).logits  # (B, T, V)
            t_logits = None
            if spec.kd_weight > 0:
                with torch.no_grad():
                    t_logits = teacher(input_ids=ids, use_cache=False).logits
        loss, ce, kd = heal_loss(logits, ids, t_logits, spec.kd_weight, spec.kd_temperature, run.skip)
        (loss / spec.grad_accum).backward()
        loss_sum += loss.item() / spec.grad_accum
        ce_sum += ce.item() / spec.grad_accum
        kd_sum += (kd.item() if kd is not None else 0.0) / spec.grad_accum
        del logits, t_logits, loss
    params = list(run.trainable.values())
    gnorm = (torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm) if spec.max_grad_norm > 0
             else torch.sqrt(sum((p.grad.float() ** 2).sum() for p in params if p.grad is not None)))
    lr = run.opt.param_groups[0]["lr"]
    run.opt.step()
    run.sched.step()
    run.opt.zero_grad(set_to_none=True)
    run.step += 1
    out = {"loss": loss_sum, "ce": ce_sum, "lr": lr, "grad_norm": float(gnorm)}
    if spec.kd_weight > 0:
        out["kd"] = kd_sum
    return out


def _merge(run: _Run) -> float:
    """Fold the LoRA adapters into the model; the largest logit change that caused (a check)."""
    device = next(run.model.parameters()).device
    probe = run.windows[:2, : min(64, run.windows.shape[1])].to(device)
    run.net.eval()
    with torch.no_grad():
        before = run.net(input_ids=probe, use_cache=False).logits.float()
        merged = merge_lora(run.net)
        assert merged is run.model, "peft merged into another object; heal() must modify the model in place"
        after = run.model(input_ids=probe, use_cache=False).logits.float()
    return float((before - after).abs().max())


def _result(run: _Run, resumed_from: int, loop_seconds: float, seconds: float) -> dict:
    tokens_here = run.tokens - resumed_from
    log = run.log
    return {
        "mode": run.spec.mode, "spec": _spec_key(run.spec), "tokens_budget": run.spec.tokens,
        "tokens_per_step": run.spec.tokens_per_step, "tokens_seen": run.tokens, "steps": run.steps,
        "optimizer_steps": _optimizer_steps(run.opt), "resumed_from_tokens": resumed_from, "seconds": seconds,
        "tokens_per_s": tokens_here / loop_seconds if tokens_here else None,
        "gpu_memory_gib": max((r.get("gpu_memory_gib", 0.0) for r in log), default=None) or None,
        "loss_first": log[0]["loss"] if log else None,
        "loss_last": sum(r["loss"] for r in log[-10:]) / len(log[-10:]) if log else None,
        "trainable_params": sum(p.numel() for p in run.trainable.values()),
        "cache_width": run.width,
        # which tokens it trained on: equal for every run of a healing sweep, its controls included
        "windows_sha": hashlib.sha256(run.windows.cpu().numpy().tobytes()).hexdigest()[:16],
        "curve": run.curve, "log": log,
    }


def _record(run: _Run, result: dict, tokenizer, out_dir, save_model: bool) -> None:
    """Write heal.json (and the healed model) into out_dir; note the healing in the conversion record."""
    from harness.mla.convert import accounted_width, is_converted

    if run.width is not None:
        assert accounted_width(run.model) == run.width, "healing changed the latent cache width"
        run.model.config.mla_conversion["heal"] = {k: result[k] for k in ("spec", "tokens_seen", "steps")}
    if out_dir is None:
        return
    out_dir = Path(out_dir)
    tmp = out_dir / f".{RESULT_FILE}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(result, indent=2, default=str))
    os.replace(tmp, out_dir / RESULT_FILE)
    if save_model and is_converted(run.model):
        from harness.mla.persist import save_converted

        save_converted(run.model, tokenizer, out_dir / "model")


def _optimizer_steps(opt) -> int:
    """AdamW's own step count (the same for every parameter): what the optimizer really did."""
    for st in opt.state.values():
        if "step" in st:
            return int(st["step"])
    return 0


def _wandb_log(data: dict) -> None:
    """Log to the active W&B run, if the caller started one (wandb is never imported here)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.run.log(data)


def _default_evaluate(tokenizer, domains: list[str], spec=None) -> Callable:
    from harness.evaluate import PplSpec, domain_perplexities

    spec = spec or PplSpec()

    def evaluate(model) -> dict:
        return {f"ppl_{d}": r["ppl"] for d, r in domain_perplexities(model, tokenizer, domains, spec).items()}

    return evaluate
