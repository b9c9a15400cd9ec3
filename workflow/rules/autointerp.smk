# Automated interpretability (opt-in: autointerp.enabled). Needs an OpenAI-compatible endpoint.
import glob
import os

# The response cache (autointerp.cache_path) is deliberately not an output: deleting or rerunning
# outputs never loses an answered request.


rule autointerp:
    input:
        stores=activation_stores(EVAL_SHARDS),
        tokenizer="results/tokenizer/tokenizer_config.json",
        dictionary=dictionary_input,
    output:
        explanations="results/autointerp/{name}/explanations.jsonl",
        simulations="results/autointerp/{name}/simulations.jsonl",
        scores="results/autointerp/{name}/scores.csv",
        usage="results/autointerp/{name}/usage.json",
    params:
        autointerp=autointerp_params(),
    log:
        "results/logs/autointerp/{name}.log",
    benchmark:
        "results/benchmarks/autointerp/{name}.tsv"
    threads: 1
    resources:
        **SLURM_CPU,
        mem_mb=4000,
        runtime=240,
    conda:
        "../envs/monoscope.yaml"
    script:
        "../scripts/autointerp.py"


rule compare_autointerp:
    input:
        scores=expand("results/autointerp/{name}/scores.csv", name=DICTIONARIES),
        simulations=expand("results/autointerp/{name}/simulations.jsonl", name=DICTIONARIES),
        usage=expand("results/autointerp/{name}/usage.json", name=DICTIONARIES),
        weights=expand("results/features/{name}/weights.npz", name=DICTIONARIES),
        tokenizer="results/tokenizer/tokenizer_config.json",
        filled=sorted(glob.glob(os.path.join(config["autointerp"]["ratings_dir"], "*.csv"))),
    output:
        comparison="results/autointerp/comparison.json",
        plot="results/autointerp/comparison.png",
        sheet="results/autointerp/ratings/rating_sheet.csv",
        form="results/autointerp/ratings/rating_sheet.html",
        key="results/autointerp/ratings_key.csv",  # outside ratings/, the folder handed to raters
    params:
        autointerp=config["autointerp"],
        names=DICTIONARIES,
    log:
        "results/logs/compare_autointerp.log",
    threads: 1
    resources:
        **SLURM_CPU,
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/monoscope.yaml"
    script:
        "../scripts/autointerp_compare.py"
