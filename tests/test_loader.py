"""The streaming loader: coverage, determinism, resume, process split, bad data, bounded reads."""

import numpy as np
import pytest
import torch

from monoscope.loader import ActivationLoader
from monoscope.store import write_activation_store

D = 8
CONTEXT = 16


def make_store(path, n_seq, first_id, chunk_tokens=64, dtype="float32"):
    """Row i holds its global id in column 0, so every batch row can be traced to its token."""
    n = n_seq * CONTEXT
    acts = np.random.default_rng(first_id).normal(size=(n, D)).astype(np.float32)
    acts[:, 0] = np.arange(first_id, first_id + n)
    tokens = np.zeros((n_seq, CONTEXT), np.int32)
    write_activation_store(path, acts, tokens, {"model_id": "test"}, chunk_tokens=chunk_tokens, dtype=dtype)
    return path


@pytest.fixture
def stores(tmp_path):
    # 3 stores of 20, 12 and 9 chunks (the last one partial): 2592 tokens in all.
    return [
        make_store(tmp_path / "a.zarr", 80, 0),
        make_store(tmp_path / "b.zarr", 48, 10_000),
        make_store(tmp_path / "c.zarr", 34, 20_000),
    ]


def ids(batch: torch.Tensor) -> list[int]:
    return batch[:, 0].long().tolist()


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_one_stream_sees_every_token_once_per_epoch(stores):
    loader = ActivationLoader(stores, batch_size=16, buffer_tokens=256, streams=1, seed=3)
    assert loader.n_tokens == 2592 and loader.d == D
    epoch = take(loader.batches(), 2592 // 16)
    seen = sorted(i for b in epoch for i in ids(b))
    expected = sorted([*range(1280), *range(10_000, 10_768), *range(20_000, 20_544)])
    assert seen == expected


def test_batches_are_shuffled_across_stores(stores):
    loader = ActivationLoader(stores, batch_size=64, buffer_tokens=1024, streams=2, seed=0)
    batch = ids(next(loader.batches()))
    assert len({i // 10_000 for i in batch}) > 1, "a batch should mix tokens from several stores"
    assert batch != sorted(batch)


def test_same_seed_same_batches_other_seed_others(stores):
    first = [ids(b) for b in take(ActivationLoader(stores, 32, 256, 4, seed=1).batches(), 5)]
    again = [ids(b) for b in take(ActivationLoader(stores, 32, 256, 4, seed=1).batches(), 5)]
    other = [ids(b) for b in take(ActivationLoader(stores, 32, 256, 4, seed=2).batches(), 5)]
    assert first == again and first != other


def test_resume_from_a_batch_number_gives_the_same_batches(stores):
    loader = ActivationLoader(stores, batch_size=32, buffer_tokens=256, streams=4, seed=0)
    # 200 batches of 32 tokens: past the end of the first epoch (2592 tokens) of every stream.
    full = take(loader.batches(0), 200)
    for start in (1, 37, 150):
        resumed = take(loader.batches(start), 200 - start)
        assert all(torch.equal(a, b) for a, b in zip(full[start:], resumed))


def test_processes_read_disjoint_chunks_and_together_make_the_global_batch(stores):
    single = ActivationLoader(stores, batch_size=32, buffer_tokens=256, streams=4, seed=0)
    ranks = [ActivationLoader(stores, 32, 256, 4, seed=0, rank=r, world_size=2) for r in range(2)]
    assert [r.local_batch_size for r in ranks] == [16, 16]
    for global_batch, *parts in zip(take(single.batches(), 30), *(take(r.batches(), 30) for r in ranks)):
        assert torch.equal(global_batch, torch.cat(parts))
    first_epoch = [{(c.store, c.index) for s in r.my_streams for c in r._stream_chunks(s, epoch=0)} for r in ranks]
    assert first_epoch[0].isdisjoint(first_epoch[1])
    assert len(first_epoch[0] | first_epoch[1]) == len(single.chunks)


def test_non_finite_chunk_is_named(tmp_path):
    path = make_store(tmp_path / "good.zarr", 8, 0)
    n = 16 * CONTEXT
    acts = np.ones((n, D), np.float32)
    acts[200, 3] = np.nan  # token 200 is in chunk 3 (64 tokens per chunk)
    write_activation_store(tmp_path / "bad.zarr", acts, np.zeros((16, CONTEXT), np.int32), {}, chunk_tokens=64)
    loader = ActivationLoader([path, tmp_path / "bad.zarr"], batch_size=64, buffer_tokens=4096, streams=1)
    with pytest.raises(ValueError, match=r"bad\.zarr: chunk 3 \(tokens 192:256\)"):
        take(loader.batches(), 10)


def test_reads_stay_within_two_buffers_of_what_was_consumed(stores, monkeypatch):
    loader = ActivationLoader(stores, batch_size=16, buffer_tokens=128, streams=2, seed=0)
    read = []
    original = loader._read_chunk
    monkeypatch.setattr(loader, "_read_chunk", lambda c: read.append(c.stop - c.start) or original(c))
    batches = loader.batches()
    for consumed in range(1, 120):
        next(batches)
        # per stream: the block being consumed plus the prefetched one, each one chunk here
        assert sum(read) <= consumed * 16 + 2 * 2 * 64


def test_bad_configuration_is_explained(stores):
    with pytest.raises(ValueError, match="multiple of loader streams"):
        ActivationLoader(stores, batch_size=30, streams=4)
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        ActivationLoader(stores, batch_size=30, streams=3, world_size=2)
    with pytest.raises(ValueError, match="at least one"):
        ActivationLoader([], batch_size=8)
