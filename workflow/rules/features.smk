# Neuroscope for neurons and features: one streaming pass per dictionary, then the static browser.


rule features:
    input:
        stores=activation_stores(EVAL_SHARDS),
        model=RESULTS.model_spec,
        tokenizer=RESULTS.tokenizer,
        unit_stats=RESULTS.eval_outputs("{name}")["features"],
        eval_codes=RESULTS.eval_outputs("{name}")["codes"],
        dictionary=dictionary_input,
    output:
        **RESULTS.features_outputs("{name}"),
    params:
        features=config["features"],
        seed=config["seed"],
        model=config["model"],
        hook=HOOK,
    log:
        RESULTS.log("features/{name}"),
    benchmark:
        RESULTS.benchmark("features/{name}")
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
        summaries=[RESULTS.features_outputs(name)["summary"] for name in DICTIONARIES],
        tokenizer=RESULTS.tokenizer,
        scores=[RESULTS.autointerp_outputs(name)["scores"] for name in DICTIONARIES] if config["autointerp"]["enabled"] else [],
    output:
        index=RESULTS.browser_dir / "index.html",
    params:
        names=DICTIONARIES,
        results=RESULTS.root,
        live_threshold=10 ** config["evaluate"]["live_log10_density"],
    log:
        RESULTS.log("site"),
    benchmark:
        RESULTS.benchmark("site")
    threads: 1
    resources:
        **SLURM_CPU,
        mem_mb=4000,
        runtime=30,
    conda:
        "../envs/monoscope.yaml"
    script:
        "../scripts/site.py"
