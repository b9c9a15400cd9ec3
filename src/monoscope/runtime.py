"""What every Snakemake job does first: send its output to the rule's log, size torch's thread pool."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def start_job(snakemake) -> None:
    """Redirect stdout/stderr (tqdm progress included) to the rule's log and use the rule's threads."""
    if snakemake.log:
        log_path = Path(snakemake.log[0])
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = open(log_path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - lives as long as the job
        sys.stdout = sys.stderr = log_file
        print(f"job: SLURM_JOB_ID={os.environ.get('SLURM_JOB_ID', '-')} threads={snakemake.threads}")
    threads = max(1, snakemake.threads)
    # Jobs that never touch torch (tokenize, report) should not pay seconds to import it.
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS"):
        os.environ[variable] = str(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
