"""Stream shuffled activation batches from the activation stores, never holding the dataset.

The stores' chunks are split among `streams` independent streams. Each stream walks an endless
sequence of chunks (epoch e: a seeded permutation of every chunk of every store, stream s taking
positions s, s + S, s + 2S, ...), reads them a block at a time (about buffer_tokens / S tokens,
never across an epoch boundary),
shuffles the block's tokens with a seed of its own, and concatenates the shuffled blocks into one
endless token sequence. Global batch i is, for every stream s in order, tokens
[i·b, (i+1)·b) of stream s, with b = batch_size / S.

Why streams: a batch's content then depends only on (seed, S, batch_size), not on the number of
processes. A process of P takes S/P streams, so it reads chunks no other process reads, and
1 process or P processes see exactly the same global batches. Why blocks: batch i can be rebuilt
from metadata alone, so resuming needs only the number of batches already drawn.

Speed: a block is decoded by a worker thread straight into one of its stream's two preallocated
buffers, in the store's dtype (Blosc chunk files are read into a per-thread buffer, checked against
their crc32c and decompressed without Zarr's per-call machinery when the array is plain bytes +
Blosc [+ crc32c] on local disk: store.ChunkFiles). NaN/inf: the writer lists the chunks that hold
any, and the checksum makes a chunk read the bytes it checked, so only stores without checksums
(format 1) are scanned, on the raw bits. Nothing is permuted in place: every stream's two buffers
are slices of one pool, a block's shuffled order is kept as pool rows, and a batch is one gather
through every stream's next pool rows, converted to the requested dtype once (float32 for the
trainer; `dtype=None` keeps the store's float16 so the conversion happens on the training device):
a handful of torch calls per batch, whatever the number of streams. Blosc decompresses with the
GIL released, so `threads` workers decode on as many cores. What is left is memory-bound: the
gather reads rows at random from blocks far larger than the caches.

Memory: per stream the block being consumed plus the one prefetched, in the store's dtype: about
2 · buffer_tokens · d values in all (a block holds at least one chunk), plus one chunk of slack per
buffer because Zarr stores a store's last chunk at full size; and up to three batches' memory,
reused once the consumer lets go of them (a fresh batch faults in every one of its pages).
"""

from __future__ import annotations

import itertools
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from monoscope.store import ChunkFiles, all_finite, open_activations


@dataclass(frozen=True)
class _Chunk:
    store: int
    index: int
    start: int
    stop: int


class ActivationLoader:
    def __init__(
        self,
        store_paths: Sequence[str | os.PathLike],
        batch_size: int,
        buffer_tokens: int,  # sae.buffer_tokens: the mixing buffer, over all streams
        streams: int,  # sae.loader_streams
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        check_finite: bool = True,
        threads: int | None = None,
        dtype: torch.dtype | None = torch.float32,
        pin_memory: bool = False,
    ):
        """threads: decoding workers (default: one per stream of this process, at most one per core).
        dtype: of the batches; None yields the store's own dtype, to convert on the training device.
        pin_memory: batches in page-locked memory (needs CUDA), so .to("cuda", non_blocking=True)
        overlaps the copy with compute; CUDA's host allocator also reuses them (no page faults)."""
        if not store_paths:
            raise ValueError("the loader needs at least one activation store")
        if streams < 1 or batch_size % streams:
            raise ValueError(f"batch_size={batch_size} must be a multiple of loader streams={streams}")
        if streams % world_size:
            raise ValueError(f"loader streams={streams} must be a multiple of the number of processes={world_size}")
        if threads is not None and threads < 1:
            raise ValueError(f"loader threads={threads} must be at least 1")
        self.paths = [Path(p) for p in store_paths]
        self.stores = [open_activations(p) for p in self.paths]
        dims = {s.d for s in self.stores}
        if len(dims) != 1:
            raise ValueError(f"activation stores disagree on width: {dict(zip(map(str, self.paths), (s.d for s in self.stores)))}")
        self.d = dims.pop()
        self.n_tokens = sum(s.n_tokens for s in self.stores)
        self.batch_size = batch_size
        self.streams = streams
        self.sub_batch = batch_size // streams
        self.seed = seed
        self.my_streams = range(rank * streams // world_size, (rank + 1) * streams // world_size)
        self.check_finite = check_finite
        self.pin_memory = pin_memory
        self.threads = threads or min(len(self.my_streams), os.cpu_count() or 1)
        self.store_dtype = np.result_type(*(s.acts.dtype for s in self.stores))  # blocks are held in this
        self.dtype = dtype if dtype is not None else torch.from_numpy(np.empty(0, self.store_dtype)).dtype
        self._chunk_files = [ChunkFiles.of(s) for s in self.stores]  # None: read through Zarr
        unchecked = [str(p) for p, s in zip(self.paths, self.stores) if not s.checksummed]
        if unchecked:
            warnings.warn(
                f"{len(unchecked)} activation store(s) have no chunk checksums (written before store format 2), "
                f"e.g. {unchecked[0]}: a truncated chunk file there is caught, a corrupted one is not; "
                f"every chunk read is scanned for NaN/inf. Re-harvest them to add checksums.",
                stacklevel=2,
            )
        self.chunks = [
            _Chunk(i, j, start, min(start + s.chunk_tokens, s.n_tokens))
            for i, s in enumerate(self.stores)
            for j, start in enumerate(range(0, s.n_tokens, s.chunk_tokens))
        ]
        if len(self.chunks) < streams:
            raise ValueError(f"{len(self.chunks)} chunks in the stores cannot feed {streams} loader streams; use fewer streams")
        self.max_chunk = max(s.chunk_tokens for s in self.stores)
        self.chunks_per_block = max(1, round(buffer_tokens / streams / max(c.stop - c.start for c in self.chunks)))

    @property
    def local_batch_size(self) -> int:
        return self.sub_batch * len(self.my_streams)

    # --- which tokens, from metadata alone --------------------------------------------------------

    def _stream_chunks(self, stream: int, epoch: int) -> list[_Chunk]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.chunks))
        return [self.chunks[position] for position in order[stream :: self.streams]]

    def _stream_blocks(self, stream: int) -> Iterator[tuple[int, list[_Chunk]]]:
        """(block number, its chunks) forever; no block straddles two epochs."""
        block = 0
        for epoch in itertools.count():
            chunks = self._stream_chunks(stream, epoch)
            for start in range(0, len(chunks), self.chunks_per_block):
                yield block, chunks[start : start + self.chunks_per_block]
                block += 1

    # --- reading ----------------------------------------------------------------------------------

    def _read_chunk(self, chunk: _Chunk, out: np.ndarray) -> None:
        """Decode `chunk` into out[: its rows]; out must hold a whole chunk (an edge chunk is stored whole)."""
        store = self.stores[chunk.store]
        rows = chunk.stop - chunk.start
        files = self._chunk_files[chunk.store]
        if files is not None and store.acts.dtype == out.dtype:
            files.decode(chunk.index, out[: store.chunk_tokens])  # checked, then decoded (GIL released)
        else:  # another codec, dtype or storage: Zarr's own path
            out[:rows] = store.read_rows(chunk.start, chunk.stop)
        if not self.check_finite:
            return
        # The writer lists the chunks that hold NaN/inf, and the checksums make a chunk read the bytes
        # it checked: a scan is needed only for stores without that list (format 1).
        known = store.nonfinite_chunks
        if (chunk.index in known) if known is not None else not all_finite(out[:rows]):
            bad = int((~np.isfinite(out[:rows])).any(axis=1).sum())
            raise ValueError(
                f"activation store {store.path}: chunk {chunk.index} (tokens {chunk.start}:{chunk.stop}) "
                f"holds NaN or inf in {bad} rows; re-harvest this shard"
            )

    def _read_block(self, stream: int, block: int, chunks: list[_Chunk], buffer: np.ndarray, base: int) -> torch.Tensor:
        """Decode the block's chunks into `buffer` (rows base, base + 1, ... of the loader's pool);
        return the pool rows to take, in the block's shuffled order [n]."""
        n = 0
        for chunk in chunks:
            self._read_chunk(chunk, buffer[n:])
            n += chunk.stop - chunk.start
        order = np.random.default_rng([self.seed, stream, block]).permutation(n)
        order += base
        return torch.from_numpy(order)

    def batches(self, start: int = 0) -> Iterator[torch.Tensor]:
        """This process's share of global batches start, start+1, ...: [local_batch_size, d] of `dtype`.

        Every buffer of every stream is a slice of one pool, so a batch is one gather through the
        streams' shuffled pool rows (and one dtype conversion): a few torch calls per batch, not a few
        per stream. A block's buffer takes the block after next only once the rows taken from it are
        gathered."""
        rows_per_buffer = (self.chunks_per_block + 1) * self.max_chunk
        pool_rows = np.empty((2 * len(self.my_streams) * rows_per_buffer, self.d), self.store_dtype)
        pool = torch.from_numpy(pool_rows)
        convert = pool.dtype != self.dtype
        scratch = torch.empty((self.local_batch_size, self.d), dtype=pool.dtype) if convert else None

        def gather(pieces: list[torch.Tensor], batch: torch.Tensor, first: int) -> int:
            """batch[first : first + the pieces' rows] = pool[the pieces]; the next row to fill."""
            if not pieces:
                return first
            where = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
            stop = first + len(where)
            if convert:  # gather, then convert once: a contiguous dtype copy is far cheaper than a converting gather
                batch[first:stop].copy_(torch.index_select(pool, 0, where, out=scratch[: len(where)]))
            else:
                torch.index_select(pool, 0, where, out=batch[first:stop])
            return stop

        shape = (self.local_batch_size, self.d)
        recycled = None if self.pin_memory else _BatchBuffers.for_dtype(shape, self.dtype)

        with ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="loader") as executor:
            streams = [
                _Stream(self, stream, start * self.sub_batch, executor, pool_rows, 2 * slot * rows_per_buffer, rows_per_buffer)
                for slot, stream in enumerate(self.my_streams)
            ]  # every stream's first read is queued before any stream waits for its own
            for stream in streams:
                stream.begin()
            while True:
                batch = None  # this frame lets go of the last batch before the next one is sought
                # Pinned batches come from CUDA's caching host allocator; the others from buffers the
                # consumer has let go of (a fresh allocation of a batch faults in every page: ~3 ms).
                batch = recycled.take() if recycled else torch.empty(shape, dtype=self.dtype, pin_memory=self.pin_memory)
                pieces, gathered = [], 0
                for stream in streams:
                    need = self.sub_batch
                    while need:
                        piece = stream.take(need)
                        pieces.append(piece)
                        need -= len(piece)
                        if stream.spent:  # gather what its buffer holds before the buffer takes another block
                            gathered = gather(pieces, batch, gathered)
                            pieces = []
                            stream.advance()
                gather(pieces, batch, gathered)
                yield batch


class _BatchBuffers:
    """Batch memory reused once the consumer holds no tensor (nor view) of it any more.

    A batch of a few MB is above glibc's mmap threshold, or soon falls above it again: each fresh
    one is mapped anew and faults in every page (a 4096 x 512 float32 batch: ~2,000 faults, ~3 ms,
    more than gathering it). Batches are torch views of numpy arrays kept here; a tensor or view of
    one keeps a reference to its array, so an array whose only reference is this list is free. At
    most the `keep` latest are kept (a batch the consumer holds on to is simply forgotten here)."""

    def __init__(self, shape: tuple[int, int], dtype: np.dtype, keep: int = 3):
        self.shape, self.dtype, self.keep = shape, dtype, keep
        self.arrays: list[np.ndarray] = []

    @classmethod
    def for_dtype(cls, shape: tuple[int, int], dtype: torch.dtype) -> _BatchBuffers | None:
        try:
            return cls(shape, torch.empty(0, dtype=dtype).numpy().dtype)
        except TypeError:  # no numpy dtype (bfloat16): fresh torch batches
            return None

    def take(self) -> torch.Tensor:
        for i in range(len(self.arrays)):
            if sys.getrefcount(self.arrays[i]) == 2:  # this list's reference and the argument's
                return torch.from_numpy(self.arrays[i])
        array = np.empty(self.shape, self.dtype)
        self.arrays.append(array)
        if len(self.arrays) > self.keep:
            del self.arrays[0]  # held by the consumer: it lives on there, and is freed there
        return torch.from_numpy(array)


class _Stream:
    """One stream's reading state: the block being consumed (its shuffled pool rows, how many are
    taken) in buffer `current`, and the next one, being decoded into the other buffer."""

    __slots__ = ("loader", "stream", "executor", "buffers", "bases", "blocks", "current", "rows", "size", "position", "spent", "pending")

    def __init__(self, loader: ActivationLoader, stream: int, start_token: int, executor: ThreadPoolExecutor,
                 pool_rows: np.ndarray, base: int, rows_per_buffer: int):  # fmt: skip
        self.loader, self.stream, self.executor = loader, stream, executor
        self.bases = (base, base + rows_per_buffer)
        self.buffers = tuple(pool_rows[b : b + rows_per_buffer] for b in self.bases)
        self.blocks = loader._stream_blocks(stream)
        skipped = 0
        for block, chunks in self.blocks:  # skip whole blocks before start_token without reading them
            size = sum(c.stop - c.start for c in chunks)
            if skipped + size > start_token:
                break
            skipped += size
        self.position, self.spent, self.current = start_token - skipped, False, 0
        self.pending: Future = self._submit(0, block, chunks)

    def _submit(self, buffer: int, block: int, chunks: list[_Chunk]) -> Future:
        return self.executor.submit(self.loader._read_block, self.stream, block, chunks, self.buffers[buffer], self.bases[buffer])

    def begin(self) -> None:
        """Wait for the first block; prefetch the next into the other buffer."""
        self.rows = self.pending.result()
        self.size = len(self.rows)
        self.pending = self._submit(1, *next(self.blocks))

    def take(self, n: int) -> torch.Tensor:
        """The pool rows of this stream's next tokens, at most n (fewer where the block ends)."""
        start = self.position
        self.position = stop = min(start + n, self.size)
        self.spent = stop == self.size
        return self.rows[start:stop]

    def advance(self) -> None:
        """The block is spent (and its rows gathered): consume the prefetched one, refill the spent buffer."""
        self.rows = self.pending.result()
        self.size, self.position, self.spent = len(self.rows), 0, False
        self.pending = self._submit(self.current, *next(self.blocks))
        self.current = 1 - self.current
