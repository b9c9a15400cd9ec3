import numpy as np
import pytest
import torch

from monoscope import evaluate
from monoscope.evaluate import FeatureStats, reconstruction_score


def test_reconstruction_score_hand_made_case():
    # clean 2.0, zero-ablated 6.0: a spliced loss of 3.0 recovers 3/4 of the layer's effect
    assert reconstruction_score(clean_loss=2.0, recons_loss=3.0, zero_abl_loss=6.0) == pytest.approx(0.75)
    assert reconstruction_score(2.0, 2.0, 6.0) == pytest.approx(1.0)
    assert reconstruction_score(2.0, 6.0, 6.0) == pytest.approx(0.0)
    assert reconstruction_score(2.0, 7.0, 6.0) < 0  # worse than ablating the layer


def test_reconstruction_score_rejects_a_layer_without_effect():
    with pytest.raises(ValueError, match="does not affect"):
        reconstruction_score(2.0, 2.0, 2.0)


def test_feature_stats():
    stats = FeatureStats(3)
    stats.update(torch.tensor([[1.0, 0.0, 0.0], [3.0, 2.0, 0.0]]))
    stats.update(torch.tensor([[0.0, 0.0, 0.0], [1.0, -0.5, 0.0]]))
    table = stats.table()
    np.testing.assert_allclose(table["density"], [0.75, 0.25, 0.0])
    np.testing.assert_allclose(table["mean_activation"], [5 / 3, 2.0, 0.0])
    np.testing.assert_allclose(table["max_activation"], [3.0, 2.0, 0.0])
    assert stats.l0_sum / stats.n_tokens == pytest.approx(1.0)


def test_density_bands_partition_units_at_the_live_threshold():
    density = np.array([0.0, 0.0, 1e-6, 9.99e-5, 1e-4, 0.2])
    assert evaluate.density_bands(density, live_threshold=1e-4) == {"dead": 2, "ultralow": 2, "live": 2}
    assert evaluate.density_bands(density, live_threshold=1e-6) == {"dead": 2, "ultralow": 0, "live": 4}
