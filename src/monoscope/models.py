"""The language model: build and train the native 1-layer model, load any configured model, run to a hook.

The native model is Towards Monosemanticity's: one transformer block, d_model 128, an MLP of 512
GELU neurons, built with TransformerLens 4 (`TransformerBridge.boot_native`) so every stage sees
the same hook names as for pretrained models.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from monoscope.runtime import device
from monoscope.atomic import atomic_path, write_text

WEIGHTS = "model.safetensors"
CONFIG = "model.json"


def native_bridge_config(native: dict[str, Any], d_vocab: int, context: int, seed: int):
    from transformer_lens.config import TransformerBridgeConfig

    return TransformerBridgeConfig(
        d_model=native["d_model"],
        d_head=native["d_model"] // native["n_heads"],
        n_heads=native["n_heads"],
        n_layers=native["n_layers"],
        n_ctx=context,
        d_mlp=native["d_mlp"],
        d_vocab=d_vocab,
        act_fn=native["act_fn"],
        normalization_type="LN",
        seed=seed,
    )


def boot_native(native: dict[str, Any], d_vocab: int, context: int, seed: int):
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_native(native_bridge_config(native, d_vocab, context, seed))


def cosine_lr(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up to `peak`, then cosine decay to `floor * peak` at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


NO_TARGET = -100


def next_token_targets(tokens: torch.Tensor) -> torch.Tensor:
    """tokens [b, s] -> targets [b, s]: the next token, NO_TARGET at the last position.

    The last position is ignored rather than sliced off, because slicing the logits copies them, and
    its backward fills and copies a [b, s, vocab] gradient (~15 % of a training step)."""
    return torch.nn.functional.pad(tokens[:, 1:], (0, 1), value=NO_TARGET)


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """logits [b, s, vocab], tokens [b, s] -> mean cross-entropy of predicting tokens[:, 1:]."""
    targets = next_token_targets(tokens)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=NO_TARGET)


class UnembedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight.T + bias` against `targets`, a block of rows at a time.

    Training only: the forward pass also computes the gradients (softmax minus one-hot is all the
    backward needs), so a block's logits are written, exponentiated once and multiplied while they
    are still in cache. Unfused, [b*s, vocab] logits go through memory ~8 times (log-softmax forward
    and backward, gradient fill and copy): with the default vocabulary that was ~1/4 of a step.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows_per_block: int = 512):
        # hidden [n, d_model], weight [vocab, d_model], bias [vocab] or None, targets [n] (NO_TARGET: none)
        counted = (targets != NO_TARGET).to(hidden.dtype)  # [n]
        row_weight = counted / counted.sum().clamp(min=1)  # [n]: each row's share of the mean
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight)
        grad_bias = torch.zeros_like(bias) if bias is not None and bias.requires_grad else None
        loss = hidden.new_zeros(())
        for start in range(0, len(hidden), rows_per_block):
            rows = slice(start, start + rows_per_block)
            h, target, share = hidden[rows], targets[rows].clamp(min=0), row_weight[rows]
            logits = h @ weight.T if bias is None else torch.addmm(bias, h, weight.T)  # [r, vocab]
            picked = logits.gather(1, target[:, None]).squeeze(1)  # [r]
            top = logits.amax(1, keepdim=True)  # [r, 1]
            probs = logits.sub_(top).exp_()  # [r, vocab], unnormalised, in place
            total = probs.sum(1)  # [r]
            loss += ((top.squeeze(1) + total.log() - picked) * share).sum()
            probs.mul_((share / total)[:, None])
            probs[torch.arange(len(target)), target] -= share  # d loss / d logits
            torch.mm(probs, weight, out=grad_hidden[rows])
            grad_weight.addmm_(probs.T, h)
            if grad_bias is not None:
                grad_bias += probs.sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None if grad_bias is None else grad_bias * grad_loss, None, None


@contextlib.contextmanager
def unembedding_detached(module) -> Iterator[torch.nn.Linear]:
    """The native module returning its final hidden states [b, s, d_model] instead of logits, so its
    unembedding (yielded) can be fused with the loss."""
    from transformer_lens.utilities.activation_functions import softcap_enabled

    head = module.head
    soft_cap = getattr(module, "output_logits_soft_cap", None)
    if softcap_enabled(soft_cap):
        raise ValueError(f"the fused unembedding + loss has no logit soft-cap, but the model caps at {soft_cap}")
    module.head = torch.nn.Identity()
    try:
        yield head.original_component
    finally:
        module.head = head


def _batches(tokens: np.ndarray, batch_size: int, rng: np.random.Generator) -> Iterator[torch.Tensor]:
    """Endless epochs over the sequences, each in a fresh seeded order."""
    while True:
        order = rng.permutation(len(tokens))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield torch.from_numpy(tokens[np.sort(order[start : start + batch_size])]).long()


@torch.no_grad()
def held_out_loss(forward: Callable[[torch.Tensor], torch.Tensor], tokens: np.ndarray, batch_size: int) -> float:
    total, count = 0.0, 0
    for start in range(0, len(tokens), batch_size):
        batch = torch.from_numpy(tokens[start : start + batch_size]).long().to(device())
        total += next_token_loss(forward(batch), batch).item() * len(batch)
        count += len(batch)
    return total / count


def train_native(
    native: dict[str, Any],
    train: dict[str, Any],
    seed: int,
    train_tokens: np.ndarray,
    eval_tokens: np.ndarray,
    d_vocab: int,
    out_dir: str | Path,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train the native model (the `model.native` and `model.train` config sections) on packed sequences;
    save weights, config and the loss curve to out_dir."""
    context = train_tokens.shape[1]
    torch.manual_seed(seed)
    bridge = boot_native(native, d_vocab, context, seed)
    # The bare module trains ~1.7x faster than the bridge (no hook dispatch); they share parameters.
    module = bridge.original_model.to(device())
    module.train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=train["lr"], betas=(0.9, 0.95), weight_decay=train["weight_decay"])
    steps = max(1, train["tokens"] // (train["batch_size"] * context))
    eval_tokens = eval_tokens[: max(1, train["eval_tokens"] // context)]
    batches = _batches(train_tokens, train["batch_size"], np.random.default_rng(seed))
    curve = []
    start = time.perf_counter()
    parameters = list(module.parameters())
    with unembedding_detached(module) as unembed:
        for step in tqdm(range(steps), desc="train_lm", mininterval=10):
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(step, steps, train["lr"], train["warmup_steps"])
            batch = next(batches).to(device())
            hidden = module(batch)  # [b, s, d_model]
            targets = next_token_targets(batch)
            loss = UnembedCrossEntropy.apply(hidden.flatten(0, 1), unembed.weight, unembed.bias, targets.flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            if step % 50 == 0 or step == steps - 1:
                curve.append({"step": step, "tokens": (step + 1) * train["batch_size"] * context, "train_loss": loss.item()})
    seconds = time.perf_counter() - start
    module.eval()
    summary = {
        "steps": steps,
        "tokens": steps * train["batch_size"] * context,
        "tokens_per_second": steps * train["batch_size"] * context / seconds,
        "final_train_loss": curve[-1]["train_loss"],
        "held_out_loss": held_out_loss(module, eval_tokens, train["batch_size"]),
        "held_out_tokens": int(eval_tokens.size),
    }
    log(json.dumps(summary))
    save_native(bridge, native, d_vocab, context, seed, out_dir, {"summary": summary, "curve": curve})
    return summary


def save_native(bridge, native, d_vocab, context, seed, out_dir, training: dict[str, Any]) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in bridge.state_dict().items()}
    with atomic_path(out / WEIGHTS) as tmp:
        save_file(state, str(tmp))
    spec = {"source": "native", "native": native, "d_vocab": d_vocab, "context": context, "seed": seed}
    write_text(out / CONFIG, json.dumps({**spec, "training": training}, indent=1))


def load_native(model_dir: str | Path):
    spec = json.loads((Path(model_dir) / CONFIG).read_text())
    bridge = boot_native(spec["native"], spec["d_vocab"], spec["context"], spec["seed"])
    bridge.load_state_dict(load_file(str(Path(model_dir) / WEIGHTS)))
    return bridge.to(device()).eval()


def load_model(model: dict[str, Any], model_dir: str | Path):
    """The `model` config section's model in eval mode: the trained native one from model_dir, or a
    pretrained one (model_dir caches what it is built from)."""
    if model["source"] == "native":
        return load_native(model_dir)
    from monoscope import pretrained

    bridge, _ = pretrained.load_pretrained(model, Path(model_dir))
    return bridge.eval()


def model_identity(model: dict[str, Any], model_dir: str | Path) -> str:
    """What identifies the weights: a content hash for the native model, name+revision/file hash otherwise."""
    if model["source"] == "native":
        import hashlib

        return "native:" + hashlib.sha256((Path(model_dir) / WEIGHTS).read_bytes()).hexdigest()[:16]
    from monoscope import pretrained

    return pretrained.pretrained_identity(model)


@torch.no_grad()
def loss_with_hook(bridge, tokens: torch.Tensor, hook: str, replace: Callable[[torch.Tensor], torch.Tensor] | None):
    """Mean next-token loss per sequence [b] with the hook's activation replaced by replace(act) (None: clean)."""
    tokens = tokens.to(device())
    hooks = [] if replace is None else [(hook, lambda act, hook: replace(act))]
    logits = bridge.run_with_hooks(tokens, return_type="logits", fwd_hooks=hooks)  # [b, s, vocab]
    # Over the flat logits as they lie in memory: a transposed [b, vocab, s] view made cross_entropy
    # ~4x slower. The last position has no target (NO_TARGET, loss 0), hence the mean over s - 1.
    losses = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), next_token_targets(tokens).flatten(), ignore_index=NO_TARGET, reduction="none"
    ).view(tokens.shape)  # [b, s]
    return losses.sum(dim=1) / (tokens.shape[1] - 1)
