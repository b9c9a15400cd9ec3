if NATIVE:

    rule train_lm:
        input:
            train=expand("results/tokens/{shard}.zarr", shard=TRAIN_SHARDS),
            held_out=expand("results/tokens/{shard}.zarr", shard=EVAL_SHARDS),
            tokenizer="results/tokenizer/tokenizer_config.json",
        output:
            weights="results/model/model.safetensors",
            spec="results/model/model.json",
        params:
            model=config["model"],
            seed=config["seed"],
        log:
            "results/logs/train_lm.log",
        benchmark:
            "results/benchmarks/train_lm.tsv"
        threads: 2
        resources:
            **SLURM_GPU,
            mem_mb=scaled(6000),
            runtime=scaled(120),
            gpu=1,
        conda:
            "../envs/monoscope.yaml"
        script:
            "../scripts/train_lm.py"

else:

    rule prepare_model:
        output:
            spec="results/model/model.json",
        params:
            model=config["model"],
        log:
            "results/logs/prepare_model.log",
        benchmark:
            "results/benchmarks/prepare_model.tsv"
        threads: 2
        resources:
            **SLURM_CPU,
            mem_mb=16000,
            runtime=60,
        conda:
            "../envs/monoscope.yaml"
        script:
            "../scripts/prepare_model.py"
