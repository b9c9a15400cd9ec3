"""Tokenizers (a byte-level BPE trained here, or a pretrained model's own) and sequence packing.

Every tokenizer is saved as a Hugging Face tokenizer folder, so later stages load any of them the
same way, offline, with `load_tokenizer`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from monoscope.atomic import atomic_path

END_OF_TEXT = "<|endoftext|>"


def train_bpe(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE (GPT-2 style pre-tokenization) with one special end-of-text token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=END_OF_TEXT, bos_token=END_OF_TEXT)


def save_tokenizer(tokenizer, out_dir: str | Path) -> None:
    with atomic_path(out_dir) as tmp:
        tokenizer.save_pretrained(str(tmp))


def load_tokenizer(tokenizer_dir: str | Path):
    from transformers import AutoTokenizer

    if not (Path(tokenizer_dir) / "tokenizer_config.json").exists():
        raise FileNotFoundError(f"no tokenizer saved in {tokenizer_dir}")
    return AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)


def tokenizer_id(tokenizer_dir: str | Path) -> str:
    """Content hash of the tokenizer files: provenance that changes whenever the vocabulary does."""
    digest = hashlib.sha256()
    for path in sorted(Path(tokenizer_dir).glob("*.json")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def token_strings(tokenizer_dir: str | Path) -> list[str]:
    """The display string of every vocabulary id (bytes that are not whole UTF-8 show as U+FFFD)."""
    tokenizer = load_tokenizer(tokenizer_dir)
    return [tokenizer.decode([i]) for i in range(len(tokenizer))]


def separator_id(tokenizer) -> int:
    """The token placed between documents: EOS if the tokenizer has one, else BOS."""
    for token_id in (tokenizer.eos_token_id, tokenizer.bos_token_id):
        if token_id is not None:
            return token_id
    raise ValueError("tokenizer has neither an end-of-text nor a beginning-of-text token to separate documents")


def pack(texts: Iterable[str], tokenizer, context: int, batch_docs: int = 256) -> np.ndarray:
    """Documents joined by the separator token and cut into full sequences: int32 [n_seq, context].

    The tail shorter than one sequence is dropped, so every stored token has a full left context budget.
    """
    sep = separator_id(tokenizer)
    ids: list[int] = []
    batch: list[str] = []

    def flush():
        for encoded in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            ids.extend(encoded)
            ids.append(sep)
        batch.clear()

    for text in texts:
        batch.append(text)
        if len(batch) == batch_docs:
            flush()
    flush()
    n_seq = len(ids) // context
    if n_seq == 0:
        raise ValueError(f"shard holds {len(ids)} tokens, fewer than one sequence of tokenizer.context={context}")
    return np.asarray(ids[: n_seq * context], dtype=np.int32).reshape(n_seq, context)


def shard_attrs(tokenizer_identity: str, shard: str, n_documents: int, extra: dict[str, Any] | None = None):
    """A token shard's provenance; tokenizer_identity is tokenizer_id(), hashed once per job, not per shard."""
    return {
        "tokenizer_id": tokenizer_identity,
        "corpus_slice": {"shard": shard, "documents": n_documents},
        **(extra or {}),
    }
