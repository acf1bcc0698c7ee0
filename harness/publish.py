"""Publish one static site over many sweeps: an index, a page per sweep, a quality-vs-KV-bytes Pareto plot.

    mla-harness publish results --out site      # then open site/index.html (no server, no network)

Every folder under RESULTS_ROOT that holds a rows.parquet is a sweep. The site:
    index.html                  every sweep (models, methods, rows, last update, links), the Pareto plot
    pareto.png, pareto.csv      quality vs KV bytes per token across sweeps, methods and models
    sweeps/<slug>/index.html    the sweep's leaderboard, plots, REPORT.md and every row's conversion settings
    sweeps/<slug>/leaderboard.csv, plots/*.png (copied from the sweep; made only where it has none)
The tables come from harness.leaderboard (the same frame, formats and plots as `mla-harness leaderboard`).
Uncertainty is shown wherever the rows carry it: a column `X_stderr` beside `X` renders as "X ± s"; a
significance column (`X_significant`, or a row-level one such as `significant`) marks "n.s." where the
difference from the model's baseline is not significant. Pages are self-contained static files with
relative links; the site is built in a temporary folder and renamed into place, so a rerun replaces it
whole and a failed build leaves the previous site as it was. The results folders are only read.
"""
from __future__ import annotations

import html
import json
import os
import re
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from urllib.parse import quote, unquote

from harness.errors import HarnessError
from harness.paths import save_figure

SITE_MARK = ".mla-harness-site"  # marks a folder this command built, so a rerun may replace it
_COPYABLE = {".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp", ".csv", ".md", ".txt", ".json", ".html"}


@dataclass
class Sweep:
    name: str  # its folder relative to RESULTS_ROOT ("quick", "paper/care")
    folder: Path
    slug: str  # its folder under site/sweeps/
    rows: "pd.DataFrame"  # noqa: F821  (rows.parquet as written by the sweep)


# ------------------------------------------------------------------------------- the sweeps
def find_sweeps(root: Path) -> list[Sweep]:
    """Every folder under `root` with a rows.parquet (run folders, hidden folders and sites skipped).

    Raises:
        HarnessError: `root` is missing, holds no sweep, or a rows.parquet cannot be read.
    """
    import pandas as pd

    root = Path(root)
    if not root.is_dir():
        raise HarnessError(f"RESULTS_ROOT {root} is not a folder; pass the folder that holds the sweeps' results "
                           "(e.g. results, after mla-harness sweep sweeps/quick.yaml)")
    found = []
    for d, subdirs, files in os.walk(root):  # runs/ (job folders) and hidden folders are never entered
        subdirs[:] = sorted(x for x in subdirs if x != "runs" and not x.startswith("."))
        if "rows.parquet" in files and not _is_site(Path(d)):
            found.append(Path(d))
    if not found:
        raise HarnessError(f"no sweep under {root}: no <sweep>/rows.parquet there; run a sweep first "
                           "(mla-harness sweep sweeps/quick.yaml --results " + str(root) + ")")
    sweeps, slugs = [], set()
    for folder in found:
        name = root.name if folder == root else folder.relative_to(root).as_posix()
        try:
            rows = pd.read_parquet(folder / "rows.parquet")
        except Exception as e:  # a truncated or foreign file: say which, before anything is written
            why = " ".join(str(e).split())[:200]  # one line, whatever the reader said
            raise HarnessError(f"cannot read {folder / 'rows.parquet'} ({type(e).__name__}: {why}); rerun that "
                               "sweep to rewrite it, or remove the folder") from None
        slug = base = re.sub(r"[^A-Za-z0-9_.-]+", "_", name.replace("/", "__")).strip("._") or "sweep"
        n = 1
        while slug in slugs:
            n += 1
            slug = f"{base}-{n}"
        slugs.add(slug)
        sweeps.append(Sweep(name, folder, slug, rows))
    return sweeps


def _is_site(folder: Path) -> bool:
    return (folder / SITE_MARK).exists() or any((p / SITE_MARK).exists() for p in folder.parents)


# ------------------------------------------------------------------------ conversion settings
SETTINGS = ["job_id", "model", "method", "options", "budget", "calib", "samples", "seq_len", "seed", "heal",
            "cache_width", "widths per layer"]


def _run_lengths(widths: list) -> str:
    """[96, 96, 96, 80] -> "96×3, 80": the per-layer widths, in layer order, short."""
    out, i = [], 0
    while i < len(widths):
        j = i
        while j + 1 < len(widths) and widths[j + 1] == widths[i]:
            j += 1
        out.append(f"{widths[i]}×{j - i + 1}" if j > i else str(widths[i]))
        i = j + 1
    return ", ".join(out)


def settings_frame(sweep: Sweep, full: "pd.DataFrame") -> "pd.DataFrame":  # noqa: F821
    """One row per leaderboard row: how it was converted (row fields, else the run's config.json)."""
    import pandas as pd

    def get(r, key):
        v = r.get(key)
        return None if v is None or (not isinstance(v, str) and pd.isna(v)) else v

    out = []
    for _, r in full.iterrows():
        cfg = {}
        jid = get(r, "job_id")
        f = sweep.folder / "runs" / str(jid) / "config.json"
        if jid and f.is_file():
            try:
                cfg = json.loads(f.read_text())
            except (OSError, ValueError):
                cfg = {}
        calib, heal = cfg.get("calib") or {}, cfg.get("heal") or {}
        base = r.get("method") == "baseline"
        opts = json.loads(get(r, "method_options") or "{}") if isinstance(get(r, "method_options"), str) else {}
        heal_text = str(get(r, "heal") or "-")
        if heal.get("mode", "none") != "none":
            heal_text += " (" + ", ".join(f"{k}={heal[k]}" for k in ("mode", "tokens", "lr", "lora_rank", "kd_weight")
                                           if k in heal) + ")"
        widths = json.loads(get(r, "ranks_per_layer")) if isinstance(get(r, "ranks_per_layer"), str) else None
        out.append({
            "job_id": jid or "", "model": r.get("model"),
            "method": get(r, "method_name") or r.get("method"),
            "options": ", ".join(f"{k}={v}" for k, v in sorted(opts.items())) or "-",
            "budget": r.get("budget", "-"),
            "calib": "-" if base else (get(r, "calib") or calib.get("corpus") or "-"),
            "samples": "-" if base else (get(r, "calib_samples") or calib.get("samples") or "-"),
            "seq_len": "-" if base else (get(r, "calib_seq_len") or calib.get("seq_len") or "-"),
            "seed": "-" if base else next((v for v in (get(r, "calib_seed"), calib.get("seed")) if v is not None), "-"),
            "heal": heal_text,
            "cache_width": get(r, "cache_width") or "",
            "widths per layer": _run_lengths(widths) if widths else "full",
        })
    return pd.DataFrame(out, columns=SETTINGS)


def _plain_table(df: "pd.DataFrame", table_id: str) -> str:  # noqa: F821
    def cell(v):
        return "" if v is None else html.escape(f"{v:g}" if isinstance(v, float) else str(v))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in df.columns)
    body = "\n".join("<tr>" + "".join(f"<td class=s>{cell(v)}</td>" for v in r) + "</tr>"
                     for r in df.itertuples(index=False))
    return f'<table class="set" id="{table_id}"><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>'


# --------------------------------------------------------------------------------- the Pareto plot
def pareto_front(cost, quality) -> list[bool]:
    """Which points no other point beats: no more cost and at least the quality, one of them strictly."""
    order = sorted(range(len(cost)), key=lambda i: (cost[i], -quality[i]))
    best, on = float("-inf"), [False] * len(cost)
    for i in order:
        if quality[i] > best:
            on[i], best = True, quality[i]
    return on


def pareto_points(frames: dict[str, "pd.DataFrame"]) -> tuple["pd.DataFrame", dict]:  # noqa: F821
    """Points of every sweep's leaderboard rows on one quality-vs-KV-bytes plane.

    x is bytes per token (kv_save where a row lacks it); y is the mean accuracy where any row has one,
    else the wiki perplexity ratio to the model's baseline (else the first ratio column).

    Returns:
        (points with columns sweep, model, method, budget, calib, heal, x, y, yerr, on_front; the axes:
        {"x", "y", "x_lower_better", "y_higher_better", "left_out"}).
    """
    import pandas as pd

    every = pd.concat([f.assign(sweep=name) for name, f in frames.items() if len(f)], ignore_index=True) \
        if any(len(f) for f in frames.values()) else pd.DataFrame()
    if not len(every):
        return pd.DataFrame(), {}
    if "job_id" in every:  # the same job kept in two results folders is one point
        every = every.drop_duplicates("job_id", keep="first")
    ratios = sorted(c for c in every.columns if c.startswith("ratio_"))
    if "acc_mean" in every and every["acc_mean"].notna().any():
        y, higher = "acc_mean", True
    elif ratios:
        y, higher = ("ratio_wiki" if "ratio_wiki" in ratios else ratios[0]), False
    else:
        return pd.DataFrame(), {}
    use_bytes = "bytes_per_token" in every and every["bytes_per_token"].notna().all()
    x = "bytes_per_token" if use_bytes else "kv_save"
    pts = every[every[y].notna() & every[x].notna()]
    yerr = pts[f"{y}_stderr"] if f"{y}_stderr" in pts else pd.Series(float("nan"), index=pts.index)
    cols = {c: pts[c] if c in pts else "-" for c in ("sweep", "model", "method", "budget", "calib", "heal")}
    out = pd.DataFrame({**cols, "x": pts[x].astype(float), "y": pts[y].astype(float), "yerr": yerr.astype(float)})
    out = out.reset_index(drop=True)
    cost = list(out["x"] if use_bytes else -out["x"])
    out["on_front"] = pareto_front(cost, list(out["y"] if higher else -out["y"]))
    axes = {"x": x, "y": y, "x_lower_better": use_bytes, "y_higher_better": higher, "left_out": len(every) - len(out)}
    return out, axes


_MARKERS = "osD^vP*X<>hp8dH"


def pareto_plot(points: "pd.DataFrame", axes: dict, path: Path) -> None:  # noqa: F821
    """Quality vs KV bytes: one colour per model, one marker per method, the Pareto front as a step line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    models, methods = sorted(points["model"].unique()), sorted(points["method"].unique())
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(models)}
    markers = {m: _MARKERS[i % len(_MARKERS)] for i, m in enumerate(methods)}
    fig, ax = plt.subplots(figsize=(9, 5.5), layout="constrained")
    for (model, method), g in points.groupby(["model", "method"], sort=True):
        yerr = g["yerr"].fillna(0) if g["yerr"].notna().any() else None
        ax.errorbar(g["x"], g["y"], yerr=yerr, fmt=markers[method], ms=7,
                    color=colors[model], ecolor=colors[model], elinewidth=1, capsize=2, alpha=0.9)
    front = points[points["on_front"]].sort_values("x")
    ax.step(front["x"], front["y"], where="post" if axes["x_lower_better"] else "pre",
            color="k", lw=1.2, ls="--", zorder=0)
    xlabel = "KV cache bytes per token" if axes["x"] == "bytes_per_token" else "KV save"
    ylabel = "mean accuracy" if axes["y"] == "acc_mean" else f"perplexity / baseline ({axes['y'][6:]})"
    ax.set_xlabel(xlabel + (" (lower is better)" if axes["x_lower_better"] else " (higher is better)"))
    ax.set_ylabel(ylabel + (" (higher is better)" if axes["y_higher_better"] else " (lower is better)"))
    ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=colors[m], marker="o", ls="", label=m) for m in models]
    handles += [Line2D([], [], color="gray", marker=markers[m], ls="", label=m) for m in methods]
    handles.append(Line2D([], [], color="k", ls="--", label="Pareto front"))
    ax.legend(handles=handles, fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title("Quality vs KV cache across sweeps (colour: model, marker: method)")
    save_figure(fig, path)


# --------------------------------------------------------------------------------- REPORT.md
def markdown_html(text: str) -> str:
    """REPORT.md as HTML: the `markdown` package (raw HTML disabled) if installed, else a small renderer.

    Either way every character of the input is escaped; links and images are made safe by `_safe_urls`.
    """
    try:
        import markdown
    except ImportError:
        return fallback_markdown(text)
    md = markdown.Markdown(extensions=["tables", "fenced_code"])
    md.preprocessors.deregister("html_block")  # raw HTML in the report becomes text, never markup
    md.inlinePatterns.deregister("html")
    return md.convert(text)


def _inline(text: str) -> str:
    """Escape, then `code`, ![alt](src), [text](href), **bold**, *italic*."""
    codes: list[str] = []

    def keep(m):
        codes.append(f"<code>{m[1]}</code>")
        return f"\x00{len(codes) - 1}\x00"

    s = re.sub(r"`([^`]+)`", keep, html.escape(text.replace("\x00", "")))
    s = re.sub(r"!\[([^\]]*)\]\(([^)\s]+)\)", r'<img alt="\1" src="\2">', s)
    s = re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", r'<a href="\2">\1</a>', s)
    s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
    s = re.sub(r"(?<![*\w])\*(?!\s)(.+?)(?<!\s)\*(?![*\w])", r"<em>\1</em>", s)
    return re.sub(r"\x00(\d+)\x00", lambda m: codes[int(m[1])], s)


def fallback_markdown(text: str) -> str:
    """Headings, paragraphs, lists, fenced code and pipe tables; everything else is escaped text."""
    out: list[str] = []
    para: list[str] = []
    lst: tuple[str, list[str]] | None = None
    lines = text.splitlines()

    def flush():
        nonlocal lst
        if para:
            out.append("<p>" + _inline(" ".join(para)) + "</p>")
            para.clear()
        if lst:
            out.append(f"<{lst[0]}>" + "".join(f"<li>{_inline(t)}</li>" for t in lst[1]) + f"</{lst[0]}>")
            lst = None

    def cells(line):
        return [c.strip() for c in line.strip().strip("|").split("|")]

    i = 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```"):
            flush()
            j = i + 1
            while j < len(lines) and not lines[j].lstrip().startswith("```"):
                j += 1
            out.append("<pre><code>" + html.escape("\n".join(lines[i + 1:j])) + "</code></pre>")
            i = j + 1
            continue
        h = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        item = re.match(r"^\s*(?:([-*+])|\d+[.)])\s+(.*)$", line)
        if h:
            flush()
            out.append(f"<h{len(h[1])}>{_inline(h[2])}</h{len(h[1])}>")
        elif line.lstrip().startswith("|") and i + 1 < len(lines) and re.match(r"^\s*\|?[\s:|-]+\|?\s*$", lines[i + 1]) \
                and "-" in lines[i + 1]:
            flush()
            rows = [cells(line)]
            i += 2
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                rows.append(cells(lines[i]))
                i += 1
            head = "".join(f"<th>{_inline(c)}</th>" for c in rows[0])
            body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            continue
        elif item:
            kind = "ul" if item[1] else "ol"
            if para or (lst and lst[0] != kind):
                flush()
            lst = lst or (kind, [])
            lst[1].append(item[2])
        elif not line.strip():
            flush()
        elif lst and line.startswith(("  ", "\t")):
            lst[1][-1] += " " + line.strip()
        else:
            if lst:
                flush()
            para.append(line.strip())
        i += 1
    flush()
    return "\n".join(out)


_URL = re.compile(r'\s(href|src)="([^"]*)"')
_IMG = re.compile(r'<img\b[^>]*>')


def _safe_urls(body: str, source: Path, dest: Path) -> str:
    """Keep only links that work offline and harm nothing; copy the files they name into the site.

    http(s)/mailto links stay (they are not loaded); a relative link or image stays when the file is
    in the site already or in the sweep folder (copied, outside runs/); anything else (javascript:,
    data:, remote images, missing files, ..) loses its URL: a link reads as text, an image as its alt.
    """
    def safe(attr: str, url: str) -> bool:
        bare = re.sub(r"[\x00-\x20]", "", html.unescape(url))
        scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):", bare)
        if bare.startswith("#"):
            return True
        if scheme or bare.startswith("//"):
            return attr == "href" and (bare.startswith("//") or scheme[1].lower() in ("http", "https", "mailto"))
        rel = PurePosixPath(unquote(bare.split("#", 1)[0].split("?", 1)[0]))
        if not rel.parts or rel.is_absolute() or ".." in rel.parts or rel.parts[0] in ("runs", "rows.parquet"):
            return False
        if (dest / rel).is_file():
            return True
        if (source / rel).is_file() and rel.suffix.lower() in _COPYABLE:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / rel, dest / rel)
            return True
        return False

    def img(m: re.Match) -> str:
        src, alt = re.search(r'\ssrc="([^"]*)"', m[0]), re.search(r'\salt="([^"]*)"', m[0])
        return m[0] if src and safe("src", src[1]) else f"<em>[{alt[1] if alt else 'image'}]</em>"

    body = _IMG.sub(img, body)
    return _URL.sub(lambda m: m[0] if safe(m[1], m[2]) else "", body)


# ------------------------------------------------------------------------------------ pages
_SITE_CSS = """nav{margin-bottom:12px}table.idx td,table.set td,table.idx th,table.set th{white-space:normal;text-align:left}
.se{color:#666;font-size:11px}sup.ns{color:#b35900;font-weight:600}details{margin:16px 0}
summary{cursor:pointer;font-weight:600}.report table{border-collapse:collapse}.report th,.report td{text-align:left}
.report pre{background:#f6f6f6;padding:8px;overflow:auto}.legend{color:#555;font-size:13px}"""


def _page(title: str, body: str, script: bool = False) -> str:
    from harness.leaderboard import _CSS, _JS

    return (f"<!doctype html>\n<html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{_CSS}\n{_SITE_CSS}</style></head><body>\n{body}\n"
            + (f"<script>{_JS}</script>\n" if script else "") + "</body></html>\n")


def _sweep_page(sweep: Sweep, dest: Path) -> dict:
    """Write sweeps/<slug>/: index.html, leaderboard.csv, plots/; return the index's facts about it."""
    from harness.leaderboard import LEGEND, leaderboard_frame, make_plots, table_html

    dest.mkdir(parents=True)
    df = sweep.rows
    full = leaderboard_frame(df, all_columns=True, results=sweep.folder)  # paired significance from the runs
    lb = full[full.attrs.get("table_columns", list(full.columns))]
    failed = int((df["status"] != "ok").sum()) if "status" in df else 0
    full.to_csv(dest / "leaderboard.csv", index=False)
    pngs = sorted((sweep.folder / "plots").glob("*.png"))
    if pngs:  # the sweep's own figures, as they are
        (dest / "plots").mkdir()
        for p in pngs:
            shutil.copyfile(p, dest / "plots" / p.name)
    else:
        pngs = make_plots(df, dest / "plots")
    e = html.escape
    parts = [f'<nav><a href="../../index.html">&larr; all sweeps</a></nav><h1>Sweep: {e(sweep.name)}</h1>',
             f"<p>{len(full)} rows from {e(sweep.name)}/rows.parquet"
             + (f"; {failed} failed job(s) left out" if failed else "")
             + '. <a href="leaderboard.csv">leaderboard.csv</a> (every column).</p>']
    if len(full):
        parts += [f'<p class="legend">{html.escape(LEGEND)} Click a header to sort (or open with '
                  '#sort=&lt;column&gt;).</p>', table_html(lb)]
    else:
        parts.append("<p>(no finished rows)</p>")
    if pngs:
        parts.append('<h2 id="plots">Plots</h2>' + "".join(
            f'<img alt="{e(p.name)}" src="plots/{e(quote(p.name))}">' for p in sorted(pngs)))
    report = sweep.folder / "REPORT.md"
    if report.is_file():
        parts.append('<h2 id="report">Report</h2><div class="report">'
                     + _safe_urls(markdown_html(report.read_text(errors="replace")), sweep.folder, dest) + "</div>")
    if len(full):
        parts.append(f'<details id="settings" open><summary>Conversion settings of every row ({len(full)})</summary>'
                     + _plain_table(settings_frame(sweep, full), "settings-table") + "</details>")
    (dest / "index.html").write_text(_page(f"Sweep: {sweep.name}", "\n".join(parts), script=True))
    ok = df[df["status"] == "ok"] if "status" in df else df
    mtime = (sweep.folder / "rows.parquet").stat().st_mtime
    return {"sweep": sweep.name, "slug": sweep.slug, "frame": full, "rows": len(full), "failed": failed,
            "models": sorted(map(str, ok["model"].dropna().unique())) if "model" in ok else [],
            "methods": sorted(str(m) for m in ok["method"].dropna().unique() if m != "baseline")
            if "method" in ok else [],
            "updated": datetime.fromtimestamp(mtime, timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "report": report.is_file()}


def _index_page(root: Path, facts: list[dict], points, axes: dict) -> str:
    e = html.escape
    rows = []
    for f in facts:
        link = f"sweeps/{e(f['slug'])}/"
        links = [f'<a href="{link}index.html">page</a>', f'<a href="{link}leaderboard.csv">csv</a>']
        if f["report"]:
            links.append(f'<a href="{link}index.html#report">report</a>')
        rows.append(f'<tr><td class=s><a href="{link}index.html">{e(f["sweep"])}</a></td>'
                    f'<td class=s>{e(", ".join(f["models"]))}</td><td class=s>{e(", ".join(f["methods"]))}</td>'
                    f'<td>{f["rows"]}</td><td>{f["failed"]}</td><td class=s>{e(f["updated"])}</td>'
                    f'<td class=s>{" ".join(links)}</td></tr>')
    parts = [f"<h1>mla-harness results: {e(root.resolve().name)}</h1>",
             f"<p>{len(facts)} sweeps, {sum(f['rows'] for f in facts)} finished rows.</p>",
             '<table class="idx" id="sweeps"><thead><tr><th>sweep</th><th>models</th><th>methods</th><th>rows</th>'
             "<th>failed</th><th>last update</th><th>links</th></tr></thead><tbody>\n" + "\n".join(rows)
             + "\n</tbody></table>", '<h2 id="pareto">Quality vs KV cache</h2>']
    if len(points):
        from harness.leaderboard import _fmt

        y = axes["y"]
        left = f" {axes['left_out']} row(s) without {y} are left out." if axes["left_out"] else ""
        parts.append(f"<p>y: {e(y)}, x: {e(axes['x'])}, one point per leaderboard row of every sweep; the "
                     f'dashed line is the Pareto front (<a href="pareto.csv">pareto.csv</a>).{e(left)}</p>'
                     '<img alt="pareto.png" src="pareto.png">')
        front = points[points["on_front"]].sort_values("x")
        table = front[["sweep", "model", "method", "budget", "calib", "heal"]].copy()
        table[axes["x"]] = [f"{v:.0f}" if axes["x"] == "bytes_per_token" else _fmt(axes["x"], v) for v in front["x"]]
        table[y] = [_fmt(y, v) + (f" ± {_fmt(y, s)}" if s == s else "") for v, s in zip(front["y"], front["yerr"])]
        parts.append("<h3>On the front</h3>" + _plain_table(table, "front"))
    else:
        parts.append("<p>(no finished row has a quality figure to plot)</p>")
    return _page("mla-harness results", "\n".join(parts))


def _check_out(root: Path, out: Path) -> None:
    r, o = root.resolve(), out.resolve()
    if o == r or o in r.parents:
        raise HarnessError(f"--out {out} would replace the results it publishes ({root}); pick a folder outside "
                           "it, e.g. --out site")
    if o.exists() and (not o.is_dir() or (any(o.iterdir()) and not (o / SITE_MARK).exists())):
        raise HarnessError(f"--out {out} exists and is not a site built by mla-harness publish; pick another "
                           "folder or remove it")


def publish(results_root: Path, out: Path) -> dict:
    """Build the site for every sweep under `results_root` into `out` (replaced whole, atomically).

    Returns:
        {"sweeps": count, "rows": finished rows, "index": path of index.html}.
    Raises:
        HarnessError: no results folder, no sweep in it, an unreadable rows.parquet, or an `out` that
        is the results folder or a folder this command did not build. Nothing is written then.
    """
    root, out = Path(results_root), Path(out)
    sweeps = find_sweeps(root)
    _check_out(root, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        facts = [_sweep_page(s, tmp / "sweeps" / s.slug) for s in sweeps]
        points, axes = pareto_points({f["sweep"]: f["frame"] for f in facts})
        if len(points):
            points.to_csv(tmp / "pareto.csv", index=False)
            pareto_plot(points, axes, tmp / "pareto.png")
        (tmp / "index.html").write_text(_index_page(root, facts, points, axes))
        (tmp / SITE_MARK).write_text("built by mla-harness publish; a rerun replaces this folder whole\n")
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"sweeps": len(sweeps), "rows": sum(f["rows"] for f in facts), "index": out / "index.html"}
