"""Faults in stores and harvests: a store with chunks missing (a partial copy) is refused when
opened; a chunk file that is truncated or bit-flipped fails its read (its crc32c), naming the store
and chunk; activations that would be stored as NaN or inf are caught at harvest, before the
mantissa rounding that hides them, naming the shard, sequence and position."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import zarr

from monoscope import harvest, store
from monoscope.config import default_settings
from monoscope.loader import ActivationLoader


def _write(path, n_seq=12, context=8, d=4, zero_tokens=False, chunk_seqs=2):
    rng = np.random.default_rng(0)
    tokens = np.zeros((n_seq, context), np.int32) if zero_tokens else rng.integers(0, 99, (n_seq, context)).astype(np.int32)
    acts = np.zeros((n_seq * context, d), np.float32)  # all-zero chunks are legitimate and must be on disk too
    acts[: context * 4] = rng.normal(size=(context * 4, d))
    store.write_activation_store(path, acts, tokens, {"hook": "h"}, chunk_tokens=context * chunk_seqs, dtype="float16")
    return path


@pytest.mark.parametrize("zero_tokens", [False, True])
def test_a_whole_store_opens_even_with_all_zero_chunks(tmp_path, zero_tokens):
    opened = store.open_activations(_write(tmp_path / "s.zarr", zero_tokens=zero_tokens))
    assert opened.n_tokens == 96


@pytest.mark.parametrize("lost", ["acts/c/0/0", "acts/c/5/0", "tokens/c/0/0", "acts/c"])
def test_a_store_with_chunks_missing_is_refused_naming_it(tmp_path, lost):
    path = _write(tmp_path / "s.zarr", n_seq=2048, chunk_seqs=256)  # two token chunks of 1024 sequences, 8 of acts
    target = path / lost
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(store.IncompleteStore, match=rf"{path}.*'{lost.split('/')[0]}' has \d+ of its \d+ chunks"):
        store.open_activations(path)


def test_a_token_shard_with_a_chunk_missing_is_refused(tmp_path):
    path = tmp_path / "t.zarr"
    store.write_token_shard(path, np.zeros((2048, 4), np.int32), {})
    store.read_token_shard(path)
    (path / "tokens" / "c" / "1" / "0").unlink()
    with pytest.raises(store.IncompleteStore, match="'tokens' has 1 of its 2 chunks"):
        store.read_token_shard(path)


F16_NANS = [0x7E00, 0x7C01, 0x7C02, 0x7FFF, 0x7D00, 0xFC01, 0xFFFF, 0xFE00]  # canonical and not, both signs


@pytest.mark.parametrize("bits", F16_NANS)
def test_rounding_would_hide_a_non_canonical_nan_so_it_is_caught_before(bits):
    rows = torch.ones(6, 3, dtype=torch.float16)
    rows.view(torch.int16)[4, 2] = np.int16(np.uint16(bits).view(np.int16))
    assert np.isnan(rows.numpy()[4, 2])
    acts = rows.float().reshape(2, 3, 3)
    with pytest.raises(harvest.NonFiniteActivations, match=r"shard_7.zarr: 1 activation.*sequence 11, position 1, unit 2.*nan"):
        harvest.check_storable(rows, acts, 8, "results/activations/shard_7.zarr", first_seq=10)


def test_why_the_check_comes_before_rounding():
    nans = np.array(F16_NANS, np.uint16).view(np.float16)
    rounded = store.round_mantissa(nans.copy(), 8)
    assert np.isnan(nans).all() and not np.isnan(rounded).all()  # some became inf or -0: invisible to isnan
    assert np.isinf(rounded).any() and (rounded == 0).any()


@pytest.mark.parametrize("value, dtype, bits, fails", [
    (7.0e4, torch.float16, None, True),  # overflows float16 at the cast
    (6.5500e4, torch.float16, None, False),  # rounds to 65504, the largest float16
    (6.5500e4, torch.float16, 8, True),  # finite in float16, inf once rounded to 8 mantissa bits
    (6.5440e4, torch.float16, 8, False),
    (-6.5500e4, torch.float16, 8, True),
    (float("inf"), torch.float32, None, True),
    (-float("inf"), torch.float32, 8, True),
    (float("nan"), torch.float32, None, True),
    (3.4e38, torch.float32, 8, True),
    (1e30, torch.float32, 8, False),
])
def test_values_that_would_be_stored_as_inf_are_caught_with_the_fix(value, dtype, bits, fails):
    acts = torch.zeros(3, 4, 2)
    acts[2, 3, 1] = value
    rows = acts.flatten(0, 1).to(dtype)
    if not fails:
        harvest.check_storable(rows, acts, bits, "s.zarr", 0)
        stored = store.round_mantissa(rows.numpy().copy(), bits) if bits else rows.numpy()
        assert np.isfinite(stored).all()
        return
    with pytest.raises(harvest.NonFiniteActivations, match="sequence 2, position 3, unit 1") as error:
        harvest.check_storable(rows, acts, bits, "s.zarr", 0)
    if np.isfinite(value):
        assert "harvest.dtype: float32" in str(error.value)


def test_a_harvest_that_overflows_names_the_shard_and_leaves_no_store(tmp_path, monkeypatch):
    tokens = np.arange(40, dtype=np.int32).reshape(5, 8)
    store.write_token_shard(tmp_path / "train_003.zarr", tokens, {"tokenizer_id": "t"})

    def run_to_hook(bridge, batch, hook):
        acts = batch[..., None].float().repeat(1, 1, 4)  # [b, s, 4]
        acts[batch == 29] = 1e5  # sequence 3, position 5
        return acts

    monkeypatch.setattr(harvest, "run_to_hook", run_to_hook)
    settings = default_settings(harvest.HarvestSettings, batch_size=2)
    out = tmp_path / "act" / "train_003.zarr"
    with pytest.raises(harvest.NonFiniteActivations, match=r"train_003.zarr: 4 activation.*sequence 3, position 5"):
        harvest.harvest_shard(settings, None, "m", "blocks.0.mlp.hook_post", tmp_path / "train_003.zarr", out, log=lambda _: None)
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_opening_a_store_leaves_its_tokens_on_disk(tmp_path):
    """Thousands of stores are opened at once (the loader, evaluation): their tokens stay on disk."""
    path = _write(tmp_path / "s.zarr", n_seq=2048, chunk_seqs=256)
    opened = store.open_activations(path)
    assert opened.n_seq == 2048 and opened.context == 8
    assert not isinstance(opened.tokens, np.ndarray)
    blocks = list(store.iter_sequence_blocks(opened, 1000))
    assert [len(t) for t, _ in blocks] == [1000, 1000, 48] and isinstance(blocks[0][0], np.ndarray)


# --- damaged chunk files: every read verifies each chunk's crc32c ---------------------------------


def _random_store(path, n_seq=40, context=16, d=8, chunk_tokens=128, dtype="float16"):
    """640 tokens: 5 chunks, the last (4) partial, written by Zarr itself; 0-3 by the writer."""
    rng = np.random.default_rng(3)
    acts = rng.normal(size=(n_seq * context, d)).astype(np.float32)
    store.write_activation_store(path, acts, np.zeros((n_seq, context), np.int32), {}, chunk_tokens=chunk_tokens,
                                 dtype=dtype, codec=store.CodecSpec(keep_mantissa_bits=8))  # fmt: skip
    return path


def _all_batches(path, through_zarr=False, **kwargs):
    """One epoch of batches (every chunk read once)."""
    loader = ActivationLoader([path], batch_size=64, buffer_tokens=256, streams=1, seed=0, **kwargs)
    if through_zarr:
        loader._chunk_files = [None]  # what a store with another codec or storage gets
    batches = loader.batches()
    return [next(batches) for _ in range(loader.n_tokens // 64)]


def _flip(file, offset):
    data = bytearray(file.read_bytes())
    data[offset] ^= 0x10
    file.write_bytes(bytes(data))


def _truncate(file, keep):
    data = file.read_bytes()
    file.write_bytes(data[: keep if keep >= 0 else len(data) + keep])


def test_an_intact_store_reads_bit_identically_through_the_loader_and_zarr(tmp_path):
    path = _random_store(tmp_path / "s.zarr")
    opened = store.open_activations(path)
    assert opened.checksummed and opened.nonfinite_chunks == frozenset() and opened.attrs["format_version"] == 2
    assert isinstance(zarr.open_group(path, mode="r")["acts"].metadata.codecs[-1], zarr.codecs.Crc32cCodec)
    through_zarr = opened.acts[:]
    files = store.ChunkFiles.of(opened)
    decoded = np.empty((5 * 128, 8), np.float16)
    for index in range(5):
        files.decode(index, decoded[index * 128 : (index + 1) * 128])
    assert np.array_equal(decoded.view(np.uint16), through_zarr.view(np.uint16))
    seen = torch.cat(_all_batches(path, dtype=None))
    assert sorted(map(bytes, seen.numpy().view(np.uint8).reshape(len(seen), -1))) == sorted(
        map(bytes, through_zarr.view(np.uint8).reshape(len(through_zarr), -1)))  # fmt: skip


@pytest.mark.parametrize("damage", ["flip a byte", "flip the checksum", "truncate", "cut the checksum", "empty"])
@pytest.mark.parametrize("chunk", [2, 4])  # 4: the partial last chunk, written by Zarr
def test_a_damaged_chunk_file_fails_the_read_naming_the_store_and_chunk(tmp_path, damage, chunk):
    path = _random_store(tmp_path / "s.zarr")
    file = path / "acts" / "c" / str(chunk) / "0"
    size = file.stat().st_size
    {"flip a byte": lambda: _flip(file, size // 2), "flip the checksum": lambda: _flip(file, size - 2),
     "truncate": lambda: _truncate(file, size // 2), "cut the checksum": lambda: _truncate(file, -4),
     "empty": lambda: _truncate(file, 0)}[damage]()  # fmt: skip
    store.open_activations(path)  # the chunk count is whole: the damage shows when the chunk is read
    named = rf"activation store {path}: chunk {chunk} \(tokens {chunk * 128}:{min(chunk * 128 + 128, 640)}, file .*\) is damaged"
    with pytest.raises(store.CorruptChunk, match=named):
        _all_batches(path)  # the loader's own decoding
    with pytest.raises(store.CorruptChunk, match=named):
        list(store.iter_sequence_blocks(store.open_activations(path), 8))  # Zarr's, for evaluation and features
    with pytest.raises(store.CorruptChunk, match=named):
        _all_batches(path, through_zarr=True)  # the loader on Zarr's path


def test_the_writer_lists_nonfinite_chunks_so_the_loader_need_not_scan(tmp_path, monkeypatch):
    n = 16 * 16
    acts = np.ones((n, 8), np.float32)
    acts[200, 3] = np.inf  # chunk 3 of 64-token chunks
    path = tmp_path / "bad.zarr"
    store.write_activation_store(path, acts, np.zeros((16, 16), np.int32), {}, chunk_tokens=64)
    assert store.open_activations(path).nonfinite_chunks == frozenset({3})
    import monoscope.loader as loader_module

    monkeypatch.setattr(loader_module, "all_finite", lambda rows: pytest.fail("a checksummed store is not scanned"))
    with pytest.raises(ValueError, match=r"bad\.zarr: chunk 3 \(tokens 192:256\) holds NaN or inf in 1 rows"):
        ActivationLoader([path], batch_size=64, buffer_tokens=4096, streams=1).batches().__next__()


def _format_1_store(path, acts, chunk_tokens):
    """A store as written before checksums (format 1): plain Blosc chunks, no list of nonfinite chunks."""
    group = zarr.open_group(path, mode="w")
    n_seq = len(acts) // 16
    group.create_array("tokens", data=np.zeros((n_seq, 16), np.int32), chunks=(n_seq, 16), config={"write_empty_chunks": True})
    array = group.create_array("acts", shape=acts.shape, chunks=(chunk_tokens, acts.shape[1]), dtype="float16",
                               compressors=[store.CodecSpec().codec(2)], config={"write_empty_chunks": True})  # fmt: skip
    array[:] = acts.astype(np.float16)
    group.attrs.update({"format_version": 1, "dtype": "float16"})
    return path


def test_stores_without_checksums_are_read_with_a_warning_scanned_and_checked_for_truncation(tmp_path):
    acts = np.random.default_rng(0).normal(size=(512, 8)).astype(np.float32)
    old = _format_1_store(tmp_path / "old.zarr", acts, 128)
    new = _random_store(tmp_path / "new.zarr", n_seq=32, chunk_tokens=128)
    opened = store.open_activations(old)
    assert not opened.checksummed and opened.nonfinite_chunks is None
    with pytest.warns(UserWarning, match=r"1 activation store\(s\) have no chunk checksums .*old\.zarr"):
        loader = ActivationLoader([old, new], batch_size=64, buffer_tokens=256, streams=1)
    assert loader._chunk_files[0] is not None and not loader._chunk_files[0].checksummed
    batches = loader.batches()
    got = torch.cat([next(batches) for _ in range(1024 // 64)])
    assert sorted(got[:, 0].tolist()) == sorted([*acts[:, 0].astype(np.float16).astype(np.float32).tolist(),
                                                 *store.open_activations(new).acts[:, 0].astype(np.float32).tolist()])  # fmt: skip
    _truncate(old / "acts" / "c" / "1" / "0", -3)
    with pytest.warns(UserWarning), pytest.raises(store.CorruptChunk, match=r"old\.zarr: chunk 1 .*truncated"):
        _all_batches(old)
    spoiled = acts.copy()
    spoiled[300, 2] = np.nan
    nan_store = _format_1_store(tmp_path / "nan.zarr", spoiled, 128)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"nan\.zarr: chunk 2 \(tokens 256:384\) holds NaN"):
        _all_batches(nan_store)
