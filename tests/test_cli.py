"""Bad input gets one clear line on stderr and a non-zero exit."""
import subprocess
import sys

import pytest

from harness.cli import main


@pytest.mark.parametrize("argv,needle", [
    (["convert", "--method", "caer", "--kv-save", "0.5", "--out", "x"], "unknown method 'caer'"),
    (["convert", "--model", "/no/such/dir", "--method", "svd", "--kv-save", "0.5", "--out", "x"], "neither an embedded"),
    (["convert", "--method", "svd", "--kv-save", "1.2", "--out", "x"], "outside [0, 1)"),
    (["convert", "--method", "care", "--kv-save", "0.5", "--option", "bogus=1", "--out", "x"], "no option"),
    (["sweep", "/no/such.yaml"], "does not exist"),
    (["leaderboard", "/no/such/results"], "run the sweep first"),
])
def test_errors_are_one_line(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err
    assert len(err.splitlines()) == 1


def test_exit_code_from_a_real_process():
    p = subprocess.run([sys.executable, "-m", "harness", "convert", "--method", "nope", "--kv-save", "0.5",
                        "--out", "x"], capture_output=True, text=True)
    assert p.returncode == 2
    assert "unknown method 'nope'" in p.stderr and "Traceback" not in p.stderr


def test_rank_above_parity_on_the_real_model(capsys):
    assert main(["convert", "--method", "svd", "--rank", "999", "--out", "x"]) == 2
    assert "above KV parity (192" in capsys.readouterr().err


# ------------------------------------------------------------------ checked before any model loads
@pytest.mark.parametrize("argv,needle", [
    (["convert", "--method", "care", "--kv-save", "0.5", "--option", "power=abc"], "option power: expected a number"),
    (["convert", "--method", "care", "--kv-save", "0.5", "--option", "damping=-1"], "option damping: -1 must be >= 0"),
    (["convert", "--method", "care", "--kv-save", "0.5", "--option", "allocation=best"], "'best' is not one of"),
    (["convert", "--method", "mha2mla", "--kv-save", "0.5", "--option", "rope_pairs=0"], "rope_pairs: 0 must be >= 1"),
    (["convert", "--method", "care", "--kv-save", "0.5", "--calib", "nope"], "unknown corpus nope"),
    (["convert", "--method", "care", "--kv-save", "0.5", "--calib-samples", "-4"], "--calib-samples -4 must be >= 1"),
    (["eval", "--ppl", "wiki,nope"], "--ppl: unknown corpus nope"),
    (["eval", "--tasks", "arc_easyy"], "unknown lm-eval task 'arc_easyy'"),
    (["heal", "--method", "care", "--kv-save", "0.5", "--tokens", "10x"], "--tokens: '10x' is not a count"),
    (["heal", "--method", "care", "--kv-save", "0.5", "--tokens", "1k", "--lr", "-1"], "--lr: -1.0 must be > 0"),
    (["heal", "--method", "care", "--kv-save", "0.5", "--tokens", "1k", "--schedule", "linear"], "--schedule: 'linear'"),
])
def test_bad_values_are_one_line_before_the_model_loads(monkeypatch, capsys, tmp_path, argv, needle):
    import harness.models

    monkeypatch.setattr(harness.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "out"
    if argv[0] in ("convert", "heal"):
        argv = [*argv, "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err, err
    assert len(err.splitlines()) == 1
    assert not out.exists()


def test_sweep_option_and_sample_problems_are_all_reported(tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text("name: bad\nmodels: [smollm2-135m]\ncalibration: [{samples: -4}]\nbudgets: [{kv_save: 0.5}]\n"
                 "methods:\n  - {name: care, options: {power: abc, damping: -1}}\n"
                 "eval: {ppl: {domains: [wiki, nope], samples: 0}, limit: -3}\n")
    assert main(["sweep", str(p), "--results", str(tmp_path / "results")]) == 2
    err = capsys.readouterr().err
    for needle in ("bad.yaml:3: calibration.0.samples: -4 must be >= 1", "bad.yaml:6: methods.0.options.power: expected a number",
                   "methods.0.options.damping: -1 must be >= 0", "eval.ppl.samples: 0 must be >= 1",
                   "eval.ppl.domains.1: unknown corpus nope", "eval.limit: -3 must be > 0"):
        assert needle in err, err
    assert "6 problem(s)" in err
    assert not (tmp_path / "results").exists()


def test_set_overrides_are_validated_and_name_the_sweep(tmp_path):
    from harness.config import load_sweep
    from harness.errors import HarnessError

    p = tmp_path / "s.yaml"
    p.write_text("name: s\nmodels: [smollm2-135m]\nbudgets: [{kv_save: 0.5}]\nmethods: [svd]\neval: {limit: 10}\n")
    plain = load_sweep(p)
    over = load_sweep(p, overrides=["eval.limit=null", "budgets=[{kv_save: 0.75}]"])
    assert over.name.startswith("s+") and over.name != plain.name
    assert over.jobs[1].budget.kv_save == 0.75 and over.jobs[1].eval.limit is None
    assert {j.job_id for j in over.jobs}.isdisjoint(j.job_id for j in plain.jobs)
    assert load_sweep(p, overrides=["name=other"]).name == "other"
    with pytest.raises(HarnessError, match=r"--set eval.limit: .*must be > 0"):
        load_sweep(p, overrides=["eval.limit=-1"])
    with pytest.raises(HarnessError, match="must look like key=value"):
        load_sweep(p, overrides=["eval.limit"])


def test_heal_help_lists_exactly_the_heal_config_fields():
    from dataclasses import fields

    from harness.cli import HEAL_GROUP, build_parser
    from harness.specs import HealConfig, field_help

    heal = next(a for a in build_parser()._subparsers._group_actions[0].choices.items() if a[0] == "heal")[1]
    group = next(g for g in heal._action_groups if g.title == HEAL_GROUP)
    flags = [a.option_strings[0] for a in group._group_actions]
    assert flags == ["--" + f.name.replace("_", "-") for f in fields(HealConfig)]
    helps = field_help(HealConfig)
    assert set(helps) == {f.name for f in fields(HealConfig)}  # every field documents itself
    assert all(helps[f.name] in a.help for f, a in zip(fields(HealConfig), group._group_actions))
    p = subprocess.run([sys.executable, "-m", "harness", "heal", "--help"], capture_output=True, text=True)
    assert p.returncode == 0 and "--eval-every-tokens" in p.stdout and "--kd-temperature" in p.stdout
