"""GradientCachingLanguageModel: reuse the stored gradient of a similar earlier batch instead of backward.

Seed 002 (Step 7, "gradient caching") proposes: key each batch by its mean token embedding; if a
stored key is similar enough (cosine >= threshold), apply the stored gradient instead of running
backward. This module is that idea as a Lightning manual-optimization loop around ANY network that
LanguageModel trains: a config switches it on by naming this class with the same network block.

Per training batch (micro-batch, when accumulating k batches per optimizer step):

    key      = sketch(batch)                  unit vector, see `key` below; no gradient
               under DDP: the sketch is summed over all ranks first, so every rank makes the same
               key, stores the same (all-reduced) gradient and holds the same cache
    id, sim  = cache.lookup(key)              one matmul against all stored keys (GradientCache)
    hit      = sim >= threshold, agreed by all ranks (all_reduce MIN of the flag and the entry id),
               so no rank runs a backward (a collective under DDP) that another skips
    hit:  grad += hit_grad_scale * stored     no backward; no forward unless monitor_hits
    miss: loss = forward(batch); manual_backward(loss / k); cache.put(key, this batch's gradient)
    every k-th batch (and the epoch's last one): clip, optimizer.step, lr_scheduler.step, zero_grad

What the automatic loop does and this one keeps: zero_grad at the start of each accumulation window,
loss / k for accumulation, stepping on the epoch's last batch even if the window is incomplete,
clipping after unscaling (done in on_before_optimizer_step, which Lightning calls after the AMP
unscale and before optimizer.step), the LR scheduler stepped once per optimizer step, mixed
precision (forward under the precision plugin's autocast; manual_backward scales the loss; stored
gradients are divided by the loss scale, applied ones multiplied by the current scale), the NaN
guard, and the same train/* logs. With a threshold above 1 nothing can hit and the parameters equal
the automatic loop's (tests/test_gradient_caching.py, to 1e-6 on CPU).

Clipping and accumulation are hyper-parameters of THIS module, not of the Trainer: Lightning
refuses Trainer(gradient_clip_val > 0) and Trainer(accumulate_grad_batches != 1) under manual
optimization (MisconfigurationException, raised before any module hook runs). So a config sets
model.init_args.gradient_clip_val / gradient_clip_algorithm / accumulate_grad_batches and leaves
trainer.gradient_clip_val and trainer.accumulate_grad_batches unset.

What a stored gradient is: this batch's contribution to the accumulated gradient, i.e. the gradient
of loss / k (k = accumulate_grad_batches), before clipping, divided by the AMP loss scale when there
is one, in `cache_dtype` on `cache_device`. Parameters that got no gradient (None) are remembered as
such and stay untouched by a hit.

Checkpoints: the cache is NOT saved (it can hold hundreds of MB and is only a shortcut); a resumed
run starts with an empty cache, so its first batches miss. The hit/lookup counters are saved.

Logged (per training batch): train/cache_hit (0/1; its epoch mean is the epoch's hit rate),
train/cache_hit_rate (cumulative), train/cache_similarity (best cosine found), train/cache_entries,
train/cache_bytes; train/loss and the other train/* logs whenever a forward ran (misses, and hits
with monitor_hits).

Honest expectations (DESIGN §4): a hit saves a forward and a backward but updates the weights with a
gradient computed at older weights for another batch; whether that costs perplexity is measured in
benchmarks/specs/step7_gradcache.yaml and docs/step7_gradcache.md, not assumed.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from lightning_modules.gradient_cache_store import CacheEntry, GradientCache
from lightning_modules.language_model import LanguageModel, warmup_cosine

_HASH = 2654435761  # Knuth's multiplicative hash constant, for the token-histogram sketch


class GradientCachingLanguageModel(LanguageModel):
    """LanguageModel trained by a manual loop that may reuse cached gradients (see the module docstring).

    Args (besides LanguageModel's):
        threshold: cosine similarity at or above which a stored gradient is reused. Above 1 nothing
            hits (the cache is still filled, so its cost is measured).
        max_bytes: memory bound of the cache (keys + gradients); 0 turns caching off entirely.
        max_entries: optional bound on the number of entries.
        cache_dtype: "bfloat16" (half the memory) or "float32" for the stored gradients.
        cache_device: "device" (beside the parameters) or "cpu" (pinned host memory; slower hits).
        key: the batch sketch. "mean_embedding": the mean of the network's input-embedding rows of
            the batch's tokens (the seed's key; it drifts as the embedding trains).
            "token_histogram": counts of the batch's token ids hashed into sketch_dim buckets (fixed,
            independent of the weights; a repeated batch has similarity 1).
        sketch_dim: number of buckets of the token histogram.
        hit_grad_scale: factor on a reused gradient (e.g. < 1 to damp stale gradients).
        monitor_hits: also run a forward (no backward) on hits, to log their train/loss.
        gradient_clip_val: clip value (None or 0: no clipping); replaces Trainer(gradient_clip_val).
        gradient_clip_algorithm: "norm" or "value"; replaces Trainer(gradient_clip_algorithm).
        accumulate_grad_batches: batches per optimizer step; replaces Trainer(accumulate_grad_batches).
    """

    def __init__(
        self,
        *args,
        threshold: float = 0.99,
        max_bytes: int = 256 * 2**20,
        max_entries: int | None = None,
        cache_dtype: Literal["bfloat16", "float32"] = "bfloat16",
        cache_device: Literal["device", "cpu"] = "device",
        key: Literal["mean_embedding", "token_histogram"] = "mean_embedding",
        sketch_dim: int = 4096,
        hit_grad_scale: float = 1.0,
        monitor_hits: bool = False,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: Literal["norm", "value"] = "norm",
        accumulate_grad_batches: int = 1,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if accumulate_grad_batches < 1:
            raise ValueError(
                f"GradientCachingLanguageModel: accumulate_grad_batches must be >= 1, got {accumulate_grad_batches}."
            )
        if gradient_clip_val is not None and gradient_clip_val < 0:
            raise ValueError(
                f"GradientCachingLanguageModel: gradient_clip_val must be >= 0 or None, got {gradient_clip_val}."
            )
        if sketch_dim < 1:
            raise ValueError(f"GradientCachingLanguageModel: sketch_dim must be >= 1, got {sketch_dim}.")
        if cache_dtype not in ("bfloat16", "float32"):
            raise ValueError(
                f"GradientCachingLanguageModel: cache_dtype must be 'bfloat16' or 'float32', got {cache_dtype!r}."
            )
        if cache_device not in ("device", "cpu"):
            raise ValueError(
                f"GradientCachingLanguageModel: cache_device must be 'device' or 'cpu', got {cache_device!r}."
            )
        if key not in ("mean_embedding", "token_histogram"):
            raise ValueError(
                f"GradientCachingLanguageModel: key must be 'mean_embedding' or 'token_histogram', got {key!r}."
            )
        self.automatic_optimization = False
        self.threshold, self.hit_grad_scale, self.monitor_hits = threshold, hit_grad_scale, monitor_hits
        self.key_kind, self.sketch_dim = key, sketch_dim
        self.gradient_clip_val, self.gradient_clip_algorithm = gradient_clip_val, gradient_clip_algorithm
        self.accumulate_grad_batches = accumulate_grad_batches
        self.cache_enabled = max_bytes > 0
        self.cache = GradientCache(
            max_bytes,
            max_entries,
            dtype=getattr(torch, cache_dtype),
            device="cpu" if cache_device == "cpu" else None,
        )
        if key == "mean_embedding":
            self._key_embedding()  # fail at construction, not at the first step
        self.hits = 0
        self.lookups = 0
        self.last_hit = False  # for callbacks (e.g. the benchmark's timer)

    # ----------------------------------------------------------------------------- batch key
    def _key_embedding(self) -> nn.Embedding:
        """The network's input embedding: get_input_embeddings(), else .tok_emb, else its first nn.Embedding."""
        net = self.model
        if hasattr(net, "get_input_embeddings"):
            return net.get_input_embeddings()
        if isinstance(getattr(net, "tok_emb", None), nn.Embedding):
            return net.tok_emb
        for module in net.modules():
            if isinstance(module, nn.Embedding):
                return module
        raise ValueError(
            f"GradientCachingLanguageModel: key='mean_embedding' needs an nn.Embedding in {type(net).__name__}; "
            "use key='token_histogram'."
        )

    @torch.no_grad()
    def batch_key(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Unit-norm sketch of the batch (of the global batch under DDP), float32, on the model's device."""
        ids = batch["input_ids"].reshape(-1)
        if self.key_kind == "mean_embedding":
            # sum of the rows (the mean up to a factor, which the normalisation removes)
            total = self._key_embedding().weight.detach().index_select(0, ids).float().sum(0)
        else:
            buckets = (ids * _HASH) % self.sketch_dim
            total = torch.bincount(buckets, minlength=self.sketch_dim).float()
        if self._distributed():
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return F.normalize(total, dim=0)

    # ------------------------------------------------------------------------------- lookup
    def _distributed(self) -> bool:
        return (
            self._trainer is not None and self.trainer.world_size > 1 and dist.is_available() and dist.is_initialized()
        )

    def _lookup(self, key: torch.Tensor) -> tuple[int | None, float]:
        """This rank's best entry and its similarity (a hit if >= threshold, before the ranks agree)."""
        entry_id, sim = self.cache.lookup(key)
        return entry_id, float(sim)

    def _agree(self, entry_id: int | None, sim: float) -> int | None:
        """The entry to apply, or None for a miss; under DDP a hit only if every rank hits the same entry."""
        local = entry_id is not None and sim >= self.threshold
        if not self._distributed():
            return entry_id if local else None
        idx = entry_id if local else -1
        # MIN over [hit, id, -id]: hit on all ranks, and min(id) == max(id), i.e. the same entry everywhere
        flags = torch.tensor([int(local), idx, -idx], dtype=torch.long, device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        hit_all, id_min, id_max = int(flags[0]), int(flags[1]), -int(flags[2])
        return id_min if hit_all == 1 and id_min == id_max else None

    # ------------------------------------------------------------------------------ training
    def _params(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]  # each tied tensor once

    def _loss_scale(self) -> float:
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        return float(scaler.get_scale()) if scaler is not None else 1.0

    def _steps_now(self, batch_idx: int) -> bool:
        """Whether this batch ends an accumulation window (as Lightning's automatic loop decides)."""
        trainer = self.trainer
        return (
            (batch_idx + 1) % self.accumulate_grad_batches == 0
            or batch_idx + 1 == trainer.num_training_batches
            or trainer.is_last_batch
        )

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        optimizer = self.optimizers()
        if batch_idx % self.accumulate_grad_batches == 0:
            optimizer.zero_grad()

        key, sim, hit_id = None, float("-inf"), None
        if self.cache_enabled:  # the same on every rank, so all of them skip the collectives together
            key = self.batch_key(batch)
            entry_id, sim = self._lookup(key)
            hit_id = self._agree(entry_id, sim)
        self.lookups += 1
        self.last_hit = hit_id is not None
        result = None
        if hit_id is not None:
            self.hits += 1
            self._apply_cached(self.cache.get(hit_id))
            if self.monitor_hits:
                with torch.no_grad():
                    result = self._checked_loss(batch, batch_idx, "train")
        else:
            result = self._checked_loss(batch, batch_idx, "train")
            self._backward_and_store(result.loss, key)

        bs = batch["input_ids"].shape[0]
        if result is not None:
            self.log("train/loss", result.loss.detach(), prog_bar=True, batch_size=bs)
            self.log_dict({f"train/{k}": v for k, v in result.logs.items()}, batch_size=bs)
        self.log("train/cache_hit", float(self.last_hit), on_step=True, on_epoch=True, batch_size=bs)
        self.log("train/cache_hit_rate", self.hits / self.lookups, prog_bar=True, batch_size=bs)
        if math.isfinite(sim):
            self.log("train/cache_similarity", sim, batch_size=bs)
        self.log("train/cache_entries", float(len(self.cache)), batch_size=bs)
        self.log("train/cache_bytes", float(self.cache.nbytes), batch_size=bs)

        if self._steps_now(batch_idx):
            optimizer.step()  # clipping happens in on_before_optimizer_step, after the AMP unscale
            scheduler = self.lr_schedulers()
            if scheduler is not None:
                scheduler.step()
        return None if result is None else result.loss.detach()

    def _backward_and_store(self, loss: torch.Tensor, key: torch.Tensor | None) -> None:
        """manual_backward(loss / k); store this batch's own gradient (not the window's accumulated one)."""
        params = self._params()
        stash = None
        if self.cache_enabled and any(p.grad is not None for p in params):
            # mid-window: set the accumulated gradients aside so backward yields this batch's alone
            stash = [p.grad for p in params]
            for p in params:
                p.grad = None
        self.manual_backward(loss / self.accumulate_grad_batches)
        if not self.cache_enabled:
            return
        grads = [p.grad for p in params]
        present = tuple(g is not None for g in grads)
        if any(present):
            flat = torch.cat([g.reshape(-1).float() for g in grads if g is not None])
            scale = self._loss_scale()
            if scale != 1.0:  # fp16 AMP: store unscaled; skip overflowed gradients (the step is skipped too)
                flat = flat / scale
                if not bool(torch.isfinite(flat).all()):
                    flat = None
            if flat is not None:
                self.cache.put(key, flat, meta=present)
        if stash is not None:
            for p, old in zip(params, stash):
                if old is not None:
                    p.grad = old if p.grad is None else old.add_(p.grad)  # = what autograd's accumulation gives

    def _apply_cached(self, entry: CacheEntry) -> None:
        """grad += factor * stored (grad = factor * stored where there is none yet), for the parameters it covers."""
        factor = self.hit_grad_scale * self._loss_scale()
        flat = entry.grad.to(self.device, non_blocking=True)
        offset = 0
        for p, present in zip(self._params(), entry.meta):
            if not present:
                continue
            stored = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
            if p.grad is None:
                grad = torch.empty_like(p, memory_format=torch.contiguous_format).copy_(stored)
                p.grad = grad if factor == 1.0 else grad.mul_(factor)
            else:
                p.grad.add_(stored.to(p.grad.dtype), alpha=factor)
        if offset != flat.numel():
            raise RuntimeError("GradientCachingLanguageModel: a cached gradient does not match the parameters.")

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Lightning calls this hook after the AMP unscale and right before optimizer.step (manual and
        # automatic alike); the automatic loop clips at this very point. The base class first checks
        # that every gradient is finite (and stops, or drops them all, per model.init_args.nonfinite).
        super().on_before_optimizer_step(optimizer)
        if self.gradient_clip_val:  # LanguageModel's clipping, which also handles a fused optimizer
            self.configure_gradient_clipping(optimizer, self.gradient_clip_val, self.gradient_clip_algorithm)

    # ------------------------------------------------------------------------------ optimizer
    def configure_optimizers(self) -> dict[str, Any]:
        config = super().configure_optimizers()
        if self.accumulate_grad_batches > 1:
            # trainer.estimated_stepping_batches divides by the Trainer's accumulate_grad_batches
            # (1 under manual optimization): rebuild the schedule on the real number of optimizer steps.
            optimizer = config["optimizer"]
            schedule = partial(
                warmup_cosine,
                warmup_steps=self.warmup_steps,
                total_steps=self._total_optimizer_steps(),
                min_lr_ratio=self.min_lr_ratio,
            )
            config["lr_scheduler"]["scheduler"] = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return config

    def _total_optimizer_steps(self) -> float:
        trainer = self.trainer
        batches = trainer.num_training_batches
        if trainer.max_epochs == -1 or not math.isfinite(batches):
            return trainer.estimated_stepping_batches
        steps = math.ceil(batches / self.accumulate_grad_batches) * max(trainer.max_epochs, 1)
        return min(steps, trainer.max_steps) if trainer.max_steps != -1 else steps

    # ----------------------------------------------------------------------------- checkpoint
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["gradient_cache_counters"] = {
            "hits": self.hits,
            "lookups": self.lookups,
        }  # the cache itself is dropped

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        counters = checkpoint.get("gradient_cache_counters", {})
        self.hits, self.lookups = counters.get("hits", 0), counters.get("lookups", 0)
        self.cache.clear()
