from pathlib import Path

from monoscope.layout import Layout
from monoscope.runtime import start_job
from monoscope.site import build_site
from monoscope.tokenize import token_strings

start_job(snakemake)
build_site(Layout(snakemake.params.results), snakemake.params.names, token_strings(Path(snakemake.input.tokenizer).parent),
           Path(snakemake.output.index).parent, snakemake.params.live_threshold)
