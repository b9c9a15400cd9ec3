from pathlib import Path

from monoscope.evaluate import evaluate_dictionary
from monoscope.runtime import start_job

start_job(snakemake)
sae_dir = Path(snakemake.input.dictionary[0]).parent if snakemake.input.dictionary else None
evaluate_dictionary(
    snakemake.config,
    snakemake.wildcards.name,
    sae_dir,
    Path(snakemake.input.model).parent,
    list(snakemake.input.stores),
    Path(snakemake.output.metrics).parent,
)
