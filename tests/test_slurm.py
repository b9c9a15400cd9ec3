"""`snakemake --profile profiles/slurm` against real Slurm daemons: a one-node cluster with fake GPUs.

scripts/slurm/up.sh installs and starts the cluster (root, Debian); the tests submit the tiny pipeline
through the Snakemake Slurm executor and ask the controller what it was given. The only overrides of
the profile are the ones this cluster needs: squeue for job states (there is no accounting database),
a first status check after 1 s instead of 40 (the jobs take seconds), and --cores for the node's CPUs.

The cluster and the Slurm run of the tiny pipeline start in a background thread as soon as pytest has
collected these tests (tests/conftest.py calls start_in_background): the run is minutes of sbatch round
trips and status polls, so it waits while the other test modules compute.
"""

import json
import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import REPO, TINY, job_counts, snakemake

from monoscope import store
SUDO = [] if os.geteuid() == 0 else ["sudo", "-n", "--preserve-env=SLURM_NODE_CPUS,SLURM_NODE_MEM_MB,SLURM_FAKE_GPUS"]
# Rules that run a model or a dictionary over activations ask Slurm for a GPU; the others must not.
GPU_RULES = {"train_lm", "harvest", "train_sae", "evaluate", "features"}

pytestmark = pytest.mark.workflow


def run(cmd: list[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}")
    return result


def on_slurm(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    node_cpus = run(["sinfo", "-h", "-o", "%c"]).stdout.split()[0]
    return snakemake(
        workdir,
        "--profile", "profiles/slurm",
        "--configfile", str(workdir / "c.yaml"),
        "--cores", node_cpus,
        "--slurm-status-command", "squeue",
        "--slurm-init-seconds-before-status-checks", "1",
        *args,
        check=check,
    )  # fmt: skip


def tiny_config(workdir: Path, **sae) -> Path:
    """The tiny pipeline (its SAE jobs ask Slurm for one GPU each, as sae.gpus 0 still does on a cluster)."""
    config = yaml.safe_load(TINY.read_text())
    config["sae"].update(sae)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def slurm_jobs(workdir: Path) -> list[dict[str, str]]:
    """Every job the controller still remembers (up.sh sets MinJobAge=3600 s) that ran in `workdir`, oldest first."""
    lines = run(["scontrol", "show", "job", "-o"]).stdout.splitlines()
    jobs = [dict(re.findall(r"(\w[\w/:]*)=(\S*)", line)) for line in lines if line.strip()]
    return sorted(
        (job for job in jobs if job.get("WorkDir") == str(workdir)),
        key=lambda job: int(job["JobId"]),
    )


def rule_of(job: dict[str, str]) -> str:
    """The Slurm executor comments each job `rule_<rule>[_wildcards_...]`."""
    return job["Comment"].removeprefix("rule_").split("_wildcards_")[0]


def stage_of(rule: str) -> str:
    """harvest_000 -> harvest: tokenize and harvest have a rule per batch of shards."""
    return re.sub(r"_\d{3}$", "", rule)


# More CPUs, memory and GPUs than the machine has, so the short jobs of one stage overlap (their
# Snakemake start-up and status polling dominate) instead of queueing one by one: the GPU rules ask
# for 8 GB each, sized for real data, and use a few hundred MB here.
NODE = {"SLURM_NODE_CPUS": "8", "SLURM_NODE_MEM_MB": "64000", "SLURM_FAKE_GPUS": "4"}
BACKGROUND = pytest.StashKey[Future]()
CLUSTER_STARTED_HERE = pytest.StashKey[list]()


def start_in_background(config: pytest.Config) -> None:
    """Bring the cluster up and run the tiny pipeline on it in a thread (once per session)."""
    if BACKGROUND not in config.stash:
        started_here = config.stash[CLUSTER_STARTED_HERE] = []
        pool = ThreadPoolExecutor(1, thread_name_prefix="slurm-run")
        config.stash[BACKGROUND] = pool.submit(_cluster_and_slurm_run, started_here)
        pool.shutdown(wait=False)
        # Also when no test reaches the fixture's teardown (pytest -x stopped earlier, say).
        config.add_cleanup(lambda: stop_cluster(config))


def stop_cluster(config: pytest.Config) -> None:
    """After the background run has ended, stop the cluster if this session started it (once)."""
    wait([config.stash[BACKGROUND]])
    started_here = config.stash[CLUSTER_STARTED_HERE]
    if any(started_here):
        started_here.clear()
        run([*SUDO, "bash", "scripts/slurm/down.sh"])


def _cluster_and_slurm_run(started_here: list) -> tuple[Path, set[str]]:
    up = run([*SUDO, "bash", "scripts/slurm/up.sh"], env={**os.environ, **NODE}).stdout
    started_here.append("already up" not in up)
    workdir = Path(tempfile.mkdtemp(prefix="monoscope-slurm-"))
    tiny_config(workdir)
    plan = snakemake(workdir, "-n", "--configfile", str(workdir / "c.yaml")).stdout
    planned = set(job_counts(plan))
    on_slurm(workdir)
    return workdir, planned - {"all"}


@pytest.fixture(scope="module")
def slurm_run(request):
    """(working directory, rules planned) of the tiny pipeline's Slurm run; the cluster stops after this module."""
    start_in_background(request.config)  # already running unless conftest's hook was bypassed
    try:
        workdir, planned = request.config.stash[BACKGROUND].result()
        yield workdir, planned
        if request.session.testsfailed == 0:  # otherwise kept, to read its logs
            shutil.rmtree(workdir, ignore_errors=True)
    finally:
        stop_cluster(request.config)


def test_every_job_is_an_sbatch_job_and_gpu_rules_ask_for_a_gpu(slurm_run):
    workdir, planned_rules = slurm_run
    jobs = slurm_jobs(workdir)
    by_rule: dict[str, list[dict[str, str]]] = {}
    for job in jobs:
        by_rule.setdefault(rule_of(job), []).append(job)
    assert set(by_rule) == planned_rules
    assert all(job["JobState"] == "COMPLETED" for job in jobs)
    # Four shards, one batch: one tokenize and one harvest submission write all four stores.
    assert len(by_rule["tokenize_000"]) == len(by_rule["harvest_000"]) == 1
    assert len(list((workdir / "results" / "activations").glob("*.zarr"))) == 4
    assert len(by_rule["train_sae"]) == 2 and len(by_rule["evaluate"]) == 3
    for rule, rule_jobs in by_rule.items():
        for job in rule_jobs:
            # What the job asked for (sbatch --gpus=1), as the controller recorded it.
            gpus_asked = job.get("TresPerJob", "")
            assert (gpus_asked == "gres:gpu:1") == (stage_of(rule) in GPU_RULES), f"{rule}: TresPerJob={gpus_asked!r}"
    # Each job's log, written by Slurm and named by its job id, shows Snakemake running the job
    # inside the allocation (the jobstep executor, which starts it with srun).
    for job in jobs:
        log = Path(job["StdOut"])
        assert log.name == f"{job['JobId']}.log" and log.is_relative_to(workdir / ".snakemake" / "slurm_logs")
        assert "--executor slurm-jobstep" in log.read_text()


def test_results_equal_those_of_a_local_run(slurm_run, tiny_run):
    slurm_results, local_results = slurm_run[0] / "results", tiny_run[0] / "results"
    shards = sorted(p.name for p in (local_results / "tokens").glob("*.zarr"))
    assert shards and sorted(p.name for p in (slurm_results / "tokens").glob("*.zarr")) == shards
    for shard in shards:
        local_tokens, _ = store.read_token_shard(local_results / "tokens" / shard)
        slurm_tokens, _ = store.read_token_shard(slurm_results / "tokens" / shard)
        assert np.array_equal(local_tokens, slurm_tokens), shard
    local_acts = store.open_activations(local_results / "activations" / "eval_000.zarr")
    slurm_acts = store.open_activations(slurm_results / "activations" / "eval_000.zarr")
    assert np.array_equal(local_acts.acts[:], slurm_acts.acts[:])
    local_metrics = sorted(p.relative_to(local_results) for p in local_results.glob("eval/*/metrics.json"))
    assert len(local_metrics) == 3
    assert sorted(p.relative_to(slurm_results) for p in slurm_results.glob("eval/*/metrics.json")) == local_metrics
    for path in local_metrics:
        slurm_values, local_values = (json.loads((root / path).read_text()) for root in (slurm_results, local_results))
        assert slurm_values.keys() == local_values.keys()
        for key, value in local_values.items():
            number = isinstance(value, float)
            assert slurm_values[key] == (pytest.approx(value, rel=1e-5) if number else value), f"{path}: {key}"
    assert (slurm_results / "report" / "index.html").exists()


def test_a_failed_job_fails_the_run_naming_its_log_and_a_rerun_resumes(slurm_run):
    workdir, _ = slurm_run
    metrics = next((workdir / "results" / "eval").glob("x1*/metrics.json"))
    good = metrics.read_text()
    metrics.write_text("not json")  # newer than the report: the report reruns, and fails on it

    # One retry rather than the profile's two: each attempt costs a Slurm round trip (~35 s here).
    failed = on_slurm(workdir, "--retries", "1", check=False)
    assert failed.returncode != 0
    output = failed.stdout + failed.stderr
    assert "Error in rule report" in output
    assert "results/logs/report.log" in output
    slurm_log = re.search(r"\S+/slurm_logs/rule_report/\S*\d+\.log", output)
    assert slurm_log, output[-3000:]
    report_jobs = [job for job in slurm_jobs(workdir) if rule_of(job) == "report"]
    assert [job["JobState"] for job in report_jobs[-2:]] == ["FAILED"] * 2  # the first try and its retry

    metrics.write_text(good)
    plan = snakemake(workdir, "-n", "--configfile", str(workdir / "c.yaml")).stdout
    assert list(job_counts(plan)) == ["report", "all"]
    on_slurm(workdir)
    assert rule_of(slurm_jobs(workdir)[-1]) == "report"


def test_dry_run_shows_an_sae_job_on_n_gpus_launched_by_accelerate(tmp_path):
    tiny_config(tmp_path, gpus=4)
    cluster_settings = {"MONOSCOPE_SLURM_PARTITION": "cpu-q", "MONOSCOPE_SLURM_GPU_PARTITION": "gpu-q",
                        "MONOSCOPE_SLURM_ACCOUNT": "lab-7"}  # fmt: skip
    plan = snakemake(tmp_path, "-n", "--profile", "profiles/slurm", "--configfile", str(tmp_path / "c.yaml"),
                     env={**os.environ, **cluster_settings}).stdout
    blocks = plan.split("\n\n")
    train_sae = [block for block in blocks if "rule train_sae:" in block]
    assert len(train_sae) == 2
    for block in train_sae:
        assert "gpu=4" in block
        assert re.search(r"-m accelerate\.commands\.launch --multi_gpu --num_processes 4 \S*workflow/scripts/train_sae\.py", block)
    # The documented settings reach every job: GPU rules to the GPU partition, the rest to the other.
    for block in blocks:
        rule = re.search(r"rule (\w+):", block)
        if rule and rule[1] != "all":
            partition = "gpu-q" if stage_of(rule[1]) in GPU_RULES else "cpu-q"
            assert f"slurm_partition={partition}," in block and "slurm_account=lab-7" in block, block
