import logging
from pathlib import Path

from monoscope.autointerp.pipeline import AutointerpSettings, run_dictionary
from monoscope.runtime import start_job

start_job(snakemake)
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise; usage.json counts them
run_dictionary(
    list(snakemake.input.stores),
    snakemake.wildcards.name,
    Path(snakemake.input.dictionary[0]).parent if snakemake.input.dictionary else None,
    Path(snakemake.input.tokenizer).parent,
    Path(snakemake.output.scores).parent,
    AutointerpSettings.from_config(snakemake.params.autointerp),
)
