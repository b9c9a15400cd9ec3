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
        """[d_sae] the largest activation of each unit (0 when it is never above 0 here)."""
        if self.dense is not None:
            return self.dense.float().amax(0).clamp_min(0) if self.n_tokens else torch.zeros(self.d_sae)
        token, unit, value = self.entries
        return torch.zeros(self.d_sae).scatter_reduce_(0, unit.long(), value, "amax")


# --- measures -------------------------------------------------------------------------------------


def _dense_blocks(data: ProbeData, chunk: int = 64) -> Iterator[tuple[slice, torch.Tensor]]:
    """(columns, float64 [n, width]) of dense data, a chunk of units at a time."""
    for start in range(0, data.d_sae, chunk):
        columns = slice(start, min(start + chunk, data.d_sae))
        yield columns, data.dense[:, columns].double()


def mean_difference(data: ProbeData) -> torch.Tensor:
    """[C, d_sae] float64: mean activation on a concept's positive tokens minus on its negative tokens."""
    labels = data.labels.double()
    n_pos = labels.sum(0)  # [C]
    total = torch.zeros(data.d_sae, dtype=torch.float64)
    positive = torch.zeros(labels.shape[1], data.d_sae, dtype=torch.float64)
    if data.dense is not None:
        for columns, block in _dense_blocks(data):
            total[columns], positive[:, columns] = block.sum(0), labels.T @ block
    else:
        token, unit, value = data.entries
        unit, value = unit.long(), value.double()
        total.index_add_(0, unit, value)
        for c in range(labels.shape[1]):
            positive[c].index_add_(0, unit, value * labels[token, c])
    n_neg = data.n_tokens - n_pos
    return positive / n_pos.clamp_min(1)[:, None] - (total - positive) / n_neg.clamp_min(1)[:, None]


def _tie_bounds(sorted_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For values sorted along dim 0, the first and last index of each element's run of equal values."""
    n = sorted_values.shape[0]
    index = torch.arange(n).view(-1, *([1] * (sorted_values.dim() - 1))).expand_as(sorted_values)
    new = torch.ones_like(sorted_values, dtype=torch.bool)
    new[1:] = sorted_values[1:] != sorted_values[:-1]
    last = torch.ones_like(new)
    last[:-1] = new[1:]
    start = torch.cummax(torch.where(new, index, 0), dim=0).values
    end = torch.cummin(torch.where(last, index, n - 1).flip(0), dim=0).values.flip(0)
    return start, end


def _float16_order_keys(block: torch.Tensor) -> torch.Tensor:
    """float16 [n, w] -> int64 keys in [0, 65536) that order like the values (-0 and +0 equal)."""
    bits = block.contiguous().view(torch.int16).long()  # >= 0 for positive floats, increasing with the value
    magnitude = bits & 0x7FFF
    return torch.where(bits >= 0, bits, -magnitude) + 32768  # a negative value ranks below by its magnitude


def _dense_midranks(block: torch.Tensor) -> torch.Tensor:
    """float16 [n, w] -> float64 [n, w]: each value's 1-based rank in its column, ties sharing their mean rank.
    A float16 column has at most 65,536 distinct values: a counting sort (bincount, cumsum) ranks it exactly,
    many times faster than sorting 10^5 values per column."""
    n, width = block.shape
    keys = _float16_order_keys(block) + torch.arange(width) * 65536  # [n, w]: one key range per column
    counts = torch.bincount(keys.view(-1), minlength=width * 65536).view(width, 65536).double()
    cumulative = counts.cumsum(1)
    midrank = (cumulative - (counts - 1) / 2).view(-1)  # [w * 65536]
    return midrank[keys]


def _sparse_midranks(unit: torch.Tensor, value: torch.Tensor, n: int, d_sae: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ranks within each unit's n values, of which only the non-zero ones are given: (rank of each entry,
    [E]; rank of each unit's zeros, [d_sae]). Sorting (unit, value) with one zero item per unit weighted by
    its count of zeros puts every tie run in one group."""
    nonzero = torch.bincount(unit, minlength=d_sae)
    item_unit = torch.cat([unit, torch.arange(d_sae)])
    item_value = torch.cat([value.float(), torch.zeros(d_sae)])
    item_weight = torch.cat([torch.ones(len(unit), dtype=torch.float64), (n - nonzero).double()])
    bits = item_value.view(torch.int32).long()  # float32 bits: order-preserving once negatives are mirrored
    value_key = torch.where(bits >= 0, bits, -(bits & 0x7FFFFFFF)) + 2**31  # -0 and +0 equal
    order = torch.sort(item_unit * 2**32 + value_key).indices  # one int64 sort groups (unit, value) runs
    sorted_unit, sorted_value = item_unit[order], item_value[order]
    new_group = torch.ones(len(order), dtype=torch.bool)
    new_group[1:] = (sorted_unit[1:] != sorted_unit[:-1]) | (sorted_value[1:] != sorted_value[:-1])
    group = new_group.long().cumsum(0) - 1
    n_groups = int(group[-1]) + 1
    group_unit = torch.zeros(n_groups, dtype=torch.int64).index_copy_(0, group, sorted_unit)
    weight = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, group, item_weight[order])
    before = weight.cumsum(0) - weight  # items in earlier groups, the other units' included ...
    first = torch.ones(n_groups, dtype=torch.bool)
    first[1:] = group_unit[1:] != group_unit[:-1]
    before = before - before[torch.cummax(torch.where(first, torch.arange(n_groups), 0), 0).values]  # ... less theirs
    rank = before + (weight + 1) / 2
    item_rank = torch.empty(len(order), dtype=torch.float64)
    item_rank[order] = rank[group]
    return item_rank[: len(unit)], item_rank[len(unit):]


def exact_aurocs(data: ProbeData) -> torch.Tensor:
    """[C, d_sae] float64: every unit's AUROC for every concept from its exact values, ties counting one half:
    (sum of the positives' mean ranks - P(P + 1)/2) / (P N). NaN for a concept without positives or negatives."""
    labels = data.labels.double()
    n, n_concepts = labels.shape
    n_pos = labels.sum(0)  # [C]
    rank_sum = torch.zeros(n_concepts, data.d_sae, dtype=torch.float64)
    if data.dense is not None:
        for start in range(0, data.d_sae, 64):
            columns = slice(start, min(start + 64, data.d_sae))
            rank_sum[:, columns] = labels.T @ _dense_midranks(data.dense[:, columns])
    else:
        token, unit, value = data.entries
        unit = unit.long()
        entry_rank, zero_rank = _sparse_midranks(unit, value, n, data.d_sae)
        for c in range(n_concepts):
            on_positive = labels[token, c]
            positive_nonzero = torch.zeros(data.d_sae, dtype=torch.float64).index_add_(0, unit, on_positive)
            rank_sum[c] = (torch.zeros(data.d_sae, dtype=torch.float64).index_add_(0, unit, on_positive * entry_rank)
                           + (n_pos[c] - positive_nonzero) * zero_rank)
    pairs = n_pos * (n - n_pos)
    auroc = (rank_sum - (n_pos * (n_pos + 1) / 2)[:, None]) / pairs.clamp_min(1)[:, None]
    return torch.where((pairs > 0)[:, None], auroc, torch.full_like(auroc, float("nan")))


class Bootstrap:
    """Resamples of the report part's sequences, seeded: token weights = how often its sequence was drawn."""

    def __init__(self, seq: np.ndarray, resamples: int, seed: int, batch: int = 25):
        unique, token_seq = np.unique(seq, return_inverse=True)
        rng = np.random.default_rng([seed, 17])
        draws = rng.integers(0, len(unique), (resamples, len(unique)))
        counts = [np.bincount(d, minlength=len(unique)) for d in draws]
        self.counts = torch.from_numpy(np.stack(counts).astype(np.float32)) if resamples else torch.zeros(0, len(unique))
        self.token_seq = torch.from_numpy(token_seq.astype(np.int64))
        self.batch = batch

    @staticmethod
    def _weighted(weights: torch.Tensor, positive: torch.Tensor, below: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
        """AUROC under token weights [R, n] in ascending score order; below/end: per positive token, the index
        before its tie run (-1: none) and its run's last index. Ties count one half."""
        negative = weights * ~positive
        cumulative = torch.cat([torch.zeros(len(weights), 1, dtype=weights.dtype), negative.cumsum(1)], dim=1)  # [R, n + 1]
        under = cumulative[:, below + 1]  # negatives strictly below each positive
        tied = cumulative[:, end + 1] - under
        w_pos = weights[:, positive]
        wins = (w_pos * (under + 0.5 * tied)).sum(1, dtype=torch.float64)
        pairs = w_pos.sum(1, dtype=torch.float64) * negative.sum(1, dtype=torch.float64)
        return torch.where(pairs > 0, wins / pairs.clamp_min(1e-12), torch.full_like(wins, float("nan")))

    def auroc(self, scores: torch.Tensor, labels: torch.Tensor, interval: bool = True) -> dict[str, float]:
        """{"auroc", "ci_low", "ci_high"}: the exact AUROC and a 95 % percentile interval (NaN without resamples
        or when interval is False)."""
        values, order = torch.sort(scores)
        start, end = _tie_bounds(values)
        positive = labels[order]
        below, end = start[positive] - 1, end[positive]
        token_seq = self.token_seq[order]
        point = float(self._weighted(torch.ones(1, len(scores), dtype=torch.float64), positive, below, end)[0])  # exact
        # Resampled weights in float32: counts stay exact below 2^24; the sums' rounding is far below an interval's width.
        resampled = [self._weighted(self.counts[i : i + self.batch][:, token_seq], positive, below, end)
                     for i in range(0, len(self.counts) if interval else 0, self.batch)]
        resampled = torch.cat(resampled).numpy() if resampled else np.array([])
        resampled = resampled[np.isfinite(resampled)]
        low, high = np.percentile(resampled, [2.5, 97.5]) if len(resampled) else (np.nan, np.nan)
        return {"auroc": point, "ci_low": float(low), "ci_high": float(high)}


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-4, iterations: int = 25, tolerance: float = 1e-4):
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
        if step.abs().max() < tolerance:  # on standardised inputs: logits move by less than ~1e-3
            break
    return lambda x_new: torch.cat([((x_new - mean) / std).double(), torch.ones(len(x_new), 1, dtype=torch.float64)], dim=1) @ beta


def f1(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    true_pos = float((predicted & labels).sum())
    denominator = float(predicted.sum() + labels.sum())
    return 2 * true_pos / denominator if denominator else float("nan")


def _counts_above(data: ProbeData, thresholds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per threshold row of thresholds [T, d_sae] (>= 0) and unit, the tokens where the unit's activation exceeds
    it: all of them [T, d_sae] and those each concept labels [T, C, d_sae], float64 (exact float32 counts)."""
    n_concepts, n_thresholds = data.labels.shape[1], len(thresholds)
    above = torch.zeros(n_thresholds, data.d_sae, dtype=torch.float64)
    positive = torch.zeros(n_thresholds, n_concepts, data.d_sae, dtype=torch.float64)
    if data.dense is not None:
        labels = data.labels.float()
        for start in range(0, data.d_sae, 64):
            columns = slice(start, min(start + 64, data.d_sae))
            block = data.dense[:, columns].float()
            for t in range(n_thresholds):
                hit = (block > thresholds[t, columns]).float()
                above[t, columns], positive[t, :, columns] = hit.sum(0).double(), (labels.T @ hit).double()
        return above, positive
    labels = data.labels.double()
    token, unit, value = data.entries
    unit = unit.long()
    for t in range(n_thresholds):
        hit = value > thresholds[t, unit]
        token_hit, unit_hit = token[hit], unit[hit]
        above[t] = torch.bincount(unit_hit, minlength=data.d_sae).double()
        for c in range(n_concepts):
            positive[t, c].index_add_(0, unit_hit, labels[token_hit, c])
    return above, positive


def specificity(selection: ProbeData, report: ProbeData, thresholds: Sequence[float], scale: torch.Tensor,
                min_tokens: int) -> dict[float, dict[str, np.ndarray]]:
    """Per threshold tau and unit: the concept it is most specific to on the selection part (argmax of
    P(concept | activation > tau * scale)), and that concept's precision and recall on the report part.
    scale [d_sae]: each unit's maximum (label-free). Units with fewer than min_tokens report tokens above the
    threshold get NaN precision."""
    levels = torch.tensor(list(thresholds), dtype=torch.float32)[:, None] * scale.float()[None]  # [T, d_sae]
    selection_above, selection_positive = _counts_above(selection, levels)
    report_above, report_positive = _counts_above(report, levels)
    n_pos = report.labels.double().sum(0)  # [C]
    units = torch.arange(selection.d_sae)
    result = {}
    for t, tau in enumerate(thresholds):
        best = (selection_positive[t] / selection_above[t].clamp_min(1)).argmax(0)  # [d_sae]
        above, hits = report_above[t], report_positive[t][best, units]
        precision, recall = hits / above.clamp_min(1), hits / n_pos[best].clamp_min(1)
        counted = (above >= min_tokens) & (selection_above[t] > 0) & (scale > 0)
        result[tau] = {"concept": best.numpy(), "precision": torch.where(counted, precision, torch.nan).numpy(),
                       "recall": torch.where(counted, recall, torch.nan).numpy(), "report_tokens_above": above.numpy()}
    return result


def compare(selection: ProbeData, report: ProbeData, concept_names: Sequence[str], ks: Sequence[int],
            thresholds: Sequence[float], min_tokens: int, resamples: int, seed: int, log=lambda _: None) -> dict:
    """The held-out comparison for one dictionary: {"concepts": {name: {...}}, "specificity": {...}, "units": {...}}."""
    if len(np.intersect1d(selection.seq, report.seq)):
        raise ValueError("the selection and report parts share sequences: units would be scored where they were chosen")
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
                                **bootstrap.auroc(scores, y_report, interval=False)}
        probes = {}
        for k in ks:
            units = chosen[c, :k].tolist()
            columns = [column_of[u] for u in units]
            predict = fit_logistic(x_selection[:, columns], y_selection)
            logits = predict(x_report[:, columns])
            interval = k in (ks[0], ks[-1])  # the report shows these with intervals; resampling every k costs 3x
            probes[str(k)] = {"units": units, **bootstrap.auroc(logits, y_report, interval), "f1": f1(logits > 0, y_report)}
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
