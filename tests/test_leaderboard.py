"""Leaderboards from rows.parquet: tables, mean accuracy, plots, and the HTML page in headless Chromium.

    pytest -q tests/test_leaderboard.py    # ~10 s; the Chromium test skips when /usr/bin/chromium is absent
                                           # (make test installs it: Debian package chromium)
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from harness.cli import main
from harness.leaderboard import leaderboard_frame, shown_columns, summary_table, task_columns, write_leaderboard

MODEL = "org/model-a"
CALIBS = ("wiki", "code")
BUDGETS = (0.5, 0.75)
METHODS = ("svd", "care-u")


def synthetic_rows() -> pd.DataFrame:
    """A sweep's rows: baseline + 2 methods x 2 budgets x 2 calibration corpora, lm-eval on 2 tasks,
    and one failed job (left out of the tables)."""
    rows = [{"job_id": "base", "status": "ok", "model": MODEL, "method": "baseline", "calib": None, "heal": "none",
             "budget_kv_save": None, "budget_rank": None, "kv_save": 0.0, "ranks": "full", "ranks_per_layer": None,
             "ppl_wiki": 10.0, "ppl_code": 4.0, "arc_easy/acc": 0.60, "piqa/acc": 0.70, "arc_easy/acc_norm": 0.55,
             "tasks": "arc_easy,piqa", "seconds": 1.0}]
    for ci, calib in enumerate(CALIBS):
        for b in BUDGETS:
            for mi, m in enumerate(METHODS):
                hurt = 1 + b * (1 + mi) * (1 + 0.5 * ci)  # svd worse than care-u, code calibration worse
                rows.append({"job_id": f"{m}-{b}-{calib}", "status": "ok", "model": MODEL, "method": m,
                             "calib": calib, "heal": "none", "budget_kv_save": b, "budget_rank": None,
                             "kv_save": b, "ranks": "16", "ranks_per_layer": json.dumps([int(64 * (1 - b))] * 3),
                             "ppl_wiki": 10.0 * hurt, "ppl_code": 4.0 * hurt, "arc_easy/acc": 0.60 / hurt,
                             "piqa/acc": 0.70 / hurt, "arc_easy/acc_norm": 0.5, "tasks": "arc_easy,piqa",
                             "seconds": 1.0})
    rows.append({"job_id": "broken", "status": "failed", "error": "boom", "model": MODEL, "method": "svd"})
    return pd.DataFrame(rows)


N_ROWS = 1 + len(CALIBS) * len(BUDGETS) * len(METHODS)


@pytest.fixture
def results(tmp_path) -> Path:
    folder = tmp_path / "results" / "syn"
    folder.mkdir(parents=True)
    synthetic_rows().to_parquet(folder / "rows.parquet", index=False)
    return folder


def test_leaderboard_tables_and_plots(results):
    md = write_leaderboard(results)
    assert {p.name for p in results.iterdir()} == {"rows.parquet", "leaderboard.md", "leaderboard.csv",
                                                  "leaderboard.html", "plots"}
    assert {p.name for p in (results / "plots").iterdir()} == {
        "ppl_vs_kv_model-a.png", "ranks_model-a.png",
        "calib_heatmap_model-a_kv_save_0.5.png", "calib_heatmap_model-a_kv_save_0.75.png"}
    csv = pd.read_csv(results / "leaderboard.csv")
    assert len(csv) == N_ROWS and "boom" not in csv.to_string()
    assert list(csv.columns[:7]) == ["model", "method", "budget", "calib", "heal", "kv_save", "ranks"]
    assert md.count("\n") == N_ROWS + 1 and "| baseline |" in md
    r = csv[(csv["method"] == "svd") & (csv["budget"] == "kv_save=0.5") & (csv["calib"] == "wiki")].iloc[0]
    hurt = 1 + 0.5 * 1 * 1
    assert r["ratio_wiki"] == pytest.approx(hurt) and r["ratio_code"] == pytest.approx(hurt)
    assert r["acc_mean"] == pytest.approx((0.60 + 0.70) / 2 / hurt)
    assert r["acc_ratio"] == pytest.approx(1 / hurt)
    assert "arc_easy/acc_norm" in csv.columns  # the CSV keeps every column; the table shows acc
    assert "arc_easy/acc_norm" not in md


def test_one_calibration_corpus_means_no_heatmap(results):
    df = synthetic_rows()
    df[df["calib"] != "code"].to_parquet(results / "rows.parquet", index=False)
    write_leaderboard(results)
    assert sorted(p.name for p in (results / "plots").iterdir()) == ["ppl_vs_kv_model-a.png", "ranks_model-a.png"]


def test_baseline_only_sweep_gets_a_leaderboard_without_plots(results):
    """A sweep whose only finished row is the baseline (it has just started) still publishes."""
    df = synthetic_rows()
    df[df["method"] == "baseline"].to_parquet(results / "rows.parquet", index=False)
    md = write_leaderboard(results)
    assert "| baseline |" in md and not list((results / "plots").glob("*.png"))


def test_mean_accuracy_uses_the_requested_tasks_and_folds_subtasks():
    row = {"job_id": "x", "status": "ok", "model": "m", "method": "baseline", "kv_save": 0.0, "tasks": "mla_core",
           "mla_core/acc": 0.5, "mmlu/acc": 0.3, "mmlu_anatomy/acc": 0.2, "mmlu_virology/acc": 0.4,
           "arc/acc": 0.6, "arc_easy/acc": 0.7, "arc_challenge/acc": 0.5, "piqa/acc": 0.65}
    df = pd.DataFrame([row, {**row, "job_id": "y", "tasks": None}])
    assert task_columns(df) == ["mla_core/acc", "mmlu/acc", "arc/acc", "piqa/acc"]
    lb = leaderboard_frame(df.iloc[:1])
    assert lb.loc[0, "acc_mean"] == 0.5  # the group's own average, counted once
    lb = leaderboard_frame(df.iloc[1:])  # no record of the request: the shown columns
    assert lb.loc[0, "acc_mean"] == pytest.approx((0.5 + 0.3 + 0.6 + 0.65) / 4)


def test_summary_table_and_cli(results, capsys):
    table = summary_table(synthetic_rows())
    assert table.splitlines()[0].startswith("| model | method | budget | calib | heal | kv_save | ranks | acc_mean |")
    assert len(table.splitlines()) == 2 + N_ROWS
    assert summary_table(pd.DataFrame()) == "(no rows)"
    assert main(["leaderboard", str(results), "--no-plots"]) == 0
    assert "leaderboard.html" in capsys.readouterr().out and not (results / "plots").exists()


def test_leaderboard_collects_sharded_runs_first(tmp_path, capsys):
    """Shards write runs/<id>/row.json but no rows.parquet: the command collects them (never running a job)."""
    import json

    rows = synthetic_rows().to_dict("records")
    res = tmp_path / "sweep"
    for r in rows:
        (res / "runs" / r["job_id"]).mkdir(parents=True)
        (res / "runs" / r["job_id"] / "row.json").write_text(json.dumps(r, default=str))
    (res / "runs" / ".unfinished.tmp-host-1").mkdir()  # a killed job's folder is not a row
    assert main(["leaderboard", str(res), "--no-plots"]) == 0
    assert sorted(pd.read_parquet(res / "rows.parquet")["job_id"]) == sorted(r["job_id"] for r in rows)
    ok = sum(r.get("status", "ok") == "ok" for r in rows)
    assert f"{ok} rows from" in (res / "leaderboard.md").read_text()
    assert main(["leaderboard", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no runs/ and no rows.parquet" in err


# ----------------------------------------------------------------------------- the browser
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,800"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make test installs the Debian "
                                             "package: apt-get install chromium)")
def test_html_renders_in_headless_chromium(results, tmp_path):
    from PIL import Image

    write_leaderboard(results)
    page = (results / "leaderboard.html").resolve()
    shot = tmp_path / "shot.png"
    p = _chromium(tmp_path, f"--screenshot={shot}", page.as_uri())
    assert shot.exists(), p.stderr[-2000:]
    img = Image.open(shot).convert("RGB")
    assert img.size == (1200, 800)
    colors = img.getcolors(maxcolors=1 << 16)
    assert colors is None or len(colors) > 10, "the screenshot is blank"
    # the DOM after the page's script ran, sorted by a header through the #sort= link
    p = _chromium(tmp_path, "--dump-dom", page.as_uri() + "#sort=ppl_wiki")
    dom = p.stdout
    body = dom.split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    assert body.count("<tr") == N_ROWS
    assert re.search(r'<th data-type="num" class="asc">ppl_wiki</th>', dom), "the header click did not sort"
    lb = leaderboard_frame(synthetic_rows())
    col = shown_columns(lb).index("ppl_wiki")  # stderr and significance columns are folded into cells
    shown = [float(re.findall(r'data-v="([^"]*)"', tr)[col]) for tr in body.split("</tr>")[:-1]]
    assert shown == sorted(lb["ppl_wiki"])
