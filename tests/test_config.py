"""Sweep YAMLs: every shipped file validates; bad files give one error naming key and line."""
from pathlib import Path

import pytest

from harness.config import load_sweep
from harness.errors import HarnessError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_sweeps_validate(path):
    from harness.methods import METHODS

    if "{name: care_mla" in path.read_text() and "care_mla" not in METHODS:  # until branch wt-decode is merged
        pytest.skip("names care_mla, which this checkout does not have yet")
    sweep = load_sweep(path)
    assert sweep.jobs
    ids = [j.job_id for j in sweep.jobs]
    assert len(ids) == len(set(ids)), "job ids must be unique"
    assert path.read_text().lstrip().startswith("#"), "a sweep file opens with the command that runs it"


def test_quick_sweep_grid():
    s = load_sweep(ROOT / "sweeps" / "quick.yaml")
    assert len(s.jobs) == 1 + 2 * 4
    assert s.jobs[0].is_baseline


def _write(tmp_path, text):
    p = tmp_path / "s.yaml"
    p.write_text(text)
    return p


def test_all_problems_reported_with_lines(tmp_path):
    p = _write(tmp_path, "name: t\nmodels: [smollm2-135m]\nbudgets:\n  - {kv_save: 1.5}\nmethods:\n"
                         "  - {name: caer}\n  - {name: care, options: {alloc: uniform}}\nevaluation: {}\n")
    with pytest.raises(HarnessError) as e:
        load_sweep(p)
    msg = str(e.value)
    assert "4 problem(s)" in msg
    assert "s.yaml:4: budgets.0.kv_save" in msg
    assert "s.yaml:6: methods.0.name: unknown method 'caer'" in msg and "did you mean 'care'" in msg
    assert "methods.1.options.alloc" in msg
    assert "s.yaml:8: evaluation: unknown key" in msg


def test_bad_yaml_syntax(tmp_path):
    p = _write(tmp_path, "name: t\nmodels: [smollm2-135m\n")
    with pytest.raises(HarnessError, match="not valid YAML"):
        load_sweep(p)


def test_job_id_is_stable_and_config_sensitive(tmp_path):
    a = load_sweep(_write(tmp_path, "models: [smollm2-135m]\nbudgets: [{kv_save: 0.5}]\nmethods: [svd]\n"))
    b = load_sweep(_write(tmp_path, "models: [smollm2-135m]\nbudgets: [{kv_save: 0.5}]\nmethods: [svd]\n"))
    c = load_sweep(_write(tmp_path, "models: [smollm2-135m]\nbudgets: [{kv_save: 0.6}]\nmethods: [svd]\n"))
    assert [j.job_id for j in a.jobs] == [j.job_id for j in b.jobs]
    assert a.jobs[1].job_id != c.jobs[1].job_id
