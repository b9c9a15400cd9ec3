"""Fixtures shared across test modules."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "config" / "tiny.yaml"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny pipeline run once, locally, as-is: (working directory, config file). Read-only for tests:
    the workflow tests plan reruns against it and the Slurm tests compare their results with it."""
    workdir = tmp_path_factory.mktemp("tiny")
    config = workdir / "c.yaml"
    config.write_text(TINY.read_text())
    cmd = [str(Path(sys.executable).with_name("snakemake")), "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--cores", "2", "--configfile", str(config)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return workdir, config


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the Slurm run of tests/test_slurm.py now if a selected test needs it: minutes of waiting on
    sbatch round trips and status polls, spent while the other modules run."""
    needing = [item for item in session.items if "slurm_run" in getattr(item, "fixturenames", ())]
    if needing:
        needing[0].module.start_in_background(session.config)
