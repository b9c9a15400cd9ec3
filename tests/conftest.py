"""Fixtures and helpers shared across test modules: the tiny pipeline run, one way to run Snakemake, a
tiny results folder built in memory (tokenizer, model, store, SAE, evaluation, feature analyses) and a
headless Chromium."""

import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "config" / "tiny.yaml"
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def snakemake_command(workdir: Path, *args: str, snakefile: Path = REPO / "Snakefile") -> list[str]:
    """The command line that runs a Snakefile (this checkout's) in workdir with `args`."""
    return [SNAKEMAKE, "-s", str(snakefile), "--directory", str(workdir), *args]


def snakemake(workdir: Path, *args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """snakemake_command run from the checkout, output captured (kwargs: subprocess.run's, e.g. env).
    check: raise with the output's tail when it fails."""
    cmd = snakemake_command(workdir, *args)
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}")
    return result


def job_counts(output: str) -> dict[str, int]:
    """Rule -> jobs from the 'Job stats' table Snakemake prints ({} when there is nothing to do); no 'total'."""
    if "Job stats:" not in output:
        return {}
    table = output.split("Job stats:", 1)[1].lstrip("\n").split("\n\n", 1)[0]
    return {rule: int(count) for rule, count in re.findall(r"^(\w[\w.-]*)\s+(\d+)$", table, re.MULTILINE) if rule != "total"}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny pipeline run once, locally, as-is: (working directory, config file). Read-only for tests:
    the workflow tests plan reruns against it and the Slurm tests compare their results with it."""
    workdir = tmp_path_factory.mktemp("tiny")
    config = workdir / "c.yaml"
    config.write_text(TINY.read_text())
    snakemake(workdir, "--cores", "2", "--configfile", str(config))
    return workdir, config


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the Slurm run of tests/test_slurm.py now if a selected test needs it: minutes of waiting on
    sbatch round trips and status polls, spent while the other modules run."""
    needing = [item for item in session.items if "slurm_run" in getattr(item, "fixturenames", ())]
    if needing:
        needing[0].module.start_in_background(session.config)


# --- a tiny results folder, built in memory ------------------------------------------------------

CONTEXT = 32
D_MLP = 48
TINY_MODEL = {"source": "native"}  # the `model` section as the stages read it: the native model in results/model
TINY_HOOK = "blocks.0.mlp.hook_post"


def tiny_feature_settings(**overrides):
    """Feature settings small enough for the tiny results: the schema's defaults, then these."""
    from monoscope.config import default_settings
    from monoscope.features import FeatureSettings

    small = {"top_k": 5, "quantile_bins": 4, "per_bin": 2, "context_tokens": 3, "histogram_bins": 16,
             "ablation_top": 3, "ablation_units": [7], "ablation_seqs": 8, "rare_sample": 64}
    return default_settings(FeatureSettings, **(small | overrides))


def record_settings(**overrides):
    """Autointerp settings from the schema's defaults and `overrides` (collect_records reads the record keys)."""
    from monoscope.autointerp.pipeline import AutointerpSettings
    from monoscope.config import default_settings

    return default_settings(AutointerpSettings, **overrides)


def python_sources(n_files: int = 12) -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [p.read_text(encoding="utf-8") for p in sorted(stdlib.glob("[a-c]*.py"))[:n_files]]


def build_tiny_results(root: Path) -> dict:
    """results/{tokenizer,model,activations,sae,eval}/ for a 1-layer model with 48 neurons and a 2x SAE."""
    import torch

    from monoscope import evaluate, models, pretrained, sae, store, tokenize
    from monoscope.config import default_settings
    from monoscope.dictionary import open_dictionary
    from monoscope.train import TrainConfig, sae_config

    torch.manual_seed(0)
    texts = python_sources()
    tokenizer = tokenize.train_bpe(texts, vocab_size=300)
    tokenize.save_tokenizer(tokenizer, root / "tokenizer")
    tokens = tokenize.pack(texts, tokenizer, CONTEXT)[:96]
    native = {"d_model": 32, "d_mlp": D_MLP, "n_heads": 2, "n_layers": 1, "act_fn": "gelu"}
    bridge = models.boot_native(native, len(tokenizer), CONTEXT, 0).eval()
    models.save_native(bridge, native, len(tokenizer), CONTEXT, 0, root / "model", {})
    with torch.no_grad():
        acts = pretrained.run_to_hook(bridge, torch.from_numpy(tokens).long(), TINY_HOOK)
    store_path = root / "activations" / "eval_000.zarr"
    store.write_activation_store(store_path, acts.flatten(0, 1).numpy(), tokens, {"hook": TINY_HOOK},
                                 chunk_tokens=CONTEXT * 16, dtype="float32")
    sae_model = sae.SAE(sae_config(default_settings(TrainConfig, expansion_factor=2), D_MLP),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae_model.b_enc.fill_(-0.05)  # some features rare, some dead: both paths of the analyses run
    sae_model.save(root / "sae" / "x2")
    for name, sae_dir in (("neurons", None), ("x2", root / "sae" / "x2")):
        dictionary = open_dictionary(name, sae_dir, D_MLP)
        stats = evaluate.FeatureStats(dictionary.d_sae, keep_codes=name != "neurons")
        with torch.no_grad():
            stats.update(dictionary.encode(acts.flatten(0, 1)))
        (root / "eval" / name).mkdir(parents=True)
        stats.table().to_parquet(root / "eval" / name / "features.parquet")
        stats.save_codes(root / "eval" / name / "codes.safetensors", CONTEXT)
    return {"tokens": tokens, "acts": acts.numpy(), "store": store_path, "tokenizer": root / "tokenizer"}


@pytest.fixture(scope="session")
def tiny_results(tmp_path_factory):
    """build_tiny_results with both dictionaries' feature analyses (the evaluation's codes reused): (root, built).
    Read-only for tests: copy it to change it."""
    from monoscope import features

    root = tmp_path_factory.mktemp("results")
    built = build_tiny_results(root)
    for name, sae_dir in (("neurons", None), ("x2", root / "sae" / "x2")):
        features.analyse_dictionary(tiny_feature_settings(), TINY_MODEL, root / "model", TINY_HOOK, name, sae_dir,
                                    tokenizer_dir=root / "tokenizer", eval_stores=[built["store"]],
                                    unit_stats=root / "eval" / name / "features.parquet",
                                    eval_codes=root / "eval" / name / "codes.safetensors",
                                    out_dir=root / "features" / name, log=lambda _: None)
    return root, built


# --- headless Chromium ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium and chromedriver driven by Selenium (scripts/setup.d/chromium.sh installs them)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    assert not missing, f"{', '.join(missing)} missing: run scripts/setup.d/chromium.sh (Debian chromium, chromium-driver)"
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--window-size=1200,900"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def open_page(driver, url: str, ready: bool = True):
    """Load url (waiting for the page to say it is ready) and fail on any console error."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    if ready:
        WebDriverWait(driver, 10).until(lambda d: d.execute_script("return document.body.dataset.ready === '1'"))
    errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == [], f"console errors on {url}: {errors}"
