"""Held-out features-versus-neurons measures: the split, exact AUROC, k-sparse probing, specificity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import rankdata

from monoscope import concept_comparison as cc


def rank_auroc(scores, labels):
    ranks = rankdata(scores)  # ties get the mean rank: they count one half
    n_pos = labels.sum()
    return (ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * (len(labels) - n_pos))


def sample_parts(f: torch.Tensor, labels: torch.Tensor, split: np.ndarray, block: int):
    sample = cc.ProbeSample(split, f.shape[-1], labels.shape[-1])
    for first in range(0, len(f), block):
        sample.add(first, f[first : first + block], labels[first : first + block])
    return sample.finish()


def test_split_is_seeded_disjoint_and_sized():
    split = cc.split_sequences(1000, 300, 0.5, seed=3)
    assert (split == cc.REPORT).sum() == 150 and (split == cc.SELECTION).sum() == 150
    assert np.array_equal(split, cc.split_sequences(1000, 300, 0.5, seed=3))
    assert not np.array_equal(split, cc.split_sequences(1000, 300, 0.5, seed=4))
    assert (cc.split_sequences(10, 300, 0.3, seed=0) != cc.OUTSIDE).all()  # a sample larger than the data: all of it
    with pytest.raises(ValueError, match="report_fraction"):
        cc.split_sequences(10, 5, 1.0, seed=0)


def test_the_parts_keep_their_own_sequences_whatever_the_block_size():
    rng = np.random.default_rng(0)
    f = torch.relu(torch.from_numpy(rng.normal(size=(40, 6, 10))).float() - 1)  # sparse: kept as entries
    labels = torch.from_numpy(rng.random((40, 6, 2)) < 0.3)
    split = cc.split_sequences(40, 30, 0.5, seed=0)
    selection, report = sample_parts(f, labels, split, block=7)
    assert selection.dense is None
    assert set(selection.seq) == set(np.flatnonzero(split == cc.SELECTION))
    assert set(report.seq) == set(np.flatnonzero(split == cc.REPORT))
    assert set(selection.seq).isdisjoint(report.seq)
    rows = np.flatnonzero(split == cc.REPORT)
    np.testing.assert_array_equal(report.columns(range(10)).numpy(), f[rows].reshape(-1, 10).numpy())
    again = sample_parts(f, labels, split, block=40)[1]
    np.testing.assert_array_equal(again.columns(range(10)).numpy(), report.columns(range(10)).numpy())
    with pytest.raises(ValueError, match="share sequences"):
        cc.compare(report, report, ["a", "b"], [1], [0.5], 1, 0, 0)


@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_exact_auroc_matches_rank_auroc_with_ties_and_negative_values(kind):
    rng = np.random.default_rng(1)
    n_seq, s, d = 30, 20, 40
    labels = torch.from_numpy(rng.random((n_seq, s, 3)) < [0.2, 0.05, 0.5])
    base = rng.normal(size=(n_seq, s, d)) + 1.5 * labels[..., :1].numpy()
    if kind == "sparse":
        base = np.where(base > 1.5, np.round(base, 1), 0.0)  # rounding makes ties among the non-zero values
    else:
        base = np.round(base, 1)  # negative values rank below the zeros
    f = torch.from_numpy(base).float()
    data = sample_parts(f, labels, np.zeros(n_seq, dtype=np.int8), block=8)[0]
    assert (data.dense is None) == (kind == "sparse")
    auroc = cc.exact_aurocs(data).numpy()
    flat, flat_labels = f.reshape(-1, d).numpy(), labels.reshape(-1, 3).numpy()
    expected = np.array([[rank_auroc(flat[:, u], flat_labels[:, c]) for u in range(d)] for c in range(3)])
    np.testing.assert_allclose(auroc, expected, rtol=1e-9, atol=1e-12)


def test_bootstrap_point_is_the_exact_auroc_and_inside_its_interval():
    rng = np.random.default_rng(2)
    seq = np.repeat(np.arange(50), 20)
    labels = torch.from_numpy(rng.random(1000) < 0.3)
    scores = torch.from_numpy(np.round(rng.normal(size=1000) + labels.numpy(), 1))
    result = cc.Bootstrap(seq, 200, seed=0).auroc(scores, labels)
    assert result["auroc"] == pytest.approx(rank_auroc(scores.numpy(), labels.numpy()), rel=1e-12)
    assert result["ci_low"] < result["auroc"] < result["ci_high"] and result["ci_high"] - result["ci_low"] < 0.2


def planted(seed: int = 0):
    """A concept carried by a direction spread evenly over 8 of 64 neurons, and by dictionary feature 0 alone."""
    rng = np.random.default_rng(seed)
    n_seq, s, d = 240, 50, 64
    y = rng.random((n_seq, s)) < 0.1
    direction = np.zeros(d)
    direction[:8] = 1 / np.sqrt(8)
    neurons = rng.normal(size=(n_seq, s, d)) + 3.0 * y[..., None] * direction
    others = rng.normal(size=(d, 127))
    others /= np.linalg.norm(others, axis=0)
    encoder = np.concatenate([direction[:, None], others], axis=1)  # [d, 128]
    features = np.maximum(neurons @ encoder - 1.5, 0)
    labels = torch.from_numpy(y[..., None])
    return torch.from_numpy(neurons).float(), torch.from_numpy(features).float(), labels


def test_planted_concept_is_found_by_the_feature_at_k1_and_by_neurons_only_at_larger_k():
    neurons, features_, labels = planted()
    split = cc.split_sequences(len(labels), len(labels), 0.5, seed=0)
    results = {}
    for name, f in (("neurons", neurons), ("features", features_)):
        selection, report = sample_parts(f, labels, split, block=64)
        results[name] = cc.compare(selection, report, ["planted"], [1, 2, 4, 8, 16], [0.5], 5, 50, 0)["concepts"]["planted"]
    feature, neuron = results["features"], results["neurons"]
    assert feature["sparse_probe"]["1"]["units"] == [0] and feature["single_unit"]["unit"] == 0
    assert feature["sparse_probe"]["1"]["auroc"] > 0.95
    assert neuron["sparse_probe"]["1"]["units"][0] < 8  # one of the carrying neurons, but alone it is weak
    assert neuron["sparse_probe"]["1"]["auroc"] < 0.85 and neuron["single_unit"]["auroc"] < 0.85
    assert neuron["sparse_probe"]["8"]["auroc"] > 0.95 and neuron["sparse_probe"]["16"]["auroc"] > 0.95
    assert neuron["sparse_probe"]["1"]["ci_high"] < feature["sparse_probe"]["1"]["ci_low"]
    assert feature["sparse_probe"]["16"]["f1"] > neuron["sparse_probe"]["1"]["f1"]


def test_specificity_of_a_unit_that_fires_only_on_its_concept():
    rng = np.random.default_rng(3)
    n_seq, s = 100, 20
    labels = torch.from_numpy(rng.random((n_seq, s, 2)) < 0.2)
    f = torch.zeros(n_seq, s, 3)
    f[..., 0] = labels[..., 1] * torch.rand(n_seq, s)  # fires only on concept 1: precision 1 at any threshold
    f[..., 1] = torch.rand(n_seq, s) * (torch.rand(n_seq, s) < 0.2)  # unrelated to either concept
    split = cc.split_sequences(n_seq, n_seq, 0.5, seed=0)
    selection, report = sample_parts(f, labels, split, block=16)
    spec = cc.specificity(selection, report, [0.0, 0.5], selection.max(), min_tokens=5)
    for tau in (0.0, 0.5):
        assert spec[tau]["concept"][0] == 1 and spec[tau]["precision"][0] == 1.0
        assert spec[tau]["precision"][1] < 0.5
        assert np.isnan(spec[tau]["precision"][2])  # never fires: not counted
    positives = report.labels[:, 1]
    fired = report.columns([0])[:, 0]
    assert spec[0.5]["recall"][0] == pytest.approx(float((fired[positives] > 0.5 * float(selection.max()[0])).float().mean()))


def test_the_report_sentence_counts_what_the_summaries_say():
    from monoscope import report

    def summary(aurocs: dict[str, tuple[float, float]]) -> dict:
        width = 0.01
        concepts = {c: {"positive_fraction": 0.1, "sparse_probe": {
            k: {"auroc": a, "ci_low": a - width, "ci_high": a + width} for k, a in zip(("1", "16"), values)}}
            for c, values in aurocs.items()}
        spec = {"0.5": {"units_counted": 10, "units_at_least_90_percent": 3}}
        return {"d_sae": 8, "concepts": concepts, "settings": {"probe_k": [1, 4, 16], "specificity_min_tokens": 10},
                "held_out": {"selection_seqs": 5, "report_seqs": 5, "report_tokens": 50, "specificity": spec}}

    neurons = summary({"a": (0.90, 0.95), "b": (0.70, 0.80), "c": (0.60, 0.99)})
    x8 = summary({"a": (0.80, 0.96), "b": (0.705, 0.90), "c": (0.95, 0.98)})
    sentence = report.comparison_sentence("x8", neurons, x8, ["1", "16"])
    assert sentence == ("x8: features beat neurons on 2 of 3 concepts at k = 1 (1 with the 95 % intervals apart; neurons "
                        "ahead with the intervals apart on 1), and on 2 of 3 concepts at k = 16 (1 with the 95 % intervals "
                        "apart; neurons ahead with the intervals apart on 0).")
    html_text = report.concept_section({"neurons": neurons, "x8": x8})
    assert sentence in html_text and "0.705 <span" in html_text and "3 / 10" in html_text
    assert report.concept_section({"x8": x8}) == ""  # nothing to compare with
