from pathlib import Path

from monoscope import store
from monoscope.corpus import read_shard_texts, shard_text_path
from monoscope.runtime import start_job
from monoscope.tokenize import load_tokenizer, pack, shard_attrs

start_job(snakemake)
tokenizer_dir = Path(snakemake.input.tokenizer).parent
texts = list(read_shard_texts(shard_text_path(snakemake.input.corpus, snakemake.wildcards.shard)))
tokens = pack(texts, load_tokenizer(tokenizer_dir), snakemake.params.context)
store.write_token_shard(snakemake.output[0], tokens, shard_attrs(tokenizer_dir, snakemake.wildcards.shard, len(texts)))
print(f"{snakemake.wildcards.shard}: {len(texts)} documents -> {tokens.shape[0]} sequences of {tokens.shape[1]}")
