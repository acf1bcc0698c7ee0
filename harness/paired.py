"""Paired comparisons of two models scored on the same documents (a converted model vs its baseline).

Two accuracies measured on the same 300 documents differ by less noise than two independent
samples would suggest: most documents are answered alike by both models. The test here resamples
documents (the same indices for both models, stratified by task) and recomputes the score exactly
the way lm-eval made it: a task is the mean over its documents, a group the size-weighted or plain
mean of its children (`weight_by_size`, recorded per run by `harness.lmeval.group_weighting`), the
leaderboard's mean the plain mean over the requested tasks. The 95% interval of the difference
says whether the conversion changed the score; an interval that holds 0 is "not significant".

    paired_difference(base_docs, conv_docs, ["mla_core"], weighting)
    -> {"delta": -0.013, "lo": -0.030, "hi": 0.004, "significant": False, "n": 1150}
"""
from __future__ import annotations

import numpy as np
import pandas as pd

ITERS = 2000
LEVEL = 0.95


def _leaves(name: str, weighting: dict) -> list[str]:
    if name not in weighting:
        return [name]
    return [leaf for c in weighting[name]["children"] for leaf in _leaves(c, weighting)]


def _value(name: str, means: dict[str, np.ndarray], sizes: dict[str, int], weighting: dict) -> np.ndarray:
    """A task's or group's score from its leaves' means (arrays: one value per bootstrap replicate)."""
    if name not in weighting:
        return means[name]
    g = weighting[name]
    kids = [c for c in g["children"] if all(leaf in means for leaf in _leaves(c, weighting))]
    w = np.array([sum(sizes[leaf] for leaf in _leaves(c, weighting)) if g["weight_by_size"] else 1.0
                  for c in kids], dtype=float)
    vals = np.stack([_value(c, means, sizes, weighting) for c in kids])
    return (w[:, None] * vals).sum(0) / w.sum() if vals.ndim == 2 else (w * vals).sum() / w.sum()


def aligned(base: pd.DataFrame, conv: pd.DataFrame, metric: str = "acc") -> pd.DataFrame | None:
    """Per-document (task, doc_id, base, conv) on the documents both scored; None when they were not
    scored on the same documents (another limit or seed: no paired comparison is possible)."""
    cols = ["task", "doc_id", metric]
    b, c = base[cols].dropna(), conv[cols].dropna()
    if len(b) != len(c) or set(zip(b["task"], b["doc_id"])) != set(zip(c["task"], c["doc_id"])):
        return None
    return b.merge(c, on=["task", "doc_id"], suffixes=("_base", "_conv"))


def paired_difference(base: pd.DataFrame, conv: pd.DataFrame, names: list[str], weighting: dict,
                      metric: str = "acc", iters: int = ITERS, seed: int = 0) -> dict | None:
    """Score(conv) - score(base) over `names` (mean of their scores), with a paired bootstrap interval.

    Args:
        base / conv: per-document rows {task, doc_id, <metric>} of the two runs.
        names: the requested tasks/groups; the score is the plain mean of their scores.
        weighting: {group: {"children", "weight_by_size"}} of the runs.
    Returns:
        {"delta", "lo", "hi", "significant", "n"} or None when the documents differ.
    """
    both = aligned(base, conv, metric)
    if both is None or not len(both):
        return None
    rng = np.random.default_rng(seed)
    mb, mc, sizes = {}, {}, {}
    obs_b, obs_c = {}, {}
    for task, d in both.groupby("task", sort=True):
        b = d[f"{metric}_base"].to_numpy(float)
        c = d[f"{metric}_conv"].to_numpy(float)
        idx = rng.integers(0, len(d), size=(iters, len(d)), dtype=np.int32)
        mb[task], mc[task] = b[idx].mean(1), c[idx].mean(1)
        obs_b[task], obs_c[task] = np.asarray(b.mean()), np.asarray(c.mean())
        sizes[task] = len(d)
    wanted = [n for n in names if all(leaf in sizes for leaf in _leaves(n, weighting))]
    if not wanted:
        return None

    def score(means):
        return np.mean([_value(n, means, sizes, weighting) for n in wanted], axis=0)

    reps = score(mc) - score(mb)
    delta = float(score(obs_c) - score(obs_b))
    lo, hi = np.quantile(reps, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return {"delta": delta, "lo": float(lo), "hi": float(hi), "significant": bool(lo > 0 or hi < 0),
            "n": int(len(both))}
