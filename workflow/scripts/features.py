from pathlib import Path

from monoscope.config import settings_from
from monoscope.features import FeatureSettings, analyse_dictionary
from monoscope.runtime import start_job

start_job(snakemake)
analyse_dictionary(
    settings_from(FeatureSettings, snakemake.params.features, seed=snakemake.params.seed),
    snakemake.params.model,
    Path(snakemake.input.model).parent,
    snakemake.params.hook,
    snakemake.wildcards.name,
    Path(snakemake.input.dictionary[0]).parent if snakemake.input.dictionary else None,
    tokenizer_dir=Path(snakemake.input.tokenizer).parent,
    eval_stores=list(snakemake.input.stores),
    unit_stats=snakemake.input.unit_stats,
    eval_codes=snakemake.input.eval_codes,
    out_dir=Path(snakemake.output.summary).parent,
)
