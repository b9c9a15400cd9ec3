"""Concept probes: regex labels on tokens, and AUROC from histograms against an exact computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import rankdata

from monoscope.probes import DEFAULT_CONCEPTS, ConceptLabeler, auroc_from_histograms, compile_concepts

STRINGS = ["def", " add", "(", "x", "):", "\n", "    ", "return", " x", " +", " 1", "  ", "# one", " more", "\n", "'s", "'"]


def labels_for(names, token_ids):
    labeler = ConceptLabeler([c for c in compile_concepts(DEFAULT_CONCEPTS) if c.name in names], STRINGS)
    return labeler(np.array([token_ids]))[0], labeler.names


def test_tokens_overlapping_a_match_are_labelled():
    tokens = list(range(16))
    labels, names = labels_for({"def_name", "number", "comment"}, tokens)
    column = {name: labels[:, i] for i, name in enumerate(names)}
    assert np.flatnonzero(column["def_name"]).tolist() == [1]  # " add": its space is outside, its name inside
    assert np.flatnonzero(column["number"]).tolist() == [10]
    assert np.flatnonzero(column["comment"]).tolist() == [12, 13]  # the comment runs to the newline


def test_string_literal_spans_tokens():
    labels, names = labels_for({"string_literal"}, [3, 15, 3, 16])  # x 's x '
    assert labels[:, 0].tolist() == [False, True, True, True]


def test_default_concepts_compile_and_bad_ones_are_named():
    assert len(compile_concepts(DEFAULT_CONCEPTS)) == len(DEFAULT_CONCEPTS)
    with pytest.raises(ValueError, match=r"concepts\[1\].*twice"):
        compile_concepts([{"name": "a", "pattern": "x"}, {"name": "a", "pattern": "y"}])
    with pytest.raises(ValueError, match="pattern"):
        compile_concepts([{"name": "a"}])


def exact_auroc(scores, labels):
    ranks = rankdata(scores)  # ties get the mean rank: they count one half
    n_pos = labels.sum()
    return (ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * (len(labels) - n_pos))


def test_auroc_from_histograms_matches_rank_auroc_on_binned_values():
    rng = np.random.default_rng(0)
    n, bins = 5000, 12
    labels = rng.random(n) < 0.2
    units = [rng.integers(0, bins, n),  # unrelated to the label
             np.where(labels, rng.integers(6, bins, n), rng.integers(0, 8, n)),  # mostly separates
             np.where(labels, 0, rng.integers(1, bins, n))]  # anti-correlated
    positives = torch.tensor(np.array([[np.bincount(u[labels], minlength=bins) for u in units]]))  # [1, U, B]
    totals = torch.tensor(np.array([np.bincount(u, minlength=bins) for u in units]))
    auroc = auroc_from_histograms(positives, totals, torch.tensor([labels.sum()]), n)[0].numpy()
    expected = [exact_auroc(u, labels) for u in units]
    np.testing.assert_allclose(auroc, expected, rtol=1e-9)
    assert abs(auroc[0] - 0.5) < 0.05 and auroc[1] > 0.85 and auroc[2] < 0.05


def test_auroc_is_nan_without_positives():
    totals = torch.tensor([[5, 5]])
    auroc = auroc_from_histograms(torch.zeros(1, 1, 2, dtype=torch.int64), totals, torch.tensor([0]), 10)
    assert torch.isnan(auroc).all()


def test_docstrings_are_triple_quoted_strings_opening_a_line():
    strings = ["def f():\n", '    """', "Doc.", '"""', "\n", "    x = ", '"""', "no", '"""', "\n"]
    labeler = ConceptLabeler([c for c in compile_concepts(DEFAULT_CONCEPTS) if c.name == "docstring"], strings)
    assert np.flatnonzero(labeler(np.array([list(range(10))]))[0, :, 0]).tolist() == [1, 2, 3]
