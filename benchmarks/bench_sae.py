"""SAE training throughput, side by side, on one machine in one run.

    python benchmarks/bench_sae.py [--store results/activations/train_000.zarr] [--expansion 8] [--batch 4096]
                                   [--sae results/sae/x8_l1-3.75]

Prints, for a relu SAE of the given shape on the same activations, fp32:
  1. the matrix-multiply roofline: tokens/s if a training step took only the time of its five
     GEMMs (encoder and decoder forward, decoder weight gradient, feature gradient, encoder
     weight gradient), each timed here with torch.mm on these shapes;
  2. monoscope's trainer step (tokens/s and fraction of the roofline; target >= 0.70);
  3. SAELens's SAETrainer step on the same batches (StandardTrainingSAE, same sizes, batch, dtype,
     threads), in a virtual environment of its own that this script builds once
     (monoscope.saelens_export.ensure_saelens_env); target: monoscope >= 2x;
  4. the streaming loader from a cold compressed store (a fresh copy, evicted from the page
     cache), against what the trainer consumes; target >= 3x.
Without a store it writes a synthetic float16 one (d_in 512) to a temporary directory.

Steps 2 and 3 are timed twice: from initialisation (tied encoder and decoder, zero biases: about half
the features fire, as in a run's first few hundred steps) and, with --sae, from that trained
checkpoint's weights (the sparse regime a run spends nearly all of its steps in: L0 ~ 10-30).
Both trainers get the same weights and the same batches, normalised by the checkpoint's constant.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from monoscope.loader import ActivationLoader
from monoscope.sae import load_sae
from monoscope.saelens_export import ensure_saelens_env
from monoscope.store import open_activations, write_activation_store
from monoscope.config import default_settings
from monoscope.train import TrainConfig, Trainer, norm_scale_for

SAELENS_STEP = r"""
import json, sys, time, torch
from sae_lens import SAETrainer, StandardTrainingSAE, StandardTrainingSAEConfig
from sae_lens.config import SAETrainerConfig
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
batches = torch.load(args["batches"])  # [n, B, d_in]
cfg = StandardTrainingSAEConfig(d_in=args["d_in"], d_sae=args["d_sae"], dtype="float32", device="cpu",
                                l1_coefficient=args["l1"], apply_b_dec_to_input=True)
sae = StandardTrainingSAE(cfg)
if args["weights"]:
    weights = torch.load(args["weights"])
    missing = set(weights) - set(sae.state_dict())
    assert not missing, f"SAELens has no parameters {missing}"
    with torch.no_grad():
        for name, value in weights.items():
            sae.state_dict()[name].copy_(value)
trainer_cfg = SAETrainerConfig(total_training_samples=10**9, train_batch_size_samples=batches.shape[1],
                               lr=1e-4, lr_end=1e-4, adam_beta2=0.99)
trainer = SAETrainer(trainer_cfg, sae, iter(()))
# SAETrainer's own step (forward, dead-feature tracking, backward, clipping, Adam, schedulers),
# timed as monoscope's is: best of `steps` after one warm-up step.
trainer._train_step(sae, batches[0])
times = []
for i in range(args["steps"]):
    start = time.perf_counter()
    trainer._train_step(sae, batches[i % len(batches)])
    times.append(time.perf_counter() - start)
print(json.dumps({"tokens_per_s": batches.shape[1] / min(times)}))
"""


def synthetic_store(directory: Path, d_in: int = 512, n_tokens: int = 1 << 19) -> Path:
    """Sparse non-negative activations shaped like an MLP's: mostly small, a few large."""
    rng = np.random.default_rng(0)
    acts = np.maximum(rng.normal(-0.5, 0.6, size=(n_tokens, d_in)), -0.17).astype(np.float16)
    path = directory / "synthetic.zarr"
    context = 128
    write_activation_store(path, acts, np.zeros((n_tokens // context, context), np.int32), {"model_id": "synthetic"},
                           chunk_tokens=4096, dtype="float16")  # fmt: skip
    return path


def gemm_roofline(batch: int, d_in: int, d_sae: int, repeats: int) -> float:
    """Seconds for the five GEMMs of one relu SAE training step, best of `repeats`."""
    x, g = torch.randn(batch, d_in), torch.randn(batch, d_in)
    f = torch.randn(batch, d_sae).relu()
    w_enc, w_dec = torch.randn(d_in, d_sae), torch.randn(d_sae, d_in)
    out_bs, out_bd, out_sd, out_ds = (torch.empty(batch, d_sae), torch.empty(batch, d_in),
                                      torch.empty(d_sae, d_in), torch.empty(d_in, d_sae))  # fmt: skip

    def step():
        torch.mm(x, w_enc, out=out_bs)  # encoder
        torch.mm(f, w_dec, out=out_bd)  # decoder
        torch.mm(f.T, g, out=out_sd)  # decoder weight gradient
        torch.mm(g, w_dec.T, out=out_bs)  # feature gradient
        torch.mm(x.T, f, out=out_ds)  # encoder weight gradient

    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return min(times)


def monoscope_step_time(batches: torch.Tensor, d_in: int, expansion: int, repeats: int, work: Path,
                        weights: dict[str, torch.Tensor] | None) -> tuple[float, float]:
    """(seconds per trainer step, L0 at the first step): a step is (gradients, parallel-component removal, fused Adam, renorm, firing stats), best of `repeats`.
    batches are already normalised: the trainer's input constant is 1."""
    batch = batches.shape[1]
    run = dataclasses.asdict(default_settings(TrainConfig, expansion_factor=expansion, batch_size=batch, train_tokens=batch * 1000,
                                              resample_steps=[], norm_sample_tokens=batch, loader_streams=1, l1_coefficient=5.0))
    trainer = Trainer({"bench": run}, d_in, lambda start: iter(batches[start:]), work / "resume", show_progress=False)
    sae = trainer.saes[0]
    sae.reset_parameters()
    if weights is not None:
        sae.load_state_dict(weights)
    sae.cfg.norm_scale = 1.0
    l0 = float((trainer._train_step(batches[0])[0]["f"] > 0).sum(-1).float().mean())
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        trainer._train_step(batches[i % len(batches)])
        times.append(time.perf_counter() - start)
    return min(times), l0


def saelens_tokens_per_s(batches: torch.Tensor, d_in: int, d_sae: int, steps: int, threads: int, work: Path,
                         weights: dict[str, torch.Tensor] | None) -> float:
    python = ensure_saelens_env()
    path, weights_path = work / "batches.pt", work / "weights.pt"
    torch.save(batches, path)
    if weights is not None:
        torch.save(weights, weights_path)
    args = {"batches": str(path), "d_in": d_in, "d_sae": d_sae, "l1": 5.0, "steps": steps, "threads": threads,
            "weights": str(weights_path) if weights is not None else None}  # fmt: skip
    result = subprocess.run([python, "-c", SAELENS_STEP, json.dumps(args)], check=True, capture_output=True, text=True,
                            env={**os.environ, "WANDB_MODE": "disabled", "TQDM_DISABLE": "1"})  # fmt: skip
    return json.loads(result.stdout.strip().splitlines()[-1])["tokens_per_s"]


def evict_from_page_cache(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            fd = os.open(file, os.O_RDONLY)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def loader_tokens_per_s(store: Path, batch: int, tokens: int, work: Path) -> float:
    cold = work / "cold.zarr"
    shutil.copytree(store, cold)
    evict_from_page_cache(cold)
    loader = ActivationLoader([cold], batch_size=batch, buffer_tokens=262_144, streams=8)
    batches = loader.batches()
    start = time.perf_counter()
    for _ in range(max(1, tokens // batch)):
        next(batches)
    seconds = time.perf_counter() - start
    batches.close()
    return max(1, tokens // batch) * batch / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, help="an activation store; default: a synthetic one")
    parser.add_argument("--expansion", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per trainer; the best one counts, for each contender")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--sae", type=Path, help="a trained checkpoint directory (e.g. results/sae/x8_l1-3.75): also time both from its weights")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench_sae_") as tmp:
        work = Path(tmp)
        store_path = args.store or synthetic_store(work)
        store = open_activations(store_path)
        d_in, d_sae, batch = store.d, store.d * args.expansion, args.batch
        n = min(8, store.n_tokens // batch)
        raw = torch.from_numpy(store.acts[: n * batch].astype(np.float32)).reshape(n, batch, d_in)
        states = {"initialisation": (None, raw * norm_scale_for(raw.flatten(0, 1)))}
        if args.sae:
            trained = load_sae(args.sae)
            if (trained.d_in, trained.d_sae) != (d_in, d_sae):
                sys.exit(f"--sae {args.sae} is {trained.d_in} x {trained.d_sae}, the benchmark {d_in} x {d_sae}")
            weights = {k: v for k, v in trained.state_dict().items() if k in ("W_enc", "W_dec", "b_enc", "b_dec")}
            states[f"trained ({args.sae.name})"] = (weights, raw * trained.cfg.norm_scale)

        roofline = batch / gemm_roofline(batch, d_in, d_sae, args.steps)
        rows = {}
        for label, (weights, batches) in states.items():
            seconds, l0 = monoscope_step_time(batches, d_in, args.expansion, args.steps, work, weights)
            ours = batch / seconds
            saelens = saelens_tokens_per_s(batches, d_in, d_sae, args.steps, args.threads, work, weights)
            rows[label] = (l0, ours, saelens)
        loader = loader_tokens_per_s(Path(store_path), batch, min(store.n_tokens, 40 * batch), work)

    flops = 10 * d_in * d_sae  # per token: five GEMMs of 2·d_in·d_sae
    print(f"relu SAE d_in={d_in} d_sae={d_sae} batch={batch} fp32, {args.threads} threads, store {store_path}")
    print(f"{'':34}{'tokens/s':>12}  ratio")
    print(f"{'GEMM roofline (5 GEMMs/step)':34}{roofline:12.0f}  {roofline * flops / 1e9:.1f} GFLOP/s")
    for label, (l0, ours, saelens) in rows.items():
        print(f"from {label}: L0 {l0:.0f} of {d_sae} at the first step")
        print(f"{'  monoscope trainer step':34}{ours:12.0f}  {ours / roofline:.2f} of roofline (target >= 0.70)")
        print(f"{'  SAELens SAETrainer':34}{saelens:12.0f}  monoscope / SAELens = {ours / saelens:.2f} (target >= 2)")
    fastest = max(row[1] for row in rows.values())
    print(f"{'loader, cold compressed store':34}{loader:12.0f}  loader / fastest trainer = {loader / fastest:.1f} (target >= 3)")


if __name__ == "__main__":
    sys.exit(main())
