from pathlib import Path

from monoscope.features import analyse_dictionary
from monoscope.runtime import start_job

start_job(snakemake)
sae_dir = Path(snakemake.input.dictionary[0]).parent if snakemake.input.dictionary else None
analyse_dictionary(
    snakemake.config,
    snakemake.wildcards.name,
    sae_dir,
    Path(snakemake.input.model).parent,
    Path(snakemake.input.tokenizer).parent,
    list(snakemake.input.stores),
    snakemake.input.eval_features,
    Path(snakemake.output.summary).parent,
    eval_codes=snakemake.input.eval_codes,
)
