if NATIVE:

    rule train_tokenizer:
        input:
            corpus=rules.split_corpus.output[0],
        output:
            RESULTS.tokenizer,
        params:
            # Trained on the training shards only, so held-out text stays unseen.
            shards=TRAIN_SHARDS,
            vocab_size=config["tokenizer"]["vocab_size"],
        log:
            RESULTS.log("train_tokenizer"),
        benchmark:
            RESULTS.benchmark("train_tokenizer")
        threads: 2
        resources:
            **SLURM_CPU,
            mem_mb=4000,
            runtime=30,
        conda:
            "../envs/monoscope.yaml"
        script:
            "../scripts/train_tokenizer.py"

else:

    rule save_model_tokenizer:
        output:
            RESULTS.tokenizer,
        params:
            model=config["model"],
        log:
            RESULTS.log("save_model_tokenizer"),
        threads: 1
        resources:
            **SLURM_CPU,
            mem_mb=4000,
            runtime=30,
        conda:
            "../envs/monoscope.yaml"
        script:
            "../scripts/save_model_tokenizer.py"


# One job per batch of corpus.shards_per_job shards, each shard still its own Zarr: a rule per batch,
# because a rule's outputs are fixed patterns and a batch is a list. Thousands of one-shard jobs cost
# seconds of Snakemake planning and, on a cluster, thousands of submissions of a few seconds' work.
for batch, shards in SHARD_BATCHES.items():

    rule:
        name:
            f"tokenize_{batch}"
        input:
            corpus=rules.split_corpus.output[0],
            tokenizer=RESULTS.tokenizer,
        output:
            [directory(RESULTS.token_shard(shard)) for shard in shards],
        params:
            context=config["tokenizer"]["context"],
        log:
            RESULTS.log(f"tokenize/{batch}"),
        threads: 1
        resources:
            **SLURM_CPU,
            mem_mb=2000,
            runtime=10 + len(shards),
        conda:
            "../envs/monoscope.yaml"
        script:
            "../scripts/tokenize_shards.py"
