"""Neuroscope for neurons and SAE features: one streaming pass per dictionary over the held-out stores.

The pass keeps, per unit (a neuron or a feature), state whose size does not depend on the number of
tokens read:
    top       the top_k sequences by the unit's maximum in them, with the activations around that token
    quantile  per_bin sequences drawn (seeded, uniformly) from each of quantile_bins activation intervals
    histogram activation counts in histogram_bins bins on (0, max] (+1 bin for "inactive", <= 0), for all
              tokens and, per concept, for the tokens the concept labels: AUROC per concept follows
(density, mean and max are the evaluation's, computed once per dictionary: monoscope.dictionary.read_unit_stats)
so memory is O(d_sae * ((top_k + quantile_bins * per_bin) * window + (n_concepts + 1) * histogram_bins)).
The same pass keeps the exact activations of `probe_seqs` sampled sequences (monoscope.concept_comparison:
entries for sparse dictionaries, O(probe_seqs * context * L0)) for the held-out features-versus-neurons
comparison: single-unit exact AUROC, k-sparse probes and per-unit specificity.

Then, from the weights: logit weights through the direct path, the loss change when a unit is zeroed
(for the densest units and a configured list), the cosine of each neuron's input and output weights,
the neurons a feature draws on, and how similar rare features are to each other.

Everything lands in results/features/<name>/ (written to a temporary directory, renamed when whole):
    units.parquet   one row per unit: density, activations, best concept, AUROC per concept (binned, all tokens),
                    held-out exact AUROC per concept, specificity per threshold, ablation, ...
    examples.npz    top and quantile examples (values, token windows, activation windows), histograms
    weights.npz     logit weights (top/bottom tokens), neighbours between features and neurons
    summary.json    settings, provenance, held-out comparison per concept (best unit, k-sparse probes, bootstrap
                    intervals) and specificity distribution, rare-feature statistics, timings
    rare_features.png (SAEs only)
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from monoscope import __version__, concept_comparison, store
from monoscope.config import NEURONS
from monoscope.dictionary import UNIT_STAT_COLUMNS, open_dictionary, read_unit_stats
from monoscope.lm_weights import LMWeights, read_weights
from monoscope.probes import DEFAULT_CONCEPTS, ConceptLabeler, auroc_from_histograms, compile_concepts
from monoscope.atomic import atomic_path, savefig

NEURON_BASIS_HOOKS = ("mlp.hook_post", "mlp.hook_pre")  # the stored coordinates are the neurons
RESIDUAL_HOOKS = ("hook_mlp_out", "mlp.hook_out")  # the stored vectors are written to the residual stream


@dataclass(frozen=True)
class FeatureSettings:
    """The `features` config section and the run's seed; workflow/schemas/config.schema.yaml documents
    each key and holds its default (build with monoscope.config.settings_from)."""

    SECTION: ClassVar[str] = "features"

    top_k: int  # max-activating sequences kept per unit
    quantile_bins: int  # activation intervals (equal width on [0, max]) sampled from
    per_bin: int  # sequences sampled per interval
    context_tokens: int  # tokens shown either side of the example's activating token
    histogram_bins: int  # activation histogram bins per unit (also the resolution of the all-token AUROC)
    logit_tokens: int  # top and bottom tokens of the logit weights
    neighbours: int  # neurons listed per feature, features per neuron
    ablation_top: int  # ablate this many of the densest units
    ablation_units: list[int]  # and these
    ablation_seqs: int  # held-out sequences the ablation loss is measured on
    max_seqs: int | None  # held-out sequences read by the pass (None: all)
    block_mib: int  # memory for one block of unit activations; sets the sequences per block
    rare_log10_density: float  # features below this log10 density count as rare
    rare_sample: int  # features sampled per group for the similarity figure
    seed: int  # the config's seed: the probe split, quantile sampling, rare-feature sample
    concepts: list[dict[str, str]] | None  # None: the built-ins for Python source (monoscope.probes.DEFAULT_CONCEPTS)
    probe_seqs: int  # held-out sequences whose exact activations the held-out comparison keeps
    probe_report_fraction: float  # of those, the report part; the rest is the selection part
    probe_k: list[int]  # units per k-sparse probe
    probe_bootstrap: int  # resamples of the report part's sequences for the AUROC intervals
    specificity_thresholds: list[float]  # tau: activation > tau * max
    specificity_min_tokens: int  # a unit counts at a tau when this many report tokens pass it

    @property
    def concept_list(self) -> list[dict[str, str]]:
        return [dict(c) for c in DEFAULT_CONCEPTS] if self.concepts is None else self.concepts

    @property
    def window(self) -> int:
        return 2 * self.context_tokens + 1


# --- the streaming pass ---------------------------------------------------------------------------


def _topk_dim1(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """topk over dim 1 of [G, n, d], computed along a contiguous last dimension (several times faster)."""
    values, indices = x.transpose(1, 2).contiguous().topk(k, dim=-1)
    return values.transpose(1, 2), indices.transpose(1, 2)


class _Examples:
    """Per group and unit, the `size` entries with the largest keys seen, with their activation windows.

    Slots are unordered until `sorted()`: a block only writes the slots its accepted candidates evict,
    so after the first blocks (when few candidates beat the running minimum) an offer costs little.
    """

    def __init__(self, groups: int, size: int, d_sae: int, window: int):
        self.key = torch.full((groups, size, d_sae), -torch.inf)
        self.value = torch.zeros(groups, size, d_sae)
        self.seq = torch.full((groups, size, d_sae), -1, dtype=torch.int64)  # global sequence index; -1: empty slot
        self.pos = torch.zeros(groups, size, d_sae, dtype=torch.int64)
        self.windows = torch.zeros(groups, size, d_sae, window, dtype=torch.float16)

    def offer(self, key, value, f, first_seq: int, context_tokens: int) -> None:
        """Candidates are the block's sequences: key [G, b, d] per group (-inf: not a candidate), value [b, d];
        f [b, s, d] the block. An accepted sequence's example is centred on its maximum for the unit."""
        groups, size, d = self.key.shape
        key, order = _topk_dim1(key, min(size, key.shape[1]))  # [G, take, d]: no more than `size` can enter
        merged = torch.cat([self.key, key], dim=1)
        in_final = torch.zeros_like(merged, dtype=torch.bool).scatter_(1, _topk_dim1(merged, size)[1], True)
        accepted = in_final[:, size:] & (key > -torch.inf)  # [G, take, d]
        if not accepted.any():
            return
        evicted = ~in_final[:, :size]  # [G, size, d]: as many as the new entries in the final set
        evicted_rank = evicted.long().cumsum(1) - 1
        slot_of_rank = torch.zeros(groups, size, d, dtype=torch.int64)
        g_e, k_e, u_e = evicted.nonzero(as_tuple=True)
        slot_of_rank[g_e, evicted_rank[g_e, k_e, u_e], u_e] = k_e
        g, j, u = accepted.nonzero(as_tuple=True)  # the j-th accepted candidate takes the j-th evicted slot
        rank = accepted.long().cumsum(1)[g, j, u] - 1
        slot = slot_of_rank[g, rank, u]
        local_seq = order[g, j, u]
        token = f[local_seq, :, u].argmax(dim=1)  # only for accepted pairs: a dense argmax costs ~8x a max
        self.key[g, slot, u] = key[g, j, u]
        self.value[g, slot, u] = value[local_seq, u]
        self.seq[g, slot, u] = local_seq + first_seq
        self.pos[g, slot, u] = token
        positions = token[:, None] + torch.arange(-context_tokens, context_tokens + 1)  # [n, W]
        inside = (positions >= 0) & (positions < f.shape[1])
        windows = f[local_seq[:, None], positions.clamp(0, f.shape[1] - 1), u[:, None]] * inside  # zeros past the edges
        self.windows[g, slot, u] = windows.half()

    def sorted(self) -> dict[str, torch.Tensor]:
        """Entries in descending key order per group and unit: value/seq/pos [G, size, d], windows [G, size, d, W]."""
        order = self.key.argsort(dim=1, descending=True, stable=True)
        windows = self.windows.gather(1, order[..., None].expand_as(self.windows))
        return {"value": self.value.gather(1, order), "seq": self.seq.gather(1, order), "pos": self.pos.gather(1, order),
                "windows": windows}


class StreamingAnalysis:
    """Everything the one pass over the held-out activations accumulates; see the module docstring."""

    def __init__(self, d_sae: int, settings: FeatureSettings, upper: torch.Tensor, n_concepts: int,
                 probe_sample: concept_comparison.ProbeSample | None = None):
        """upper [d_sae]: the top of the histogram and of the quantile intervals (the evaluation's maximum;
        larger activations count in the top bin), fixed before the pass so results do not depend on block size.
        probe_sample: keeps the exact activations of the held-out comparison's sequences."""
        self.settings = settings
        self.probe_sample = probe_sample
        self.d_sae = d_sae
        self.upper = upper.float().clamp_min(1e-6)
        n_bins = settings.histogram_bins + 1
        # Bin 0 (inactive) is never counted: it is what the tokens minus the other bins leave.
        self.active_histogram = torch.zeros(d_sae * n_bins, dtype=torch.int64)
        self.active_concept_histograms = torch.zeros(n_concepts, d_sae * n_bins, dtype=torch.int64)
        self.concept_tokens = torch.zeros(n_concepts, dtype=torch.int64)
        self.n_tokens = 0
        self.n_seq = 0
        self.top = _Examples(1, settings.top_k, d_sae, settings.window)
        self.quantile = _Examples(settings.quantile_bins, settings.per_bin, d_sae, settings.window)
        self.generator = torch.Generator().manual_seed(settings.seed)

    @torch.no_grad()
    def update(self, f: torch.Tensor, labels: torch.Tensor | None) -> None:
        """f [b, s, d_sae] unit activations of the next b sequences; labels bool [b, s, n_concepts]."""
        settings, (b, s, d) = self.settings, f.shape
        flat = f.reshape(b * s, d)
        active = flat > 0
        token, unit = active.nonzero(as_tuple=True)  # only active entries are counted: SAEs are sparse
        values = flat[token, unit]
        self.n_tokens += b * s
        h = settings.histogram_bins
        bins = (values / self.upper[unit] * h).ceil().clamp(1, h).long() + unit * (h + 1)  # flat (unit, bin) index
        self.active_histogram.index_add_(0, bins, torch.ones_like(bins))  # (no per-block zeroed bincount buffer)
        if labels is not None:
            labels = labels.reshape(b * s, -1)
            self.concept_tokens += labels.sum(0)
            entry, concept = labels[token].nonzero(as_tuple=True)  # active entries on tokens a concept labels
            size = self.active_concept_histograms.shape[1]
            self.active_concept_histograms.view(-1).index_add_(0, bins[entry] + concept * size, torch.ones_like(entry))
            if self.probe_sample is not None:
                self.probe_sample.add(self.n_seq, f, labels.view(b, s, -1))

        seq_max = f.amax(dim=1)  # [b, d]
        ctx = settings.context_tokens
        self.top.offer(seq_max[None], seq_max, f, self.n_seq, ctx)
        q = settings.quantile_bins
        interval = (seq_max / self.upper * q).floor().clamp(0, q - 1)  # [b, d]
        key = -torch.rand(b, d, generator=self.generator)  # uniform: the largest `per_bin` keys are a uniform sample
        in_interval = (interval[None] == torch.arange(q)[:, None, None]) & (seq_max > 0)  # [Q, b, d]
        self.quantile.offer(torch.where(in_interval, key, -torch.inf), seq_max, f, self.n_seq, ctx)
        self.n_seq += b

    def _with_inactive_bin(self, active: torch.Tensor, tokens) -> torch.Tensor:
        histogram = active.reshape(-1, self.d_sae, self.settings.histogram_bins + 1).clone()
        histogram[..., 0] = torch.as_tensor(tokens).reshape(-1, 1) - histogram.sum(-1)
        return histogram

    def histogram(self) -> torch.Tensor:
        """[d_sae, histogram_bins + 1]: bin 0 counts inactive tokens (<= 0, as for density; GELU's small
        negative values included), bins 1..H split (0, upper]; larger values count in bin H."""
        return self._with_inactive_bin(self.active_histogram, self.n_tokens)[0]

    def aurocs(self) -> np.ndarray:
        """[n_concepts, d_sae]."""
        positives = self._with_inactive_bin(self.active_concept_histograms, self.concept_tokens)
        return auroc_from_histograms(positives, self.histogram(), self.concept_tokens, self.n_tokens).numpy()


def seqs_per_block(d_sae: int, context: int, block_mib: int) -> int:
    """Sequences whose unit activations and per-token bookkeeping (bin indices, padded copy: ~32 bytes
    per token and unit) fit in block_mib."""
    bytes_per_seq = context * d_sae * 32
    return max(1, int(block_mib * 2**20 // bytes_per_seq))


class Codes:
    """The evaluation's codes of the first n_seq held-out sequences (evaluate.FeatureStats.save_codes)."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            self.indptr, self.indices, self.values = (f.get_tensor(k) for k in ("indptr", "indices", "values"))
        self.n_seq, self.context, self.d_sae = int(meta["n_seq"]), int(meta["context"]), int(meta["d_sae"])
        self.indices = self.indices.long()

    def dense(self, first_seq: int, n_seq: int) -> torch.Tensor:
        """f [n_seq, context, d_sae] of sequences first_seq .. first_seq + n_seq - 1."""
        first_row, n_rows = first_seq * self.context, n_seq * self.context
        indptr = self.indptr[first_row : first_row + n_rows + 1]
        start, stop = int(indptr[0]), int(indptr[-1])
        with warnings.catch_warnings():  # "sparse CSR support is in beta": tested in test_features.py
            warnings.simplefilter("ignore", UserWarning)
            block = torch.sparse_csr_tensor(indptr - start, self.indices[start:stop], self.values[start:stop], (n_rows, self.d_sae))
            return block.to_dense().view(n_seq, self.context, self.d_sae)


def iter_unit_blocks(dictionary, stores: Sequence[store.ActivationStore], n_seq_block: int, max_seqs: int | None,
                     device: str = "cpu", codes: Codes | None = None) -> Iterable[tuple[np.ndarray, torch.Tensor]]:
    """(tokens [b, s], unit activations f [b, s, d_sae] on the CPU) over the stores, at most max_seqs sequences.
    Sequences the evaluation's codes cover are read from them, not encoded again."""
    budget = max_seqs if max_seqs is not None else sum(s.n_seq for s in stores)
    if codes is not None and codes.d_sae != dictionary.d_sae:
        raise ValueError(f"the evaluation's codes have {codes.d_sae} units but the dictionary has {dictionary.d_sae}")
    covered = codes.n_seq if codes is not None else 0
    done = 0
    for activation_store in stores:
        for tokens, acts in store.iter_sequence_blocks(activation_store, n_seq_block):
            if done >= budget:
                return
            tokens, acts = tokens[: budget - done], acts[: budget - done]
            if done + len(tokens) <= covered:
                f = codes.dense(done, len(tokens))
            else:
                with torch.no_grad():
                    f = dictionary.encode(torch.from_numpy(acts).to(device)).float().cpu()
            done += len(tokens)
            yield tokens, f


def run_pass(dictionary, stores, settings: FeatureSettings, upper: torch.Tensor, labeler: ConceptLabeler | None,
             device: str = "cpu", desc: str = "features", codes: Codes | None = None) -> tuple[StreamingAnalysis, np.ndarray]:
    """The streaming pass; also returns the held-out tokens read, int32 [n_seq, context] (to render examples)."""
    n_concepts = len(labeler.concepts) if labeler else 0
    total = min(settings.max_seqs or np.inf, sum(s.n_seq for s in stores))
    probe_sample = None
    if n_concepts:  # the same seed and held-out stores give every dictionary the same split
        split = concept_comparison.split_sequences(total, settings.probe_seqs, settings.probe_report_fraction, settings.seed)
        probe_sample = concept_comparison.ProbeSample(split, dictionary.d_sae, n_concepts)
    analysis = StreamingAnalysis(dictionary.d_sae, settings, upper, n_concepts, probe_sample)
    block = seqs_per_block(dictionary.d_sae, stores[0].context, settings.block_mib)
    token_blocks = []
    progress = tqdm(total=total, desc=desc, mininterval=10)
    for tokens, f in iter_unit_blocks(dictionary, stores, block, settings.max_seqs, device, codes):
        labels = torch.from_numpy(labeler(tokens)) if labeler else None
        analysis.update(f, labels)
        token_blocks.append(tokens)
        progress.update(len(tokens))
    progress.close()
    if analysis.n_seq == 0:
        raise ValueError("the held-out activation stores hold no sequences")
    return analysis, np.concatenate(token_blocks)


def window_tokens(tokens: np.ndarray, seq: np.ndarray, pos: np.ndarray, context_tokens: int) -> np.ndarray:
    """Token ids around (seq, pos) [...] -> [..., window]; -1 outside the sequence or for empty slots."""
    padded = np.pad(tokens, ((0, 0), (context_tokens, context_tokens)), constant_values=-1)
    offsets = np.arange(2 * context_tokens + 1)
    out = padded[np.maximum(seq, 0)[..., None], pos[..., None] + offsets]
    out[seq < 0] = -1
    return out.astype(np.int32)


# --- from the weights -----------------------------------------------------------------------------


@torch.no_grad()
def unit_directions(dictionary, device: str = "cpu", chunk: int = 4096) -> torch.Tensor:
    """[d_sae, d_in] on the CPU: what one unit of each unit's activation adds to the reconstruction,
    decode(e_i) - decode(0) (the SAE's decoder row in the raw activation scale; e_i for neurons)."""
    zero = dictionary.decode(torch.zeros(1, dictionary.d_sae, device=device))
    rows = [(dictionary.decode(torch.eye(dictionary.d_sae, device=device)[i : i + chunk]) - zero).float().cpu()
            for i in range(0, dictionary.d_sae, chunk)]
    return torch.cat(rows)


def residual_directions(directions: torch.Tensor, lm: LMWeights, hook: str) -> tuple[torch.Tensor | None, str]:
    """Unit directions in the residual stream, and a note on how; None when the hook has no direct path."""
    if hook.endswith(NEURON_BASIS_HOOKS[0]):
        return lm.residual_direction(directions), "through W_out"
    if hook.endswith(RESIDUAL_HOOKS):
        return directions, "written to the residual stream directly"
    return None, f"hook '{hook}' has no direct path to the logits (only mlp.hook_post and MLP outputs have one)"


@torch.no_grad()
def logit_weights(resid: torch.Tensor, lm: LMWeights, n_tokens: int, chunk: int = 2048):
    """Top and bottom tokens of each direction's direct logit effect, over the tokenizer's ids.

    The final norm is folded in as its centring (LayerNorm only; RMSNorm does not centre) and its
    gain; its division by the residual norm depends on the token, so magnitudes are relative.
    Returns (top_ids, top_values, bottom_ids, bottom_values), [d_sae, n].
    """
    n = min(n_tokens, lm.w_u.shape[1])
    top_ids, top_values, bottom_ids, bottom_values = [], [], [], []
    for start in range(0, len(resid), chunk):
        logits = lm.final_norm_direction(resid[start : start + chunk]) @ lm.w_u  # [chunk, n_vocab]
        top = logits.topk(n, dim=-1)
        bottom = logits.topk(n, dim=-1, largest=False)
        top_ids.append(top.indices), top_values.append(top.values)
        bottom_ids.append(bottom.indices), bottom_values.append(bottom.values)
    return tuple(torch.cat(x).numpy() for x in (top_ids, top_values, bottom_ids, bottom_values))


def neuron_in_out_cosine(lm: LMWeights, hook: str) -> np.ndarray | None:
    """cos(w_in[:, i], w_out[i]) per neuron [d_mlp]: > 0 boosts its own input direction, < 0 erases it
    (memory management). Gated MLPs: w_in is the up projection."""
    if not hook.endswith(NEURON_BASIS_HOOKS):
        return None
    return F.cosine_similarity(lm.w_in.T, lm.w_out, dim=-1).numpy()


def neighbours(directions: torch.Tensor, n: int) -> dict[str, np.ndarray]:
    """For features in a neuron basis: the neurons each feature's direction loads on most, and the features
    loading most on each neuron. directions [d_sae, d_mlp]."""
    n_neurons = min(n, directions.shape[1])
    n_features = min(n, directions.shape[0])
    by_feature = directions.abs().topk(n_neurons, dim=1)
    by_neuron = directions.T.topk(n_features, dim=1)  # positive loadings: the features that write this neuron up
    return {
        "feature_neurons": by_feature.indices.numpy().astype(np.int32),
        "feature_neuron_weights": directions.gather(1, by_feature.indices).numpy(),
        "neuron_features": by_neuron.indices.numpy().astype(np.int32),
        "neuron_feature_weights": by_neuron.values.numpy(),
    }


def rare_feature_similarity(directions: torch.Tensor, log10_density: np.ndarray, threshold: float, sample: int,
                            seed: int) -> dict[str, Any]:
    """Cosine of each (sampled) rare and other feature to its nearest neighbour among rare and among other features.

    Anthropic found the low-density features to be far more similar to each other than the rest are.
    """
    unit = F.normalize(directions.float(), dim=-1)
    alive = np.isfinite(log10_density) & (log10_density > -10)
    rare = np.flatnonzero(alive & (log10_density < threshold))
    rest = np.flatnonzero(alive & (log10_density >= threshold))
    rng = np.random.default_rng(seed)

    def draw(ids):
        return np.sort(rng.choice(ids, size=min(sample, len(ids)), replace=False)) if len(ids) else ids

    groups = {"rare": draw(rare), "rest": draw(rest)}
    result: dict[str, Any] = {"threshold_log10_density": threshold, "n_rare": int(len(rare)), "n_rest": int(len(rest))}
    for a, ids_a in groups.items():
        for b, ids_b in groups.items():
            if len(ids_a) == 0 or len(ids_b) < 2:
                continue
            cos = unit[ids_a] @ unit[ids_b].T  # [na, nb]
            if a == b:
                cos.fill_diagonal_(-1.0)
            nearest = cos.max(dim=1).values.numpy()
            result[f"{a}_to_{b}_nearest_cos"] = nearest.tolist()
            result[f"{a}_to_{b}_mean_nearest_cos"] = float(nearest.mean())
    return result


def plot_rare_features(similarity: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(-0.2, 1, 49)
    for key, label in (("rare_to_rare", "rare → nearest rare"), ("rest_to_rest", "other → nearest other"),
                       ("rare_to_rest", "rare → nearest other")):
        values = similarity.get(f"{key}_nearest_cos")
        if values:
            ax.hist(values, bins=bins, alpha=0.55, density=True, label=f"{label} (n={len(values)})")
    ax.set_xlabel("cosine similarity of decoder directions to the nearest neighbour")
    ax.set_ylabel("density")
    ax.set_title(f"rare features (log10 density < {similarity['threshold_log10_density']:g}) vs the rest")
    ax.legend(fontsize=8)
    fig.tight_layout()
    savefig(fig, path, dpi=110)
    plt.close(fig)


# --- ablation -------------------------------------------------------------------------------------


@torch.no_grad()
def ablation_effects(bridge, dictionary, tokens: np.ndarray, hook: str, units: Sequence[int],
                     directions: torch.Tensor, device: str = "cpu") -> dict[int, float]:
    """Mean held-out loss change when each unit is zeroed at the hook (the rest of the activation, the
    SAE's error included, kept): loss(ablated) - loss(clean), nats per token."""
    from monoscope import models, pretrained

    batch = torch.from_numpy(tokens).long().to(device)
    acts = pretrained.run_to_hook(bridge, batch, hook)  # [b, s, d_in]
    f = dictionary.encode(acts.float())[..., list(units)]  # [b, s, n_units]; upstream of the hook is unchanged
    clean = models.loss_with_hook(bridge, batch, hook, None).mean().item()
    effects = {}
    for j, unit in enumerate(units):
        removed = f[..., j : j + 1] * directions[unit]  # [b, s, d_in]

        def ablate(act, removed=removed):
            return act - removed.to(act.dtype)

        effects[int(unit)] = models.loss_with_hook(bridge, batch, hook, ablate).mean().item() - clean
    return effects


# --- the whole analysis for one dictionary --------------------------------------------------------


def analyse_dictionary(settings: FeatureSettings, model: dict[str, Any], model_dir: str | Path, hook: str, name: str,
                       sae_dir: str | Path | None, *, tokenizer_dir: str | Path, eval_stores: Sequence[str | Path],
                       unit_stats: str | Path, eval_codes: str | Path | None, out_dir: str | Path, log=print) -> dict[str, Any]:
    """Write results/features/<name>/ for one dictionary ("neurons" or an SAE checkpoint in sae_dir), with the
    model (the `model` config section, its outputs in model_dir) hooked at `hook`. unit_stats: the evaluation's
    per-unit statistics (dictionary.read_unit_stats); eval_codes: its codes of the held-out tokens, reused
    where they cover the pass."""
    from monoscope import models, tokenize
    from monoscope.runtime import device as pick_device

    device = pick_device()
    stores = [store.open_activations(p) for p in eval_stores]
    strings = tokenize.token_strings(tokenizer_dir)
    bridge = models.load_model(model, model_dir)
    inputs = PassInputs(
        name=name,
        dictionary=open_dictionary(name, sae_dir, stores[0].d, device),
        stores=stores,
        stats=read_unit_stats(unit_stats),
        labeler=ConceptLabeler(compile_concepts(settings.concept_list), strings),
        bridge=bridge,
        lm=read_weights(bridge, int(hook.split(".")[1]), n_vocab=len(strings)),
        hook=hook,
        device=device,
        codes=Codes(eval_codes) if eval_codes is not None else None,
    )
    if len(inputs.stats) != inputs.dictionary.d_sae:
        raise ValueError(f"{unit_stats} has {len(inputs.stats)} units but dictionary '{name}' has {inputs.dictionary.d_sae}")
    result = analyse(inputs, settings)
    write_outputs(result, out_dir, provenance={
        "name": name, "hook": hook, "eval_stores": [str(p) for p in eval_stores], "sae_dir": str(sae_dir) if sae_dir else None,
        "package_version": __version__, "store_attrs": stores[0].attrs,
    })
    log(json.dumps(result["summary"]["timings"]))
    return result["summary"]


@dataclass(frozen=True)
class PassInputs:
    """What the analyses of one dictionary read."""

    name: str
    dictionary: torch.nn.Module  # monoscope.dictionary.open_dictionary
    stores: Sequence[store.ActivationStore]  # the held-out activation stores
    stats: pd.DataFrame  # the evaluation's per-unit statistics: density, mean and max activation
    labeler: ConceptLabeler
    bridge: Any  # the model, for ablations
    lm: LMWeights  # its weights in TransformerLens orientation, for logit weights and neuron geometry
    hook: str
    device: str = "cpu"
    codes: Codes | None = None  # the evaluation's codes of the held-out tokens


def unit_table(stats: pd.DataFrame) -> pd.DataFrame:
    """One row per unit from the evaluation's statistics (computed once per dictionary, read by every stage)."""
    return pd.DataFrame({"unit": stats["feature"].to_numpy(), **{k: stats[k].to_numpy() for k in UNIT_STAT_COLUMNS}})


def concept_columns(analysis: StreamingAnalysis, labeler: ConceptLabeler, settings: FeatureSettings,
                    units: pd.DataFrame) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Adds each unit's best concept (all tokens, binned) and held-out columns to `units`; returns the
    per-concept summary and the held-out comparison."""
    if not len(labeler.concepts):
        return {}, None
    aurocs = analysis.aurocs()  # [C, d_sae]
    filled = np.nan_to_num(aurocs, nan=-1.0)
    units["best_concept"] = [labeler.names[c] for c in filled.argmax(0)]  # describes a unit: all tokens, binned
    units["best_concept_auroc"] = filled.max(0)
    for c, concept in enumerate(labeler.names):
        units[f"auroc_{concept}"] = aurocs[c]
    held_out = held_out_comparison(analysis, labeler.names, settings, units)
    summary = {}
    for c, concept in enumerate(labeler.names):
        single = held_out["concepts"][concept]["single_unit"] or {}
        summary[concept] = {"positive_fraction": float(analysis.concept_tokens[c]) / analysis.n_tokens,
                            "best_unit": single.get("unit"), "best_auroc": single.get("auroc", float("nan")),
                            "sparse_probe": held_out["concepts"][concept]["sparse_probe"]}
    return summary, held_out


def weight_analyses(inputs: PassInputs, settings: FeatureSettings, directions: torch.Tensor,
                    units: pd.DataFrame) -> tuple[dict[str, np.ndarray], str]:
    """Logit weights, and neuron geometry (w_in/w_out cosines, added to `units`) or neighbours; with a note
    on how the logit weights were computed."""
    lm, hook = inputs.lm, inputs.hook
    resid, logit_note = residual_directions(directions, lm, hook)
    weights: dict[str, np.ndarray] = {}
    if resid is not None:
        top_ids, top_values, bottom_ids, bottom_values = logit_weights(resid, lm, settings.logit_tokens)
        weights.update(logit_top_ids=top_ids, logit_top_values=top_values, logit_bottom_ids=bottom_ids, logit_bottom_values=bottom_values)
        logit_note += f", {lm.final_norm} final norm folded in"
        if lm.layer < lm.n_layers - 1:
            logit_note += "; approximate: later layers also read this direction"
    else:
        logit_note = f"none: {logit_note}"
    if inputs.name == NEURONS:
        cosine = neuron_in_out_cosine(lm, hook)
        if cosine is not None:
            units["cos_in_out"] = cosine
    elif hook.endswith(NEURON_BASIS_HOOKS):
        weights.update(neighbours(directions, settings.neighbours))
    return weights, logit_note


def ablated_units(density: np.ndarray, settings: FeatureSettings) -> list[int]:
    """The ablation_top densest units, then the configured ones; each must exist."""
    units = list(dict.fromkeys([int(u) for u in np.argsort(-density, kind="stable")[: settings.ablation_top]]
                               + list(settings.ablation_units)))
    for unit in units:
        if not 0 <= unit < len(density):
            raise ValueError(f"config key 'features.ablation_units': unit {unit} is outside [0, {len(density)})")
    return units


def example_arrays(analysis: StreamingAnalysis, tokens: np.ndarray, settings: FeatureSettings) -> dict[str, np.ndarray]:
    """examples.npz: histograms, and the top and quantile examples per unit with their token windows."""
    examples = {"histogram": analysis.histogram().numpy().astype(np.int32), "histogram_upper": analysis.upper.numpy()}
    for label, examples_kept in (("top", analysis.top), ("quantile", analysis.quantile)):
        kept = examples_kept.sorted()  # [G, n, d_sae]; flattened interval-major for the quantile samples
        seq = kept["seq"].permute(2, 0, 1).flatten(1).numpy()  # [d_sae, G * n]
        pos = kept["pos"].permute(2, 0, 1).flatten(1).numpy()
        examples[f"{label}_values"] = kept["value"].permute(2, 0, 1).flatten(1).numpy()
        examples[f"{label}_windows"] = kept["windows"].permute(2, 0, 1, 3).flatten(1, 2).numpy()  # [d_sae, G * n, W]
        examples[f"{label}_tokens"] = window_tokens(tokens, seq, pos, settings.context_tokens)
        examples[f"{label}_seq"] = seq
    examples["quantile_interval"] = np.repeat(np.arange(settings.quantile_bins), settings.per_bin).astype(np.int32)
    return examples


def analyse(inputs: PassInputs, settings: FeatureSettings) -> dict[str, Any]:
    """The analyses, in memory: {"units": DataFrame, "examples": {..}, "weights": {..}, "summary": {..}, "rare": {..}|None}."""
    name, dictionary, device = inputs.name, inputs.dictionary, inputs.device
    timings = {}
    start = time.perf_counter()
    upper = torch.from_numpy(inputs.stats["max_activation"].to_numpy(np.float32, copy=True))
    analysis, tokens = run_pass(dictionary, inputs.stores, settings, upper, inputs.labeler, device,
                                desc=f"features {name}", codes=inputs.codes)
    timings["pass_s"] = time.perf_counter() - start
    timings["pass_tokens_per_s"] = analysis.n_tokens / timings["pass_s"]
    units = unit_table(inputs.stats)

    start = time.perf_counter()
    concept_summary, held_out = concept_columns(analysis, inputs.labeler, settings, units)
    if held_out is not None:
        timings["held_out_s"] = time.perf_counter() - start

    start = time.perf_counter()
    directions = unit_directions(dictionary, device)  # [d_sae, d_in]
    weights, logit_note = weight_analyses(inputs, settings, directions, units)
    timings["weights_s"] = time.perf_counter() - start

    start = time.perf_counter()
    ablated = ablated_units(units["density"].to_numpy(), settings)
    effects = ablation_effects(inputs.bridge, dictionary, tokens[: settings.ablation_seqs], inputs.hook, ablated,
                               directions.to(device), device)
    units["ablation_delta_loss"] = [effects.get(u, np.nan) for u in range(dictionary.d_sae)]
    timings["ablation_s"] = time.perf_counter() - start

    rare = None
    if name != NEURONS:
        rare = rare_feature_similarity(directions, units["log10_density"].to_numpy(), settings.rare_log10_density,
                                       settings.rare_sample, settings.seed)
    summary = {
        "name": name,
        "d_sae": dictionary.d_sae,
        "settings": asdict(settings),
        "n_tokens": analysis.n_tokens,
        "n_seq": analysis.n_seq,
        "logit_weights": logit_note,
        "concepts": concept_summary,  # held out: best unit chosen on the selection part, scored on the report part
        "held_out": held_out,
        "ablated_units": ablated,
        "clean_vs_ablation": "loss(unit zeroed) - loss(clean), mean nats per token",
        "rare_features": {k: v for k, v in (rare or {}).items() if not k.endswith("_nearest_cos")} or None,
        "timings": timings,
    }
    return {"units": units, "examples": example_arrays(analysis, tokens, settings), "weights": weights,
            "summary": summary, "rare": rare}


def held_out_comparison(analysis: StreamingAnalysis, names: Sequence[str], settings: FeatureSettings,
                        units: pd.DataFrame) -> dict[str, Any]:
    """monoscope.concept_comparison on the pass's probe sample; adds each unit's held-out exact AUROC per concept
    and its specificity per threshold to `units`, returns the per-concept and specificity summaries."""
    selection, report = analysis.probe_sample.finish()
    result = concept_comparison.compare(selection, report, names, settings.probe_k, settings.specificity_thresholds,
                                        settings.specificity_min_tokens, settings.probe_bootstrap, settings.seed)
    for c, concept in enumerate(names):
        units[f"heldout_auroc_{concept}"] = result["units"]["exact_auroc_report"][c]
    for tau, values in result["units"]["specificity"].items():
        units[f"specific_concept_tau{tau:g}"] = [names[c] for c in values["concept"]]
        units[f"specific_precision_tau{tau:g}"] = values["precision"]
        units[f"specific_recall_tau{tau:g}"] = values["recall"]
    return {key: value for key, value in result.items() if key != "units"}


def write_outputs(result: dict[str, Any], out_dir: str | Path, provenance: dict[str, Any]) -> None:
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        result["units"].to_parquet(tmp / "units.parquet", index=False)
        np.savez(tmp / "examples.npz", **result["examples"])
        np.savez(tmp / "weights.npz", **result["weights"])
        if result["rare"] is not None:
            plot_rare_features(result["rare"], tmp / "rare_features.png")
        summary = {**result["summary"], "provenance": provenance}
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1, default=str))


def load_features(features_dir: str | Path) -> dict[str, Any]:
    """What analyse_dictionary wrote: {"units": DataFrame, "examples": {..}, "weights": {..}, "summary": {..}}."""
    path = Path(features_dir)
    if not (path / "summary.json").exists():
        raise FileNotFoundError(f"no feature analysis in {path} (expected summary.json)")
    with np.load(path / "examples.npz") as examples, np.load(path / "weights.npz") as weights:
        return {"units": pd.read_parquet(path / "units.parquet"), "examples": dict(examples), "weights": dict(weights),
                "summary": json.loads((path / "summary.json").read_text())}
