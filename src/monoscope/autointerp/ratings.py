"""Human ratings: export a blind rating sheet (CSV + HTML form) and ingest filled sheets.

Rubric (from the seed, 1 = not at all … 5 = completely), one row per explained unit:

- confidence: how confident the rater is that the explanation describes the unit;
- activation_consistency: how consistent the top activations are with the explanation;
- logit_consistency: how consistent the unit's logit weights are with the explanation;
- specificity: how specific the explanation is (a narrow concept, not "common words").

The sheet is blind: items are shuffled (seeded) and carry an opaque id; the answer key maps ids to
(dictionary, unit) and is what ingestion joins on. It is written outside the folder handed to raters,
so they cannot tell features from neurons. Each item shows the unit's top and bottom logit weights,
which the logit_consistency question asks about. The id is a digest of (seed, dictionary, unit,
explanation), so it is the same in every run that rates the same explanation, and a sheet filled for an
earlier explanation of a unit (or for another unit) matches no id of the new key: it is counted as
stale, never attributed to whichever unit now sits at its position.

Cells a spreadsheet would run as a formula (starting with =, +, -, @, tab or CR) are written with a
leading apostrophe; sheets saved by Excel with a byte-order mark are read as plain UTF-8.
"""

from __future__ import annotations

import csv
import hashlib
import html
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from monoscope.atomic import atomic_open, write_text

log = logging.getLogger(__name__)

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
    rows = [{"item": item_id(seed, items[j]), **items[j]} for j in order]
    if len({r["item"] for r in rows}) != len(rows):
        raise ValueError("two rating items share a dictionary, unit and explanation")
    with atomic_open(key_path, newline="") as f:
        writer = csv.DictWriter(f, ["item", "dictionary", "unit"])
        writer.writeheader()
        writer.writerows({k: r[k] for k in ("item", "dictionary", "unit")} for r in rows)
    with atomic_open(out / "rating_sheet.csv", newline="") as f:
        writer = csv.DictWriter(f, SHEET_COLUMNS)
        writer.writeheader()
        writer.writerows({"item": r["item"], "explanation": spreadsheet_safe(r["explanation"]),
                          "examples": spreadsheet_safe(r["examples"]),
                          "logit_weights": spreadsheet_safe(r.get("logit_weights", ""))} for r in rows)
    write_text(out / "rating_sheet.html", _html_form(rows))


def item_id(seed: int, item: Mapping) -> str:
    """Opaque, and the same in every run for the same (dictionary, unit, explanation)."""
    text = f"{seed}\0{item['dictionary']}\0{item['unit']}\0{item['explanation']}"
    return "item-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(text: str) -> str:
    """A cell a spreadsheet shows as text: one starting like a formula gets a leading apostrophe."""
    return "'" + text if text.startswith(FORMULA_STARTS) else text


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

    Raises ValueError naming the file and row when a value is outside 1..5 or a sheet has no item
    column. Rows whose item is not in the key (rated for an earlier explanation) are counted as
    stale per sheet and left out.
    """
    key = {}
    with open(key_path, newline="", encoding="utf-8-sig") as f:
        for row in csv.DictReader(f):
            key[row["item"]] = (row["dictionary"], int(row["unit"]))
    per_dictionary: dict[str, dict[str, list[float]]] = {}
    files = sorted(Path(filled_dir).glob("*.csv")) if Path(filled_dir).is_dir() else []
    stale: dict[str, int] = {}
    for path in files:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel's byte-order mark
            reader = csv.DictReader(f)
            reader.fieldnames = [(name or "").strip().lower() for name in reader.fieldnames or []]
            if "item" not in reader.fieldnames:
                raise ValueError(f"{path}:1: no 'item' column (columns: {reader.fieldnames[:8]})")
            for line, raw in enumerate(reader, start=2):
                row = {k: v for k, v in raw.items() if k is not None}
                item = (row.get("item") or "").strip()
                if item not in key:
                    stale[path.name] = stale.get(path.name, 0) + 1
                    continue
                dictionary, _ = key[item]
                for name in RUBRIC:
                    value = (row.get(name) or "").strip()
                    if not value:
                        continue
                    if value not in {str(v) for v in SCALE}:
                        raise ValueError(f"{path}:{line}: {name} must be an integer 1..5, got {value!r}")
                    per_dictionary.setdefault(dictionary, {}).setdefault(name, []).append(float(value))
    if stale:
        log.warning("ratings: rows for items not in %s (rated for earlier explanations) left out: %s", key_path, stale)
    summary = {"sheets": [p.name for p in files], "stale_rows": stale, "dictionaries": {}}
    for dictionary, ratings in sorted(per_dictionary.items()):
        summary["dictionaries"][dictionary] = {
            name: {"mean": float(np.mean(v)) if v else math.nan, "n": len(v)}
            for name, v in ((n, ratings.get(n, [])) for n in RUBRIC)}
    return summary
