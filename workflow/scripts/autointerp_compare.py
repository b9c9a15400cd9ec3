from pathlib import Path

from monoscope.autointerp.pipeline import run_comparison
from monoscope.runtime import start_job
from monoscope.tokenize import token_strings

start_job(snakemake)
run_comparison(
    {name: Path(scores).parent for name, scores in zip(snakemake.params.names, snakemake.input.scores)},
    snakemake.output.comparison,
    snakemake.output.plot,
    Path(snakemake.output.sheet).parent,
    bootstrap_samples=snakemake.params.bootstrap_samples,
    seed=snakemake.params.seed,
    ratings_dir=snakemake.params.ratings_dir,
    key_path=snakemake.output.key,
    weights_paths=dict(zip(snakemake.params.names, snakemake.input.weights)),
    strings=token_strings(Path(snakemake.input.tokenizer).parent),
)
