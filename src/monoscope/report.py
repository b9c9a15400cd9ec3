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
.ci { color: #777; font-size: 85%; }
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


# --- features versus neurons on the concept labels, held out (from the features jobs' summaries) -----------


def _probe(summary: dict[str, Any], concept: str, k: str) -> dict[str, Any] | None:
    entry = summary.get("concepts", {}).get(concept) or {}
    return (entry.get("sparse_probe") or {}).get(k)


def comparison_sentence(name: str, neurons: dict[str, Any], features: dict[str, Any], ks: list[str]) -> str:
    """One plain sentence: on how many concepts the dictionary's k-sparse probe beats the neurons' at each k,
    and on how many of those the 95 % intervals do not overlap."""
    parts = []
    for k in ks:
        wins = clear_wins = clear_losses = counted = 0
        for concept in neurons.get("concepts", {}):
            a, b = _probe(features, concept, k), _probe(neurons, concept, k)
            if not a or not b:
                continue
            counted += 1
            wins += a["auroc"] > b["auroc"]
            clear_wins += a["ci_low"] > b["ci_high"]
            clear_losses += a["ci_high"] < b["ci_low"]
        parts.append(f"on {wins} of {counted} concepts at k = {k} ({clear_wins} with the 95 % intervals apart; "
                     f"neurons ahead with the intervals apart on {clear_losses})")
    return f"{name}: features beat neurons " + ", and ".join(parts) + "."


def concept_section(summaries: dict[str, dict[str, Any]]) -> str:
    """HTML: per concept and dictionary, held-out AUROC of the k-sparse probes at the smallest and largest k,
    with bootstrap intervals; one sentence per dictionary; the specificity distribution per dictionary."""
    if NEURONS not in summaries or not summaries[NEURONS].get("held_out"):
        return ""
    e = html.escape
    neurons = summaries[NEURONS]
    settings = neurons["settings"]
    ks = [str(k) for k in sorted({min(settings["probe_k"]), max(settings["probe_k"])})]
    names = [NEURONS] + [n for n in summaries if n != NEURONS]
    held = neurons["held_out"]
    out = [f"""<h2 id="concepts">Features versus neurons on concepts (held out)</h2>
<p>Each concept is a regular expression labelling tokens in context. The {held['selection_seqs'] + held['report_seqs']:,}
sampled held-out sequences are split by sequence into a selection part ({held['selection_seqs']:,} sequences) and a
report part ({held['report_seqs']:,} sequences, {held['report_tokens']:,} tokens). A <em>k-sparse probe</em>
(Gurnee et al. 2023) takes the k units with the largest difference of mean activation between positives and
negatives on the selection part and fits a logistic regression on them there; the table gives its AUROC on the
report part, with a 95 % bootstrap interval over the report part's sequences. A dense unit that ranks every
token is no longer favoured over a concept split across several sparse features, and the best of 4,096 is not
chosen on the tokens it is scored on.</p>"""]
    out.append("<ul>" + "".join(f"<li>{e(comparison_sentence(n, neurons, summaries[n], ks))}</li>" for n in names[1:]) + "</ul>")
    header = "".join(f'<th colspan="{len(ks)}">{e(n)}</th>' for n in names)
    sub = "".join(f"<th>k = {k}</th>" for _ in names for k in ks)
    rows = []
    for concept, entry in neurons["concepts"].items():
        cells = []
        for n in names:
            for k in ks:
                probe = _probe(summaries[n], concept, k)
                cells.append("<td>–</td>" if not probe else
                             f'<td>{probe["auroc"]:.3f} <span class="ci">[{probe["ci_low"]:.3f}, {probe["ci_high"]:.3f}]</span></td>')
        rows.append(f'<tr><td>{e(concept)}</td><td>{entry["positive_fraction"]:.3f}</td>{"".join(cells)}</tr>')
    out.append(f'<table id="concept-probes"><thead><tr><th rowspan="2">concept</th><th rowspan="2">token share</th>{header}</tr>'
               f'<tr>{sub}</tr></thead><tbody>{"".join(rows)}</tbody></table>')
    taus = list(held["specificity"])
    spec_rows = []
    for n in names:
        spec = summaries[n]["held_out"]["specificity"]
        cells = "".join(f'<td>{spec[t]["units_at_least_90_percent"]} / {spec[t]["units_counted"]}</td>' for t in taus)
        spec_rows.append(f'<tr><td>{e(n)}</td><td>{summaries[n]["d_sae"]}</td>{cells}</tr>')
    out.append(f"""<p>Specificity (<em>Towards Monosemanticity</em>): each unit's concept is the one it is most specific
to on the selection part; on the report part, P(concept | activation &gt; τ · max). Units ≥ 90 % specific, of the
units with at least {settings['specificity_min_tokens']} report tokens above the threshold:</p>
<table id="specificity"><thead><tr><th>dictionary</th><th>units</th>{"".join(f"<th>τ = {e(t)}</th>" for t in taus)}</tr></thead>
<tbody>{"".join(spec_rows)}</tbody></table>""")
    return "\n".join(out)


def write_report(
    title: str,
    model: dict[str, Any],
    hook: str,
    eval_dirs: dict[str, str | Path],
    lm_summary: dict[str, Any] | None,
    out_dir: str | Path,
    feature_summaries: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """Write index.html and its figures for the model (the `model` config section) hooked at `hook`;
    `eval_dirs` maps dictionary name -> its results/eval folder, `feature_summaries` name -> its
    results/features summary.json (the held-out concept comparison)."""
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
    lm = ""
    if lm_summary:
        lm = (
            f"<p>Native model trained on {lm_summary['tokens']:,} tokens: held-out loss "
            f"{lm_summary['held_out_loss']:.3f} nats ({lm_summary['tokens_per_second']:,.0f} tokens/s).</p>"
        )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{STYLE}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Model <code>{html.escape(model['name'])}</code> ({html.escape(model['source'])}), hook
<code>{html.escape(hook)}</code>; evaluated on held-out shards.
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
{concept_section(feature_summaries or {})}
<h2>Sparsity against fidelity</h2>
<img src="pareto.png" alt="L0 against reconstruction score">
<h2>Feature density</h2>
<img src="density.png" alt="log10 feature density histograms">
</body></html>
"""
    index = out / "index.html"
    write_text(index, page)
    return index
