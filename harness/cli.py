"""Command line: `mla-harness <command>` (or `python -m harness <command>`).

Quick start:
    mla-harness sweep sweeps/quick.yaml
    mla-harness convert --model smollm2-135m --method care --kv-save 0.5 --out converted/care50
    mla-harness eval --model converted/care50 --ppl wiki,code --json care50.json
    mla-harness inspect converted/care50
    mla-harness heal --model smollm2-135m --method care_joint --kv-save 0.75 --mode lora --tokens 300k --out healed/cj75

Every command checks its arguments before any model is loaded: a bad value is one line on stderr
and exit code 2, with nothing written.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import typing
from dataclasses import fields
from pathlib import Path

from harness.errors import HarnessError
from harness.options import parse_assignments


def _environment() -> None:
    """Offline unless the user has said otherwise (no hub, W&B runs written locally), and logs a
    person can read when output goes to a file: a progress bar updates at most once a minute there
    instead of writing megabytes of carriage-return frames."""
    for k, v in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"),
                 ("WANDB_MODE", "offline"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(k, v)
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_MININTERVAL", "60")


# ----------------------------------------------------------------------------------- checks
def _corpora(text: str, flag: str) -> list[str]:
    """Canonical corpus names from a flag ('wiki,data/x.txt,mix:wiki=1,code=1'), each checked first."""
    from harness.data import check_corpus, split_corpus_list

    names = split_corpus_list(text)
    problems = [m for n in names if (m := check_corpus(n))]
    if problems:
        raise HarnessError(f"{flag}: " + "; ".join(problems))
    return names


def _method_setup(a, calib_seed: int) -> tuple:
    """(method name, resolved options, Budget, CalibSpec) from the conversion flags, all checked first."""
    from harness.calibrate import CalibSpec
    from harness.methods import get_method
    from harness.mla import Budget

    opts = get_method(a.method).check_options(parse_assignments(a.option))
    budget = Budget(kv_save=a.kv_save, rank=a.rank)
    (calib,) = _corpora(a.calib, "--calib") or [None]
    for flag, v, lo in (("--calib-samples", a.calib_samples, 1), ("--calib-seq-len", a.calib_seq_len, 2)):
        if v < lo:
            raise HarnessError(f"{flag} {v} must be >= {lo}")
    return a.method, opts, budget, CalibSpec(calib, a.calib_samples, a.calib_seq_len, calib_seed)


# ----------------------------------------------------------------------------------- commands
def cmd_sweep(a) -> int:
    """Run a sweep file (finished jobs are skipped), print its table and write its leaderboard."""
    from harness.config import load_sweep
    from harness.executors import check_executor
    from harness.leaderboard import write_leaderboard
    from harness.sweep import run_sweep

    sweep = load_sweep(a.file, overrides=a.set)
    if a.executor and a.executor != sweep.executor:  # another back-end: the file's options do not apply
        sweep.executor, sweep.executor_options = a.executor, {}
    if a.executor or a.executor_option:
        sweep.executor_options = {**sweep.executor_options, **parse_assignments(a.executor_option, "--executor-option")}
        problems = check_executor(sweep.executor, sweep.executor_options)
        if problems:
            key, msg = problems[0]
            raise HarnessError(f"--executor {sweep.executor}"
                               + (f" --executor-option {key[-1]}" if key else "") + f": {msg}")
    if a.no_wandb:
        sweep.wandb = False
    results = Path(a.results) / sweep.name
    shard = None
    if a.shard:
        try:
            i, n = (int(x) for x in a.shard.split("/"))
            assert 0 <= i < n
        except (ValueError, AssertionError):
            raise HarnessError(f"--shard {a.shard!r}: give I/N with 0 <= I < N, e.g. --shard 0/4") from None
        shard = (i, n)
    df = run_sweep(sweep, Path(a.results), dry_run=a.dry_run, shard=shard)
    if a.dry_run or not len(df):
        return 0
    failed = int((df["status"] != "ok").sum()) if "status" in df else 0
    if a.no_leaderboard:
        from harness.leaderboard import summary_table

        print("\n" + summary_table(df, results))
    else:
        print("\n" + write_leaderboard(results))
        print(f"\nleaderboard: {results / 'leaderboard.html'} (and .md, .csv, plots/)")
    print(f"rows: {results / 'rows.parquet'}" + (f"  ({failed} failed)" if failed else ""))
    return 0


def cmd_convert(a) -> int:
    """Convert a model to MLA and save it (model + conversion record)."""
    from harness.methods import calibrate_and_convert
    from harness.mla.persist import save_converted
    from harness.models import load_model

    method, opts, budget, calib = _method_setup(a, a.seed)  # every bad value fails before loading
    if a.path not in ("reconstruct", "absorbed"):
        raise HarnessError(f"--path {a.path!r}: use reconstruct or absorbed")
    model, tok = load_model(a.model, device=a.device, dtype=a.dtype, trust_remote_code=a.trust_remote_code)
    rec = calibrate_and_convert(model, tok, method, budget, calib, path=a.path, **opts)
    rec["source_model"] = a.model
    save_converted(model, tok, Path(a.out))
    acc = rec["accounting"]
    print(f"converted {a.model} with {method} ({budget.label()}): cache width {acc['cache_width']} of "
          f"{acc['cache_width_original']} elements/token, KV save {acc['kv_save']:.4f} -> {a.out}")
    return 0


def cmd_eval(a) -> int:
    """Perplexity per domain and/or lm-eval tasks of a model (original or converted)."""
    from harness.evaluate import PplSpec, domain_perplexities, kv_accounting
    from harness.models import load_model

    domains = _corpora(a.ppl, "--ppl")
    tasks = [t for t in a.tasks.split(",") if t]
    if tasks:
        from harness.lmeval import check_tasks

        check_tasks(tasks)
    if not domains and not tasks:
        raise HarnessError("nothing to evaluate: give --ppl wiki,code and/or --tasks mla_core")
    model, tok = load_model(a.model, device=a.device, dtype=a.dtype, trust_remote_code=a.trust_remote_code)
    out: dict = {"model": a.model, "kv": kv_accounting(model)}
    if domains:
        out["ppl"] = domain_perplexities(model, tok, domains, PplSpec(a.ppl_samples, a.ppl_seq_len, a.seed, a.batch_size))
        for d, r in out["ppl"].items():
            print(f"ppl {d:6s} {r['ppl']:10.3f}  ({r['tokens']} tokens)")
    if tasks:
        from harness.lmeval import format_table, run_lm_eval

        rows, raw = run_lm_eval(model, tok, tasks, limit=a.limit, batch_size=a.batch_size, num_fewshot=a.num_fewshot)
        print(format_table(raw))
        out["tasks"] = rows
    kv = out["kv"]
    print(f"KV cache: {kv['cache_width']} elements/token ({kv['bytes_per_token']} bytes), save {kv['kv_save']:.4f}")
    if a.json:
        from harness.paths import atomic_write_text

        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(a.json), json.dumps(out, indent=2, default=str))
    return 0


def cmd_inspect(a) -> int:
    """Per-layer ranks, RoPE dims, accounted vs measured cache bytes, parameter count."""
    from harness.mla.inspect import inspect_model
    from harness.models import load_model

    print(inspect_model(*load_model(a.model), tokens=a.tokens))
    return 0


def cmd_heal(a) -> int:
    """Heal a model (converting it first with --method) by LoRA or full fine-tuning on a token budget."""
    import copy

    from harness.evaluate import PplSpec
    from harness.heal import RESULT_FILE, _default_evaluate, heal
    from harness.mla.convert import is_converted
    from harness.models import load_model

    spec = heal_spec_from_args(a)
    setup = None
    if a.method:
        if (a.kv_save is None) == (a.rank is None):
            raise HarnessError("--method needs one of --kv-save or --rank")
        setup = _method_setup(a, 0)
    elif spec.kd_weight > 0:
        raise HarnessError("--kd-weight > 0 needs the original model: give --model ORIGINAL --method ... to convert here")
    domains = _corpora(a.ppl_domains, "--ppl-domains")
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    model, tok = load_model(a.model, device=a.device, dtype=a.dtype, trust_remote_code=a.trust_remote_code)
    teacher = copy.deepcopy(model) if setup and spec.kd_weight > 0 else None
    if setup:
        from harness.methods import calibrate_and_convert

        method, opts, budget, calib = setup
        calibrate_and_convert(model, tok, method, budget, calib, progress=not a.quiet, **opts)
    if not is_converted(model) and spec.mode == "lora":
        raise HarnessError(f"{a.model} is not converted; give --method and --kv-save (or a converted directory)")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    evaluate = _default_evaluate(tok, domains, PplSpec(a.ppl_samples, a.ppl_seq_len))
    run = None
    if a.wandb:
        import wandb

        run = wandb.init(project=os.environ.get("WANDB_PROJECT", "mla-harness"), job_type="heal", dir=str(out),
                         name=f"heal {out.name}", config={"heal": _asdict(spec), "model": a.model,
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


def cmd_models(a) -> int:
    """Embedded models (loadable offline), whether their packages are installed, how to get the rest."""
    from harness.models import format_models

    print(format_models())
    return 0


def cmd_corpora(a) -> int:
    """Calibration / perplexity corpora with document and token counts."""
    from harness.data import corpus_summary

    tok = None
    if not a.no_tokens:
        from transformers import AutoTokenizer

        from harness.models import EMBEDDED, embedded_path

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
    """Registered conversion methods and their options (name=default: what it may be)."""
    from harness.methods import METHODS
    from harness.options import declared_options

    for name, m in sorted(METHODS.items()):
        opts = ", ".join(f"{k}={o.default!r} ({o.describe()})" for k, o in declared_options(m.fn).items()) or "-"
        print(f"{name:11s} {m.doc}\n{'':11s} options: {opts}")
    return 0


def cmd_leaderboard(a) -> int:
    """Write leaderboard.md/.csv/.html and plots/ from a results directory's finished runs; print the table.

    The runs are collected into rows.parquet first: `--shard` processes (and a sweep stopped part-way)
    leave finished runs that no rows.parquet holds yet, and collecting never starts a job."""
    from harness.leaderboard import write_leaderboard
    from harness.sweep import collect_rows

    results = Path(a.results_dir)
    if not (results / "runs").is_dir() and not (results / "rows.parquet").exists():
        raise HarnessError(f"{results} has no runs/ and no rows.parquet: run the sweep first "
                           "(mla-harness sweep sweeps/<name>.yaml), or give a sweep's results folder, e.g. results/quick")
    if (results / "runs").is_dir():
        collect_rows(results)
    print(write_leaderboard(results, plots=not a.no_plots))
    print(f"\nwrote {Path(a.results_dir) / 'leaderboard.html'}"
          + ("" if a.no_plots else f" and {Path(a.results_dir) / 'plots'}/"))
    return 0


def cmd_publish(a) -> int:
    """Build one static site (index, a page per sweep, Pareto plot) over every sweep under RESULTS_ROOT."""
    from harness.publish import publish

    r = publish(Path(a.results_root), Path(a.out))
    print(f"published {r['sweeps']} sweep(s), {r['rows']} rows -> {r['index']}")
    return 0


def cmd_report(a) -> int:
    """Write a study's REPORT.md and figures from its results folder (mla-harness report STUDY DIR)."""
    return a.report_func(a)


def cmd_sync(a) -> int:
    """Upload offline W&B runs under a results directory (wraps `wandb sync`)."""
    from harness.track import sync

    return sync(Path(a.results_dir))


COMMANDS = {
    "sweep": cmd_sweep, "convert": cmd_convert, "eval": cmd_eval, "inspect": cmd_inspect, "heal": cmd_heal,
    "models": cmd_models, "corpora": cmd_corpora, "methods": cmd_methods,
    "leaderboard": cmd_leaderboard, "publish": cmd_publish, "sync": cmd_sync, "report": cmd_report,
}


# ----------------------------------------------------------------------------------- heal flags
HEAL_GROUP = "healing"


def _asdict(spec) -> dict:
    from dataclasses import asdict

    return json.loads(json.dumps(asdict(spec), default=list))


def count(text: str) -> int:
    """An integer token count: 300000, 300_000, 300k, 1.5M."""
    t = str(text).strip().lower().replace("_", "")
    scale = {"k": 1_000, "m": 1_000_000}.get(t[-1:], 1)
    try:
        return int(round(float(t[:-1] if scale > 1 else t) * scale))
    except ValueError:
        raise HarnessError(f"{text!r} is not a count (e.g. 300000, 300k, 1.5M)") from None


def add_heal_flags(p: argparse.ArgumentParser) -> None:
    """One flag per HealConfig field, its help the field's comment: the sweep's `heal:` keys, same names."""
    from harness.specs import HealConfig, field_help

    g = p.add_argument_group(HEAL_GROUP, "the fields of a sweep's heal: mapping (same names)")
    helps, defaults = field_help(HealConfig), HealConfig(mode="lora")
    for f in fields(HealConfig):
        d = getattr(defaults, f.name)
        shown = ",".join(map(str, d)) if isinstance(d, tuple) else d
        g.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None, metavar=f.name.upper(),
                       help=f"{helps.get(f.name, '')} (default: {shown})")


def heal_spec_from_args(a):
    """The HealConfig of parsed CLI args (mode defaults to lora); every bad flag in one error."""
    from harness.specs import HealConfig, heal_config

    hints = typing.get_type_hints(HealConfig)
    raw, problems = {"mode": "lora"}, []
    for f in fields(HealConfig):
        v = getattr(a, f.name)
        if v is None:
            continue
        hint, flag = hints[f.name], "--" + f.name.replace("_", "-")
        try:
            if typing.get_origin(hint) is tuple:
                items = [x.strip() for x in v.split(",") if x.strip()]
                v = tuple(count(x) for x in items) if typing.get_args(hint)[0] is int else tuple(items)
            elif hint is int:
                v = count(v)
            elif hint is float:
                v = float(v)
        except (HarnessError, ValueError):
            problems.append(f"{flag}: {v!r} is not {'a number' if hint is float else 'a count'}")
            continue
        raw[f.name] = v
    if problems:
        raise HarnessError("; ".join(problems))
    spec = heal_config(raw)
    problems = spec.problems()
    if spec.mode == "none":
        problems.append(("mode", "none does nothing here; use lora or full"))
    if problems:
        raise HarnessError("; ".join(f"--{k.replace('_', '-')}: {m}" for k, m in problems))
    return spec


# ----------------------------------------------------------------------------------- parser
def _model_args(sp) -> None:
    sp.add_argument("--model", default="smollm2-135m", help="embedded name, directory, .gguf or hub id")
    sp.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    sp.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: bf16 on cuda, fp32 on cpu)")
    sp.add_argument("--trust-remote-code", action="store_true",
                    help="let transformers run the model repository's own Python code (off unless given)")


def _conversion_args(sp, required: bool) -> None:
    sp.add_argument("--method", required=required, default=None, help="conversion method (mla-harness methods)")
    g = sp.add_mutually_exclusive_group(required=required)
    g.add_argument("--kv-save", type=float, help="fraction of the KV cache to save, e.g. 0.5")
    g.add_argument("--rank", type=int, help="rank per K and per V (CARE notation)")
    sp.add_argument("--option", action="append", help="method option key=value (repeatable)")
    sp.add_argument("--calib", default="wiki",
                    help="calibration corpus: a name, a path (.txt/.jsonl/.parquet/folder), hf:..., or mix:wiki=1,code=1")
    sp.add_argument("--calib-samples", type=int, default=64)
    sp.add_argument("--calib-seq-len", type=int, default=256)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mla-harness", description="Convert GQA/MHA attention to MLA and benchmark it.",
                                epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def add(name):
        return sub.add_parser(name, help=COMMANDS[name].__doc__, description=COMMANDS[name].__doc__)

    s = add("sweep")
    s.add_argument("file")
    s.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a sweep key (dotted path, YAML value; repeatable), e.g. --set eval.limit=null "
                        "--set models=[gemma3-270m]; the sweep's name says what was overridden")
    s.add_argument("--results", default="results", help="results root (default: results/)")
    s.add_argument("--dry-run", action="store_true", help="list the jobs and which are done")
    s.add_argument("--executor", default=None, help="override the sweep's executor: serial | ray | submitit")
    s.add_argument("--executor-option", action="append",
                   help="executor option key=value (repeatable), e.g. address=auto, num_gpus=1, cluster=local")
    s.add_argument("--no-wandb", action="store_true", help="do not log W&B runs")
    s.add_argument("--no-leaderboard", action="store_true",
                   help="do not write leaderboard.{md,csv,html} and plots/ at the end")
    s.add_argument("--shard", default=None, metavar="I/N",
                   help="run only jobs I, I+N, I+2N, ... (N processes split a sweep; rerun without it to collect)")

    s = add("convert")
    _model_args(s)
    _conversion_args(s, required=True)
    s.add_argument("--seed", type=int, default=0, help="calibration seed")
    s.add_argument("--path", default="reconstruct", help="decode path: reconstruct | absorbed")
    s.add_argument("--out", required=True)

    s = add("eval")
    _model_args(s)
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

    s = add("heal")
    g = s.add_argument_group("model", "a converted directory, or a model plus --method/--kv-save to convert first")
    _model_args(g)
    _conversion_args(g, required=False)
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (on a busy shared box 1 can be several times faster than 2)")
    add_heal_flags(s)
    e = s.add_argument_group("curve and output")
    e.add_argument("--ppl-domains", default="wiki", help="corpora for the perplexity curve")
    e.add_argument("--ppl-samples", type=int, default=32)
    e.add_argument("--ppl-seq-len", type=int, default=256)
    e.add_argument("--checkpoint-every", type=int, default=25, help="optimizer steps between checkpoints")
    e.add_argument("--out", required=True, help="run folder: checkpoint (resumes), heal.json, model/")
    e.add_argument("--no-save", action="store_true", help="do not write the healed model to OUT/model")
    e.add_argument("--wandb", action="store_true", help="log the loss curve to W&B (offline unless WANDB_MODE)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")

    add("models")
    s = add("corpora")
    s.add_argument("--no-tokens", action="store_true", help="skip token counts (no tokenizer load)")
    add("methods")
    s = add("leaderboard")
    s.add_argument("results_dir", help="a sweep's results folder, e.g. results/quick")
    s.add_argument("--no-plots", action="store_true", help="tables only (no matplotlib figures)")
    s = add("publish")
    s.add_argument("results_root", help="folder holding the sweeps' results (each <sweep>/rows.parquet), e.g. results")
    s.add_argument("--out", default="site", help="site folder to (re)build (default: site/)")
    s = add("report")
    from harness.reports import add_study_parsers

    add_study_parsers(s.add_subparsers(dest="study", required=True, metavar="STUDY"))
    s = add("sync")
    s.add_argument("results_dir", help="uploads every offline W&B run below it")
    return p


def main(argv: list[str] | None = None) -> int:
    _environment()
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if getattr(args, "limit", None) is not None and float(args.limit).is_integer():
        args.limit = int(args.limit)
    try:
        return COMMANDS[args.command](args)
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
