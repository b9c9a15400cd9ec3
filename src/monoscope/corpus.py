"""Documents from the configured source, split deterministically into shards of text."""

from __future__ import annotations

import glob
import json
import random
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from monoscope.atomic import atomic_path


def stdlib_documents() -> Iterator[tuple[str, str]]:
    """(name, text) for every .py file of the running interpreter's standard library, tests excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        parts = set(rel.parts)
        if parts & {"test", "tests", "idle_test", "site-packages", "dist-packages"} or rel.name.startswith("test_"):
            continue
        try:
            yield str(rel), path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue


def file_documents(patterns: list[str], text_field: str) -> Iterator[tuple[str, str]]:
    paths = sorted({p for pattern in patterns for p in glob.glob(pattern, recursive=True)})
    if not paths:
        raise FileNotFoundError(f"corpus.paths {patterns} match no files")
    for path in paths:
        suffix = Path(path).suffix
        if suffix == ".txt":
            yield path, Path(path).read_text(encoding="utf-8", errors="replace")
        elif suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                for line_no, line in enumerate(f, 1):
                    if line.strip():
                        yield f"{path}:{line_no}", _field(json.loads(line), text_field, f"{path}:{line_no}")
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path, columns=[text_field])
            for row, text in enumerate(table.column(text_field).to_pylist()):
                yield f"{path}:{row}", text
        else:
            raise ValueError(f"corpus file {path}: unsupported suffix '{suffix}' (use .txt, .jsonl or .parquet)")


def _field(record: dict[str, Any], field: str, where: str) -> str:
    if field not in record:
        raise KeyError(f"{where}: no field '{field}' (corpus.text_field); fields are {sorted(record)}")
    return record[field]


def huggingface_documents(name: str, config_name: str | None, split: str, text_field: str) -> Iterator[tuple[str, str]]:
    try:
        import datasets
    except ImportError as e:
        raise ImportError("corpus.source 'huggingface' needs the 'datasets' package: pip install 'monoscope[hub]'") from e
    try:
        stream = datasets.load_dataset(name, config_name, split=split, streaming=True)
    except Exception as e:  # the hub raises many types; all mean the same to the user
        raise RuntimeError(
            f"cannot open Hugging Face dataset '{name}' (config {config_name}, split {split}): {e}\n"
            f"Pre-download it on a machine with network (datasets.load_dataset('{name}', ...) with HF_HOME set to a "
            f"shared cache), set HF_DATASETS_OFFLINE=1 here, or export it to .jsonl and use corpus.source: files."
        ) from e
    for i, record in enumerate(stream):
        yield f"{name}:{i}", _field(record, text_field, f"{name} row {i}")


def documents(corpus: dict[str, Any]) -> Iterator[tuple[str, str]]:
    source = corpus["source"]
    if source == "stdlib":
        return stdlib_documents()
    if source == "files":
        return file_documents(corpus["paths"], corpus["text_field"])
    return huggingface_documents(corpus["hf_name"], corpus["hf_config"], corpus["hf_split"], corpus["text_field"])


def split_into_shards(corpus: dict[str, Any], seed: int) -> list[list[tuple[str, str]]]:
    """Documents shuffled with `seed`, then dealt round-robin into n_shards lists of (name, text).

    Round-robin after a shuffle keeps shards similar in size and content mix, so held-out shards
    are a fair sample of the same distribution.
    """
    docs, n_bytes = [], 0
    for name, text in documents(corpus):
        if not text.strip():
            continue
        docs.append((name, text))
        n_bytes += len(text.encode("utf-8"))
        if corpus["max_bytes"] and n_bytes >= corpus["max_bytes"]:
            break
    random.Random(seed).shuffle(docs)
    if corpus["max_documents"]:
        docs = docs[: corpus["max_documents"]]
    n_shards = corpus["n_shards"]
    if len(docs) < n_shards:
        raise ValueError(f"corpus has {len(docs)} documents, fewer than corpus.n_shards={n_shards}")
    return [docs[i::n_shards] for i in range(n_shards)]


def write_corpus(corpus: dict[str, Any], seed: int, out_dir: str | Path, shard_names: list[str]) -> dict[str, Any]:
    """Write shard i as JSONL of {"name", "text"} to out_dir/<shard_names[i]>.jsonl, plus manifest.json.

    One directory rather than one output per shard: with thousands of shards, Snakemake matches
    every requested file against every output of a rule, so per-shard outputs make planning
    quadratic in shards. Written beside out_dir and renamed when whole.
    """
    shards = split_into_shards(corpus, seed)
    if len(shards) != len(shard_names):
        raise ValueError(f"{len(shards)} shards of text for {len(shard_names)} shard names")
    manifest = {"source": corpus["source"], "seed": seed, "shards": []}
    with atomic_path(out_dir) as tmp_dir:
        tmp_dir.mkdir()
        for shard, docs in zip(shard_names, shards, strict=True):
            with open(tmp_dir / f"{shard}.jsonl", "w", encoding="utf-8") as f:
                for name, text in docs:
                    f.write(json.dumps({"name": name, "text": text}) + "\n")
            manifest["shards"].append(
                {"shard": shard, "documents": len(docs), "bytes": sum(len(t.encode("utf-8")) for _, t in docs)}
            )
        (tmp_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def shard_text_path(corpus_dir: str | Path, shard: str) -> Path:
    return Path(corpus_dir) / f"{shard}.jsonl"


def read_shard_texts(path: str | Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]
