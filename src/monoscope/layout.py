"""Where every output lives under the results directory: the one place that knows the layout.

The rules name their inputs and outputs through it, and so do the site, `monoscope serve` and the
benchmarks: rename an output here and every reader follows.

    corpus/                         <shard>.jsonl and manifest.json
    tokenizer/                      tokenizer_config.json and the tokenizer's files
    tokens/<shard>.zarr             packed token sequences
    model/                          model.json (and the native model's weights, or a pretrained one's cache)
    activations/<shard>.zarr        activation stores
    sae/<name>/                     sae.safetensors, cfg.json, train_log.jsonl; resume/ survives a killed job
    eval/<name>/                    metrics.json, features.parquet (per-unit statistics), codes.safetensors
    features/<name>/                units.parquet, examples.npz, weights.npz, summary.json
    autointerp/<name>/              explanations.jsonl, simulations.jsonl, scores.csv, usage.json
    autointerp/                     comparison.json and .png, ratings/ (for raters), ratings_key.csv
    report/                         index.html, summary.json, figures; browser/ the static browser
    logs/, benchmarks/              one per job
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    root: Path
    # Fixed places, derived from root.
    corpus: Path = field(init=False)
    tokenizer_dir: Path = field(init=False)
    tokenizer: Path = field(init=False)  # the file that stands for the tokenizer's folder in the DAG
    model_dir: Path = field(init=False)
    model_spec: Path = field(init=False)
    model_weights: Path = field(init=False)  # the native model's
    sae_root: Path = field(init=False)
    report_dir: Path = field(init=False)
    browser_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        root = Path(self.root)
        places = {"root": root, "corpus": root / "corpus", "tokenizer_dir": root / "tokenizer",
                  "tokenizer": root / "tokenizer" / "tokenizer_config.json", "model_dir": root / "model",
                  "model_spec": root / "model" / "model.json", "model_weights": root / "model" / "model.safetensors",
                  "sae_root": root / "sae", "report_dir": root / "report", "browser_dir": root / "report" / "browser"}
        for name, path in places.items():
            object.__setattr__(self, name, path)

    # --- per shard and per dictionary ---------------------------------------------------------------

    def token_shard(self, shard: str) -> Path:
        return self.root / "tokens" / f"{shard}.zarr"

    def activation_store(self, shard: str) -> Path:
        return self.root / "activations" / f"{shard}.zarr"

    def sae_dir(self, name: str) -> Path:
        return self.sae_root / name

    def sae_checkpoint(self, name: str) -> dict[str, Path]:
        """What training writes for SAE `name`, and what every later stage reads of it."""
        return {"weights": self.sae_dir(name) / "sae.safetensors", "cfg": self.sae_dir(name) / "cfg.json"}

    def sae_train_log(self, name: str) -> Path:
        return self.sae_dir(name) / "train_log.jsonl"

    def eval_dir(self, name: str) -> Path:
        return self.root / "eval" / name

    def eval_outputs(self, name: str) -> dict[str, Path]:
        return {
            "metrics": self.eval_dir(name) / "metrics.json",
            "features": self.eval_dir(name) / "features.parquet",  # per-unit statistics, computed once
            # The held-out tokens' active codes, so the features pass does not encode them again.
            "codes": self.eval_dir(name) / "codes.safetensors",
        }

    def features_dir(self, name: str) -> Path:
        return self.root / "features" / name

    def features_outputs(self, name: str) -> dict[str, Path]:
        return {key: self.features_dir(name) / file for key, file in
                (("units", "units.parquet"), ("examples", "examples.npz"), ("weights", "weights.npz"), ("summary", "summary.json"))}

    def autointerp_dir(self, name: str) -> Path:
        return self.root / "autointerp" / name

    def autointerp_outputs(self, name: str) -> dict[str, Path]:
        return {key: self.autointerp_dir(name) / file for key, file in
                (("explanations", "explanations.jsonl"), ("simulations", "simulations.jsonl"),
                 ("scores", "scores.csv"), ("usage", "usage.json"))}

    # --- across dictionaries ----------------------------------------------------------------------

    @property
    def autointerp_comparison(self) -> dict[str, Path]:
        top = self.root / "autointerp"
        return {"comparison": top / "comparison.json", "plot": top / "comparison.png",
                "sheet": top / "ratings" / "rating_sheet.csv", "form": top / "ratings" / "rating_sheet.html",
                "key": top / "ratings_key.csv"}  # the key lies outside ratings/, the folder handed to raters

    def log(self, job: str) -> Path:
        return self.root / "logs" / f"{job}.log"

    def benchmark(self, job: str) -> Path:
        return self.root / "benchmarks" / f"{job}.tsv"
