import json

from monoscope.corpus import write_shard_texts
from monoscope.runtime import start_job

start_job(snakemake)
manifest = write_shard_texts(snakemake.params.corpus, snakemake.params.seed, list(snakemake.output.texts))
with open(snakemake.output.manifest, "w") as f:
    json.dump(manifest, f, indent=1)
print(json.dumps(manifest))
