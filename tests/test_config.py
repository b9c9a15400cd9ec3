import pytest
import yaml

from monoscope.config import SCHEMA_PATH, ConfigError, sae_runs, shard_batches, shard_names, validate_config


def test_defaults_fill_every_block():
    config = validate_config({})
    assert config["model"]["native"]["d_mlp"] == 512
    assert config["sae"]["expansion_factors"] == [1, 4, 8]
    assert (config["harvest"]["cname"], config["harvest"]["clevel"]) == ("lz4", 5)


def test_every_schema_key_has_description_and_default():
    def walk(schema, path):
        for key, sub in schema.get("properties", {}).items():
            assert "description" in sub, f"{path}{key} has no description"
            assert "default" in sub, f"{path}{key} has no default"
            walk(sub, f"{path}{key}.")

    walk(yaml.safe_load(SCHEMA_PATH.read_text()), "")


@pytest.mark.parametrize(
    "config, message",
    [
        ({"sae": {"expansion_factor": [2]}}, "'sae.expansion_factor'"),
        ({"bogus": 1}, "'bogus'"),
        ({"sae": {"lr": "fast"}}, "'sae.lr'"),
        ({"sae": {"lr": -1}}, "'sae.lr'"),
        ({"sae": {"expansion_factors": []}}, "'sae.expansion_factors'"),
        ({"corpus": {"n_shards": 4, "n_eval_shards": 4}}, "'corpus.n_eval_shards'"),
        ({"model": {"hook": "attn.hook_z"}}, "'model.hook'"),
        ({"model": {"layer": 3}}, "'model.layer'"),
        ({"corpus": {"source": "files"}}, "'corpus.paths'"),
        ({"harvest": {"dtype": "int8"}}, "'harvest.dtype'"),
    ],
)
def test_bad_configs_are_rejected_naming_the_key(config, message):
    with pytest.raises(ConfigError) as error:
        validate_config(config)
    assert message in str(error.value)


def test_validation_does_not_mutate_input():
    raw = {"sae": {"expansion_factors": [2]}}
    validate_config(raw)
    assert raw == {"sae": {"expansion_factors": [2]}}


def test_shards_and_sweep_names():
    config = validate_config({"corpus": {"n_shards": 5, "n_eval_shards": 2}, "sae": {"expansion_factors": [1, 8], "l1_coefficients": [1e-4, 3e-4]}})
    assert shard_names(config) == (["train_000", "train_001", "train_002"], ["eval_000", "eval_001"])
    runs = sae_runs(config)
    assert sorted(runs) == ["x1_l1-0.0001", "x1_l1-0.0003", "x8_l1-0.0001", "x8_l1-0.0003"]
    assert runs["x8_l1-0.0003"]["expansion_factor"] == 8
    assert runs["x8_l1-0.0003"]["l1_coefficient"] == 3e-4
    assert "expansion_factors" not in runs["x8_l1-0.0003"]


def test_command_line_strings_are_read_as_the_schema_types():
    # What `snakemake --config sae='{gpus: 4, expansion_factors: [1, 2]}' harvest='{dtype: float32}'` delivers.
    config = validate_config({"sae": {"gpus": "4", "expansion_factors": ["1", "2"], "lr": "1e-3"}, "harvest": {"dtype": "float32"}})
    assert config["sae"]["gpus"] == 4
    assert config["sae"]["expansion_factors"] == [1, 2]
    assert config["sae"]["lr"] == 1e-3
    assert config["harvest"]["dtype"] == "float32"
    with pytest.raises(ConfigError, match="'sae.gpus'"):
        validate_config({"sae": {"gpus": "four"}})


def test_shard_names_past_a_thousand_stay_unique_and_ordered():
    train, held_out = shard_names(validate_config({"corpus": {"n_shards": 2000, "n_eval_shards": 10}}))
    assert len(set(train)) == 1990 and train[999] == "train_999" and train[1000] == "train_1000"
    assert held_out[-1] == "eval_009"


def test_shard_batches_cover_every_shard_once_in_order():
    config = validate_config({"corpus": {"n_shards": 2000, "n_eval_shards": 10, "shards_per_job": 50}})
    batches = shard_batches(config)
    assert len(batches) == 40 and list(batches)[0] == "000" and list(batches)[-1] == "039"
    train, held_out = shard_names(config)
    assert [shard for batch in batches.values() for shard in batch] == train + held_out
    uneven = shard_batches(validate_config({"corpus": {"n_shards": 5, "n_eval_shards": 1, "shards_per_job": 2}}))
    assert uneven == {"000": ["train_000", "train_001"], "001": ["train_002", "train_003"], "002": ["eval_000"]}


def test_key_order_in_the_yaml_does_not_change_the_validated_config():
    """Snakemake reruns a job when its params' text changes; reordering keys in a config file must not."""
    forward = validate_config({"corpus": {"source": "stdlib", "n_shards": 4}, "seed": 1})
    backward = validate_config({"seed": 1, "corpus": {"n_shards": 4, "source": "stdlib"}})
    assert repr(forward) == repr(backward)


@pytest.mark.parametrize(
    "config, key",
    [
        ({"sae": {"lr": float("nan")}}, "sae.lr"),
        ({"sae": {"max_loss_ratio": float("nan")}}, "sae.max_loss_ratio"),
        ({"harvest": {"chunk_mib": float("inf")}}, "harvest.chunk_mib"),
        ({"sae": {"l1_coefficients": [1.0, float("-inf")]}}, "sae.l1_coefficients.1"),
        ({"evaluate": {"dense_log10_density": float("-inf")}}, "evaluate.dense_log10_density"),
        ({"autointerp": {"timeout_s": float("inf")}}, "autointerp.timeout_s"),
        # What `--config sae='{lr: nan}'` or `harvest='{chunk_mib: .inf}'` delivers: strings.
        ({"sae": {"lr": "nan"}}, "sae.lr"),
        ({"harvest": {"chunk_mib": ".inf"}}, "harvest.chunk_mib"),
        ({"sae": {"beta1": "-Infinity"}}, "sae.beta1"),
    ],
)
def test_non_finite_numbers_are_rejected_everywhere(config, key):
    """JSON schema bounds let NaN through (every comparison is False) and inf through `minimum`."""
    with pytest.raises(ConfigError, match=f"'{key}'.*not a finite number"):
        validate_config(config)


@pytest.mark.parametrize("l1s", [[0.0004, 0.00040000001], [3.75, 3.7500000001, 1.0], [1e-7, 1.0000001e-7]])
def test_l1_coefficients_that_share_a_run_name_are_rejected(l1s):
    with pytest.raises(ConfigError, match="'sae.l1_coefficients'.*same SAE name"):
        validate_config({"sae": {"l1_coefficients": l1s}})
    assert len(sae_runs(validate_config({"sae": {"l1_coefficients": [0.0004, 0.0005]}}))) == 3 * 2


@pytest.mark.parametrize("batch_size, streams", [(1000, 3), (7, 8), ("1025", "8")])
def test_batch_size_not_a_multiple_of_loader_streams_is_rejected_at_planning(batch_size, streams):
    with pytest.raises(ConfigError, match="'sae.batch_size'.*loader_streams"):
        validate_config({"sae": {"batch_size": batch_size, "loader_streams": streams}})
    validate_config({"sae": {"batch_size": 1024, "loader_streams": 8}})


@pytest.mark.parametrize("config, key", [
    ({"autointerp": {"n_units": 10**9}}, "autointerp.n_units"),
    ({"autointerp": {"quantile_pool": 10**8, "n_units": 1000}}, "autointerp.n_units"),
    ({"sae": {"resample_inputs": 10**11}}, "sae.resample_inputs"),
])
def test_counts_that_size_a_whole_buffer_are_bounded_before_any_job(config, key):
    with pytest.raises(ConfigError, match=f"'{key}'.*GiB bound"):
        validate_config(config)


def _stage_settings():
    from monoscope.autointerp.client import ClientConfig
    from monoscope.autointerp.pipeline import AutointerpSettings
    from monoscope.evaluate import EvaluateSettings
    from monoscope.features import FeatureSettings
    from monoscope.harvest import HarvestSettings
    from monoscope.train import TrainConfig

    return [TrainConfig, FeatureSettings, AutointerpSettings, ClientConfig, EvaluateSettings, HarvestSettings]


# Fields a stage's settings take from outside their own section: resolved per run, or the top-level seed.
DERIVED_FIELDS = {"seed", "expansion_factor", "l1_coefficient"}


@pytest.mark.parametrize("cls", _stage_settings(), ids=lambda cls: cls.__name__)
def test_the_schema_is_the_only_source_of_defaults(cls):
    import dataclasses

    schema = yaml.safe_load(SCHEMA_PATH.read_text())["properties"][cls.SECTION]["properties"]
    for field in dataclasses.fields(cls):
        assert field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING, (
            f"{cls.__name__}.{field.name} has a default of its own; the schema's {cls.SECTION}.{field.name} is the one")
        assert field.name in schema or field.name in DERIVED_FIELDS, f"{cls.__name__}.{field.name} is not a {cls.SECTION} key"


@pytest.mark.parametrize("cls", _stage_settings(), ids=lambda cls: cls.__name__)
def test_settings_are_built_from_the_validated_section_alone(cls):
    import dataclasses

    from monoscope.config import default_settings, settings_from

    config = validate_config({})
    section = sae_runs(config)["x1_l1-5"] if cls.SECTION == "sae" else {"seed": config["seed"], **config[cls.SECTION]}
    built = settings_from(cls, section)
    assert all(getattr(built, field.name) == section[field.name] for field in dataclasses.fields(cls))
    assert default_settings(cls) == built
    assert default_settings(cls, seed=3).seed == 3 if hasattr(built, "seed") else True
    with pytest.raises(TypeError):
        default_settings(cls, no_such_key=1)


def test_more_explanation_records_than_top_records_are_refused_at_planning():
    with pytest.raises(ConfigError, match=r"'autointerp.n_explain': 8 .* autointerp.n_top=4"):
        validate_config({"autointerp": {"n_explain": 8, "n_top": 4}})


def test_a_bad_concept_regex_is_refused_at_planning():
    with pytest.raises(ConfigError, match=r"features\.concepts.*'broken'.*invalid regular expression"):
        validate_config({"features": {"concepts": [{"name": "broken", "pattern": "("}]}})


def test_no_function_below_the_scripts_takes_the_whole_config():
    """Stages take their typed settings, the model section, paths and the hook; only monoscope.config reads
    the whole config (validation and the names the Snakefile derives from it), and scripts never hand it down."""
    import ast

    package = SCHEMA_PATH.parents[2] / "src" / "monoscope"
    takers = []
    for path in package.rglob("*.py"):
        if path.name == "config.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and "config" in [a.arg for a in node.args.args + node.args.kwonlyargs]:
                takers.append(f"{path.relative_to(package)}:{node.lineno} {node.name}")
    assert takers == []
    scripts = SCHEMA_PATH.parents[1] / "scripts"
    assert [p.name for p in scripts.glob("*.py") if "snakemake.config" in p.read_text()] == []
