"""Study reports: `mla-harness report <study> RESULTS_DIR` writes REPORT.md and PNG figures into a
sweep's results folder, from its rows (STYLE 13: a report is code; the committed report is the
command's output).

    mla-harness report robustness results/robustness     # DESIGN §8 (harness/reports/robustness.py)

One module per study, each with a plain function and `add_parser(sub)` that sets `report_func`;
`toolkit.py` holds what they share (rows, ratios, paired uncertainties, tables, figures). Adding a
study is its module plus its name in `STUDIES`.
"""
from __future__ import annotations

import importlib

STUDIES = ("robustness",)  # modules of this package, each with add_parser(sub)


def add_parser(sub) -> None:
    """The `report` command and one subcommand per study."""
    p = sub.add_parser("report", help=cmd_report.__doc__, description=__doc__.split("\n\n")[0])
    studies = p.add_subparsers(dest="study", required=True, metavar="STUDY")
    for name in STUDIES:
        importlib.import_module(f"harness.reports.{name}").add_parser(studies)


def cmd_report(a) -> int:
    """Write a study's REPORT.md and figures from a results folder (mla-harness report STUDY DIR)."""
    return a.report_func(a)
