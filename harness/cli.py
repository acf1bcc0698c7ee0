"""Command line: `mla-harness <command>` (or `python -m harness <command>`).

Quick start:
    mla-harness sweep sweeps/quick.yaml
    mla-harness convert --model smollm2-135m --method care --kv-save 0.5 --out converted/care50
    mla-harness eval --model converted/care50 --ppl wiki,code --json care50.json
    mla-harness inspect converted/care50
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from harness import reports
from harness.errors import HarnessError


def _offline_defaults() -> None:
    """Offline unless the user has said otherwise: no hub, W&B runs written locally."""
    for k, v in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"),
                 ("WANDB_MODE", "offline"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(k, v)


def _parse_options(items: list[str] | None) -> dict:
    """--option key=value (value parsed as YAML: numbers, booleans, strings)."""
    import yaml

    out = {}
    for it in items or []:
        if "=" not in it:
            raise HarnessError(f"--option {it!r} must look like key=value (e.g. --option allocation=uniform)")
        k, v = it.split("=", 1)
        out[k] = yaml.safe_load(v)
    return out


def _corpora(text: str) -> list[str]:
    """Corpus names from a flag ('wiki,data/x.txt,mix:wiki=1,code=1'), each checked (HarnessError)."""
    from harness.data import check_corpus, split_corpus_list

    names = split_corpus_list(text)
    for name in names:
        problem = check_corpus(name)
        if problem:
            raise HarnessError(problem)
    return names


# ----------------------------------------------------------------------------------- commands
def cmd_sweep(a) -> int:
    """Run a sweep file (finished jobs are skipped) and print its table."""
    from harness.config import load_sweep
    from harness.leaderboard import summary_table
    from harness.sweep import run_sweep

    sweep = load_sweep(a.file)
    if a.executor and a.executor != sweep.executor:  # another back-end: the file's options do not apply
        sweep.executor, sweep.executor_options = a.executor, {}
    if a.executor or a.executor_option:
        from harness.executors import check_executor

        sweep.executor_options = {**sweep.executor_options, **_parse_options(a.executor_option)}
        problems = check_executor(sweep.executor, sweep.executor_options)
        if problems:
            key, msg = problems[0]
            raise HarnessError(f"--executor {sweep.executor}"
                               + (f" --executor-option {key[-1]}" if key else "") + f": {msg}")
    if a.no_wandb:
        sweep.wandb = False
    df = run_sweep(sweep, Path(a.results), dry_run=a.dry_run)
    if not a.dry_run and len(df):
        print()
        print(summary_table(df))
        failed = int((df["status"] != "ok").sum()) if "status" in df else 0
        print(f"\nrows: {Path(a.results) / sweep.name / 'rows.parquet'}" + (f"  ({failed} failed)" if failed else ""))
    return 0


def cmd_convert(a) -> int:
    """Convert a model to MLA and save it (model + conversion.json)."""
    from harness.calibrate import CalibSpec
    from harness.methods import calibrate_and_convert, get_method
    from harness.mla import Budget
    from harness.mla.persist import save_converted
    from harness.models import load_model

    opts = get_method(a.method).check_options(_parse_options(a.option))  # bad options fail before loading
    a.calib = _corpora(a.calib)[0]  # a bad corpus fails before loading
    budget = Budget(kv_save=a.kv_save, rank=a.rank)
    model, tok = load_model(a.model, device=a.device, dtype=a.dtype)
    rec = calibrate_and_convert(model, tok, a.method, budget, CalibSpec(a.calib, a.calib_samples, a.calib_seq_len, a.seed),
                                path=a.path, **opts)
    rec["source_model"] = a.model
    save_converted(model, tok, Path(a.out))
    acc = rec["accounting"]
    print(f"converted {a.model} with {a.method} ({budget.label()}): cache width {acc['cache_width']} of "
          f"{acc['cache_width_original']} elements/token, KV save {acc['kv_save']:.4f} -> {a.out}")
    return 0


def cmd_eval(a) -> int:
    """Perplexity per domain and/or lm-eval tasks of a model (original or converted)."""
    from harness.evaluate import PplSpec, domain_perplexities, kv_accounting
    from harness.models import load_model

    domains = _corpora(a.ppl) if a.ppl else []  # a bad corpus fails before loading
    model, tok = load_model(a.model, device=a.device, dtype=a.dtype)
    out: dict = {"model": a.model, "kv": kv_accounting(model)}
    if a.ppl:
        out["ppl"] = domain_perplexities(model, tok, domains,
                                         PplSpec(a.ppl_samples, a.ppl_seq_len, a.seed, a.batch_size))
        for d, r in out["ppl"].items():
            print(f"ppl {d:6s} {r['ppl']:10.3f}  ({r['tokens']} tokens)")
    if a.tasks:
        from harness.lmeval import format_table, run_lm_eval

        rows, raw = run_lm_eval(model, tok, a.tasks.split(","), limit=a.limit, batch_size=a.batch_size,
                                num_fewshot=a.num_fewshot)
        print(format_table(raw))
        out["tasks"] = rows
    kv = out["kv"]
    print(f"KV cache: {kv['cache_width']} elements/token ({kv['bytes_per_token']} bytes), save {kv['kv_save']:.4f}")
    if a.json:
        from harness.sweep import atomic_write_text

        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(a.json), json.dumps(out, indent=2, default=str))
    return 0


def cmd_inspect(a) -> int:
    """Per-layer ranks, RoPE dims, accounted vs measured cache bytes, parameter count."""
    from harness.mla.inspect import inspect_model

    print(inspect_model(a.model, tokens=a.tokens))
    return 0


def cmd_models(a) -> int:
    """Embedded models (loadable offline) and whether their package is installed."""
    from harness.arch import SUPPORTED_TYPES
    from harness.models import describe_models

    for r in describe_models():
        print(f"{r['name']:14s} {'installed' if r['installed'] else 'MISSING  '}  {r['package']:22s} {r['description']}")
    print(f"\nalso: a local HF directory, a .gguf path, or a hub id; architectures: {', '.join(SUPPORTED_TYPES)}")
    return 0


def cmd_corpora(a) -> int:
    """Calibration / perplexity corpora with document and token counts."""
    from harness.data import corpus_summary

    tok = None
    if not a.no_tokens:
        from harness.models import EMBEDDED, embedded_path

        from transformers import AutoTokenizer

        folder, f = embedded_path(next(iter(EMBEDDED)))
        tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=f)
    print(f"{'name':6s} {'calib docs':>10s} {'eval docs':>10s} {'calib tokens':>13s}  source")
    for r in corpus_summary(tok):
        if "error" in r:
            print(f"{r['name']:6s} {'-':>10s} {'-':>10s} {'-':>13s}  {r['error']}")
            continue
        toks = r.get("tokens_calib")
        tt = f"~{toks / 1e6:.1f}M" if toks else "-"
        print(f"{r['name']:6s} {r['docs_calib']:10d} {r['docs_eval']:10d} {tt:>13s}  {r['source']}")
    return 0


def cmd_methods(a) -> int:
    """Registered conversion methods and their options."""
    from harness.methods import METHODS

    for name, m in sorted(METHODS.items()):
        opts = ", ".join(f"{k}={v!r}" for k, v in m.options.items()) or "-"
        print(f"{name:11s} {m.doc}\n{'':11s} options: {opts}")
    return 0


def cmd_leaderboard(a) -> int:
    """Write leaderboard.md/.csv/.html and plots/ from a results directory's rows.parquet; print the table."""
    from harness.leaderboard import write_leaderboard

    print(write_leaderboard(Path(a.results_dir), plots=not a.no_plots))
    print(f"\nwrote {Path(a.results_dir) / 'leaderboard.html'}"
          + ("" if a.no_plots else f" and {Path(a.results_dir) / 'plots'}/"))
    return 0


def cmd_sync(a) -> int:
    """Upload offline W&B runs under a results directory (wraps `wandb sync`)."""
    from harness.track import sync

    return sync(Path(a.results_dir))


def cmd_heal(a) -> int:
    """Heal a model (optionally converting it first) with LoRA or full fine-tuning."""
    from harness.heal import main as heal_main

    return heal_main(a.args)


COMMANDS = {
    "sweep": cmd_sweep, "convert": cmd_convert, "eval": cmd_eval, "inspect": cmd_inspect,
    "models": cmd_models, "corpora": cmd_corpora, "methods": cmd_methods,
    "leaderboard": cmd_leaderboard, "sync": cmd_sync, "heal": cmd_heal,
    "report": reports.cmd_report,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mla-harness", description="Convert GQA/MHA attention to MLA and benchmark it.",
                                epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def add(name):
        return sub.add_parser(name, help=COMMANDS[name].__doc__, description=COMMANDS[name].__doc__)

    def model_args(sp):
        sp.add_argument("--model", default="smollm2-135m", help="embedded name, directory, .gguf or hub id")
        sp.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
        sp.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: bf16 on cuda, fp32 on cpu)")

    s = add("sweep")
    s.add_argument("file")
    s.add_argument("--results", default="results", help="results root (default: results/)")
    s.add_argument("--dry-run", action="store_true", help="list the jobs and which are done")
    s.add_argument("--executor", default=None, help="override the sweep's executor: serial | ray | submitit")
    s.add_argument("--executor-option", action="append",
                   help="executor option key=value (repeatable), e.g. address=auto, num_gpus=1, cluster=local")
    s.add_argument("--no-wandb", action="store_true", help="do not log W&B runs")

    s = add("convert")
    model_args(s)
    s.add_argument("--method", required=True)
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--kv-save", type=float, help="fraction of the KV cache to save, e.g. 0.5")
    g.add_argument("--rank", type=int, help="rank per K and per V (CARE notation)")
    s.add_argument("--option", action="append", help="method option key=value (repeatable)")
    s.add_argument("--calib", default="wiki",
                   help="calibration corpus: a name, a path (.txt/.jsonl/.parquet/folder), hf:..., or mix:wiki=1,code=1")
    s.add_argument("--calib-samples", type=int, default=64)
    s.add_argument("--calib-seq-len", type=int, default=256)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--path", default="reconstruct", help="decode path: reconstruct | absorbed")
    s.add_argument("--out", required=True)

    s = add("eval")
    model_args(s)
    s.add_argument("--ppl", default="", help="comma-separated corpora, e.g. wiki,code,data/notes.txt")
    s.add_argument("--ppl-samples", type=int, default=32)
    s.add_argument("--ppl-seq-len", type=int, default=256)
    s.add_argument("--tasks", default="", help="lm-eval tasks/groups, e.g. arc_easy,piqa or mla_core")
    s.add_argument("--limit", type=float, default=None, help="docs per task (lm-eval --limit)")
    s.add_argument("--num-fewshot", type=int, default=None)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--json", default=None, help="write results here")

    s = add("inspect")
    s.add_argument("model")
    s.add_argument("--tokens", type=int, default=64, help="tokens to generate for the measured cache bytes")

    s = sub.add_parser("heal", help=cmd_heal.__doc__, add_help=False)  # --help reaches harness.heal
    s.add_argument("args", nargs=argparse.REMAINDER, help="arguments of python -m harness.heal")

    add("models")
    s = add("corpora")
    s.add_argument("--no-tokens", action="store_true", help="skip token counts (no tokenizer load)")
    add("methods")
    s = add("leaderboard")
    s.add_argument("results_dir", help="a sweep's results folder, e.g. results/quick")
    s.add_argument("--no-plots", action="store_true", help="tables only (no matplotlib figures)")
    s = add("sync")
    s.add_argument("results_dir", help="uploads every offline W&B run below it")
    reports.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    _offline_defaults()
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["heal"]:  # its own parser (harness.heal) owns every flag, --help included
        argv = ["heal", "--", *argv[1:]]
    args = build_parser().parse_args(argv)
    if args.command == "heal" and args.args[:1] == ["--"]:
        args.args = args.args[1:]
    if getattr(args, "limit", None) is not None and float(args.limit).is_integer():
        args.limit = int(args.limit)
    try:
        return COMMANDS[args.command](args)
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
