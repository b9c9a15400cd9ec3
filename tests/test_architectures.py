"""Every preset's architecture family through the whole pipeline, offline: corpus to report and browser.

Tiny random-weight GPT-2 (Conv1D MLP, LayerNorm), GPT-NeoX (Pythia: Linear MLP, LayerNorm) and
Llama (SmolLM2: gated MLP, RMSNorm) and Gemma 3 ((1 + weight) RMSNorm gains, a norm after the MLP)
models saved as local Hugging Face folders (`model.source: hub`, `model.name: <folder>`), each with
a tokenizer smaller than its unembedding, and every stage on. The runs start together so their job
start-ups overlap; `legacy TransformerLens` models cannot be run offline (TL4's loader lists the
hub's files even when cached), so tl_legacy is covered by test_pretrained's error test only.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from selenium.webdriver.common.by import By
from conftest import REPO, open_page, snakemake_command
from tiny_hf import D_MLP, FAMILIES, TOKENIZER_VOCAB, hf_parts, save_tiny_model

from monoscope import features, sae, store

SAE_NAME, EXPANSION = "x2_l1-5", 2


def family_config(model_dir: Path) -> dict:
    """The smallest run with every stage on: 1 training and 1 held-out shard of 48 sequences of 64 tokens."""
    return {
        "seed": 0,
        "corpus": {"source": "stdlib", "max_documents": 60, "n_shards": 2, "n_eval_shards": 1},
        "tokenizer": {"context": 64},
        "model": {"source": "hub", "name": str(model_dir), "layer": 1, "hook": "mlp.hook_post"},
        "harvest": {"batch_size": 16, "max_seqs_per_shard": 48},
        "sae": {"expansion_factors": [EXPANSION], "l1_coefficients": [5.0], "train_tokens": 6144, "batch_size": 256,
                "loader_streams": 1, "norm_sample_tokens": 2048},
        "evaluate": {"max_seqs": 16, "batch_size": 16},
        "features": {"ablation_top": 4, "ablation_seqs": 4, "top_k": 5},
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """family -> the working directory of its finished run."""
    root = tmp_path_factory.mktemp("families")
    started = {}
    for family in FAMILIES:
        model_dir = save_tiny_model(family, root / f"{family}-model")
        config = root / f"{family}.yaml"
        config.write_text(yaml.safe_dump(family_config(model_dir)))
        cmd = snakemake_command(root / family, "--cores", "1", "--configfile", str(config))
        log = open(root / f"{family}.log", "w")
        started[family] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO), log, cmd)
    failed = []
    for family, (process, log, cmd) in started.items():
        process.wait()
        log.close()
        if process.returncode != 0:
            failed.append(f"{family}: {' '.join(cmd)} failed:\n{(root / f'{family}.log').read_text()[-4000:]}")
    assert not failed, "\n\n".join(failed)
    return {family: root / family for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_stage_writes_units_of_the_right_shapes(runs, family):
    results = runs[family] / "results"
    assert store.open_activations(results / "activations" / "eval_000.zarr").d == D_MLP
    neurons = features.load_features(results / "features" / "neurons")
    feats = features.load_features(results / "features" / SAE_NAME)
    assert len(neurons["units"]) == D_MLP and len(feats["units"]) == EXPANSION * D_MLP
    cosine = neurons["units"]["cos_in_out"].to_numpy()  # neuron geometry: one cosine per neuron
    assert cosine.shape == (D_MLP,) and np.isfinite(cosine).all() and np.abs(cosine).max() <= 1 + 1e-6
    for result in (neurons, feats):
        assert result["weights"]["logit_top_ids"].shape == (len(result["units"]), 10)
        assert result["weights"]["logit_top_ids"].max() < TOKENIZER_VOCAB  # no padding row of the unembedding
        assert result["units"]["ablation_delta_loss"].notna().sum() == 4
        assert result["summary"]["concepts"] and "best_concept_auroc" in result["units"]
    assert ("rmsnorm" if family in ("llama", "gemma3") else "layernorm") in neurons["summary"]["logit_weights"]
    metrics = pd.read_json(results / "report" / "summary.json")
    assert set(metrics["name"]) == {"neurons", SAE_NAME} and metrics["reconstruction_score"].notna().all()


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_logit_weights_equal_a_direct_computation_through_w_u(runs, family):
    from transformers import AutoModelForCausalLM

    results = runs[family] / "results"
    hf = AutoModelForCausalLM.from_pretrained(str(runs[family].parent / f"{family}-model")).eval()
    _, out_proj, post_norm, final_norm = hf_parts(hf, family)
    w_u = hf.get_output_embeddings().weight[:TOKENIZER_VOCAB]  # [n_vocab, d_model]
    w_dec = sae.load_sae(results / "sae" / SAE_NAME).W_dec  # [d_sae, d_mlp]
    for name, directions in (("neurons", torch.eye(D_MLP)[:8]), (SAE_NAME, w_dec[:8])):
        resid = out_proj(directions) - out_proj(torch.zeros(1, D_MLP))
        if post_norm is not None:
            resid = post_norm(resid)
        logits = (final_norm(resid) - final_norm(torch.zeros_like(resid[:1]))) @ w_u.T
        weights = features.load_features(results / "features" / name)["weights"]
        np.testing.assert_array_equal(weights["logit_top_ids"][:8], logits.topk(10).indices.numpy(), err_msg=name)
        np.testing.assert_array_equal(weights["logit_bottom_ids"][:8], (-logits).topk(10).indices.numpy(), err_msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_browser_page_loads_without_console_errors(runs, family, browser):  # noqa: F811
    site = runs[family] / "results" / "report" / "browser"
    assert (runs[family] / "results" / "report" / "index.html").stat().st_size > 0
    open_page(browser, (site / "index.html").as_uri(), ready=False)
    for name in ("neurons", SAE_NAME):
        open_page(browser, (site / name / "index.html").as_uri())
        for unit in (0, 1, D_MLP - 1):  # each unit page shows its logit tokens through vocab.js
            browser.get("about:blank")  # a fresh load, so `ready` is this unit's
            open_page(browser, (site / name / "unit.html").as_uri() + f"#{unit}")
            top_tokens = browser.find_elements(By.XPATH, "//table[tr/th='Top logit weights']/tr/td[@class='text']")
            assert len(top_tokens) == 10, f"{name} unit {unit}: {len(top_tokens)} top logit tokens shown"
