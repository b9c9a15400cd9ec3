# Automated interpretability (opt-in: autointerp.enabled). Needs an OpenAI-compatible endpoint.
import glob
import os


# The response cache (autointerp.cache_path) is deliberately not an output: deleting or rerunning
# outputs never loses an answered request.
rule autointerp:
    input:
        stores=activation_stores(EVAL_SHARDS),
        tokenizer=RESULTS.tokenizer,
        unit_stats=RESULTS.eval_outputs("{name}")["features"],
        dictionary=dictionary_input,
    output:
        **RESULTS.autointerp_outputs("{name}"),
    params:
        autointerp=autointerp_params(),
    log:
        RESULTS.log("autointerp/{name}"),
    benchmark:
        RESULTS.benchmark("autointerp/{name}")
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
        scores=[RESULTS.autointerp_outputs(name)["scores"] for name in DICTIONARIES],
        simulations=[RESULTS.autointerp_outputs(name)["simulations"] for name in DICTIONARIES],
        usage=[RESULTS.autointerp_outputs(name)["usage"] for name in DICTIONARIES],
        weights=[RESULTS.features_outputs(name)["weights"] for name in DICTIONARIES],
        tokenizer=RESULTS.tokenizer,
        filled=sorted(glob.glob(os.path.join(config["autointerp"]["ratings_dir"], "*.csv"))),
    output:
        **RESULTS.autointerp_comparison,
    params:
        bootstrap_samples=config["autointerp"]["bootstrap_samples"],
        seed=config["autointerp"]["seed"],
        ratings_dir=config["autointerp"]["ratings_dir"],
        names=DICTIONARIES,
    log:
        RESULTS.log("compare_autointerp"),
    threads: 1
    resources:
        **SLURM_CPU,
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/monoscope.yaml"
    script:
        "../scripts/autointerp_compare.py"
