"""Held-out evaluation of a dictionary (an SAE, or the neurons as the identity dictionary)."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from monoscope import models, store
from monoscope.atomic import atomic_path, write_text
from monoscope.config import NEURONS
from monoscope.dictionary import open_dictionary
from monoscope.runtime import device


@dataclass(frozen=True)
class EvaluateSettings:
    """The `evaluate` config section; workflow/schemas/config.schema.yaml documents each key and holds its default."""

    SECTION: ClassVar[str] = "evaluate"

    max_seqs: int  # held-out sequences the losses, reconstruction score, MSE and FVU are measured on
    density_tokens: int  # held-out tokens the densities and L0 are measured on (the encoder alone)
    batch_size: int  # sequences per forward pass
    dense_log10_density: float  # dense: firing on more than 10^this of tokens
    live_log10_density: float  # live: firing on at least 10^this of tokens; fewer (but some) is ultralow


def reconstruction_score(clean_loss: float, recons_loss: float, zero_abl_loss: float) -> float:
    """(zero_abl - recons) / (zero_abl - clean): 1 = the reconstruction loses nothing, 0 = as bad as zeroing the layer."""
    if zero_abl_loss == clean_loss:
        raise ValueError("zero-ablation loss equals clean loss: the hooked layer does not affect the loss")
    return (zero_abl_loss - recons_loss) / (zero_abl_loss - clean_loss)


def density_bands(density: np.ndarray, live_threshold: float) -> dict[str, int]:
    """Count units per density band: dead (never fired), ultralow (fired, but on fewer than live_threshold
    of tokens: Towards Monosemanticity's ultralow-density cluster, a training artifact) and live. Capacity
    is the live count; a dead count alone misses the near-dead."""
    density = np.asarray(density)
    dead = int((density == 0).sum())
    live = int((density >= live_threshold).sum())
    return {"dead": dead, "ultralow": len(density) - dead - live, "live": live}


class FeatureStats:
    """Streaming per-feature firing counts, sums and maxima over [n, d_sae] activation batches; with
    keep_codes, also every token's active entries in order (CSR), which the features pass reuses
    instead of encoding the same held-out tokens again."""

    def __init__(self, d_sae: int, keep_codes: bool = False):
        self.d_sae = d_sae
        self.fires = torch.zeros(d_sae, dtype=torch.float64)
        self.total = torch.zeros(d_sae, dtype=torch.float64)
        self.max = torch.zeros(d_sae)
        self.n_tokens = 0
        self.l0_sum = 0.0
        self.keep_codes = keep_codes
        self._row_counts: list[torch.Tensor] = []
        self._units: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []

    def update(self, f: torch.Tensor) -> None:
        """f [n, d_sae]. Only the active entries are touched after one comparison: an SAE's are ~0.3 %
        of them, and dense reductions over [n, d_sae] cost as much as encoding did."""
        token, unit = (f > 0).nonzero(as_tuple=True)
        values = f[token, unit]
        self.fires.index_add_(0, unit, torch.ones_like(values, dtype=torch.float64))
        self.total.index_add_(0, unit, values.double())
        self.max.scatter_reduce_(0, unit, values, "amax")
        self.n_tokens += len(f)
        self.l0_sum += len(values)
        if self.keep_codes:  # nonzero() is row-major: entries are already in CSR order
            self._row_counts.append(torch.bincount(token, minlength=len(f)))
            self._units.append(unit.int())
            self._values.append(values.float())

    def save_codes(self, path: str | Path, context: int) -> None:
        """The kept codes as safetensors (indptr [n_tokens + 1], indices, values); with keep_codes off, an
        empty file that tells the features pass to encode for itself (the neurons need no encoding)."""
        from safetensors.torch import save_file

        counts = torch.cat(self._row_counts) if self._row_counts else torch.zeros(0, dtype=torch.int64)
        tensors = {
            "indptr": torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]),
            "indices": torch.cat(self._units) if self._units else torch.zeros(0, dtype=torch.int32),
            "values": torch.cat(self._values) if self._values else torch.zeros(0),
        }
        save_file(tensors, str(path), metadata={"n_seq": str(len(counts) // context), "context": str(context), "d_sae": str(self.d_sae)})

    def table(self) -> pd.DataFrame:
        density = (self.fires / self.n_tokens).numpy()
        with np.errstate(divide="ignore", invalid="ignore"):
            mean_when_active = np.where(self.fires > 0, (self.total / self.fires).numpy(), 0.0)
        return pd.DataFrame(
            {
                "feature": np.arange(len(density)),
                "density": density,
                "log10_density": np.log10(np.maximum(density, 1e-10)),
                "mean_activation": mean_when_active,
                "max_activation": self.max.numpy(),
            }
        )


@dataclass
class HeldOutTotals:
    """What the pass sums over the held-out sequences the losses are measured on."""

    d_in: int
    n_seq: int = 0
    n_tokens: int = 0
    sq_err: float = 0.0  # sum over tokens of |x - x_hat|^2
    act_sq_sum: float = 0.0  # sum over tokens of |x|^2
    losses: dict[str, float] = field(default_factory=lambda: {"clean": 0.0, "recons": 0.0, "zero_abl": 0.0})  # summed per sequence

    def __post_init__(self) -> None:
        self.act_sum = torch.zeros(self.d_in, dtype=torch.float64)

    @property
    def total_variance(self) -> float:
        """Sum over tokens of |x - mean|^2."""
        mean = self.act_sum / self.n_tokens
        return self.act_sq_sum - self.n_tokens * mean.pow(2).sum().item()

    def mean_losses(self) -> dict[str, float]:
        return {k: v / self.n_seq for k, v in self.losses.items()}


@torch.no_grad()
def held_out_pass(dictionary, bridge, hook: str, stores, settings: EvaluateSettings, name: str) -> tuple[FeatureStats, HeldOutTotals]:
    """One pass over the held-out stores: every token's codes into FeatureStats (up to density_tokens), and
    for the first max_seqs sequences the reconstruction errors and the clean, spliced and zero-ablated losses."""
    d_in = stores[0].d
    stats = FeatureStats(dictionary.d_sae, keep_codes=name != NEURONS)
    totals = HeldOutTotals(d_in)

    def reconstruct(act: torch.Tensor) -> torch.Tensor:
        return dictionary.decode(dictionary.encode(act.float())).to(act.dtype)

    # The losses need three forward passes of the model per block; feature densities only the encoder,
    # so they are measured on many more tokens: rare features are not miscounted as dead.
    loss_budget, density_budget = settings.max_seqs, settings.density_tokens
    blocks = itertools.chain.from_iterable(store.iter_sequence_blocks(s, settings.batch_size) for s in stores)
    progress = tqdm(total=loss_budget, desc=f"evaluate {name}", mininterval=10)
    for tokens, acts in blocks:
        if totals.n_seq >= loss_budget and stats.n_tokens >= density_budget:
            break
        x = torch.from_numpy(acts).flatten(0, 1).to(device())  # [b*s, d_in]
        f = dictionary.encode(x)  # [b*s, d_sae]
        stats.update(f.cpu())  # every token of the block, also past the loss budget
        if totals.n_seq >= loss_budget:
            continue
        n_loss_seqs = min(len(tokens), loss_budget - totals.n_seq)
        tokens = tokens[:n_loss_seqs]
        x, f = x[: n_loss_seqs * tokens.shape[1]], f[: n_loss_seqs * tokens.shape[1]]
        x_hat = dictionary.decode(f)
        totals.sq_err += (x - x_hat).pow(2).sum().item()
        totals.act_sum += x.sum(0, dtype=torch.float64).cpu()
        totals.act_sq_sum += x.double().pow(2).sum().item()
        batch = torch.from_numpy(tokens).long()
        totals.losses["clean"] += models.loss_with_hook(bridge, batch, hook, None).sum().item()
        totals.losses["recons"] += models.loss_with_hook(bridge, batch, hook, reconstruct).sum().item()
        totals.losses["zero_abl"] += models.loss_with_hook(bridge, batch, hook, torch.zeros_like).sum().item()
        totals.n_seq += len(tokens)
        totals.n_tokens += len(x)
        progress.update(len(tokens))
    progress.close()
    return stats, totals


def dictionary_metrics(name: str, dictionary, table: pd.DataFrame, stats: FeatureStats, totals: HeldOutTotals,
                       settings: EvaluateSettings) -> dict[str, Any]:
    """metrics.json: losses and reconstruction score, MSE, FVU, L0 and the density bands."""
    d_in = totals.d_in
    losses = totals.mean_losses()
    dense_threshold = 10 ** settings.dense_log10_density
    live_threshold = 10 ** settings.live_log10_density
    bands = density_bands(table["density"].to_numpy(), live_threshold)
    hyperparameters = {} if name == NEURONS else dictionary.cfg.hyperparameters
    return {
        "name": name,
        "d_in": d_in,
        "d_sae": dictionary.d_sae,
        "expansion_factor": dictionary.d_sae / d_in,
        "eval_sequences": totals.n_seq,
        "eval_tokens": totals.n_tokens,
        "density_tokens": stats.n_tokens,
        "clean_loss": losses["clean"],
        "recons_loss": losses["recons"],
        "zero_abl_loss": losses["zero_abl"],
        "reconstruction_score": reconstruction_score(losses["clean"], losses["recons"], losses["zero_abl"]),
        "mse": totals.sq_err / (totals.n_tokens * d_in),
        "fvu": totals.sq_err / totals.total_variance,
        "l0": stats.l0_sum / stats.n_tokens,
        "architecture": hyperparameters.get("architecture"),
        "l1_coefficient": hyperparameters.get("l1_coefficient"),
        "live_threshold": live_threshold,
        "density_bands": bands,
        "live_features": bands["live"],
        "live_fraction": bands["live"] / dictionary.d_sae,
        "ultralow_fraction": bands["ultralow"] / dictionary.d_sae,
        "dead_fraction": bands["dead"] / dictionary.d_sae,
        "dense_fraction": float((table["density"] > dense_threshold).mean()),
        "dense_threshold": dense_threshold,
    }


def evaluate_dictionary(
    settings: EvaluateSettings,
    model: dict[str, Any],
    model_dir: str | Path,
    hook: str,
    name: str,
    sae_dir: str | Path | None,
    eval_stores: list[str | Path],
    out_dir: str | Path,
    log=print,
) -> dict[str, Any]:
    """Write metrics.json, features.parquet and codes.safetensors for one dictionary on the held-out stores,
    with the model (the `model` config section, its outputs in model_dir) spliced at `hook`."""
    bridge = models.load_model(model, model_dir)
    stores = [store.open_activations(p) for p in eval_stores]
    dictionary = open_dictionary(name, sae_dir, stores[0].d, device())
    stats, totals = held_out_pass(dictionary, bridge, hook, stores, settings, name)
    table = stats.table()
    metrics = dictionary_metrics(name, dictionary, table, stats, totals, settings)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "features.parquet") as tmp:
        table.to_parquet(tmp, index=False)
    with atomic_path(out / "codes.safetensors") as tmp:
        stats.save_codes(tmp, stores[0].context)
    write_text(out / "metrics.json", json.dumps(metrics, indent=1))
    log(json.dumps(metrics))
    return metrics
