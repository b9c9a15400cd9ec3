from pathlib import Path

from monoscope.corpus import read_shard_texts, shard_text_path
from monoscope.runtime import start_job
from monoscope.tokenize import save_tokenizer, train_bpe

start_job(snakemake)
corpus_dir = snakemake.input.corpus
texts = (text for shard in snakemake.params.shards for text in read_shard_texts(shard_text_path(corpus_dir, shard)))
tokenizer = train_bpe(texts, snakemake.params.vocab_size)
save_tokenizer(tokenizer, Path(snakemake.output[0]).parent)
print(f"trained a byte-level BPE with {len(tokenizer)} tokens")
