"""The feature analyses on a tiny native model, activation store and SAE built here (seconds)."""

from __future__ import annotations

import json
import re
import sysconfig
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from monoscope import evaluate, features, models, pretrained, sae, store, tokenize

CONTEXT = 32
D_MLP = 48


def tiny_config(**features_settings) -> dict:
    settings = {"top_k": 5, "quantile_bins": 4, "per_bin": 2, "context_tokens": 3, "histogram_bins": 16,
                "ablation_top": 3, "ablation_units": [7], "ablation_seqs": 8, "rare_sample": 64, **features_settings}
    return {"seed": 0, "model": {"source": "native", "layer": 0, "hook": "mlp.hook_post"}, "features": settings}


def python_sources(n_files: int = 12) -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [p.read_text(encoding="utf-8") for p in sorted(stdlib.glob("[a-c]*.py"))[:n_files]]


def build_tiny_results(root: Path) -> dict:
    """results/{tokenizer,model,activations,sae,eval}/ for a 1-layer model with 48 neurons and a 2x SAE."""
    torch.manual_seed(0)
    texts = python_sources()
    tokenizer = tokenize.train_bpe(texts, vocab_size=300)
    tokenize.save_tokenizer(tokenizer, root / "tokenizer")
    tokens = tokenize.pack(texts, tokenizer, CONTEXT)[:96]
    native = {"d_model": 32, "d_mlp": D_MLP, "n_heads": 2, "n_layers": 1, "act_fn": "gelu"}
    bridge = models.boot_native(native, len(tokenizer), CONTEXT, 0).eval()
    models.save_native(bridge, native, len(tokenizer), CONTEXT, 0, root / "model", {})
    with torch.no_grad():
        acts = pretrained.run_to_hook(bridge, torch.from_numpy(tokens).long(), "blocks.0.mlp.hook_post")
    store_path = root / "activations" / "eval_000.zarr"
    store.write_activation_store(store_path, acts.flatten(0, 1).numpy(), tokens, {"hook": "blocks.0.mlp.hook_post"},
                                 chunk_tokens=CONTEXT * 16, dtype="float32")
    sae_model = sae.SAE(sae.SAEConfig(d_in=D_MLP, d_sae=2 * D_MLP), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae_model.b_enc.fill_(-0.05)  # some features rare, some dead: both paths of the analyses run
    sae_model.save(root / "sae" / "x2")
    for name, sae_dir in (("neurons", None), ("x2", root / "sae" / "x2")):
        dictionary = evaluate.load_dictionary(name, sae_dir, D_MLP)
        stats = evaluate.FeatureStats(dictionary.d_sae, keep_codes=name != "neurons")
        with torch.no_grad():
            stats.update(dictionary.encode(acts.flatten(0, 1)))
        (root / "eval" / name).mkdir(parents=True)
        stats.table().to_parquet(root / "eval" / name / "features.parquet")
        stats.save_codes(root / "eval" / name / "codes.safetensors", CONTEXT)
    return {"tokens": tokens, "acts": acts.numpy(), "store": store_path, "tokenizer": root / "tokenizer"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    built = build_tiny_results(root)
    for name, sae_dir in (("neurons", None), ("x2", root / "sae" / "x2")):
        features.analyse_dictionary(tiny_config(), name, sae_dir, root / "model", root / "tokenizer", [built["store"]],
                                    root / "eval" / name / "features.parquet", root / "features" / name, log=lambda _: None,
                                    eval_codes=root / "eval" / name / "codes.safetensors")
    return root, built


def test_the_evaluations_codes_stand_in_for_encoding(tiny, tmp_path):
    root, built = tiny
    dictionary = evaluate.load_dictionary("x2", root / "sae" / "x2", D_MLP)
    activations = store.open_activations(built["store"])
    encoded = list(features.iter_unit_blocks(dictionary, [activations], 4, None))
    assert features.Codes(root / "eval" / "neurons" / "codes.safetensors").n_seq == 0  # the neurons: nothing kept
    # Codes of the first 10 sequences only: blocks 0-3 and 4-7 come from them, 8-11 onwards are encoded.
    stats = evaluate.FeatureStats(dictionary.d_sae, keep_codes=True)
    with torch.no_grad():
        stats.update(dictionary.encode(torch.from_numpy(built["acts"][:10]).flatten(0, 1)))
    stats.save_codes(tmp_path / "codes.safetensors", CONTEXT)
    for path, covered in ((root / "eval" / "x2" / "codes.safetensors", activations.n_seq), (tmp_path / "codes.safetensors", 10)):
        codes = features.Codes(path)
        assert codes.n_seq == covered and 0 < len(codes.values) < covered * CONTEXT * dictionary.d_sae
        reused = list(features.iter_unit_blocks(dictionary, [activations], 4, None, codes=codes))
        assert len(reused) == len(encoded) > 3
        for (tokens, f), (tokens_reused, f_reused) in zip(encoded, reused, strict=True):
            assert np.array_equal(tokens, tokens_reused)
            torch.testing.assert_close(f_reused, f, rtol=1e-5, atol=1e-6)


def test_top_examples_are_the_true_maxima(tiny):
    root, built = tiny
    result = features.load_features(root / "features" / "neurons")
    acts, tokens = built["acts"], built["tokens"]  # [n_seq, s, d]
    seq_max = acts.max(axis=1)  # [n_seq, d]
    top = result["examples"]["top_values"]  # [d, k]
    expected = -np.sort(-seq_max, axis=0)[:5].T
    np.testing.assert_allclose(top, expected, rtol=1e-5)
    unit, rank = 11, 0
    seq = result["examples"]["top_seq"][unit, rank]
    pos = int(acts[seq, :, unit].argmax())
    window = result["examples"]["top_windows"][unit, rank]  # [7]: 3 either side
    assert window[3] == pytest.approx(top[unit, rank], rel=1e-3)
    assert result["examples"]["top_tokens"][unit, rank, 3] == tokens[seq, pos]
    lo, hi = max(0, pos - 3), min(CONTEXT, pos + 4)
    np.testing.assert_allclose(window[3 - (pos - lo): 3 + (hi - pos)], acts[seq, lo:hi, unit], rtol=1e-2, atol=1e-3)


def test_density_histogram_and_quantile_samples(tiny):
    root, built = tiny
    result = features.load_features(root / "features" / "x2")
    with torch.no_grad():
        f = sae.load_dictionary(root / "sae" / "x2").encode(torch.from_numpy(built["acts"])).numpy()  # [n, s, d_sae]
    np.testing.assert_allclose(result["units"]["density"], (f > 0).mean(axis=(0, 1)), rtol=1e-6)
    histogram = result["examples"]["histogram"]
    assert (histogram.sum(1) == f.shape[0] * f.shape[1]).all()
    np.testing.assert_array_equal(histogram[:, 0], (f <= 0).sum(axis=(0, 1)))  # SAE floor is exactly zero
    alive = int(np.argmax(result["units"]["density"]))
    values = result["examples"]["quantile_values"][alive]
    intervals = result["examples"]["quantile_interval"]
    upper = result["examples"]["histogram_upper"][alive]
    filled = result["examples"]["quantile_seq"][alive] >= 0
    assert filled.any()
    assert (np.minimum(np.floor(values[filled] / upper * 4), 3) == intervals[filled]).all()
    dead = result["units"]["density"].to_numpy() == 0
    assert (result["examples"]["quantile_seq"][dead] == -1).all()


def test_logit_weights_ablation_and_neuron_geometry(tiny):
    root, _ = tiny
    result = features.load_features(root / "features" / "neurons")
    state = models.load_native(root / "model").state_dict()
    w_out, w_u = state["blocks.0.mlp.out.weight"], state["unembed.weight"]
    direction = w_out[:, 5] - w_out[:, 5].mean()
    logits = (direction * state["ln_final.weight"]) @ w_u.T
    assert list(result["weights"]["logit_top_ids"][5]) == logits.topk(10).indices.tolist()
    assert list(result["weights"]["logit_bottom_ids"][5]) == (-logits).topk(10).indices.tolist()
    expected_cos = torch.nn.functional.cosine_similarity(state["blocks.0.mlp.in.weight"][5], w_out[:, 5], dim=0)
    assert result["units"]["cos_in_out"][5] == pytest.approx(expected_cos.item(), abs=1e-5)
    units = result["units"]
    ablated = units["ablation_delta_loss"].notna()
    densest = set(units.sort_values("density", ascending=False, kind="stable")["unit"][:3])
    assert set(units["unit"][ablated]) == densest | {7}
    assert (units["ablation_delta_loss"][ablated] != 0).all()


def test_sae_outputs_neighbours_and_rare_figure(tiny):
    root, _ = tiny
    result = features.load_features(root / "features" / "x2")
    w_dec = sae.load_dictionary(root / "sae" / "x2").W_dec.detach()
    assert result["weights"]["feature_neurons"][3][0] == int(w_dec[3].abs().argmax())
    assert result["weights"]["neuron_features"][4][0] == int(w_dec[:, 4].argmax())
    assert (root / "features" / "x2" / "rare_features.png").stat().st_size > 1000
    summary = json.loads((root / "features" / "x2" / "summary.json").read_text())
    assert summary["provenance"]["name"] == "x2"
    assert set(summary["concepts"]) >= {"comment", "number", "def_name"}
    assert "auroc_comment" in result["units"]


def test_results_are_reproducible(tiny, tmp_path):
    root, built = tiny
    features.analyse_dictionary(tiny_config(), "x2", root / "sae" / "x2", root / "model", root / "tokenizer",
                                [built["store"]], root / "eval" / "x2" / "features.parquet", tmp_path / "x2", log=lambda _: None)
    again, first = features.load_features(tmp_path / "x2"), features.load_features(root / "features" / "x2")
    for key in ("top_seq", "quantile_seq", "histogram"):
        np.testing.assert_array_equal(again["examples"][key], first["examples"][key])


def test_block_size_does_not_change_results(tiny, tmp_path):
    root, built = tiny
    features.analyse_dictionary(tiny_config(block_mib=1), "neurons", None, root / "model", root / "tokenizer",
                                [built["store"]], root / "eval" / "neurons" / "features.parquet", tmp_path / "n", log=lambda _: None)
    small, big = features.load_features(tmp_path / "n"), features.load_features(root / "features" / "neurons")
    assert features.seqs_per_block(D_MLP, CONTEXT, 1) < len(built["tokens"])
    for key in ("top_values", "histogram"):  # (sequence ids may swap where two sequences tie)
        np.testing.assert_array_equal(small["examples"][key], big["examples"][key])
    pd.testing.assert_frame_equal(small["units"], big["units"], check_exact=False, rtol=1e-6)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="features.top_k"):
        features.FeatureSettings.from_config(tiny_config(top_k=0))
    with pytest.raises(ValueError, match="unknown features config key"):
        features.FeatureSettings.from_config(tiny_config(topk=3))
    with pytest.raises(ValueError, match="'broken'"):
        features.FeatureSettings.from_config(tiny_config(concepts=[{"name": "broken", "pattern": "("}]))
    with pytest.raises(ValueError, match="features.probe_report_fraction"):
        features.FeatureSettings.from_config(tiny_config(probe_report_fraction=1.0))
    with pytest.raises(ValueError, match="features.probe_k"):
        features.FeatureSettings.from_config(tiny_config(probe_k=[0, 4]))
    with pytest.raises(ValueError, match="features.specificity_thresholds"):
        features.FeatureSettings.from_config(tiny_config(specificity_thresholds=[1.5]))


def test_rules_plan_one_features_job_per_dictionary_and_the_site(tmp_path):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    plan = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(repo / "Snakefile"), "--directory", str(tmp_path),
                           "results/report/browser/index.html", "-n", "--configfile", str(repo / "tests" / "config" / "tiny.yaml"),
                           "--quiet", "rules"], cwd=repo, capture_output=True, text=True)  # fmt: skip
    assert plan.returncode == 0, plan.stdout + plan.stderr
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", plan.stdout, flags=re.MULTILINE))
    assert counts["features"] == "3" and counts["site"] == "1"  # x1, x2 and the neurons


def test_the_held_out_comparison_splits_alike_for_every_dictionary(tiny):
    root, built = tiny
    summaries = {name: features.load_features(root / "features" / name)["summary"] for name in ("neurons", "x2")}
    held_out = {name: s["held_out"] for name, s in summaries.items()}
    for name, h in held_out.items():
        assert h["selection_seqs"] + h["report_seqs"] == len(built["tokens"])  # the tiny run samples every sequence
        assert h["report_seqs"] == round(0.5 * len(built["tokens"]))
        for concept, entry in summaries[name]["concepts"].items():
            if entry["best_unit"] is not None:
                assert set(entry["sparse_probe"]) == {"1", "2", "4", "8", "16"}
                for k, probe in entry["sparse_probe"].items():  # intervals where the report shows them
                    assert (probe["ci_low"] <= probe["auroc"] <= probe["ci_high"]) == (k in ("1", "16"))
    assert held_out["neurons"]["report_tokens"] == held_out["x2"]["report_tokens"]
    units = features.load_features(root / "features" / "x2")["units"]
    assert {"heldout_auroc_comment", "specific_precision_tau0.5", "specific_concept_tau0.8"} <= set(units.columns)
