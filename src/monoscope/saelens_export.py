"""Export a monoscope SAE checkpoint in SAELens's on-disk format (SAELens >= 6).

SAELens loads a directory holding `cfg.json` and `sae_weights.safetensors` with
`sae_lens.SAE.load_from_disk(path)`. Its SAEs work on raw activations, so the normalisation
constant c is folded into the weights: with x_n = c·x,

    pre   = (c·x - b_dec) @ W_enc + b_enc = (x - b_dec/c) @ (c·W_enc) + b_enc
    x_hat = (f @ W_dec + b_dec) / c       = f @ (W_dec/c) + b_dec/c

Architectures map to SAELens's: relu -> standard, topk -> topk, jumprelu -> jumprelu, and
batchtopk -> jumprelu with its inference threshold on every feature (what SAELens itself does
when it saves a BatchTopK SAE).

    python -m monoscope.saelens_export results/sae/x8_l1-5 exported/x8_l1-5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import torch
from safetensors.torch import save_file

from monoscope.sae import load_sae
from monoscope.atomic import atomic_path, write_text

SAELENS_WEIGHTS_FILE = "sae_weights.safetensors"
SAELENS_CONFIG_FILE = "cfg.json"
SAELENS_VERSION = "6.54.12"
DEFAULT_SAELENS_VENV = Path(os.environ.get("MONOSCOPE_SAELENS_VENV", Path.home() / ".cache" / "monoscope" / "saelens-venv"))
SAELENS_ARCHITECTURE = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}


def export_saelens(sae_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write `out_dir`/{cfg.json, sae_weights.safetensors} for the SAE in `sae_dir`; return out_dir."""
    sae = load_sae(sae_dir)
    cfg = sae.cfg
    c = cfg.norm_scale
    tensors = {
        "W_enc": sae.W_enc.detach() * c,  # [d_in, d_sae]
        "b_enc": sae.b_enc.detach().clone(),  # [d_sae]
        "W_dec": sae.W_dec.detach() / c,  # [d_sae, d_in]
        "b_dec": sae.b_dec.detach() / c,  # [d_in]
    }
    if cfg.architecture == "jumprelu":
        tensors["threshold"] = sae.log_threshold.detach().exp()
    elif cfg.architecture == "batchtopk":
        tensors["threshold"] = sae.threshold.detach().expand(cfg.d_sae).clone()
    attrs = cfg.source_attrs
    saelens_cfg = {
        "architecture": SAELENS_ARCHITECTURE[cfg.architecture],
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",  # the constant is folded into the weights above
        "reshape_activations": "none",
        "metadata": {
            "model_name": attrs.get("model_id"),
            "hook_name": attrs.get("hook"),
            "hook_head_index": None,
            "sae_lens_training_version": None,
            "monoscope_checkpoint": str(sae_dir),
            "monoscope_norm_scale": c,
            "tokens_seen": cfg.tokens_seen,
        },
    }
    if cfg.architecture == "topk":
        saelens_cfg["k"] = cfg.k
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / SAELENS_WEIGHTS_FILE) as tmp:
        save_file({k: v.to(torch.float32).contiguous() for k, v in tensors.items()}, str(tmp))
    write_text(out / SAELENS_CONFIG_FILE, json.dumps(saelens_cfg, indent=2) + "\n")
    return out


def ensure_saelens_env(venv: str | os.PathLike = DEFAULT_SAELENS_VENV) -> Path:
    """A virtual environment with SAELens of its own; returns its python. Built once, then reused.

    SAELens pins transformer-lens < 4, which monoscope's environment cannot hold, hence its own
    environment. It borrows this environment's packages (torch above all, a multi-GiB download)
    through a .pth file placed after its own site-packages, so only what SAELens needs beyond
    them is installed, and its own versions take precedence.
    """
    venv = Path(venv)
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import sae_lens"], capture_output=True).returncode == 0:
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())  # fmt: skip
    (site / "zz_monoscope_borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([python, "-m", "pip", "install", "--quiet", f"sae-lens=={SAELENS_VERSION}"], check=True)
    return python


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Export a monoscope SAE checkpoint for sae_lens.SAE.load_from_disk.")
    parser.add_argument("sae_dir", help="directory with sae.safetensors + cfg.json")
    parser.add_argument("out_dir", help="directory to write cfg.json + sae_weights.safetensors into")
    args = parser.parse_args(argv)
    print(export_saelens(args.sae_dir, args.out_dir))


if __name__ == "__main__":
    main()
