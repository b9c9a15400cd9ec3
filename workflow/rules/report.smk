rule report:
    input:
        metrics=expand("results/eval/{name}/metrics.json", name=DICTIONARIES),
        model="results/model/model.json",
        feature_summaries=expand("results/features/{name}/summary.json", name=DICTIONARIES),
    output:
        index="results/report/index.html",
        summary="results/report/summary.json",
    params:
        report=config["report"],
    log:
        "results/logs/report.log",
    threads: 1
    resources:
        **SLURM_CPU,
        mem_mb=4000,
        runtime=30,
    conda:
        "../envs/monoscope.yaml"
    script:
        "../scripts/report.py"
