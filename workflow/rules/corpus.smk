rule split_corpus:
    output:
        texts=expand("results/corpus/{shard}.jsonl", shard=ALL_SHARDS),
        manifest="results/corpus/manifest.json",
    params:
        corpus=config["corpus"],
        seed=config["seed"],
    log:
        "results/logs/split_corpus.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../envs/monoscope.yaml"
    script:
        "../scripts/split_corpus.py"
