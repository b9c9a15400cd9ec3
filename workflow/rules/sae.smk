# Sparse autoencoders on the training activation stores: one job per SAE, or (sae.train_jointly) one job
# for the whole sweep from one pass over the data; the same rule either way.
import json
import os

TRAINED = SAE_NAMES if JOINT_TRAINING else ["{name}"]
TRAIN_JOB = "joint" if JOINT_TRAINING else "{name}"


rule train_sae:
    input:
        stores=activation_stores(TRAIN_SHARDS),
    output:
        weights=[RESULTS.sae_checkpoint(name)["weights"] for name in TRAINED],
        cfg=[RESULTS.sae_checkpoint(name)["cfg"] for name in TRAINED],
        train_log=[RESULTS.sae_train_log(name) for name in TRAINED],
    params:
        runs_json=lambda wildcards: json.dumps({name: SAE_RUNS[name] for name in trained_names(wildcards)}),
        launcher=sae_launcher,
        script=os.path.join(workflow.basedir, "workflow", "scripts", "train_sae.py"),
        out_root=RESULTS.sae_root,
        # Undeclared, so Snakemake keeps it when it reruns a killed job: training resumes there. A string:
        # Snakemake fills the {name} wildcard into string params only.
        resume_dir=str(RESULTS.sae_dir(".joint" if JOINT_TRAINING else "{name}") / "resume"),
    log:
        RESULTS.log(f"train_sae/{TRAIN_JOB}"),
    benchmark:
        RESULTS.benchmark(f"train_sae/{TRAIN_JOB}")
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
        " --out-root {params.out_root:q} --resume-dir {params.resume_dir:q} --threads {threads} > {log:q} 2>&1"
