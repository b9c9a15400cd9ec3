"""Train one SAE (or a jointly trained group) from the training activation stores.

A command-line script rather than a Snakemake `script:` so that the rule can run it under
`accelerate launch` with one process per GPU.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from monoscope.train import train_from_stores

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("stores", nargs="+", help="activation stores (results/activations/<shard>.zarr)")
parser.add_argument("--runs", required=True, help="JSON: SAE name -> its resolved sae.* hyper-parameters")
parser.add_argument("--out-root", required=True, help="each SAE goes to <out-root>/<name>/")
parser.add_argument("--resume-dir", required=True, help="checkpoints that survive a killed job")
parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
args = parser.parse_args()

torch.set_num_threads(max(1, args.threads))
runs = json.loads(args.runs)
print(f"job: training {', '.join(runs)} on {len(args.stores)} stores, python {sys.executable}", flush=True)
train_from_stores(
    args.stores,
    runs,
    out_dirs={name: Path(args.out_root) / name for name in runs},
    resume_dir=args.resume_dir,
)
