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

Memory: the block being consumed plus the one prefetched, per stream: about 2 · buffer_tokens · d
floats in all (a block holds at least one chunk).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from monoscope.store import open_activations


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
        buffer_tokens: int = 262_144,
        streams: int = 8,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        check_finite: bool = True,
    ):
        if not store_paths:
            raise ValueError("the loader needs at least one activation store")
        if streams < 1 or batch_size % streams:
            raise ValueError(f"batch_size={batch_size} must be a multiple of loader streams={streams}")
        if streams % world_size:
            raise ValueError(f"loader streams={streams} must be a multiple of the number of processes={world_size}")
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
        self.chunks = [
            _Chunk(i, j, start, min(start + s.chunk_tokens, s.n_tokens))
            for i, s in enumerate(self.stores)
            for j, start in enumerate(range(0, s.n_tokens, s.chunk_tokens))
        ]
        if len(self.chunks) < streams:
            raise ValueError(f"{len(self.chunks)} chunks in the stores cannot feed {streams} loader streams; use fewer streams")
        max_chunk = max(c.stop - c.start for c in self.chunks)
        self.chunks_per_block = max(1, round(buffer_tokens / streams / max_chunk))

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

    def _read_chunk(self, chunk: _Chunk) -> np.ndarray:
        store = self.stores[chunk.store]
        acts = np.asarray(store.acts[chunk.start : chunk.stop], dtype=np.float32)  # [n, d]
        if self.check_finite and not np.isfinite(acts).all():
            bad = int((~np.isfinite(acts)).any(axis=1).sum())
            raise ValueError(
                f"activation store {store.path}: chunk {chunk.index} (tokens {chunk.start}:{chunk.stop}) "
                f"holds NaN or inf in {bad} rows; re-harvest this shard"
            )
        return acts

    def _read_block(self, stream: int, block: int, chunks: list[_Chunk]) -> np.ndarray:
        acts = np.concatenate([self._read_chunk(c) for c in chunks])  # [n, d]
        order = np.random.default_rng([self.seed, stream, block]).permutation(len(acts))
        return acts[order]

    def _stream_tokens(self, stream: int, start_token: int, pool: ThreadPoolExecutor) -> Iterator[np.ndarray]:
        """Endless [sub_batch, d] slices of stream `stream`, starting at its token `start_token`."""
        blocks = self._stream_blocks(stream)
        skipped = 0
        for block, chunks in blocks:  # skip whole blocks before start_token without reading them
            size = sum(c.stop - c.start for c in chunks)
            if skipped + size > start_token:
                break
            skipped += size
        offset = start_token - skipped
        pending: Future = pool.submit(self._read_block, stream, block, chunks)
        carry = np.empty((0, self.d), dtype=np.float32)
        while True:
            current = pending.result()[offset:]
            offset = 0
            block, chunks = next(blocks)
            pending = pool.submit(self._read_block, stream, block, chunks)  # prefetch while consuming
            if len(carry):
                current = np.concatenate([carry, current])
            whole = len(current) - len(current) % self.sub_batch
            for i in range(0, whole, self.sub_batch):
                yield current[i : i + self.sub_batch]
            carry = current[whole:]

    def batches(self, start: int = 0) -> Iterator[torch.Tensor]:
        """This process's share of global batches start, start+1, ...: float32 [local_batch_size, d]."""
        with ThreadPoolExecutor(max_workers=len(self.my_streams), thread_name_prefix="loader") as pool:
            iterators = [self._stream_tokens(s, start * self.sub_batch, pool) for s in self.my_streams]
            for parts in zip(*iterators):
                yield torch.from_numpy(np.concatenate(parts))
