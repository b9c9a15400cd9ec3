"""Harvest throughput for SmolLM2-135M at an early and a late layer: run_to_hook must skip the rest.

    python benchmarks/bench_harvest_layers.py [--layers 3 29] [--batch 16] [--context 128] [--repeats 5]

Prints tokens/s per layer (median of interleaved repeats, so load from other processes hits every
layer alike), the measured speed ratio, and the ratio expected if cost were proportional to the
blocks run (block L's MLP activation needs blocks 0..L-1 plus block L's attention and MLP input).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import yaml

from monoscope.pretrained import load_pretrained, run_to_hook

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs=2, default=[3, 29])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cache-dir", default=str(ROOT / "results" / "model"), help="where the dequantised GGUF is kept")
    args = parser.parse_args()

    model_cfg = yaml.safe_load((ROOT / "config" / "smollm2.yaml").read_text())["model"]
    start = time.perf_counter()
    bridge, _ = load_pretrained(model_cfg, args.cache_dir)
    print(f"load: {time.perf_counter() - start:.1f} s ({bridge.cfg.n_layers} layers, d_mlp {bridge.cfg.d_mlp}, "
          f"{torch.get_num_threads()} threads)")

    tokens = torch.randint(0, bridge.cfg.d_vocab, (args.batch, args.context), generator=torch.Generator().manual_seed(0))
    n_tokens = tokens.numel()
    hooks = {layer: f"blocks.{layer}.mlp.hook_post" for layer in args.layers}
    for hook in hooks.values():  # warm-up
        run_to_hook(bridge, tokens, hook)
    seconds = {layer: [] for layer in args.layers}
    full = []
    for _ in range(args.repeats):
        for layer, hook in hooks.items():
            t = time.perf_counter()
            run_to_hook(bridge, tokens, hook)
            seconds[layer].append(time.perf_counter() - t)
        t = time.perf_counter()
        with torch.no_grad():
            bridge(tokens, return_type=None)
        full.append(time.perf_counter() - t)

    speed = {layer: n_tokens / statistics.median(s) for layer, s in seconds.items()}
    early, late = args.layers
    for layer in args.layers:
        print(f"layer {layer:>2}: {speed[layer]:8.0f} tokens/s")
    print(f"full forward (all layers + unembedding): {n_tokens / statistics.median(full):8.0f} tokens/s")
    print(f"speed ratio layer {early} / layer {late}: {speed[early] / speed[late]:.1f} "
          f"(blocks run: {late + 1} vs {early + 1}, ratio {(late + 1) / (early + 1):.1f})")


if __name__ == "__main__":
    main()
