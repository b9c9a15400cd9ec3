# Validation, derived names and input functions. No rules here.
import sys

from monoscope.config import ConfigError, NEURONS, hook_name, sae_runs, shard_names, validate_config

try:
    _validated = validate_config(config)
except ConfigError as error:
    sys.exit(f"monoscope: {error}")
config.clear()
config.update(_validated)

TRAIN_SHARDS, EVAL_SHARDS = shard_names(config)
ALL_SHARDS = TRAIN_SHARDS + EVAL_SHARDS
SAE_RUNS = sae_runs(config)
SAE_NAMES = list(SAE_RUNS)
DICTIONARIES = SAE_NAMES + [NEURONS]
HOOK = hook_name(config)
NATIVE = config["model"]["source"] == "native"


wildcard_constraints:
    shard=r"(train|eval)_\d{3}",
    name=r"[A-Za-z0-9_.+-]+",


def activation_stores(shards):
    return [f"results/activations/{shard}.zarr" for shard in shards]


def dictionary_input(wildcards):
    """The SAE checkpoint a per-dictionary rule reads; nothing for the neurons."""
    if wildcards.name == NEURONS:
        return []
    return [f"results/sae/{wildcards.name}/sae.safetensors", f"results/sae/{wildcards.name}/cfg.json"]


def model_params():
    """What the model's outputs depend on, so a changed model reruns everything downstream."""
    return {"model": config["model"], "tokenizer": config["tokenizer"], "seed": config["seed"]}


def autointerp_params():
    """Everything the answers depend on, so a changed endpoint, model or sampling setting reruns."""
    return {k: v for k, v in config["autointerp"].items() if k not in ("enabled", "ratings_dir")}


def sae_launcher(wildcards, threads):
    """plain python, or `accelerate launch` with one process per GPU the job asked for."""
    gpus = config["sae"].get("gpus", 0)
    if gpus > 1:
        return f"{sys.executable} -m accelerate.commands.launch --multi_gpu --num_processes {gpus}"
    return sys.executable
