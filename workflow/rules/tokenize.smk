if NATIVE:

    rule train_tokenizer:
        input:
            corpus="results/corpus",
        output:
            "results/tokenizer/tokenizer_config.json",
        params:
            # Trained on the training shards only, so held-out text stays unseen.
            shards=TRAIN_SHARDS,
            vocab_size=config["tokenizer"]["vocab_size"],
        log:
            "results/logs/train_tokenizer.log",
        benchmark:
            "results/benchmarks/train_tokenizer.tsv"
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
            "results/tokenizer/tokenizer_config.json",
        params:
            model=config["model"],
        log:
            "results/logs/save_model_tokenizer.log",
        threads: 1
        resources:
            **SLURM_CPU,
            mem_mb=4000,
            runtime=30,
        conda:
            "../envs/monoscope.yaml"
        script:
            "../scripts/save_model_tokenizer.py"


rule tokenize_shard:
    input:
        corpus="results/corpus",
        tokenizer="results/tokenizer/tokenizer_config.json",
    output:
        directory("results/tokens/{shard}.zarr"),
    params:
        context=config["tokenizer"]["context"],
    log:
        "results/logs/tokenize_shard/{shard}.log",
    threads: 1
    resources:
        **SLURM_CPU,
        mem_mb=2000,
        runtime=10,
    group:
        "tokenize"
    conda:
        "../envs/monoscope.yaml"
    script:
        "../scripts/tokenize_shard.py"
