"""Documents from the configured source, split deterministically into shards of text."""

from __future__ import annotations

import glob
import json
import logging
import random
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from monoscope.atomic import atomic_path

log = logging.getLogger(__name__)


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


class CorpusError(ValueError):
    """A record of the corpus that cannot be used; the message names the file and line (or row)."""


class BadRecords:
    """What to do with a record that is not usable text: raise (corpus.bad_records: error), or skip it
    and count it (skip), with the first few places kept for the warning and the manifest."""

    SHOWN = 5

    def __init__(self, policy: str = "error"):
        if policy not in ("error", "skip"):
            raise ValueError(f"corpus.bad_records must be 'error' or 'skip', got {policy!r}")
        self.policy, self.count, self.examples = policy, 0, []

    def __call__(self, message: str) -> None:
        if self.policy == "error":
            raise CorpusError(f"{message} (set corpus.bad_records: skip to skip such records, counted)")
        self.count += 1
        if len(self.examples) < self.SHOWN:
            self.examples.append(message)

    def summary(self) -> dict[str, Any]:
        return {"skipped": self.count, "first_skipped": self.examples}


def _text_or_problem(value: Any, where: str, field: str) -> tuple[str | None, str | None]:
    """(text, None) for usable text, else (None, what is wrong with it)."""
    if not isinstance(value, str):
        kind = "null" if value is None else type(value).__name__
        return None, f"{where}: field '{field}' is {kind}, not a string"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        return None, f"{where}: field '{field}' holds a lone surrogate at character {error.start} (not encodable text)"
    return value, None


def _utf8_lines(path: str) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number, text or None, problem or None) per line, decoded strictly; streamed."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                yield line_no, raw.decode("utf-8"), None
            except UnicodeDecodeError as error:
                yield line_no, None, f"{path}:{line_no}: not UTF-8 (byte 0x{raw[error.start]:02x} at column {error.start + 1})"


def file_documents(patterns: list[str], text_field: str, bad: BadRecords | None = None) -> Iterator[tuple[str, str]]:
    """(name, text) of every record of the files, streamed; a record that is not text goes to `bad`."""
    bad = bad or BadRecords()
    paths = sorted({p for pattern in patterns for p in glob.glob(pattern, recursive=True)})
    if not paths:
        raise FileNotFoundError(f"corpus.paths {patterns} match no files")
    for path in paths:
        suffix = Path(path).suffix
        if suffix == ".txt":
            raw = Path(path).read_bytes()
            try:
                yield path, raw.decode("utf-8")
            except UnicodeDecodeError as error:
                line = raw.count(b"\n", 0, error.start) + 1
                bad(f"{path}:{line}: not UTF-8 (byte 0x{raw[error.start]:02x} at offset {error.start})")
        elif suffix == ".jsonl":
            for line_no, line, problem in _utf8_lines(path):
                where = f"{path}:{line_no}"
                if problem is None and line.strip():
                    try:
                        record = json.loads(line)
                    except ValueError as error:
                        problem = f"{where}: not JSON ({error})"
                    else:
                        if not isinstance(record, dict):
                            problem = f"{where}: a JSON object expected, got {type(record).__name__}"
                        elif text_field not in record:
                            problem = f"{where}: no field '{text_field}' (corpus.text_field); fields are {sorted(record)[:10]}"
                        else:
                            text, problem = _text_or_problem(record[text_field], where, text_field)
                            if problem is None:
                                yield where, text
                if problem is not None:
                    bad(problem)
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            parquet = pq.ParquetFile(path)
            if text_field not in parquet.schema_arrow.names:
                raise CorpusError(f"{path}: no column '{text_field}' (corpus.text_field); columns are {parquet.schema_arrow.names[:10]}")
            row = 0
            for batch in parquet.iter_batches(columns=[text_field], batch_size=4096):  # streamed, not read whole
                for value in batch.column(0).to_pylist():
                    text, problem = _text_or_problem(value, f"{path}: row {row}", text_field)
                    if problem is None:
                        yield f"{path}:{row}", text
                    else:
                        bad(problem)
                    row += 1
        else:
            raise ValueError(f"corpus file {path}: unsupported suffix '{suffix}' (use .txt, .jsonl or .parquet)")


def huggingface_documents(name: str, config_name: str | None, split: str, text_field: str,
                          bad: BadRecords | None = None) -> Iterator[tuple[str, str]]:
    bad = bad or BadRecords()
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
        if text_field not in record:
            raise CorpusError(f"{name} row {i}: no field '{text_field}' (corpus.text_field); fields are {sorted(record)[:10]}")
        text, problem = _text_or_problem(record[text_field], f"{name} row {i}", text_field)
        if problem is None:
            yield f"{name}:{i}", text
        else:
            bad(problem)


def documents(corpus: dict[str, Any], bad: BadRecords | None = None) -> Iterator[tuple[str, str]]:
    source = corpus["source"]
    if source == "stdlib":
        return stdlib_documents()
    if source == "files":
        return file_documents(corpus["paths"], corpus["text_field"], bad)
    return huggingface_documents(corpus["hf_name"], corpus["hf_config"], corpus["hf_split"], corpus["text_field"], bad)


def split_into_shards(corpus: dict[str, Any], seed: int, bad: BadRecords | None = None) -> list[list[tuple[str, str]]]:
    """Documents shuffled with `seed`, then dealt round-robin into n_shards lists of (name, text).

    Round-robin after a shuffle keeps shards similar in size and content mix, so held-out shards
    are a fair sample of the same distribution. With max_documents, a seeded reservoir sample keeps
    only that many documents in memory while the corpus streams past (a uniform sample, as a
    shuffle followed by a cut is).
    """
    bad = bad or BadRecords(corpus["bad_records"])
    limit = corpus["max_documents"]
    rng = random.Random(seed)
    docs, n_bytes, seen = [], 0, 0
    for name, text in documents(corpus, bad):
        if not text.strip():
            continue
        n_bytes += len(text.encode("utf-8"))
        seen += 1
        if limit is None or len(docs) < limit:
            docs.append((name, text))
        else:
            slot = rng.randrange(seen)
            if slot < limit:
                docs[slot] = (name, text)
        if corpus["max_bytes"] and n_bytes >= corpus["max_bytes"]:
            break
    rng.shuffle(docs)
    if bad.count:
        log.warning("corpus: skipped %d bad record(s), first: %s", bad.count, "; ".join(bad.examples))
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
    bad = BadRecords(corpus["bad_records"])
    shards = split_into_shards(corpus, seed, bad)
    if len(shards) != len(shard_names):
        raise ValueError(f"{len(shards)} shards of text for {len(shard_names)} shard names")
    manifest = {"source": corpus["source"], "seed": seed, "shards": [], "bad_records": bad.summary()}
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
