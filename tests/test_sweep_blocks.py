"""Sweep files with blocks and with corpora given as mappings (mixtures, paths with a field).

    .venv/bin/python -m pytest tests/test_sweep_blocks.py -q
"""
from pathlib import Path

import pytest

from harness.config import load_sweep, parse_sweep
from harness.errors import HarnessError

ROOT = Path(__file__).resolve().parents[1]


def test_robustness_sweep_expands_its_blocks():
    sweep = load_sweep(ROOT / "sweeps" / "robustness.yaml")
    jobs = sweep.jobs
    assert len({j.job_id for j in jobs}) == len(jobs)
    baselines = [j for j in jobs if j.is_baseline]
    assert len(baselines) == 1 and baselines[0].eval.ppl.domains == ("wiki", "prose", "code", "math", "chat")
    main = [j for j in jobs if not j.is_baseline and j.calib.samples == 64 and j.calib.seed == 0
            and len(j.eval.ppl.domains) == 5]
    assert len(main) == 6 * 5 * 2 + 6  # calibration x method x budget, + care_joint-e at 0.5
    assert "mix:chat=1,code=1,math=1,prose=1,wiki=1" in {j.calib.corpus for j in main}
    big_mix = [j for j in jobs if not j.is_baseline and j.calib.samples == 320]
    assert len(big_mix) == 5 * 2 and {j.calib.corpus for j in big_mix} == {"mix:chat=1,code=1,math=1,prose=1,wiki=1"}
    curve = [j for j in jobs if not j.is_baseline and len(j.eval.ppl.domains) == 1]
    assert {(j.calib.corpus, j.eval.ppl.domains) for j in curve} == {("wiki", ("wiki",)), ("code", ("code",))}
    assert sorted({j.calib.samples for j in curve}) == [8, 32, 64, 128, 512]
    assert len(curve) == 2 * 2 * (3 * 3 + 1 + 2)  # methods x corpora x (8/32/128 x 3 seeds, 512, 64 seeds 1-2)
    assert not any(j.calib.samples == 64 and j.calib.seed == 0 for j in curve)  # that point is the main block's
    # the curve's eval windows are the main block's (same samples, seq_len, seed)
    assert {(j.eval.ppl.samples, j.eval.ppl.seq_len, j.eval.ppl.seed) for j in jobs} == {(8, 256, 1)}


def _raw(**block):
    return {"name": "t", "models": ["smollm2-135m"], "budgets": [{"kv_save": 0.5}], "methods": ["care"],
            "blocks": [{"calibration": [{"corpus": "wiki"}]}, block]}


def test_blocks_share_keys_and_a_common_job_runs_once():
    sweep = parse_sweep(_raw(calibration=[{"corpus": "wiki"}, {"corpus": "code"}]))
    assert [j.describe() for j in sweep.jobs] == [
        "smollm2-135m baseline", "smollm2-135m care kv_save=0.5 calib=wiki", "smollm2-135m care kv_save=0.5 calib=code"]


def test_mixture_mapping_is_one_canonical_job(tmp_path):
    a = parse_sweep(_raw(calibration=[{"corpus": {"mix": {"wiki": 1, "code": 2}}}]))
    b = parse_sweep(_raw(calibration=[{"corpus": "mix:code=2.0,wiki=1"}]))
    assert a.jobs[-1].calib.corpus == "mix:code=2,wiki=1" and a.jobs[-1].job_id == b.jobs[-1].job_id
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"body": "x"}\n')
    c = parse_sweep(_raw(calibration=[{"corpus": {"path": str(rows), "field": "body"}}],
                         eval={"ppl": {"domains": ["wiki", {"mix": {"wiki": 1, str(rows) + "#body": 1}}]}}))
    assert c.jobs[-1].calib.corpus == f"{rows}#body"
    assert c.jobs[-1].eval.ppl.domains == ("wiki", f"mix:{rows}#body=1,wiki=1")


def test_block_problems_name_the_block_and_line(tmp_path):
    text = """name: t
models: [smollm2-135m]
budgets: [{kv_save: 0.5}]
methods: [care]
blocks:
  - calibration: [{corpus: wiki}]
  - calibration:
      - {corpus: {mix: {wiki: 1, code: -1}}}
      - {corpus: data/missing.txt}
  - calibrations: []
"""
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(HarnessError) as err:
        load_sweep(path)
    msg = str(err.value)
    assert "3 problem(s)" in msg
    assert f"block 1: {path}:8: calibration.0.corpus: mixture" in msg and "give a number > 0" in msg
    assert f"block 1: {path}:9: calibration.1.corpus: corpus path data/missing.txt does not exist" in msg
    assert f"{path}:10: blocks.2.calibrations: not a block key" in msg
