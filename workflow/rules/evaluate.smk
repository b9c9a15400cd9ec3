rule evaluate:
    input:
        stores=activation_stores(EVAL_SHARDS),
        model=RESULTS.model_spec,
        dictionary=dictionary_input,
    output:
        **RESULTS.eval_outputs("{name}"),
    params:
        evaluate=config["evaluate"],
        model=config["model"],
        hook=HOOK,
    log:
        RESULTS.log("evaluate/{name}"),
    benchmark:
        RESULTS.benchmark("evaluate/{name}")
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
