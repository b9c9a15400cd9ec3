"""The feature analyses on a tiny native model, activation store and SAE built here (seconds)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import CONTEXT, D_MLP, TINY, TINY_HOOK, TINY_MODEL, job_counts, snakemake, tiny_feature_settings

from monoscope import evaluate, features, models, sae, store
from monoscope.config import ConfigError, validate_config
from monoscope.dictionary import open_dictionary

def analyse(root: Path, built: dict, name: str, out_dir: Path, settings=None, eval_codes: bool = True) -> None:
    sae_dir = None if name == "neurons" else root / "sae" / name
    features.analyse_dictionary(settings or tiny_feature_settings(), TINY_MODEL, root / "model", TINY_HOOK, name, sae_dir,
                                tokenizer_dir=root / "tokenizer", eval_stores=[built["store"]],
                                unit_stats=root / "eval" / name / "features.parquet",
                                eval_codes=root / "eval" / name / "codes.safetensors" if eval_codes else None,
                                out_dir=out_dir, log=lambda _: None)


def test_the_evaluations_codes_stand_in_for_encoding(tiny_results, tmp_path):
    root, built = tiny_results
    dictionary = open_dictionary("x2", root / "sae" / "x2", D_MLP)
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


def test_top_examples_are_the_true_maxima(tiny_results):
    root, built = tiny_results
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


def test_density_histogram_and_quantile_samples(tiny_results):
    root, built = tiny_results
    result = features.load_features(root / "features" / "x2")
    with torch.no_grad():
        f = sae.load_sae(root / "sae" / "x2").encode(torch.from_numpy(built["acts"])).numpy()  # [n, s, d_sae]
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


def test_logit_weights_ablation_and_neuron_geometry(tiny_results):
    root, _ = tiny_results
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


def test_sae_outputs_neighbours_and_rare_figure(tiny_results):
    root, _ = tiny_results
    result = features.load_features(root / "features" / "x2")
    w_dec = sae.load_sae(root / "sae" / "x2").W_dec.detach()
    assert result["weights"]["feature_neurons"][3][0] == int(w_dec[3].abs().argmax())
    assert result["weights"]["neuron_features"][4][0] == int(w_dec[:, 4].argmax())
    assert (root / "features" / "x2" / "rare_features.png").stat().st_size > 1000
    summary = json.loads((root / "features" / "x2" / "summary.json").read_text())
    assert summary["provenance"]["name"] == "x2"
    assert set(summary["concepts"]) >= {"comment", "number", "def_name"}
    assert "auroc_comment" in result["units"]


def test_results_are_reproducible(tiny_results, tmp_path):
    root, built = tiny_results
    analyse(root, built, "x2", tmp_path / "x2", eval_codes=False)
    again, first = features.load_features(tmp_path / "x2"), features.load_features(root / "features" / "x2")
    for key in ("top_seq", "quantile_seq", "histogram"):
        np.testing.assert_array_equal(again["examples"][key], first["examples"][key])


def test_block_size_does_not_change_results(tiny_results, tmp_path):
    root, built = tiny_results
    analyse(root, built, "neurons", tmp_path / "n", tiny_feature_settings(block_mib=1), eval_codes=False)
    small, big = features.load_features(tmp_path / "n"), features.load_features(root / "features" / "neurons")
    assert features.seqs_per_block(D_MLP, CONTEXT, 1) < len(built["tokens"])
    for key in ("top_values", "histogram"):  # (sequence ids may swap where two sequences tie)
        np.testing.assert_array_equal(small["examples"][key], big["examples"][key])
    pd.testing.assert_frame_equal(small["units"], big["units"], check_exact=False, rtol=1e-6)


@pytest.mark.parametrize("features_section, key", [
    ({"top_k": 0}, "features.top_k"),
    ({"topk": 3}, "'features.topk'"),
    ({"concepts": [{"name": "broken", "pattern": "("}]}, "'broken'"),
    ({"probe_report_fraction": 1.0}, "features.probe_report_fraction"),
    ({"probe_k": [0, 4]}, "features.probe_k"),
    ({"specificity_thresholds": [1.5]}, "features.specificity_thresholds"),
])
def test_bad_settings_are_named_at_planning(features_section, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        validate_config({"features": features_section})


def test_rules_plan_one_features_job_per_dictionary_and_the_site(tmp_path):
    counts = job_counts(snakemake(tmp_path, "results/report/browser/index.html", "-n", "--configfile", str(TINY)).stdout)
    assert counts["features"] == 3 and counts["site"] == 1  # x1, x2 and the neurons


def test_the_held_out_comparison_splits_alike_for_every_dictionary(tiny_results):
    root, built = tiny_results
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
