"""Run the model over token shards and write the hooked activations as one activation store per shard."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from tqdm import tqdm

from monoscope import models, store
from monoscope.pretrained import run_to_hook


@dataclass(frozen=True)
class HarvestSettings:
    """The `harvest` config section; workflow/schemas/config.schema.yaml documents each key and holds its default."""

    SECTION: ClassVar[str] = "harvest"

    dtype: str  # stored activation dtype: float16 | float32
    chunk_mib: float  # target chunk size along tokens (whole sequences)
    cname: str  # Blosc compressor
    clevel: int  # Blosc compression level
    shuffle: str  # Blosc shuffle filter
    keep_mantissa_bits: int | None  # round to this many mantissa bits before compressing; None: lossless
    batch_size: int  # sequences per forward pass
    max_seqs_per_shard: int | None  # harvest at most this many sequences per shard; None: all

    @property
    def codec(self) -> store.CodecSpec:
        return store.CodecSpec(self.cname, self.clevel, self.shuffle, self.keep_mantissa_bits)


def harvest_shards(
    harvest: HarvestSettings,
    model: dict[str, Any],
    model_dir: str | Path,
    hook: str,
    shards: list[tuple[str | Path, str | Path]],
    log=print,
) -> list[dict[str, Any]]:
    """Each (token shard, store path) in turn, with the model (the `model` config section, its outputs in
    model_dir) loaded once."""
    bridge = models.load_model(model, model_dir)
    model_id = models.model_identity(model, model_dir)
    return [harvest_shard(harvest, bridge, model_id, hook, token_shard, out_path, log) for token_shard, out_path in shards]


class NonFiniteActivations(ValueError):
    """Activations that would be stored as NaN or inf (or hidden as 0 by mantissa rounding)."""


@functools.cache
def storable_limit(dtype: torch.dtype, keep_mantissa_bits: int | None) -> float:
    """The largest magnitude that stays finite once stored: the dtype's max, or less when rounding
    the mantissa to keep_mantissa_bits would carry it into the exponent (65504 rounds to inf)."""
    np_dtype, int_type = {torch.float16: (np.float16, np.int16), torch.float32: (np.float32, np.int32),
                          torch.bfloat16: (None, None)}[dtype]
    if np_dtype is None or keep_mantissa_bits is None:
        return float(torch.finfo(dtype).max)
    top = np.frombuffer(np.array([np.finfo(np_dtype).max], np_dtype).tobytes(), int_type)[0]
    candidates = np.arange(top - 2**16 if np_dtype is np.float32 else top - 2**10, top + 1, dtype=int_type).view(np_dtype)
    rounded = store.round_mantissa(candidates.copy(), keep_mantissa_bits)
    return float(candidates[np.isfinite(rounded)].max())


def check_storable(rows: torch.Tensor, acts: torch.Tensor, keep_mantissa_bits: int | None, out_path, first_seq: int) -> None:
    """rows [b*s, d] in the store's dtype, from acts [b, s, d]: every value finite and within
    storable_limit, checked before the writer rounds them. Rounding turns non-canonical float16
    NaNs into inf or -0, and values near the dtype's max into inf, so the loader's finiteness check
    cannot see them afterwards. One pass (aminmax, which propagates NaN) while all is well."""
    limit = storable_limit(rows.dtype, keep_mantissa_bits)
    low, high = torch.aminmax(rows)
    if bool(high <= limit) and bool(low >= -limit):
        return
    bad = ~(rows.abs() <= limit)  # NaN compares False: bad too
    n_bad = int(bad.sum())
    flat, unit = (int(i) for i in bad.nonzero()[0])
    context = acts.shape[1]
    seq, pos = first_seq + flat // context, flat % context
    original = float(acts[flat // context, pos, unit])
    why = (f"the model produced {original}" if not np.isfinite(original)
           else f"{original:.6g} does not fit {str(rows.dtype).removeprefix('torch.')} (at most {limit:.6g} once rounded to "
                f"{keep_mantissa_bits} mantissa bits); set harvest.dtype: float32" if keep_mantissa_bits
           else f"{original:.6g} overflows {str(rows.dtype).removeprefix('torch.')}; set harvest.dtype: float32")
    raise NonFiniteActivations(
        f"harvest {out_path}: {n_bad} activation(s) would be stored as NaN or inf; the first at sequence {seq}, "
        f"position {pos}, unit {unit}: {why}"
    )


def harvest_shard(
    harvest: HarvestSettings,
    bridge,
    model_id: str,
    hook: str,
    token_shard: str | Path,
    out_path: str | Path,
    log=print,
) -> dict[str, Any]:
    """Run the model (models.load_model, identified by model_id in the store's attrs) over one token shard
    and write `hook`'s activations as an activation store at out_path."""
    tokens, token_attrs = store.read_token_shard(token_shard)
    if harvest.max_seqs_per_shard:
        tokens = tokens[: harvest.max_seqs_per_shard]
    probe = run_to_hook(bridge, torch.from_numpy(tokens[:1]).long(), hook)
    d = probe.shape[-1]
    chunk_tokens = store.chunk_tokens_for(d, harvest.dtype, tokens.shape[1], harvest.chunk_mib)
    attrs = {
        "model_id": model_id,
        "hook": hook,
        "source_shard": str(token_shard),
        "tokenizer_id": token_attrs.get("tokenizer_id"),
    }
    store_dtype = getattr(torch, harvest.dtype)  # converted by torch: numpy's float16 cast is ~7x slower
    forward_s = 0.0
    start = time.perf_counter()
    workers = torch.get_num_threads()  # encoding threads: the job's cores (runtime sets the rule's threads), not the node's
    with store.ActivationStoreWriter(out_path, tokens, d, harvest.dtype, chunk_tokens, attrs, harvest.codec, workers) as writer:
        for first in tqdm(range(0, len(tokens), harvest.batch_size), desc=f"harvest {Path(out_path).name}", mininterval=10):
            batch = torch.from_numpy(tokens[first : first + harvest.batch_size]).long()
            t = time.perf_counter()
            acts = run_to_hook(bridge, batch, hook)  # [b, s, d]
            forward_s += time.perf_counter() - t
            rows = acts.flatten(0, 1).to(store_dtype)  # [b * s, d]; cast on the device: half the copy
            check_storable(rows, acts, harvest.keep_mantissa_bits, out_path, first)
            writer.append(rows.cpu().numpy(), consume=True)
    total_s = time.perf_counter() - start
    summary = {"shard": Path(out_path).stem, "tokens": int(tokens.size), "d": d, "forward_s": forward_s, "total_s": total_s,
               "store_overhead": (total_s - forward_s) / forward_s}
    log(str(summary))
    return summary
