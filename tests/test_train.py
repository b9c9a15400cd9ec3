"""The trainer: schedules, data statistics, resampling, divergence, joint training, resume after
kill -9 (bit-identical on the CPU), and 2 processes under accelerate (gloo) against 1."""

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from scipy.optimize import minimize

from monoscope.config import default_settings
from monoscope.sae import SPARSE_MAX_DENSITY
from monoscope.store import write_activation_store
from monoscope.train import (
    Trainer,
    TrainConfig,
    TrainingDiverged,
    geometric_median,
    lr_at,
    norm_scale_for,
    sparsity_at,
    store_identity,
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "workflow" / "scripts" / "train_sae.py"
D = 16


def synthetic_acts(n: int, seed: int = 0) -> np.ndarray:
    """Sparse non-negative combinations of 48 fixed directions, plus an offset: SAE-friendly data."""
    rng = np.random.default_rng(seed)
    directions = np.random.default_rng(99).normal(size=(48, D))
    codes = (rng.random((n, 48)) < 0.05) * rng.exponential(1.0, (n, 48))
    return (codes @ directions + 0.3).astype(np.float32)


def list_source(acts: np.ndarray, batch_size: int):
    """A BatchSource over an in-memory array, cycling through it in order."""
    x = torch.from_numpy(acts)
    n_batches = len(x) // batch_size

    def batches(start: int):
        i = start
        while True:
            j = i % n_batches
            yield x[j * batch_size : (j + 1) * batch_size]
            i += 1

    return batches


def run_cfg(**overrides):
    """One run's hyper-parameters: the schema's defaults, small enough for a test, and `overrides`."""
    cfg = dataclasses.asdict(default_settings(TrainConfig)) | dict(
        expansion_factor=4,
        l1_coefficient=0.5,
        lr=3e-3,
        batch_size=64,
        train_tokens=64 * 200,
        resample_steps=[100],
        resample_window=50,
        resample_inputs=512,
        norm_sample_tokens=512,
        checkpoint_every=40,
        log_every=20,
        buffer_tokens=512,
        loader_streams=2,
    )
    cfg.update(overrides)
    return cfg


# --- schedules and statistics -------------------------------------------------------------------


def test_lr_schedule_warms_up_holds_and_decays_to_zero():
    cfg = default_settings(TrainConfig, lr=1.0, batch_size=1, train_tokens=100, lr_warmup_fraction=0.1, lr_decay_fraction=0.2)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == 1.0 and lr_at(50, cfg) == 1.0 and lr_at(80, cfg) == 1.0
    assert lr_at(90, cfg) == pytest.approx(0.5)
    assert lr_at(99, cfg) == pytest.approx(0.05)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 99))


def test_sparsity_warm_up():
    cfg = default_settings(TrainConfig, l1_coefficient=2.0, batch_size=1, train_tokens=1000, l1_warmup_fraction=0.05)
    assert sparsity_at(0, cfg) == pytest.approx(2.0 / 50)
    assert sparsity_at(24, cfg) == pytest.approx(1.0)
    assert sparsity_at(49, cfg) == sparsity_at(999, cfg) == 2.0
    assert sparsity_at(0, default_settings(TrainConfig, l1_coefficient=2.0, l1_warmup_fraction=0.0)) == 2.0


def test_geometric_median_minimises_the_sum_of_distances():
    x = torch.from_numpy(synthetic_acts(300))
    x[:20] += 50.0  # outliers pull the mean, barely the median
    median = geometric_median(x).double()
    objective = lambda y: np.linalg.norm(x.double().numpy() - y, axis=1).sum()  # noqa: E731
    best = minimize(objective, x.double().mean(0).numpy(), method="BFGS").x
    assert objective(median.numpy()) <= objective(best) + 1e-4
    assert objective(median.numpy()) < objective(x.double().mean(0).numpy())


def test_norm_scale_makes_the_mean_squared_norm_d_in():
    x = torch.from_numpy(synthetic_acts(500)) * 7.0
    scale = norm_scale_for(x)
    assert (x * scale).pow(2).sum(1).mean().item() == pytest.approx(D, rel=1e-5)


# --- the loop -----------------------------------------------------------------------------------


def make_trainer(tmp_path, runs, acts=None, **kwargs):
    acts = synthetic_acts(64 * 50) if acts is None else acts
    batch_size = next(iter(runs.values())).get("batch_size", 64)
    return Trainer(runs, D, list_source(acts, batch_size), tmp_path / "resume", show_progress=False, **kwargs)


def test_training_reconstructs_with_unit_norm_decoder_and_logs(tmp_path):
    trainer = make_trainer(tmp_path, {"a": run_cfg()})
    (sae,) = trainer.train()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(sae.d_sae), atol=1e-5)
    rows = [json.loads(line) for line in trainer.log_path.read_text().splitlines()]
    steps = [r for r in rows if "event" not in r]
    assert [r["step"] for r in steps] == list(range(20, 201, 20))
    assert steps[-1]["explained_variance"] > 0.8
    assert steps[-1]["loss"] < 0.5 * steps[0]["loss"]
    assert any(r.get("event") == "resample" and r["step"] == 100 for r in rows)
    assert sae.cfg.tokens_seen == 64 * 200
    trainer.write_outputs({"a": tmp_path / "out"})
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["cfg.json", "sae.safetensors", "train_log.jsonl"]
    assert not trainer.resume_dir.exists()


def test_b_dec_starts_at_the_geometric_median_of_normalised_data(tmp_path):
    acts = synthetic_acts(64 * 8)
    trainer = make_trainer(tmp_path, {"a": run_cfg()}, acts=acts)
    trainer.initialise_from_data()
    sae = trainer.saes[0]
    x = torch.from_numpy(acts)
    assert sae.cfg.norm_scale == pytest.approx(norm_scale_for(x))
    assert torch.allclose(sae.b_dec, geometric_median(x * sae.cfg.norm_scale), atol=1e-5)


def test_resampling_reinitialises_dead_features_as_the_paper_says(tmp_path):
    trainer = make_trainer(tmp_path, {"a": run_cfg(train_tokens=64 * 30, resample_steps=[])})
    trainer.train()
    run = trainer.runs[0]
    sae, cfg = run.sae, run.cfg
    dead = torch.zeros(sae.d_sae, dtype=torch.bool)
    dead[[3, 10, 11]] = True
    run.window_fires[dead] = 0  # silent through the window: the paper's dead neurons
    run.window_fires[~dead] = 1
    alive_norm = sae.W_enc[:, ~dead].norm(dim=0).mean()
    before = sae.W_dec[~dead].clone()
    (row,) = trainer.resample(trainer.device_batches(0), trainer.runs[0])
    assert row == {"event": "resample", "sae": "a", "step": 30, "resampled": 3}
    assert torch.allclose(sae.W_dec[dead].norm(dim=1), torch.ones(3))
    assert torch.allclose(sae.W_enc[:, dead].norm(dim=0), torch.full((3,), 0.2 * alive_norm.item()))
    assert torch.allclose(sae.W_enc[:, dead].T / (0.2 * alive_norm), sae.W_dec[dead])
    assert (sae.b_enc[dead] == 0).all() and torch.equal(sae.W_dec[~dead], before)
    # The new directions are inputs of the data, normalised.
    inputs = torch.from_numpy(synthetic_acts(64 * 50))[: cfg.resample_inputs] * sae.cfg.norm_scale
    inputs = inputs / inputs.norm(dim=1, keepdim=True)
    assert ((sae.W_dec[dead] @ inputs.T).max(dim=1).values > 1 - 1e-5).all()
    state = trainer.optimizer.state
    assert (state[sae.W_dec]["exp_avg"][dead] == 0).all() and (state[sae.W_dec]["exp_avg_sq"][dead] == 0).all()
    assert (state[sae.W_enc]["exp_avg"][:, dead] == 0).all() and (state[sae.b_enc]["exp_avg_sq"][dead] == 0).all()
    assert (state[sae.W_dec]["exp_avg_sq"][~dead] != 0).any()


def test_resampling_above_zero_density_also_takes_the_near_dead(tmp_path):
    trainer = make_trainer(tmp_path, {"a": run_cfg(train_tokens=64 * 30, resample_steps=[], resample_max_density=0.01)})
    trainer.train()
    trainer.runs[0].window_tokens = 1000  # a window of 1000 tokens: fewer than 10 firings is near-dead
    fires = torch.full((trainer.saes[0].d_sae,), 50)
    fires[[0, 1, 2]] = torch.tensor([0, 9, 10])
    trainer.runs[0].window_fires.copy_(fires)
    (row,) = trainer.resample(trainer.device_batches(0), trainer.runs[0])
    assert row["resampled"] == 2  # never fired, and 9 of 1000; 10 of 1000 stays
    assert trainer.runs[0].window_fires[:2].tolist() == [0, 0] and trainer.runs[0].window_fires[2] == 10


def test_the_resampling_window_counts_the_steps_before_each_resample_step(tmp_path):
    trainer = make_trainer(tmp_path, {"a": run_cfg(train_tokens=64 * 30, resample_steps=[20], resample_window=8)})
    seen = []
    original = trainer.resample
    trainer.resample = lambda data, run: seen.append(run.window_tokens) or original(data, run)
    trainer.train()
    assert seen == [8 * trainer.runs[0].cfg.batch_size]

def test_divergence_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path):
    acts = synthetic_acts(64 * 50)
    good = list_source(acts, 64)

    def poisoned(start):
        for i, batch in enumerate(good(start), start):
            yield batch * (1e30 if i >= 70 else 1.0)

    trainer = Trainer({"a": run_cfg(resample_steps=[])}, D, poisoned, tmp_path / "resume", show_progress=False)
    with pytest.raises(TrainingDiverged, match=r"SAE a diverged at step 80.*last good checkpoint"):
        trainer.train()
    state = torch.load(trainer.checkpoint_path, weights_only=False)
    assert state["progress"]["step"] == 40
    assert all(torch.isfinite(t).all() for t in state["saes"][0].values())


def test_joint_training_matches_separate_runs(tmp_path):
    runs = {"small": run_cfg(expansion_factor=2), "big": run_cfg(expansion_factor=4, l1_coefficient=1.0)}
    joint = make_trainer(tmp_path / "joint", runs).train()
    for name, sae in zip(runs, joint):
        (alone,) = make_trainer(tmp_path / name, {name: runs[name]}).train()
        for key, value in alone.state_dict().items():
            assert torch.allclose(value, sae.state_dict()[key], atol=1e-6), (name, key)


def test_joint_runs_must_share_the_data_keys(tmp_path):
    with pytest.raises(ValueError, match="must share sae.batch_size"):
        make_trainer(tmp_path, {"a": run_cfg(), "b": run_cfg(batch_size=128)})


def test_the_dead_window_follows_the_run_unless_given():
    assert default_settings(TrainConfig, train_tokens=1_000_000).dead_window == 100_000  # 10M would never pass in this run
    assert default_settings(TrainConfig, train_tokens=10**9).dead_window == 10_000_000  # Gao et al.'s window for long runs
    assert default_settings(TrainConfig, train_tokens=2000, batch_size=1024).dead_window == 1024  # never under one batch
    assert default_settings(TrainConfig, train_tokens=1_000_000, dead_window_tokens=5000).dead_window == 5000


def test_auxk_switches_on_in_a_short_run_by_default(tmp_path):
    trainer = make_trainer(tmp_path, {"a": run_cfg(architecture="topk", k=2, expansion_factor=8, train_tokens=64 * 200)})
    steps_with_auxk = []
    original = trainer.saes[0].training_losses
    trainer.saes[0].training_losses = lambda *a, **k: (t := original(*a, **k)) and (steps_with_auxk.append("auxk" in t) or t)
    trainer.train()
    assert any(steps_with_auxk)  # some latent went silent for a tenth of the run, and AuxK revived it


@pytest.mark.parametrize("architecture", ["topk", "batchtopk", "jumprelu"])
def test_every_architecture_trains(tmp_path, architecture):
    run = run_cfg(architecture=architecture, k=4, l1_coefficient=0.01, dead_window_tokens=64 * 10)
    trainer = make_trainer(tmp_path, {"a": run})
    trainer.train()
    rows = [json.loads(line) for line in trainer.log_path.read_text().splitlines() if "event" not in line]
    assert rows[-1]["explained_variance"] > 0.5 and math.isfinite(rows[-1]["loss"])
    if architecture == "topk":
        assert rows[-1]["l0"] <= 4


# --- torn and corrupted resume files, then a rerun ---------------------------------------------


SMALL_RUN = run_cfg(expansion_factor=2, train_tokens=64 * 60, checkpoint_every=20, log_every=10, resample_steps=[30])


def _weights(sae):
    return {k: v.clone() for k, v in sae.state_dict().items()}


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """An uninterrupted run; it leaves its last checkpoint (step 40) and its log (through step 60)."""
    root = tmp_path_factory.mktemp("straight")
    trainer = make_trainer(root, {"a": SMALL_RUN})
    (sae,) = trainer.train()
    return trainer.resume_dir, _weights(sae), trainer.log_path.read_text()


def _rerun_from(tmp_path, straight_run, damage):
    resume_dir, weights, log_text = straight_run
    shutil.copytree(resume_dir, tmp_path / "resume")
    trainer = make_trainer(tmp_path, {"a": SMALL_RUN})
    damage(trainer)
    (sae,) = trainer.train()
    assert all(torch.equal(weights[k], v) for k, v in sae.state_dict().items()), "the rerun ended elsewhere"
    assert trainer.log_path.read_text() == log_text
    assert sorted(p.name for p in trainer.resume_dir.iterdir()) == ["checkpoint.pt", "train_log.jsonl"]  # no temporaries
    return trainer


@pytest.mark.parametrize("torn", ['{"step": 18', "{", '\xff\xfe{"st', "null", '{"sae": "a"}', '[1, 2]', '{"step": "x"'])
def test_a_torn_last_log_line_is_dropped_and_the_rerun_matches(tmp_path, straight_run, torn):
    def tear(trainer):
        with open(trainer.log_path, "a", encoding="utf-8", errors="surrogateescape") as f:
            f.write(torn)  # no newline: the write was cut short

    _rerun_from(tmp_path, straight_run, tear)


@pytest.mark.parametrize("corrupt", ["truncated", "empty", "garbage", "not_a_checkpoint", "missing_keys"])
def test_an_unreadable_checkpoint_restarts_from_zero_with_a_warning(tmp_path, straight_run, corrupt, caplog):
    def damage(trainer):
        path = trainer.checkpoint_path
        data = path.read_bytes()
        if corrupt == "truncated":
            path.write_bytes(data[: len(data) // 2])
        elif corrupt == "empty":
            path.write_bytes(b"")
        elif corrupt == "garbage":
            path.write_bytes(os.urandom(4096))
        elif corrupt == "not_a_checkpoint":
            torch.save([1, 2, 3], path)
        else:
            state = torch.load(path, weights_only=False)
            del state["optimizer"]
            torch.save(state, path)

    with caplog.at_level("WARNING", logger="monoscope.train"):
        _rerun_from(tmp_path, straight_run, damage)
    assert any("checkpoint" in r.message and "step 0" in r.message and str(tmp_path) in r.message for r in caplog.records)


def test_a_checkpoint_from_stores_of_another_hook_or_model_is_not_resumed(tmp_path, straight_run):
    resume_dir = straight_run[0]
    identity = store_identity({"model_id": "native:aa", "hook": "blocks.0.mlp.hook_post", "dtype": "float16"}, 3200)
    shutil.copytree(resume_dir, tmp_path / "resume")
    # The straight run recorded no store identity; any recorded one is other data.
    assert not make_trainer(tmp_path, {"a": SMALL_RUN}, source_identity=[identity]).try_resume()
    trainer = make_trainer(tmp_path, {"a": SMALL_RUN}, source_identity=[identity])
    trainer.save_checkpoint()
    assert make_trainer(tmp_path, {"a": SMALL_RUN}, source_identity=[dict(identity)]).try_resume()
    for change in ({"hook": "blocks.0.mlp.hook_pre"}, {"model_id": "native:bb"}, {"keep_mantissa_bits": 4}, {"n_tokens": 3199}):
        other = {**identity, **change}
        assert not make_trainer(tmp_path, {"a": SMALL_RUN}, source_identity=[other]).try_resume(), change
    assert store_identity({"hook": "h", "package_version": "1"}, 5) == store_identity({"hook": "h", "package_version": "2"}, 5)


# --- resume after kill -9; 2 processes against 1: through the Snakemake rule's script ----------


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    paths = []
    for i in range(2):
        acts = synthetic_acts(32 * 64, seed=i)
        path = root / f"train_{i:03d}.zarr"
        write_activation_store(path, acts, np.zeros((64, 32), np.int32), {"model_id": "test"}, chunk_tokens=128, dtype="float32")
        paths.append(str(path))
    return paths


def script_command(stores, runs, out_root, launcher=(sys.executable,)):
    return [*launcher, str(SCRIPT), *stores, "--runs", json.dumps(runs), "--out-root", str(out_root),
            "--resume-dir", str(Path(out_root) / "resume"), "--threads", "1"]  # fmt: skip


def job_env():
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}


def test_kill_9_then_rerun_ends_bit_identical_to_an_uninterrupted_run(tmp_path, stores):
    # 16x: wide enough that after the first steps under 10 % of the entries fire (the sparse products).
    runs = {"a": run_cfg(train_tokens=64 * 600, expansion_factor=16, checkpoint_every=25, resample_steps=[150, 300], resample_window=60)}
    subprocess.run(script_command(stores, runs, tmp_path / "straight"), env=job_env(), check=True)

    killed = tmp_path / "killed"
    checkpoint = killed / "resume" / "checkpoint.pt"
    job = subprocess.Popen(script_command(stores, runs, killed), env=job_env())
    deadline = time.time() + 120
    while time.time() < deadline and not (checkpoint.exists() and torch.load(checkpoint, weights_only=False)["progress"]["step"] >= 150):
        time.sleep(0.05)
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert not (killed / "a" / "sae.safetensors").exists(), "the job finished before it was killed"
    subprocess.run(script_command(stores, runs, killed), env=job_env(), check=True)

    straight = load_file(tmp_path / "straight" / "a" / "sae.safetensors")
    resumed = load_file(killed / "a" / "sae.safetensors")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    log = lambda root: (root / "a" / "train_log.jsonl").read_text()  # noqa: E731
    assert log(killed) == log(tmp_path / "straight")
    assert not (killed / "resume").exists()
    # The resumed steps ran the sparse products (few features fire), not only the dense ones.
    d_sae = straight["W_enc"].shape[1]
    late = [r for r in map(json.loads, log(killed).splitlines()) if "event" not in r and r["step"] > 150]
    assert late and all(r["l0"] / d_sae < SPARSE_MAX_DENSITY for r in late)


def test_two_gloo_processes_match_one_process(tmp_path, stores):
    """Same global batches either way (see monoscope.loader); only the order of float sums differs."""
    # A one-step window so that some features count as dead and the resampling path runs in both.
    runs = {"a": run_cfg(train_tokens=64 * 150, expansion_factor=8, l1_coefficient=8.0, resample_steps=[100], resample_window=1)}
    subprocess.run(script_command(stores, runs, tmp_path / "one"), env=job_env(), check=True)
    # `--multi_gpu` is accelerate's torchrun launcher; without CUDA the trainer asks for gloo on the CPU.
    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no")  # fmt: skip
    job = subprocess.run(
        script_command(stores, runs, tmp_path / "two", launcher), env=job_env(), check=True, capture_output=True, text=True
    )
    assert "process 1 of 2 on cpu" in job.stdout
    one = load_file(tmp_path / "one" / "a" / "sae.safetensors")
    two = load_file(tmp_path / "two" / "a" / "sae.safetensors")
    for key in one:
        assert torch.allclose(one[key], two[key], rtol=0, atol=1e-5), key
    resampled = lambda root: [r for r in map(json.loads, (root / "a" / "train_log.jsonl").read_text().splitlines()) if "event" in r]  # noqa: E731
    assert resampled(tmp_path / "one") == resampled(tmp_path / "two")
    assert resampled(tmp_path / "one")[0]["resampled"] > 0


def test_resampling_memory_is_bounded_once_the_width_is_known(tmp_path):
    """A pretrained model's width is unknown at planning; the trainer refuses before it draws a batch."""
    with pytest.raises(ValueError, match=r"'sae.resample_inputs': 1000000000 inputs of width 16 hold 119 GiB"):
        Trainer({"a": run_cfg(resample_inputs=10**9)}, D, list_source(synthetic_acts(64), 64), tmp_path / "resume", show_progress=False)
    Trainer({"a": run_cfg(resample_inputs=10**9, resample_steps=[])}, D, list_source(synthetic_acts(64), 64), tmp_path / "r2",
            show_progress=False)  # never resamples: nothing is held
