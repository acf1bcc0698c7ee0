"""Study reports: each writes a REPORT.md and its plots from a sweep's rows (one module per study)."""
