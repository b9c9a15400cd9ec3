"""Activation records for autointerp: top-activating, uniform random and quantile samples per unit.

One streaming pass over ``(tokens [b, context], acts [b, context, n_units_total])`` blocks keeps, per
selected unit, three bounded "keep the k best by key" pools of whole sequences:

- top: key = the sequence's max activation (the highest k);
- random: key = a seeded uniform draw (bottom-k of random keys = uniform sampling without replacement);
- quantile pool: the same, but only among sequences where the unit activates at all; at the end the
  pool is sorted by max activation and one record is drawn from each of ``n_quantile`` equal-count bins.

Memory is ``O(units · pool sizes · context)``, independent of the number of tokens streamed.
Records are then cut to ``record_len`` tokens (around the maximum for top/quantile, at a random place
for random) and split into an explanation set and a scoring set (``SAMPLINGS``):

- ``bills`` (Bills et al. 2023, neuron-explainer's interleaved splits): the top records ranked 0, 4, 8, ...
  explain, those ranked 2, 6, 10, ... are scored together with as many random records (top : random 1:1);
- ``top_random_quantile`` (monoscope's first scheme): explain on top ranks 0, 2, 4, ...; score every other
  top record plus ``n_random`` random and ``n_quantile`` quantile records (mostly active sequences).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

MAX_QUANTISED = 10
if TYPE_CHECKING:
    from .pipeline import AutointerpSettings

SAMPLINGS = ("bills", "top_random_quantile")
BILLS_SPLITS = 4  # neuron-explainer's top-record splits: train (explain), calibration, valid (score), test


@dataclass(frozen=True)
class Record:
    unit: int
    kind: str  # "top" | "random" | "quantile"
    sequence: int  # index of the sequence in the stream
    start: int  # first token position of the record inside that sequence
    tokens: list[int]
    acts: list[float]


@dataclass(frozen=True)
class UnitRecords:
    unit: int
    max_act: float  # the unit's largest activation seen in the stream (scale of the quantisation)
    explanation: list[Record]
    scoring: list[Record]

    def quantised(self, record: Record) -> list[int]:
        return quantise(record.acts, self.max_act)


def quantise(acts: Sequence[float] | np.ndarray, max_act: float) -> list[int]:
    """``floor(10 · relu(x) / max)`` clipped to 0..10; all zeros when the unit never activates."""
    values = np.maximum(np.asarray(acts, dtype=np.float64), 0.0)
    if max_act <= 0:
        return [0] * len(values)
    return np.clip(np.floor(MAX_QUANTISED * values / max_act), 0, MAX_QUANTISED).astype(int).tolist()


class _TopKPool:
    """Per unit, the k sequences with the largest key (ties: earliest sequence), with their data."""

    def __init__(self, n_units: int, k: int, context: int):
        self.k = k
        self.keys = np.full((n_units, k), -np.inf)
        self.seq = np.full((n_units, k), -1, dtype=np.int64)
        self.tokens = np.zeros((n_units, k, context), dtype=np.int32)
        self.acts = np.zeros((n_units, k, context), dtype=np.float32)

    def offer(self, keys: np.ndarray, seq_ids: np.ndarray, tokens: np.ndarray, acts: np.ndarray) -> None:
        """keys [b, U] (-inf = not a candidate), seq_ids [b], tokens [b, context], acts [b, context, U]."""
        if self.k == 0:
            return
        b, n_units = keys.shape
        all_keys = np.concatenate([self.keys, keys.T], axis=1)  # [U, k + b]
        # Sort by key descending, then by sequence id ascending, so equal keys keep the earliest sequence.
        all_seq = np.concatenate([self.seq, np.broadcast_to(seq_ids, (n_units, b))], axis=1)
        order = np.lexsort((all_seq, -all_keys), axis=1)[:, : self.k]  # [U, k]
        keep_old = order < self.k
        units = np.arange(n_units)[:, None]
        new_index = np.where(keep_old, 0, order - self.k)  # [U, k] row in the block
        new_tokens = tokens[new_index]  # [U, k, context]
        new_acts = np.moveaxis(acts, 2, 0)[units, new_index]  # [U, k, context]
        old_index = np.where(keep_old, order, 0)
        self.tokens = np.where(keep_old[..., None], self.tokens[units, old_index], new_tokens)
        self.acts = np.where(keep_old[..., None], self.acts[units, old_index], new_acts)
        self.keys = np.take_along_axis(all_keys, order, axis=1)
        self.seq = np.take_along_axis(all_seq, order, axis=1)

    def entries(self, unit: int) -> list[tuple[float, int, np.ndarray, np.ndarray]]:
        valid = np.isfinite(self.keys[unit])
        return [
            (float(self.keys[unit, j]), int(self.seq[unit, j]), self.tokens[unit, j], self.acts[unit, j])
            for j in np.flatnonzero(valid)
        ]


def collect_records(
    blocks: Iterable[tuple[np.ndarray, np.ndarray]],
    units: Sequence[int],
    settings: AutointerpSettings,
) -> list[UnitRecords]:
    """Stream activation blocks once and return records for each unit in ``units`` (same order).

    blocks: ``(tokens [b, context] int32, acts [b, context, n_units_total] float32)``.
    settings.n_top top-activating sequences are kept and split as settings.sampling says (module docstring);
    with "bills", n_explain records explain and up to n_explain top records are scored with as many random
    ones. Also read: n_random, n_quantile, record_len, quantile_pool and the seed.
    """
    n_top, n_random, n_quantile, n_explain = settings.n_top, settings.n_random, settings.n_quantile, settings.n_explain
    record_len, seed, quantile_pool, sampling = settings.record_len, settings.seed, settings.quantile_pool, settings.sampling
    units = np.asarray(units, dtype=np.int64)
    if units.ndim != 1 or len(units) == 0:
        raise ValueError("collect_records needs a non-empty 1-D list of unit indices")
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    if n_explain > n_top:
        raise ValueError(f"n_explain ({n_explain}) cannot exceed n_top ({n_top})")
    if record_len is not None and record_len < 1:
        raise ValueError(f"record_len must be >= 1 or None, got {record_len}")
    rng = np.random.default_rng(seed)
    pools: dict[str, _TopKPool] | None = None
    max_act = np.zeros(len(units))
    seen = 0
    for tokens, acts in blocks:
        if acts.ndim != 3 or tokens.shape != acts.shape[:2]:
            raise ValueError(f"block shapes disagree: tokens {tokens.shape}, acts {acts.shape}")
        if units.max() >= acts.shape[2]:
            raise ValueError(f"unit {units.max()} out of range for {acts.shape[2]} units")
        b, context = tokens.shape
        if pools is None:
            pools = {
                "top": _TopKPool(len(units), n_top, context),
                "random": _TopKPool(len(units), n_random, context),
                "quantile": _TopKPool(len(units), quantile_pool if n_quantile and sampling != "bills" else 0, context),
            }
        unit_acts = np.ascontiguousarray(acts[:, :, units], dtype=np.float32)  # [b, context, U]
        seq_max = unit_acts.max(axis=1)  # [b, U]
        max_act = np.maximum(max_act, seq_max.max(axis=0))
        seq_ids = np.arange(seen, seen + b)
        active = seq_max > 0
        pools["top"].offer(np.where(active, seq_max, -np.inf), seq_ids, tokens, unit_acts)
        pools["random"].offer(rng.random((b, len(units))), seq_ids, tokens, unit_acts)
        pools["quantile"].offer(np.where(active, rng.random((b, len(units))), -np.inf), seq_ids, tokens, unit_acts)
        seen += b
    if pools is None:
        raise ValueError("collect_records got no activation blocks")

    results = []
    for i, unit in enumerate(units.tolist()):
        top = pools["top"].entries(i)  # sorted by activation, strongest first
        if sampling == "bills":
            results.append(_bills_split(unit, float(max_act[i]), top, pools["random"].entries(i), n_explain, record_len, rng))
            continue
        explain_ranks = set(range(0, 2 * n_explain, 2)) if 2 * n_explain <= len(top) else set(range(n_explain))
        explanation = [_cut(unit, "top", e, record_len, rng) for r, e in enumerate(top) if r in explain_ranks]
        scoring = [_cut(unit, "top", e, record_len, rng) for r, e in enumerate(top) if r not in explain_ranks]
        used = {e[1] for e in top}
        for entry in pools["random"].entries(i):
            if entry[1] not in used:
                scoring.append(_cut(unit, "random", entry, record_len, rng))
                used.add(entry[1])
        for entry in _quantile_draw(pools["quantile"].entries(i), n_quantile, used, rng):
            scoring.append(_cut(unit, "quantile", entry, record_len, rng))
        results.append(UnitRecords(unit=unit, max_act=float(max_act[i]), explanation=explanation, scoring=scoring))
    return results


def _bills_split(unit, max_act, top, random, n_explain, record_len, rng) -> UnitRecords:
    """Explain on top ranks 0, 4, 8, ...; score top ranks 2, 6, 10, ... and as many random records (1:1)."""
    explain = top[0::BILLS_SPLITS][:n_explain]
    scored_top = top[2::BILLS_SPLITS][:n_explain]
    used = {e[1] for e in explain + scored_top}
    scored_random = [e for e in random if e[1] not in used]
    pairs = min(len(scored_top), len(scored_random))
    explanation = [_cut(unit, "top", e, record_len, rng) for e in explain]
    scoring = ([_cut(unit, "top", e, record_len, rng) for e in scored_top[:pairs]]
               + [_cut(unit, "random", e, record_len, rng) for e in scored_random[:pairs]])
    return UnitRecords(unit=unit, max_act=max_act, explanation=explanation, scoring=scoring)


def _quantile_draw(entries, n_quantile, used, rng):
    """One random entry per equal-count bin of the pool sorted by max activation, skipping used sequences."""
    candidates = sorted((e for e in entries if e[1] not in used), key=lambda e: (float(e[3].max()), e[1]))
    if n_quantile == 0 or not candidates:
        return []
    bins = np.array_split(np.arange(len(candidates)), min(n_quantile, len(candidates)))
    return [candidates[int(rng.choice(b))] for b in bins]


def _cut(unit, kind, entry, record_len, rng) -> Record:
    _, seq, tokens, acts = entry
    context = len(tokens)
    length = context if record_len is None else min(record_len, context)
    if kind == "random":
        start = int(rng.integers(0, context - length + 1))
    else:
        # Put the maximum three quarters of the way in: most of the evidence is in the left context.
        peak = int(np.argmax(acts))
        start = int(np.clip(peak - (3 * length) // 4, 0, context - length))
    window = slice(start, start + length)
    return Record(unit=unit, kind=kind, sequence=seq, start=start,
                  tokens=tokens[window].astype(int).tolist(), acts=acts[window].astype(float).tolist())
