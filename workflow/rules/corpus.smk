rule split_corpus:
    output:
        # One directory of <shard>.jsonl and manifest.json, not one output per shard: planning
        # matches every file against every output of a rule, quadratic in shards.
        directory(RESULTS.corpus),
    params:
        corpus=config["corpus"],
        seed=config["seed"],
        shards=ALL_SHARDS,
    log:
        RESULTS.log("split_corpus"),
    threads: 1
    resources:
        **SLURM_CPU,
        mem_mb=4000,
        runtime=30,
    conda:
        "../envs/monoscope.yaml"
    script:
        "../scripts/split_corpus.py"
