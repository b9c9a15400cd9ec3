"""How many of a dictionary's features stay live, under candidate training settings, side by side.

    python benchmarks/bench_capacity.py [--results results] [--configfile config/config.yaml] [--size 8]
                                        [--setting NAME='{"sae key": value, ...}' ...] [--only NAME ...]

Trains the --size dictionary of the config's sweep (its first L1 coefficient) on the training stores of a
finished run (results/activations/train_*.zarr), once per setting (overrides of the `sae` section), and
evaluates each exactly as the pipeline's evaluate job does (results/model, the held-out stores, the
config's `evaluate` section). Prints per setting: live, ultralow and dead fractions (density >= 1e-4 /
> 0 / never on every held-out density token), reconstruction score, L0 and training time. Without
--setting it runs the built-in candidates below: the table that justifies the default recipe.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from monoscope import evaluate
from monoscope.config import hook_name, sae_name, sae_runs, settings_from, validate_config
from monoscope.train import train_from_stores

REPO = Path(__file__).resolve().parents[1]

# Each candidate: overrides of the config's sae section for the benchmarked dictionary.
CANDIDATES = {
    "stop-13 default (L1 warm-up 0.05)": {"l1_warmup_fraction": 0.05},
    "resample every 100 to 60 %, near-dead < 1e-4": {
        "l1_warmup_fraction": 0.05, "resample_steps": list(range(100, 700, 100)), "resample_window": 100, "resample_max_density": 1e-4},
    "L1 warm-up 0.2": {"l1_warmup_fraction": 0.2},
    "L1 warm-up 0.5": {"l1_warmup_fraction": 0.5},
    "L1 warm-up 0.75 (default)": {"l1_warmup_fraction": 0.75},
    "L1 warm-up 0.75, L1 4.5": {"l1_warmup_fraction": 0.75, "l1_coefficient": 4.5},
    "topk k=16": {"architecture": "topk", "k": 16, "resample_steps": []},
    "batchtopk k=16": {"architecture": "batchtopk", "k": 16, "resample_steps": []},
}


def parse_setting(text: str) -> tuple[str, dict]:
    name, _, overrides = text.partition("=")
    if not overrides:
        raise SystemExit(f"--setting {text!r}: expected NAME='{{json overrides of sae}}'")
    return name, json.loads(overrides)


def run_setting(config: dict, size: int, overrides: dict, results: Path, work: Path) -> dict:
    l1 = config["sae"]["l1_coefficients"][0]
    name = sae_name(size, l1)
    base = sae_runs({**config, "sae": {**config["sae"], "expansion_factors": [size], "l1_coefficients": [l1]}})[name]
    run = {**base, **overrides}
    train_stores = sorted(str(p) for p in (results / "activations").glob("train_*.zarr"))
    eval_stores = sorted(str(p) for p in (results / "activations").glob("eval_*.zarr"))
    sae_dir = work / "sae" / name
    start = time.perf_counter()
    train_from_stores(train_stores, {name: run}, {name: sae_dir}, work / "resume", show_progress=False)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    metrics = evaluate.evaluate_dictionary(settings_from(evaluate.EvaluateSettings, config["evaluate"]), config["model"],
                                           results / "model", hook_name(config), name, sae_dir, eval_stores, work / "eval",
                                           log=lambda _: None)
    return {**metrics, "train_s": train_s, "evaluate_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=REPO / "results")
    parser.add_argument("--configfile", type=Path, default=REPO / "config" / "config.yaml")
    parser.add_argument("--size", type=int, default=8, help="expansion factor of the benchmarked dictionary")
    parser.add_argument("--setting", action="append", default=[], help="NAME='{json overrides of sae}'")
    parser.add_argument("--only", action="append", default=[], help="run only these built-in candidates")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = validate_config(yaml.safe_load(args.configfile.read_text()))
    settings = dict(parse_setting(s) for s in args.setting) if args.setting else dict(CANDIDATES)
    if args.only:
        settings = {k: v for k, v in settings.items() if k in args.only}
    header = f"{'setting':<44} {'live':>6} {'ultralow':>8} {'dead':>6} {'live n':>7} {'score':>6} {'L0':>6} {'train s':>8}"
    print(f"{args.size}x, L1 {config['sae']['l1_coefficients'][0]:g}, {config['sae']['train_tokens']:,} training tokens; "
          f"density on up to {config['evaluate']['density_tokens']:,} held-out tokens", flush=True)
    print(header, flush=True)
    rows = []
    for name, overrides in settings.items():
        with tempfile.TemporaryDirectory() as tmp:
            m = run_setting(config, args.size, overrides, args.results, Path(tmp))
        rows.append({"setting": name, "overrides": overrides, **{k: m[k] for k in (
            "live_fraction", "ultralow_fraction", "dead_fraction", "live_features", "reconstruction_score", "l0", "train_s")}})
        print(f"{name:<44} {m['live_fraction']:>6.1%} {m['ultralow_fraction']:>8.1%} {m['dead_fraction']:>6.1%} "
              f"{m['live_features']:>7,} {m['reconstruction_score']:>6.3f} {m['l0']:>6.1f} {m['train_s']:>8.0f}", flush=True)
    json.dump(rows, sys.stderr, indent=1)


if __name__ == "__main__":
    main()
