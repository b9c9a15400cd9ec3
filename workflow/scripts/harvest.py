from pathlib import Path

from monoscope.harvest import harvest_shards
from monoscope.runtime import start_job

start_job(snakemake)
harvest_shards(snakemake.config, Path(snakemake.input.model).parent, list(zip(snakemake.input.tokens, snakemake.output)))
