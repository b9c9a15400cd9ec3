# Validation, derived names and input functions. No rules here.
import os
import shlex
import sys

from monoscope.config import ConfigError, NEURONS, hook_name, sae_runs, shard_batches, shard_names, validate_config
from monoscope.layout import Layout

try:
    _validated = validate_config(config)
except ConfigError as error:
    sys.exit(f"monoscope: {error}")
config.clear()
config.update(_validated)

RESULTS = Layout("results")
TRAIN_SHARDS, EVAL_SHARDS = shard_names(config)
ALL_SHARDS = TRAIN_SHARDS + EVAL_SHARDS
SHARD_BATCHES = shard_batches(config)
SAE_RUNS = sae_runs(config)
SAE_NAMES = list(SAE_RUNS)
DICTIONARIES = SAE_NAMES + [NEURONS]
HOOK = hook_name(config)
NATIVE = config["model"]["source"] == "native"
# One training job per SAE (the {name} wildcard), or one for the whole sweep from one pass over the data.
JOINT_TRAINING = config["sae"]["train_jointly"]


wildcard_constraints:
    name=r"[A-Za-z0-9_.+-]+",


def activation_stores(shards):
    return [RESULTS.activation_store(shard) for shard in shards]


def dictionary_input(wildcards):
    """The SAE checkpoint a per-dictionary rule reads; nothing for the neurons."""
    if wildcards.name == NEURONS:
        return []
    return list(RESULTS.sae_checkpoint(wildcards.name).values())


def trained_names(wildcards):
    """The SAEs one train_sae job trains: its {name}, or the whole sweep when they train jointly."""
    return [wildcards.name] if hasattr(wildcards, "name") else SAE_NAMES


def autointerp_params():
    """What one dictionary's job reads: everything its answers depend on, so a changed endpoint, model or
    sampling setting reruns it (the comparison's keys and the switch do not)."""
    return {k: v for k, v in config["autointerp"].items() if k not in ("enabled", "ratings_dir", "bootstrap_samples")}


def sae_launcher(wildcards, threads):
    """plain python, or `accelerate launch` with one process per GPU the job asked for; shell-quoted
    word by word (the interpreter's path may hold a space)."""
    gpus = config["sae"]["gpus"]
    words = [sys.executable]
    if gpus > 1:
        words += ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(gpus)]
    return " ".join(shlex.quote(word) for word in words)


# Where Slurm jobs go (docs/cluster.md), read once from the environment; a local run ignores them.
# Constants in each rule's resources, not expressions in the profile: the profile's expressions were
# evaluated once per job, seconds of planning at thousands of shards. Empty: the cluster's default.
SLURM_CPU = {
    "slurm_partition": os.environ.get("MONOSCOPE_SLURM_PARTITION", ""),
    "slurm_account": os.environ.get("MONOSCOPE_SLURM_ACCOUNT", ""),
}
SLURM_GPU = SLURM_CPU | {"slurm_partition": os.environ.get("MONOSCOPE_SLURM_GPU_PARTITION") or SLURM_CPU["slurm_partition"]}


# Resource estimates for a cluster (a local run ignores them). Each Snakemake retry (`attempt`)
# asks for proportionally more, so a job killed for time or memory gets room on its next try.
# The width of the hooked activation: known for the native model; for a pretrained one, before
# anything is loaded, a bound that covers the presets (SmolLM2 1536, GPT-2 3072, Pythia 2048).
D_IN = config["model"]["native"]["d_mlp"] if NATIVE else 4096
# A conservative sustained rate for runtime estimates only: an SAE step costs ~6 FLOP per weight per token.
GPU_FLOPS = 1e13


def _sae_widths(wildcards):
    return [D_IN * SAE_RUNS[name]["expansion_factor"] for name in trained_names(wildcards)]


def sae_mem_mb(wildcards, attempt):
    """Weights, gradients and two Adam moments in fp32, plus the loader's mixing buffer, plus 4 GB."""
    weights_mb = sum(4 * 2 * D_IN * d_sae * 4 for d_sae in _sae_widths(wildcards)) / 1e6
    buffer_mb = 2 * config["sae"]["buffer_tokens"] * D_IN * 4 / 1e6
    return int((4000 + weights_mb + buffer_mb) * attempt)


def sae_runtime(wildcards, attempt):
    """Minutes: 30 of start-up and evaluation margin plus the training FLOPs at GPU_FLOPS."""
    flops = sum(6 * 2 * D_IN * d_sae * config["sae"]["train_tokens"] for d_sae in _sae_widths(wildcards))
    return int((30 + flops / GPU_FLOPS / 60) * attempt)


def sae_gpus(wildcards):
    """At least one: on a cluster an SAE job belongs on a GPU even when `sae.gpus` leaves it to one process."""
    return max(1, config["sae"]["gpus"])


def scaled(base):
    """A fixed base amount for jobs whose size the config does not predict, grown on each retry."""
    return lambda wildcards, attempt: base * attempt
