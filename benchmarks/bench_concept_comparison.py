"""Held-out features-versus-neurons comparison on a finished default run: its cost and its numbers.

    python benchmarks/bench_concept_comparison.py [--results results] [--repeats 2] [--time x8_l1-3.75] [--out DIR]

Reads the run's held-out activation stores, SAEs, evaluation maxima and codes (nothing is written there).
For the dictionary named by --time (default: the largest SAE; --synthetic-expansion: a random ReLU SAE of that
size and L0 on the same stores, when the run's is not trained yet) it times the features pass as the features
job runs it, --repeats times (--short: over probe_seqs sequences, which the sample then holds whole, so the
added seconds are the full job's):
    pass_s                 the whole pass
    probe_sample_s         of which inside ProbeSample.add, keeping the sample's exact activations (what issue 16 adds)
    comparison_s           monoscope.features.held_out_comparison on that sample (split, AUROC, probes, specificity)
    added_s                median(probe_sample_s) + median(comparison_s) (target <= 60 s for the 8x SAE)
Then, for the neurons and every SAE, the held-out table (k-sparse probe AUROC at k = 1 and the largest k, with
95 % bootstrap intervals), the single-unit AUROCs (binned on all tokens, as before, against exact and held out),
the report's sentence per dictionary and the specificity counts. --out keeps each dictionary's summary JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import torch

from monoscope import concept_comparison, features, report, store, tokenize
from monoscope.config import NEURONS, default_settings
from monoscope.dictionary import open_dictionary
from monoscope.probes import ConceptLabeler, compile_concepts
from monoscope.train import TrainConfig, sae_config

ROOT = Path(__file__).resolve().parents[1]


def load(results: Path, name: str, stores):
    sae_dir = None if name == NEURONS else results / "sae" / name
    dictionary = open_dictionary(name, sae_dir, stores[0].d)
    upper = torch.from_numpy(pd.read_parquet(results / "eval" / name / "features.parquet")["max_activation"].to_numpy(np.float32, copy=True))
    codes_path = results / "eval" / name / "codes.safetensors"
    return dictionary, upper, features.Codes(codes_path) if codes_path.exists() else None


def synthetic_sae(stores, expansion: int, l0: float):
    """A random ReLU SAE whose encoder biases make each feature fire on l0 / d_sae of the tokens; its maxima."""
    from monoscope import sae

    _, acts = next(store.iter_sequence_blocks(stores[0], 64))
    acts = torch.from_numpy(acts).float().reshape(-1, stores[0].d)
    d_sae = expansion * stores[0].d
    model = sae.SAE(sae_config(default_settings(TrainConfig, expansion_factor=expansion), stores[0].d),
                    generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.b_enc.copy_(-model.pre_activations(acts[:2048]).quantile(1 - l0 / d_sae, dim=0))  # quantile: <= 2^24 values
        upper = model.encode(acts).max(0).values
    return model.eval(), upper


def timed_pass(dictionary, stores, settings, upper, labeler, codes):
    """(pass seconds, seconds inside ProbeSample.add, the analysis): the sample's bookkeeping runs inside the
    pass, synchronously, so its own time is what it adds to the pass."""
    inside = [0.0]
    add = concept_comparison.ProbeSample.add

    def timed_add(self, *args, **kwargs):
        start = time.perf_counter()
        add(self, *args, **kwargs)
        inside[0] += time.perf_counter() - start

    start = time.perf_counter()
    with mock.patch.object(concept_comparison.ProbeSample, "add", timed_add):
        analysis, _ = features.run_pass(dictionary, stores, settings, upper, labeler, codes=codes, desc="bench")
    return time.perf_counter() - start, inside[0], analysis


def comparison(analysis, labeler, settings, d_sae):
    start = time.perf_counter()
    held_out = features.held_out_comparison(analysis, labeler.names, settings, pd.DataFrame(index=range(d_sae)))
    return time.perf_counter() - start, held_out


def summary_of(name, analysis, held_out, labeler, d_sae):
    """The parts of the features job's summary.json the report reads."""
    binned = analysis.aurocs()
    concepts = {}
    for c, concept in enumerate(labeler.names):
        entry = held_out["concepts"][concept]
        single = entry["single_unit"] or {}
        concepts[concept] = {"positive_fraction": float(analysis.concept_tokens[c]) / analysis.n_tokens,
                             "best_unit": single.get("unit"), "best_auroc": single.get("auroc", float("nan")),
                             "binned_same_tokens_best_auroc": float(np.nanmax(binned[c])),
                             "sparse_probe": entry["sparse_probe"]}
    return {"name": name, "d_sae": d_sae, "settings": {"probe_k": analysis.settings.probe_k,
            "specificity_min_tokens": analysis.settings.specificity_min_tokens}, "concepts": concepts, "held_out": held_out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--time", default=None, help="dictionary to time (default: the largest SAE)")
    parser.add_argument("--skip-table", action="store_true")
    parser.add_argument("--short", action="store_true", help="time a pass over probe_seqs sequences only (same added cost)")
    parser.add_argument("--synthetic-expansion", type=int, default=None,
                        help="time a random ReLU SAE of this expansion on the run's stores instead of a trained one")
    parser.add_argument("--synthetic-l0", type=float, default=12.5, help="its mean active features per token")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    results = args.results
    stores = [store.open_activations(p) for p in sorted((results / "activations").glob("eval_*.zarr"))]
    names = [NEURONS] + sorted((p.name for p in (results / "sae").iterdir() if (results / "eval" / p.name / "features.parquet").exists()),
                               key=lambda n: json.loads((results / "sae" / n / "cfg.json").read_text())["d_sae"])
    settings = default_settings(features.FeatureSettings)
    labeler = ConceptLabeler(compile_concepts(settings.concept_list), tokenize.token_strings(results / "tokenizer"))
    print(f"held-out sequences={sum(s.n_seq for s in stores)} threads={torch.get_num_threads()} probe_seqs={settings.probe_seqs}")

    if args.synthetic_expansion:  # the run's SAE of that size is not trained yet: a random one of the same shape
        timed = f"synthetic_x{args.synthetic_expansion}"
        dictionary, upper = synthetic_sae(stores, args.synthetic_expansion, args.synthetic_l0)
        codes = None
    else:
        timed = args.time or names[-1]
        dictionary, upper, codes = load(results, timed, stores)
    # The probe sample holds probe_seqs sequences whatever the pass reads: a pass over probe_seqs sequences
    # samples all of them, so its added seconds are the full job's, for a fraction of the pass.
    timed_settings = dataclasses.replace(settings, max_seqs=settings.probe_seqs) if args.short else settings
    pass_s, sample_s, compare_s = [], [], []
    for _ in range(args.repeats):
        seconds, inside, analysis = timed_pass(dictionary, stores, timed_settings, upper, labeler, codes)
        pass_s.append(seconds)
        sample_s.append(inside)
        seconds, held_out = comparison(analysis, labeler, timed_settings, dictionary.d_sae)
        compare_s.append(seconds)
    timed_summary = summary_of(timed, analysis, held_out, labeler, dictionary.d_sae)
    added = statistics.median(sample_s) + statistics.median(compare_s)
    print(f"{timed}: pass_s {statistics.median(pass_s):.1f} over {analysis.n_seq} sequences {[round(x, 1) for x in pass_s]}")
    print(f"{timed}: probe_sample_s {statistics.median(sample_s):.1f} {[round(x, 1) for x in sample_s]}")
    print(f"{timed}: comparison_s {statistics.median(compare_s):.1f} {[round(x, 1) for x in compare_s]}")
    print(f"{timed}: added_s {added:.1f} (target <= 60)", flush=True)
    if args.skip_table:
        return

    summaries = {}
    for name in names:
        if name == timed and not args.short:
            summaries[name] = timed_summary
        else:
            dictionary, upper, codes = load(results, name, stores)
            pass_seconds, sample_seconds, analysis = timed_pass(dictionary, stores, settings, upper, labeler, codes)
            seconds, held_out = comparison(analysis, labeler, settings, dictionary.d_sae)
            summaries[name] = summary_of(name, analysis, held_out, labeler, dictionary.d_sae)
            print(f"{name}: pass_s {pass_seconds:.1f} probe_sample_s {sample_seconds:.1f} comparison_s {seconds:.1f}",
                  flush=True)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"{name}.json").write_text(json.dumps(summaries[name], indent=1, default=str))
    ks = [str(min(settings.probe_k)), str(max(settings.probe_k))]
    print("\nk-sparse probe AUROC on the report part [95 % interval]")
    print("concept | " + " | ".join(f"{n} k={k}" for n in names for k in ks))
    for concept in labeler.names:
        cells = []
        for n in names:
            for k in ks:
                p = summaries[n]["concepts"][concept]["sparse_probe"].get(k)
                cells.append("–" if not p else f"{p['auroc']:.3f} [{p['ci_low']:.3f}, {p['ci_high']:.3f}]")
        print(f"{concept} | " + " | ".join(cells))
    print("\nbest single unit: binned AUROC chosen and scored on all tokens -> exact AUROC, chosen on selection, scored on report")
    print("concept | " + " | ".join(names))
    for concept in labeler.names:
        print(f"{concept} | " + " | ".join(f"{summaries[n]['concepts'][concept]['binned_same_tokens_best_auroc']:.3f} -> "
                                            f"{summaries[n]['concepts'][concept]['best_auroc']:.3f}" for n in names))
    print()
    for n in names[1:]:
        print(report.comparison_sentence(n, summaries[NEURONS], summaries[n], ks))
    print("\nunits >= 90 % specific / units counted, per tau")
    for n in names:
        print(n, {t: f"{v['units_at_least_90_percent']} / {v['units_counted']}" for t, v in summaries[n]["held_out"]["specificity"].items()})


if __name__ == "__main__":
    main()
