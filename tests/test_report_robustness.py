"""The robustness report builds from constructed rows (no model), and its numbers are right.

    .venv/bin/python -m pytest tests/test_report_robustness.py -q
"""
import json
import math

import pandas as pd
import pytest

from harness.reports import robustness as rb
from harness.reports.toolkit import paired_log_se

MIX = "mix:code=1,wiki=1"
BASE_PPL = {"wiki": 10.0, "code": 4.0}
# R[c, e] per method: rows calibration corpus, columns eval domain
R = {
    "care-e": {"wiki": {"wiki": 1.2, "code": 1.5}, "code": {"wiki": 1.4, "code": 1.1}, MIX: {"wiki": 1.25, "code": 1.2}},
    "mha2mla": {"wiki": {"wiki": 2.0, "code": 3.0}, "code": {"wiki": 2.6, "code": 2.0}, MIX: {"wiki": 2.1, "code": 2.1}},
}
RANKS = {"wiki": [1, 2, 3, 4], "code": [4, 3, 2, 1], MIX: [1, 2, 4, 3]}  # rho(wiki,code)=-1, (wiki,mix)=0.8, (code,mix)=-0.8
PAIRS = {"wiki": [[[0, 1], [2, 3]]], "code": [[[0, 2], [2, 3]]], MIX: [[[0, 1], [1, 3]]]}  # (L=1, n_kv=2, p=2)


def _row(job, method, calib, samples=64, seed=0, ppl=None, **extra):
    return {"job_id": job, "sweep": "robustness", "status": "ok", "model": "smollm2-135m", "method": method,
            "calib": calib, "calib_samples": samples, "calib_seed": seed, "budget_kv_save": None if calib is None else 0.5,
            **{f"ppl_{d}": v for d, v in (ppl or {}).items()}, **extra}


def _rows() -> list[dict]:
    rows = [_row("base", "baseline", None, None, None, BASE_PPL)]
    for method, grid in R.items():
        for calib, ratios in grid.items():
            extra = {"ranks_per_layer": json.dumps(RANKS[calib] if method == "care-e" else [4, 4, 4, 4])}
            if method == "mha2mla":
                extra["rope_pairs_per_layer"] = json.dumps(PAIRS[calib])
            rows.append(_row(f"{method}-{calib[:3]}", method, calib,
                             ppl={d: r * BASE_PPL[d] for d, r in ratios.items()}, **extra))
    # the mixture again at 5x the windows: a row of its own, "mix n=320"
    rows.append(_row("care-e-mix320", "care-e", MIX, 320, ppl={"wiki": 1.21 * 10.0, "code": 1.12 * 4.0},
                     ranks_per_layer=json.dumps([1, 2, 3, 4])))
    # sample-size study: care-e on wiki, eval on wiki only, 3 window counts x seeds
    for n, ratios in {8: [1.5, 1.7, 1.6], 32: [1.3, 1.32, 1.34], 512: [1.19]}.items():
        for seed, r in enumerate(ratios):
            rows.append(_row(f"n{n}s{seed}", "care-e", "wiki", n, seed, {"wiki": r * BASE_PPL["wiki"]}))
    return rows


@pytest.fixture
def results(tmp_path):
    folder = tmp_path / "robustness"
    (folder / "runs").mkdir(parents=True)
    pd.DataFrame(_rows()).to_parquet(folder / "rows.parquet")
    # per-window NLLs of the baseline and two jobs on code (for the paired SE of P[mix, code])
    for job, nll in {"base": [1.0, 2.0, 1.5], "care-e-mix": [1.3, 2.1, 1.8], "care-e-cod": [1.1, 2.1, 1.6]}.items():
        (folder / "runs" / job).mkdir()
        (folder / "runs" / job / "metrics.json").write_text(json.dumps({"ppl": {"code": {"nll_windows": nll}}}))
    return folder


def test_matrices_penalties_and_the_mixture_goal(results):
    df = rb.with_ratios(pd.DataFrame(_rows()))
    rows = df[(df["method"] == "care-e") & (df["calib_samples"] == 64)]
    M = rb.ratio_matrix(rows, ["wiki", "code"]).reindex(["wiki", "code", MIX])
    assert M.loc["code", "wiki"] == pytest.approx(1.4)
    P = rb.penalty_matrix(M)
    assert P.loc["wiki", "code"] == pytest.approx(1.5 / 1.1) and P.loc["code", "wiki"] == pytest.approx(1.4 / 1.2)
    assert P.loc["wiki", "wiki"] == P.loc["code", "code"] == 1.0
    W = rb.worst(P)
    assert W.loc[MIX, "worst"] == pytest.approx(1.2 / 1.1) and W.loc[MIX, "domain"] == "code"
    assert rb.main_calibration(df[df["method"] != "baseline"]) == (64, 0)


def test_spearman_and_rope_overlap_on_a_constructed_case():
    S = rb.spearman_matrix(RANKS)
    assert S.loc["wiki", "code"] == pytest.approx(-1.0)
    assert S.loc["wiki", MIX] == pytest.approx(0.8) and S.loc["code", MIX] == pytest.approx(-0.8)
    mean, low = rb.off_diagonal(S)
    assert mean == pytest.approx((-1.0 + 0.8 - 0.8) / 3) and low == pytest.approx(-1.0)
    assert math.isnan(rb.spearman_matrix({"a": [3, 3, 3], "b": [1, 2, 3]}).loc["a", "b"])  # uniform: undefined
    assert rb.rope_overlap(PAIRS["wiki"], PAIRS["code"]) == pytest.approx((1 / 2 + 2 / 2) / 2)
    O = rb.overlap_matrix(PAIRS)
    assert O.loc["wiki", MIX] == pytest.approx((2 / 2 + 1 / 2) / 2) and O.loc["code", MIX] == pytest.approx(0.5)
    assert rb.off_diagonal(O) == (pytest.approx((0.75 + 0.75 + 0.5) / 3), pytest.approx(0.5))


def test_sample_curve_mean_and_sd_over_seeds():
    df = rb.with_ratios(pd.DataFrame(_rows()))
    curve = rb.sample_curve(df[df["method"] != "baseline"]).set_index("samples")
    assert list(curve.index) == [8, 32, 64, 512]  # the main block's n=64 point joins the curve
    assert curve.loc[8, "mean"] == pytest.approx(1.6) and curve.loc[8, "sd"] == pytest.approx(0.1)
    assert curve.loc[32, "seeds"] == 3 and curve.loc[512, "seeds"] == 1 and math.isnan(curve.loc[512, "sd"])


def test_paired_standard_error():
    assert paired_log_se([1.3, 2.1, 1.8], [1.1, 2.1, 1.6]) == pytest.approx(math.sqrt(((0.2 - 0.4 / 3) ** 2 * 2 + (0.4 / 3) ** 2) / 2 / 3))
    assert math.isnan(paired_log_se([1.0], [2.0])) and math.isnan(paired_log_se([1, 2], [1, 2, 3]))


def test_report_builds_from_rows(results):
    out = rb.build_report(results)
    text = out.read_text()
    for png in ("ratio_kv0.5.png", "penalty_kv0.5.png", "ranks_per_layer.png", "sample_size.png"):
        assert (results / png).stat().st_size > 1000
        assert f"]({png})" in text  # each figure is in the report, beside the command that rewrites it
    assert text.count(f"Regenerate with: `mla-harness report robustness {results}`") >= 5
    # the mixture line: care-e worst P[mix, code] = 1.2/1.1 with its paired SE, best single = code (1.4/1.2)
    se = paired_log_se([1.3, 2.1, 1.8], [1.1, 2.1, 1.6])
    assert f"| care-e | 0.5 | mix | {1.2 / 1.1:.3f} ± {se:.3f} | code | code | {1.4 / 1.2:.3f} | wiki | met |" in text
    assert f"| care-e | 0.5 | mix n=320 | {1.12 / 1.1:.3f} | code | code | {1.4 / 1.2:.3f} | wiki | met |" in text
    assert "| mha2mla | 0.5 | mix | 1.050 | wiki | code | 1.300 | wiki | met |" in text
    assert "- mix n=320 = `mix:code=1,wiki=1` at 320 windows: per part code 160, wiki 160" in text
    assert "| wiki | 1.00 | -1.00 | 0.80 | 1.00 |" in text  # Spearman table of care-e (mix n=320 ranks = wiki's)
    assert "| care-e @ 0.5 | -0.03 | -1.00 |" in text  # mean over the 6 pairs, min
    assert "| mha2mla @ 0.5 | 0.67 | 0.50 |" in text  # mean and min RoPE-pair overlap
    assert "| care-e @ 0.5, wiki | 1.600 ± 0.100 (3) | 1.320 ± 0.020 (3) | 1.200 (1) | 1.190 (1) |" in text


def test_cli_report_needs_rows(tmp_path, capsys):
    from harness.cli import main

    assert main(["report", "robustness", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "rows.parquet does not exist; run the sweep first" in err
