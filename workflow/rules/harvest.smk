# One job per batch of corpus.shards_per_job shards (see tokenize.smk): the model loads once per batch,
# each shard still gets its own activation store.
for batch, shards in SHARD_BATCHES.items():

    rule:
        name:
            f"harvest_{batch}"
        input:
            tokens=[f"results/tokens/{shard}.zarr" for shard in shards],
            model="results/model/model.json",
        output:
            [directory(f"results/activations/{shard}.zarr") for shard in shards],
        params:
            harvest=config["harvest"],
            hook=HOOK,
        log:
            f"results/logs/harvest/{batch}.log",
        benchmark:
            f"results/benchmarks/harvest/{batch}.tsv"
        threads: 2
        resources:
            **SLURM_GPU,
            # Memory is bounded by the batch and one chunk, whatever the shards' sizes.
            mem_mb=8000,
            runtime=scaled(30 + 5 * len(shards)),
            gpu=1,
        conda:
            "../envs/monoscope.yaml"
        script:
            "../scripts/harvest.py"
