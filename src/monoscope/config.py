"""Load-time validation of the whole configuration, and the names derived from it.

The JSON schema (workflow/schemas/config.schema.yaml) documents every key and fills defaults;
`validate_config` adds the rules a schema cannot express and turns every failure into one
message that names the offending key, before any job starts.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"
NEURONS = "neurons"
NATIVE_MLP_HOOKS = ("mlp.hook_pre", "mlp.hook_post", "hook_mlp_out", "hook_mlp_in", "mlp.hook_in", "mlp.hook_out")


class ConfigError(ValueError):
    """A configuration problem; the message names the key."""


def load_schema() -> dict[str, Any]:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _with_defaults(validator_class):
    """A validator that fills `default`s in as it descends, so nested blocks get their defaults too."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for key, sub in properties.items():
                if "default" in sub and key not in instance:
                    instance[key] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


def _parse_cli_strings(value: Any, schema: dict[str, Any]) -> Any:
    """Snakemake's `--config sae='{gpus: 4}'` delivers nested scalars as strings ('4'): read those
    back as YAML wherever the schema does not want a string, so the command line works as written."""
    types = schema.get("type", [])
    types = [types] if isinstance(types, str) else types
    if isinstance(value, str) and types and "string" not in types:
        for parse in (int, float, yaml.safe_load):  # float first: YAML reads '1e-3' as a string
            try:
                return parse(value)
            except (ValueError, yaml.YAMLError):
                continue
        return value  # left as it is: validation names the key
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        return {k: _parse_cli_strings(v, properties[k]) if k in properties else v for k, v in value.items()}
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [_parse_cli_strings(item, schema["items"]) for item in value]
    return value


def _key_path(error: jsonschema.ValidationError) -> str:
    return ".".join(str(part) for part in error.absolute_path) or "<top level>"


def _describe(error: jsonschema.ValidationError) -> str:
    if error.validator == "additionalProperties":
        unknown = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        prefix = _key_path(error)
        names = ", ".join(f"'{k}'" if prefix == "<top level>" else f"'{prefix}.{k}'" for k in unknown)
        allowed = ", ".join(sorted(error.schema.get("properties", {})))
        return f"unknown config key {names} (allowed here: {allowed})"
    return f"config key '{_key_path(error)}': {error.message}"


def validate_config(config: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of `config` with defaults filled, or raise ConfigError naming every bad key."""
    schema = load_schema()
    config = _parse_cli_strings(copy.deepcopy(dict(config)), schema)
    non_finite = list(_non_finite_keys(config, ""))
    if non_finite:
        # JSON schema's minimum/maximum compare NaN as False and inf as larger than any bound, so
        # `.nan` would pass `exclusiveMinimum` (and silently disable checks such as max_loss_ratio).
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(
            f"config key '{key}': {value!r} is not a finite number" for key, value in non_finite))
    validator = _with_defaults(jsonschema.Draft202012Validator)(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(_describe(e) for e in errors))
    problems = list(_cross_key_problems(config))
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    return _sorted_keys(config)


@functools.cache
def _defaults() -> dict[str, Any]:
    return validate_config({})


def default_config() -> dict[str, Any]:
    """The schema's defaults, validated: what an empty config file means (a fresh copy each call)."""
    return copy.deepcopy(_defaults())


Settings = TypeVar("Settings")


def settings_from(cls: type[Settings], section: Mapping[str, Any], **derived: Any) -> Settings:
    """A stage's typed settings (a dataclass whose fields have no defaults; its SECTION names its config
    section) from the validated section: the schema filled every default, so no field falls back to a
    second copy of one. Keys the stage does not read (e.g. autointerp.enabled, read by the Snakefile) are
    left out; `derived` are fields from elsewhere in the config (the seed) or resolved per run."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{key: value for key, value in section.items() if key in names and key not in derived}, **derived)


def default_settings(cls: type[Settings], **overrides: Any) -> Settings:
    """`cls` from the schema's defaults, with `overrides` (each must be a field): for tests, benchmarks and
    notebooks, which so never hold a copy of a default either. The sae section resolves to its first run."""
    config = default_config()
    section = next(iter(sae_runs(config).values())) if cls.SECTION == "sae" else {"seed": config["seed"], **config[cls.SECTION]}
    return settings_from(cls, section, **overrides)


def _non_finite_keys(value: Any, path: str):
    """(key path, value) of every NaN or infinity anywhere in the config, lists included."""
    if isinstance(value, float) and not math.isfinite(value):
        yield path or "<top level>", value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _non_finite_keys(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _non_finite_keys(item, f"{path}.{index}")


def _sorted_keys(value: Any) -> Any:
    """Snakemake compares params by their text, so key order must not depend on how the YAML was written."""
    if isinstance(value, dict):
        return {key: _sorted_keys(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [_sorted_keys(item) for item in value]
    return value


def _cross_key_problems(config: dict[str, Any]):
    corpus, model, sae = config["corpus"], config["model"], config["sae"]
    if sae["batch_size"] % sae["loader_streams"]:
        yield (
            f"config key 'sae.batch_size': {sae['batch_size']} is not a multiple of "
            f"sae.loader_streams={sae['loader_streams']} (each stream contributes an equal share of a batch)"
        )
    by_name: dict[str, list[float]] = {}
    for l1 in sae["l1_coefficients"]:
        by_name.setdefault(sae_name(1, l1), []).append(l1)
    for values in by_name.values():
        if len(values) > 1:
            yield (
                f"config key 'sae.l1_coefficients': {', '.join(map(repr, values))} give the same SAE name "
                f"'{sae_name(1, values[0]).split('_', 1)[1]}' (names keep 6 significant digits); one run would be dropped"
            )
    if corpus["n_eval_shards"] >= corpus["n_shards"]:
        yield (
            f"config key 'corpus.n_eval_shards': {corpus['n_eval_shards']} held-out shards leaves no training "
            f"shard out of corpus.n_shards={corpus['n_shards']}"
        )
    if corpus["source"] == "files" and not corpus["paths"]:
        yield "config key 'corpus.paths': corpus.source is 'files' but no paths are given"
    if corpus["source"] == "huggingface":
        if not corpus["hf_name"]:
            yield "config key 'corpus.hf_name': corpus.source is 'huggingface' but no dataset name is given"
        if not corpus["max_bytes"]:
            yield "config key 'corpus.max_bytes': a huggingface stream needs a byte budget"
    if model["source"] == "native":
        native = model["native"]
        if model["layer"] >= native["n_layers"]:
            yield (
                f"config key 'model.layer': the native model has {native['n_layers']} layer(s), "
                f"so there is no layer {model['layer']}"
            )
        if model["hook"] not in NATIVE_MLP_HOOKS:
            yield f"config key 'model.hook': the native model has no hook '{model['hook']}' (choose from {', '.join(NATIVE_MLP_HOOKS)})"
        if native["d_model"] % native["n_heads"]:
            yield f"config key 'model.native.n_heads': d_model={native['d_model']} is not divisible by {native['n_heads']} heads"
    elif model["source"] == "gguf" and not model["gguf_file"]:
        yield "config key 'model.gguf_file': model.source is 'gguf' but no file is named"
    concepts = config["features"]["concepts"]
    if concepts is not None:
        from monoscope.probes import compile_concepts

        try:
            compile_concepts(concepts)
        except ValueError as error:
            yield f"config key 'features.concepts': {error}"
    yield from _memory_problems(config)
    auto = config["autointerp"]
    if auto["n_explain"] > auto["n_top"]:
        yield f"config key 'autointerp.n_explain': {auto['n_explain']} explanation records cannot exceed autointerp.n_top={auto['n_top']} top records"
    key_env = config["autointerp"]["api_key_env"]
    if key_env and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key_env):
        # Not echoed: a value that is not a variable name is most likely a pasted key.
        yield (
            f"config key 'autointerp.api_key_env': must name an environment variable (letters, digits, '_'), "
            f"not hold the key itself; the value given ({len(key_env)} characters) is not shown"
        )
    if model["source"] != "native" and model["name"] == "native-gelu-1l":
        yield f"config key 'model.name': model.source is '{model['source']}' but no model name is given"


# Counts that size a buffer held whole in one job are checked against this before any job starts: a
# typo such as n_units: 10**9 should be a message naming the key, not an out-of-memory kill hours later.
MAX_BUFFER_GIB = 64


def _memory_problems(config: dict[str, Any]):
    gib = 2**30
    context = config["tokenizer"]["context"]
    auto = config["autointerp"]
    per_unit = auto["n_top"] + auto["n_random"] + auto["quantile_pool"]
    pools = auto["n_units"] + auto["n_top_density"]
    pool_bytes = pools * per_unit * context * (4 + 4)  # tokens int32 + activations float32 per record slot
    if pool_bytes > MAX_BUFFER_GIB * gib:
        yield (
            f"config key 'autointerp.n_units': {pools} units x {per_unit} record slots (n_top + n_random + "
            f"quantile_pool) x {context} tokens hold {pool_bytes / gib:.0f} GiB, over the {MAX_BUFFER_GIB} GiB bound"
        )
    if config["model"]["source"] == "native":  # a pretrained model's width is known once it loads: the trainer checks
        problem = resample_memory_problem(config["sae"]["resample_inputs"], config["model"]["native"]["d_mlp"])
        if problem:
            yield problem


def resample_memory_problem(resample_inputs: int, d_in: int) -> str | None:
    """Resampling holds resample_inputs inputs of width d_in and their reconstructions at once: over the bound, say so."""
    gib = 2**30
    resample_bytes = resample_inputs * d_in * 4 * 2
    if resample_bytes <= MAX_BUFFER_GIB * gib:
        return None
    return (f"config key 'sae.resample_inputs': {resample_inputs} inputs of width {d_in} hold "
            f"{resample_bytes / gib:.0f} GiB during resampling, over the {MAX_BUFFER_GIB} GiB bound")


def hook_name(config: dict[str, Any]) -> str:
    return f"blocks.{config['model']['layer']}.{config['model']['hook']}"


def shard_names(config: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(training shards, held-out shards); the held-out ones are the last n_eval_shards."""
    n, n_eval = config["corpus"]["n_shards"], config["corpus"]["n_eval_shards"]
    return [f"train_{i:03d}" for i in range(n - n_eval)], [f"eval_{i:03d}" for i in range(n_eval)]


def shard_batches(config: dict[str, Any]) -> dict[str, list[str]]:
    """Batch name -> the shards one tokenize or harvest job handles: every shard in order, corpus.shards_per_job at a time."""
    train, held_out = shard_names(config)
    shards, size = train + held_out, config["corpus"]["shards_per_job"]
    return {f"{i // size:03d}": shards[i : i + size] for i in range(0, len(shards), size)}


def sae_name(expansion_factor: int, l1_coefficient: float) -> str:
    return f"x{expansion_factor}_l1-{l1_coefficient:g}"


SWEEP_KEYS = ("expansion_factors", "l1_coefficients")
# Where and how the jobs run, not what they compute: read by the Snakefile, never by the trainer.
SCHEDULING_KEYS = ("gpus", "train_jointly")


def sae_runs(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every SAE of the sweep: name -> its own resolved hyper-parameters (what its job depends on)."""
    shared = {k: v for k, v in config["sae"].items() if k not in SWEEP_KEYS + SCHEDULING_KEYS}
    runs = {}
    for factor in config["sae"]["expansion_factors"]:
        for l1 in config["sae"]["l1_coefficients"]:
            runs[sae_name(factor, l1)] = {
                **shared,
                "expansion_factor": factor,
                "l1_coefficient": l1,
                "seed": config["seed"],
            }
    return runs
