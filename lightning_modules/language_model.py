"""LanguageModel: the one LightningModule that trains any resnet_bk language model.

The network is any nn.Module with forward(input_ids (B, N)) -> LMOutput(logits, aux_losses, stats)
(resnet_bk.models). It is given as a factory `network(vocab_size)`, so a config names the network
class and its width/depth, and the CLI supplies vocab_size from the data module.

Loss = token-weighted cross-entropy (targets == -100 are ignored) + sum_k weight_k * aux_k.
Validation/test perplexity is token-weighted over the whole split: exp(sum NLL / number of tokens),
accumulated across batches (and across processes under DDP), never a mean of per-batch means.
Under DDP, Lightning's DistributedSampler repeats up to world_size - 1 windows to even out the
ranks, and those are counted twice: report figures from a single-device validate/test.

Variants (ACT, multi-scale, sparsity, conditional MoE, learned length) are configuration: the
network reports its extra losses in LMOutput.aux_losses and its extra scalars in LMOutput.stats,
they are weighted by `aux_loss_weights` (the config's one place for them) and logged here, e.g.

    model:
      class_path: lightning_modules.LanguageModel
      init_args:
        network: {class_path: resnet_bk.models.act_lm.ACTResNetBKLM, init_args: {...}}
        aux_loss_weights: {load_balance: 0.01, ponder: 0.01}

Measurements and schedules that do not change the training step are callbacks (callbacks/: FLOPs
per token, tokens/s, the sparsity temperature). A subclass exists only where the training step
differs (early exit's calibration, gradient caching's manual loop); it overrides
compute_loss(batch, stage) to add terms and logs without re-implementing the steps.

Reliability:
- Non-finite values are caught: the training loss and every gradient before the optimizer step.
  `nonfinite="stop"` (default) raises FloatingPointError naming the first bad step and tensor, and
  nothing after that step is ever checkpointed. The check is recorded on the device at every step
  and read by the host (one synchronisation) every `nonfinite_check_interval` steps and before every
  checkpoint: 1 on a CPU (the bad step is never applied), `trainer.log_every_n_steps` on a GPU (the
  run stops at most that many steps later, without a host sync in the other steps).
  `nonfinite="skip"` drops the bad optimizer step (no parameter or optimizer-state update; with
  gradient accumulation, the whole window) and counts it in train/nonfinite_skipped; it reads the
  verdict every step (one sync per step). Under DDP the ranks agree on the decision, so none waits
  for another in a collective.
- `compile` compiles the loss computation (network forward, cross-entropy, weighted aux losses) with
  torch.compile(fullgraph=True) on CUDA, optionally CUDA-graph captured ("reduce-overhead").
- Exact resume: with `step_rng` (default), the torch/numpy/python RNGs are re-seeded at every
  training batch from (seed, rank, epoch, batch index), so dropout and other draws depend on the
  step, not on what ran before it (validation, loader start-up, a restart); the seed is saved in
  the checkpoint. The optimizer, scheduler, loop position and the data module's sampler are
  restored by Lightning; the schedule's length (schedule_total_steps) is saved here and kept, so a
  resume with a larger max_steps continues at the schedule's final rate instead of re-stretching it.
- Loading a checkpoint whose vocabulary or parameter shapes differ from the configured model, and a
  data seq_len above the network's max_seq_len, are one-line ValueErrors before training starts.
"""

from __future__ import annotations

import math
import os
import random
from functools import partial
from typing import Any, Callable, NamedTuple

import lightning as L
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.fabric.utilities.logger import _convert_params, _flatten_dict
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.tensorboard.summary import hparams
from torchmetrics.aggregation import MeanMetric

from lightning_modules.nonfinite import NonFiniteWatch
from resnet_bk.models.base import TiedEmbeddingLM

IGNORE_INDEX = -100

#: Every aux loss the network returns needs a weight; this is the default for the MoE router.
DEFAULT_AUX_LOSS_WEIGHTS = {"load_balance": 0.01}


class LossOutput(NamedTuple):
    """What compute_loss returns for one batch."""

    loss: torch.Tensor  # what is optimised: ce + sum of weighted aux losses
    nll_sum: torch.Tensor  # summed NLL over the scored tokens (for token-weighted perplexity)
    n_tokens: torch.Tensor  # number of scored tokens (targets != -100)
    logs: dict[str, torch.Tensor]  # logged as "<stage>/<key>": "ce", "aux/<name>", "stats/<name>"


def warmup_cosine(
    step: int, warmup_steps: int, total_steps: float, min_lr_ratio: float, progress: float | None = None
) -> float:
    """LR multiplier: linear warmup to 1 over warmup_steps, then cosine decay to min_lr_ratio at total_steps.

    step counts optimizer steps from 0; the first step already gets 1 / warmup_steps (not 0).
    Past total_steps the multiplier stays at min_lr_ratio. progress: the cosine's progress 0..1 given
    directly (e.g. in budget time, callbacks.TrainTimeBudget) instead of from step and total_steps.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if progress is None:
        progress = (step - warmup_steps) / max(1.0, total_steps - warmup_steps)
    progress = min(1.0, progress)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def weight_decay_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: "decay" (weight matrices, also stacked per expert) and "no_decay"
    (biases, norm weights and other vectors, and embeddings, including a head tied to one). Each
    tied tensor appears once; frozen ones not at all. The names label LearningRateMonitor's curves:
    lr-AdamW/decay, lr-AdamW/no_decay."""
    embeddings = {id(p) for m in module.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            vector = p.ndim < 2 or name.endswith("bias")  # a grouped layer's bias is (groups, out)
            (no_decay if vector or id(p) in embeddings else decay).append(p)
    return [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]


class LanguageModel(L.LightningModule):
    """Next-token training of `network(vocab_size)` with AdamW and warmup + cosine LR.

    Args:
        network: a factory called as network(vocab_size) that returns the model, e.g. the class
            resnet_bk.models.ResNetBKLM or functools.partial(ResNetBKLM, config=BKConfig(d_model=64)).
            In a config it is a class_path/init_args block without vocab_size (the shared
            hyperparameters under init_args.config), and --help lists the project's networks
            (TiedEmbeddingLM's subclasses); in Python any nn.Module of that forward works.
        vocab_size: from the data module (the CLI links data.vocab_size to it).
        lr: peak learning rate.
        weight_decay: AdamW weight decay on matrices; biases, norms and embeddings get none.
        betas: AdamW betas.
        warmup_steps: linear warmup length in optimizer steps.
        min_lr_ratio: the cosine decays to lr * min_lr_ratio at the end of the run's schedule
            (trainer.max_steps, or max_epochs in steps, when the run started).
        aux_loss_weights: weight of each aux loss the network returns, by name (each finite and >= 0).
            A returned aux loss without a weight is an error (so no term is silently dropped or
            added); a weight whose loss the network never returns is harmless (e.g. load_balance for
            a dense model).
        nonfinite: what a non-finite training loss or gradient does: "stop" (raise, the default) or
            "skip" (drop the step, count it in train/nonfinite_skipped). Evaluation always stops.
        step_rng: re-seed the RNGs at every training batch from (seed, rank, epoch, batch index), so
            that a resumed run draws what an uninterrupted one draws (see the module docstring).
        nonfinite_check_interval: with nonfinite="stop", read the device-side non-finite record every
            this many steps (and before every checkpoint). None: 1 on a CPU, log_every_n_steps on a GPU.
        compile: False (eager), True (torch.compile default mode) or a torch.compile mode
            ("reduce-overhead": CUDA graphs; "max-autotune", "max-autotune-no-cudagraphs"). Applies on
            CUDA only; on a CPU the model runs eager.
    """

    def __init__(
        self,
        network: Callable[[int], TiedEmbeddingLM],
        vocab_size: int,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        aux_loss_weights: dict[str, float] = DEFAULT_AUX_LOSS_WEIGHTS,
        nonfinite: str = "stop",
        step_rng: bool = True,
        nonfinite_check_interval: int | None = None,
        compile: bool | str = False,
    ):
        super().__init__()
        if nonfinite not in ("stop", "skip"):
            raise ValueError(f"LanguageModel: nonfinite must be 'stop' or 'skip', got {nonfinite!r}.")
        check_hyperparameters(lr, weight_decay, betas, warmup_steps, min_lr_ratio, aux_loss_weights)
        if nonfinite_check_interval is not None and nonfinite_check_interval < 1:
            raise ValueError(f"LanguageModel: nonfinite_check_interval must be >= 1, got {nonfinite_check_interval}.")
        modes = (False, True, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
        if compile not in modes:
            raise ValueError(f"LanguageModel: compile must be one of {modes}, got {compile!r}.")
        # Under the CLI, hparams are the parsed config (network as its class_path/init_args block).
        self.save_hyperparameters()
        self.model = network(vocab_size)
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self.warmup_steps, self.min_lr_ratio = warmup_steps, min_lr_ratio
        self.aux_loss_weights = dict(aux_loss_weights)
        # Token-weighted mean NLL: MeanMetric(value=batch mean NLL, weight=batch token count) keeps
        # sum(nll) and sum(tokens) as states and sums both across processes.
        self.val_nll = MeanMetric()
        self.test_nll = MeanMetric()
        self._hparams_summary_written = False
        self.nonfinite, self.step_rng = nonfinite, step_rng
        self.nonfinite_skipped = 0  # training steps dropped for a non-finite loss or gradient
        self._drop_step = False
        self.rng_seed: int | None = None  # base of the per-step seeds; from the run (or checkpoint)
        self.nonfinite_check_interval = nonfinite_check_interval
        self.compile_mode = "default" if compile is True else (compile or None)
        self._watch = NonFiniteWatch()  # first non-finite training loss or gradient, on the device
        self._loss_terms_fn = self._loss_terms  # compiled in setup() where asked for
        self._compiled_shapes: dict[tuple[bool, bool], tuple[int, ...]] = {}  # (training, grad) -> input shape
        self._param_index_cache: tuple = (None, None)  # (key, device tensor) of _param_index
        # Optimizer steps the warmup + cosine schedule is planned over: fixed when a run starts and
        # kept by a resumed run (so a larger max_steps never moves the LR back up the cosine).
        self.schedule_total_steps: int | None = None
        self._resumed_schedule_total_steps: int | None = None

    def forward(self, input_ids: torch.Tensor):
        return self.model(input_ids)

    # ----------------------------------------------------------------------------------- loss
    def compute_loss(self, batch: dict[str, torch.Tensor], stage: str) -> LossOutput:
        """One forward pass and its loss. Subclasses override this (calling super) to add terms."""
        if self.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs are done with
        loss_terms = self._loss_terms_for(batch["input_ids"])
        loss, nll_sum, n_tokens, names, values = loss_terms(batch["input_ids"], batch["targets"])
        # One copy takes the logged scalars out of the (CUDA-graph) output buffers, which the next step reuses.
        values = values.clone()
        logs = dict(zip(names, values.unbind()))
        return LossOutput(loss, nll_sum, n_tokens, logs)

    def _loss_terms(self, input_ids: torch.Tensor, targets: torch.Tensor):
        """(loss, nll_sum, n_tokens, log names, log values stacked (K,)): the part that is compiled."""
        out = self(input_ids)
        nll_sum = F.cross_entropy(
            out.logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        n_tokens = (targets != IGNORE_INDEX).sum()
        ce = nll_sum / n_tokens.clamp_min(1)
        loss = ce
        names, values = ["ce"], [ce.detach()]
        for name, value in out.aux_losses.items():
            if name not in self.aux_loss_weights:
                raise ValueError(
                    f"aux loss {name!r} returned by {type(self.model).__name__} has no weight: "
                    f"add it to model.init_args.aux_loss_weights (now {self.aux_loss_weights})."
                )
            loss = loss + self.aux_loss_weights[name] * value
            names.append(f"aux/{name}")
            values.append(value.detach().float())
        for name, value in out.stats.items():
            names.append(f"stats/{name}")
            if not isinstance(value, torch.Tensor):  # a fill, not a (blocking) copy from the host
                value = torch.full((), float(value), device=ce.device)
            values.append(value.detach().float().to(ce.device))
        return loss, nll_sum.detach(), n_tokens, tuple(names), torch.stack(values)

    def _loss_terms_for(self, input_ids: torch.Tensor):
        """The compiled loss for the first input shape met in each mode (train / eval, grad or not);
        any other shape (an epoch's last, partial batch) runs eagerly rather than compiling another
        graph: a graph per shape would cost a compilation each (tens of seconds on a GPU) and run into
        torch.compile's recompile limit."""
        if self._loss_terms_fn == self._loss_terms:  # not compiled
            return self._loss_terms_fn
        key = (self.training, torch.is_grad_enabled())
        first = self._compiled_shapes.setdefault(key, tuple(input_ids.shape))
        return self._loss_terms_fn if first == tuple(input_ids.shape) else self._loss_terms

    def _checked_loss(self, batch: dict[str, torch.Tensor], batch_idx: int, stage: str) -> LossOutput:
        """compute_loss, raising FloatingPointError if the loss is not finite (on any rank): one host
        sync, for loops that act on each step's verdict at once (gradient caching's manual loop)."""
        result = self.compute_loss(batch, stage)
        if not self._all_ranks(bool(torch.isfinite(result.loss))):
            raise FloatingPointError(self._nonfinite_message(f"{stage} loss", result, batch_idx))
        return result

    def _all_ranks(self, ok: bool) -> bool:
        """True only if `ok` holds on every rank (one tiny all-reduce under DDP, so ranks act alike)."""
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1:
            return ok
        return trainer.strategy.reduce_boolean_decision(ok, all=True)

    def _nonfinite_message(self, what: str, result: LossOutput | None, batch_idx: int) -> str:
        if result is not None:
            what = f"{what} ({result.loss.item()}, ce = {result.logs['ce'].item()})"
        return (
            f"non-finite {what} at global step {self.global_step}, batch {batch_idx}; nothing was applied "
            "or checkpointed. Try a lower lr, trainer.gradient_clip_val, or model.init_args.nonfinite: skip."
        )

    # ---------------------------------------------------------------------------------- steps
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.step_rng:
            if self.rng_seed is None:
                self.rng_seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
            seed = np.random.SeedSequence([self.rng_seed, self.global_rank, self.current_epoch, batch_idx])
            s = int(seed.generate_state(1, np.uint64)[0] >> 1)
            # The generators this process draws from: the CPU's and its own CUDA device's. (torch.manual_seed
            # would also queue a seed, with a formatted stack trace, for every uninitialised backend: XPU,
            # MTIA, ... at each step.)
            torch.default_generator.manual_seed(s)
            if self.device.type == "cuda":
                torch.cuda.default_generators[self.device.index or 0].manual_seed(s)
            np.random.seed(s % 2**32)
            random.seed(s)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        result = self.compute_loss(batch, "train")
        if self.nonfinite == "skip" and not self._all_ranks(bool(torch.isfinite(result.loss))):
            self._skipped()
            self._drop_step = True  # on_before_optimizer_step drops the gradients: AdamW then changes nothing
            # A zero loss on every parameter (Lightning refuses None under DDP, whose backward must run on all ranks).
            return sum((p.flatten()[:1] * 0.0).sum() for p in self.parameters() if p.requires_grad)
        if self.nonfinite == "stop":
            self._watch.note(
                ~torch.isfinite(result.loss), self.global_step, batch_idx, result.loss, result.logs["ce"], -1
            )
            self._check_nonfinite(self._check_due())
        bs = batch["input_ids"].shape[0]
        self.log("train/loss", result.loss.detach(), prog_bar=True, batch_size=bs)
        if self._logging_step():
            self.log_dict({f"train/{k}": v for k, v in result.logs.items()}, batch_size=bs)
        if self.nonfinite == "skip":
            self.log("train/nonfinite_skipped", float(self.nonfinite_skipped), batch_size=bs)
        return result.loss

    def _logging_step(self) -> bool:
        """True where the trainer writes step metrics to its loggers (every log_every_n_steps steps and
        the last): the per-step scalars are handed to self.log only then, since each call costs host
        time (tens of Python calls and a copy kernel) that the values of other steps would not repay."""
        if self._trainer is None:
            return True
        return self.trainer._logger_connector.should_update_logs or bool(self.trainer.fast_dev_run)

    def _check_due(self) -> bool:
        interval = self.nonfinite_check_interval
        if interval is None:
            on_cpu = self.device.type == "cpu"
            interval = 1 if on_cpu or self._trainer is None else max(1, self.trainer.log_every_n_steps)
        return (self.global_step + 1) % interval == 0

    def _check_nonfinite(self, due: bool = True) -> None:
        """Raise FloatingPointError if the watch holds a non-finite event (on any rank); one sync."""
        if not due:
            return
        event = self._watch.first()
        if self._all_ranks(event is None):
            return
        if event is None:
            raise FloatingPointError(
                f"non-finite train loss or gradient on another rank by global step {self.global_step}."
            )
        if event["what"] < 0:
            what = f"train loss ({event['loss']}, ce = {event['ce']})"
        else:
            names = [n for n, p in self.named_parameters() if p.requires_grad]
            what = f"gradient of {names[event['what']]}"
        late = "" if event["step"] == self.global_step else f" (detected at step {self.global_step}; not checkpointed)"
        raise FloatingPointError(
            f"non-finite {what} at global step {event['step']}, batch {event['batch']}{late}; nothing after it "
            "was checkpointed. Try a lower lr, trainer.gradient_clip_val, or model.init_args.nonfinite: skip."
        )

    def _skipped(self) -> None:
        self.nonfinite_skipped += 1
        self.log("train/nonfinite_skipped", float(self.nonfinite_skipped), batch_size=1)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Check every gradient before it is applied (after the AMP unscale, before clipping)."""
        if self._drop_step:  # a non-finite loss was skipped in this accumulation window
            self._drop_step = False
            for p in self.parameters():
                p.grad = None
            return
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return  # fp16 AMP: GradScaler skips overflowed steps itself (and lowers the scale)
        params = [p for p in self.parameters() if p.requires_grad]
        with_grad = [i for i, p in enumerate(params) if p.grad is not None]
        if not with_grad:
            return
        # Under DDP the gradients are already averaged, so every rank reaches the same verdict.
        norms = torch.stack(torch._foreach_norm([params[i].grad for i in with_grad]))
        if self.nonfinite == "stop":
            finite = torch.isfinite(norms)
            first_bad = self._param_index(with_grad, norms.device)[torch.argmin(finite.int())]
            zero = torch.zeros((), device=norms.device)
            self._watch.note(
                ~finite.all(), self.global_step, self.trainer.fit_loop.epoch_loop.batch_idx, zero, zero, first_bad
            )
            self._check_nonfinite(self._check_due())
            return
        if bool(torch.isfinite(norms.sum())):
            return
        for p in self.parameters():
            p.grad = None  # the optimizer skips parameters without a gradient: a true no-op step
        self._skipped()

    def _param_index(self, indices: list[int], device: torch.device) -> torch.Tensor:
        """indices as a device tensor, made once (a host-to-device copy is a synchronisation)."""
        key = (tuple(indices), str(device))
        if self._param_index_cache[0] != key:
            self._param_index_cache = (key, torch.tensor(indices, device=device))
        return self._param_index_cache[1]

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val", self.val_nll)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test", self.test_nll)

    def _eval_step(self, batch: dict[str, torch.Tensor], batch_idx: int, stage: str, nll: MeanMetric) -> None:
        result = self.compute_loss(batch, stage)
        nll.update(result.nll_sum / result.n_tokens.clamp_min(1), weight=result.n_tokens)
        # aux losses and stats of held-out data: batch means (they are diagnostics, not the metric).
        logs = {f"{stage}/{k}": v for k, v in result.logs.items() if k != "ce"}
        self.log_dict(logs, on_step=False, on_epoch=True, batch_size=batch["input_ids"].shape[0], sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._log_perplexity("val", self.val_nll)

    def on_test_epoch_end(self) -> None:
        self._log_perplexity("test", self.test_nll)

    def _log_perplexity(self, stage: str, nll: MeanMetric) -> None:
        mean_nll = nll.compute()  # synced across processes: sum(nll) / sum(tokens)
        nll.reset()
        if not bool(torch.isfinite(mean_nll)):  # one read per evaluation, not one per batch
            raise FloatingPointError(
                f"non-finite {stage} loss over the {stage} split at global step {self.global_step}; the weights "
                "or the data hold NaN/Inf. Evaluate an earlier checkpoint, or lower the lr."
            )
        self.log(f"{stage}/loss", mean_nll, prog_bar=stage == "val")
        self.log(f"{stage}/ppl", mean_nll.exp(), prog_bar=stage == "val")

    # ----------------------------------------------------------------------- setup, checkpoint
    def setup(self, stage: str) -> None:
        if self._trainer is not None and self.trainer.strategy.root_device.type == "cuda":
            self.compile_loss()
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        seq_len = getattr(datamodule, "seq_len", None)
        max_len = getattr(self.model, "max_seq_len", None)
        if seq_len is not None and max_len is not None and seq_len > max_len:
            raise ValueError(
                f"data seq_len {seq_len} exceeds the network's max_seq_len {max_len}: lower "
                f"--data.init_args.seq_len or raise --model.init_args.network.init_args.config.max_seq_len to >= {seq_len}"
            )

    def compile_loss(self) -> None:
        """Compile the loss computation as the `compile` option asks (once; a no-op without it)."""
        if self.compile_mode is not None and self._loss_terms_fn == self._loss_terms:
            self._loss_terms_fn = torch.compile(self._loss_terms, fullgraph=True, dynamic=False, mode=self.compile_mode)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._check_nonfinite()  # never write weights that a recorded non-finite step has touched
        checkpoint["resnet_bk"] = {
            "rng_seed": self.rng_seed,
            "nonfinite_skipped": self.nonfinite_skipped,
            "schedule_total_steps": self.schedule_total_steps,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("resnet_bk", {})
        self.rng_seed = state.get("rng_seed", self.rng_seed)
        self.nonfinite_skipped = state.get("nonfinite_skipped", 0)
        # Lightning calls this before configure_optimizers, which then keeps the run's schedule.
        self._resumed_schedule_total_steps = state.get("schedule_total_steps")
        check_checkpoint_matches(self, checkpoint)

    # ------------------------------------------------------------------------------ optimizer
    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW with linear warmup and cosine decay to min_lr_ratio * lr over the run's optimizer steps.

        The plan (schedule_total_steps) is made when a run starts, from trainer.max_steps or
        max_epochs, and saved in its checkpoints. A resumed run keeps it whatever its own max_steps:
        steps beyond the plan run at the final rate min_lr_ratio * lr, so the LR never jumps up.
        """
        # Fused AdamW (one kernel for every tensor) on CUDA, unless fp16 AMP's GradScaler must unscale first.
        scaler = getattr(self.trainer.precision_plugin, "scaler", None) if self._trainer is not None else None
        self._fused_adamw = self.device.type == "cuda" and scaler is None
        optimizer = torch.optim.AdamW(
            weight_decay_groups(self, self.weight_decay), lr=self.lr, betas=self.betas, fused=self._fused_adamw
        )
        total_steps = self._resumed_schedule_total_steps or self.trainer.estimated_stepping_batches
        self._resumed_schedule_total_steps = None
        if not math.isfinite(total_steps):
            raise ValueError("LanguageModel: the cosine schedule needs a finite trainer.max_steps or max_epochs.")
        self.schedule_total_steps = int(total_steps)
        schedule = partial(
            warmup_cosine, warmup_steps=self.warmup_steps, total_steps=total_steps, min_lr_ratio=self.min_lr_ratio
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Lightning refuses to clip for a fused optimizer, since fp16 AMP would have to unscale first;
        without a GradScaler (bf16, fp32) nothing is scaled, so clip directly."""
        if not getattr(self, "_fused_adamw", False) or not gradient_clip_val:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val, foreach=True)

    # -------------------------------------------------------------------------------- hparams
    def on_fit_start(self) -> None:
        self._log_hparams_summary()

    def on_validation_start(self) -> None:
        self._log_hparams_summary()

    def on_test_start(self) -> None:
        self._log_hparams_summary()

    @rank_zero_only
    def _log_hparams_summary(self) -> None:
        """Register the hparams with TensorBoard's HPARAMS tab, with val/test loss and ppl as its metrics.

        Lightning writes this summary only together with metric values (or the placeholder
        hp_metric); here only the metric names are registered and the tab reads their latest values
        from the scalars logged during the run.
        """
        if self._hparams_summary_written:
            return
        params = dict(self.hparams)
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None:
            params.update({f"data/{k}": v for k, v in getattr(datamodule, "hparams", {}).items()})
        params = {k: v for k, v in params.items() if not k.endswith("_instantiator")}  # CLI bookkeeping
        metrics = {f"{s}/{m}": 0.0 for s in ("val", "test") for m in ("loss", "ppl")}
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                flat = logger._sanitize_params(_flatten_dict(_convert_params(params)))
                writer = logger.experiment._get_file_writer()
                for summary in hparams(flat, metrics):
                    writer.add_summary(summary)
        self._hparams_summary_written = True


def check_hyperparameters(
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    warmup_steps: int,
    min_lr_ratio: float,
    aux_loss_weights: dict[str, float],
) -> None:
    """ValueError (one line, naming the argument and the range it needs) for an out-of-range or
    non-finite optimisation hyper-parameter of LanguageModel."""

    def finite(x: Any) -> bool:
        return isinstance(x, (int, float)) and math.isfinite(x)

    if not (finite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite positive number, got {lr}; e.g. --model.init_args.lr 1e-3")
    if not (finite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay}; e.g. 0.1, or 0 for none")
    if len(betas) != 2 or not all(finite(b) and 0 <= b < 1 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {list(betas)}; e.g. [0.9, 0.95]")
    if not (isinstance(warmup_steps, int) and warmup_steps >= 0):
        raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps}")
    if not (finite(min_lr_ratio) and 0 <= min_lr_ratio <= 1):
        raise ValueError(f"min_lr_ratio must be a number in [0, 1], got {min_lr_ratio}")
    for name, weight in aux_loss_weights.items():
        if not (finite(weight) and weight >= 0):
            raise ValueError(f"aux_loss_weights[{name!r}] must be a finite number >= 0, got {weight}")


def check_checkpoint_matches(module: LanguageModel, checkpoint: dict[str, Any]) -> None:
    """ValueError (one line) if the checkpoint's vocabulary or parameter names/shapes differ from the module's."""
    fix = "use the config the checkpoint was trained with (config.yaml beside its checkpoints/ folder) or drop --ckpt_path"
    saved_vocab = checkpoint.get("hyper_parameters", {}).get("vocab_size")
    if saved_vocab is not None and saved_vocab != module.hparams.get("vocab_size"):
        raise ValueError(
            f"the checkpoint was trained with a vocabulary of {saved_vocab} tokens, the configured data has "
            f"{module.hparams.get('vocab_size')} (another corpus or tokenizer?); {fix}"
        )
    mine, theirs = module.state_dict(), checkpoint.get("state_dict", {})
    missing, unexpected = sorted(mine.keys() - theirs.keys()), sorted(theirs.keys() - mine.keys())
    reshaped = sorted(k for k in mine.keys() & theirs.keys() if tuple(mine[k].shape) != tuple(theirs[k].shape))
    if missing or unexpected or reshaped:
        if reshaped:
            k = reshaped[0]
            example = f"e.g. {k} is {tuple(theirs[k].shape)} in the checkpoint, {tuple(mine[k].shape)} configured"
        else:
            example = f"e.g. {(missing or unexpected)[0]} is {'missing from' if missing else 'only in'} the checkpoint"
        raise ValueError(
            f"the checkpoint's architecture does not match the configured network ({len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(reshaped)} reshaped tensors; {example}); {fix}"
        )
