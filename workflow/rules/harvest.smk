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
        **SLURM_GPU,
        # Constants, not functions: with thousands of shards every per-job evaluation shows in planning.
        # Memory is bounded by the batch and one chunk, whatever the shard's size.
        mem_mb=8000,
        runtime=120,
        gpu=1,
    conda:
        "../envs/monoscope.yaml"
    script:
        "../scripts/harvest.py"
