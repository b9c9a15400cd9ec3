"""Planning time of the Slurm profile at cluster scale: a dry run over 2,000 shards and 6 dictionary sizes.

    python benchmarks/bench_slurm_dryrun.py [--shards 2000] [--sizes 1 2 4 8 16 32] [--repeats 3]

Runs `snakemake -n --profile profiles/slurm` in an empty directory (so every job is planned and
printed, as a user sees it; output captured) and prints the wall time of each repeat, the median against the 10 s target, the number of jobs planned
and how many of them are tokenize and harvest batches. Needs no cluster: a dry run
submits nothing.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from monoscope.config import validate_config

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")
TARGET_S = 10.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=2000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    config["corpus"]["n_shards"] = args.shards
    config["sae"]["expansion_factors"] = args.sizes
    with tempfile.TemporaryDirectory() as tmp:
        configfile = Path(tmp) / "config.yaml"
        configfile.write_text(yaml.safe_dump(config))
        cmd = [str(SNAKEMAKE), "-n", "--profile", "profiles/slurm", "--configfile", str(configfile),
               "--directory", tmp]  # fmt: skip
        seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            seconds.append(time.perf_counter() - start)
            if result.returncode != 0:
                sys.exit(f"dry run failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")

    counts = {rule: int(n) for rule, n in re.findall(r"^(\w+)\s+(\d+)$", result.stdout, flags=re.M)}
    batch_jobs = sum(n for rule, n in counts.items() if rule.startswith(("tokenize_", "harvest_")))
    median = statistics.median(seconds)
    print(f"dry run, {args.shards} shards x {len(args.sizes)} dictionary sizes: "
          + ", ".join(f"{s:.2f}" for s in seconds) + " s")  # fmt: skip
    print(f"median {median:.2f} s (target <= {TARGET_S:.0f} s: {'met' if median <= TARGET_S else 'MISSED'})")
    print(f"jobs planned: {counts['total']} (sbatch submissions: {counts['total'] - counts.get('all', 0)}), of which "
          f"{batch_jobs} tokenize and harvest jobs of {validate_config(config)['corpus']['shards_per_job']} shards each")  # fmt: skip


if __name__ == "__main__":
    main()
