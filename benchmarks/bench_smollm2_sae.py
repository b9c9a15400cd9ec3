"""A real pretrained result: SAEs on a middle layer of SmolLM2-135M (the offline GGUF), through the pipeline.

    python benchmarks/bench_smollm2_sae.py [--layer 15] [--architecture topk] [--k 48] [--expansion 2]
                                            [--l1 3] [--lr 0.003] [--train-tokens 300000]
                                            [--seqs-per-shard 256] [--eval-seqs 64] [--workdir /tmp/bench-smollm2]

Runs `snakemake --configfile config/smollm2.yaml` with the overrides above (corpus to report and
browser; several expansion factors or L1 coefficients are trained jointly from one pass), then
prints the CPU and wall time of every job, and per dictionary the reconstruction score (CE loss
recovered when the reconstruction is spliced in, on --eval-seqs held-out sequences of 128 tokens),
L0, live fraction (density >= 1e-4 on the held-out shard), dead fraction, FVU, and the concept
probes: the best feature's AUROC against the best neuron's per concept. A second run in the same
workdir with other SAE settings reuses the model and the harvest (its shared jobs are counted once).
For scale: dictionary_learning's Pythia-70M MLP SAEs recover 88-99 % of the CE loss at L0 5-160,
trained on hundreds of millions of tokens.
The default (TopK k=48, 2x, 300k tokens = 3 epochs of the 98k harvested) takes about 27 CPU-minutes
from scratch on 2 cores: 7 in the harvest, 7 in the SAE, 9 in the 30-layer loss passes (neurons and SAE).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

from monoscope.config import NEURONS, sae_name

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")


def overrides(args) -> dict:
    sae = {"architecture": args.architecture, "k": args.k, "expansion_factors": args.expansion,
           "l1_coefficients": args.l1, "train_tokens": args.train_tokens, "lr": args.lr,
           "train_jointly": len(args.expansion) * len(args.l1) > 1}
    if args.architecture == "relu":
        # A few hundred steps instead of the paper's 10^5: resampling steps that fall inside the run, and
        # the default config's long L1 warm-up, which keeps features live in a short run.
        sae |= {"l1_warmup_fraction": 0.75, "resample_steps": [100, 200], "resample_window": 80,
                "resample_inputs": 32768}
    else:
        # k fixes L0 and AuxK revives dead latents: no resampling.
        sae |= {"resample_steps": []}
    return {
        "model": {"layer": args.layer},
        # 3 training shards and 1 held-out shard of args.seqs_per_shard sequences of 128 tokens (~8 bytes a token).
        "corpus": {"max_bytes": 4 * args.seqs_per_shard * 128 * 10, "n_shards": 4, "n_eval_shards": 1},
        "harvest": {"max_seqs_per_shard": args.seqs_per_shard},
        "sae": sae,
        "evaluate": {"max_seqs": args.eval_seqs},
        "features": {"ablation_top": 2, "ablation_seqs": 2},
        "report": {"title": f"monoscope - SmolLM2-135M-Instruct layer {args.layer} MLP (benchmark)"},
    }


def dictionary_names(args) -> list[str]:
    return [sae_name(e, l1) for e in args.expansion for l1 in args.l1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", type=int, default=15, help="of 30")
    parser.add_argument("--architecture", choices=["relu", "topk", "batchtopk", "jumprelu"], default="topk")
    parser.add_argument("--k", type=int, default=48, help="topk/batchtopk: active features per token")
    parser.add_argument("--expansion", type=int, nargs="+", default=[2], help="several: trained jointly")
    parser.add_argument("--l1", type=float, nargs="+", default=[3.0], help="relu/jumprelu sparsity; ignored by topk")
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--train-tokens", type=int, default=300_000)
    parser.add_argument("--seqs-per-shard", type=int, default=256)
    parser.add_argument("--eval-seqs", type=int, default=64, help="held-out sequences of the loss passes")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-smollm2"))
    parser.add_argument("--report-only", action="store_true", help="print the numbers of a finished run")
    args = parser.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    config = args.workdir / "bench.yaml"
    config.write_text(yaml.safe_dump(overrides(args)))
    if not args.report_only:
        start, cpu_start = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        cmd = [str(SNAKEMAKE), "-s", str(ROOT / "Snakefile"), "--directory", str(args.workdir), "--cores", "2",
               "--configfile", str(ROOT / "config" / "smollm2.yaml"), str(config)]
        subprocess.run(cmd, check=True, cwd=ROOT)
        cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_s = cpu.ru_utime + cpu.ru_stime - cpu_start.ru_utime - cpu_start.ru_stime
        # Only the jobs this invocation ran: a rerun in the same workdir reuses the model and the harvest.
        print(f"pipeline wall {(time.perf_counter() - start) / 60:.1f} min, cpu {cpu_s / 60:.1f} min")
    results = args.workdir / "results"
    names = dictionary_names(args)
    # Per job, from Snakemake's benchmark files: a job named after a dictionary is that dictionary's own,
    # the rest (model, harvest, the neurons, the site) is shared by every dictionary of the workdir.
    shared, own = [0.0, 0.0], {name: [0.0, 0.0] for name in names}
    for bench in sorted((results / "benchmarks").rglob("*.tsv")):
        job = bench.relative_to(results / "benchmarks").with_suffix("")
        table = pd.read_csv(bench, sep="\t")
        wall, cpu = table["s"].sum(), table["cpu_time"].sum()
        print(f"job {job} wall {wall:.0f} s cpu {cpu:.0f} s")
        if job.parent.name and job.name in own:
            own[job.name][0] += wall
            own[job.name][1] += cpu
        elif not (job.parent.name and job.name.startswith("x")):  # another workdir run's dictionary
            shared[0] += wall
            shared[1] += cpu
    for name in names:
        print(f"jobs of {name} with the shared ones: wall {(shared[0] + own[name][0]) / 60:.1f} min,"
              f" cpu {(shared[1] + own[name][1]) / 60:.1f} min")

    neurons = json.loads((results / "features" / "neurons" / "summary.json").read_text())["concepts"]
    print(f"settings: {args.architecture}" + (f" k={args.k}" if args.architecture in ("topk", "batchtopk") else "")
          + f", lr {args.lr:g}, {args.train_tokens} training tokens, layer {args.layer}")
    print("dictionary d_sae reconstruction_score l0 live_fraction dead_fraction fvu loss_tokens density_tokens")
    for name in [NEURONS] + names:
        metrics = json.loads((results / "eval" / name / "metrics.json").read_text())
        print(f"{name} {metrics['d_sae']} {metrics['reconstruction_score']:.3f} {metrics['l0']:.1f} "
              f"{metrics['live_fraction']:.3f} {metrics['dead_fraction']:.3f} {metrics['fvu']:.3f} "
              f"{metrics['eval_tokens']} {metrics['density_tokens']}")
    for name in names:
        concepts = json.loads((results / "features" / name / "summary.json").read_text())["concepts"]
        print(f"concept best-feature-AUROC best-neuron-AUROC ({name})")
        for concept, best in concepts.items():
            print(f"  {concept} {best['best_auroc']:.3f} {neurons[concept]['best_auroc']:.3f}")


if __name__ == "__main__":
    main()
