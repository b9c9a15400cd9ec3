"""The Zarr contracts between stages: token shards and activation stores.

A store that exists is a store that is whole: every writer builds its output under a temporary
sibling path and renames it into place only after the last byte is written, so a killed job
leaves no half-store that a later rule could mistake for a finished one.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import math
import os
import struct
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import crc32c
import numpy as np
import zarr
from numcodecs import blosc
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec
from zarr.storage import LocalStore

from monoscope import __version__
from monoscope.atomic import atomic_path

# 2: every activation chunk ends in its crc32c (Zarr's crc32c codec after Blosc), and the attrs list
# the chunks that hold NaN or inf (`nonfinite_chunks`, checked by the writer on the stored bits).
# Stores of format 1 have neither: they are read, their chunk files checked only for truncation
# (the Blosc header's sizes) and every chunk scanned for NaN/inf when it is read.
FORMAT_VERSION = 2


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
    plain Blosc then Zarr's crc32c checksum, which any Zarr v3 reader decodes and verifies; the
    rounding is recorded in the attrs.
    """

    cname: str = "lz4"
    clevel: int = 5
    shuffle: str = "bitshuffle"  # "bitshuffle" | "shuffle" | "noshuffle"
    keep_mantissa_bits: int | None = None

    def codec(self, itemsize: int) -> BloscCodec:
        return BloscCodec(cname=self.cname, clevel=self.clevel, shuffle=self.shuffle, typesize=itemsize)

    def compressors(self, itemsize: int) -> list:
        """The activation array's bytes-to-bytes codecs: Blosc, then a crc32c of the Blosc frame
        (4 bytes appended) that every read verifies: ~17 GB/s of the rows it covers on the
        development machine, ~20 % of decoding them (benchmarks/bench_io.py)."""
        return [self.codec(itemsize), Crc32cCodec()]

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
# A float is NaN or inf exactly when its exponent bits are all ones. As signed integers the positive
# ones are the largest (>= the exponent mask); as unsigned, the negative ones are (>= sign | mask):
# two max reductions over the raw bits, no elementwise pass, no temporary.
_NON_FINITE = {np.dtype(np.float16): (np.uint16, 0x7C00, 0xFC00), np.dtype(np.float32): (np.uint32, 0x7F80_0000, 0xFF80_0000)}
_SLICE = 1 << 17  # elements per pass: the slice and its scratch stay in L2 (2 MiB here) through every pass


def _round_and_check(values: np.ndarray, keep_bits: int | None, check: bool) -> bool:
    """Round `values` in place (keep_bits mantissa bits, to nearest, ties to even; None: leave them)
    and, if `check`, tell whether every value is finite once rounded, on the raw bits, slice by
    slice: every pass over a slice hits L2, instead of a pass over the whole array (and a temporary
    as large) per operation."""
    bits, int_type = _MANTISSA_BITS[values.dtype]
    rounding = keep_bits is not None and keep_bits < bits
    if not (rounding or check):
        return True
    # Contiguous arrays go slice by slice; any other layout in one pass over its own view.
    ints = (values.reshape(-1) if values.flags.c_contiguous else values).view(int_type)
    step = _SLICE if ints.ndim == 1 else len(ints)
    scratch = np.empty((min(len(ints), step), *ints.shape[1:]), int_type) if rounding else None
    if rounding:
        drop = bits - keep_bits
        half, mask = (1 << (drop - 1)) - 1, int_type(~((1 << drop) - 1))
    unsigned, positive, negative = _NON_FINITE[values.dtype]
    finite = True
    for start in range(0, len(ints), step):
        x = ints[start : start + step]
        if rounding:
            s = scratch[: len(x)]
            np.right_shift(x, drop, out=s)  # the lowest kept bit decides ties: round half to even
            s &= 1
            s += half
            x += s
            x &= mask
        if check and finite and len(x):
            finite = int(x.max()) < positive and int(x.view(unsigned).max()) < negative
            if not finite and not rounding:
                break
    return finite


def round_mantissa(values: np.ndarray, keep_bits: int) -> np.ndarray:
    """Round float16/float32 `values` in place to `keep_bits` mantissa bits, to nearest, ties to even.

    Bit-identical to numcodecs BitRound, in in-place integer passes over cache-sized slices instead
    of its temporaries: this runs on every activation a harvest writes.
    """
    _round_and_check(values, keep_bits, check=False)
    return values


def all_finite(values: np.ndarray) -> bool:
    """np.isfinite(values).all() as two max reductions over the raw bits: ~40x faster than isfinite on float16."""
    if values.dtype not in _NON_FINITE:
        return bool(np.isfinite(values).all())
    return _round_and_check(values, None, check=True)


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

    @functools.cached_property
    def checksummed(self) -> bool:
        """Every chunk ends in its crc32c, verified on every read (stores of format 2 on)."""
        return isinstance(self.acts.metadata.codecs[-1], Crc32cCodec)

    @functools.cached_property
    def nonfinite_chunks(self) -> frozenset[int] | None:
        """The chunks that hold NaN or inf, as the writer found them; None where that is unknown (a
        store of format 1): then only a scan of each chunk read can tell. Trusted only with checksums,
        which make a chunk that is read the bytes that the writer checked."""
        listed = self.attrs.get("nonfinite_chunks")
        return frozenset(listed) if self.checksummed and listed is not None else None

    def chunk_rows(self, index: int) -> tuple[int, int]:
        start = index * self.chunk_tokens
        return start, min(start + self.chunk_tokens, self.n_tokens)

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """acts[start:stop] through Zarr (which verifies the checksums); a damaged chunk is named."""
        try:
            return self.acts[start:stop]
        except Exception:
            files = ChunkFiles.of(self)
            if files is not None:
                scratch = np.empty((self.chunk_tokens, self.d), self.acts.dtype)
                for index in range(start // self.chunk_tokens, (stop - 1) // self.chunk_tokens + 1):
                    files.decode(index, scratch)  # raises CorruptChunk for the first damaged one
            raise


class CorruptChunk(ValueError):
    """A chunk file that does not hold what the writer wrote: truncated, bit-flipped, overwritten."""


_BLOSC_HEADER = struct.Struct("<4xIII")  # after version, versionlz, flags, typesize: nbytes, blocksize, cbytes


_thread_buffers = threading.local()


def _read_buffer(nbytes: int) -> np.ndarray:
    """A uint8 buffer of at least nbytes, one per thread, reused (grown by halves)."""
    buffer = getattr(_thread_buffers, "buffer", None)
    if buffer is None or len(buffer) < nbytes:
        buffer = _thread_buffers.buffer = np.empty(max(nbytes, len(buffer) * 3 // 2 if buffer is not None else 0), np.uint8)
    return buffer


class ChunkFiles:
    """The activation chunk files of a store whose array is plain little-endian bytes + Blosc
    (+ crc32c) on local disk, decoded without Zarr's per-call machinery: read, checked (the Blosc
    header's sizes against the file's; the crc32c), and decompressed straight into the caller's
    buffer (Blosc and crc32c release the GIL)."""

    def __init__(self, store: ActivationStore):
        self.store = store
        self.directory = Path(store.acts.store.root) / store.acts.store_path.path
        self.checksummed = store.checksummed
        self._key = store.acts.metadata.encode_chunk_key

    @classmethod
    def of(cls, store: ActivationStore) -> ChunkFiles | None:
        """None where the chunks need Zarr: another codec, byte order or storage."""
        acts = store.acts
        codecs = acts.metadata.codecs if acts.metadata.zarr_format == 3 else ()
        codecs = codecs[:-1] if codecs and isinstance(codecs[-1], Crc32cCodec) else codecs
        plain = (
            len(codecs) == 2
            and isinstance(codecs[0], BytesCodec)
            and (codecs[0].endian is None or codecs[0].endian.value == "little")
            and isinstance(codecs[1], BloscCodec)
            and isinstance(acts.store, LocalStore)
        )
        return cls(store) if plain else None

    def path(self, index: int) -> Path:
        return self.directory / self._key((index, 0))

    def decode(self, index: int, out: np.ndarray) -> None:
        """Decode chunk `index` into `out`, which holds a whole chunk (Zarr stores the last one padded)."""
        path = self.path(index)
        trailer = 4 if self.checksummed else 0
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise self._corrupt(index, path, "its file is missing") from None
        try:
            size = os.fstat(fd).st_size
            # Read into this thread's buffer, which stays in cache from chunk to chunk: cheaper than
            # mapping the file (page faults, and an unmap that every other core must hear about).
            buffer = _read_buffer(size + 1)
            read = os.preadv(fd, [buffer], 0)
        finally:
            os.close(fd)
        if read != size:
            raise self._corrupt(index, path, f"{read} bytes read of its {size} (it changed while read)")
        why = None
        if size < _BLOSC_HEADER.size + trailer:
            why = f"its file has {size} bytes, less than a Blosc header"
        else:
            nbytes, _, cbytes = _BLOSC_HEADER.unpack_from(buffer)
            frame = buffer[:cbytes]
            if cbytes != size - trailer:
                why = f"its Blosc frame says {cbytes} bytes, the file holds {size - trailer} (truncated or overwritten)"
            elif nbytes != out.nbytes:
                why = f"its Blosc frame decodes to {nbytes} bytes, a chunk is {out.nbytes}"
            elif trailer and crc32c.crc32c(frame) != int.from_bytes(buffer[cbytes:size], "little"):
                why = "its crc32c does not match its bytes (bit rot, a partial or interrupted copy)"
            else:
                try:
                    blosc.decompress(frame, out)
                except Exception as error:  # only a store without checksums gets here
                    why = f"Blosc cannot decode it ({error})"
        if why:
            raise self._corrupt(index, path, why)

    def _corrupt(self, index: int, path: Path, why: str) -> CorruptChunk:
        start, stop = self.store.chunk_rows(index)
        return CorruptChunk(
            f"activation store {self.store.path}: chunk {index} (tokens {start}:{stop}, file {path}) is damaged: "
            f"{why}; delete the store and rerun to rebuild it"
        )


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

    Rows are buffered up to whole chunks; each whole chunk is rounded, checked for NaN/inf (on the
    stored bits, in the same cache-sized passes), Blosc-encoded, checksummed and written as its chunk
    file by one of `workers` threads, chunks in parallel (Blosc releases the GIL and, called off the
    main thread, runs single-threaded, so workers never race Blosc's own threads), while the caller
    computes the next rows. Zarr creates the array and its metadata; the chunk files are the Blosc
    frame + crc32c that Zarr itself writes for a bytes + Blosc + crc32c pipeline (tests read them
    back through Zarr), which skips Zarr's per-call machinery on the hot path. The last, partial chunk
    goes through Zarr, which pads it to a whole chunk. The chunks holding NaN or inf are listed in the
    attrs (`nonfinite_chunks`), so readers need not scan for them: the checksums make what they read
    what was checked.
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
            compressors=codec.compressors(dtype.itemsize),
            # Zarr's default compares every chunk with the fill value to skip empty ones: a full extra
            # pass over the data (~20 % of writing a chunk), for activations that are never all zero.
            config={"write_empty_chunks": True},
        )
        self._group = group
        self._attrs = {
            "format_version": FORMAT_VERSION,
            "package_version": __version__,
            "dtype": dtype.name,
            "codec": codec.as_attrs(),
            "chunk_tokens": chunk_tokens,
            **attrs,
        }
        self._nonfinite: list[int] = []  # appended by the workers (list.append is atomic)
        self._codec = codec
        self._dtype, self._chunk_tokens = dtype, chunk_tokens
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
        first (the caller must not use it again). Whole chunks are then written straight from it;
        only a chunk that straddles two appends is copied (its rows, not the whole append)."""
        rows = np.asarray(acts, dtype=self._dtype)
        owned = consume or not np.may_share_memory(rows, acts)  # a dtype conversion already copied
        chunk = self._chunk_tokens
        if self._pending_rows:  # complete the chunk that the last append left open
            head, rows = rows[: chunk - self._pending_rows], rows[chunk - self._pending_rows :]
            self._pending.append(head if owned else head.copy())
            self._pending_rows += len(head)
            if self._pending_rows < chunk:
                return
            self._write(np.concatenate(self._pending))
            self._pending, self._pending_rows = [], 0
        whole = (len(rows) // chunk) * chunk
        for start in range(0, whole, chunk):
            piece = rows[start : start + chunk]
            self._write(piece if owned else piece.copy())
        if whole < len(rows):
            tail = rows[whole:]
            self._pending, self._pending_rows = [tail if owned else tail.copy()], len(tail)

    def _write(self, rows: np.ndarray) -> None:
        """Queue one chunk's rows; at most two chunks per worker are in flight (bounded memory)."""
        while len(self._in_flight) >= 2 * self.workers:
            self._in_flight.popleft().result()  # re-raises a failed write here, in the caller
        start = self._written
        self._written += len(rows)
        self._in_flight.append(self._encoder.submit(self._round_and_store, start, rows))

    def _round_and_store(self, start: int, rows: np.ndarray) -> None:
        chunk, keep = self._chunk_tokens, self._codec.keep_mantissa_bits
        if rows.dtype in _MANTISSA_BITS:  # rounded and checked in the same passes
            finite = _round_and_check(rows, keep, check=True)
        else:  # (rounding other dtypes fails, as it always has)
            finite = all_finite(rows if keep is None else round_mantissa(rows, keep))
        if not finite:
            self._nonfinite.append(start // chunk)
        if len(rows) < chunk:  # the store's last chunk: Zarr pads it (and appends its checksum)
            self.acts[start : start + len(rows)] = rows
            return
        frame = self._codec.encode(rows)
        checksum = crc32c.crc32c(frame).to_bytes(4, "little")
        file = self._chunk_dir / self.acts.metadata.encode_chunk_key((start // chunk, 0))
        with contextlib.suppress(FileExistsError):
            os.makedirs(file.parent)
        fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            written = os.writev(fd, [frame, checksum])
        finally:
            os.close(fd)
        if written != len(frame) + len(checksum):
            raise OSError(f"short write of {file}: {written} of {len(frame) + len(checksum)} bytes")

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
        try:
            self._group.attrs.update({**self._attrs, "nonfinite_chunks": sorted(self._nonfinite)})
        except BaseException:
            self.abort()
            raise
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
        acts = store.read_rows(start * context, stop * context).astype(np.float32, copy=False)
        yield tokens[start:stop], acts.reshape(stop - start, context, store.d)
