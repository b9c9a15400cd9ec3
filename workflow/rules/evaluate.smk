rule evaluate:
    input:
        stores=activation_stores(EVAL_SHARDS),
        model="results/model/model.json",
        dictionary=dictionary_input,
    output:
        metrics="results/eval/{name}/metrics.json",
        features="results/eval/{name}/features.parquet",
        # The held-out tokens' active codes, so the features pass does not encode them again.
        codes="results/eval/{name}/codes.safetensors",
    params:
        evaluate=config["evaluate"],
        hook=HOOK,
    log:
        "results/logs/evaluate/{name}.log",
    benchmark:
        "results/benchmarks/evaluate/{name}.tsv"
    threads: 2
    resources:
        **SLURM_GPU,
        mem_mb=scaled(8000),
        runtime=scaled(60),
        gpu=1,
    conda:
        "../envs/monoscope.yaml"
    script:
        "../scripts/evaluate.py"
