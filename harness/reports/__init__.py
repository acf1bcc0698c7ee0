"""Study reports: `mla-harness report <study> RESULTS_DIR` writes REPORT.md and PNG figures into a
sweep's results folder, from its rows (a report is code; the committed report is the command's output).

    mla-harness report robustness results/robustness     # DESIGN §8 (harness/reports/robustness.py)
    mla-harness report healing results/<heal sweep>      # DESIGN §10 (harness/reports/healing.py)
    mla-harness report longctx results/long-context      # DESIGN §12 (harness/reports/longctx.py)
    mla-harness report paper results/paper-care          # DESIGN §9 (harness/reports/paper.py)

One module per study, each with a plain function and `add_parser(sub)` that sets `report_func`;
`toolkit.py` holds what they share (rows, ratios, paired uncertainties, tables, figures). Adding a
study is its module plus its name in `STUDIES`.
"""
from __future__ import annotations

import importlib

STUDIES = ("robustness", "paper", "healing")  # modules of this package, each with add_parser(sub)


def add_study_parsers(studies) -> None:
    """One `report` subcommand per study (the CLI's `report` command calls their `report_func`)."""
    for name in STUDIES:
        importlib.import_module(f"harness.reports.{name}").add_parser(studies)
