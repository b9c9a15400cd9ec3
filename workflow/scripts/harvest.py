from pathlib import Path

from monoscope.harvest import harvest_shard
from monoscope.runtime import start_job

start_job(snakemake)
harvest_shard(snakemake.config, Path(snakemake.input.model).parent, snakemake.input.tokens, snakemake.output[0])
