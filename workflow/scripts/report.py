import json
from pathlib import Path

from monoscope.report import write_report
from monoscope.runtime import start_job

start_job(snakemake)
eval_dirs = {Path(p).parent.name: Path(p).parent for p in snakemake.input.metrics}
model_spec = json.loads(Path(snakemake.input.model).read_text())
lm_summary = model_spec.get("training", {}).get("summary")
feature_summaries = {Path(p).parent.name: json.loads(Path(p).read_text()) for p in snakemake.input.feature_summaries}
write_report(snakemake.config, eval_dirs, lm_summary, Path(snakemake.output.index).parent, feature_summaries)
