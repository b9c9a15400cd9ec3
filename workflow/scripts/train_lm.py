from pathlib import Path

import numpy as np

from monoscope import store
from monoscope.models import train_native
from monoscope.runtime import start_job
from monoscope.tokenize import load_tokenizer

start_job(snakemake)
train = np.concatenate([store.read_token_shard(p)[0] for p in snakemake.input.train])
held_out = np.concatenate([store.read_token_shard(p)[0] for p in snakemake.input.held_out])
d_vocab = len(load_tokenizer(Path(snakemake.input.tokenizer).parent))
train_native(snakemake.params.native, snakemake.params.train, snakemake.params.seed, train, held_out, d_vocab,
             Path(snakemake.output.weights).parent)
