from pathlib import Path

from monoscope.config import settings_from
from monoscope.evaluate import EvaluateSettings, evaluate_dictionary
from monoscope.runtime import start_job

start_job(snakemake)
evaluate_dictionary(
    settings_from(EvaluateSettings, snakemake.params.evaluate),
    snakemake.params.model,
    Path(snakemake.input.model).parent,
    snakemake.params.hook,
    snakemake.wildcards.name,
    Path(snakemake.input.dictionary[0]).parent if snakemake.input.dictionary else None,
    list(snakemake.input.stores),
    Path(snakemake.output.metrics).parent,
)
