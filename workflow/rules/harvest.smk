rule harvest:
    input:
        tokens="results/tokens/{shard}.zarr",
        model="results/model/model.json",
    output:
        directory("results/activations/{shard}.zarr"),
    params:
        harvest=config["harvest"],
        hook=HOOK,
    log:
        "results/logs/harvest/{shard}.log",
    benchmark:
        "results/benchmarks/harvest/{shard}.tsv"
    threads: 2
    resources:
        mem_mb=scaled(8000),
        runtime=scaled(120),
        gpu=1,
    conda:
        "../envs/monoscope.yaml"
    script:
        "../scripts/harvest.py"
