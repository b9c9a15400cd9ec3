from pathlib import Path

from monoscope import store
from monoscope.corpus import read_shard_texts, shard_text_path
from monoscope.runtime import start_job
from monoscope.tokenize import load_tokenizer, pack, shard_attrs, tokenizer_id

start_job(snakemake)
tokenizer_dir = Path(snakemake.input.tokenizer).parent
tokenizer = load_tokenizer(tokenizer_dir)
tokenizer_identity = tokenizer_id(tokenizer_dir)
for output in snakemake.output:
    shard = Path(output).stem
    texts = list(read_shard_texts(shard_text_path(snakemake.input.corpus, shard)))
    tokens = pack(texts, tokenizer, snakemake.params.context)
    store.write_token_shard(output, tokens, shard_attrs(tokenizer_identity, shard, len(texts)))
    print(f"{shard}: {len(texts)} documents -> {tokens.shape[0]} sequences of {tokens.shape[1]}")
