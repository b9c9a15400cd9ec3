import json

import numpy as np
import pytest

from monoscope import corpus
from monoscope.tokenize import END_OF_TEXT, pack, train_bpe


def test_stdlib_corpus_excludes_tests():
    names = [name for name, _ in corpus.stdlib_documents()]
    assert len(names) > 300
    assert not any("/test/" in f"/{n}" or n.split("/")[-1].startswith("test_") for n in names)


def _files_config(paths, **extra):
    return {"source": "files", "paths": paths, "text_field": "body", "max_bytes": None, "max_documents": None,
            "n_shards": 3, **extra}


def test_jsonl_and_txt_files_split_deterministically(tmp_path):
    (tmp_path / "a.txt").write_text("plain text document")
    with open(tmp_path / "b.jsonl", "w") as f:
        for i in range(7):
            f.write(json.dumps({"body": f"record {i}"}) + "\n")
    cfg = _files_config([str(tmp_path / "*")])
    first, second = corpus.split_into_shards(cfg, seed=1), corpus.split_into_shards(cfg, seed=1)
    assert first == second
    assert sum(len(s) for s in first) == 8
    assert corpus.split_into_shards(cfg, seed=2) != first


def test_corpus_directory_holds_every_shard_and_a_manifest_and_is_replaced_whole(tmp_path):
    for i in range(6):
        (tmp_path / f"doc{i}.txt").write_text(f"document number {i}")
    cfg, out = _files_config([str(tmp_path / "*.txt")]), tmp_path / "corpus"
    names = ["train_000", "train_001", "eval_000"]
    manifest = corpus.write_corpus(cfg, 0, out, names)
    assert sorted(p.name for p in out.iterdir()) == sorted([*(f"{n}.jsonl" for n in names), "manifest.json"])
    assert json.loads((out / "manifest.json").read_text()) == manifest
    texts = [t for n in names for t in corpus.read_shard_texts(corpus.shard_text_path(out, n))]
    assert sorted(texts) == [f"document number {i}" for i in range(6)]
    (out / "stale.jsonl").write_text("from an earlier run")
    corpus.write_corpus(cfg, 1, out, names)
    assert not (out / "stale.jsonl").exists()
    assert [p.name for p in tmp_path.iterdir() if "corpus" in p.name] == ["corpus"]  # no temporary left beside it
    with pytest.raises(ValueError, match="3 shards of text for 2 shard names"):
        corpus.write_corpus(cfg, 0, tmp_path / "other", names[:2])


def test_missing_jsonl_field_is_named(tmp_path):
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(KeyError, match="no field 'body'"):
        corpus.split_into_shards(_files_config([str(tmp_path / "*.jsonl")]), 0)


def test_unmatched_glob_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="match no files"):
        corpus.split_into_shards(_files_config([str(tmp_path / "*.txt")]), 0)


def test_bpe_and_packing():
    texts = ["def f(x):\n    return x + 1\n"] * 50 + ["class A:\n    pass\n"] * 50
    tokenizer = train_bpe(texts, vocab_size=300)
    assert len(tokenizer) <= 300
    tokens = pack(texts, tokenizer, context=16)
    assert tokens.dtype == np.int32 and tokens.shape[1] == 16
    eot = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    assert (tokens == eot).sum() >= len(tokens) * 16 // 30  # documents are separated
    assert tokenizer.decode(tokens[0]).startswith("def f(x):")
