"""Heal a converted (MLA) model: LoRA (peft) or full fine-tuning on a token budget, optionally
distilling from the original model (DESIGN §3.2 step 5, §3.3 step 5).

    python -m harness.heal --model smollm2-135m --method care_joint --kv-save 0.75 \\
        --mode lora --tokens 300000 --lr 1e-3 --lora-rank 32 \\
        --eval-every-tokens 0,50000,100000,300000 --out results/heal/care_joint-75
    python -m harness.heal --help

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

import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from harness.config import HealConfig, check_heal, heal_config
from harness.errors import HarnessError

HealSpec = HealConfig  # one dataclass: the sweep's `heal:` mapping is the spec of a healing run

SEED_OFFSET = 7919  # training windows are shuffled with seed + this (calibration uses seed 0, 1, ...)
STATE_FILE = "heal_state.pt"
RESULT_FILE = "heal.json"
BETAS = (0.9, 0.95)  # MHA2MLA's AdamW betas


# ----------------------------------------------------------------------------------- data
def training_windows(tokenizer, spec: HealSpec, n: int) -> torch.Tensor:
    """`n` training windows (n, seq_len), BOS in front where the tokenizer adds one (n, 1 + seq_len):
    equal shares of each corpus's calib split, shuffled together."""
    from harness.data import token_windows

    corpora = list(spec.corpora)
    k = len(corpora)
    shares = [n // k + (1 if i < n % k else 0) for i in range(k)]
    parts = [token_windows(tokenizer, c, "calib", m, spec.seq_len, seed=spec.seed + SEED_OFFSET)
             for c, m in zip(corpora, shares) if m]
    w = torch.cat(parts)  # (n, seq_len)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(spec.seed))
    return w[perm]


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
def present_targets(model, names) -> list[str]:
    """The attention submodule names (of `names`) that exist in `model`."""
    have = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if ".self_attn." in n}
    return [t for t in names if t in have]


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
def heal(model, tokenizer, spec: HealSpec, *, teacher=None, out_dir: str | Path | None = None,
         progress: bool = True, windows: torch.Tensor | None = None,
         evaluate: Callable | None = None, checkpoint_every: int = 50,
         on_step: Callable[[dict], None] | None = None, save_model: bool = False) -> dict:
    """Heal `model` in place on `spec.tokens` training tokens.

    Args:
        model: a converted MLA model (LoRA needs its MLA modules; full also works on an original).
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
    from tqdm.auto import tqdm

    from harness.mla.convert import accounted_width, is_converted, set_path

    spec = heal_config(asdict(spec))  # lists -> tuples; full mode's default targets
    problems = check_heal(spec)
    if problems:
        raise HarnessError("heal spec: " + "; ".join(f"{k}: {m}" for k, m in problems))
    if spec.mode == "none":
        return {"mode": "none", "tokens_seen": 0}
    if spec.kd_weight > 0 and teacher is None:
        raise HarnessError(f"kd_weight={spec.kd_weight} needs the original model: pass teacher=, or set kd_weight 0")
    t_start = time.perf_counter()
    device = next(model.parameters()).device
    tps = spec.tokens_per_step
    steps = spec.tokens // tps
    if steps < 1:
        raise HarnessError(f"tokens={spec.tokens} is less than one optimizer step (batch_size*grad_accum*seq_len "
                           f"= {tps}); raise tokens or lower batch_size/grad_accum/seq_len")
    micro = spec.batch_size * spec.grad_accum
    from harness.data import adds_bos

    skip = int(adds_bos(tokenizer))  # windows start with BOS: its prediction is not a target
    if windows is None:
        windows = training_windows(tokenizer, spec, steps * micro)
    elif windows.shape[0] < steps * micro or windows.shape[1] != spec.seq_len + skip:
        raise HarnessError(f"windows {tuple(windows.shape)} are too few or not seq_len={spec.seq_len} "
                           f"(+1 for BOS) long: {steps} steps need ({steps * micro}, {spec.seq_len + skip})")
    if evaluate is None and spec.eval_every_tokens:
        evaluate = _default_evaluate(tokenizer, list(spec.corpora))
    converted = is_converted(model)
    width = accounted_width(model) if converted else None
    path = model.config.mla_conversion.get("path", "reconstruct") if converted else None
    if converted and path != "reconstruct":
        set_path(model, "reconstruct")  # the absorbed path reads up_k/up_v weights directly, bypassing LoRA

    # Trainable parameters. Seeded first: LoRA's A init and dropout draw from torch's RNG.
    torch.manual_seed(spec.seed)
    random.seed(spec.seed)
    was_training = model.training
    grad_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    net = attach_lora(model, spec) if spec.mode == "lora" else model
    if spec.mode == "full":
        _select_full(model, spec)
    trainable = {n: p for n, p in net.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(list(trainable.values()), lr=spec.lr, betas=BETAS, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_multiplier(s, steps, spec.schedule, spec.warmup_frac, spec.decay_frac))

    # Resume.
    state_path = Path(out_dir) / STATE_FILE if out_dir is not None else None
    step, log, curve = 0, [], []
    if state_path is not None:
        state_path.parent.mkdir(parents=True, exist_ok=True)
        if state_path.exists():
            st = torch.load(state_path, map_location="cpu", weights_only=False)
            if st["spec"] != _spec_key(spec) or st["steps"] != steps:
                raise HarnessError(f"{state_path} was written by another healing config; delete it to start over, "
                                   "or give another out_dir")
            with torch.no_grad():
                for n, p in trainable.items():
                    p.copy_(st["trainable"][n])
            opt.load_state_dict(st["optimizer"])
            sched.load_state_dict(st["scheduler"])
            step, log, curve = st["step"], st["log"], st["curve"]
            _set_rng_state(st["rng"])
            assert st["tokens_seen"] == step * tps, "checkpoint tokens_seen disagrees with its step count"
    resumed_from = step * tps
    marks = sorted(set(spec.eval_every_tokens))
    done_marks = {c["mark"] for c in curve}

    def run_evals(final: bool):
        todo = [m for m in marks if m not in done_marks and (m <= step * tps or final)]
        if not todo:
            return
        net.eval()
        metrics = evaluate(net)
        net.train()
        for m in todo:
            done_marks.add(m)
        curve.append({"mark": todo[-1], "tokens": step * tps, **metrics})
        _wandb_log({f"heal/{k}": v for k, v in metrics.items()} | {"heal/tokens": step * tps})
        if progress:
            tqdm.write(f"heal: {step * tps} tokens: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))

    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    net.train()
    if teacher is not None:
        teacher.eval()
    bar = tqdm(total=steps * tps, initial=step * tps, unit="tok", unit_scale=True, desc=f"heal {spec.mode}",
               disable=not progress, dynamic_ncols=True)
    t_loop, tokens_here = time.perf_counter(), 0
    try:
        run_evals(final=False)
        while step < steps:
            t0 = time.perf_counter()
            loss_sum = ce_sum = kd_sum = 0.0
            for a in range(spec.grad_accum):
                i0 = (step * spec.grad_accum + a) * spec.batch_size
                ids = windows[i0: i0 + spec.batch_size].to(device)  # (B, T)
                with autocast:
                    logits = net(input_ids=ids, use_cache=False).logits  # (B, T, V)
                    t_logits = None
                    if spec.kd_weight > 0:
                        with torch.no_grad():
                            t_logits = teacher(input_ids=ids, use_cache=False).logits
                loss, ce, kd = heal_loss(logits, ids, t_logits, spec.kd_weight, spec.kd_temperature, skip)
                (loss / spec.grad_accum).backward()
                loss_sum += loss.item() / spec.grad_accum
                ce_sum += ce.item() / spec.grad_accum
                kd_sum += (kd.item() if kd is not None else 0.0) / spec.grad_accum
                del logits, t_logits, loss
            params = list(trainable.values())
            gnorm = (torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm) if spec.max_grad_norm > 0
                     else torch.sqrt(sum((p.grad.float() ** 2).sum() for p in params if p.grad is not None)))
            lr = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            tokens_here += tps
            rec = {"step": step, "tokens": step * tps, "loss": loss_sum, "ce": ce_sum, "lr": lr,
                   "grad_norm": float(gnorm), "tokens_per_s": tps / (time.perf_counter() - t0)}
            if spec.kd_weight > 0:
                rec["kd"] = kd_sum
            log.append(rec)
            _wandb_log({f"heal/{k}": v for k, v in rec.items()})
            bar.update(tps)
            bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{lr:.2e}")
            run_evals(final=step == steps)
            if state_path is not None and (step % checkpoint_every == 0 or step == steps):
                _save_state(state_path, trainable, opt, sched,
                            {"spec": _spec_key(spec), "steps": steps, "step": step, "tokens_seen": step * tps,
                             "log": log, "curve": curve})
            if on_step is not None:
                on_step(rec)
    except BaseException:  # interrupted or failed: no adapters left behind (full mode keeps its partial update)
        bar.close()
        _restore(model, net if spec.mode == "lora" else None, grad_flags, was_training, path)
        raise
    bar.close()
    loop_seconds = time.perf_counter() - t_loop
    optimizer_steps = _optimizer_steps(opt)
    del opt, sched

    # Back to a plain model.
    merge_diff = None
    if spec.mode == "lora":
        probe = windows[:2, : min(64, windows.shape[1])].to(device)
        net.eval()
        with torch.no_grad():
            before = net(input_ids=probe, use_cache=False).logits.float()
            merged = merge_lora(net)
            assert merged is model, "peft merged into another object; heal() must modify the model in place"
            after = model(input_ids=probe, use_cache=False).logits.float()
        merge_diff = float((before - after).abs().max())
    _restore(model, None, grad_flags, was_training, path)
    if converted:
        assert accounted_width(model) == width, "healing changed the latent cache width"
    result = {
        "mode": spec.mode, "spec": _spec_key(spec), "tokens_budget": spec.tokens, "tokens_per_step": tps,
        "tokens_seen": step * tps, "steps": steps, "optimizer_steps": optimizer_steps,
        "resumed_from_tokens": resumed_from, "seconds": time.perf_counter() - t_start,
        "tokens_per_s": tokens_here / loop_seconds if tokens_here else None,
        "loss_first": log[0]["loss"] if log else None,
        "loss_last": sum(r["loss"] for r in log[-10:]) / len(log[-10:]) if log else None,
        "trainable_params": sum(p.numel() for p in trainable.values()),
        "merge_max_abs_diff": merge_diff, "cache_width": width, "curve": curve, "log": log,
    }
    if converted:
        model.config.mla_conversion["heal"] = {k: result[k] for k in ("spec", "tokens_seen", "steps")}
    if out_dir is not None:
        out_dir = Path(out_dir)
        tmp = out_dir / f".{RESULT_FILE}.tmp{os.getpid()}"
        tmp.write_text(json.dumps(result, indent=2, default=str))
        os.replace(tmp, out_dir / RESULT_FILE)
        if save_model and converted:
            from harness.mla.persist import save_converted

            save_converted(model, tokenizer, out_dir / "model")
    return result


def _restore(model, peft_model, grad_flags: dict, was_training: bool, path: str | None) -> None:
    """Undo heal()'s changes of state: adapters (dropped unmerged), requires_grad, train mode, decode path."""
    from harness.mla.convert import set_path

    if peft_model is not None:
        peft_model.unload()
    for n, p in model.named_parameters():
        p.requires_grad_(grad_flags.get(n, p.requires_grad))
    model.train(was_training)
    if path not in (None, "reconstruct"):
        set_path(model, path)


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


# ----------------------------------------------------------------------------------- CLI
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _count(text: str) -> int:
    """An integer token count: 300000, 300_000, 300k, 1.5M."""
    t = text.strip().lower().replace("_", "")
    scale = {"k": 1_000, "m": 1_000_000}.get(t[-1:], 1)
    return int(round(float(t[:-1] if scale > 1 else t) * scale))


HELP = {  # one line per HealSpec field (the same words as the comments in harness/config.py)
    "mode": "lora | full", "tokens": "training-token budget, e.g. 300k (whole optimizer steps, never more)",
    "label": "name shown in tables", "lr": "peak learning rate (LoRA ~1e-3, full ~1e-4)",
    "lora_rank": "LoRA rank", "lora_alpha": "LoRA alpha (scale alpha/rank)", "lora_dropout": "LoRA dropout",
    "targets": "lora: comma-separated of down,up_k,up_v,k_rope_proj,q_proj,o_proj; full: all | attention",
    "kd_weight": "loss = CE + kd_weight * T^2 * KL(original || healed); 0: plain CE",
    "kd_temperature": "distillation temperature T", "schedule": "cosine | wsd (warmup, constant, 1-sqrt decay)",
    "warmup_frac": "share of steps warming up", "decay_frac": "wsd: share of steps in the final decay",
    "weight_decay": "AdamW weight decay", "max_grad_norm": "gradient clipping norm (0: off)",
    "batch_size": "windows per micro-batch", "seq_len": "tokens per window",
    "grad_accum": "micro-batches per optimizer step", "corpora": "comma-separated training corpora (calib split)",
    "seed": "seed of the data order, LoRA init and dropout",
    "eval_every_tokens": "comma-separated token counts for the perplexity curve, e.g. 0,50k,100k,300k",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m harness.heal", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python -m harness.heal --model smollm2-135m --method care_joint --kv-save 0.75 \\\n"
               "      --mode lora --tokens 300k --lr 1e-3 --lora-rank 32 \\\n"
               "      --eval-every-tokens 0,50k,100k,300k --out results/heal/care_joint-75")
    g = p.add_argument_group("model", "a converted directory, or a model plus --method/--kv-save to convert first")
    g.add_argument("--model", default="smollm2-135m", help="embedded name, directory (converted or not), .gguf, hub id")
    g.add_argument("--method", default=None, help="convert with this method first (mla-harness methods)")
    b = g.add_mutually_exclusive_group()
    b.add_argument("--kv-save", type=float, default=None, help="conversion budget: KV save fraction")
    b.add_argument("--rank", type=int, default=None, help="conversion budget: rank per K and per V")
    g.add_argument("--option", action="append", help="method option key=value (repeatable)")
    g.add_argument("--calib", default="wiki")
    g.add_argument("--calib-samples", type=int, default=64)
    g.add_argument("--calib-seq-len", type=int, default=256)
    g.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    g.add_argument("--dtype", default=None, help="fp32 | bf16 (default: bf16 on cuda, fp32 on cpu)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (on a busy shared box 1 can be several times faster than 2)")
    h = p.add_argument_group("healing", "the fields of a sweep's heal: mapping (same names)")
    defaults = HealConfig(mode="lora")
    for name, f in HealConfig.__dataclass_fields__.items():
        d = getattr(defaults, name)
        helptext = f"{HELP.get(name, '')} (default: {','.join(map(str, d)) if isinstance(d, tuple) else d})"
        if name in ("tokens", "eval_every_tokens") or isinstance(d, tuple):
            h.add_argument(_flag(name), default=None, help=helptext)
        else:
            h.add_argument(_flag(name), type=type(d), default=None, help=helptext)
    e = p.add_argument_group("curve and output")
    e.add_argument("--ppl-domains", default="wiki", help="corpora for the perplexity curve")
    e.add_argument("--ppl-samples", type=int, default=32)
    e.add_argument("--ppl-seq-len", type=int, default=256)
    e.add_argument("--checkpoint-every", type=int, default=25, help="optimizer steps between checkpoints")
    e.add_argument("--out", required=True, help="run folder: checkpoint (resumes), heal.json, model/")
    e.add_argument("--no-save", action="store_true", help="do not write the healed model to OUT/model")
    e.add_argument("--wandb", action="store_true", help="log the loss curve to W&B (offline unless WANDB_MODE)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def spec_from_args(a) -> HealSpec:
    """The HealSpec of parsed CLI args; every bad flag in one error."""
    raw = {"mode": "lora"}
    for name in HealConfig.__dataclass_fields__:
        v = getattr(a, name)
        if v is None:
            continue
        if name == "tokens":
            v = _count(v)
        elif name == "eval_every_tokens":
            v = tuple(_count(x) for x in v.split(",") if x.strip())
        elif isinstance(getattr(HealConfig(), name), tuple):
            v = tuple(x.strip() for x in v.split(",") if x.strip())
        raw[name] = v
    spec = heal_config(raw)
    problems = check_heal(spec)
    if spec.mode == "none":
        problems.append(("mode", "none does nothing here; use lora or full"))
    if problems:
        raise HarnessError("; ".join(f"{_flag(k)}: {m}" for k, m in problems))
    return spec


def main(argv: list[str] | None = None) -> int:
    for k, v in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("WANDB_MODE", "offline"),
                 ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(k, v)
    a = build_parser().parse_args(argv)
    try:
        return _main(a)
    except HarnessError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _main(a) -> int:
    import copy

    from harness.evaluate import PplSpec
    from harness.mla.convert import is_converted
    from harness.models import load_model

    spec = spec_from_args(a)
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(a.model, device=a.device, dtype=a.dtype)
    teacher = None
    if a.method:
        from harness.calibrate import CalibSpec
        from harness.cli import _parse_options
        from harness.methods import calibrate_and_convert
        from harness.mla import Budget

        if (a.kv_save is None) == (a.rank is None):
            raise HarnessError("--method needs one of --kv-save or --rank")
        if spec.kd_weight > 0:
            teacher = copy.deepcopy(model)
        calibrate_and_convert(model, tok, a.method, Budget(kv_save=a.kv_save, rank=a.rank),
                              CalibSpec(a.calib, a.calib_samples, a.calib_seq_len, 0), progress=not a.quiet,
                              **_parse_options(a.option))
    elif spec.kd_weight > 0:
        raise HarnessError("--kd-weight > 0 needs the original model: give --model ORIGINAL --method ... to convert here")
    if not is_converted(model) and spec.mode == "lora":
        raise HarnessError(f"{a.model} is not converted; give --method and --kv-save (or a converted directory)")
    evaluate = _default_evaluate(tok, a.ppl_domains.split(","), PplSpec(a.ppl_samples, a.ppl_seq_len))
    run = None
    if a.wandb:
        import wandb

        run = wandb.init(project=os.environ.get("WANDB_PROJECT", "mla-harness"), job_type="heal", dir=str(out),
                         name=f"heal {out.name}", config={"heal": _spec_key(spec), "model": a.model,
                                                           "method": a.method, "kv_save": a.kv_save})
    try:
        res = heal(model, tok, spec, teacher=teacher, out_dir=out, progress=not a.quiet, evaluate=evaluate,
                   checkpoint_every=a.checkpoint_every, save_model=not a.no_save)
    finally:
        if run is not None:
            run.finish()
    print(f"healed {res['tokens_seen']} tokens in {res['steps']} steps ({res['seconds']:.0f} s); "
          f"loss {res['loss_first']:.3f} -> {res['loss_last']:.3f}; merge max |diff| {res['merge_max_abs_diff']}")
    for c in res["curve"]:
        print(f"  {c['tokens']:>9d} tokens  " + "  ".join(f"{k} {v:.3f}" for k, v in c.items()
                                                         if k not in ("mark", "tokens")))
    print(f"-> {out / RESULT_FILE}" + ("" if a.no_save else f", {out / 'model'}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
