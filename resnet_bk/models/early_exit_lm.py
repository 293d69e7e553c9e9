"""ResNet-BK language model with per-position early exit through a shared, tied LM head.

References: CALM (Schuster et al. 2022) for per-token exits from a shared head with a calibrated
threshold and for copying an exited token's state to the layers it skips; DeeBERT / BranchyNet
for intermediate heads trained with a weighted auxiliary loss. See resnet_bk.layers.early_exit.

The intermediate head after layer l is the final one, lm_head(ln_f(x_l)) (shared and tied to the
token embedding): no parameters are added.

Two ways to run (forward(input_ids, exits=None); exits=None means "in eval mode, when a threshold
is set"):

  all layers (training, and eval without a threshold): every position runs every layer; the
      output also carries the residual states after layers 1..L-1 (`layer_hidden`), so that the
      training module can add the intermediate heads' cross-entropy.

  with exits: after layer l (l >= min_exit_layer, l < L) the head runs on the still-active
      positions; a position whose confidence reaches `exit_threshold` exits: its logits are that
      layer's logits and it does no more work. In every later layer
        - the feed-forward (the expensive, position-wise part) runs on the gathered active rows only;
        - the BK-core `mix` still runs over the whole sequence, since the resolvent chain of a later,
          active position passes through every earlier one. An exited position enters it with its
          state copied forward: its last feed-forward output h (CALM's state propagation), and its
          residual state x stays frozen;
        - once no position is active the layer loop ends.
      The head therefore runs once per layer a position is active in (its confidence), never again
      at the end for exited positions.

Causality: the exit decision at t reads x_t only, the copied state of t is t's own, and the
feed-forward is position-wise, so logits at t still depend on tokens 0..t only.

Static shapes (`capacity`, default None). The exit path above gathers exactly the active rows:
their number is read back to the host after every layer, and the loop ends on such a read. With a
capacity c in (0, 1] nothing is read back and every shape is fixed:
  - the layers up to min_exit_layer run every position (none can have exited yet);
  - every later layer gathers K_cap = ceil(c N) slots per sequence: the row's FIRST K_cap active
    positions, in order, then padding slots that run and are discarded (the head scores them and
    writes their logits to a discarded row; they reach no expert's matmul);
  - overflow: an active position beyond its row's first K_cap exits before the layer, with the
    logits of the last layer it ran (already computed for its exit test), and is counted in the
    stat "capacity_overflow" (overflowing / active, over the gathered layers);
  - the loop always runs the L layers; the threshold is read as a tensor.
Whether position t gets a slot depends on how many positions s <= t of its row are active, i.e.
on tokens 0..t only: causal. capacity=1.0 never overflows and gives the exact path's logits.

stats (besides ResNetBKLM's): "exit_layer_mean" (1-based; L for a position that never exits) and
"ffn_rows_fraction" (feed-forward rows run / (L * B * N), padding slots included; 1.0 without
exits); with a capacity and exits, "capacity_overflow".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from resnet_bk.layers.act import add_weighted, capacity_rows, check_capacity, scatter_rows, weighted_means
from resnet_bk.layers.early_exit import Confidence, confidence, head_on_slots, read_exit_enabled
from resnet_bk.models.config import BKConfig
from resnet_bk.models.output import LMOutput
from resnet_bk.models.resnet_bk_lm import ResNetBKLM


@dataclass
class EarlyExitOutput(LMOutput):
    """LMOutput plus the residual states after layers 1..L-1 (B, N, D) each; empty with exits."""

    layer_hidden: list[torch.Tensor] = field(default_factory=list)


class EarlyExitLM(ResNetBKLM):
    """input_ids (B, N) -> EarlyExitOutput; ResNetBKLM with early exit (see the module docstring).

    Args:
        vocab_size, config: as for ResNetBKLM.
        exit_threshold: confidence at which a position exits; None: never (the training module
            calibrates it with set_exit_threshold; the `exit_threshold` and `exit_enabled` buffers
            keep it in checkpoints).
        confidence: "max_prob" or "entropy" (resnet_bk.layers.early_exit.confidence).
        min_exit_layer: the first layer after which a position may exit (1..n_layers-1).
        capacity: None (the exit path gathers exactly the active rows: host syncs) or a fraction
            in (0, 1]: static shapes, no host sync (see the module docstring).
    """

    def __init__(
        self,
        vocab_size: int,
        config: BKConfig = BKConfig(),
        exit_threshold: float | None = None,
        confidence: Confidence = "max_prob",
        min_exit_layer: int = 1,
        capacity: float | None = None,
    ):
        config = BKConfig.of(config)
        super().__init__(vocab_size, config)
        check_capacity("EarlyExitLM", capacity)
        self.capacity = capacity
        n_layers = config.n_layers
        if confidence not in ("max_prob", "entropy"):
            raise ValueError(f"EarlyExitLM: confidence must be 'max_prob' or 'entropy', got {confidence!r}.")
        if n_layers >= 2 and not 1 <= min_exit_layer <= n_layers - 1:
            raise ValueError(
                f"EarlyExitLM: min_exit_layer must be in 1..n_layers-1={n_layers - 1}, got {min_exit_layer}."
            )
        self.confidence, self.min_exit_layer = confidence, min_exit_layer
        # Buffers, so that a calibrated threshold is saved with the weights. exit_threshold is always
        # finite (a checkpoint refuses non-finite tensors); exit_enabled says whether it is in use.
        self.register_buffer("exit_threshold", torch.tensor(0.0))
        self.register_buffer("exit_enabled", torch.tensor(False))
        # exit_enabled on the host, so that forward picks its path without reading the buffer back
        # (a sync, and a graph break under torch.compile); kept in step by set_exit_threshold and
        # by load_state_dict.
        self.exit_enabled_host = False
        self.register_load_state_dict_post_hook(read_exit_enabled)
        self.set_exit_threshold(exit_threshold)
        self.last_ffn_rows: list[int] = []  # feed-forward rows per layer in the last forward

    def set_exit_threshold(self, threshold: float | None) -> None:
        """The confidence at which positions exit; None or +inf: no exits (every layer runs)."""
        if threshold is not None and (math.isnan(threshold) or threshold < 0):
            raise ValueError(f"EarlyExitLM: exit_threshold must be >= 0, +inf or None, got {threshold}.")
        enabled = threshold is not None and math.isfinite(threshold)
        self.exit_enabled.fill_(enabled)
        self.exit_threshold.fill_(threshold if enabled else 0.0)
        self.exit_enabled_host = enabled

    def get_exit_threshold(self) -> float | None:
        """The threshold in use, or None when positions do not exit (reads the buffer back)."""
        return float(self.exit_threshold) if self.exit_enabled_host else None

    def forward(self, input_ids: torch.Tensor, exits: bool | None = None) -> EarlyExitOutput:
        if exits is None:  # no threshold (unset, or calibrated to "never"): no exits, no head per layer
            exits = not self.training and self.exit_enabled_host
        if exits and not self.exit_enabled_host:
            raise ValueError("EarlyExitLM: exits=True needs an exit threshold (set_exit_threshold or calibration).")
        x = self.embed(input_ids)
        if not exits:
            return self._forward_all(x)
        if self.capacity is None:
            return self._forward_exits(x, self.get_exit_threshold())
        return self._forward_exits_static(x)

    def _forward_all(self, x: torch.Tensor) -> EarlyExitOutput:
        sums: tuple[dict, dict] = ({}, {})
        hidden = []
        for i, block in enumerate(self.blocks):
            x, aux, stats = block(x)
            _accumulate(sums, aux, stats)
            if i < len(self.blocks) - 1:
                hidden.append(x)
        b, n, _ = x.shape
        self.last_ffn_rows = [b * n] * len(self.blocks)
        aux_losses, stats = _means(sums, len(self.blocks))
        stats["exit_layer_mean"] = torch.full((), float(len(self.blocks)), device=x.device)
        stats["ffn_rows_fraction"] = torch.ones((), device=x.device)
        return EarlyExitOutput(self.head(x), aux_losses, stats, layer_hidden=hidden)

    def _forward_exits(self, x: torch.Tensor, threshold: float) -> EarlyExitOutput:
        b, n, d = x.shape
        n_layers = len(self.blocks)
        x = x.reshape(b * n, d)
        active = torch.arange(b * n, device=x.device)  # flat indices of positions still running
        exit_layer = torch.full((b * n,), n_layers, device=x.device)
        logits = None  # (B*N, V), filled in as positions exit
        h = None  # (B*N, D) last feed-forward output of every position (copied forward after exit)
        sums: tuple[dict, dict] = ({}, {})
        self.last_ffn_rows = []
        for i, block in enumerate(self.blocks):
            x_active = x.index_select(0, active)
            h_active, aux, stats = block.bk.feed_forward(block.ln(x_active), (active, b * n))
            self.last_ffn_rows.append(active.numel())
            _accumulate(sums, aux, stats)
            h = h_active if h is None else h.index_copy(0, active, h_active.to(h.dtype))
            out, _ = block.bk.mix(h.view(b, n, d))  # the whole sequence: the resolvent chain
            x = x.index_copy(0, active, x_active + out.reshape(b * n, d).index_select(0, active))
            if i == n_layers - 1:
                break
            if i + 1 >= self.min_exit_layer:
                layer_logits = self.head(x.index_select(0, active))
                done = confidence(layer_logits, self.confidence) >= threshold
                n_done = int(done.sum())  # host sync: the number of rows that go on is a shape
                if n_done == active.numel() and logits is None:  # everyone exits here: no copies
                    logits, active = layer_logits, active[:0]
                    exit_layer.fill_(i + 1)
                    break
                if n_done > 0:
                    if logits is None:  # every row is written before the end, so empty is safe
                        logits = layer_logits.new_empty(b * n, layer_logits.shape[-1])
                    leaving = active[done]
                    # in place: an out-of-place index_copy would copy the whole (B*N, V) buffer
                    logits.index_copy_(0, leaving, layer_logits[done])
                    exit_layer.index_fill_(0, leaving, i + 1)
                    active = active[~done]
                if active.numel() == 0:
                    break
        if active.numel() > 0:
            final = self.head(x.index_select(0, active))
            if logits is None:  # nobody exited
                logits = final.view(b * n, -1)  # active is still arange(B*N)
            else:
                logits.index_copy_(0, active, final)
        aux_losses, stats = _means(sums, len(self.last_ffn_rows))
        stats["exit_layer_mean"] = exit_layer.float().mean()
        stats["ffn_rows_fraction"] = torch.full((), sum(self.last_ffn_rows) / (n_layers * b * n), device=logits.device)
        return EarlyExitOutput(logits.view(b, n, -1), aux_losses, stats)

    def _forward_exits_static(self, x: torch.Tensor) -> EarlyExitOutput:
        """The exit path with static shapes (capacity set; see the module docstring): no host sync."""
        b, n, d = x.shape
        n_layers = len(self.blocks)
        slots = max(1, math.ceil(self.capacity * n))
        active = torch.ones(b, n, dtype=torch.bool, device=x.device)
        exit_layer = torch.full((b, n), n_layers, device=x.device)
        overflow, wanted = x.new_zeros((), dtype=torch.float32), x.new_zeros((), dtype=torch.float32)
        logits = None  # (B*N + 1, V): the latest logits of each position; row B*N takes the padding's
        h = None  # (B, N, D) last feed-forward output of every position (copied forward after exit)
        aux_sums: dict[str, list] = {}
        stat_sums: dict[str, list] = {}
        dense = True  # every position is active until the first exit test
        self.last_ffn_rows = []
        for i, block in enumerate(self.blocks):
            if dense:
                h, aux, stats = block.bk.feed_forward(block.ln(x))
                x = x + block.bk.mix(h)[0]
                weight = 1.0
                self.last_ffn_rows.append(b * n)
            else:
                # Each row's first `slots` active positions run this layer; the others exit now with
                # the logits of layer i (written at its exit test).
                index, valid, within = capacity_rows(active, slots)
                over = active & ~within
                exit_layer = torch.where(over, i, exit_layer)
                overflow, wanted = overflow + over.sum(), wanted + active.sum()
                active = within
                rows = block.ln(x.reshape(b * n, d).index_select(0, index))
                h_run, aux, stats = block.bk.feed_forward(rows, (index, b * n), valid)
                h = scatter_rows(h_run, active, h)
                x = torch.where(active[..., None], x + block.bk.mix(h)[0], x)
                weight = active.any().to(torch.float32)  # a layer of padding adds nothing to the means
                self.last_ffn_rows.append(b * slots)
            add_weighted(aux_sums, aux, weight)
            add_weighted(stat_sums, stats, weight)
            last = i == n_layers - 1
            if not last and i + 1 < self.min_exit_layer:
                continue
            # The head on the positions active in this layer (their logits so far: the exit logits
            # of those that exit now, overwritten for the others by a later layer's).
            if dense:
                layer_logits = self.head(x).reshape(b * n, -1)
                if logits is None:
                    logits = layer_logits.new_zeros(b * n + 1, layer_logits.shape[-1])
                logits[: b * n] = layer_logits
            else:
                logits, layer_logits = head_on_slots(self.head, x, index, valid, logits)
            if last:
                break
            done_rows = confidence(layer_logits, self.confidence) >= self.exit_threshold
            if dense:
                done = done_rows.view(b, n)
            else:
                done = scatter_rows(done_rows[:, None], active, torch.zeros_like(active)[..., None])[..., 0]
            exit_layer = torch.where(done, i + 1, exit_layer)
            active = active & ~done
            dense = False
        aux_losses, stats = weighted_means(aux_sums), weighted_means(stat_sums)
        stats["exit_layer_mean"] = exit_layer.float().mean()
        stats["ffn_rows_fraction"] = torch.full((), sum(self.last_ffn_rows) / (n_layers * b * n), device=logits.device)
        stats["capacity_overflow"] = overflow / wanted.clamp_min(1)
        return EarlyExitOutput(logits[: b * n].view(b, n, -1), aux_losses, stats)


def _accumulate(sums: tuple[dict, dict], aux: dict, stats: dict) -> None:
    for target, values in zip(sums, (aux, stats)):
        for k, v in values.items():
            target[k] = target.get(k, 0.0) + v


def _means(sums: tuple[dict, dict], n_layers: int) -> tuple[dict, dict]:
    n_layers = max(n_layers, 1)
    return ({k: v / n_layers for k, v in sums[0].items()}, {k: v / n_layers for k, v in sums[1].items()})
