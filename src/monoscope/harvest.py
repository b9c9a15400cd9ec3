"""Run the model over token shards and write the hooked activations as one activation store per shard."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from monoscope import models, store
from monoscope.pretrained import run_to_hook
from monoscope.config import hook_name


def harvest_shards(
    config: dict[str, Any],
    model_dir: str | Path,
    shards: list[tuple[str | Path, str | Path]],
    log=print,
) -> list[dict[str, Any]]:
    """Each (token shard, store path) in turn, with the model loaded once."""
    bridge = models.load_model(config, model_dir)
    model_id = models.model_identity(config, model_dir)
    return [harvest_shard(config, bridge, model_id, token_shard, out_path, log) for token_shard, out_path in shards]


def harvest_shard(
    config: dict[str, Any],
    bridge,
    model_id: str,
    token_shard: str | Path,
    out_path: str | Path,
    log=print,
) -> dict[str, Any]:
    harvest = config["harvest"]
    hook = hook_name(config)
    tokens, token_attrs = store.read_token_shard(token_shard)
    if harvest["max_seqs_per_shard"]:
        tokens = tokens[: harvest["max_seqs_per_shard"]]
    probe = run_to_hook(bridge, torch.from_numpy(tokens[:1]).long(), hook)
    d = probe.shape[-1]
    chunk_tokens = store.chunk_tokens_for(d, harvest["dtype"], tokens.shape[1], harvest["chunk_mib"])
    codec = store.CodecSpec(harvest["cname"], harvest["clevel"], harvest["shuffle"], harvest["keep_mantissa_bits"])
    attrs = {
        "model_id": model_id,
        "hook": hook,
        "source_shard": str(token_shard),
        "tokenizer_id": token_attrs.get("tokenizer_id"),
    }
    store_dtype = getattr(torch, harvest["dtype"])  # converted by torch: numpy's float16 cast is ~7x slower
    forward_s = 0.0
    start = time.perf_counter()
    workers = torch.get_num_threads()  # encoding threads: the job's cores (runtime sets the rule's threads), not the node's
    with store.ActivationStoreWriter(out_path, tokens, d, harvest["dtype"], chunk_tokens, attrs, codec, workers) as writer:
        for first in tqdm(range(0, len(tokens), harvest["batch_size"]), desc=f"harvest {Path(out_path).name}", mininterval=10):
            batch = torch.from_numpy(tokens[first : first + harvest["batch_size"]]).long()
            t = time.perf_counter()
            acts = run_to_hook(bridge, batch, hook)  # [b, s, d]
            forward_s += time.perf_counter() - t
            writer.append(acts.flatten(0, 1).to(store_dtype).cpu().numpy(), consume=True)  # cast on the device: half the copy
    total_s = time.perf_counter() - start
    summary = {"shard": Path(out_path).stem, "tokens": int(tokens.size), "d": d, "forward_s": forward_s, "total_s": total_s,
               "store_overhead": (total_s - forward_s) / forward_s}
    log(str(summary))
    return summary
