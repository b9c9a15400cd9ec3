"""Train sparse autoencoders on a stream of activation batches.

The loop knows nothing of language models: it draws float32 [batch, d_in] tensors from
`batches(start)`, a function that yields the batches from number `start` on (so a resumed run
draws exactly the batches an uninterrupted one would). Several SAEs can share one pass over the
data (an L1 sweep at one size, say): each gets the same batches, its own optimiser parameter group,
schedules and resampling.

The recipe (Bricken et al. 2023, "Towards Monosemanticity"), every number a TrainConfig field:
  - inputs scaled by one constant so that E||x||^2 = d_in over a sample of the data;
  - b_dec initialised to the geometric median of that sample;
  - decoder rows at unit norm: gradient parallel to each row removed before the Adam step,
    rows renormalised after it;
  - L1 penalty with an optional linear warm-up; learning rate with linear warm-up and a linear
    decay to zero at the end, both pure functions of the step;
  - neuron resampling at `resample_steps`.

Runs under `accelerate launch` (data parallel) as is: every process draws its own share of each
global batch (see monoscope.loader), gradients are averaged over processes, and everything else
(firing statistics, resampling inputs) is reduced so that every process makes the same decisions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from tqdm import tqdm

from monoscope.atomic import atomic_path, write_text
from monoscope.config import resample_memory_problem
from monoscope.sae import SAE, SAEConfig

log = logging.getLogger(__name__)

BatchSource = Callable[[int], Iterator[torch.Tensor]]  # start batch -> this process's batches from there
CHECKPOINT_FILE = "checkpoint.pt"
LOG_FILE = "train_log.jsonl"


@dataclass
class TrainConfig:
    """One SAE's hyper-parameters: the `sae` config section resolved for one run (monoscope.config.sae_runs).
    workflow/schemas/config.schema.yaml documents each key and holds its default."""

    SECTION: ClassVar[str] = "sae"

    architecture: str  # relu | topk | batchtopk | jumprelu (see monoscope.sae)
    expansion_factor: int  # d_sae = expansion_factor * d_in
    l1_coefficient: float  # λ: L1 weight for relu, L0 weight for jumprelu, unused by topk/batchtopk
    k: int  # topk / batchtopk: active features per token
    auxk_alpha: float  # topk / batchtopk: weight of the AuxK loss (Gao et al. 2024)
    aux_k: int | None  # dead latents AuxK uses per token; None: d_in // 2
    dead_window_tokens: int | None  # a feature silent this long is dead (AuxK, logged dead_fraction); None: see dead_window
    jumprelu_bandwidth: float  # jumprelu: ε of the straight-through estimators
    jumprelu_init_threshold: float  # jumprelu: initial θ
    lr: float  # Adam learning rate
    beta1: float
    beta2: float
    batch_size: int  # activation vectors per step, over all processes
    train_tokens: int  # activation vectors seen in training (several epochs if needed)
    lr_warmup_fraction: float  # of the steps: linear warm-up of the learning rate from 0
    lr_decay_fraction: float  # of the steps: linear decay of the learning rate to 0 at the end
    l1_warmup_fraction: float  # of the steps: linear warm-up of λ from 0
    resample_steps: list[int]
    resample_window: int  # steps before each resample step whose firing decides who is resampled
    resample_max_density: float  # resample features firing on fewer than this fraction of the window's tokens (0: never fired)
    resample_inputs: int  # inputs scored to choose the new directions
    resample_encoder_scale: float  # new encoder row norm = this * mean alive encoder row norm
    norm_sample_tokens: int  # tokens for the normalisation constant and the geometric median
    checkpoint_every: int  # steps between resumable checkpoints
    log_every: int  # steps between train_log.jsonl rows
    max_loss_ratio: float  # stop as diverged when the loss exceeds this times its lowest logged value
    buffer_tokens: int  # mixing buffer of the loader, over all its streams
    loader_streams: int  # fixed, so 1 or N processes see the same batches; divides batch_size (checked at planning)
    seed: int

    @property
    def total_steps(self) -> int:
        return math.ceil(self.train_tokens / self.batch_size)

    @property
    def dead_window(self) -> int:
        """Tokens a feature may stay silent before it counts as dead: dead_window_tokens, or a tenth of the
        run, at most Gao et al.'s 10M. A fixed 10M never triggers AuxK in a shorter run."""
        if self.dead_window_tokens is not None:
            return self.dead_window_tokens
        return max(self.batch_size, min(10_000_000, self.train_tokens // 10))


def sae_config(cfg: TrainConfig, d_in: int, **provenance: Any) -> SAEConfig:
    """The SAE a run trains on d_in-wide activations (provenance: SAEConfig's hyperparameters and sources)."""
    return SAEConfig(d_in=d_in, d_sae=cfg.expansion_factor * d_in, architecture=cfg.architecture, k=cfg.k,
                     jumprelu_bandwidth=cfg.jumprelu_bandwidth, jumprelu_init_threshold=cfg.jumprelu_init_threshold,
                     **provenance)


# --- schedules: pure functions of the step ------------------------------------------------------


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over the first lr_warmup_fraction of steps, linear decay to 0 over the last lr_decay_fraction."""
    total = cfg.total_steps
    warmup = round(cfg.lr_warmup_fraction * total)
    decay = round(cfg.lr_decay_fraction * total)
    scale = 1.0
    if step < warmup:
        scale = (step + 1) / warmup
    if decay and step >= total - decay:
        scale = min(scale, (total - step) / decay)
    return cfg.lr * scale


def sparsity_at(step: int, cfg: TrainConfig) -> float:
    """λ, warmed up linearly from 0 over the first l1_warmup_fraction of steps."""
    warmup = round(cfg.l1_warmup_fraction * cfg.total_steps)
    return cfg.l1_coefficient * min(1.0, (step + 1) / warmup) if warmup else cfg.l1_coefficient


# --- statistics of the data ---------------------------------------------------------------------


def norm_scale_for(x: torch.Tensor) -> float:
    """The constant c with E||c·x||^2 = d_in over the sample x [n, d_in]."""
    return math.sqrt(x.shape[1] / x.double().pow(2).sum(1).mean().item())


def geometric_median(x: torch.Tensor, iterations: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """argmin_y Σ ||x_i - y|| over x [n, d], by Weiszfeld's iterations."""
    x = x.double()
    y = x.mean(0)
    for _ in range(iterations):
        weights = 1.0 / (x - y).norm(dim=1).clamp_min(1e-12)  # [n]
        y_next = (weights[:, None] * x).sum(0) / weights.sum()
        moved = (y_next - y).norm()
        y = y_next
        if moved <= tol * y.norm().clamp_min(1e-12):
            break
    return y.float()


# --- the training state -------------------------------------------------------------------------


class TrainingDiverged(RuntimeError):
    pass


@dataclass
class _Progress:
    step: int = 0
    batches_drawn: int = 0
    best_loss: list[float] = field(default_factory=list)


@dataclass
class SAERun:
    """One SAE of the job and the state the loop keeps for it."""

    name: str
    cfg: TrainConfig
    sae: SAE
    since_fired: torch.Tensor  # [d_sae] tokens since each feature last fired: dead features for AuxK, resampling, logs
    fired_interval: torch.Tensor  # [d_sae] bool: fired since the last log row
    window_fires: torch.Tensor  # [d_sae] tokens each feature fired on since the resampling window opened
    window_tokens: int = 0  # tokens since the resampling window opened


def _fingerprint(runs: dict[str, dict[str, Any]], sources: Sequence[str], d_in: int, source_identity: Sequence[Any]) -> str:
    """What a checkpoint's weights depend on. The store paths alone are not enough: a rerun after
    changing model.layer or the hook rewrites the same paths with other activations of the same width."""
    blob = json.dumps({"runs": runs, "sources": list(sources), "d_in": d_in, "source_identity": list(source_identity)},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def store_identity(attrs: dict[str, Any], n_tokens: int) -> dict[str, Any]:
    """A store's provenance as it bears on its contents: model id, hook, tokenizer, source shard, dtype,
    codec and rounding, harvest settings; not the package version that wrote it."""
    return {**{k: v for k, v in attrs.items() if k != "package_version"}, "n_tokens": n_tokens}


class CheckpointUnreadable(ValueError):
    """checkpoint.pt cannot be read back (torn by a disk fault, or not a checkpoint)."""


CHECKPOINT_KEYS = ("fingerprint", "progress", "saes", "norm_scales", "optimizer", "since_fired", "fired_interval",
                   "torch_rng", "generator")


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - zip, pickle and EOF errors all mean the same here
        raise CheckpointUnreadable(f"resume checkpoint {path} is unreadable ({type(error).__name__}: {error})") from error
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointUnreadable(f"resume checkpoint {path} lacks {', '.join(missing)}")
    return state


def read_log_rows(path: Path, upto_step: int | None = None) -> list[dict[str, Any]]:
    """train_log.jsonl's rows (with step <= upto_step). Reading stops at the first line that is not a
    whole JSON row, with a warning naming it: a kill or a full disk tears only the last rows written,
    and those came after the last checkpoint, so the resumed run logs them again."""
    rows = []
    with open(path, encoding="utf-8", errors="replace") as file:
        for number, line in enumerate(file, 1):
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                    raise ValueError("not a log row")
            except ValueError:
                log.warning("%s line %d is torn or not a log row; dropping it and every line after it", path, number)
                break
            if upto_step is None or row["step"] <= upto_step:
                rows.append(row)
    return rows


def _close(batches: Iterator[torch.Tensor]) -> None:
    """Stop a generator's prefetching now rather than at garbage collection; plain iterators need nothing."""
    if hasattr(batches, "close"):
        batches.close()


def _atomic_torch_save(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


class Trainer:
    """Trains the SAEs of `runs` (name -> hyper-parameters) together on one stream of batches."""

    def __init__(
        self,
        runs: dict[str, dict[str, Any]],
        d_in: int,
        batches: BatchSource,
        resume_dir: str | os.PathLike,
        source_stores: Sequence[str] = (),
        source_attrs: dict[str, Any] | None = None,
        source_identity: Sequence[dict[str, Any]] = (),
        accelerator=None,
        show_progress: bool = True,
    ):
        from accelerate import Accelerator

        if not runs:
            raise ValueError("no SAE to train")
        cfgs = {name: TrainConfig(**values) for name, values in runs.items()}
        shared = ("batch_size", "train_tokens", "seed", "norm_sample_tokens", "buffer_tokens", "loader_streams")
        for key in shared:
            values = {getattr(c, key) for c in cfgs.values()}
            if len(values) > 1:
                raise ValueError(f"SAEs trained in one job must share sae.{key}; got {sorted(values)}")
        self.cfg0 = next(iter(cfgs.values()))
        for cfg in cfgs.values():  # the width is known here, for a pretrained model first
            problem = resample_memory_problem(cfg.resample_inputs, d_in) if cfg.resample_steps else None
            if problem:
                raise ValueError(problem)
        self.d_in = d_in
        self.batches = batches
        self.resume_dir = Path(resume_dir)
        self.sources = [str(s) for s in source_stores]
        self.source_attrs = source_attrs or {}
        self.acc = accelerator or Accelerator()
        self.device = self.acc.device
        self.world = self.acc.num_processes
        self.show_progress = show_progress and self.acc.is_main_process
        self.source_identity = list(source_identity)
        self.fingerprint = _fingerprint(runs, self.sources, d_in, self.source_identity)
        self.generator = torch.Generator().manual_seed(self.cfg0.seed)  # resampling draws

        self.runs: list[SAERun] = []
        for name, cfg in cfgs.items():
            sae = SAE(sae_config(cfg, d_in, hyperparameters=runs[name], source_stores=self.sources, source_attrs=self.source_attrs),
                      generator=torch.Generator().manual_seed(cfg.seed)).to(self.device)
            zeros = lambda dtype: torch.zeros(sae.d_sae, dtype=dtype, device=self.device)  # noqa: E731
            self.runs.append(SAERun(name, cfg, sae, zeros(torch.long), zeros(torch.bool), zeros(torch.long)))
        self.optimizer = torch.optim.Adam(
            [{"params": list(r.sae.parameters()), "lr": r.cfg.lr, "betas": (r.cfg.beta1, r.cfg.beta2)} for r in self.runs],
            fused=True,  # one kernel per parameter: several times faster than the loop, same maths
        )
        self.progress = _Progress(best_loss=[math.inf] * len(self.runs))

    @property
    def saes(self) -> list[SAE]:
        return [run.sae for run in self.runs]

    # --- checkpoints ------------------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path:
        return self.resume_dir / CHECKPOINT_FILE

    @property
    def log_path(self) -> Path:
        return self.resume_dir / LOG_FILE

    def save_checkpoint(self) -> None:
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            if self.log_path.exists():  # the rows up to this step must survive whatever the checkpoint survives
                with open(self.log_path, "rb") as f:
                    os.fsync(f.fileno())
            state = {
                "fingerprint": self.fingerprint,
                "progress": asdict(self.progress),
                "saes": [r.sae.state_dict() for r in self.runs],
                "norm_scales": [r.sae.cfg.norm_scale for r in self.runs],
                "optimizer": self.optimizer.state_dict(),
                "since_fired": [r.since_fired.cpu() for r in self.runs],
                "fired_interval": [r.fired_interval.cpu() for r in self.runs],
                "window_fires": [r.window_fires.cpu() for r in self.runs],
                "window_tokens": [r.window_tokens for r in self.runs],
                "torch_rng": torch.get_rng_state(),
                "generator": self.generator.get_state(),
            }
            _atomic_torch_save(state, self.checkpoint_path)
        self.acc.wait_for_everyone()

    def try_resume(self) -> bool:
        if not self.checkpoint_path.exists():
            return False
        try:
            state = load_checkpoint(self.checkpoint_path)
        except CheckpointUnreadable as error:
            # Saved by rename after fsync, so this is a disk fault or a foreign file: train from the
            # start (the next checkpoint replaces it) rather than fail every retry the same way.
            log.warning("%s; training from step 0", error)
            return False
        if state["fingerprint"] != self.fingerprint:
            log.warning("ignoring %s: written for other hyper-parameters or data", self.checkpoint_path)
            return False
        for i, run in enumerate(self.runs):
            run.sae.load_state_dict(state["saes"][i])
            run.sae.cfg.norm_scale = state["norm_scales"][i]
            run.since_fired = state["since_fired"][i].to(self.device)
            run.fired_interval = state["fired_interval"][i].to(self.device)
            run.window_fires = state["window_fires"][i].to(self.device)
            run.window_tokens = state["window_tokens"][i]
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        self.generator.set_state(state["generator"])
        self.progress = _Progress(**state["progress"])
        if self.acc.is_main_process and self.log_path.exists():  # drop rows logged after the checkpoint
            rows = read_log_rows(self.log_path, upto_step=self.progress.step)
            write_text(self.log_path, "".join(json.dumps(r) + "\n" for r in rows))
        log.info("resumed from %s at step %d", self.checkpoint_path, self.progress.step)
        return True

    def _log_rows(self, rows: list[dict[str, Any]]) -> None:
        if self.acc.is_main_process:
            with open(self.log_path, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)

    # --- initialisation from the data -------------------------------------------------------------

    def device_batches(self, start: int) -> Iterator[torch.Tensor]:
        """This process's batches from number `start` on, float32 on the training device. Every consumer
        (initialisation, the loop, resampling) draws through here: on a GPU the loader hands over float16."""
        batches = self.batches(start)
        try:
            for x in batches:
                yield x.to(self.device, non_blocking=True).float()
        finally:
            _close(batches)

    def _gather_rows(self, local: torch.Tensor) -> torch.Tensor:
        """[n_batches, b, ...] per process -> [n_batches * world * b, ...], batch-major like one process would see."""
        gathered = self.acc.gather(local.contiguous()[None]) if self.world > 1 else local[None]  # [world, n, b, ...]
        return gathered.transpose(0, 1).flatten(0, 2)

    @torch.no_grad()
    def initialise_from_data(self) -> None:
        n_batches = max(1, math.ceil(self.cfg0.norm_sample_tokens / self.cfg0.batch_size))
        it = self.device_batches(0)
        sample = torch.stack([next(it) for _ in range(n_batches)])  # [n, b, d_in]
        _close(it)
        sample = self._gather_rows(sample).float()  # [n * B, d_in]
        scale = norm_scale_for(sample)
        median = geometric_median(sample * scale)
        for run in self.runs:
            run.sae.cfg.norm_scale = scale
            run.sae.b_dec.copy_(median.to(self.device))

    # --- resampling -------------------------------------------------------------------------------

    @torch.no_grad()
    def resample(self, data: Iterator[torch.Tensor], run: SAERun) -> list[dict[str, Any]]:
        """Re-initialise the features of `run`'s SAE that fired on fewer than resample_max_density of the
        tokens of the last resample_window steps (never, at 0): the dead and, above 0, the near-dead."""
        cfg, sae = run.cfg, run.sae
        fires = run.window_fires  # [d_sae]
        dead = (fires == 0) | (fires < cfg.resample_max_density * run.window_tokens)  # [d_sae]
        n_dead = int(dead.sum())
        row = {"event": "resample", "sae": run.name, "step": self.progress.step, "resampled": n_dead}
        if n_dead == 0:
            return [row]
        n_batches = max(1, math.ceil(cfg.resample_inputs / cfg.batch_size))
        inputs, losses = [], []
        for _ in range(n_batches):
            x_n = next(data) * sae.cfg.norm_scale  # [b, d_in]
            self.progress.batches_drawn += 1
            x_hat = sae.decode_normalized(sae.encode_normalized(x_n))
            inputs.append(x_n)
            losses.append((x_n - x_hat).pow(2).sum(-1))  # [b]
        inputs = torch.stack(inputs)  # [n, b, d_in]
        weights = self._gather_rows(torch.stack(losses)).double()  # [n * B], same order on every process
        if weights.sum() <= 0:
            weights = torch.ones_like(weights)
        chosen = torch.multinomial(weights.cpu(), n_dead, replacement=True, generator=self.generator).to(self.device)
        # Every process holds a slice of each global batch; pick the chosen rows it owns, sum over processes.
        b = inputs.shape[1]
        batch, rank, offset = chosen // (self.world * b), (chosen // b) % self.world, chosen % b
        picked = torch.where(
            (rank == self.acc.process_index)[:, None], inputs[batch, offset], torch.zeros((), device=self.device)
        )  # [n_dead, d_in]
        if self.world > 1:
            picked = self.acc.reduce(picked, reduction="sum")
        directions = picked / picked.norm(dim=1, keepdim=True).clamp_min(1e-12)
        alive = ~dead
        enc_norm = sae.W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0, device=self.device)
        sae.W_dec[dead] = directions
        sae.W_enc[:, dead] = directions.T * (enc_norm * cfg.resample_encoder_scale)
        sae.b_enc[dead] = 0.0
        for param, rows in ((sae.W_dec, dead), (sae.b_enc, dead), (sae.W_enc, (slice(None), dead))):
            state = self.optimizer.state.get(param, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key][rows] = 0.0
        run.since_fired[dead] = 0
        run.window_fires[dead] = 0
        return [row]

    # --- the loop ---------------------------------------------------------------------------------

    def train(self) -> list[SAE]:
        self.resume_dir.mkdir(parents=True, exist_ok=True)
        if not self.try_resume():
            if self.acc.is_main_process and self.log_path.exists():
                self.log_path.unlink()
            self.initialise_from_data()
            self.progress = _Progress(best_loss=[math.inf] * len(self.runs))
        total = self.cfg0.total_steps
        data = self.device_batches(self.progress.batches_drawn)
        sums = self._zero_sums()
        bar = tqdm(total=total, initial=self.progress.step, disable=not self.show_progress, unit="step", mininterval=5)
        while self.progress.step < total:
            self._open_resample_windows()
            x = next(data)
            self.progress.batches_drawn += 1
            terms = self._train_step(x)
            self._accumulate(sums, x, terms)
            self.progress.step += 1
            bar.update()
            step = self.progress.step
            rows = []
            for run in self.runs:
                if step in run.cfg.resample_steps:
                    rows += self.resample(data, run)
            if step % self.cfg0.log_every == 0 or step == total:
                rows += self._log_interval(sums)
                sums = self._zero_sums()
            self._log_rows(rows)
            if step % self.cfg0.checkpoint_every == 0 and step < total:
                if sums["n"]:  # never checkpoint weights whose loss has not been checked
                    self._log_rows(self._log_interval(sums))
                    sums = self._zero_sums()
                self.save_checkpoint()
        bar.close()
        _close(data)
        tokens = total * self.cfg0.batch_size
        for run in self.runs:
            run.sae.cfg.tokens_seen = tokens
        return self.saes

    def _open_resample_windows(self) -> None:
        """Start counting firings resample_window steps before each resample step (at the start if sooner)."""
        for run in self.runs:
            if self.progress.step + run.cfg.resample_window in run.cfg.resample_steps:
                run.window_fires.zero_()
                run.window_tokens = 0

    @torch.no_grad()
    def _update_firing(self, terms) -> None:
        for run, t in zip(self.runs, terms):
            counts = t["fire_counts"]  # [d_sae]: tokens of this process's batch
            if self.world > 1:
                counts = self.acc.reduce(counts, reduction="sum")
            fired = counts > 0
            run.since_fired = torch.where(fired, 0, run.since_fired + self.cfg0.batch_size)
            run.fired_interval |= fired
            run.window_fires += counts
            run.window_tokens += self.cfg0.batch_size

    def _train_step(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        step = self.progress.step
        x_n = x * self.runs[0].sae.cfg.norm_scale  # [b, d_in]; one constant for every SAE of the job
        terms = []
        for run in self.runs:
            sae, cfg, since_fired = run.sae, run.cfg, run.since_fired
            coefficient = sparsity_at(step, cfg)
            if cfg.architecture == "relu":
                terms.append(sae.relu_losses_and_grads(x_n, coefficient))
                continue
            dead = since_fired >= cfg.dead_window if cfg.architecture in ("topk", "batchtopk") else None
            t = sae.training_losses(x_n, coefficient, dead, cfg.auxk_alpha, cfg.aux_k or sae.d_in // 2)
            t["loss"].backward()
            terms.append(t)
        if self.world > 1:
            self._average_over_processes()
        for sae in self.saes:
            sae.remove_parallel_decoder_grad()
        for group, run in zip(self.optimizer.param_groups, self.runs):
            group["lr"] = lr_at(step, run.cfg)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for sae in self.saes:
            sae.normalize_decoder()
        self._update_firing(terms)
        return terms

    @torch.no_grad()
    def _average_over_processes(self) -> None:
        """What DDP does, by hand: the relu gradients are not autograd's, so no DDP hook sees them."""
        for sae in self.saes:
            for param in sae.parameters():
                param.grad = self.acc.reduce(param.grad, reduction="mean")
            for buffer in sae.buffers():  # batchtopk's threshold, estimated from each process's batches
                buffer.copy_(self.acc.reduce(buffer, reduction="mean"))

    def _zero_sums(self) -> dict[str, Any]:
        zeros = lambda: torch.zeros(len(self.runs), dtype=torch.float64, device=self.device)  # noqa: E731
        return {"n": 0, "loss": zeros(), "mse": zeros(), "sparsity": zeros(), "l0": zeros(), "var": zeros()}

    @torch.no_grad()
    def _accumulate(self, sums, x, terms) -> None:
        x_n = x * self.runs[0].sae.cfg.norm_scale
        var = (x_n - x_n.mean(0)).pow(2).sum(-1).mean()
        sums["n"] += 1
        for i, t in enumerate(terms):
            sums["loss"][i] += t["loss"].detach()
            sums["mse"][i] += t["mse"].detach()
            sums["sparsity"][i] += t.get("l1", t.get("l0_penalty", t.get("auxk", torch.zeros(())))).detach()
            sums["l0"][i] += t["l0"]
            sums["var"][i] += var

    def _log_interval(self, sums) -> list[dict[str, Any]]:
        """Average the interval's terms over steps and processes; stop if the loss diverged."""
        n = sums["n"]
        values = torch.stack([sums[k] for k in ("loss", "mse", "sparsity", "l0", "var")]) / max(n, 1)  # [5, n_saes]
        if self.world > 1:
            values = self.acc.reduce(values, reduction="mean")
        values = values.cpu().tolist()
        step = self.progress.step
        rows = []
        for i, run in enumerate(self.runs):
            name, cfg = run.name, run.cfg
            loss, mse, sparsity, l0, var = (v[i] for v in values)
            best = self.progress.best_loss[i]
            if not math.isfinite(loss) or loss > cfg.max_loss_ratio * best:
                raise TrainingDiverged(
                    f"SAE {name} diverged at step {step}: mean loss {loss:.4g} over the last {n} steps "
                    f"(lowest so far {best:.4g}); the last good checkpoint is {self.checkpoint_path}. "
                    f"Lower sae.lr or raise sae.lr_warmup_fraction."
                )
            self.progress.best_loss[i] = min(best, loss)
            dead_fraction = (run.since_fired >= cfg.dead_window).float().mean().item()
            rows.append(
                {
                    "sae": name,
                    "step": step,
                    "tokens": step * cfg.batch_size,
                    "lr": lr_at(step - 1, cfg),
                    "sparsity_coefficient": sparsity_at(step - 1, cfg),
                    "loss": loss,
                    "mse": mse,
                    "sparsity_term": sparsity,
                    "l0": l0,
                    "explained_variance": 1.0 - mse / var if var > 0 else float("nan"),
                    "dead_fraction": dead_fraction,
                    "fired_fraction_interval": run.fired_interval.float().mean().item(),
                }
            )
            run.fired_interval.zero_()
        return rows

    # --- outputs ----------------------------------------------------------------------------------

    def write_outputs(self, out_dirs: dict[str, str | os.PathLike]) -> None:
        """sae.safetensors, cfg.json and train_log.jsonl per SAE; then drop the resume state."""
        self.acc.wait_for_everyone()
        if not self.acc.is_main_process:
            return
        rows = read_log_rows(self.log_path) if self.log_path.exists() else []
        for run in self.runs:
            directory = Path(out_dirs[run.name])
            run.sae.save(directory)
            write_text(directory / LOG_FILE, "".join(json.dumps(r) + "\n" for r in rows if r["sae"] == run.name))
        shutil.rmtree(self.resume_dir, ignore_errors=True)


def train_from_stores(
    store_paths: Sequence[str | os.PathLike],
    runs: dict[str, dict[str, Any]],
    out_dirs: dict[str, str | os.PathLike],
    resume_dir: str | os.PathLike,
    show_progress: bool = True,
) -> list[SAE]:
    """Train the SAEs of `runs` on the activation stores; write each to out_dirs[name]. Resumes from resume_dir."""
    from accelerate import Accelerator

    from monoscope.loader import ActivationLoader

    cfg = TrainConfig(**next(iter(runs.values())))
    # Without CUDA, cpu=True is what makes `accelerate launch --multi_gpu` processes use gloo.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    print(f"process {accelerator.process_index} of {accelerator.num_processes} on {accelerator.device}", flush=True)
    loader = ActivationLoader(
        store_paths,
        batch_size=cfg.batch_size,
        buffer_tokens=cfg.buffer_tokens,
        streams=cfg.loader_streams,
        seed=cfg.seed,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        # On a GPU: float16 batches in page-locked memory, converted on the device (half the copy's bytes,
        # and the conversion leaves the loader's cores); on the CPU the loader converts once, in the batch.
        dtype=None if accelerator.device.type == "cuda" else torch.float32,
        pin_memory=accelerator.device.type == "cuda",
    )
    attrs = loader.stores[0].attrs
    source_attrs = {k: attrs[k] for k in ("model_id", "hook", "dtype", "tokenizer_id") if k in attrs}
    source_identity = [store_identity(dict(s.attrs), s.n_tokens) for s in loader.stores]
    trainer = Trainer(
        runs,
        loader.d,
        loader.batches,
        resume_dir,
        source_stores=[str(p) for p in store_paths],
        source_attrs=source_attrs,
        source_identity=source_identity,
        accelerator=accelerator,
        show_progress=show_progress,
    )
    saes = trainer.train()
    trainer.write_outputs(out_dirs)
    return saes
