"""The healing report builds from constructed rows and curves (no model), and its numbers are right.

    .venv/bin/python -m pytest tests/test_report_healing.py -q
"""
import json
import math

import pandas as pd
import pytest

from harness.reports import healing as hr
from harness.reports import healing_curves as hc
from harness.reports.toolkit import paired_log_se, read_rows

M = 1_000_000
TASK = "mha2mla_eval"  # its paper metric: acc_norm_nospace
SPEC = {"mode": "full", "tokens": 20 * M, "label": "full-20M", "lr": 1e-4, "schedule": "wsd", "batch_size": 16,
        "grad_accum": 4, "seq_len": 512, "corpora": ["chat", "wiki"], "weights": [0.5, 0.5],
        "eval_every_tokens": [2 * M, 5 * M, 10 * M], "curve_tasks": True, "kd_weight": 0.0}
# acc_mean (paper metric) at 0 (one-shot row), the curve's marks 2M/5M/10M, and 20M (healed row)
ACC = {"baseline": [0.42, 0.41, 0.405, 0.40, 0.40],  # untrained 0.42; fine-tuned original ends at 0.40
       "mha2mla-2norm": [0.30, 0.34, 0.37, 0.39, 0.395],
       "care_mla-2norm": [0.33, 0.36, 0.385, 0.39, 0.396]}
PPL = {"baseline": [20.0, 18.0, 17.0, 16.5, 16.0], "mha2mla-2norm": [500.0, 60.0, 30.0, 24.0, 20.0],
       "care_mla-2norm": [300.0, 50.0, 28.0, 23.0, 19.0]}
MARKS = [0, 2 * M, 5 * M, 10 * M, 20 * M]


def _row(job, method, heal, i, plain_offset=-0.03):
    acc = ACC[method][i]
    return {"job_id": job, "sweep": "heal-test", "status": "ok", "model": "smollm2-135m", "method": method,
            "calib": None if method == "baseline" else "wiki", "calib_samples": None if method == "baseline" else 64,
            "calib_seed": None if method == "baseline" else 0,
            "budget_kv_save": None if method == "baseline" else 0.8125, "budget_rank": None,
            "heal": heal, "heal_mode": "none" if heal == "none" else "full", "heal_tokens": MARKS[i],
            "kv_quant": "none", "tasks": TASK, "ppl_wiki": PPL[method][i], "ppl_code": PPL[method][i] / 2,
            f"{TASK}/acc_norm_nospace": acc, f"{TASK}/acc_norm_nospace_stderr": 0.01,
            f"{TASK}/acc": acc + plain_offset, f"{TASK}/acc_stderr": 0.01}


def _curve(method, plain_offset=-0.03):
    return [{"mark": MARKS[i], "tokens": MARKS[i], "ppl_wiki": PPL[method][i], "ppl_code": PPL[method][i] / 2,
             f"{TASK}/acc_norm_nospace": ACC[method][i], f"{TASK}/acc": ACC[method][i] + plain_offset,
             "acc_mean": ACC[method][i]} for i in (1, 2, 3)]


JOBS = {"b0": ("baseline", "none"), "m0": ("mha2mla-2norm", "none"), "c0": ("care_mla-2norm", "none"),
        "bh": ("baseline", "full-20M"), "mh": ("mha2mla-2norm", "full-20M"), "ch": ("care_mla-2norm", "full-20M")}


def _write(folder, parquet=True, healed=True):
    rows = []
    for job, (method, heal) in JOBS.items():
        if heal != "none" and not healed:
            continue
        row = _row(job, method, heal, 4 if heal != "none" else 0)
        rows.append(row)
        run = folder / "runs" / job
        run.mkdir(parents=True)
        (run / "row.json").write_text(json.dumps(row))
        metrics = {"ppl": {"wiki": {"ppl": row["ppl_wiki"]}}}
        if heal != "none":
            metrics["heal"] = {"curve": _curve(method), "tokens_seen": 20 * M, "tokens_budget": 20 * M,
                               "steps": 610, "tokens_per_s": 1000.0, "spec": SPEC}
            (run / "heal_log.json").write_text(json.dumps(
                [{"step": s, "tokens_per_s": tps, "gpu_memory_gib": gib, "loss": 2.0, "lr": 1e-4}
                 for s, (tps, gib) in enumerate([(10.0, 5.0), (40_000.0, 20.5), (42_000.0, 20.0), (41_000.0, 19.0),
                                                 (39_000.0, 19.0)])]))
        (run / "metrics.json").write_text(json.dumps(metrics))
    if parquet:
        pd.DataFrame(rows).to_parquet(folder / "rows.parquet")
    return folder


@pytest.fixture
def results(tmp_path):
    folder = _write(tmp_path / "heal-test")
    # per-window NLLs on wiki of the healed mha2mla row and the fine-tuned original (paired SE of the ratio)
    for job, nll in {"mh": [3.1, 2.9, 3.05], "bh": [2.8, 2.75, 2.78]}.items():
        f = folder / "runs" / job / "metrics.json"
        m = json.loads(f.read_text())
        m["ppl"]["wiki"]["nll_windows"] = nll
        f.write_text(json.dumps(m))
    # per-document scores: the fine-tuned original right on 6 of 10 documents, healed mha2mla on 4 of them
    for job, right in {"bh": 6, "mh": 4}.items():
        docs = pd.DataFrame({"task": TASK, "doc_id": range(10), "acc": 0.0,
                             "acc_norm_nospace": [1.0 if d < right else 0.0 for d in range(10)]})
        docs.to_parquet(folder / "runs" / job / "lm_eval_documents.parquet")
        (folder / "runs" / job / "lm_eval_results.json").write_text(json.dumps({"group_weighting": {}}))
    return folder


def test_loglinear_reach_extrapolates_the_trend_of_the_trained_marks():
    # exactly +0.02 per 10x tokens from 0.36 at 1M: 0.40 at 100M; the untrained point (0 tokens) is left out
    gain, at = hc.loglinear_reach([0, M, 10 * M, 100 * M], [0.1, 0.36, 0.38, 0.40], 0.42)
    assert gain == pytest.approx(0.02) and at == pytest.approx(1000 * M, rel=1e-9)
    assert hc.loglinear_reach([0, 2 * M, 5 * M, 10 * M], [0.3, 0.35, 0.34, 0.33], 0.4) == (pytest.approx(
        hc.loglinear_reach([2 * M, 5 * M, 10 * M], [0.35, 0.34, 0.33], 0.4)[0]), None)  # falling: no reach
    assert hc.loglinear_reach([0, 2 * M, 5 * M], [0.3, 0.35, 0.36], 0.4) is None  # two trained marks: no fit


def test_tokens_to_reach_interpolates_linearly():
    assert hc.tokens_to_reach([0, 5 * M, 10 * M], [0.30, 0.37, 0.39], 0.38) == pytest.approx(7.5 * M)
    assert hc.tokens_to_reach([0, 2 * M], [0.5, 0.6], 0.4) == 0  # already there at the start
    assert hc.tokens_to_reach([0, 2 * M, 5 * M], [0.3, 0.35, 0.34], 0.36) is None
    assert hc.tokens_to_reach([0, 2 * M, 5 * M], [0.3, float("nan"), 0.4], 0.35) == pytest.approx(2.5 * M)


def test_assemble_rows_win_over_curve_marks_at_the_same_tokens():
    zero = {"tokens": 0, "mark": 0, "source": "one-shot row", "acc_primary": 0.3}
    final = {"tokens": 20 * M, "mark": 20 * M, "source": "healed row", "acc_primary": 0.395}
    middle = [{"tokens": t, "mark": t, "source": "curve", "acc_primary": 0.9} for t in (0, 5 * M, 20 * M)]
    pts = hc.assemble(zero, middle, final)
    assert list(pts["tokens"]) == [0, 5 * M, 20 * M]
    assert list(pts["source"]) == ["one-shot row", "curve", "healed row"]
    assert list(pts["acc_primary"]) == [0.3, 0.9, 0.395]


def test_curve_takes_zero_from_the_one_shot_row_and_final_from_the_healed_row(results):
    st = hc.gather(results)
    assert st.metric == "primary"
    mh = next(c for c in st.curves if c.method == "mha2mla-2norm")
    assert list(mh.points["tokens"]) == MARKS  # the curve recorded only 2M, 5M, 10M
    assert list(mh.points["source"]) == ["one-shot row", "curve", "curve", "curve", "healed row"]
    assert list(mh.points["acc_primary"]) == ACC["mha2mla-2norm"]
    assert list(mh.points["ppl_wiki"]) == PPL["mha2mla-2norm"]
    assert mh.points["acc_primary_se"].iloc[0] == 0.01 and math.isnan(mh.points["acc_primary_se"].iloc[2])
    assert mh.throughput() == (40_000.0, 20.5)  # median tokens/s over the log's steps, peak GiB
    ref = hc.reference_for(st.curves, mh)
    assert ref.method == "baseline" and ref.heal == "full-20M" and ref.job_id == "bh"  # not the untrained b0


def test_one_shot_row_without_a_field_newer_rows_record_still_starts_the_curve(results):
    """Rows written before calib_seed existed (a GPU session's carried-over one-shot rows) match the healed
    row of the same job; a one-shot row of another calibration does not."""
    rows = [json.loads(f.read_text()) for f in sorted((results / "runs").glob("*/row.json"))]
    for r in rows:
        if r["heal"] == "none":
            r.pop("calib_seed")
    df = pd.DataFrame(rows)
    mh = df[df["job_id"] == "mh"].iloc[0]
    assert hc.one_shot_of(df, hc._key(mh))["job_id"] == "m0"
    other = df.assign(calib=df["calib"].where(df["heal"] != "none", "code"))  # one-shot rows of another corpus
    assert hc.one_shot_of(other, hc._key(mh)) is None


def test_report_numbers_against_the_fine_tuned_original(results):
    out = hr.build_report(results, machine="test box")
    text = out.read_text()
    for png in ("recovery_acc.png", "recovery_ppl.png"):
        assert (results / png).stat().st_size > 1000 and f"]({png})" in text
    assert "Machine: test box." in text
    # 95% of the fine-tuned original's final 0.40 is 0.38: mha2mla crosses between 5M (0.37) and 10M (0.39) at 7.5M,
    # care_mla between 2M (0.36) and 5M (0.385) at 4.4M (against the untrained 0.42, 0.399 would never be reached)
    ratio = 0.395 / 0.40
    se = ratio * math.hypot(0.01 / 0.395, 0.01 / 0.40)
    ppl_se = paired_log_se([3.1, 2.9, 3.05], [2.8, 2.75, 2.78])
    line = next(l for l in text.splitlines() if l.startswith("| mha2mla-2norm | -81.25% KV | full-20M |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[3:8] == ["finished", "30.0 ± 1.0", "39.5 ± 1.0 @ 20M", "40.0 ± 1.0 @ 20M",
                          f"{100 * ratio:.1f} ± {100 * se:.1f}"]
    assert cells[8].startswith("-20.0 [")  # paired on the same documents: 4/10 - 6/10
    assert cells[9] == f"{20 / 16:.2f} ± {20 / 16 * ppl_se:.2f}" and cells[10] == f"{10 / 8:.2f}"
    assert cells[11:] == ["7.5M", "40,000", "20.5"]
    care = next(l for l in text.splitlines() if l.startswith("| care_mla-2norm | -81.25% KV | full-20M |"))
    assert "| 4.4M |" in care
    # the covariance-aware start against mha2mla at each mark (difference ± sqrt(se^2 + se^2))
    assert (f"0: 33.0 vs 30.0 (+3.0 ± {100 * math.hypot(0.01, 0.01):.1f}); 2M: 36.0 vs 34.0 (+2.0 ± ≈1.4)") in text
    assert "Tokens to 95% of the fine-tuned original: care_mla-2norm 4.4M, mha2mla-2norm 7.5M (3.1M fewer for " \
           "care_mla-2norm)" in text
    assert "This sweep has one recipe (full-20M)" in text
    assert "care_mla-2norm, full-20M: 99.0" in text  # the goal line at -81.25% KV
    assert "not reached" not in text


def test_perplexity_only_healing_sweep(tmp_path):
    """A sweep without lm-eval tasks: the report compares perplexities and claims nothing about accuracy."""
    folder = _write(tmp_path / "ppl-only")
    rows = pd.read_parquet(folder / "rows.parquet")
    rows = rows.drop(columns=[c for c in rows.columns if c.startswith(TASK)]).assign(tasks=None)
    rows.to_parquet(folder / "rows.parquet")
    for job in ("bh", "mh", "ch"):
        f = folder / "runs" / job / "metrics.json"
        m = json.loads(f.read_text())
        m["heal"]["curve"] = [{k: v for k, v in c.items() if not k.startswith(TASK) and k != "acc_mean"}
                              for c in m["heal"]["curve"]]
        f.write_text(json.dumps(m))
    st = hc.gather(folder)
    assert st.metric == "none"
    text = hr.build_report(folder).read_text()
    assert "compares perplexities only" in text and "not reached" not in text and "tokens to 95%" not in text
    assert not (folder / "recovery_acc.png").exists() and (folder / "recovery_ppl.png").exists()
    line = next(l for l in text.splitlines() if l.startswith("| mha2mla-2norm |"))
    assert f"| {20 / 16:.2f} | {10 / 8:.2f} |" in line  # last ppl / the fine-tuned original's, both domains


def test_rows_from_row_json_when_rows_parquet_is_missing_or_stale(tmp_path):
    folder = _write(tmp_path / "nop", parquet=False)
    df = read_rows(folder)
    assert len(df) == 6 and "no rows.parquet" in df.attrs["source"]
    pd.DataFrame([json.loads((folder / "runs" / "b0" / "row.json").read_text())]).to_parquet(folder / "rows.parquet")
    df = read_rows(folder)
    assert len(df) == 6 and "5 finished job(s) not in rows.parquet" in df.attrs["source"]
    assert len(hc.gather(folder).curves) == 3


def _partials(plain_only=False):
    """A checkpoint of a lora-5M care_mla job and of its fine-tuned original, stopped early."""
    def curve(method, acc):
        pts = [{"mark": 0, "tokens": 0, "ppl_wiki": PPL[method][0], "ppl_code": PPL[method][0] / 2},
               {"mark": M, "tokens": 1_015_808, "ppl_wiki": PPL[method][0] / 4, "ppl_code": PPL[method][0] / 8}]
        for p, a in zip(pts, acc):
            p.update({f"{TASK}/acc": a, "acc_mean": a} if plain_only else
                     {f"{TASK}/acc_norm_nospace": a, f"{TASK}/acc": a - 0.03, "acc_mean": a})
        return pts

    spec = dict(SPEC, mode="lora", tokens=5 * M, label="lora-5M", eval_every_tokens=[0, M, 2 * M, 5 * M])
    log = [{"step": 1, "tokens_per_s": 30_000.0, "gpu_memory_gib": 11.0}]
    shift = 0.03 * plain_only  # plain acc sits 3 points below acc_norm_nospace in these rows
    care = curve("care_mla-2norm", [0.33 - shift, 0.35])
    base = curve("baseline", [0.42 - shift, 0.42])
    return {"/root/gpu/results/heal-test/runs/.aaaaaaaaaaaa.heal": {
                "step": 46, "steps": 152, "tokens_seen": 1_507_328, "spec": spec, "log": log, "curve": care},
            "/root/gpu/results/heal-test/runs/.bbbbbbbbbbbb.heal/": {
                "step": 50, "steps": 152, "tokens_seen": 1_638_400, "spec": spec, "log": log, "curve": base}}


def test_partial_curves_are_found_and_drawn_dotted(results, tmp_path):
    f = tmp_path / "heal_partial.json"
    f.write_text(json.dumps(_partials()))
    st = hc.gather(results, partial=f)
    care = next(c for c in st.curves if c.heal == "lora-5M" and c.method == "care_mla-2norm")
    assert care.partial_at == 1_507_328 and care.kv_save == 0.8125
    assert list(care.points["source"]) == ["one-shot row", "curve"]
    assert care.label.endswith("partial (stopped at 1.51M tokens)")
    assert hc.reference_for(st.curves, care).job_id == "bbbbbbbbbbbb"
    text = hr.build_report(results, partial=f).read_text()
    line = next(l for l in text.splitlines() if l.startswith("| care_mla-2norm | -81.25% KV | lora-5M |"))
    # against the partial fine-tuned original's last point (0.42 at 1.02M): 0.35 / 0.42; 0.399 never reached
    assert "| partial @ 1.51M |" in line and f"| ≈{100 * 0.35 / 0.42:.1f}" not in line
    assert f"| {100 * 0.35 / 0.42:.1f} ± ≈" in line and "not reached by 1.02M" in line
    assert "drawn dotted" in text and "found by its 0-token perplexities" in text
    assert "No two recipes share a mark yet." in text  # lora's only mark past 0 is 1M; full-20M has 2M, 5M, ...
    assert {c.heal for c in st.curves} == {"full-20M", "lora-5M"} and len(st.curves) == 5


def test_partials_from_before_the_fix_switch_the_report_to_plain_acc(results, tmp_path):
    f = tmp_path / "heal_partial.json"
    f.write_text(json.dumps(_partials(plain_only=True)))
    st = hc.gather(results, partial=f)
    assert st.metric == "acc"
    mh = next(c for c in st.curves if c.method == "mha2mla-2norm" and c.heal == "full-20M")
    assert list(mh.points["acc_plain"]) == pytest.approx([a - 0.03 for a in ACC["mha2mla-2norm"]])
    text = hr.build_report(results, partial=f).read_text()
    assert "every acc_mean in this report is therefore plain acc" in text


def test_partial_that_matches_no_job_or_another_sweep_is_left_out_with_a_note(results, tmp_path):
    entry = _partials()["/root/gpu/results/heal-test/runs/.aaaaaaaaaaaa.heal"]
    entry["curve"] = entry["curve"][1:]  # no 0-token point to recognise it by
    other = _partials()["/root/gpu/results/heal-test/runs/.bbbbbbbbbbbb.heal/"]
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"/x/heal-test/runs/.cccccccccccc.heal": entry,
                             "/x/other-sweep/runs/.dddddddddddd.heal": other}))
    st = hc.gather(results, partial=f)
    assert len(st.curves) == 3
    assert any("cccccccccccc" in n and "pass --sweep" in n for n in st.notes)
    assert any("dddddddddddd" in n and "another sweep's results (other-sweep)" in n for n in st.notes)


SWEEP = """name: heal-test
models: [smollm2-135m]
calibration:
  - {corpus: wiki, samples: 64, seq_len: 256, seed: 0}
budgets:
  - {kv_save: 0.8125}
methods:
  - {name: mha2mla, label: mha2mla-2norm, options: {selection: 2norm}}
  - {name: care_mla, label: care_mla-2norm, options: {selection: 2norm}}
heal:
  - {mode: none}
  - {mode: lora, label: lora-5M, tokens: 5M, lr: 1.0e-3, eval_every_tokens: [2M, 5M], curve_tasks: true}
baseline: true
heal_baseline: true
eval:
  ppl: {domains: [wiki, code], samples: 32, seq_len: 256, seed: 1}
  tasks: [mha2mla_eval]
"""


def test_partial_without_its_recipe_is_found_through_the_sweep(results, tmp_path):
    """Checkpoints of the newer progress dump record no spec, and a curve without mark 0: only the sweep's
    job ids say which job (and recipe) each one is."""
    from harness.config import load_sweep

    (tmp_path / "s.yaml").write_text(SWEEP)
    (tmp_path / "s2.yaml").write_text(SWEEP.replace("kv_save: 0.8125", "kv_save: 0.5"))
    job = next(j for j in load_sweep(tmp_path / "s.yaml").jobs if j.heal.mode == "lora" and not j.is_baseline
               and j.method.name == "care_mla")
    point = {"mark": 2 * M, "tokens": 2_015_232, "ppl_wiki": 40.0, "ppl_code": 20.0,
             f"{TASK}/acc_norm_nospace": 0.37, f"{TASK}/acc": 0.34, "acc_mean": 0.37}
    f = tmp_path / "p.json"
    f.write_text(json.dumps({f"/r/heal-test/runs/.{job.job_id}.heal": {
        "step": 70, "steps": 152, "tokens_seen": 2_293_760, "curve": [point], "tokens_per_s_last20": 31_000.0,
        "log_last": [{"step": 70, "gpu_memory_gib": 12.5}]}}))
    st = hc.gather(results, partial=f)
    assert len(st.curves) == 3 and any("pass --sweep" in n for n in st.notes)
    st = hc.gather(results, partial=f, sweep=str(tmp_path / "s.yaml"))
    care = next(c for c in st.curves if c.heal == "lora-5M")
    assert care.method == "care_mla-2norm" and care.kv_save == 0.8125 and care.partial_at == 2_293_760
    assert list(care.points["tokens"]) == [0, 2_015_232] and list(care.points["acc_primary"]) == [0.33, 0.37]
    assert care.throughput() == (31_000.0, 12.5) and care.spec["tokens"] == 5 * M
    # the same sweep at another budget has other job ids: that checkpoint is no job of it
    st = hc.gather(results, partial=f, sweep=str(tmp_path / "s2.yaml"))
    assert all(c.heal != "lora-5M" for c in st.curves)
    text = hr.build_report(results, partial=f, sweep=str(tmp_path / "s.yaml")).read_text()
    assert "| partial @ 2.29M |" in text and "31,000 (last 20) | 12.5 |" in text
    assert "found by the sweep's job ids" in text


def test_cli_writes_the_report_and_refuses_a_folder_without_healing(results, tmp_path, capsys):
    from harness.cli import main

    assert main(["report", "healing", str(results), "--machine", "box"]) == 0
    assert (results / "REPORT.md").exists() and (results / "recovery_acc.png").exists()
    assert f"`mla-harness report healing {results} --machine 'box'`" in (results / "REPORT.md").read_text()
    plain = _write(tmp_path / "one-shot", healed=False)
    capsys.readouterr()
    assert main(["report", "healing", str(plain)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "has no healed rows" in err and "--partial" in err
    assert not (plain / "REPORT.md").exists() and not list(plain.glob("*.png"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"not a checkpoint": {}}))
    assert main(["report", "healing", str(results), "--partial", str(bad)]) == 2
    assert "is not a healing checkpoint's progress" in capsys.readouterr().err
