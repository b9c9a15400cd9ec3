"""A dictionary, as every stage after training sees it: an SAE checkpoint, or the neurons (the identity
dictionary, the MLP's own basis, for comparison). `open_dictionary` loads either; `encode` and `decode`
are the module's; `read_unit_stats` reads the per-unit statistics the evaluation computes once per
dictionary (monoscope.evaluate.FeatureStats), which the features pass, autointerp and the browser read.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from torch import nn

from monoscope import sae
from monoscope.config import NEURONS

UNIT_STAT_COLUMNS = ("density", "log10_density", "mean_activation", "max_activation")


class IdentityDictionary(nn.Module):
    """The neurons as a dictionary: features are the activations themselves."""

    def __init__(self, d: int):
        super().__init__()
        self.d_in = self.d_sae = d

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def open_dictionary(name: str, sae_dir: str | Path | None, d_in: int, device: str | torch.device = "cpu") -> nn.Module:
    """The dictionary `name` in eval mode: the neurons (width d_in, the hooked activation's), or the SAE in sae_dir."""
    if name == NEURONS:
        return IdentityDictionary(d_in).to(device)
    return sae.load_sae(sae_dir, device)


def read_unit_stats(path: str | Path) -> pd.DataFrame:
    """The evaluation's per-unit table (results/eval/<name>/features.parquet): feature, then UNIT_STAT_COLUMNS."""
    table = pd.read_parquet(path)
    missing = [c for c in ("feature", *UNIT_STAT_COLUMNS) if c not in table]
    if missing:
        raise ValueError(f"{path} lacks the per-unit column(s) {', '.join(missing)}: rerun the evaluation")
    return table
