from pathlib import Path

from monoscope.config import settings_from
from monoscope.harvest import HarvestSettings, harvest_shards
from monoscope.runtime import start_job

start_job(snakemake)
harvest_shards(
    settings_from(HarvestSettings, snakemake.params.harvest),
    snakemake.params.model,
    Path(snakemake.input.model).parent,
    snakemake.params.hook,
    list(zip(snakemake.input.tokens, snakemake.output)),
)
