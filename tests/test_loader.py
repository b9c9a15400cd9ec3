"""The streaming loader: coverage, determinism, resume, process split, bad data, bounded reads."""

import hashlib

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
    monkeypatch.setattr(loader, "_read_chunk", lambda c, out: read.append(c.stop - c.start) or original(c, out))
    batches = loader.batches()
    for consumed in range(1, 120):
        next(batches)
        # per stream: the block being consumed plus the prefetched one, each one chunk here
        assert sum(read) <= consumed * 16 + 2 * 2 * 64


def test_bad_configuration_is_explained(stores):
    with pytest.raises(ValueError, match="multiple of loader streams"):
        ActivationLoader(stores, batch_size=30, buffer_tokens=256, streams=4)
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        ActivationLoader(stores, batch_size=30, buffer_tokens=256, streams=3, world_size=2)
    with pytest.raises(ValueError, match="at least one"):
        ActivationLoader([], batch_size=8, buffer_tokens=256, streams=1)


def pinned_stores(tmp_path, dtype):
    """Three stores of 24-wide rows, chunks of 64, 96 and 64 tokens (the last store's chunk partial)."""
    paths = []
    for name, n_seq, chunk_tokens, seed in (("a", 40, 64, 0), ("b", 23, 96, 1), ("c", 9, 64, 2)):
        acts = np.random.default_rng(seed).normal(size=(n_seq * 16, 24)).astype(np.float32)
        path = tmp_path / f"{name}-{dtype}.zarr"
        write_activation_store(path, acts, np.zeros((n_seq, 16), np.int32), {}, chunk_tokens=chunk_tokens, dtype=dtype)
        paths.append(path)
    return paths


# sha256 (first 16 hex digits) of the float32 bytes of n consecutive batches, computed with the loader
# as it was before it decoded into preallocated buffers and gathered through shuffled indices
# (commit 11a2dd2): the rewrite must give the trainer bit-identical batches.
PINNED_BATCHES = [  # (store dtype, batch, buffer_tokens, streams, rank, world_size, first batch, n, digest)
    ("float16", 32, 256, 4, 0, 1, 0, 120, "b8b749f43584f28b"),
    ("float16", 48, 1024, 2, 0, 1, 7, 90, "8f8d02b2c68b000a"),
    ("float16", 24, 200, 8, 1, 2, 3, 100, "9c8ee6bf996c494e"),
    ("float32", 40, 512, 1, 0, 1, 0, 80, "57e5e6eb97beccad"),
    ("float32", 64, 4096, 4, 3, 4, 11, 60, "cad7f1ac74c0c0da"),
]


@pytest.mark.parametrize("dtype, batch, buffer, streams, rank, world, first, n, digest", PINNED_BATCHES)
def test_batches_are_bit_identical_to_the_loader_before_the_rewrite(tmp_path, dtype, batch, buffer, streams, rank, world, first, n, digest):
    loader = ActivationLoader(pinned_stores(tmp_path, dtype), batch, buffer, streams, seed=5, rank=rank, world_size=world)
    sha = hashlib.sha256()
    for b in take(loader.batches(first), n):
        assert b.dtype == torch.float32 and b.shape == (loader.local_batch_size, 24)
        sha.update(b.numpy().tobytes())
    assert sha.hexdigest()[:16] == digest


def test_store_dtype_batches_hold_the_same_values(tmp_path):
    paths = pinned_stores(tmp_path, "float16")
    as_float32 = take(ActivationLoader(paths, 32, 256, 4, seed=1).batches(5), 40)
    as_stored = take(ActivationLoader(paths, 32, 256, 4, seed=1, dtype=None, threads=1).batches(5), 40)
    assert all(s.dtype == torch.float16 and torch.equal(s.float(), f) for s, f in zip(as_stored, as_float32))


def test_non_finite_check_reads_the_bits_of_nan_and_both_infinities():
    from monoscope.store import all_finite

    for dtype in (np.float16, np.float32):
        rows = np.full((4, 3), -np.finfo(dtype).max, dtype)  # the largest finite magnitude passes
        assert all_finite(rows)
        for bad in (np.nan, np.inf, -np.inf):
            spoiled = rows.copy()
            spoiled[2, 1] = bad
            assert not all_finite(spoiled)


def test_zarr_path_for_other_codecs_gives_the_same_batches(tmp_path):
    paths = pinned_stores(tmp_path, "float16")
    direct = ActivationLoader(paths, 32, 256, 4, seed=1)
    through_zarr = ActivationLoader(paths, 32, 256, 4, seed=1)
    assert all(f is not None for f in direct._chunk_files), "plain Blosc stores on disk are read directly"
    through_zarr._chunk_files = [None] * len(paths)  # what a store with another codec or storage gets
    assert all(torch.equal(a, b) for a, b in zip(take(direct.batches(), 30), take(through_zarr.batches(), 30)))


def test_batch_memory_is_reused_only_once_nothing_holds_it(stores):
    loader = ActivationLoader(stores, batch_size=32, buffer_tokens=256, streams=4, seed=0)
    expected = take(loader.batches(), 40)
    batches = loader.batches()
    kept = next(batches)[3:7]  # a view outlives its batch
    kept_copy = kept.clone()
    held = [next(batches) for _ in range(5)]  # batches the consumer still holds
    pointers = set()
    for i in range(6, 40):
        batch = next(batches)  # the one before is dropped here: its memory may come back
        assert torch.equal(batch, expected[i])
        pointers.add(batch.data_ptr())
    assert torch.equal(kept, kept_copy) and torch.equal(kept, expected[0][3:7])
    assert all(torch.equal(h, e) for h, e in zip(held, expected[1:6]))
    assert len(pointers) <= 3, "a consumer that drops each batch gets the same few buffers back"


def test_batch_buffers_come_back_only_when_no_tensor_or_view_holds_them():
    from monoscope.loader import _BatchBuffers

    buffers = _BatchBuffers((4, 3), np.float32, keep=2)
    a, b = buffers.take(), buffers.take()
    b_memory = b.data_ptr()
    del b
    again = buffers.take()
    assert again.data_ptr() == b_memory  # nothing held it: reused
    view, a_memory = a[1:], a.data_ptr()
    del a
    fresh = buffers.take()  # a's memory is still seen through the view
    assert fresh.data_ptr() not in (a_memory, b_memory) and len(buffers.arrays) == 2
    view.fill_(7.0)
    assert not torch.any(fresh == 7.0) and not torch.any(again == 7.0)
