# One job per batch of corpus.shards_per_job shards (see tokenize.smk): the model loads once per batch,
# each shard still gets its own activation store.
for batch, shards in SHARD_BATCHES.items():

    rule:
        name:
            f"harvest_{batch}"
        input:
            tokens=[RESULTS.token_shard(shard) for shard in shards],
            model=RESULTS.model_spec,
        output:
            [directory(RESULTS.activation_store(shard)) for shard in shards],
        params:
            harvest=config["harvest"],
            model=config["model"],
            hook=HOOK,
        log:
            RESULTS.log(f"harvest/{batch}"),
        benchmark:
            RESULTS.benchmark(f"harvest/{batch}")
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
