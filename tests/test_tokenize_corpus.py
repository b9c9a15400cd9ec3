import json
import re

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
            "n_shards": 3, "bad_records": "error", **extra}


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
    with pytest.raises(corpus.CorpusError, match=r"b.jsonl:1: no field 'body'"):
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


GOOD = [json.dumps({"body": f"good record {i}"}).encode() for i in range(4)]
BAD_JSONL = {
    "not_utf8": (b'{"body": "caf\xe9"}', "not UTF-8 (byte 0xe9"),
    "null": (b'{"body": null}', "field 'body' is null, not a string"),
    "number": (b'{"body": 42}', "field 'body' is int, not a string"),
    "list_text": (b'{"body": ["a"]}', "field 'body' is list, not a string"),
    "surrogate": (b'{"body": "x\\ud800y"}', "field 'body' holds a lone surrogate at character 1"),
    "array_line": (b'["body", "x"]', "a JSON object expected, got list"),
    "string_line": (b'"just text"', "a JSON object expected, got str"),
    "torn_json": (b'{"body": "unterminated', "not JSON"),
    "missing": (b'{"text": "other field"}', "no field 'body'"),
}


@pytest.mark.parametrize("kind", sorted(BAD_JSONL))
def test_a_bad_jsonl_record_is_named_by_file_and_line_or_skipped_and_counted(tmp_path, kind):
    line, message = BAD_JSONL[kind]
    (tmp_path / "c.jsonl").write_bytes(b"\n".join(GOOD[:2] + [line] + GOOD[2:]) + b"\n")
    cfg = _files_config([str(tmp_path / "*.jsonl")])
    with pytest.raises(corpus.CorpusError, match=rf"c.jsonl:3: {re.escape(message)}"):
        corpus.split_into_shards(cfg, 0)
    manifest = corpus.write_corpus(cfg | {"bad_records": "skip"}, 0, tmp_path / "out", ["a", "b", "c"])
    assert manifest["bad_records"]["skipped"] == 1 and "c.jsonl:3:" in manifest["bad_records"]["first_skipped"][0]
    assert sum(s["documents"] for s in manifest["shards"]) == 4


def test_a_txt_file_that_is_not_utf8_is_named_with_its_line(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"line one\nline two\nbad \xff here\n")
    (tmp_path / "b.txt").write_text("fine")
    with pytest.raises(corpus.CorpusError, match=r"a.txt:3: not UTF-8 \(byte 0xff"):
        corpus.split_into_shards(_files_config([str(tmp_path / "*.txt")], n_shards=1), 0)


def test_parquet_nulls_and_non_strings_are_named_by_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["one", None, "three", "four"]}), tmp_path / "p.parquet")
    with pytest.raises(corpus.CorpusError, match=r"p.parquet: row 1: field 'body' is null"):
        corpus.split_into_shards(_files_config([str(tmp_path / "*.parquet")], n_shards=1), 0)
    shards = corpus.split_into_shards(_files_config([str(tmp_path / "*.parquet")], n_shards=1, bad_records="skip"), 0)
    assert sorted(t for _, t in shards[0]) == ["four", "one", "three"]
    pq.write_table(pa.table({"other": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(corpus.CorpusError, match="no column 'body'"):
        corpus.split_into_shards(_files_config([str(tmp_path / "*.parquet")], n_shards=1), 0)


def test_max_documents_is_a_seeded_uniform_sample_held_in_bounded_memory(tmp_path):
    with open(tmp_path / "b.jsonl", "w") as f:
        for i in range(200):
            f.write(json.dumps({"body": f"record {i}"}) + "\n")
    cfg = _files_config([str(tmp_path / "*.jsonl")], max_documents=20, n_shards=2)
    first = corpus.split_into_shards(cfg, seed=3)
    assert first == corpus.split_into_shards(cfg, seed=3) and sum(map(len, first)) == 20
    picked = {int(t.split()[1]) for shard in first for _, t in shard}
    assert max(picked) > 100  # not just the first 20 read
    assert corpus.split_into_shards(cfg, seed=4) != first
