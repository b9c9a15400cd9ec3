import json

from monoscope.corpus import write_corpus
from monoscope.runtime import start_job

start_job(snakemake)
manifest = write_corpus(snakemake.params.corpus, snakemake.params.seed, snakemake.output[0], snakemake.params.shards)
print(json.dumps(manifest))
