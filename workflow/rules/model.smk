if NATIVE:

    rule train_lm:
        input:
            train=[RESULTS.token_shard(shard) for shard in TRAIN_SHARDS],
            held_out=[RESULTS.token_shard(shard) for shard in EVAL_SHARDS],
            tokenizer=RESULTS.tokenizer,
        output:
            weights=RESULTS.model_weights,
            spec=RESULTS.model_spec,
        params:
            native=config["model"]["native"],
            train=config["model"]["train"],
            seed=config["seed"],
        log:
            RESULTS.log("train_lm"),
        benchmark:
            RESULTS.benchmark("train_lm")
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
            spec=RESULTS.model_spec,
        params:
            model=config["model"],
        log:
            RESULTS.log("prepare_model"),
        benchmark:
            RESULTS.benchmark("prepare_model")
        threads: 2
        resources:
            **SLURM_CPU,
            mem_mb=16000,
            runtime=60,
        conda:
            "../envs/monoscope.yaml"
        script:
            "../scripts/prepare_model.py"
