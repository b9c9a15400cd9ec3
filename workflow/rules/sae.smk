# Sparse autoencoders on the training activation stores: one job per SAE, or (sae.train_jointly)
# one job for the whole sweep from one pass over the data.
import json
import os

JOINT_TRAINING = config["sae"].get("train_jointly", False)


if not JOINT_TRAINING:

    rule train_sae:
        input:
            stores=activation_stores(TRAIN_SHARDS),
        output:
            weights="results/sae/{name}/sae.safetensors",
            cfg="results/sae/{name}/cfg.json",
            train_log="results/sae/{name}/train_log.jsonl",
        params:
            run=lambda wc: SAE_RUNS[wc.name],
            runs_json=lambda wc: json.dumps({wc.name: SAE_RUNS[wc.name]}),
            launcher=sae_launcher,
            script=os.path.join(workflow.basedir, "workflow", "scripts", "train_sae.py"),
            # Undeclared, so Snakemake keeps it when it reruns a killed job: training resumes there.
            resume_dir="results/sae/{name}/resume",
        log:
            "results/logs/train_sae/{name}.log",
        benchmark:
            "results/benchmarks/train_sae/{name}.tsv"
        threads: 2
        resources:
            **SLURM_GPU,
            mem_mb=sae_mem_mb,
            runtime=sae_runtime,
            gpu=sae_gpus,
        conda:
            "../envs/monoscope.yaml"
        shell:
            # launcher is already a quoted word list (sae_launcher); every path is quoted: a checkout
            # or a results path may hold a space.
            "{params.launcher} {params.script:q} {input.stores:q} --runs {params.runs_json:q}"
            " --out-root results/sae --resume-dir {params.resume_dir:q} --threads {threads} > {log:q} 2>&1"

else:

    rule train_saes_jointly:
        input:
            stores=activation_stores(TRAIN_SHARDS),
        output:
            weights=expand("results/sae/{name}/sae.safetensors", name=SAE_NAMES),
            cfg=expand("results/sae/{name}/cfg.json", name=SAE_NAMES),
            train_log=expand("results/sae/{name}/train_log.jsonl", name=SAE_NAMES),
        params:
            runs=SAE_RUNS,
            runs_json=json.dumps(SAE_RUNS),
            launcher=sae_launcher,
            script=os.path.join(workflow.basedir, "workflow", "scripts", "train_sae.py"),
            resume_dir="results/sae/.joint/resume",
        log:
            "results/logs/train_sae/joint.log",
        benchmark:
            "results/benchmarks/train_sae/joint.tsv"
        threads: 2
        resources:
            **SLURM_GPU,
            mem_mb=sae_mem_mb,
            runtime=sae_runtime,
            gpu=sae_gpus,
        conda:
            "../envs/monoscope.yaml"
        shell:
            # launcher is already a quoted word list (sae_launcher); every path is quoted: a checkout
            # or a results path may hold a space.
            "{params.launcher} {params.script:q} {input.stores:q} --runs {params.runs_json:q}"
            " --out-root results/sae --resume-dir {params.resume_dir:q} --threads {threads} > {log:q} 2>&1"
