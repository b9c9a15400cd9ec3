if NATIVE:

    rule train_tokenizer:
        input:
            expand("results/corpus/{shard}.jsonl", shard=TRAIN_SHARDS),
        output:
            "results/tokenizer/tokenizer_config.json",
        params:
            vocab_size=config["tokenizer"]["vocab_size"],
        log:
            "results/logs/train_tokenizer.log",
        benchmark:
            "results/benchmarks/train_tokenizer.tsv"
        threads: 2
        resources:
            mem_mb=4000,
            runtime=30,
        conda:
            "../envs/monoscope.yaml"
        script:
            "../scripts/train_tokenizer.py"

else:

    rule save_model_tokenizer:
        output:
            "results/tokenizer/tokenizer_config.json",
        params:
            model=config["model"],
        log:
            "results/logs/save_model_tokenizer.log",
        threads: 1
        resources:
            mem_mb=4000,
            runtime=30,
        conda:
            "../envs/monoscope.yaml"
        script:
            "../scripts/save_model_tokenizer.py"


rule tokenize_shard:
    input:
        text="results/corpus/{shard}.jsonl",
        tokenizer="results/tokenizer/tokenizer_config.json",
    output:
        directory("results/tokens/{shard}.zarr"),
    params:
        context=config["tokenizer"]["context"],
    log:
        "results/logs/tokenize_shard/{shard}.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    group:
        "tokenize"
    conda:
        "../envs/monoscope.yaml"
    script:
        "../scripts/tokenize_shard.py"
