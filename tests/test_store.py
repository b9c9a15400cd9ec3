import numpy as np
import pytest
import zarr

from monoscope import store


def _acts(n_seq, context, d, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 1000, (n_seq, context)).astype(np.int32)
    acts = rng.normal(size=(n_seq * context, d)).astype(np.float32)
    return tokens, acts


def test_activation_store_round_trip(tmp_path):
    tokens, acts = _acts(10, 16, 32)
    path = tmp_path / "s.zarr"
    store.write_activation_store(path, acts, tokens, {"hook": "blocks.0.mlp.hook_post"}, chunk_tokens=48, dtype="float32")
    s = store.open_activations(path)
    assert (s.n_tokens, s.d, s.context, s.n_seq, s.chunk_tokens) == (160, 32, 16, 10, 48)
    np.testing.assert_array_equal(s.acts[:], acts)
    np.testing.assert_array_equal(s.tokens, tokens)
    assert s.attrs["hook"] == "blocks.0.mlp.hook_post"
    assert s.attrs["codec"] == {"id": "blosc", "cname": "lz4", "clevel": 5, "shuffle": "bitshuffle", "keep_mantissa_bits": None}
    assert s.attrs["format_version"] == store.FORMAT_VERSION
    # every activation maps back to its token
    blocks = list(store.iter_sequence_blocks(s, 3))
    assert [b[0].shape[0] for b in blocks] == [3, 3, 3, 1]
    np.testing.assert_array_equal(blocks[1][1][2, 5], acts[(3 + 2) * 16 + 5])
    np.testing.assert_array_equal(blocks[1][0][2, 5], tokens[5, 5])


def test_store_is_compressed_with_blosc(tmp_path):
    tokens, _ = _acts(64, 32, 64)
    acts = np.maximum(np.random.default_rng(1).normal(size=(64 * 32, 64)), 0).astype(np.float32)  # sparse-ish
    path = tmp_path / "s.zarr"
    store.write_activation_store(path, acts, tokens, {}, chunk_tokens=1024, dtype="float16")
    arr = zarr.open_group(path, mode="r")["acts"]
    assert "blosc" in type(arr.compressors[0]).__name__.lower()
    stored = sum(f.stat().st_size for f in (path / "acts").rglob("*") if f.is_file())
    assert stored < 0.5 * acts.nbytes  # float16 alone gives 0.5; compression must add to it


def test_failed_write_leaves_no_store(tmp_path):
    tokens, acts = _acts(4, 8, 4)
    path = tmp_path / "s.zarr"
    with pytest.raises(RuntimeError, match="boom"):
        with store.ActivationStoreWriter(path, tokens, 4, "float32", 16, {}) as writer:
            writer.append(acts[:16])
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_short_write_is_rejected_and_leaves_no_store(tmp_path):
    tokens, acts = _acts(4, 8, 4)
    path = tmp_path / "s.zarr"
    with pytest.raises(ValueError, match="expected 32"):
        with store.ActivationStoreWriter(path, tokens, 4, "float32", 16, {}) as writer:
            writer.append(acts[:20])
    assert not path.exists()


def test_rewrite_replaces_old_store_whole(tmp_path):
    path = tmp_path / "s.zarr"
    tokens, acts = _acts(4, 8, 4)
    store.write_activation_store(path, acts, tokens, {"v": 1}, 16, "float32")
    store.write_activation_store(path, acts * 2, tokens, {"v": 2}, 16, "float32")
    s = store.open_activations(path)
    assert s.attrs["v"] == 2
    np.testing.assert_array_equal(s.acts[:], acts * 2)


def test_chunks_are_whole_sequences_of_at_least_target_size():
    chunk = store.chunk_tokens_for(d=512, dtype="float16", context=128, target_mib=1)
    assert chunk % 128 == 0 and chunk * 512 * 2 >= 2**20


def test_token_shard_round_trip_and_errors(tmp_path):
    tokens, _ = _acts(5, 7, 1)
    store.write_token_shard(tmp_path / "t.zarr", tokens, {"tokenizer_id": "abc"})
    read, attrs = store.read_token_shard(tmp_path / "t.zarr")
    np.testing.assert_array_equal(read, tokens)
    assert attrs["tokenizer_id"] == "abc"
    with pytest.raises(ValueError, match="is it a token shard"):
        store.open_activations(tmp_path / "t.zarr")
    with pytest.raises(FileNotFoundError, match="no Zarr store"):
        store.open_activations(tmp_path / "missing.zarr")


def test_mantissa_rounding_bounds_the_error_and_shrinks_the_store(tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 10, (64, 32)).astype(np.int32)
    pre = rng.normal(size=(64 * 32, 64)).astype(np.float32)
    acts = pre * 0.5 * (1 + np.tanh(0.7978845608 * (pre + 0.044715 * pre**3)))  # GELU, like the MLP's
    sizes = {}
    for bits in (None, 8):
        path = tmp_path / f"{bits}.zarr"
        codec = store.CodecSpec(keep_mantissa_bits=bits)
        store.write_activation_store(path, acts, tokens, {}, chunk_tokens=1024, dtype="float16", codec=codec)
        read = store.open_activations(path).acts[:].astype(np.float32)
        rel_rms = np.sqrt(((read - acts) ** 2).mean() / (acts**2).mean())
        assert rel_rms < (1e-3 if bits is None else 3e-3)
        sizes[bits] = sum(f.stat().st_size for f in (path / "acts").rglob("*") if f.is_file())
    assert sizes[8] < 0.9 * sizes[None]


@pytest.mark.parametrize("dtype,keep", [(np.float16, 8), (np.float16, 3), (np.float32, 8), (np.float32, 20)])
def test_round_mantissa_matches_numcodecs_bitround_and_leaves_the_callers_array_alone(tmp_path, dtype, keep):
    from numcodecs import BitRound

    rng = np.random.default_rng(1)
    values = (rng.normal(size=(4096, 8)) * 10.0 ** rng.integers(-3, 3, (4096, 1))).astype(dtype)
    expected = np.frombuffer(BitRound(keepbits=keep).encode(values.copy()), dtype=dtype).reshape(values.shape)
    assert np.array_equal(store.round_mantissa(values.copy(), keep).view(np.uint8), expected.view(np.uint8))
    original = values.copy()
    path = tmp_path / "r.zarr"
    store.write_activation_store(path, values, np.zeros((128, 32), np.int32), {}, chunk_tokens=1000,
                                 dtype=np.dtype(dtype).name, codec=store.CodecSpec(keep_mantissa_bits=keep))  # fmt: skip
    assert np.array_equal(values, original)
    assert np.array_equal(store.open_activations(path).acts[:].view(np.uint8), expected.view(np.uint8))


def test_consumed_rows_are_stored_alike_in_whole_and_partial_chunks(tmp_path):
    rng = np.random.default_rng(2)
    acts = rng.normal(size=(256 * 32, 8)).astype(np.float16)
    tokens = np.zeros((256, 32), np.int32)
    codec = store.CodecSpec(keep_mantissa_bits=6)
    copied, consumed = tmp_path / "copied.zarr", tmp_path / "consumed.zarr"
    store.write_activation_store(copied, acts, tokens, {}, chunk_tokens=1024, codec=codec)
    with store.ActivationStoreWriter(consumed, tokens, 8, "float16", 1024, {}, codec) as writer:
        for block in np.split(acts.copy(), [1024, 1500, 4096, 5000]):  # whole chunks, leftovers, several pieces
            writer.append(block.copy(), consume=True)
    assert np.array_equal(store.open_activations(consumed).acts[:], store.open_activations(copied).acts[:])
    assert not np.array_equal(store.open_activations(copied).acts[:], acts)  # rounding really happened


@pytest.mark.parametrize("codec", [store.CodecSpec(), store.CodecSpec("lz4", 5, "shuffle"), store.CodecSpec("blosclz", 1, "noshuffle")])
def test_writer_chunk_files_are_the_bytes_zarr_writes(tmp_path, codec):
    """The writer encodes whole chunks itself, in parallel; Zarr must find exactly its own chunk files."""
    tokens, acts = _acts(22, 16, 12)  # 352 tokens: 5 whole chunks of 64 and a partial one
    ours = tmp_path / "ours.zarr"
    with store.ActivationStoreWriter(ours, tokens, 12, "float16", 64, {}, codec, workers=3) as writer:
        for start in range(0, len(acts), 40):  # appends that straddle chunk boundaries
            writer.append(acts[start : start + 40])
    zarrs = zarr.create_array(tmp_path / "zarr.zarr", shape=acts.shape, chunks=(64, 12), dtype="float16",
                              compressors=codec.compressors(2), config={"write_empty_chunks": True})  # fmt: skip
    zarrs[:] = acts.astype(np.float16)
    ours_files = {f.relative_to(ours / "acts"): f.read_bytes() for f in (ours / "acts" / "c").rglob("*") if f.is_file()}
    zarr_files = {f.relative_to(tmp_path / "zarr.zarr"): f.read_bytes() for f in (tmp_path / "zarr.zarr" / "c").rglob("*") if f.is_file()}
    assert len(ours_files) == 6 and ours_files == zarr_files
    np.testing.assert_array_equal(store.open_activations(ours).acts[:], acts.astype(np.float16))


def test_failed_chunk_encoding_is_raised_in_the_caller(tmp_path, monkeypatch):
    tokens, acts = _acts(8, 16, 4)
    monkeypatch.setattr(store.CodecSpec, "encode", lambda self, rows: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        with store.ActivationStoreWriter(tmp_path / "s.zarr", tokens, 4, "float16", 16, {}, workers=2) as writer:
            writer.append(acts)
    assert list(tmp_path.iterdir()) == []


def test_the_finiteness_check_on_raw_bits_agrees_with_isfinite_on_every_float16_and_sampled_float32():
    every = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    assert [store.all_finite(every[i : i + 1]) for i in range(2**16)] == np.isfinite(every).tolist()
    bits = np.random.default_rng(0).integers(0, 2**32, 1_000_000, dtype=np.uint64).astype(np.uint32)
    for rows in bits.view(np.float32).reshape(-1, 500):
        assert store.all_finite(rows) == bool(np.isfinite(rows).all())
    big = np.ones((4096, 300), np.float16)  # several slices; a non-contiguous view takes the other path
    for bad in (np.nan, np.inf, -np.inf):
        spoiled = big.copy()
        spoiled[4000, 297] = bad  # in every third column, not in the even ones
        assert not store.all_finite(spoiled) and not store.all_finite(spoiled[:, ::3]) and store.all_finite(spoiled[:, :299:2])
        assert not store._round_and_check(spoiled, 8, check=True)
