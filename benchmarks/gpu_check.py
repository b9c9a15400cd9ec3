"""GPU check: does the I/O keep a GPU busy? One run, numbers side by side.

    python benchmarks/gpu_check.py [--seqs 4096] [--expansion 8] [--batch 4096] [--steps 20]

On a machine with CUDA everything below runs on the GPU; without, the same code runs on the CPU
(a few minutes at the defaults; tests/test_io_bench.py runs it with a tiny budget so it keeps working).
It builds the default config's native LM (d_model 128, 512 GELU neurons; random weights: speed does
not depend on them) and random token sequences, then prints:
  1. harvest: tokens/s of the bare forward pass and of harvest_shard (forward + store writer), and
     what the writer adds;
  2. SAE training tokens/s of one Trainer step (gradients, Adam, decoder renorm, firing stats) on
     device, fp32 and bf16 (the SAE's weights and batches in bfloat16), in the dense regime (from
     initialisation: about half the features fire) and the sparse one (encoder bias lowered until
     L0 ~ 1 % of the features, as in most of a run; on the CPU this takes the CSR path);
  3. the loader's tokens/s from the harvested store (float32 batches, and float16 batches to be
     converted on the device), against the fastest trainer step: target >= 1 (the loader keeps up).
"""

from __future__ import annotations

import argparse
import dataclasses
import copy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from monoscope import models, store
from monoscope.config import default_settings, hook_name, settings_from, validate_config
from monoscope.harvest import HarvestSettings, harvest_shard
from monoscope.loader import ActivationLoader
from monoscope.pretrained import run_to_hook
from monoscope.runtime import device
from monoscope.train import TrainConfig, Trainer

REPO = Path(__file__).resolve().parents[1]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def harvest(config, work: Path, n_seqs: int) -> tuple[float, float, Path]:
    """(bare forward tokens/s, harvest tokens/s, the store written)."""
    native, context, vocab = config["model"]["native"], config["tokenizer"]["context"], config["tokenizer"]["vocab_size"]
    bridge = models.boot_native(native, vocab, context, config["seed"])
    models.save_native(bridge, native, vocab, context, config["seed"], work / "model", {})
    bridge = models.load_native(work / "model")
    tokens = np.random.default_rng(0).integers(0, vocab, (n_seqs, context), dtype=np.int32)
    store.write_token_shard(work / "tokens.zarr", tokens, {"tokenizer_id": "random"})
    hook, batch = hook_name(config), config["harvest"]["batch_size"]
    with torch.no_grad():
        run_to_hook(bridge, torch.from_numpy(tokens[:batch]).long(), hook)  # warm-up (CUDA context, kernels)
        sync()
        start = time.perf_counter()
        for first in range(0, n_seqs, batch):
            run_to_hook(bridge, torch.from_numpy(tokens[first : first + batch]).long(), hook).cpu()
        sync()
        bare = tokens.size / (time.perf_counter() - start)
    summary = harvest_shard(settings_from(HarvestSettings, config["harvest"]), bridge, "gpu-check", hook, work / "tokens.zarr",
                            work / "acts.zarr", log=lambda _: None)
    return bare, summary["tokens"] / summary["total_s"], work / "acts.zarr"


def trainer_rate(x: torch.Tensor, expansion: int, steps: int, dtype: torch.dtype, sparse: bool, work: Path) -> tuple[float, float]:
    """(tokens/s of a Trainer step, L0) on the device, median of `steps` timed steps."""
    batch, d_in = x.shape
    run = dataclasses.asdict(default_settings(TrainConfig, expansion_factor=expansion, batch_size=batch, train_tokens=batch * 1000,
                                              resample_steps=[], norm_sample_tokens=batch, loader_streams=1, l1_coefficient=5.0))
    trainer = Trainer({"check": run}, d_in, lambda start: iter(()), work / f"resume-{dtype}-{sparse}", show_progress=False)
    sae = trainer.saes[0].to(dtype)  # in place: the optimiser keeps the same parameters
    sae.cfg.norm_scale = 1.0
    x = x.to(trainer.device, dtype)
    if sparse:  # lower every encoder bias until about 1 % of the features fire on this batch
        with torch.no_grad():
            pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc  # [B, d_sae]
            sae.b_enc -= torch.quantile(pre.float().flatten()[:: max(1, pre.numel() // 2**20)], 0.99).to(dtype)
    l0 = float((trainer._train_step(x)[0]["f"] > 0).sum(-1).float().mean())
    times = []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        trainer._train_step(x)
        sync()
        times.append(time.perf_counter() - start)
    return batch / float(np.median(times)), l0


def loader_rate(path: Path, batch: int, n_batches: int, dtype) -> float:
    loader = ActivationLoader([path], batch_size=batch, buffer_tokens=min(262_144, store.open_activations(path).n_tokens), streams=1, dtype=dtype,
                              pin_memory=torch.cuda.is_available())  # fmt: skip
    batches = loader.batches()
    next(batches)  # the start-up read
    sync()
    start = time.perf_counter()
    for _ in range(n_batches):
        next(batches).to(device(), non_blocking=True).float()
    sync()
    seconds = time.perf_counter() - start
    batches.close()
    return n_batches * batch / seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "config" / "config.yaml")
    parser.add_argument("--seqs", type=int, default=4096, help="sequences harvested (of the config's context)")
    parser.add_argument("--expansion", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4096, help="SAE and loader batch (tokens)")
    parser.add_argument("--steps", type=int, default=20, help="timed trainer steps per configuration")
    parser.add_argument("--loader-batches", type=int, default=50)
    args = parser.parse_args(argv)
    config = validate_config(yaml.safe_load(args.config.read_text()))
    config = copy.deepcopy(config)
    on = device()
    name = torch.cuda.get_device_name() if on == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"[device] {on}: {name}; torch {torch.__version__}")

    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        bare, harvested, acts = harvest(config, work, args.seqs)
        print(f"[harvest] {args.seqs * config['tokenizer']['context']:,} tokens: bare forward {bare:,.0f} tokens/s, "
              f"harvest_shard {harvested:,.0f} tokens/s -> the store adds {100 * (bare / harvested - 1):.0f} %")  # fmt: skip
        written = store.open_activations(acts)
        batch = min(args.batch, written.n_tokens)
        x = torch.from_numpy(written.acts[:batch].astype(np.float32))
        x *= (written.d / x.pow(2).sum(-1).mean()).sqrt()  # E|x|^2 = d_in, as the trainer normalises
        fastest = 0.0
        for dtype in (torch.float32, torch.bfloat16):
            for sparse in (False, True):
                label = f"{str(dtype).removeprefix('torch.')} {'sparse' if sparse else 'dense'}"
                try:
                    rate, l0 = trainer_rate(x, args.expansion, args.steps, dtype, sparse, work)
                except (RuntimeError, NotImplementedError) as error:  # e.g. a bf16 kernel the CPU lacks
                    print(f"[sae] {label:15} not supported here: {str(error).splitlines()[0]}")
                    continue
                fastest = max(fastest, rate)
                print(f"[sae] {label:15} {written.d} x {written.d * args.expansion}, batch {batch}: {rate:12,.0f} tokens/s (L0 {l0:.0f})")
        n = max(1, min(args.loader_batches, written.n_tokens // batch))
        for label, dtype in (("float32 batches", torch.float32), ("float16 batches", None)):
            rate = loader_rate(acts, batch, n, dtype)
            print(f"[loader] {label}, to {on}: {rate:12,.0f} tokens/s = {rate / fastest:.1f} x the fastest trainer step (target >= 1)")


if __name__ == "__main__":
    sys.exit(main())
