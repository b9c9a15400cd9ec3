import json
from pathlib import Path

from monoscope.report import write_report
from monoscope.runtime import start_job

start_job(snakemake)
names = snakemake.params.names
model_spec = json.loads(Path(snakemake.input.model).read_text())
write_report(
    snakemake.params.title,
    snakemake.params.model,
    snakemake.params.hook,
    {name: Path(path).parent for name, path in zip(names, snakemake.input.metrics)},
    model_spec.get("training", {}).get("summary"),
    Path(snakemake.output.index).parent,
    {name: json.loads(Path(path).read_text()) for name, path in zip(names, snakemake.input.feature_summaries)},
)
