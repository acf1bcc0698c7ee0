"""The published site over many sweeps: pages, links, numbers, the Pareto front, REPORT.md, Chromium.

    pytest -q tests/test_publish.py    # ~20 s; the Chromium tests skip when chromium is absent (make test installs it)
"""
from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pandas as pd
import pytest

from harness.cli import main
from harness.publish import _safe_urls, fallback_markdown, markdown_html, pareto_front, publish
from test_leaderboard import CHROMIUM, _chromium

A, B = "org/model-a", "org/model-b"
# (model, method, kv_save) -> (arc_easy, piqa); bytes per token = full * (1 - kv_save)
ACC = {(A, "baseline", 0.0): (0.60, 0.70), (A, "svd", 0.5): (0.50, 0.60), (A, "svd", 0.75): (0.40, 0.50),
       (A, "care-u", 0.5): (0.58, 0.68), (A, "care-u", 0.75): (0.50, 0.60),
       (B, "baseline", 0.0): (0.70, 0.80), (B, "svd", 0.5): (0.45, 0.55), (B, "care-u", 0.5): (0.66, 0.76)}
FULL_BYTES = {A: 1000, B: 800}
# min bytes, max mean accuracy: A care-u@0.75 (250 B, 55%), B care-u@0.5 (400 B, 71%), B baseline (800 B, 75%)
MEAN_SE = (0.02 ** 2 + 0.015 ** 2) ** 0.5 / 2  # the leaderboard's stderr of the two-task mean (1.25 points)
FRONT = {(A, "care-u", 0.75), (B, "care-u", 0.5), (B, "baseline", 0.0)}


def row(model, method, kv, sweep, acc=True, stderr=True) -> dict:
    base = method == "baseline"
    r = {"job_id": f"{sweep}-{model[-1]}-{method}-{kv}", "sweep": sweep, "status": "ok", "model": model,
         "method": method, "method_name": {"care-u": "care"}.get(method, method),
         "method_options": json.dumps({"allocation": "uniform"} if method == "care-u" else {}),
         "calib": None if base else "wiki", "calib_samples": None if base else 64,
         "budget_kv_save": None if base else kv, "budget_rank": None, "heal": "none", "heal_mode": "none",
         "heal_tokens": 0, "kv_save": kv, "cache_width": int(FULL_BYTES[model] * (1 - kv) / 4),
         "bytes_per_token": FULL_BYTES[model] * (1 - kv), "ranks": "full" if base else "16",
         "ranks_per_layer": None if base else json.dumps([32, 32, 32, 24, 16, 16]),
         "ppl_wiki": 10.0 * (1 + kv), "tasks": None}
    if acc:
        arc, piqa = ACC[(model, method, kv)]
        r.update({"tasks": "arc_easy,piqa", "arc_easy/acc": arc, "piqa/acc": piqa})
    if acc and stderr:
        r.update({"arc_easy/acc_stderr": 0.02, "piqa/acc_stderr": 0.015,  # mean's: sqrt(.02^2+.015^2)/2
                  # not significant vs the baseline: care-u@0.5 only (the baseline's own flag is missing)
                  "acc_mean_significant": None if base else not (method == "care-u" and kv == 0.5)})
    return r


REPORT = """# Alpha report <script>alert(1)</script>

CARE-U keeps **most** of the accuracy; see ![the plot](plots/custom.png) and [notes](notes.txt).
Bad: [x](javascript:alert(1)) ![remote](https://example.com/a.png) [gone](missing.png) [up](../beta/rows.parquet)

| method | acc |
|---|---|
| care-u | 63.0 <b>bold</b> |

- one
- two

```
a < b && c
```
"""


def make_results(root: Path) -> Path:
    """Three sweeps under `root`. alpha: model A, accuracy ± stderr and a significance flag, its own plot, a REPORT.md and run configs;
    beta: model B, accuracy without stderr, one failed job, no plots; paper/gamma: model A, perplexity only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alpha = [row(A, "baseline", 0.0, "alpha")] + [row(A, m, kv, "alpha") for m in ("svd", "care-u") for kv in (0.5, 0.75)]
    beta = [row(B, m, kv, "beta", stderr=False) for m, kv in (("baseline", 0.0), ("svd", 0.5), ("care-u", 0.5))]
    beta.append({"job_id": "beta-broken", "status": "failed", "error": "boom", "model": B, "method": "asvd"})
    gamma = [row(A, m, kv, "gamma", acc=False) for m, kv in (("baseline", 0.0), ("svd", 0.5))]
    for name, rows in (("alpha", alpha), ("beta", beta), ("paper/gamma", gamma)):
        (root / name).mkdir(parents=True)
        pd.DataFrame(rows).to_parquet(root / name / "rows.parquet", index=False)
    a = root / "alpha"
    (a / "plots").mkdir()
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    fig.savefig(a / "plots" / "custom.png")
    plt.close(fig)
    (a / "REPORT.md").write_text(REPORT)
    (a / "notes.txt").write_text("notes")
    cfg = a / "runs" / "alpha-a-svd-0.5" / "config.json"
    cfg.parent.mkdir(parents=True)
    cfg.write_text(json.dumps({"calib": {"corpus": "wiki", "samples": 64, "seq_len": 128, "seed": 7},
                               "heal": {"mode": "none"}}))
    return root


@pytest.fixture
def results(tmp_path) -> Path:
    return make_results(tmp_path / "results")


def _snapshot(folder: Path) -> dict:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def _rows(page: str, table_id: str) -> list[list[str]]:
    """The text of every cell of a table, tags stripped."""
    body = page.split(f'id="{table_id}"', 1)[1].split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    return [[html.unescape(re.sub(r"<[^>]+>", "", c)).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", tr, re.S)]
            for tr in body.split("</tr>")[:-1]]


def _header(page: str, table_id: str) -> list[str]:
    head = page.split(f'id="{table_id}"', 1)[1].split("</thead>", 1)[0]
    return [html.unescape(re.sub(r"<[^>]+>", "", h)) for h in re.findall(r"<th[^>]*>(.*?)</th>", head)]


def _broken_links(site: Path) -> list[str]:
    """Relative href/src of every page that name no file of the site; remote loads count as broken."""
    bad = []
    for page in site.rglob("*.html"):
        for attr, url in re.findall(r'\s(href|src)="([^"]*)"', page.read_text()):
            url = html.unescape(url)
            if url.startswith("#") or (attr == "href" and re.match(r"^(https?|mailto):", url)):
                continue
            target = (page.parent / url.split("#")[0]).resolve()
            if re.match(r"^[a-z]+:|^//", url) or not target.is_file() or site.resolve() not in target.parents:
                bad.append(f"{page.relative_to(site)}: {attr}={url}")
    return bad


def test_site_pages_links_numbers_and_front(results, tmp_path, capsys):
    before = _snapshot(results)
    site = tmp_path / "site"
    assert main(["publish", str(results), "--out", str(site)]) == 0
    assert "published 3 sweep(s), 10 rows" in capsys.readouterr().out
    assert _snapshot(results) == before, "publishing wrote into the results"
    assert {p.relative_to(site).as_posix() for p in site.rglob("*") if p.is_file() and "plots" not in p.parts} == {
        ".mla-harness-site", "index.html", "pareto.png", "pareto.csv", "sweeps/alpha/index.html",
        "sweeps/alpha/leaderboard.csv", "sweeps/alpha/notes.txt", "sweeps/beta/index.html",
        "sweeps/beta/leaderboard.csv", "sweeps/paper__gamma/index.html", "sweeps/paper__gamma/leaderboard.csv"}
    assert _broken_links(site) == []
    # plots: alpha's copied byte for byte (not re-made), beta's made by leaderboard.make_plots
    assert [p.name for p in (site / "sweeps/alpha/plots").iterdir()] == ["custom.png"]
    assert (site / "sweeps/alpha/plots/custom.png").read_bytes() == (results / "alpha/plots/custom.png").read_bytes()
    assert {p.name for p in (site / "sweeps/beta/plots").iterdir()} == {"ppl_vs_kv_model-b.png", "ranks_model-b.png"}

    index = (site / "index.html").read_text()
    sweeps = {r[0]: r for r in _rows(index, "sweeps")}
    assert sorted(sweeps) == ["alpha", "beta", "paper/gamma"]
    assert sweeps["alpha"][1:5] == [A, "care-u, svd", "5", "0"]
    assert sweeps["beta"][1:5] == [B, "care-u, svd", "3", "1"]  # the failed job is counted, not shown
    assert sweeps["paper/gamma"][1:5] == [A, "svd", "2", "0"] and re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC",
                                                                          sweeps["alpha"][5])
    # the Pareto front over every sweep: bytes per token vs mean accuracy (gamma has none: left out)
    pts = pd.read_csv(site / "pareto.csv")
    assert len(pts) == len(ACC) and set(pts["sweep"]) == {"alpha", "beta"}
    on = {(m, meth, round(1 - x / FULL_BYTES[m], 2)) for m, meth, x in
          pts[pts["on_front"]][["model", "method", "x"]].itertuples(index=False)}
    assert on == FRONT
    b = pts[(pts["model"] == B) & (pts["method"] == "care-u")].iloc[0]
    assert b["y"] == pytest.approx((0.66 + 0.76) / 2) and b["x"] == 400 and pd.isna(b["yerr"])
    assert pts[(pts["sweep"] == "alpha") & (pts["method"] == "svd")]["yerr"].tolist() == pytest.approx([MEAN_SE] * 2)
    assert "2 row(s) without acc_mean are left out" in index
    front = _rows(index, "front")
    assert [(r[1], r[2], r[6], r[7]) for r in front] == [(A, "care-u", "250", "55.0 ± 1.2"),
                                                         (B, "care-u", "400", "71.0"), (B, "baseline", "800", "75.0")]

    # a sweep page: the leaderboard with "acc ± stderr" and n.s. where the flag says so
    page = (site / "sweeps/alpha/index.html").read_text()
    head = _header(page, "leaderboard")
    assert "acc_mean_stderr" not in head and "acc_mean_significant" not in head and "arc_easy/acc" in head
    lb = {(r[head.index("method")], r[head.index("budget")]): r for r in _rows(page, "leaderboard")}
    col = head.index("acc_mean")
    assert lb[("care-u", "kv_save=0.5")][col] == "63.0 ± 1.2 n.s."
    assert lb[("svd", "kv_save=0.5")][col] == "55.0 ± 1.2"
    assert lb[("baseline", "-")][col] == "65.0 ± 1.2"
    assert lb[("svd", "kv_save=0.75")][head.index("arc_easy/acc")] == "40.0 ± 2.0"
    assert lb[("svd", "kv_save=0.75")][head.index("piqa/acc")] == "50.0 ± 1.5"
    beta = (site / "sweeps/beta/index.html").read_text()
    bhead = _header(beta, "leaderboard")
    assert [r[bhead.index("acc_mean")] for r in _rows(beta, "leaderboard")] == ["75.0", "71.0", "50.0"]
    assert "1 failed job(s) left out" in beta
    # conversion settings of every row: row fields, and seq_len/seed from the run's config.json
    sh = _header(page, "settings-table")
    settings = {r[0]: dict(zip(sh, r)) for r in _rows(page, "settings-table")}
    assert len(settings) == 5
    s = settings["alpha-a-svd-0.5"]
    assert (s["method"], s["budget"], s["calib"], s["samples"], s["seq_len"], s["seed"]) == (
        "svd", "kv_save=0.5", "wiki", "64", "128", "7")
    assert s["widths per layer"] == "32×3, 24, 16×2" and s["cache_width"] == "125"
    assert settings["alpha-a-care-u-0.5"]["options"] == "allocation=uniform"
    assert settings["alpha-a-care-u-0.5"]["seq_len"] == "-"  # no config.json, no row field: not made up
    assert settings["alpha-a-baseline-0.0"]["widths per layer"] == "full"
    # REPORT.md rendered, escaped, its safe links kept and copied
    report = page.split('id="report"', 1)[1]
    assert "<script>alert" not in report and "&lt;script&gt;alert(1)&lt;/script&gt;" in report
    assert "<table>" in report and "&lt;b&gt;bold&lt;/b&gt;" in report and "<strong>most</strong>" in report
    assert 'src="plots/custom.png"' in report and 'href="notes.txt"' in report
    assert "javascript:" not in report and "example.com" not in report and "missing.png" not in report
    assert "rows.parquet\"" not in report and "a &lt; b &amp;&amp; c" in report


def test_rerun_replaces_the_site_whole(results, tmp_path):
    site = tmp_path / "site"
    publish(results, site)
    first = (site / "index.html").read_text()
    publish(results, site)
    assert (site / "index.html").read_text() == first
    import shutil

    shutil.rmtree(results / "beta")
    publish(results, site)
    assert not (site / "sweeps/beta").exists()
    assert [r[0] for r in _rows((site / "index.html").read_text(), "sweeps")] == ["alpha", "paper/gamma"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results", "site"], "temporary folders left behind"


def test_perplexity_only_sweeps_plot_the_wiki_ratio(results, tmp_path):
    site = tmp_path / "site"
    publish(results / "paper", site)  # gamma alone: no accuracy anywhere
    pts = pd.read_csv(site / "pareto.csv")
    assert pts["y"].tolist() == pytest.approx([1.0, 1.5]) and pts["on_front"].tolist() == [True, True]
    assert "y: ratio_wiki, x: bytes_per_token" in (site / "index.html").read_text()


@pytest.mark.parametrize("make,needle", [
    (lambda root: None, "is not a folder"),
    (lambda root: root.mkdir(), "no sweep under"),
    (lambda root: (root / "x" / "runs" / "j").mkdir(parents=True) or (root / "x/runs/j/rows.parquet").write_text("x"),
     "no sweep under"),
    (lambda root: (root / "s").mkdir(parents=True) or (root / "s/rows.parquet").write_text("not parquet"),
     "cannot read"),
])
def test_bad_results_root_is_one_line(tmp_path, capsys, make, needle):
    root = tmp_path / "results"
    make(root)
    assert main(["publish", str(root), "--out", str(tmp_path / "site")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err and len(err.splitlines()) == 1
    assert not (tmp_path / "site").exists()


def test_out_that_is_not_a_site_is_refused(results, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    for out, needle in ((mine, "is not a site built by"), (results, "would replace the results"),
                        (tmp_path, "would replace the results")):
        assert main(["publish", str(results), "--out", str(out)]) == 2
        assert needle in capsys.readouterr().err
    assert (mine / "keep.txt").read_text() == "mine" and not (results / "index.html").exists()


def test_pareto_front():
    # cost, quality: (1, 1) and (2, 3) are on it; (2, 2) is beaten by (2, 3); (3, 3) costs more for the same
    assert pareto_front([1, 2, 2, 3, 4], [1, 2, 3, 3, 5]) == [True, False, True, False, True]


@pytest.mark.parametrize("render", [markdown_html, fallback_markdown])
def test_report_markdown_is_escaped_and_its_links_safe(render, tmp_path):
    if render is markdown_html:
        pytest.importorskip("markdown")
    (tmp_path / "src" / "plots").mkdir(parents=True)
    (tmp_path / "src" / "plots" / "custom.png").write_bytes(b"png")
    (tmp_path / "site").mkdir()
    out = _safe_urls(render(REPORT), tmp_path / "src", tmp_path / "site")
    assert re.search(r"<h1>Alpha report &lt;script&gt;alert\(1\)&lt;/script&gt;</h1>", out)
    assert "<li>one</li>" in out and "<th>method</th>" in out and "<pre><code>a &lt; b &amp;&amp; c" in out
    assert "<script" not in out and "<b>" not in out and "javascript" not in out and "example.com" not in out
    assert re.search(r'<img alt="the plot" src="plots/custom.png"', out)
    assert (tmp_path / "site/plots/custom.png").read_bytes() == b"png"
    assert 'href="notes.txt"' not in out and ">notes</a>" in out  # a link to nothing reads as text
    assert "<em>[remote]</em>" in out  # a remote image is its alt text: the site loads nothing


# ----------------------------------------------------------------------------- the browser
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make test installs the Debian "
                                             "package: apt-get install chromium)")
def test_site_renders_in_headless_chromium(results, tmp_path):
    from PIL import Image

    site = tmp_path / "site"
    publish(results, site)
    for page in (site / "index.html", site / "sweeps/alpha/index.html"):
        shot = tmp_path / f"{page.parent.name}.png"
        p = _chromium(tmp_path, f"--screenshot={shot}", page.resolve().as_uri())
        assert shot.exists(), p.stderr[-2000:]
        colors = Image.open(shot).convert("RGB").getcolors(maxcolors=1 << 16)
        assert colors is None or len(colors) > 10, f"the screenshot of {page} is blank"
    dom = _chromium(tmp_path, "--dump-dom", (site / "index.html").resolve().as_uri()).stdout
    assert [r[0] for r in _rows(dom, "sweeps")] == ["alpha", "beta", "paper/gamma"]
    # the sweep page's script sorts the ± column by its value (#sort= clicks the header)
    dom = _chromium(tmp_path, "--dump-dom", (site / "sweeps/alpha/index.html").resolve().as_uri() + "#sort=acc_mean").stdout
    assert re.search(r'<th data-type="num" class="asc">acc_mean</th>', dom), "the header click did not sort"
    col = _header(dom, "leaderboard").index("acc_mean")
    shown = [float(r[col].split(" ")[0]) for r in _rows(dom, "leaderboard")]
    assert shown == [45.0, 55.0, 55.0, 63.0, 65.0]
    assert _broken_links(site) == []
