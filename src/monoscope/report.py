"""The HTML report: features versus neurons across dictionary sizes, with density histograms."""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.ticker  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from monoscope.config import NEURONS  # noqa: E402
from monoscope.atomic import savefig, write_text  # noqa: E402

COLUMNS = [
    ("name", "dictionary", "{}"),
    ("d_sae", "features", "{:d}"),
    ("expansion_factor", "size", "{:g}x"),
    ("l1_coefficient", "L1", "{:g}"),
    ("reconstruction_score", "reconstruction score", "{:.3f}"),
    ("l0", "L0", "{:.1f}"),
    ("fvu", "FVU", "{:.3f}"),
    ("mse", "MSE", "{:.4g}"),
    ("live_features", "live", "{:,d}"),
    ("live_fraction", "live %", "{:.1%}"),
    ("ultralow_fraction", "ultralow", "{:.1%}"),
    ("dead_fraction", "dead", "{:.1%}"),
    ("dense_fraction", "dense", "{:.1%}"),
    ("clean_loss", "clean loss", "{:.3f}"),
    ("recons_loss", "spliced loss", "{:.3f}"),
    ("zero_abl_loss", "zero-ablated loss", "{:.3f}"),
]

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 72rem; color: #222; }
table { border-collapse: collapse; margin: 1rem 0; }
th, td { border-bottom: 1px solid #ddd; padding: .3rem .6rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
tr.neurons td { background: #f4f4f8; font-style: italic; }
img { max-width: 100%; }
code { background: #f4f4f4; padding: 0 .2rem; }
"""


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "–"
    try:
        return html.escape(fmt.format(value))
    except (ValueError, TypeError):
        return html.escape(str(value))


def density_histograms(tables: dict[str, pd.DataFrame], bands: dict[str, dict[str, int]], live_threshold: float, out_png: Path) -> None:
    """One panel per dictionary: histogram of log10 feature density with the live threshold marked; the
    title counts the bands (dead features have no density to place on the axis)."""
    names = list(tables)
    fig, axes = plt.subplots(len(names), 1, figsize=(7, 1.9 * len(names)), sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        table, band = tables[name], bands[name]
        fired = table.loc[table["density"] > 0, "log10_density"]
        ax.hist(fired, bins=60, range=(-7, 0), color="#666" if name == NEURONS else "#3b6fb6")
        ax.axvline(math.log10(live_threshold), color="#c0392b", lw=1, ls="--")
        ax.set_title(f"{name}: {len(table):,} features: {band['live']:,} live, {band['ultralow']:,} ultralow "
                     f"(left of the dashed line), {band['dead']:,} never fired", fontsize=9, loc="left")
        ax.set_ylabel("features")
    axes[-1, 0].set_xlabel("log10 feature density (fraction of held-out tokens on which it fires)")
    fig.tight_layout()
    savefig(fig, out_png, dpi=110)
    plt.close(fig)


def pareto_plot(metrics: list[dict[str, Any]], out_png: Path) -> None:
    """L0 against reconstruction score, one line per dictionary size (the L1 sweep traces the frontier)."""
    frame = pd.DataFrame([m for m in metrics if m["name"] != NEURONS])
    fig, ax = plt.subplots(figsize=(6, 4))
    for size, group in frame.groupby("expansion_factor"):
        group = group.sort_values("l0")
        ax.plot(group["l0"], group["reconstruction_score"], "o-", label=f"{size:g}x")
    # A log axis over less than a decade labels its minor ticks into an unreadable band.
    if frame["l0"].max() > 10 * frame["l0"].min():
        ax.set_xscale("log")
    ax.set_xlabel("L0 (features active per token)")
    ax.set_ylabel("reconstruction score")
    ax.legend(title="dictionary")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    savefig(fig, out_png, dpi=110)
    plt.close(fig)


def capacity_plot(metrics: list[dict[str, Any]], out_png: Path) -> None:
    """Live features against dictionary size, one line per L1 coefficient; the neurons' live count for scale.
    A dictionary that uses its size climbs with it; the dotted line is every feature live."""
    frame = pd.DataFrame([m for m in metrics if m["name"] != NEURONS])
    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = sorted(frame["d_sae"].unique())
    ax.plot(sizes, sizes, ":", color="#999", label="all features live")
    for l1, group in frame.groupby(frame["l1_coefficient"].fillna(-1)):
        group = group.sort_values("d_sae")
        label = "no L1" if l1 == -1 else f"L1 {l1:g}"
        ax.plot(group["d_sae"], group["live_features"], "o-", label=label)
    neurons = [m for m in metrics if m["name"] == NEURONS]
    if neurons:
        ax.axhline(neurons[0]["live_features"], color="#666", lw=1, ls="--", label="neurons")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [f"{s:,}" for s in sizes])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("dictionary size (features)")
    ax.set_ylabel(f"live features (density ≥ {metrics[0]['live_threshold']:g})")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    savefig(fig, out_png, dpi=110)
    plt.close(fig)


def write_report(
    config: dict[str, Any],
    eval_dirs: dict[str, str | Path],
    lm_summary: dict[str, Any] | None,
    out_dir: str | Path,
) -> Path:
    """Write index.html and its figures; `eval_dirs` maps dictionary name -> its results/eval folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics, tables = [], {}
    for name, eval_dir in eval_dirs.items():
        m = json.loads((Path(eval_dir) / "metrics.json").read_text())
        m["metrics_href"] = os.path.relpath(Path(eval_dir) / "metrics.json", out)
        m["features_href"] = os.path.relpath(Path(eval_dir) / "features.parquet", out)
        metrics.append(m)
        tables[name] = pd.read_parquet(Path(eval_dir) / "features.parquet")
    metrics.sort(key=lambda m: (m["name"] != NEURONS, m["d_sae"], m["l1_coefficient"] or 0))
    live_threshold = metrics[0]["live_threshold"]
    density_histograms(tables, {m["name"]: m["density_bands"] for m in metrics}, live_threshold, out / "density.png")
    pareto_plot(metrics, out / "pareto.png")
    capacity_plot(metrics, out / "capacity.png")
    write_text(out / "summary.json", json.dumps(metrics, indent=1))

    rows = []
    for m in metrics:
        cells = "".join(f"<td>{_cell(m.get(key), fmt)}</td>" for key, _, fmt in COLUMNS)
        links = f'<td><a href="{html.escape(m["metrics_href"])}">metrics</a> · <a href="{html.escape(m["features_href"])}">features</a></td>'
        rows.append(f'<tr class="{"neurons" if m["name"] == NEURONS else "sae"}">{cells}{links}</tr>')
    header = "".join(f"<th>{html.escape(label)}</th>" for _, label, _ in COLUMNS) + "<th>files</th>"
    model = config["model"]
    lm = ""
    if lm_summary:
        lm = (
            f"<p>Native model trained on {lm_summary['tokens']:,} tokens: held-out loss "
            f"{lm_summary['held_out_loss']:.3f} nats ({lm_summary['tokens_per_second']:,.0f} tokens/s).</p>"
        )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(config['report']['title'])}</title>
<style>{STYLE}</style></head><body>
<h1>{html.escape(config['report']['title'])}</h1>
<p>Model <code>{html.escape(model['name'])}</code> ({html.escape(model['source'])}), hook
<code>blocks.{model['layer']}.{html.escape(model['hook'])}</code>; evaluated on held-out shards.
The <em>neurons</em> row is the identity dictionary: the MLP's own basis, for comparison.</p>
{lm}
<p><a href="browser/index.html">Browse every feature and neuron</a>: max-activating examples, logit weights,
ablation effects and concept probes.</p>
<h2>Features versus neurons</h2>
<p>Reconstruction score = (zero-ablated loss − spliced loss) / (zero-ablated loss − clean loss), on
{metrics[0]["eval_tokens"]:,} held-out tokens. L0 and the density bands on {metrics[0]["density_tokens"]:,}
held-out tokens: <em>live</em> features fire on at least {live_threshold:g} of them, <em>ultralow</em> ones fire
but more rarely (the ultralow-density cluster of <em>Towards Monosemanticity</em>, a training artifact),
<em>dead</em> ones never; <em>dense</em> ones fire on more than {metrics[0]["dense_threshold"]:.0%} of tokens.
A dictionary's capacity is its live count.</p>
<table id="summary"><thead><tr>{header}</tr></thead><tbody>
{''.join(rows)}
</tbody></table>
<h2>Capacity: live features against dictionary size</h2>
<img src="capacity.png" alt="live features against dictionary size">
<h2>Sparsity against fidelity</h2>
<img src="pareto.png" alt="L0 against reconstruction score">
<h2>Feature density</h2>
<img src="density.png" alt="log10 feature density histograms">
</body></html>
"""
    index = out / "index.html"
    write_text(index, page)
    return index
