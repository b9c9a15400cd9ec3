rule report:
    input:
        metrics=[RESULTS.eval_outputs(name)["metrics"] for name in DICTIONARIES],
        model=RESULTS.model_spec,
        feature_summaries=[RESULTS.features_outputs(name)["summary"] for name in DICTIONARIES],
    output:
        index=RESULTS.report_dir / "index.html",
        summary=RESULTS.report_dir / "summary.json",
    params:
        names=DICTIONARIES,
        title=config["report"]["title"],
        model=config["model"],
        hook=HOOK,
    log:
        RESULTS.log("report"),
    threads: 1
    resources:
        **SLURM_CPU,
        mem_mb=4000,
        runtime=30,
    conda:
        "../envs/monoscope.yaml"
    script:
        "../scripts/report.py"
