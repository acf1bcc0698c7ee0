"""The long-context sweep axis (kv_quant, eval.long_ppl, eval.task_metadata, per-task limits) and its rows.

    pytest -q tests/test_long_context_sweep.py      # seconds
"""
from __future__ import annotations

from pathlib import Path

import pytest

from harness.config import load_sweep, parse_sweep
from harness.errors import HarnessError
from harness.specs import KVQuantSpec

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def with_care_mla(monkeypatch):
    """sweeps/long-context.yaml names care_mla (branch wt-decode); stand in for it where it is missing."""
    from harness.methods import METHODS

    if "care_mla" not in METHODS:
        monkeypatch.setitem(METHODS, "care_mla", METHODS["care_joint"])


def test_long_context_sweep_grid(with_care_mla):
    s = load_sweep(ROOT / "sweeps" / "long-context.yaml")
    got = {(j.method.name if j.method else "baseline", j.budget.kv_save if j.budget else None,
            j.kv_quant.label if j.kv_quant else "none") for j in s.jobs}
    methods = ("care_joint", "care_mla", "mha2mla")
    want = {("baseline", None, q) for q in ("none", "int8-g64", "int4-g64", "int2-g64")}
    want |= {(m, b, "none") for m in methods for b in (0.5, 0.75, 0.875)}
    want |= {(m, 0.75, "int8-g64") for m in methods} | {(m, 0.875, "int4-g64") for m in methods}
    assert got == want and len(s.jobs) == len(want) == 19
    assert len({j.job_id for j in s.jobs}) == 19
    ev = s.jobs[0].eval
    assert ev.tasks == ("mla_core", "long_context") and ev.limit == {"mla_core": 0.05}
    assert ev.task_metadata["max_seq_lengths"] == [1024, 2048, 4096, 8192]
    assert ev.long_ppl.seq_lens == (2048, 4096, 8192) and ev.long_ppl.domains == ("wiki", "prose", "code")


def test_unused_long_context_settings_keep_job_ids():
    """Adding kv_quant / long_ppl / task_metadata did not change the id of any job that does not use them."""
    base = {"models": ["smollm2-135m"], "budgets": [{"kv_save": 0.5}], "methods": ["svd"]}
    plain = parse_sweep(dict(base))
    explicit = parse_sweep({**base, "kv_quant": ["none"]})
    assert [j.job_id for j in plain.jobs] == [j.job_id for j in explicit.jobs]
    quant = parse_sweep({**base, "kv_quant": ["none", {"bits": 4}]})
    assert len(quant.jobs) == 4 and len({j.job_id for j in quant.jobs}) == 4
    assert quant.jobs[1].kv_quant == KVQuantSpec(bits=4) and "kv=int4-g64" in quant.jobs[1].describe()


def test_bad_long_context_settings_are_all_reported():
    raw = {"models": ["smollm2-135m"], "budgets": [{"kv_save": 0.5}], "methods": ["svd"],
           "kv_quant": ["none", {"bits": 3}, {"bits": 8, "budgets": [0.6]}, {"bitz": 8}],
           "eval": {"tasks": ["mla_core"], "limit": {"long_context": 5},
                    "task_metadata": {"max_seq_lengths": [1024, -1]},
                    "long_ppl": {"domains": ["wikki"], "seq_lens": [1]}}}
    with pytest.raises(HarnessError) as e:
        parse_sweep(raw)
    msg = str(e.value)
    for part in ("kv_quant.1.bits: 3 is not one of 8, 4, 2", "kv_quant.2.budgets: 0.6 is neither baseline",
                 "kv_quant.3.bitz: unknown key", "eval.limit.long_context: 'long_context' is not in eval.tasks",
                 "eval.task_metadata.max_seq_lengths", "eval.long_ppl.seq_lens", "unknown corpus wikki"):
        assert part in msg, (part, msg)


def test_row_gets_ruler_lengths_kv_bytes_and_long_ppl(monkeypatch, tmp_path):
    import harness.sweep as S
    from harness.specs import EvalConfig, JobConfig, LongPplConfig, PplConfig
    from tiny import tiny_model

    model = tiny_model("llama")

    class Tok:  # what run_job's scoring needs of a tokenizer here: nothing (perplexities are stubbed below)
        pass

    job = JobConfig(model="tiny", method=None, calib=None, budget=None, kv_quant=KVQuantSpec(bits=4, group=32),
                    eval=EvalConfig(ppl=PplConfig(domains=("wiki",)), long_ppl=LongPplConfig(domains=("prose",),
                                                                                           seq_lens=(64,))))
    from harness import evaluate

    calls = []

    def fake_long(m, tok, domains, spec, cache_factory):
        calls.append(cache_factory())
        return {"prose@64": {"ppl": 12.5}}

    monkeypatch.setattr(evaluate, "long_perplexities", fake_long)
    acc = evaluate.kv_accounting(model)
    row = S.make_row(job, "s", {"wiki": {"ppl": 3.0}}, acc, None,
                     [{"task": "long_context", "metric": "4096", "value": 0.25, "stderr": 0.1, "n": 26},
                      {"task": "mla_core", "metric": "acc", "value": 0.4, "stderr": 0.01, "n": 100}])
    S._long_context_fields(job, model, Tok(), acc, row, S._kv_cache_factory(job, model))
    assert row["long_context@4096"] == 0.25 and row["long_context@4096_stderr"] == 0.1
    assert row["long_context@4096_n"] == 26 and row["mla_core/acc"] == 0.4
    assert row["ppl_prose@64"] == 12.5 and calls and calls[0].spec == job.kv_quant
    # 2 layers x K,V x 2 heads x one group of 32: 16 code bytes + 8 scale/zero bytes (fp32), window spread over 4096
    full = 2 * 2 * 64 * 4
    assert row["bytes_per_token_unquantized"] == full and row["kv_quant"] == "int4-g32"
    assert row["bytes_per_token"] == pytest.approx(((4096 - 128) * 2 * 2 * 2 * 24 + 128 * full) / 4096)
    assert row["kv_bytes_fraction"] == pytest.approx(row["bytes_per_token"] / full)


def _rows():
    import pandas as pd

    base = {"status": "ok", "model": "m", "budget_kv_save": None, "mla_core/acc_stderr": 0.01,
            "long_context@4096_stderr": 0.02, "long_context@4096_n": 52}
    rows = [
        dict(base, method="baseline", kv_quant="none", kv_bytes_fraction=1.0, bytes_per_token=46080,
             **{"mla_core/acc": 0.45, "long_context@4096": 0.60, "ppl_prose@2048": 20.8}),
        dict(base, method="baseline", kv_quant="int4-g64", kv_bytes_fraction=0.183, bytes_per_token=8415,
             **{"mla_core/acc": 0.45, "long_context@4096": 0.50, "ppl_prose@2048": 20.9}),
        dict(base, method="care_joint", budget_kv_save=0.75, kv_quant="none", kv_bytes_fraction=0.25,
             bytes_per_token=11520, **{"mla_core/acc": 0.40, "long_context@4096": 0.49, "ppl_prose@2048": 86.0}),
        dict(base, method="care_joint", budget_kv_save=0.875, kv_quant="int4-g64", kv_bytes_fraction=0.024,
             bytes_per_token=1110, **{"mla_core/acc": 0.33, "long_context@4096": 0.10, "ppl_prose@2048": 249.0}),
    ]
    return pd.DataFrame(rows)


def test_pareto_frontier_keeps_only_undominated_rows():
    from harness.pareto import frontier, point_label, quality_columns

    df = _rows()
    assert quality_columns(df) == ["mla_core/acc", "long_context@4096", "ppl_prose@2048"]
    labels = lambda f: [point_label(r) for _, r in f.iterrows()]  # noqa: E731
    assert labels(frontier(df, "long_context@4096")) == ["care_joint 87.5% int4", "original int4", "original"]
    assert labels(frontier(df, "ppl_prose@2048")) == ["care_joint 87.5% int4", "original int4", "original"]


def test_report_answers_with_uncertainty(tmp_path):
    from harness.reports.longctx import write_report

    _rows().to_parquet(tmp_path / "rows.parquet")
    text = write_report(tmp_path, "test rows").read_text()
    assert "| original int4 | 8,415 | 18.3 | 45.0 ± 1.0 | 50.0 ± 2.0 | 20.90 |" in text
    # at <= 25 %: int4 on the original (50.0 ± 2.0) vs care_joint 75 % (49.0 ± 2.0): within the noise
    assert "**long_context@4096**: original int4 50.0 ± 2.0 vs care_joint 75% 49.0 ± 2.0: difference +1.0 ± 2.8" in text
    assert "not distinguishable" in text and "**original int4** is better" in text  # mla_core: 45 vs 40 ± 1.4
    assert "care_joint 87.5% int4 (2.4 %)" in text
    assert (tmp_path / "pareto_bytes.png").stat().st_size > 0 and (tmp_path / "ruler_by_length.png").exists()


def test_gpu_script_parts_cover_the_sweep_exactly(tmp_path, with_care_mla):
    """sweeps/long-context-gpu.sh: its parallel parts run each job of sweeps/long-context.yaml once."""
    import json
    import subprocess
    import sys

    dump = tmp_path / "argdump"
    dump.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    dump.chmod(0o755)
    out = tmp_path / "out"
    subprocess.run(["bash", str(ROOT / "sweeps" / "long-context-gpu.sh")], cwd=ROOT, check=True, capture_output=True,
                   env={"OUT": str(out), "PY": str(dump), "PATH": "/usr/bin:/bin", "MLA_HARNESS_CACHE": str(tmp_path),
                        "RESULTS": str(tmp_path / "results")})
    full = {j.job_id for j in load_sweep(ROOT / "sweeps" / "long-context.yaml").jobs}
    got = []
    parts = [p for p in (out / "logs").glob("*.log") if p.stem not in ("collect", "leaderboard")]
    assert len(parts) == 13
    for log in parts:
        args = json.loads(log.read_text())
        sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
        sweep = load_sweep(ROOT / "sweeps" / "long-context.yaml", overrides=sets)
        assert sweep.name == "long-context" and len(sweep.jobs) <= 2
        got += [j.job_id for j in sweep.jobs]
    assert sorted(got) == sorted(full)
