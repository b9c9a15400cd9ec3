"""Features versus neurons on the concept labels, held out: units are chosen on one part of the tokens
and scored on another.

The labelled held-out sequences are split, by sequence and seeded, into a *selection* part and a
*report* part (`split_sequences`). The streaming pass keeps the exact activations of a bounded sample
of sequences (`ProbeSample`: sparse entries for sparse dictionaries, dense float16 for dense ones such
as the neurons, so memory grows with tokens x L0, not tokens x d_sae). From them, per concept:

    single unit   the unit with the best exact AUROC on the selection part (no histogram binning),
                  scored on the report part;
    k-sparse      Gurnee et al. 2023 / SAEBench: the k units with the largest difference of mean
                  activation between positives and negatives on the selection part, a logistic
                  regression fitted on them there, AUROC and F1 on the report part;
    specificity   Towards Monosemanticity: per unit, the concept it is most specific to on the
                  selection part, and on the report part the precision P(concept | activation > tau * max)
                  and the recall P(activation > tau * max | concept).

AUROC intervals are percentile bootstraps over the report part's sequences; the resamples depend only
on the seed and the split, so every dictionary is resampled alike.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

SELECTION, REPORT, OUTSIDE = 0, 1, -1
DENSE_FRACTION = 0.25  # a part whose first block has more non-zero entries than this is kept dense


def split_sequences(n_seq: int, n_sample: int, report_fraction: float, seed: int) -> np.ndarray:
    """int8 [n_seq]: SELECTION or REPORT for a seeded sample of min(n_sample, n_seq) sequences, OUTSIDE for the rest.
    round(report_fraction * sample) sequences of the sample are the report part, the others the selection part."""
    if not 0 < report_fraction < 1:
        raise ValueError(f"report_fraction must be in (0, 1), got {report_fraction}")
    rng = np.random.default_rng([seed, 16])  # its own stream: other seeded draws do not shift it
    sample = rng.choice(n_seq, size=min(n_sample, n_seq), replace=False)
    n_report = int(round(report_fraction * len(sample)))
    split = np.full(n_seq, OUTSIDE, dtype=np.int8)
    split[sample] = SELECTION
    split[sample[:n_report]] = REPORT  # the sample is in random order: its head is a random subset
    return split


class _PartBuilder:
    """The blocks of one part as they arrive: sequence ids, labels and activations (sparse or dense)."""

    def __init__(self):
        self.seq, self.labels, self.dense_blocks, self.entries = [], [], [], []
        self.dense: bool | None = None
        self.n_tokens = 0

    def add(self, seq: np.ndarray, f: torch.Tensor, labels: torch.Tensor) -> None:
        """seq [b] global sequence ids; f [b, s, d]; labels bool [b, s, C]."""
        b, s, d = f.shape
        flat = f.reshape(b * s, d)
        if self.dense is None:
            self.dense = bool((flat != 0).float().mean() > DENSE_FRACTION)
        if self.dense:
            self.dense_blocks.append(flat.half())
        else:
            token, unit = (flat != 0).nonzero(as_tuple=True)
            self.entries.append((token + self.n_tokens, unit.int(), flat[token, unit].float()))
        self.seq.append(np.repeat(seq, s))
        self.labels.append(labels.reshape(b * s, -1))
        self.n_tokens += b * s

    def finish(self, d_sae: int, n_concepts: int) -> ProbeData:
        labels = torch.cat(self.labels) if self.labels else torch.zeros(0, n_concepts, dtype=torch.bool)
        seq = np.concatenate(self.seq) if self.seq else np.zeros(0, dtype=np.int64)
        if self.dense:
            return ProbeData(seq, labels, d_sae, dense=torch.cat(self.dense_blocks))
        if self.entries:
            token, unit, value = (torch.cat(x) for x in zip(*self.entries))
        else:
            token, unit, value = torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int32), torch.zeros(0)
        return ProbeData(seq, labels, d_sae, entries=(token, unit, value))


class ProbeSample:
    """Fed every block of the streaming pass; keeps the sequences `split` puts in the selection or report part."""

    def __init__(self, split: np.ndarray, d_sae: int, n_concepts: int):
        self.split, self.d_sae, self.n_concepts = split, d_sae, n_concepts
        self.parts = {SELECTION: _PartBuilder(), REPORT: _PartBuilder()}

    def add(self, first_seq: int, f: torch.Tensor, labels: torch.Tensor) -> None:
        """f [b, s, d] and labels [b, s, C] of sequences first_seq .. first_seq + b - 1."""
        part_of = self.split[first_seq : first_seq + f.shape[0]]
        for part, builder in self.parts.items():
            rows = np.flatnonzero(part_of == part)
            if len(rows):
                builder.add(rows + first_seq, f[torch.from_numpy(rows)], labels[torch.from_numpy(rows)])

    def finish(self) -> tuple[ProbeData, ProbeData]:
        """(selection, report)."""
        return tuple(self.parts[p].finish(self.d_sae, self.n_concepts) for p in (SELECTION, REPORT))


@dataclass
class ProbeData:
    """The exact activations of one part: seq [n] (global sequence id per token), labels bool [n, C], and either
    dense [n, d_sae] float16 or entries (token int64 [E], unit int32 [E], value float32 [E]) of the non-zero values."""

    seq: np.ndarray
    labels: torch.Tensor
    d_sae: int
    dense: torch.Tensor | None = None
    entries: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def n_tokens(self) -> int:
        return len(self.labels)

    def unit_chunks(self, chunk: int = 16) -> Iterator[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
        """(units int64, (token, unit int64, value)): the non-zero activations of those units; dense data a chunk
        of units at a time, so the entries of one chunk bound the memory."""
        if self.dense is None:
            token, unit, value = self.entries
            yield torch.arange(self.d_sae), (token, unit.long(), value)
            return
        for start in range(0, self.d_sae, chunk):
            block = self.dense[:, start : start + chunk].float()
            token, unit = (block != 0).nonzero(as_tuple=True)
            yield torch.arange(start, min(start + chunk, self.d_sae)), (token, unit + start, block[token, unit])

    def columns(self, units: Sequence[int]) -> torch.Tensor:
        """float32 [n, len(units)]: the activations of these units on every token."""
        units = torch.as_tensor(list(units), dtype=torch.int64)
        if self.dense is not None:
            return self.dense[:, units].float()
        out = torch.zeros(self.n_tokens, len(units))
        token, unit, value = self.entries
        where = torch.full((self.d_sae,), -1, dtype=torch.int64)
        where[units] = torch.arange(len(units))
        column = where[unit.long()]
        keep = column >= 0
        out[token[keep], column[keep]] = value[keep]
        return out

    def max(self) -> torch.Tensor:
        """[d_sae] the largest activation of each unit (0 when it never fires here)."""
        top = torch.zeros(self.d_sae)
        for _, (token, unit, value) in self.unit_chunks():
            top.scatter_reduce_(0, unit, value, "amax")
        return top


# --- measures -------------------------------------------------------------------------------------


def mean_difference(data: ProbeData) -> torch.Tensor:
    """[C, d_sae] float64: mean activation on a concept's positive tokens minus on its negative tokens."""
    labels = data.labels.double()
    n_pos = labels.sum(0)  # [C]
    total = torch.zeros(data.d_sae, dtype=torch.float64)
    positive = torch.zeros(labels.shape[1], data.d_sae, dtype=torch.float64)
    for _, (token, unit, value) in data.unit_chunks():
        value = value.double()
        total.index_add_(0, unit, value)
        for c in range(labels.shape[1]):
            positive[c].index_add_(0, unit, value * labels[token, c])
    n_neg = data.n_tokens - n_pos
    return positive / n_pos.clamp_min(1)[:, None] - (total - positive) / n_neg.clamp_min(1)[:, None]


def exact_aurocs(data: ProbeData) -> torch.Tensor:
    """[C, d_sae] float64: every unit's AUROC for every concept from its exact values, ties counting one half.

    Only non-zero values are stored; each unit's zeros are one tie group (value 0) weighted by their count.
    Sorting (unit, value) groups equal values of a unit; wins = sum over groups of positives x (negatives
    below + half the negatives tied). NaN for a concept without positives or negatives."""
    labels = data.labels.double()
    n, n_concepts = labels.shape
    n_pos = labels.sum(0)  # [C]
    wins = torch.zeros(n_concepts, data.d_sae, dtype=torch.float64)
    for units, (token, unit, value) in data.unit_chunks():
        nonzero = torch.zeros(data.d_sae, dtype=torch.float64).index_add_(0, unit, torch.ones_like(value, dtype=torch.float64))
        # Items: the entries (weight 1) and one zero group per unit (weight: its tokens with value 0).
        item_unit = torch.cat([unit, units])
        item_value = torch.cat([value.float(), torch.zeros(len(units))])
        item_weight = torch.cat([torch.ones(len(unit), dtype=torch.float64), n - nonzero[units]])
        order = np.argsort(item_value.numpy(), kind="stable")  # numpy: stable sorts several times faster than torch's
        unit_key = item_unit.numpy()[order].astype(np.int16 if data.d_sae <= 2**15 else np.int64)  # int16: a radix sort
        order = torch.from_numpy(order[np.argsort(unit_key, kind="stable")])
        sorted_unit, sorted_value = item_unit[order], item_value[order]
        new_group = torch.ones(len(order), dtype=torch.bool)
        new_group[1:] = (sorted_unit[1:] != sorted_unit[:-1]) | (sorted_value[1:] != sorted_value[:-1])
        group = new_group.long().cumsum(0) - 1
        n_groups = int(group[-1]) + 1
        group_unit = torch.zeros(n_groups, dtype=torch.int64).index_copy_(0, group, sorted_unit)
        weight = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, group, item_weight[order])
        first = torch.ones(n_groups, dtype=torch.bool)
        first[1:] = group_unit[1:] != group_unit[:-1]
        unit_start = torch.cummax(torch.where(first, torch.arange(n_groups), 0), 0).values
        for c in range(n_concepts):
            positive_nonzero = torch.zeros(data.d_sae, dtype=torch.float64).index_add_(0, unit, labels[token, c])
            item_pos = torch.cat([labels[token, c], n_pos[c] - positive_nonzero[units]])
            pos = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, group, item_pos[order])
            neg = weight - pos
            below = neg.cumsum(0) - neg  # negatives in earlier groups, the other units' included ...
            below = below - below[unit_start]  # ... less those before the unit's first group
            wins[c].index_add_(0, group_unit, pos * (below + 0.5 * neg))
    pairs = n_pos * (n - n_pos)
    auroc = wins / pairs.clamp_min(1)[:, None]
    return torch.where((pairs > 0)[:, None], auroc, torch.full_like(auroc, float("nan")))


def auroc_groups(scores: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Group id of every score in ascending order of value, equal scores one group; and the number of groups."""
    values, inverse = torch.unique(scores, sorted=True, return_inverse=True)
    return inverse, len(values)


def weighted_auroc(group: torch.Tensor, n_groups: int, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """AUROC under token weights [R, n] (one row per bootstrap resample), ties one half; [R]."""
    pos = torch.zeros(len(weights), n_groups, dtype=torch.float64).index_add_(1, group[labels], weights[:, labels])
    neg = torch.zeros(len(weights), n_groups, dtype=torch.float64).index_add_(1, group[~labels], weights[:, ~labels])
    below = neg.cumsum(1) - neg
    wins = (pos * (below + 0.5 * neg)).sum(1)
    pairs = pos.sum(1) * neg.sum(1)
    return torch.where(pairs > 0, wins / pairs.clamp_min(1e-12), torch.full_like(wins, float("nan")))


class Bootstrap:
    """Resamples of the report part's sequences, seeded: token weights = how often its sequence was drawn."""

    def __init__(self, seq: np.ndarray, resamples: int, seed: int, batch: int = 50):
        unique, token_seq = np.unique(seq, return_inverse=True)
        rng = np.random.default_rng([seed, 17])
        draws = rng.integers(0, len(unique), (resamples, len(unique)))
        self.counts = torch.from_numpy(np.stack([np.bincount(d, minlength=len(unique)) for d in draws]).astype(np.float64)) \
            if resamples else torch.zeros(0, len(unique), dtype=torch.float64)
        self.token_seq = torch.from_numpy(token_seq.astype(np.int64))
        self.batch = batch

    def auroc(self, scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """{"auroc", "ci_low", "ci_high"} (95 % percentile interval; NaN without resamples)."""
        group, n_groups = auroc_groups(scores)
        point = float(weighted_auroc(group, n_groups, labels, torch.ones(1, len(scores), dtype=torch.float64))[0])
        values = [weighted_auroc(group, n_groups, labels, self.counts[i : i + self.batch][:, self.token_seq])
                  for i in range(0, len(self.counts), self.batch)]
        values = torch.cat(values).numpy() if values else np.array([])
        values = values[np.isfinite(values)]
        low, high = (np.percentile(values, [2.5, 97.5]) if len(values) else (np.nan, np.nan))
        return {"auroc": point, "ci_low": float(low), "ci_high": float(high)}


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-4, iterations: int = 50):
    """Class-balanced, L2-regularised logistic regression on standardised x [n, k] by Newton's method (k is at
    most a few dozen, so the [k + 1, k + 1] Hessian is cheap); returns a function x -> logits [n]."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = torch.cat([((x - mean) / std).double(), torch.ones(len(x), 1, dtype=torch.float64)], dim=1)  # [n, k + 1]
    target = y.double()
    n_pos = target.sum().clamp_min(1)
    sample_weight = torch.where(y, len(y) / (2 * n_pos), len(y) / (2 * (len(y) - n_pos).clamp_min(1))) / len(y)
    penalty = torch.full((z.shape[1],), 2 * l2, dtype=torch.float64)
    penalty[-1] = 0  # the bias is not shrunk
    beta = torch.zeros(z.shape[1], dtype=torch.float64)
    for _ in range(iterations):
        p = torch.sigmoid(z @ beta)
        gradient = z.T @ (sample_weight * (p - target)) + penalty * beta
        hessian = (z * (sample_weight * p * (1 - p))[:, None]).T @ z + torch.diag(penalty)
        step = torch.linalg.solve(hessian + 1e-9 * torch.eye(len(beta), dtype=torch.float64), gradient)
        beta = beta - step
        if step.abs().max() < 1e-6:
            break
    return lambda x_new: torch.cat([((x_new - mean) / std).double(), torch.ones(len(x_new), 1, dtype=torch.float64)], dim=1) @ beta


def f1(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    true_pos = float((predicted & labels).sum())
    denominator = float(predicted.sum() + labels.sum())
    return 2 * true_pos / denominator if denominator else float("nan")


def specificity(selection: ProbeData, report: ProbeData, thresholds: Sequence[float], scale: torch.Tensor,
                min_tokens: int) -> dict[float, dict[str, np.ndarray]]:
    """Per threshold tau and unit: the concept it is most specific to on the selection part (argmax of
    P(concept | activation > tau * scale)), and that concept's precision and recall on the report part.
    scale [d_sae]: each unit's maximum (label-free). Units with fewer than min_tokens report tokens above the
    threshold get NaN precision."""
    result = {}
    for tau in thresholds:
        counts = {}
        for name, data in (("selection", selection), ("report", report)):
            above = torch.zeros(data.d_sae, dtype=torch.float64)
            positive = torch.zeros(data.labels.shape[1], data.d_sae, dtype=torch.float64)
            labels = data.labels.double()
            for _, (token, unit, value) in data.unit_chunks():
                hit = value > tau * scale[unit]
                token, unit = token[hit], unit[hit]
                above.index_add_(0, unit, torch.ones(len(unit), dtype=torch.float64))
                for c in range(labels.shape[1]):
                    positive[c].index_add_(0, unit, labels[token, c])
            counts[name] = (above, positive, labels.sum(0))
        above, positive, _ = counts["selection"]
        best = (positive / above.clamp_min(1)).argmax(0)  # [d_sae]
        above, positive, n_pos = counts["report"]
        units = torch.arange(selection.d_sae)
        precision = positive[best, units] / above.clamp_min(1)
        recall = positive[best, units] / n_pos[best].clamp_min(1)
        counted = (above >= min_tokens) & (counts["selection"][0] > 0) & (scale > 0)
        result[tau] = {"concept": best.numpy(), "precision": torch.where(counted, precision, torch.nan).numpy(),
                       "recall": torch.where(counted, recall, torch.nan).numpy(), "report_tokens_above": above.numpy()}
    return result


def compare(selection: ProbeData, report: ProbeData, concept_names: Sequence[str], ks: Sequence[int],
            thresholds: Sequence[float], min_tokens: int, resamples: int, seed: int, log=lambda _: None) -> dict:
    """The held-out comparison for one dictionary: {"concepts": {name: {...}}, "specificity": {...}, "units": {...}}."""
    if not set(selection.seq).isdisjoint(report.seq):
        raise AssertionError("the selection and report parts share sequences")  # split_sequences guarantees it
    bootstrap = Bootstrap(report.seq, resamples, seed)
    single_selection = exact_aurocs(selection)  # [C, d_sae]
    single_report = exact_aurocs(report)
    difference = mean_difference(selection)
    ks = sorted(set(min(k, selection.d_sae) for k in ks))
    chosen = difference.nan_to_num(nan=-np.inf).topk(ks[-1], dim=1).indices  # [C, k_max], best first
    wanted = torch.unique(chosen).tolist()
    column_of = {u: i for i, u in enumerate(wanted)}
    x_selection, x_report = selection.columns(wanted), report.columns(wanted)
    concepts = {}
    for c, name in enumerate(concept_names):
        y_selection, y_report = selection.labels[:, c], report.labels[:, c]
        entry = {"selection_positives": int(y_selection.sum()), "report_positives": int(y_report.sum()),
                 "report_tokens": report.n_tokens}
        if not (0 < entry["selection_positives"] < selection.n_tokens and 0 < entry["report_positives"] < report.n_tokens):
            concepts[name] = {**entry, "single_unit": None, "sparse_probe": {}}
            continue
        best = int(single_selection[c].nan_to_num(nan=-1.0).argmax())
        scores = report.columns([best])[:, 0]
        entry["single_unit"] = {"unit": best, "selection_auroc": float(single_selection[c, best]),
                                **bootstrap.auroc(scores, y_report)}
        probes = {}
        for k in ks:
            units = chosen[c, :k].tolist()
            columns = [column_of[u] for u in units]
            predict = fit_logistic(x_selection[:, columns], y_selection)
            logits = predict(x_report[:, columns])
            probes[str(k)] = {"units": units, **bootstrap.auroc(logits.float(), y_report), "f1": f1(logits > 0, y_report)}
        entry["sparse_probe"] = probes
        concepts[name] = entry
        log(f"{name}: single {entry['single_unit']['auroc']:.3f}, " + ", ".join(f"k={k} {p['auroc']:.3f}" for k, p in probes.items()))
    spec = specificity(selection, report, thresholds, selection.max(), min_tokens)
    spec_summary = {}
    for tau, values in spec.items():
        precision = values["precision"]
        counted = np.isfinite(precision)
        spec_summary[f"{tau:g}"] = {
            "units_counted": int(counted.sum()),
            "units_at_least_90_percent": int((precision[counted] >= 0.9).sum()),
            "median_precision": float(np.median(precision[counted])) if counted.any() else None,
            "median_recall": float(np.median(values["recall"][counted])) if counted.any() else None,
        }
    units = {"exact_auroc_report": single_report.numpy(), "specificity": spec}
    return {"concepts": concepts, "specificity": spec_summary, "units": units,
            "selection_tokens": selection.n_tokens, "report_tokens": report.n_tokens,
            "selection_seqs": int(len(np.unique(selection.seq))), "report_seqs": int(len(np.unique(report.seq)))}
