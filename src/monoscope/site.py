"""The static feature browser under results/report/browser/.

    index.html                  every dictionary, concept probes (best neuron vs best feature), neuron
                                weight geometry extremes, rare-feature figures
    vocab.js                    the display string of every token id
    assets/                     browser.js (renders everything), style.css
    <name>/index.html, units.js sortable table of the dictionary's units
    <name>/unit.html#<unit>     the page of one unit; its data comes from <name>/data/chunk_<i>.js

Pages are shells that browser.js fills from the data files, inserting every data-derived string as
text (never as HTML), so a token such as `<script>` shows as itself. The data travel as .js files
(not JSON fetched at run time) so the site opens from disk (file://) as well as from a web server.
"""

from __future__ import annotations

import html
import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from monoscope import __version__
from monoscope.config import NEURONS
from monoscope.evaluate import density_bands
from monoscope.features import load_features
from monoscope.layout import Layout
from monoscope.atomic import atomic_path

ASSETS = Path(__file__).parent / "site_assets"
CHUNK_UNITS = 256  # units per data file: a unit page downloads one chunk


def _clean(value: Any) -> Any:
    """Plain JSON values: NaN/inf become null, numpy scalars Python ones, floats 4 significant digits."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return float(f"{value:.4g}") if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _js(variable: str, value: Any) -> str:
    """A script assigning a JSON value; json.dumps escapes every quote and control character."""
    return f"{variable} = {json.dumps(_clean(value), separators=(',', ':'))};\n"


def _page(title: str, body: str, depth: int, scripts: Sequence[str], on_load: str) -> str:
    prefix = "../" * depth
    tags = "".join(f'<script src="{html.escape(s)}"></script>' for s in scripts)
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><link rel="icon" href="data:,"><title>{html.escape(title)}</title>'
            f'<link rel="stylesheet" href="{prefix}assets/style.css"><script src="{prefix}assets/browser.js"></script>{tags}'
            f"</head><body>{body}<div id=\"app\"></div><script>{on_load}</script></body></html>\n")


def read_autointerp(scores_csv: Path) -> pd.DataFrame | None:
    """unit, spearman, explanation from an autointerp scores.csv, when autointerp has run."""
    if not scores_csv.exists():
        return None
    scores = pd.read_csv(scores_csv, keep_default_na=False, na_values=["", "nan", "NaN"])
    missing = {"unit", "spearman"} - set(scores.columns)
    if missing:
        raise ValueError(f"{scores_csv} lacks the column(s) {sorted(missing)}")
    if "explanation" not in scores:
        scores["explanation"] = ""
    return scores[["unit", "spearman", "explanation"]].drop_duplicates("unit").set_index("unit")


def _index_columns(units: pd.DataFrame) -> list[dict[str, Any]]:
    columns = [
        {"key": "unit", "label": "unit", "source": "unit"},
        {"key": "density", "label": "density", "source": "density"},
        {"key": "max_activation", "label": "max act", "source": "max_activation"},
        {"key": "autointerp", "label": "autointerp", "source": "autointerp", "title": "Spearman correlation of simulated and true activations"},
        {"key": "best_concept_auroc", "label": "best concept AUROC", "source": "best_concept_auroc"},
        {"key": "best_concept", "label": "best concept", "source": "best_concept", "text": True},
        {"key": "ablation", "label": "ablation Δloss", "source": "ablation_delta_loss"},
    ]
    if "cos_in_out" in units:
        columns.append({"key": "cos_in_out", "label": "cos(w_in, w_out)", "source": "cos_in_out"})
    return [c for c in columns if c["source"] in units]


def _examples(values, tokens, windows, vocab_size: int) -> list[list[dict[str, Any]]]:
    """Per unit of a chunk, its filled examples: value, token ids and activations quantised to 0..255 of `scale`."""
    scale = np.maximum(np.abs(windows.astype(np.float32)).max(-1), 1e-6)  # [c, n]
    quantised = np.clip(np.rint(windows / scale[..., None] * 255), -255, 255).astype(np.int16)
    tokens = np.where(tokens < vocab_size, tokens, -1)
    values, scale = _clean(values.tolist()), _clean(scale.tolist())  # already plain: no per-number walk later
    tokens, quantised = tokens.tolist(), quantised.tolist()
    return [[{"value": values[u][i], "scale": scale[u][i], "tokens": tokens[u][i], "acts": quantised[u][i]}
             for i in range(len(values[u]))] for u in range(len(values))]


def _unit_records(name: str, feats: dict[str, Any], scores: pd.DataFrame | None, reverse_links: dict[str, dict],
                  start: int, stop: int, vocab_size: int) -> list[dict[str, Any]]:
    units, ex, weights, summary = feats["units"], feats["examples"], feats["weights"], feats["summary"]
    settings = summary["settings"]
    concept_columns = [c for c in units.columns if c.startswith("auroc_")]
    top = _examples(ex["top_values"][start:stop], ex["top_tokens"][start:stop], ex["top_windows"][start:stop], vocab_size)
    quantile = _examples(ex["quantile_values"][start:stop], ex["quantile_tokens"][start:stop], ex["quantile_windows"][start:stop], vocab_size)
    n_bins, per_bin = settings["quantile_bins"], settings["per_bin"]
    records = []
    for u in range(start, stop):
        row, i = units.iloc[u], u - start
        facts = [["density", row["density"]], ["max activation", row["max_activation"]],
                 ["mean activation when active", row["mean_activation"]]]
        if not math.isnan(row.get("ablation_delta_loss", math.nan)):
            facts.append(["loss change when zeroed (nats/token)", row["ablation_delta_loss"]])
        if "cos_in_out" in units:
            facts.append(["cos(w_in, w_out)", row["cos_in_out"]])
        explanation = None
        if scores is not None and u in scores.index:
            facts.append(["autointerp score (Spearman)", scores.loc[u, "spearman"]])
            explanation = str(scores.loc[u, "explanation"]) or None
        concepts = sorted(((c[len("auroc_"):], row[c]) for c in concept_columns), key=lambda x: -np.nan_to_num(x[1], nan=-1))
        if concepts:
            facts.append(["best concept", f"{concepts[0][0]} (AUROC {concepts[0][1]:.3f})"])
        links = []
        if "feature_neurons" in weights:
            links.append({"title": "Neurons it draws on (decoder weight)", "items": [
                [f"../{NEURONS}/unit.html#{n}", f"neuron {n}", w]
                for n, w in zip(weights["feature_neurons"][u], weights["feature_neuron_weights"][u])]})
        for other, link in reverse_links.items():
            links.append({"title": f"Features of {other} writing it", "items": [
                [f"../{other}/unit.html#{f}", f"{other} #{f}", w]
                for f, w in zip(link["neuron_features"][u], link["neuron_feature_weights"][u])]})
        logits = None
        if "logit_top_ids" in weights:
            logits = {k: weights[f"logit_{k}"][u].tolist() for k in ("top_ids", "top_values", "bottom_ids", "bottom_values")}
        upper = float(ex["histogram_upper"][u])
        filled = ex["quantile_seq"][u] >= 0
        groups = [{"interval": q, "lo": upper * q / n_bins, "hi": upper * (q + 1) / n_bins,
                   "examples": [quantile[i][q * per_bin + j] for j in range(per_bin) if filled[q * per_bin + j]]}
                  for q in range(n_bins)]
        record = _clean({"facts": facts, "explanation": explanation, "histogram": ex["histogram"][u, 1:].tolist(),
                         "upper": upper, "logits": logits, "links": links, "concepts": concepts[:8]})
        record["top"] = [e for e, s in zip(top[i], ex["top_seq"][u]) if s >= 0]
        record["quantile"] = [{**_clean({k: v for k, v in g.items() if k != "examples"}), "examples": g["examples"]} for g in groups]
        records.append(record)
    return records


def write_dictionary(out: Path, name: str, features_dir: Path, feats: dict[str, Any], scores: pd.DataFrame | None,
                     reverse_links: dict[str, dict], vocab_size: int) -> None:
    units = feats["units"].copy()
    if scores is not None:
        units["autointerp"] = units["unit"].map(scores["spearman"])
    summary = feats["summary"]
    d_sae = len(units)
    kind = "neuron" if name == NEURONS else "feature"
    directory = out / name
    (directory / "data").mkdir(parents=True)
    columns = _index_columns(units)
    rows = units[[c["source"] for c in columns]].astype(object).where(units[[c["source"] for c in columns]].notna(), None)
    table = {"columns": [{k: v for k, v in c.items() if k != "source"} for c in columns], "rows": rows.values.tolist()}
    (directory / "units.js").write_text(_js("window.MONOSCOPE_UNITS", table), encoding="utf-8")
    meta = {"name": name, "kind": kind, "d_sae": d_sae, "chunk_size": CHUNK_UNITS, "context_tokens": summary["settings"]["context_tokens"],
            "quantile_bins": summary["settings"]["quantile_bins"], "logit_note": summary.get("logit_weights")}
    (directory / "meta.js").write_text(_js("window.MONOSCOPE_META", meta), encoding="utf-8")
    for first in range(0, d_sae, CHUNK_UNITS):
        records = _unit_records(name, feats, scores, reverse_links, first, min(d_sae, first + CHUNK_UNITS), vocab_size)
        payload = json.dumps({"first": first, "units": records}, separators=(",", ":"), allow_nan=False)
        (directory / "data" / f"chunk_{first // CHUNK_UNITS}.js").write_text(f"MONOSCOPE_CHUNK({payload});\n", encoding="utf-8")
    title = f"{name}: {d_sae} {kind}s"
    header = f'<p class="nav"><a href="../index.html">↑ all dictionaries</a></p><h1>{html.escape(title)}</h1>'
    (directory / "index.html").write_text(_page(title, header, 1, ["units.js"], "renderIndex(window.MONOSCOPE_UNITS);"), encoding="utf-8")
    (directory / "unit.html").write_text(
        _page(f"{name} {kind}", "", 1, ["../vocab.js", "meta.js"], 'loadUnit(); window.addEventListener("hashchange", loadUnit);'),
        encoding="utf-8")
    rare_figure = features_dir / "rare_features.png"
    if rare_figure.exists():
        shutil.copy(rare_figure, directory / "rare_features.png")


def _top_index(names: Sequence[str], all_feats: dict[str, dict], scores: dict[str, pd.DataFrame | None], live_threshold: float) -> str:
    e = html.escape
    parts = ['<p class="nav"><a href="../index.html">↑ report</a></p><h1>Feature browser</h1><h2>Dictionaries</h2>',
             f'<p class="muted">Live units fire on at least {live_threshold:g} of the held-out tokens; ultralow ones fire, '
             "but more rarely (the ultralow-density cluster, a training artifact); dead ones never fire.</p><table>",
             "<tr><th>dictionary</th><th>units</th><th>live</th><th>ultralow</th><th>dead</th><th>mean autointerp</th><th>held-out tokens</th></tr>"]
    for name in names:
        units, summary = all_feats[name]["units"], all_feats[name]["summary"]
        bands = density_bands(units["density"].to_numpy(), live_threshold)
        mean_score = scores[name]["spearman"].mean() if scores[name] is not None else float("nan")
        parts.append(f'<tr><td class="text"><a href="{e(name)}/index.html">{e(name)}</a></td><td>{len(units)}</td>'
                     f'<td>{bands["live"]} ({bands["live"] / len(units):.0%})</td><td>{bands["ultralow"]}</td><td>{bands["dead"]}</td>'
                     f'<td>{"–" if math.isnan(mean_score) else f"{mean_score:.3f}"}</td><td>{summary["n_tokens"]}</td></tr>')
    parts.append("</table>")
    concepts = list(next(iter(all_feats.values()))["summary"]["concepts"])
    if concepts:
        parts.append("<h2>Concept probes: best unit AUROC per concept, held out</h2><p class=\"muted\">Each concept is a "
                     "regular expression labelling tokens in context; a unit's AUROC says how well its activation alone "
                     "separates those tokens from the rest (0.5 chance, 1 perfect). The best unit is chosen on one part of "
                     "the sampled held-out sequences and its exact AUROC measured on the other; k-sparse probes are in the "
                     "report. A unit's page shows its AUROC on all held-out tokens (binned).</p>"
                     '<table id="concept-table"><tr><th>concept</th><th>token share</th>'
                     + "".join(f"<th>{e(n)}</th>" for n in names) + "</tr>")
        for concept in concepts:
            share = all_feats[names[0]]["summary"]["concepts"][concept]["positive_fraction"]
            cells = []
            for name in names:
                best = all_feats[name]["summary"]["concepts"].get(concept)
                if best is None or best["best_auroc"] is None or math.isnan(best["best_auroc"]):
                    cells.append("<td>–</td>")
                else:
                    cells.append(f'<td><a href="{e(name)}/unit.html#{best["best_unit"]}">{best["best_auroc"]:.3f}</a></td>')
            parts.append(f'<tr><td class="text">{e(concept)}</td><td>{share:.3f}</td>{"".join(cells)}</tr>')
        parts.append("</table>")
    if NEURONS in all_feats and "cos_in_out" in all_feats[NEURONS]["units"]:
        units = all_feats[NEURONS]["units"].sort_values("cos_in_out")
        parts.append("<h2>Neuron weight geometry</h2><p class=\"muted\">cos(w_in, w_out): strongly negative neurons erase "
                     "their input direction (memory management), strongly positive ones boost it.</p><div class=\"cols\">")
        for title, rows in (("most negative", units.head(8)), ("most positive", units.tail(8)[::-1])):
            parts.append(f"<table><tr><th colspan=2>{title}</th></tr>" + "".join(
                f'<tr><td class="text"><a href="{NEURONS}/unit.html#{int(r.unit)}">neuron {int(r.unit)}</a></td><td>{r.cos_in_out:.3f}</td></tr>'
                for r in rows.itertuples()) + "</table>")
        parts.append("</div>")
    figures = [n for n in names if all_feats[n]["summary"].get("rare_features")]
    if figures:
        parts.append("<h2>Rare features are more similar to each other</h2>")
        for name in figures:
            rare = all_feats[name]["summary"]["rare_features"]
            numbers = ", ".join(f"{e(k)} = {v:.3f}" for k, v in rare.items() if k.endswith("mean_nearest_cos"))
            parts.append(f'<h3>{e(name)}</h3><p class="muted">{rare["n_rare"]} rare, {rare["n_rest"]} others; {numbers}</p>'
                         f'<img src="{e(name)}/rare_features.png" alt="rare feature similarity for {e(name)}">')
    return "".join(parts)


def build_site(results: Layout, names: Sequence[str], token_strings: Sequence[str], out_dir: str | Path,
               live_threshold: float) -> Path:
    """Write the browser for the dictionaries `names` (their feature analyses must exist; autointerp scores
    are shown where they do) to out_dir; units firing on at least live_threshold of the held-out tokens count as live."""
    all_feats = {name: load_features(results.features_dir(name)) for name in names}
    scores = {name: read_autointerp(results.autointerp_outputs(name)["scores"]) for name in names}
    reverse = {name: f["weights"] for name, f in all_feats.items() if name != NEURONS and "neuron_features" in f["weights"]}
    with atomic_path(out_dir) as tmp:
        (tmp / "assets").mkdir(parents=True)
        for asset in ("browser.js", "style.css"):
            shutil.copy(ASSETS / asset, tmp / "assets" / asset)
        (tmp / "vocab.js").write_text(_js("window.MONOSCOPE_VOCAB", list(token_strings)), encoding="utf-8")
        for name in names:
            write_dictionary(tmp, name, results.features_dir(name), all_feats[name], scores[name], reverse if name == NEURONS else {}, len(token_strings))
        body = _top_index(list(names), all_feats, scores, live_threshold)
        (tmp / "index.html").write_text(_page("monoscope feature browser", body, 0, [], f"/* monoscope {__version__} */"), encoding="utf-8")
    return Path(out_dir) / "index.html"
