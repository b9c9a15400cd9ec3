"""Weight orientation and final norms read from the bridge, checked against the Hugging Face modules (seconds)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_hf import D_MLP, D_MODEL, FAMILIES, PADDED_VOCAB, TOKENIZER_VOCAB, hf_parts, save_tiny_model

from monoscope import features, lm_weights, pretrained

NORM = {"gpt2": "layernorm", "gpt_neox": "layernorm", "llama": "rmsnorm", "gemma3": "rmsnorm"}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    folder = save_tiny_model(request.param, tmp_path_factory.mktemp(request.param))
    bridge, tokenizer = pretrained.load_pretrained({"source": "hub", "name": str(folder)}, folder)
    assert len(tokenizer) == TOKENIZER_VOCAB and bridge.cfg.d_vocab == PADDED_VOCAB
    return request.param, bridge, bridge.original_model


@torch.no_grad()
def test_logit_weights_equal_the_direct_path_through_the_hf_modules(family):
    name, bridge, hf = family
    lm = lm_weights.read_weights(bridge, 1, n_vocab=TOKENIZER_VOCAB)
    assert lm.final_norm == NORM[name]
    assert (lm.w_in.shape, lm.w_out.shape, lm.w_u.shape) == ((D_MODEL, D_MLP), (D_MLP, D_MODEL), (D_MODEL, TOKENIZER_VOCAB))

    units = torch.eye(D_MLP)[:12]
    top_ids, top_values, bottom_ids, _ = features.logit_weights(features.residual_directions(units, lm, "blocks.1.mlp.hook_post")[0], lm, 5)
    _, out_proj, post_norm, final_norm = hf_parts(hf, name)
    resid = out_proj(units) - out_proj(torch.zeros(1, D_MLP))  # what each neuron writes, whatever the layout
    if post_norm is not None:
        resid = post_norm(resid)
    normed = final_norm(resid) - final_norm(torch.zeros(1, D_MODEL))  # LayerNorm(0) is its bias
    logits = hf.get_output_embeddings()(normed)[:, :TOKENIZER_VOCAB] - hf.get_output_embeddings()(torch.zeros(1, D_MODEL))[:, :TOKENIZER_VOCAB]
    np.testing.assert_array_equal(top_ids, logits.topk(5).indices.numpy())
    np.testing.assert_array_equal(bottom_ids, (-logits).topk(5).indices.numpy())
    assert top_ids.max() < TOKENIZER_VOCAB and bottom_ids.max() < TOKENIZER_VOCAB  # no padding row is ranked
    # Magnitudes are relative (the norm's per-token division is left out), but proportional per unit.
    ratio = top_values / logits.topk(5).values.numpy()
    np.testing.assert_allclose(ratio, ratio[:, :1].repeat(5, 1), rtol=1e-4)


def test_neuron_geometry_has_one_cosine_per_neuron(family):
    name, bridge, hf = family
    lm = lm_weights.read_weights(bridge, 1)
    cosine = features.neuron_in_out_cosine(lm, "blocks.1.mlp.hook_post")
    up_rows, out_proj, _, _ = hf_parts(hf, name)
    writes = (out_proj(torch.eye(D_MLP)) - out_proj(torch.zeros(1, D_MLP))).detach()  # [d_mlp, d_model]
    expected = torch.nn.functional.cosine_similarity(up_rows.detach(), writes, dim=-1)
    assert cosine.shape == (D_MLP,)
    np.testing.assert_allclose(cosine, expected.numpy(), atol=1e-5)


def test_bad_layer_and_vocabulary_are_named(family):
    _, bridge, _ = family
    with pytest.raises(ValueError, match="model.layer: 2 is outside the model's 2 layers"):
        lm_weights.read_weights(bridge, 2)
    with pytest.raises(ValueError, match="tokenizer has 999 ids but the unembedding only 320"):
        lm_weights.read_weights(bridge, 0, n_vocab=999)
