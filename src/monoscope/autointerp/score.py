"""Scores: correlation between simulated and true activations, and features-versus-neurons comparison."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from scipy import stats

from monoscope.atomic import savefig


def correlation_scores(predicted: Sequence[Sequence[float]], true: Sequence[Sequence[float]]) -> dict[str, float]:
    """Spearman (as the seed reports) and Pearson (as Bills et al.) over all scoring tokens concatenated.

    A constant simulation explains nothing variable and scores 0; constant true activations make the
    correlation undefined (NaN) and the unit is left out of comparisons.
    """
    p = np.concatenate([np.asarray(x, dtype=np.float64) for x in predicted])
    t = np.concatenate([np.asarray(x, dtype=np.float64) for x in true])
    if p.shape != t.shape:
        raise ValueError(f"{p.size} simulated activations for {t.size} true ones")
    if t.size < 2 or np.ptp(t) == 0:
        return {"spearman": math.nan, "pearson": math.nan}
    if np.ptp(p) == 0:
        return {"spearman": 0.0, "pearson": 0.0}
    return {"spearman": float(stats.spearmanr(p, t).statistic), "pearson": float(stats.pearsonr(p, t).statistic)}


def bootstrap_mean_ci(values: Sequence[float], *, n_boot: int, seed: int, level: float = 0.95) -> dict[str, float]:
    """Mean with a percentile bootstrap confidence interval over units (NaNs dropped)."""
    x = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if x.size == 0:
        return {"mean": math.nan, "low": math.nan, "high": math.nan, "n": 0}
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, (n_boot, x.size))].mean(axis=1)
    alpha = (1 - level) / 2
    return {"mean": float(x.mean()), "low": float(np.quantile(means, alpha)),
            "high": float(np.quantile(means, 1 - alpha)), "n": int(x.size)}


def bootstrap_difference_ci(a: Sequence[float], b: Sequence[float], *, n_boot: int, seed: int,
                            level: float = 0.95) -> dict[str, float]:
    """mean(a) - mean(b), units resampled independently in each group."""
    x = np.asarray([v for v in a if not math.isnan(v)], dtype=np.float64)
    y = np.asarray([v for v in b if not math.isnan(v)], dtype=np.float64)
    if x.size == 0 or y.size == 0:
        return {"mean": math.nan, "low": math.nan, "high": math.nan}
    rng = np.random.default_rng(seed)
    diffs = (x[rng.integers(0, x.size, (n_boot, x.size))].mean(axis=1)
             - y[rng.integers(0, y.size, (n_boot, y.size))].mean(axis=1))
    alpha = (1 - level) / 2
    return {"mean": float(x.mean() - y.mean()), "low": float(np.quantile(diffs, alpha)),
            "high": float(np.quantile(diffs, 1 - alpha))}


def compare_dictionaries(scores: Mapping[str, Sequence[Mapping]], *, n_boot: int, seed: int,
                         baseline: str = "neurons") -> dict:
    """Per dictionary: mean Spearman/Pearson (simulation) and detection/fuzzing balanced accuracy where the
    rows have them, with CIs, failures, and the difference from ``baseline``.

    scores: dictionary name -> rows of its scores table (dicts with ``spearman``, ``pearson``, ``status``).
    """
    summary = {}
    for name, rows in scores.items():
        entry = {"units": len(rows), "scored": sum(r["status"] == "ok" for r in rows),
                 "failed": sum(r["status"] != "ok" for r in rows)}
        for metric in ("spearman", "pearson", "detection", "fuzzing"):
            if not any(metric in r for r in rows):
                continue
            values = [float(r[metric]) for r in rows if r["status"] == "ok"]
            entry[metric] = bootstrap_mean_ci(values, n_boot=n_boot, seed=seed)
            if baseline in scores and name != baseline:
                base = [float(r[metric]) for r in scores[baseline] if r["status"] == "ok"]
                entry[f"{metric}_minus_{baseline}"] = bootstrap_difference_ci(values, base, n_boot=n_boot, seed=seed)
        summary[name] = entry
    return summary


def plot_comparison(summary: Mapping[str, Mapping], path: str | Path, metric: str = "spearman") -> None:
    """Mean score per dictionary with bootstrap CI error bars; neurons drawn in a distinct colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    means = np.array([summary[n][metric]["mean"] for n in names], dtype=float)
    low = np.array([summary[n][metric]["low"] for n in names], dtype=float)
    high = np.array([summary[n][metric]["high"] for n in names], dtype=float)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(names) + 2), 3.5))
    colours = ["tab:orange" if n == "neurons" else "tab:blue" for n in names]
    ax.bar(range(len(names)), np.nan_to_num(means), color=colours)
    ax.errorbar(range(len(names)), np.nan_to_num(means),
                yerr=[np.nan_to_num(means - low), np.nan_to_num(high - means)], fmt="none", ecolor="black", capsize=4)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel(f"explanation score ({metric})")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_title("Automated interpretability: features vs neurons (95% bootstrap CI)")
    fig.tight_layout()
    savefig(fig, path, dpi=120)
    plt.close(fig)
