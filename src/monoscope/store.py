"""The Zarr contracts between stages: token shards and activation stores.

A store that exists is a store that is whole: every writer builds its output under a temporary
sibling path and renames it into place only after the last byte is written, so a killed job
leaves no half-store that a later rule could mistake for a finished one.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from numcodecs import blosc
from zarr.codecs import BloscCodec

from monoscope import __version__
from monoscope.atomic import atomic_path

FORMAT_VERSION = 1


@dataclass(frozen=True)
class CodecSpec:
    """Blosc settings for activation chunks. bitshuffle is what makes float activations compress;
    lz4 level 5 is the default by measurement (benchmarks/bench_io.py on the default run's stores, one
    thread: 39.6 % of float32 bytes, encode ~950 MB/s, decode ~2 GB/s, against zstd-3's 38.8 %,
    ~240 MB/s and ~1.3 GB/s): under one point of bytes for 4x the harvest's encode cost and 1.5x the
    loader's decode cost. zstd level 3 stays one config value away for users short of disk.

    Float activations are nearly incompressible losslessly (GELU outputs: ~0.9 of their float16
    bytes). `keep_mantissa_bits` rounds the mantissa first (as numcodecs BitRound does), which zeroes
    the noisy low bits: 8 of float16's 10 bits gives a relative RMS error of ~1e-3, far below any
    SAE's reconstruction error, and ~0.39 of the float32 bytes. None keeps the values exact. The
    writer rounds before handing chunks to Zarr (`round_mantissa`), so the store's codec pipeline is
    plain Blosc that any Zarr v3 reader decodes; the rounding is recorded in the attrs.
    """

    cname: str = "lz4"
    clevel: int = 5
    shuffle: str = "bitshuffle"  # "bitshuffle" | "shuffle" | "noshuffle"
    keep_mantissa_bits: int | None = None

    def codec(self, itemsize: int) -> BloscCodec:
        return BloscCodec(cname=self.cname, clevel=self.clevel, shuffle=self.shuffle, typesize=itemsize)

    def encode(self, rows: np.ndarray) -> bytes:
        """One chunk's Blosc frame, as Zarr's BloscCodec writes it (typesize = the rows' itemsize)."""
        shuffle = {"noshuffle": blosc.NOSHUFFLE, "shuffle": blosc.SHUFFLE, "bitshuffle": blosc.BITSHUFFLE}[self.shuffle]
        return blosc.compress(np.ascontiguousarray(rows), self.cname.encode(), self.clevel, shuffle)

    def as_attrs(self) -> dict[str, Any]:
        return {
            "id": "blosc",
            "cname": self.cname,
            "clevel": self.clevel,
            "shuffle": self.shuffle,
            "keep_mantissa_bits": self.keep_mantissa_bits,
        }


_MANTISSA_BITS = {np.dtype(np.float16): (10, np.int16), np.dtype(np.float32): (23, np.int32)}


def round_mantissa(values: np.ndarray, keep_bits: int) -> np.ndarray:
    """Round float16/float32 `values` in place to `keep_bits` mantissa bits, to nearest, ties to even.

    Bit-identical to numcodecs BitRound, in three in-place integer passes instead of its
    temporaries: this runs on every activation a harvest writes.
    """
    bits, int_type = _MANTISSA_BITS[values.dtype]
    if keep_bits >= bits:
        return values
    drop = bits - keep_bits
    ints = values.view(int_type)
    carry = ints >> drop  # the lowest kept bit decides ties: round half to even
    carry &= 1
    carry += (1 << (drop - 1)) - 1
    ints += carry
    ints &= int_type(~((1 << drop) - 1))
    return values


def chunk_tokens_for(d: int, dtype: str, context: int, target_mib: float) -> int:
    """Tokens per chunk: whole sequences, at least `target_mib` MiB (small chunks compress and read badly)."""
    bytes_per_seq = context * d * np.dtype(dtype).itemsize
    return context * max(1, math.ceil(target_mib * 2**20 / bytes_per_seq))


# --- token shards -------------------------------------------------------------------------------


def write_token_shard(path: str | os.PathLike, tokens: np.ndarray, attrs: dict[str, Any]) -> None:
    """tokens: int32 [n_seq, context]."""
    if tokens.ndim != 2:
        raise ValueError(f"token shard {path}: expected [n_seq, context], got shape {tokens.shape}")
    with atomic_path(path) as tmp:
        group = zarr.open_group(tmp, mode="w")
        group.create_array("tokens", data=tokens.astype(np.int32), chunks=(min(len(tokens), 1024) or 1, tokens.shape[1]),
                           config={"write_empty_chunks": True})  # every chunk on disk: open checks the count
        group.attrs.update({"format_version": FORMAT_VERSION, "package_version": __version__, **attrs})


def read_token_shard(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    group = _open_group(path)
    check_complete(path, group, ("tokens",))
    return group["tokens"][:], dict(group.attrs)


# --- activation stores --------------------------------------------------------------------------


@dataclass
class ActivationStore:
    """A read-only view of one activation store."""

    path: Path
    acts: zarr.Array  # [n_tokens, d], chunked along tokens
    # int32 [n_seq, context], read lazily (slices give numpy): a run opens thousands of stores and
    # most readers need a block at a time; flat token i is tokens[i // context, i % context]
    tokens: zarr.Array
    attrs: dict[str, Any]

    @property
    def n_tokens(self) -> int:
        return self.acts.shape[0]

    @property
    def d(self) -> int:
        return self.acts.shape[1]

    @property
    def context(self) -> int:
        return self.tokens.shape[1]

    @property
    def n_seq(self) -> int:
        return self.tokens.shape[0]

    @property
    def chunk_tokens(self) -> int:
        return self.acts.chunks[0]


def _open_group(path: str | os.PathLike) -> zarr.Group:
    if not Path(path).exists():
        raise FileNotFoundError(f"no Zarr store at {path}")
    return zarr.open_group(path, mode="r")


class IncompleteStore(ValueError):
    """A store with chunks missing (a partial copy, a lost file): Zarr would read them as zeros."""


def check_complete(path: str | os.PathLike, group: zarr.Group, arrays: tuple[str, ...]) -> None:
    """Every chunk of each array is on disk. Writers store every chunk, even all-zero ones
    (write_empty_chunks), so a missing one is a fault, not a fill value: a partly copied store
    would otherwise train on zeros."""
    for name in arrays:
        array = group[name]
        present, expected = array.nchunks_initialized, array.nchunks
        if present != expected:
            raise IncompleteStore(
                f"store {path}: array '{name}' has {present} of its {expected} chunks on disk "
                f"(a partial copy or a lost file); delete the store and rerun to rebuild it"
            )


def open_activations(path: str | os.PathLike) -> ActivationStore:
    group = _open_group(path)
    for name in ("acts", "tokens"):
        if name not in group:
            raise ValueError(f"activation store {path} has no '{name}' array; is it a token shard?")
    check_complete(path, group, ("acts", "tokens"))
    return ActivationStore(Path(path), group["acts"], group["tokens"], dict(group.attrs))


class ActivationStoreWriter:
    """Stream activations into a new store, sequence block by sequence block.

    Rows are buffered up to whole chunks; each whole chunk is rounded, Blosc-encoded and written as
    its chunk file by one of `workers` threads, chunks in parallel (Blosc releases the GIL and, called
    off the main thread, runs single-threaded, so workers never race Blosc's own threads), while the
    caller computes the next rows. Zarr creates the array and its metadata; the chunk files are the
    plain Blosc frames Zarr itself writes for a bytes + Blosc pipeline (tests read them back through
    Zarr), which skips Zarr's per-call machinery on the hot path. The last, partial chunk goes through
    Zarr, which pads it to a whole chunk.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        tokens: np.ndarray,
        d: int,
        dtype: str,
        chunk_tokens: int,
        attrs: dict[str, Any],
        codec: CodecSpec = CodecSpec(),
        workers: int | None = None,
    ):
        """workers: encoding threads (default: the cores this process may run on)."""
        self._atomic = atomic_path(path)
        tmp = self._atomic.__enter__()
        n_seq, context = tokens.shape
        group = zarr.open_group(tmp, mode="w")
        group.create_array("tokens", data=tokens.astype(np.int32), chunks=(min(n_seq, 1024), context),
                           config={"write_empty_chunks": True})  # every chunk on disk: open checks the count
        dtype = np.dtype(dtype)
        self.acts = group.create_array(
            "acts",
            shape=(n_seq * context, d),
            chunks=(chunk_tokens, d),
            dtype=dtype,
            compressors=[codec.codec(dtype.itemsize)],
            # Zarr's default compares every chunk with the fill value to skip empty ones: a full extra
            # pass over the data (~20 % of writing a chunk), for activations that are never all zero.
            config={"write_empty_chunks": True},
        )
        group.attrs.update(
            {
                "format_version": FORMAT_VERSION,
                "package_version": __version__,
                "dtype": dtype.name,
                "codec": codec.as_attrs(),
                "chunk_tokens": chunk_tokens,
                **attrs,
            }
        )
        self._codec = codec
        self._chunk_dir = tmp / "acts"
        self._pending: list[np.ndarray] = []
        self._pending_rows = 0
        self._written = 0
        self.workers = workers or len(os.sched_getaffinity(0))
        self._encoder = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="store-writer")
        self._in_flight: collections.deque[Future] = collections.deque()

    def append(self, acts: np.ndarray, consume: bool = False) -> None:
        """acts: [n, d] for the next n tokens in flat (sequence-major) order, ideally already of the
        store's dtype (numpy's float32 -> float16 conversion is ~7x slower than torch's).

        consume=True hands the array over: the writer may round it in place instead of copying it
        first (the caller must not use it again)."""
        rows = np.asarray(acts, dtype=self.acts.dtype)
        owned = consume or not np.may_share_memory(rows, acts)  # a dtype conversion already copied
        self._pending.append(rows if owned else rows.copy())
        self._pending_rows += len(rows)
        chunk = self.acts.chunks[0]
        if self._pending_rows >= chunk:
            rows = self._pending[0] if len(self._pending) == 1 else np.concatenate(self._pending)
            whole = (len(rows) // chunk) * chunk
            for start in range(0, whole, chunk):
                self._write(rows[start : start + chunk])
            self._pending = [rows[whole:]] if whole < len(rows) else []
            self._pending_rows = len(rows) - whole

    def _write(self, rows: np.ndarray) -> None:
        """Queue one chunk's rows; at most two chunks per worker are in flight (bounded memory)."""
        while len(self._in_flight) >= 2 * self.workers:
            self._in_flight.popleft().result()  # re-raises a failed write here, in the caller
        start = self._written
        self._written += len(rows)
        self._in_flight.append(self._encoder.submit(self._round_and_store, start, rows))

    def _round_and_store(self, start: int, rows: np.ndarray) -> None:
        if self._codec.keep_mantissa_bits is not None:
            round_mantissa(rows, self._codec.keep_mantissa_bits)
        chunk = self.acts.chunks[0]
        if len(rows) < chunk:  # the store's last chunk: Zarr pads it to a whole one
            self.acts[start : start + len(rows)] = rows
            return
        file = self._chunk_dir / self.acts.metadata.encode_chunk_key((start // chunk, 0))
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(self._codec.encode(rows))

    def _wait(self) -> None:
        while self._in_flight:
            self._in_flight.popleft().result()

    def close(self) -> None:
        if self._pending_rows:
            self._write(np.concatenate(self._pending))
        try:
            self._wait()
        finally:
            self._encoder.shutdown()
        if self._written != self.acts.shape[0]:
            self.abort()
            raise ValueError(f"activation store got {self._written} rows, expected {self.acts.shape[0]}")
        self._atomic.__exit__(None, None, None)

    def abort(self) -> None:
        self._encoder.shutdown(wait=True, cancel_futures=True)
        with contextlib.suppress(BaseException):
            self._atomic.__exit__(RuntimeError, RuntimeError("aborted"), None)

    def __enter__(self) -> ActivationStoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_activation_store(
    path: str | os.PathLike,
    acts: np.ndarray,
    tokens: np.ndarray,
    attrs: dict[str, Any],
    chunk_tokens: int,
    dtype: str = "float16",
    codec: CodecSpec = CodecSpec(),
) -> None:
    """Write a whole in-memory store at once (tests, small tools). acts: [n_seq * context, d]."""
    with ActivationStoreWriter(path, tokens, acts.shape[1], dtype, chunk_tokens, attrs, codec) as writer:
        writer.append(acts)


def iter_sequence_blocks(store: ActivationStore, seqs_per_block: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (tokens [b, context] int32, acts [b, context, d] float32) in order."""
    context = store.context
    tokens = store.tokens[:]  # this store's only, while it is read (small blocks would decode a chunk each)
    for start in range(0, store.n_seq, seqs_per_block):
        stop = min(start + seqs_per_block, store.n_seq)
        acts = store.acts[start * context : stop * context].astype(np.float32, copy=False)
        yield tokens[start:stop], acts.reshape(stop - start, context, store.d)
