import pandas as pd
import pytest
import torch

from monoscope.dictionary import IdentityDictionary, open_dictionary, read_unit_stats


def test_the_neurons_are_the_identity_dictionary():
    neurons = open_dictionary("neurons", None, 12)
    assert isinstance(neurons, IdentityDictionary)
    x = torch.randn(2, 3, 12)
    assert neurons.d_in == neurons.d_sae == 12
    assert torch.equal(neurons.encode(x), x) and torch.equal(neurons.decode(x), x)


def test_an_sae_without_its_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="sae.safetensors"):
        open_dictionary("x8_l1-3.75", tmp_path, 12)


def test_unit_stats_without_their_columns_say_to_rerun_the_evaluation(tmp_path):
    pd.DataFrame({"feature": [0, 1], "density": [0.1, 0.0]}).to_parquet(tmp_path / "features.parquet")
    with pytest.raises(ValueError, match="mean_activation.*rerun the evaluation"):
        read_unit_stats(tmp_path / "features.parquet")
