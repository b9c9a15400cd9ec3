"""Autointerp for one dictionary: select units, collect records, explain, simulate, score, write results.

``run_dictionary`` is what the Snakemake rule calls; ``interpret_units`` is the network part, usable on
records from anywhere (tests feed it synthetic records).
"""

from __future__ import annotations

import asyncio
import csv
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from tqdm import tqdm

from monoscope.atomic import atomic_open
from monoscope.config import settings_from

from .classify import balanced_accuracy, classify, detection_examples, fuzzing_examples
from .client import BudgetExceeded, ClientConfig, LLMClient, RequestFailed, job_cache_path
from .explain import explain
from .records import UnitRecords, collect_records
from .score import correlation_scores
from .simulate import BadAnswer, detect_method, simulate_record

log = logging.getLogger(__name__)

SCORE_COLUMNS = ["unit", "status", "spearman", "pearson", "detection", "fuzzing", "n_tokens", "unparsed", "explanation",
                 "reason"]
SCORE_METRICS = ("spearman", "pearson", "detection", "fuzzing")


@dataclass(frozen=True)
class AutointerpSettings:
    """The ``autointerp`` config section as one dictionary's job reads it (the comparison reads ratings_dir,
    bootstrap_samples and seed): workflow/schemas/config.schema.yaml documents each key and holds its
    default (build with monoscope.config.settings_from)."""

    SECTION: ClassVar[str] = "autointerp"

    base_url: str
    model: str
    api_key_env: str
    n_units: int
    n_top_density: int
    seed: int
    n_top: int
    n_explain: int
    n_random: int
    n_quantile: int
    quantile_pool: int
    record_len: int | None
    sampling: str
    scorers: list[str]
    seqs_per_block: int
    simulation_method: str
    top_logprobs: int
    explanation_max_tokens: int
    bad_answer_retries: int
    concurrency: int
    max_retries: int
    backoff_s: float
    backoff_max_s: float
    timeout_s: float
    max_requests: int | None
    max_total_tokens: int | None
    cache_path: str

    def client_config(self) -> ClientConfig:
        return settings_from(ClientConfig, asdict(self))


def select_units(density: np.ndarray, n_units: int, n_top_density: int, seed: int) -> list[int]:
    """The ``n_top_density`` densest units, then ``n_units`` drawn at random (seeded) among the other live ones.

    Dead units (density 0 on the held-out shards) have no records to explain and are never drawn.
    """
    order = np.lexsort((np.arange(len(density)), -density))
    top = [int(u) for u in order[:n_top_density] if density[u] > 0]
    rest = np.setdiff1d(np.flatnonzero(density > 0), top)
    drawn = np.random.default_rng(seed).choice(rest, size=min(n_units, len(rest)), replace=False)
    return top + sorted(int(u) for u in drawn)


async def interpret_units(client: LLMClient, units: Sequence[UnitRecords], strings: Sequence[str],
                          settings: AutointerpSettings, method: str) -> list[dict[str, Any]]:
    """Explain, simulate and score every unit concurrently; one result dict per unit, in order.

    A unit whose requests fail or whose answers stay malformed gets ``status`` != "ok" and a reason;
    it never stops the others.
    """
    progress = tqdm(total=len(units), desc="autointerp", unit="unit", mininterval=5)

    async def one(unit: UnitRecords) -> dict[str, Any]:
        try:
            return await _interpret_unit(client, unit, strings, settings, method)
        finally:
            progress.update()

    try:
        return list(await asyncio.gather(*(one(u) for u in units)))
    finally:
        progress.close()


async def _retry_bad_answers(call: Callable[[int], Any], retries: int):
    for attempt in range(retries + 1):
        try:
            return await call(attempt)
        except BadAnswer as error:
            last = error
    raise BadAnswer(f"{last} (after {retries + 1} attempts)")


async def _gather_or_cancel(awaitables: Iterable) -> list:
    """Like gather, but the first failure cancels the siblings: a failed unit stops spending requests,
    and no task outlives the client it uses."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def _interpret_unit(client, unit: UnitRecords, strings, settings, method) -> dict[str, Any]:
    result: dict[str, Any] = {"unit": unit.unit, "max_act": unit.max_act, "explanation": None, "simulations": []}
    if unit.max_act <= 0 or not unit.explanation or not unit.scoring:
        return result | {"status": "no_records", "reason": "the unit never activates on the held-out shards"}
    stage = "explain"
    try:
        result["explanation"] = await _retry_bad_answers(
            lambda attempt: explain(client, unit, strings, max_tokens=settings.explanation_max_tokens,
                                    attempt=attempt), settings.bad_answer_retries)
        stage = "simulate"
        simulations = []
        if "simulation" in settings.scorers:
            simulations = await _gather_or_cancel(
                _retry_bad_answers(
                    lambda attempt, r=record: simulate_record(client, method, result["explanation"],
                                                              [strings[t] for t in r.tokens],
                                                              top_logprobs=settings.top_logprobs, attempt=attempt),
                    settings.bad_answer_retries)
                for record in unit.scoring)
        stage = "classify"
        examples = ((detection_examples(unit, strings) if "detection" in settings.scorers else [])
                    + (fuzzing_examples(unit, strings, settings.seed) if "fuzzing" in settings.scorers else []))
        answers = await _gather_or_cancel(
            _retry_bad_answers(lambda attempt, e=example: classify(client, e, result["explanation"], attempt),
                               settings.bad_answer_retries)
            for example in examples)
    except (BadAnswer, RequestFailed, BudgetExceeded) as error:
        kind = {BadAnswer: "bad_answer", RequestFailed: "request_failed", BudgetExceeded: "budget"}[type(error)]
        return result | {"status": f"failed_{kind}", "reason": client.redact(f"{stage}: {error}")}
    except Exception as error:  # noqa: BLE001 - an odd answer (KeyError, OverflowError...) fails its unit, not the dictionary
        log.warning("unit %d failed at %s: %s", unit.unit, stage, client.redact(repr(error)))
        return result | {"status": "failed_error", "reason": client.redact(f"{stage}: {type(error).__name__}: {error}")[:300]}
    for record, simulation in zip(unit.scoring, simulations):
        result["simulations"].append({
            "kind": record.kind, "sequence": record.sequence, "start": record.start,
            "tokens": [strings[t] for t in record.tokens], "true": record.acts,
            "true_quantised": unit.quantised(record), "predicted": simulation.predicted,
            "unparsed": simulation.unparsed,
        })
    result["classifications"] = [{"scorer": e.scorer, "kind": e.record.kind, "sequence": e.record.sequence, "text": e.text,
                                  "label": e.label, "answer": answer} for e, answer in zip(examples, answers)]
    for scorer in ("detection", "fuzzing"):
        if scorer in settings.scorers:
            pairs = [(c["label"], c["answer"]) for c in result["classifications"] if c["scorer"] == scorer]
            result[scorer] = balanced_accuracy(*zip(*pairs)) if pairs else math.nan
    if "simulation" not in settings.scorers:
        return result | {"spearman": math.nan, "pearson": math.nan, "status": "ok", "reason": ""}
    scores = correlation_scores([s["predicted"] for s in result["simulations"]],
                                [s["true"] for s in result["simulations"]])
    status = "ok" if not math.isnan(scores["spearman"]) else "constant_truth"
    return result | scores | {"status": status, "reason": "" if status == "ok" else "true activations are constant"}


async def _run(units, strings, settings: AutointerpSettings, cache_path: str | Path | None = None) -> tuple[list[dict], dict]:
    async with LLMClient(settings.client_config(), cache_path or settings.cache_path, rng_seed=settings.seed) as client:
        notes: dict[str, str] = {}
        method = settings.simulation_method
        if method == "auto":
            method, notes = await detect_method(client, settings.top_logprobs)
        log.info("simulation method: %s %s", method, notes)
        results = await interpret_units(client, units, strings, settings, method)
        usage = client.usage_dict() | {"simulation_method": method, "detection": notes}
    return results, usage


def run_dictionary(settings: AutointerpSettings, name: str, sae_dir: str | Path | None, *,
                   activation_paths: Sequence[str | Path], unit_stats: str | Path, tokenizer_dir: str | Path,
                   out_dir: str | Path) -> dict:
    """Autointerp for dictionary ``name`` ("neurons" or an SAE in ``sae_dir``) on the held-out stores; units
    are drawn by the evaluation's densities (``unit_stats``, monoscope.dictionary.read_unit_stats).

    Writes ``explanations.jsonl``, ``simulations.jsonl``, ``scores.csv`` and ``usage.json`` to ``out_dir``,
    each to a temporary name first. Returns the usage dict.
    """
    import torch

    from monoscope.dictionary import open_dictionary, read_unit_stats
    from monoscope.store import iter_sequence_blocks, open_activations
    from monoscope.tokenize import token_strings

    stores = [open_activations(p) for p in activation_paths]
    if not stores:
        raise ValueError("autointerp needs at least one held-out activation store")
    dictionary = open_dictionary(name, sae_dir, stores[0].d)

    def feature_blocks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for store in stores:
            for tokens, acts in iter_sequence_blocks(store, settings.seqs_per_block):
                with torch.no_grad():
                    yield tokens, dictionary.encode(torch.from_numpy(acts)).numpy()

    started = time.monotonic()
    units = select_units(read_unit_stats(unit_stats)["density"].to_numpy(), settings.n_units, settings.n_top_density, settings.seed)
    records = collect_records(feature_blocks(), units, settings)
    cache_path = job_cache_path(settings.cache_path, name)  # one writer per cache file (see client)
    results, usage = asyncio.run(_run(records, token_strings(tokenizer_dir), settings, cache_path))
    usage |= {"dictionary": name, "units": len(units), "elapsed_s": round(time.monotonic() - started, 3)}
    write_results(results, usage, out_dir)
    return usage


def write_results(results: Sequence[dict], usage: dict, out_dir: str | Path) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_open(out / "explanations.jsonl", newline="") as f:
        for r in results:
            f.write(json.dumps({k: r.get(k) for k in ("unit", "status", "explanation", "reason", "max_act")}) + "\n")
    with atomic_open(out / "simulations.jsonl", newline="") as f:
        for r in results:
            f.write(json.dumps({"unit": r["unit"], "explanation": r["explanation"], "records": r["simulations"],
                                "classifications": r.get("classifications", [])}) + "\n")
    with atomic_open(out / "scores.csv", newline="") as f:
        writer = csv.DictWriter(f, SCORE_COLUMNS)
        writer.writeheader()
        for r in results:
            n_tokens = sum(len(s["true"]) for s in r["simulations"])
            unparsed = sum(s["unparsed"] for s in r["simulations"])
            writer.writerow({"unit": r["unit"], "status": r["status"], **{m: r.get(m, math.nan) for m in SCORE_METRICS},
                             "n_tokens": n_tokens, "unparsed": unparsed,
                             "explanation": r["explanation"] or "", "reason": r.get("reason", "")})
    with atomic_open(out / "usage.json", newline="") as f:
        f.write(json.dumps(usage, indent=2, sort_keys=True) + "\n")


def read_scores(path: str | Path) -> list[dict[str, Any]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["unit"] = int(row["unit"])
        for metric in SCORE_METRICS:  # a table written before detection and fuzzing lacks them: NaN
            row[metric] = float(row.get(metric) or "nan")
    return rows


def _examples_text(simulation_records: Sequence[dict], n: int = 3) -> str:
    """Top records as text with active tokens marked ``[token]{activation 0..10}``."""
    lines = []
    for record in [r for r in simulation_records if r["kind"] == "top"][:n]:
        lines.append("".join(f"[{t}]{{{q}}}" if q else t for t, q in zip(record["tokens"], record["true_quantised"])))
    return "\n".join(lines)


def logit_weights_text(weights_path: str | Path | None, strings: Sequence[str] | None, n: int = 8) -> dict[int, str]:
    """unit -> "raises: a, b, ... | lowers: c, d, ..." from a features job's weights.npz (empty without one)."""
    if weights_path is None or strings is None or not Path(weights_path).exists():
        return {}
    with np.load(weights_path) as weights:
        if "logit_top_ids" not in weights:
            return {}
        top, bottom = weights["logit_top_ids"][:, :n], weights["logit_bottom_ids"][:, :n]

    def tokens(ids):
        return ", ".join(repr(strings[int(t)]) for t in ids)

    return {unit: f"raises: {tokens(top[unit])} | lowers: {tokens(bottom[unit])}" for unit in range(len(top))}


def run_comparison(result_dirs: dict[str, str | Path], out_json: str | Path, out_png: str | Path,
                   ratings_out_dir: str | Path, *, bootstrap_samples: int, seed: int, ratings_dir: str | Path,
                   key_path: str | Path | None = None, weights_paths: dict[str, str | Path] | None = None,
                   strings: Sequence[str] | None = None) -> dict:
    """Features vs neurons: bootstrap CIs per dictionary (``bootstrap_samples`` resamples, seeded), the plot, a
    blind rating sheet (with each unit's logit weights from ``weights_paths``, the features jobs' weights.npz),
    and any filled sheets found in ``ratings_dir`` ingested under ``human_ratings``. The answer key goes to
    ``key_path`` (default: ratings_key.csv beside the raters' folder, never inside it)."""
    key_path = Path(key_path) if key_path is not None else Path(ratings_out_dir).parent / "ratings_key.csv"
    from .ratings import export_sheet, ingest_ratings
    from .score import compare_dictionaries, plot_comparison

    scores = {name: read_scores(Path(d) / "scores.csv") for name, d in result_dirs.items()}
    summary = {"scores": compare_dictionaries(scores, n_boot=bootstrap_samples, seed=seed)}
    items = []
    for name, directory in result_dirs.items():
        logits = logit_weights_text((weights_paths or {}).get(name), strings)
        with open(Path(directory) / "simulations.jsonl", encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                if row["explanation"]:
                    items.append({"dictionary": name, "unit": row["unit"], "explanation": row["explanation"],
                                  "examples": _examples_text(row["records"]), "logit_weights": logits.get(row["unit"], "")})
    export_sheet(items, ratings_out_dir, key_path, seed=seed)
    summary["human_ratings"] = ingest_ratings(ratings_dir, key_path)
    summary["usage"] = {name: json.loads((Path(d) / "usage.json").read_text()) for name, d in result_dirs.items()}
    plot_comparison(summary["scores"], out_png)
    with atomic_open(Path(out_json), newline="") as f:
        f.write(json.dumps(summary, indent=2, sort_keys=True, allow_nan=True) + "\n")
    return summary
