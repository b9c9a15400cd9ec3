# Neuroscope for neurons and features: one streaming pass per dictionary, then the static browser.


rule features:
    input:
        stores=activation_stores(EVAL_SHARDS),
        model="results/model/model.json",
        tokenizer="results/tokenizer/tokenizer_config.json",
        eval_features="results/eval/{name}/features.parquet",
        eval_codes="results/eval/{name}/codes.safetensors",
        dictionary=dictionary_input,
    output:
        units="results/features/{name}/units.parquet",
        examples="results/features/{name}/examples.npz",
        weights="results/features/{name}/weights.npz",
        summary="results/features/{name}/summary.json",
    params:
        features=config["features"],
        hook=HOOK,
    log:
        "results/logs/features/{name}.log",
    benchmark:
        "results/benchmarks/features/{name}.tsv"
    threads: 2
    resources:
        **SLURM_GPU,
        mem_mb=scaled(8000),
        runtime=scaled(60),
        gpu=1,
    conda:
        "../envs/monoscope.yaml"
    script:
        "../scripts/features.py"


rule site:
    input:
        summaries=expand("results/features/{name}/summary.json", name=DICTIONARIES),
        tokenizer="results/tokenizer/tokenizer_config.json",
        scores=expand("results/autointerp/{name}/scores.csv", name=DICTIONARIES) if config["autointerp"]["enabled"] else [],
    output:
        index="results/report/browser/index.html",
    params:
        live_threshold=10 ** config["evaluate"]["live_log10_density"],
    log:
        "results/logs/site.log",
    benchmark:
        "results/benchmarks/site.tsv"
    threads: 1
    resources:
        **SLURM_CPU,
        mem_mb=4000,
        runtime=30,
    conda:
        "../envs/monoscope.yaml"
    script:
        "../scripts/site.py"
