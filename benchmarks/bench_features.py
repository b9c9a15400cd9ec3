"""Feature analyses: pass speed versus a bare read + encode, site generation time, index readiness in Chromium.

    python benchmarks/bench_features.py [--seqs 256] [--expansions 8 32] [--repeats 2] [--threads N] [--no-browser]

Builds, in a temporary directory, a float16 activation store of the default run's shape (512 neurons,
context 128; GELU-like values) and random ReLU SAEs whose biases give ~1% density, with the default
tokenizer's vocabulary (results/tokenizer when it exists, else a small BPE) so the concept probes label
realistic Python tokens (results/tokens/eval_000.zarr when it exists). Prints, per dictionary size:
    bare_read_encode_tok_s   iter_sequence_blocks + SAE encode, nothing else
    pass_tok_s               monoscope.features.run_pass (examples, histograms, concept AUROC) on the same blocks
    pass_vs_bare             the ratio (target >= 0.5)
then, for the largest size, the time to write the browser (target <= 120 s for 32x) and the time
until the dictionary's index page is interactive in headless Chromium (target < 1 s).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from monoscope import evaluate, features, lm_weights, models, sae, site, store, tokenize
from monoscope.config import default_settings
from monoscope.layout import Layout
from monoscope.probes import ConceptLabeler, compile_concepts
from monoscope.train import TrainConfig, sae_config

ROOT = Path(__file__).resolve().parents[1]
D_MLP, CONTEXT = 512, 128


def vocabulary(tmp: Path) -> list[str]:
    if (ROOT / "results" / "tokenizer" / "tokenizer_config.json").exists():
        return tokenize.token_strings(ROOT / "results" / "tokenizer")
    import sysconfig

    texts = [p.read_text(encoding="utf-8") for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:60]]
    tokenize.save_tokenizer(tokenize.train_bpe(texts, 4096), tmp / "tokenizer")
    return tokenize.token_strings(tmp / "tokenizer")


def token_sequences(n_seqs: int, vocab_size: int, rng) -> np.ndarray:
    shard = ROOT / "results" / "tokens" / "eval_000.zarr"
    if shard.exists():
        tokens, _ = store.read_token_shard(shard)
        if tokens.shape[1] == CONTEXT and len(tokens) >= n_seqs and tokens.max() < vocab_size:
            return tokens[:n_seqs]
    return rng.integers(0, vocab_size, (n_seqs, CONTEXT), dtype=np.int32)


def sparse_sae(d_sae: int, acts: torch.Tensor, seed: int) -> sae.SAE:
    model = sae.SAE(sae_config(default_settings(TrainConfig, expansion_factor=d_sae // D_MLP), D_MLP),
                    generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        pre = model.pre_activations(acts[:4096])
        model.b_enc.copy_(-pre.quantile(0.99, dim=0))  # each feature fires on ~1% of tokens
    return model.eval()


def unit_stats(dictionary, activation_store):
    """What the evaluation would hand the features pass: per-unit density, mean and max."""
    stats = evaluate.FeatureStats(dictionary.d_sae)
    with torch.no_grad():
        for _, acts in store.iter_sequence_blocks(activation_store, 64):
            stats.update(dictionary.encode(torch.from_numpy(acts).flatten(0, 1).float()))
    return stats.table()


def time_bare(dictionary, activation_store, block: int) -> float:
    start, n = time.perf_counter(), 0
    for _, f in features.iter_unit_blocks(dictionary, [activation_store], block, None):
        n += f.shape[0] * f.shape[1]
    return n / (time.perf_counter() - start)


def time_pass(dictionary, activation_store, settings, upper, labeler) -> float:
    start = time.perf_counter()
    analysis, _ = features.run_pass(dictionary, [activation_store], settings, upper, labeler, desc="bench")
    return analysis.n_tokens / (time.perf_counter() - start)


def index_ready_ms(index: Path) -> float:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        times = []
        for _ in range(3):
            driver.get(index.as_uri())
            WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.body.dataset.ready === '1'"))
            times.append(float(driver.execute_script("return document.body.dataset.readyMs")))
        return statistics.median(times)
    finally:
        driver.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, default=256, help="held-out sequences of 128 tokens")
    parser.add_argument("--expansions", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-browser", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        strings = vocabulary(tmp)
        tokens = token_sequences(args.seqs, len(strings), rng)
        acts = torch.nn.functional.gelu(torch.randn(args.seqs * CONTEXT, D_MLP) * 1.5 - 1.0)
        path = tmp / "activations" / "eval_000.zarr"
        store.write_activation_store(path, acts.numpy(), tokens, {"hook": "blocks.0.mlp.hook_post"},
                                     chunk_tokens=store.chunk_tokens_for(D_MLP, "float16", CONTEXT, 1.0))
        activation_store = store.open_activations(path)
        settings = default_settings(features.FeatureSettings)
        labeler = ConceptLabeler(compile_concepts(settings.concept_list), strings)
        print(f"tokens={activation_store.n_tokens} d_in={D_MLP} concepts={len(labeler.concepts)} threads={torch.get_num_threads()}")
        print("expansion d_sae bare_read_encode_tok_s pass_tok_s pass_vs_bare")
        for factor in args.expansions:
            dictionary = sparse_sae(factor * D_MLP, acts, factor)
            with torch.no_grad():
                upper = dictionary.encode(acts[:8192]).max(0).values
            block = features.seqs_per_block(dictionary.d_sae, CONTEXT, settings.block_mib)
            bare, full = [], []
            for _ in range(args.repeats):  # interleaved, so load from other processes hits both alike
                bare.append(time_bare(dictionary, activation_store, block))
                full.append(time_pass(dictionary, activation_store, settings, upper, labeler))
            bare_speed, pass_speed = statistics.median(bare), statistics.median(full)
            print(f"{factor}x {dictionary.d_sae} {bare_speed:.0f} {pass_speed:.0f} {pass_speed / bare_speed:.2f}", flush=True)

        name = f"x{args.expansions[-1]}"
        native = {"d_model": 128, "d_mlp": D_MLP, "n_heads": 4, "n_layers": 1, "act_fn": "gelu"}
        bridge = models.boot_native(native, len(strings), CONTEXT, 0).eval()
        lm = lm_weights.read_weights(bridge, 0, n_vocab=len(strings))
        start = time.perf_counter()
        inputs = features.PassInputs(name=name, dictionary=dictionary, stores=[activation_store],
                                     stats=unit_stats(dictionary, activation_store), labeler=labeler, bridge=bridge, lm=lm,
                                     hook="blocks.0.mlp.hook_post")
        result = features.analyse(inputs, settings)
        features.write_outputs(result, tmp / "features" / name, provenance={"name": name})
        print(f"analyse_dictionary_{name}_s {time.perf_counter() - start:.1f} timings={result['summary']['timings']}")
        start = time.perf_counter()
        index = site.build_site(Layout(tmp), [name], strings, tmp / "report" / "browser", live_threshold=1e-4)
        print(f"site_{name}_s {time.perf_counter() - start:.1f} (target <= 120)")
        size = sum(p.stat().st_size for p in index.parent.rglob("*") if p.is_file())
        print(f"site_{name}_mib {size / 2**20:.1f}")
        if not args.no_browser:
            print(f"index_ready_ms_{name} {index_ready_ms(index.parent / name / 'index.html'):.0f} (target < 1000)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
