"""The SAE model file: architectures, raw-scale interface, unit-norm decoder, checkpoint round-trip."""

import dataclasses
import json
import subprocess

import pytest
import torch

from monoscope.config import default_settings
from monoscope.sae import ARCHITECTURES, SAE, load_sae
from monoscope.train import TrainConfig, sae_config


def sae_cfg(d_in: int, d_sae: int, **values):
    """An SAEConfig as the trainer builds it from the schema's defaults, then `values`."""
    return dataclasses.replace(sae_config(default_settings(TrainConfig), d_in), d_sae=d_sae, **values)


def make_sae(architecture="relu", d_in=16, d_sae=64, **kwargs) -> SAE:
    sae = SAE(sae_cfg(d_in, d_sae, architecture=architecture, **kwargs), torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        sae.b_dec.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    return sae


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_shapes_and_raw_scale(architecture):
    sae = make_sae(architecture, norm_scale=0.25, k=4).eval()
    x = torch.randn(3, 5, 16)
    f = sae.encode(x)
    assert f.shape == (3, 5, 64) and (f >= 0).all()
    assert sae.decode(f).shape == x.shape
    # The raw interface is the normalised one conjugated by the constant.
    assert torch.allclose(f, sae.encode_normalized(x * 0.25))
    assert torch.allclose(sae.decode(f), sae.decode_normalized(f) / 0.25)
    assert torch.allclose(sae(x), sae.decode(f))


def test_inference_decode_of_sparse_codes_equals_the_dense_product():
    sae = make_sae("topk", k=3).eval()  # 3 of 64 active: the sparse path
    x = torch.randn(4, 7, 16)
    with torch.no_grad():
        f = sae.encode(x)  # [4, 7, 64]
        sparse = sae.decode(f)
        dense = f @ sae.W_dec + sae.b_dec
        assert torch.allclose(sparse, dense, atol=1e-6) and sparse.shape == (4, 7, 16)
        assert torch.equal(sae.decode(torch.zeros(0, 64)), torch.zeros(0, 16))
    f = sae.encode(x).detach().requires_grad_()
    sae.decode(f).sum().backward()  # with autograd the dense path keeps working
    assert f.grad.shape == f.shape


def test_topk_keeps_exactly_k_per_token():
    sae = make_sae("topk", k=5)
    with torch.no_grad():
        sae.b_enc.fill_(10.0)  # every pre-activation positive, so ReLU removes none of the k
    f = sae.encode(torch.randn(32, 16))
    assert ((f > 0).sum(-1) == 5).all()


def test_batchtopk_keeps_k_per_token_on_average_and_learns_a_threshold():
    sae = make_sae("batchtopk", k=5).train()
    x = torch.randn(64, 16)
    terms = sae.training_losses(x, 0.0)
    assert int((terms["f"] > 0).sum()) == 5 * 64
    assert (terms["f"] > 0).sum(-1).float().std() > 0, "batch top-k should vary per token"
    assert sae.threshold > 0
    f_eval = sae.eval().encode(x)
    assert torch.equal(f_eval > 0, sae.pre_activations(x) > sae.threshold)


def test_jumprelu_threshold_gets_gradient_from_the_l0_penalty_and_reconstruction():
    sae = make_sae("jumprelu", jumprelu_bandwidth=0.5, jumprelu_init_threshold=0.1)
    x = torch.randn(256, 16)
    f = sae.encode(x)
    pre = sae.pre_activations(x)
    assert torch.equal(f > 0, pre > 0.1)
    sae.training_losses(x, 1.0)["loss"].backward()
    assert sae.log_threshold.grad is not None and sae.log_threshold.grad.abs().sum() > 0


def test_relu_loss_terms():
    sae = make_sae("relu")
    x = torch.randn(10, 16)
    terms = sae.training_losses(x, 0.5)
    f = sae.encode_normalized(x)
    assert torch.allclose(terms["mse"], (x - sae.decode_normalized(f)).pow(2).sum(-1).mean())
    assert torch.allclose(terms["l1"], f.sum(-1).mean())
    assert torch.allclose(terms["loss"], terms["mse"] + 0.5 * terms["l1"])


def test_auxk_only_when_there_are_dead_latents():
    sae = make_sae("topk", k=4)
    x = torch.randn(10, 16)
    dead = torch.zeros(64, dtype=torch.bool)
    assert "auxk" not in sae.training_losses(x, 0.0, dead)
    dead[:20] = True
    terms = sae.training_losses(x, 0.0, dead, auxk_alpha=1 / 32, aux_k=8)
    assert terms["auxk"] > 0
    assert torch.allclose(terms["loss"], terms["mse"] + terms["auxk"] / 32)


def test_parallel_gradient_removed_and_rows_renormalised():
    sae = make_sae()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64))
    sae.training_losses(torch.randn(32, 16), 1.0)["loss"].backward()
    sae.remove_parallel_decoder_grad()
    assert (sae.W_dec.grad * sae.W_dec).sum(-1).abs().max() < 1e-5
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.normalize_decoder()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_save_and_load_round_trip(tmp_path, architecture):
    sae = make_sae(architecture, k=3, norm_scale=1.7, tokens_seen=123, source_stores=["s.zarr"], hyperparameters={"lr": 1e-4})
    if architecture == "batchtopk":
        sae.threshold.fill_(0.3)
    sae.save(tmp_path / "run")
    cfg = json.loads((tmp_path / "run" / "cfg.json").read_text())
    assert cfg["d_in"] == 16 and cfg["d_sae"] == 64 and cfg["architecture"] == architecture
    assert cfg["norm_scale"] == 1.7 and cfg["tokens_seen"] == 123 and cfg["hyperparameters"] == {"lr": 1e-4}
    loaded = load_sae(tmp_path / "run")
    assert not loaded.training
    x = torch.randn(7, 16)
    assert torch.equal(loaded.encode(x), sae.eval().encode(x))
    assert torch.equal(loaded.decode(loaded.encode(x)), sae.decode(sae.encode(x)))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["cfg.json", "sae.safetensors"]


def test_load_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="sae.safetensors"):
        load_sae(tmp_path)


def test_bad_config_is_explained():
    with pytest.raises(ValueError, match="unknown SAE architecture 'gated'"):
        sae_cfg(4, 8, architecture="gated")
    with pytest.raises(ValueError, match="k=9"):
        sae_cfg(4, 8, architecture="topk", k=9)


@pytest.mark.parametrize("products", ["dense", "sparse"])
def test_hand_written_relu_gradients_match_autograd(monkeypatch, products):
    from monoscope import sae as sae_module

    monkeypatch.setattr(sae_module, "SPARSE_MAX_DENSITY", 1.0 if products == "sparse" else -1.0)
    sae = make_sae("relu").double()
    with torch.no_grad():
        sae.b_enc.normal_()  # some features off, some on: the sparse products must skip the right ones
        sae.b_dec.normal_()
    x = torch.randn(40, 16, dtype=torch.float64)
    expected = sae.training_losses(x, 0.3)
    expected["loss"].backward()
    autograd = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sae.zero_grad(set_to_none=True)
    terms = sae.relu_losses_and_grads(x, 0.3)
    assert 0.1 < (terms["f"] > 0).double().mean() < 0.9
    for key in ("mse", "l1", "loss", "l0"):
        assert torch.allclose(terms[key].double(), expected[key].double()), key
    assert torch.equal(terms["fire_counts"], expected["fire_counts"]) and torch.equal(terms["fire_counts"], (terms["f"] > 0).sum(0))
    for name, p in sae.named_parameters():
        assert torch.allclose(p.grad, autograd[name]), name
    with pytest.raises(ValueError, match="relu only"):
        make_sae("topk", k=2).relu_losses_and_grads(x.float(), 0.3)


@pytest.fixture
def exported(tmp_path):
    """One checkpoint per architecture, with non-trivial biases and scale, and its export."""
    from monoscope.saelens_export import export_saelens

    x = torch.randn(50, 16)
    cases = {}
    for architecture in ARCHITECTURES:
        sae = make_sae(architecture, k=4, norm_scale=0.37, jumprelu_init_threshold=0.05, source_attrs={"hook": "h"})
        if architecture == "batchtopk":
            sae.threshold.fill_(0.05)
        sae.eval().save(tmp_path / architecture)
        out = export_saelens(tmp_path / architecture, tmp_path / f"{architecture}_saelens")
        cases[architecture] = (out, sae.encode(x), sae(x))
    return x, cases


def test_saelens_export_layout_and_folded_weights(exported):
    from safetensors.torch import load_file

    x, cases = exported
    expected_architecture = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}
    for architecture, (out, f, x_hat) in cases.items():
        assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
        cfg = json.loads((out / "cfg.json").read_text())
        assert cfg["architecture"] == expected_architecture[architecture]
        assert (cfg["d_in"], cfg["d_sae"], cfg["normalize_activations"], cfg["apply_b_dec_to_input"]) == (16, 64, "none", True)
        assert cfg["metadata"]["hook_name"] == "h"
        w = load_file(out / "sae_weights.safetensors")
        shapes = {"W_enc": (16, 64), "b_enc": (64,), "W_dec": (64, 16), "b_dec": (16,)}
        if cfg["architecture"] == "jumprelu":
            shapes["threshold"] = (64,)
        assert {k: tuple(v.shape) for k, v in w.items()} == shapes
        # SAELens's forward on raw activations (its documented encode/decode) reproduces ours.
        pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
        if cfg["architecture"] == "standard":
            f_saelens = torch.relu(pre)
        elif cfg["architecture"] == "topk":
            values, indices = pre.topk(cfg["k"], dim=-1)
            f_saelens = torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))
        else:
            f_saelens = torch.relu(pre) * (pre > w["threshold"])
        assert torch.allclose(f_saelens, f, atol=1e-5), architecture
        assert torch.allclose(f_saelens @ w["W_dec"] + w["b_dec"], x_hat, atol=1e-4), architecture


def test_saelens_loads_the_export(exported, tmp_path):
    """The real round trip, in a SAELens environment of its own (built once, cached)."""
    from monoscope.saelens_export import ensure_saelens_env

    x, cases = exported
    torch.save({"x": x, **{a: (str(out), f, x_hat) for a, (out, f, x_hat) in cases.items()}}, tmp_path / "cases.pt")
    check = (
        "import sys, torch\n"
        "from sae_lens import SAE\n"
        "cases = torch.load(sys.argv[1], weights_only=False); x = cases.pop('x')\n"
        "for arch, (out, f, x_hat) in cases.items():\n"
        "    sae = SAE.load_from_disk(out)\n"
        "    assert torch.allclose(sae.encode(x), f, atol=1e-5), arch\n"
        "    assert torch.allclose(sae.decode(sae.encode(x)), x_hat, atol=1e-4), arch\n"
        "    print(arch, type(sae).__name__)\n"
    )
    result = subprocess.run([ensure_saelens_env(), "-c", check, tmp_path / "cases.pt"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    loaded = dict(zip(result.stdout.split()[::2], result.stdout.split()[1::2]))
    assert loaded == {"relu": "StandardSAE", "topk": "TopKSAE", "jumprelu": "JumpReLUSAE", "batchtopk": "JumpReLUSAE"}
