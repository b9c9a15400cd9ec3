from pathlib import Path

from monoscope.runtime import start_job
from monoscope.site import build_site
from monoscope.tokenize import token_strings

start_job(snakemake)
names = [Path(p).parent.name for p in snakemake.input.summaries]
results = Path(snakemake.input.summaries[0]).parents[2]
build_site(results, names, token_strings(Path(snakemake.input.tokenizer).parent), Path(snakemake.output.index).parent,
           snakemake.params.live_threshold)
