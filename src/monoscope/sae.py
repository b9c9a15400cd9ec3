"""Sparse autoencoders: one model file for every architecture monoscope trains.

    x       [..., d_in]   raw activations of the hooked layer
    x_n     [..., d_in]   x * norm_scale, so that E||x_n||^2 = d_in over the training data
    pre     [..., d_sae]  (x_n - b_dec) @ W_enc + b_enc
    f       [..., d_sae]  features: nonlinearity(pre) >= 0
    x_hat_n [..., d_in]   f @ W_dec + b_dec; x_hat = x_hat_n / norm_scale

Architectures (all share the parameters above; decoder rows are kept at unit norm by the trainer):
    relu       Towards Monosemanticity (Bricken et al. 2023): f = ReLU(pre), loss = MSE + λ·L1.
    topk       Gao et al. 2024: keep the k largest pre-activations per token; AuxK revives dead latents.
    batchtopk  Bussmann et al. 2024: keep the k·B largest over a batch of B tokens in training; a
               learned global threshold replaces the batch at inference.
    jumprelu   Rajamanoharan et al. 2024: f = pre·H(pre - θ) per feature, L0 penalty trained through
               straight-through estimators with a rectangle kernel.

`encode` and `decode` take and return raw activations; the `*_normalized` variants are what the
trainer uses. The checkpoint is `sae.safetensors` + `cfg.json` with everything needed to rebuild it.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from monoscope import __version__
from monoscope.atomic import atomic_path, write_text

ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu")
WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "cfg.json"
# Above this fraction of active (token, feature) entries the relu step's products stay dense: the
# CSR products' cost grows with the entries. Measured here (8x, batch 4096, 2 cores): 0.6 % active,
# CSR step 3.2x faster; 16 %, about even. Early in training half the features fire.
SPARSE_MAX_DENSITY = 0.1


@dataclass
class SAEConfig:
    d_in: int
    d_sae: int
    architecture: str  # relu | topk | batchtopk | jumprelu; these four keys come from the sae config section
    k: int  # topk: active features per token; batchtopk: per token on average over a batch
    jumprelu_bandwidth: float  # ε, width of the rectangle kernel of the threshold pseudo-gradient
    jumprelu_init_threshold: float  # θ at initialisation
    norm_scale: float = 1.0  # constant computed once from the data: x_n = x * norm_scale
    # Provenance: what produced these weights.
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    tokens_seen: int = 0
    source_stores: list[str] = field(default_factory=list)
    source_attrs: dict[str, Any] = field(default_factory=dict)
    package_version: str = __version__

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown SAE architecture {self.architecture!r}; expected one of {ARCHITECTURES}")
        if self.d_in < 1 or self.d_sae < 1:
            raise ValueError(f"SAE sizes must be positive, got d_in={self.d_in}, d_sae={self.d_sae}")
        if self.architecture in ("topk", "batchtopk") and not 1 <= self.k <= self.d_sae:
            raise ValueError(f"k={self.k} must lie in [1, d_sae={self.d_sae}] for {self.architecture}")


class _JumpReLU(torch.autograd.Function):
    """pre·H(pre - θ); d/dpre = H(pre - θ), d/dθ = -(θ/ε)·K((pre - θ)/ε) with K the unit rectangle."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad_out):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        in_window = ((pre - threshold).abs() < eps / 2).to(pre.dtype)
        grad_pre = grad_out * (pre > threshold)
        grad_threshold = (grad_out * -(threshold / eps) * in_window).sum_to_size(threshold.shape)
        return grad_pre, grad_threshold, None


class _Step(torch.autograd.Function):
    """H(pre - θ) with d/dθ = -(1/ε)·K((pre - θ)/ε): the L0 penalty's only path to θ."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        in_window = ((pre - threshold).abs() < eps / 2).to(pre.dtype)
        grad_threshold = (grad_out * -(1.0 / eps) * in_window).sum_to_size(threshold.shape)
        return None, grad_threshold, None


class SAE(nn.Module):
    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.cfg = cfg
        self.d_in, self.d_sae = cfg.d_in, cfg.d_sae
        self.W_enc = nn.Parameter(torch.empty(cfg.d_in, cfg.d_sae))  # [d_in, d_sae]
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))  # [d_sae]
        self.W_dec = nn.Parameter(torch.empty(cfg.d_sae, cfg.d_in))  # [d_sae, d_in], unit-norm rows
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))  # [d_in], also the pre-encoder bias
        if cfg.architecture == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((cfg.d_sae,), math.log(cfg.jumprelu_init_threshold)))
        if cfg.architecture == "batchtopk":
            # Inference threshold, estimated in training from the batch top-k selections.
            self.register_buffer("threshold", torch.tensor(0.0))
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        # Random unit decoder directions, encoder tied to the decoder's transpose at the start
        # (Gao et al. 2024; Anthropic's April 2024 update): far fewer dead features early on.
        self.W_dec.copy_(torch.randn(self.d_sae, self.d_in, generator=generator))
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True)
        self.W_enc.copy_(self.W_dec.T)
        self.b_enc.zero_()
        self.b_dec.zero_()

    # --- the model, in the normalised space -------------------------------------------------------

    def pre_activations(self, x_n: torch.Tensor) -> torch.Tensor:
        return F.linear(x_n - self.b_dec, self.W_enc.T, self.b_enc)  # [..., d_sae]; bias added in the GEMM

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        arch = self.cfg.architecture
        if arch == "relu":
            return F.relu(pre)
        if arch == "topk":
            values, indices = pre.topk(self.cfg.k, dim=-1, sorted=False)  # [..., k]
            return torch.zeros_like(pre).scatter_(-1, indices, F.relu(values))
        if arch == "batchtopk":
            if self.training:
                flat = F.relu(pre).reshape(-1, self.d_sae)  # [B, d_sae]
                n_keep = min(self.cfg.k * flat.shape[0], flat.numel())
                values, indices = flat.flatten().topk(n_keep, sorted=False)
                return torch.zeros_like(flat).flatten().scatter_(0, indices, values).reshape(pre.shape)
            return pre * (pre > self.threshold)
        threshold = self.log_threshold.exp()  # jumprelu
        return _JumpReLU.apply(pre, threshold, self.cfg.jumprelu_bandwidth)

    def encode_normalized(self, x_n: torch.Tensor) -> torch.Tensor:
        return self.activation(self.pre_activations(x_n))

    def decode_normalized(self, f: torch.Tensor) -> torch.Tensor:
        if f.device.type == "cpu" and not (torch.is_grad_enabled() and f.requires_grad) and f.numel():
            # Inference on the CPU: few features fire, so multiply only the active entries (CSR)
            # instead of the whole [n, d_sae] block (~100x fewer FLOPs at L0 ~ 15 of 4096).
            flat = f.reshape(-1, self.d_sae)  # [n, d_sae]
            n_active = int(torch.count_nonzero(flat))
            if n_active <= SPARSE_MAX_DENSITY * flat.numel():
                with warnings.catch_warnings():  # "sparse CSR support is in beta": tested in test_sae.py
                    warnings.simplefilter("ignore", UserWarning)
                    x_hat = flat.to_sparse_csr() @ self.W_dec  # [n, d_in]
                return x_hat.add_(self.b_dec).reshape(*f.shape[:-1], self.d_in)
        return f @ self.W_dec + self.b_dec  # [..., d_in]

    # --- raw activations in and out ---------------------------------------------------------------

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_normalized(x * self.cfg.norm_scale)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return self.decode_normalized(f) / self.cfg.norm_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    # --- training objective -----------------------------------------------------------------------

    def training_losses(
        self,
        x_n: torch.Tensor,  # [B, d_in], normalised
        sparsity_coefficient: float,
        dead: torch.Tensor | None = None,  # [d_sae] bool: latents AuxK should revive (topk, batchtopk)
        auxk_alpha: float = 1 / 32,
        aux_k: int = 256,
    ) -> dict[str, torch.Tensor]:
        """Loss terms, each a mean over tokens; `loss` is what to minimise.

        mse is the squared error summed over d_in; with E||x_n||^2 = d_in it is comparable across
        layers and models. The sparsity term is λ·L1 (relu; decoder rows have unit norm, so this is
        Anthropic's λ·Σ f_i·||W_dec,i||), λ·L0 (jumprelu), or nothing (topk, batchtopk: k fixes L0).
        """
        pre = self.pre_activations(x_n)  # [B, d_sae]
        f = self.activation(pre)  # [B, d_sae]
        x_hat = self.decode_normalized(f)  # [B, d_in]
        error = x_n - x_hat  # [B, d_in]
        mse = error.pow(2).sum(-1).mean()
        arch = self.cfg.architecture
        terms = {"mse": mse}
        if arch == "relu":
            terms["l1"] = f.sum(-1).mean()
            loss = mse + sparsity_coefficient * terms["l1"]
        elif arch == "jumprelu":
            threshold = self.log_threshold.exp()
            terms["l0_penalty"] = _Step.apply(pre, threshold, self.cfg.jumprelu_bandwidth).sum(-1).mean()
            loss = mse + sparsity_coefficient * terms["l0_penalty"]
        else:
            loss = mse
            if dead is not None and auxk_alpha > 0 and bool(dead.any()):
                terms["auxk"] = self._auxk_loss(pre, error, dead, aux_k)
                loss = loss + auxk_alpha * terms["auxk"]
            if arch == "batchtopk" and self.training:
                self._update_threshold(f)
        terms["loss"] = loss
        terms["f"] = f.detach()
        active = terms["f"] > 0  # [B, d_sae]
        terms["l0"] = active.sum(-1).float().mean()
        terms["fire_counts"] = torch.count_nonzero(active, dim=0)  # [d_sae]: tokens each feature fired on
        return terms

    @torch.no_grad()
    def relu_losses_and_grads(self, x_n: torch.Tensor, sparsity_coefficient: float) -> dict[str, torch.Tensor]:
        """training_losses for relu with hand-written gradients, stored in .grad.

        Five GEMMs per step where autograd needs six (the b_dec gradient through the encoder
        only needs the batch sum of the pre-activation gradient) and half the [B, d_sae]
        temporaries: the relu SAE is what a long run trains, so this is where the time goes.
        Once few features fire (on the CPU), the four products after the encoder's touch only the
        active entries (`_sparse_products`). tests/test_sae.py checks both against autograd.
        """
        if self.cfg.architecture != "relu":
            raise ValueError(f"hand-written gradients exist for relu only, not {self.cfg.architecture}")
        batch = x_n.shape[0]
        x_c = x_n - self.b_dec  # [B, d_in]
        f = torch.addmm(self.b_enc, x_c, self.W_enc).clamp_min_(0)  # [B, d_sae]
        active = f > 0  # [B, d_sae]
        n_active = int(torch.count_nonzero(active))  # (active.sum() would first cast [B, d_sae] to int64)
        l1 = f.sum() / batch
        if f.device.type == "cpu" and n_active <= SPARSE_MAX_DENSITY * f.numel():
            error, grad_x_hat, fire_counts = self._sparse_products(x_n, x_c, f, active, sparsity_coefficient)
        else:
            fire_counts = torch.count_nonzero(active, dim=0)  # [d_sae]
            error = torch.addmm(self.b_dec, f, self.W_dec).sub_(x_n)  # [B, d_in]: x_hat - x
            grad_x_hat = error * (2.0 / batch)  # [B, d_in]
            self.W_dec.grad = f.T @ grad_x_hat  # [d_sae, d_in]
            grad_pre = torch.addmm(  # [B, d_sae], zero where the ReLU is off
                torch.full((), sparsity_coefficient / batch, dtype=x_n.dtype, device=x_n.device), grad_x_hat, self.W_dec.T
            ).mul_(active)
            self.W_enc.grad = x_c.T @ grad_pre  # [d_in, d_sae]
            self.b_enc.grad = grad_pre.sum(0)  # [d_sae]
        mse = error.pow(2).sum() / batch
        self.b_dec.grad = grad_x_hat.sum(0) - self.W_enc @ self.b_enc.grad  # [d_in]
        l0 = torch.tensor(n_active / batch, device=f.device)
        return {"mse": mse, "l1": l1, "loss": mse + sparsity_coefficient * l1, "f": f, "l0": l0, "fire_counts": fire_counts}

    def _sparse_products(self, x_n, x_c, f, active, sparsity_coefficient):
        """The decoder, its gradient, the pre-activation gradient and the encoder's gradient as
        products with f in CSR form: they cost O(active entries · d_in), not O(B · d_sae · d_in),
        and leave the encoder GEMM as the step's one dense product (~3x fewer FLOPs per step at 8x
        once L0 is ~15). Sets W_dec, W_enc and b_enc .grad; returns (x_hat - x, grad_x_hat, the tokens
        each feature fired on [d_sae])."""
        batch = x_n.shape[0]
        rows, cols = active.nonzero(as_tuple=True)  # row-major: already CSR order
        row_starts = torch.zeros(batch + 1, dtype=torch.int64)
        row_starts[1:] = torch.bincount(rows, minlength=batch).cumsum(0)
        l1_grad = torch.full(cols.shape, sparsity_coefficient / batch, dtype=f.dtype)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": these ops are tested
            warnings.simplefilter("ignore", UserWarning)
            f_csr = torch.sparse_csr_tensor(row_starts, cols, f[rows, cols], f.shape)  # [B, d_sae]
            l1_csr = torch.sparse_csr_tensor(row_starts, cols, l1_grad, f.shape)  # λ/B on f's pattern
        error = (f_csr @ self.W_dec).add_(self.b_dec).sub_(x_n)  # [B, d_in]: x_hat - x
        grad_x_hat = error * (2.0 / batch)  # [B, d_in]
        self.W_dec.grad = f_csr.t() @ grad_x_hat  # [d_sae, d_in]
        grad_pre = torch.sparse.sampled_addmm(l1_csr, grad_x_hat, self.W_dec.T)  # [B, d_sae] CSR: λ/B + grad_x_hat @ W_dec^T, active entries only
        self.W_enc.grad = (grad_pre.t() @ x_c).T.contiguous()  # [d_in, d_sae]
        self.b_enc.grad = torch.zeros_like(self.b_enc).index_add_(0, cols, grad_pre.values())  # [d_sae]
        return error, grad_x_hat, torch.bincount(cols, minlength=self.d_sae)

    def _auxk_loss(self, pre, error, dead, aux_k) -> torch.Tensor:
        """Reconstruct the main model's error from the top aux_k dead latents (Gao et al. 2024, A.2)."""
        k = min(aux_k, int(dead.sum()))
        dead_pre = pre.masked_fill(~dead, float("-inf"))  # [B, d_sae]
        values, indices = dead_pre.topk(k, dim=-1, sorted=False)  # [B, k]
        f_aux = torch.zeros_like(pre).scatter_(-1, indices, F.relu(values))
        error_hat = f_aux @ self.W_dec  # [B, d_in]; no bias: it reconstructs a residual
        error = error.detach()
        return (error - error_hat).pow(2).sum() / error.pow(2).sum().clamp_min(1e-12)

    @torch.no_grad()
    def _update_threshold(self, f: torch.Tensor, momentum: float = 0.99) -> None:
        """EMA of the smallest activation the batch top-k kept (Bussmann et al. 2024)."""
        kept = f[f > 0]
        if kept.numel():
            smallest = kept.min()
            if self.threshold <= 0:
                self.threshold.copy_(smallest)
            else:
                self.threshold.mul_(momentum).add_((1 - momentum) * smallest)

    # --- unit-norm decoder ------------------------------------------------------------------------

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Drop the gradient component along each decoder row: the step then (nearly) keeps the norm."""
        if self.W_dec.grad is not None:
            parallel = (self.W_dec.grad * self.W_dec).sum(-1, keepdim=True)  # [d_sae, 1]
            self.W_dec.grad -= parallel * self.W_dec

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    # --- checkpoint -------------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> None:
        """Write sae.safetensors + cfg.json into `directory` (each file via a temp name and rename)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in self.state_dict().items()}
        with atomic_path(directory / WEIGHTS_FILE) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt", "architecture": self.cfg.architecture})
        write_text(directory / CONFIG_FILE, json.dumps(asdict(self.cfg), indent=2, sort_keys=True) + "\n")


def load_sae(path: str | os.PathLike, device: str | torch.device = "cpu") -> SAE:
    """Rebuild an SAE from a directory holding sae.safetensors + cfg.json; returned in eval mode."""
    path = Path(path)
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (path / name).exists():
            raise FileNotFoundError(f"SAE checkpoint {path} has no {name}")
    cfg = SAEConfig(**json.loads((path / CONFIG_FILE).read_text()))
    sae = SAE(cfg)
    sae.load_state_dict(load_file(str(path / WEIGHTS_FILE)))
    return sae.to(device).eval()
