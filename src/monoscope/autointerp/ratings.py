"""Human ratings: export a blind rating sheet (CSV + HTML form) and ingest filled sheets.

Rubric (from the seed, 1 = not at all … 5 = completely), one row per explained unit:

- confidence: how confident the rater is that the explanation describes the unit;
- activation_consistency: how consistent the top activations are with the explanation;
- logit_consistency: how consistent the unit's logit weights are with the explanation;
- specificity: how specific the explanation is (a narrow concept, not "common words").

The sheet is blind: items are shuffled (seeded) and carry an opaque id; the answer key maps ids to
(dictionary, unit) and is what ingestion joins on. It is written outside the folder handed to raters,
so they cannot tell features from neurons. Each item shows the unit's top and bottom logit weights,
which the logit_consistency question asks about.
"""

from __future__ import annotations

import csv
import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

RUBRIC = {
    "confidence": "How confident are you that the explanation describes this unit?",
    "activation_consistency": "How consistent are the top activations with the explanation?",
    "logit_consistency": "How consistent are the unit's logit weights with the explanation?",
    "specificity": "How specific is the explanation?",
}
SCALE = range(1, 6)
SHEET_COLUMNS = ["item", "explanation", "examples", "logit_weights", *RUBRIC, "comment"]


def export_sheet(items: Sequence[Mapping], out_dir: str | Path, key_path: str | Path, seed: int = 0) -> None:
    """items: dicts with ``dictionary``, ``unit``, ``explanation``, ``examples`` (text with the top records)
    and ``logit_weights`` (text: the tokens the unit's direct logit effect raises and lowers most).

    Writes ``rating_sheet.csv`` (blank rubric columns) and ``rating_sheet.html`` (the same as a form that
    downloads the filled CSV) to out_dir, and the answer key to key_path, which must lie outside out_dir.
    """
    out, key_path = Path(out_dir), Path(key_path)
    if key_path.resolve().is_relative_to(out.resolve()):
        raise ValueError(f"the answer key {key_path} must lie outside the raters' folder {out}")
    out.mkdir(parents=True, exist_ok=True)
    key_path.parent.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(seed).permutation(len(items))
    rows = [{"item": f"item-{i:04d}", **items[j]} for i, j in enumerate(order)]
    with open(key_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, ["item", "dictionary", "unit"])
        writer.writeheader()
        writer.writerows({k: r[k] for k in ("item", "dictionary", "unit")} for r in rows)
    with open(out / "rating_sheet.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, SHEET_COLUMNS)
        writer.writeheader()
        writer.writerows({"item": r["item"], "explanation": r["explanation"], "examples": r["examples"],
                          "logit_weights": r.get("logit_weights", "")} for r in rows)
    (out / "rating_sheet.html").write_text(_html_form(rows), encoding="utf-8")


def _html_form(rows: Sequence[Mapping]) -> str:
    def select(item: str, name: str) -> str:
        options = "".join(f"<option>{v}</option>" for v in SCALE)
        return f'<label>{html.escape(RUBRIC[name])} <select name="{item}|{name}"><option></option>{options}</select></label>'

    blocks = "".join(
        f'<fieldset><legend>{html.escape(r["item"])}</legend><p><b>Explanation:</b> {html.escape(r["explanation"])}</p>'
        f'<pre>{html.escape(r["examples"])}</pre><p><b>Logit weights:</b> {html.escape(r.get("logit_weights") or "none")}</p>'
        + "<br>".join(select(r["item"], name) for name in RUBRIC)
        + f'<br><label>Comment <input name="{r["item"]}|comment" size="60"></label></fieldset>'
        for r in rows)
    columns = ",".join(f'"{c}"' for c in SHEET_COLUMNS)
    return f"""<!doctype html><meta charset="utf-8"><title>monoscope rating sheet</title>
<h1>Rate each explanation (1 = not at all, 5 = completely)</h1>
<form id="sheet">{blocks}</form>
<button onclick="download()">Download filled CSV</button>
<script>
const COLUMNS = [{columns}];
function quote(v) {{ return '"' + String(v ?? '').replaceAll('"', '""') + '"'; }}
function download() {{
  const items = {{}};
  for (const el of document.querySelectorAll('#sheet [name]')) {{
    const [item, key] = el.name.split('|');
    (items[item] ??= {{item}})[key] = el.value;
  }}
  const lines = [COLUMNS.join(',')].concat(Object.values(items).map(r => COLUMNS.map(c => quote(r[c])).join(',')));
  const a = document.createElement('a');
  a.href = URL.createObjectURL(new Blob([lines.join('\\n')], {{type: 'text/csv'}}));
  a.download = 'rating_sheet_filled.csv';
  a.click();
}}
</script>
"""


def ingest_ratings(filled_dir: str | Path, key_path: str | Path) -> dict:
    """Mean of each rubric item per dictionary over every ``*.csv`` in ``filled_dir`` (blank cells skipped).

    Raises ValueError naming the file and row when a value is outside 1..5 or an item is not in the key.
    """
    key = {}
    with open(key_path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            key[row["item"]] = (row["dictionary"], int(row["unit"]))
    per_dictionary: dict[str, dict[str, list[float]]] = {}
    files = sorted(Path(filled_dir).glob("*.csv")) if Path(filled_dir).is_dir() else []
    for path in files:
        with open(path, newline="", encoding="utf-8") as f:
            for line, row in enumerate(csv.DictReader(f), start=2):
                if row.get("item") not in key:
                    raise ValueError(f"{path}:{line}: item {row.get('item')!r} is not in {key_path}")
                dictionary, _ = key[row["item"]]
                for name in RUBRIC:
                    value = (row.get(name) or "").strip()
                    if not value:
                        continue
                    if value not in {str(v) for v in SCALE}:
                        raise ValueError(f"{path}:{line}: {name} must be an integer 1..5, got {value!r}")
                    per_dictionary.setdefault(dictionary, {}).setdefault(name, []).append(float(value))
    summary = {"sheets": [p.name for p in files], "dictionaries": {}}
    for dictionary, ratings in sorted(per_dictionary.items()):
        summary["dictionaries"][dictionary] = {
            name: {"mean": float(np.mean(v)) if v else math.nan, "n": len(v)}
            for name, v in ((n, ratings.get(n, [])) for n in RUBRIC)}
    return summary
