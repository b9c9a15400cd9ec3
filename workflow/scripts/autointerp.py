import logging
from pathlib import Path

from monoscope.autointerp.pipeline import AutointerpSettings, run_dictionary
from monoscope.config import settings_from
from monoscope.runtime import start_job

start_job(snakemake)
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise; usage.json counts them
run_dictionary(
    settings_from(AutointerpSettings, snakemake.params.autointerp),
    snakemake.wildcards.name,
    Path(snakemake.input.dictionary[0]).parent if snakemake.input.dictionary else None,
    activation_paths=list(snakemake.input.stores),
    unit_stats=snakemake.input.unit_stats,
    tokenizer_dir=Path(snakemake.input.tokenizer).parent,
    out_dir=Path(snakemake.output.scores).parent,
)
