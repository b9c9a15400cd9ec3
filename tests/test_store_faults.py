"""Faults in stores and harvests: a store with chunks missing (a partial copy) is refused when
opened, and activations that would be stored as NaN or inf are caught at harvest, before the
mantissa rounding that hides them, naming the shard, sequence and position."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from monoscope import harvest, store
from monoscope.config import default_settings


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
