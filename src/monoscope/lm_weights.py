"""The language-model weights the unit analyses read, in one orientation whatever the architecture.

Read once per model, here and nowhere else. `TransformerBridge.state_dict()` returns the Hugging Face
tensors as they are: GPT-2's MLP is a `Conv1D` whose weight is `[d_in, d_out]`, the transpose of
the `nn.Linear` of GPT-NeoX, Llama and the native model. The bridge's `W_in`, `W_out` and `W_U`
properties already know each architecture's layout and return TransformerLens's, so they are what
is read. The final norm's kind comes from the bridge's config: LayerNorm centres the residual
before scaling it, RMSNorm only scales it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CENTRING_NORMS = ("LN", "LNPre")  # TransformerLens's normalization_type values that subtract the mean
SCALING_NORMS = ("RMS", "RMSPre")


@dataclass(frozen=True)
class LMWeights:
    """One MLP layer's weights and the unembedding, float32 on the CPU, TransformerLens orientation."""

    layer: int
    n_layers: int
    w_in: torch.Tensor  # [d_model, d_mlp]: column i is what neuron i reads (up_proj for gated MLPs)
    w_out: torch.Tensor  # [d_mlp, d_model]: row i is what neuron i writes to the residual stream
    w_u: torch.Tensor  # [d_model, n_vocab]: only the columns of ids the tokenizer has
    mlp_out_gain: torch.Tensor | None  # [d_model]: a norm on the MLP's output before the residual (Gemma 2/3)
    final_norm: str  # "layernorm" (centres, then scales), "rmsnorm" (scales) or "none"
    final_norm_scale: torch.Tensor | None  # [d_model], the norm's effective per-dimension gain

    def residual_direction(self, neuron_directions: torch.Tensor) -> torch.Tensor:
        """[n, d_mlp] directions in neuron space -> [n, d_model] what they add to the residual stream,
        up to the per-token division of a post-MLP norm."""
        resid = neuron_directions @ self.w_out
        return resid if self.mlp_out_gain is None else resid * self.mlp_out_gain

    def final_norm_direction(self, resid: torch.Tensor) -> torch.Tensor:
        """[n, d_model] directions as the final norm passes them on, up to its per-token division."""
        if self.final_norm == "layernorm":
            resid = resid - resid.mean(-1, keepdim=True)
        if self.final_norm_scale is not None:
            resid = resid * self.final_norm_scale
        return resid


def _rms_gain(module, d_model: int) -> torch.Tensor | None:
    """An RMSNorm's gain as the module applies it: a vector of ones has RMS 1, so the output is the gain.
    Reading `weight` would be wrong for Gemma, whose RMSNorm multiplies by (1 + weight)."""
    parameters = list(module.parameters()) if module is not None else []
    if not parameters:
        return None
    probe = torch.ones(1, d_model, dtype=parameters[0].dtype, device=parameters[0].device)
    return module(probe)[0].float().cpu()


def _final_norm(bridge) -> tuple[str, torch.Tensor | None]:
    kind = bridge.cfg.normalization_type
    module = getattr(getattr(bridge, "ln_final", None), "original_component", None)
    if kind in CENTRING_NORMS:
        weight = getattr(module, "weight", None)
        return "layernorm", None if weight is None else weight.detach().float().cpu()
    if kind in SCALING_NORMS:
        return "rmsnorm", _rms_gain(module, bridge.cfg.d_model)
    if kind is None:
        return "none", None
    raise ValueError(f"final norm: TransformerLens normalization_type '{kind}' is neither a LayerNorm "
                     f"({', '.join(CENTRING_NORMS)}) nor an RMSNorm ({', '.join(SCALING_NORMS)})")


@torch.no_grad()
def read_weights(bridge, layer: int, n_vocab: int | None = None) -> LMWeights:
    """The weights of MLP `layer` and the unembedding; n_vocab: the tokenizer's size.

    An unembedding can be wider than the tokenizer (Pythia: 50,304 rows for 50,277 tokens, padded
    for speed); the extra rows are ids no text ever has, so they are cut off here and never ranked."""
    n_layers = bridge.cfg.n_layers
    if not 0 <= layer < n_layers:
        raise ValueError(f"model.layer: {layer} is outside the model's {n_layers} layers")
    mlp = bridge.blocks[layer].mlp
    w_in, w_out, w_u = (w.detach().float().cpu() for w in (mlp.W_in, mlp.W_out, bridge.W_U))
    d_model = bridge.cfg.d_model
    if w_in.shape[0] != d_model or w_out.shape[1] != d_model or w_in.shape[1] != w_out.shape[0] or w_u.shape[0] != d_model:
        raise ValueError(f"layer {layer}: W_in {tuple(w_in.shape)}, W_out {tuple(w_out.shape)} and W_U "
                         f"{tuple(w_u.shape)} are not [d_model, d_mlp], [d_mlp, d_model], [d_model, d_vocab] "
                         f"for d_model {d_model}")
    if n_vocab is not None:
        if n_vocab > w_u.shape[1]:
            raise ValueError(f"the tokenizer has {n_vocab} ids but the unembedding only {w_u.shape[1]}")
        w_u = w_u[:, :n_vocab].contiguous()
    kind, scale = _final_norm(bridge)
    # Gemma 2/3 normalise the MLP's output before adding it to the residual (TransformerLens: ln2_post).
    post = getattr(getattr(bridge.blocks[layer], "ln2_post", None), "original_component", None)
    mlp_out_gain = _rms_gain(post, d_model) if post is not None and bridge.cfg.normalization_type in SCALING_NORMS else None
    return LMWeights(layer=layer, n_layers=n_layers, w_in=w_in, w_out=w_out, w_u=w_u, mlp_out_gain=mlp_out_gain,
                     final_norm=kind, final_norm_scale=scale)
