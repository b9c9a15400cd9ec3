import json
from pathlib import Path

from monoscope import atomic, pretrained
from monoscope.runtime import start_job

start_job(snakemake)
model_dir = Path(snakemake.output.spec).parent
pretrained.fetch_pretrained(snakemake.params.model, model_dir)
spec = {"source": snakemake.params.model["source"], "identity": pretrained.pretrained_identity(snakemake.params.model)}
atomic.write_text(snakemake.output.spec, json.dumps(spec, indent=1))
