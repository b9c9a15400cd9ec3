from pathlib import Path

from monoscope import pretrained
from monoscope.runtime import start_job
from monoscope.tokenize import save_tokenizer

start_job(snakemake)
save_tokenizer(pretrained.pretrained_tokenizer(snakemake.params.model), Path(snakemake.output[0]).parent)
