"""The native language model's training: the fused unembedding + loss and a tiny training run (seconds)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from monoscope import models
from monoscope.config import validate_config


@pytest.mark.parametrize("bias_trained", [False, True])
def test_fused_unembedding_loss_matches_cross_entropy_and_its_gradients(bias_trained):
    torch.manual_seed(0)
    n, d_model, vocab = 300, 16, 97  # 300 rows: blocks of 128 leave a partial last block
    hidden = torch.randn(n, d_model, requires_grad=True)
    weight = (torch.randn(vocab, d_model) * 0.3).requires_grad_()
    bias = torch.randn(vocab).requires_grad_(bias_trained)
    targets = torch.randint(0, vocab, (n,))
    targets[::7] = models.NO_TARGET

    expected = torch.nn.functional.cross_entropy(torch.addmm(bias, hidden, weight.T), targets, ignore_index=models.NO_TARGET)
    expected_grads = torch.autograd.grad(3.0 * expected, [hidden, weight] + ([bias] if bias_trained else []))
    fused = models.UnembedCrossEntropy.apply(hidden, weight, bias, targets, 128)
    fused_grads = torch.autograd.grad(3.0 * fused, [hidden, weight] + ([bias] if bias_trained else []))

    torch.testing.assert_close(fused, expected)
    for got, want in zip(fused_grads, expected_grads):
        torch.testing.assert_close(got, want)


def test_training_lowers_the_loss_and_gives_back_a_model_that_returns_logits(tmp_path):
    rng = np.random.default_rng(0)
    vocab, context = 64, 16
    # A learnable pattern: every token is followed by (token + 1) % vocab.
    starts = rng.integers(0, vocab, 160)
    sequences = ((starts[:, None] + np.arange(context)) % vocab).astype(np.int32)  # [160, 16]
    config = validate_config({
        "model": {"native": {"d_model": 32, "d_mlp": 64, "n_heads": 2},
                  "train": {"tokens": 12800, "batch_size": 16, "lr": 0.01, "warmup_steps": 5, "eval_tokens": 1000}},
    })  # fmt: skip
    summary = models.train_native(config["model"]["native"], config["model"]["train"], config["seed"], sequences[:128],
                                  sequences[128:], vocab, tmp_path, log=lambda _: None)

    assert summary["held_out_loss"] < 0.5 * np.log(vocab)  # from ~ln(64) = 4.2 untrained
    saved = json.loads((tmp_path / models.CONFIG).read_text())["training"]["summary"]
    assert saved["held_out_loss"] == summary["held_out_loss"]
    bridge = models.load_native(tmp_path)
    batch = torch.from_numpy(sequences[128:]).long()
    logits = bridge(batch, return_type="logits")
    assert logits.shape == (32, context, vocab)
    assert models.next_token_loss(logits, batch).item() == pytest.approx(summary["held_out_loss"], rel=1e-4)
