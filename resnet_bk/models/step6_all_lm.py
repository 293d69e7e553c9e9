"""One ResNet-BK language model in which every Step-6 technique is a switch.

    x = tok_emb + pos_emb                                            (B, N, D)
    learned length:  x = pre blocks(x)                               full resolution
                     b = BoundaryPredictor(x)                        segment closes at t, read from x_t
                     z = inner blocks(segment_pool(x, b))            (B, K, D), K closed segments
                     x = x + causal_upsample(z, b)                   segment j reaches positions >= its close
    the stack:       L steps, each a multi-scale block (N -> N/2 -> N, multi-scale on) or one
                     ResNet-BK block (off); their ResNet-BK layers sparse (learned sparsity on) or dense
    depth:           ACT over the L steps and/or early exit through the tied head (one rule, below)
    every feed-forward (stack, pre, inner): the top-k MoE, or the top-p conditional MoE (on)
    logits = tied head(LN(y)),  y = the state each position leaves the stack with

The pieces are the single-technique models' own layers, imported and called: MultiScaleBlock and
its sparse form MultiScaleSparseBlock, SparseResNetBKBlock, run_bk_block and the halting units of
AdaptiveDepth, BoundaryPredictor / segment_pool / causal_upsample and the length losses,
confidence() of early exit, ConditionalMoEFeedForward. What is new here is how they meet.

Depth: ACT and early exit both decide where a position stops, so they are one rule. After step l
(1-based) a running position with state s_l halts when
  (a) ACT is on and its cumulative halting probability reaches act_threshold,
  (b) exits are on (eval mode with an exit threshold: set_exit_threshold, or the calibration of
      lightning_modules.early_exit.EarlyExitLanguageModel) and l >= min_exit_layer and the
      confidence of head(e_l) reaches the exit threshold, or
  (c) l = L.
e_l = y_{<l} + (1 - cum_{<l}) s_l is what the position outputs if it halts at l: Graves' ACT output
with the remainder on the current state. Whatever the cause, a halting position outputs e_l and
does no more work. So exits only shorten ACT's depth and the output is always ACT's convex
combination of the states; the early-exit loss and its calibration train and score exactly these
e_l (they are `layer_hidden` in training, where no position exits by confidence: (b) is off
there, so ACT alone decides depth while the model learns). Without ACT, cum = 0 and e_l = s_l:
plain early exit. Why one rule instead of "ACT in training, exits at inference": an ACT-trained
model read at its last state instead of its ACT combination is a different, untrained model.

A halted position (either cause) enters the later steps' BK-core chains with its frozen state, as
ACT does it (resnet_bk.layers.act.run_bk_block: h = LN(frozen state)), not with EarlyExitLM's copy
of its last feed-forward output: one convention for both causes.

Learned sparsity meets ACT/exits: the sparse layer gathers the rows its importance predictor keeps
and takes no outside mask (MultiScaleSparseBlock refuses ACT's running mask), so under sparsity a
halted position that the predictor keeps is still computed and its result discarded (its state
is frozen). Halting then saves only the halting units and the steps after every position of the
batch has halted. `ffn_rows_fraction` counts the rows that ran, so this is visible.

Learned length meets the stack: the stack is the learned-length model's post stage, at full
resolution, because halting, exits and logits are per position. Pre and inner blocks are plain
ResNet-BK blocks (conditional MoE when on): the sparse layer runs on whole sequences and cannot
take the inner blocks' gathered segment rows. config.n_layers counts every residual block:
n_pre + n_inner + those of the stack (2 per simple multi-scale block, 4 per hierarchical, 1 per
plain block).

Causality (docs/design.md section 3): each piece is causal on its own (see its module); the
halting and exit tests read position t's own state; stopping the step loop once every position
of the batch has halted changes no output, and only the head (no randomness) runs after it.

Static shapes (`capacity`, default None). The step loop above reads the number of running
positions back to the host at every step and stops on such a read; the sparse layers read their
kept counts. With a capacity c in (0, 1] nothing is read back and every shape is fixed (the forward
compiles with fullgraph=True), as in AdaptiveDepth / EarlyExitLM (resnet_bk.layers.act):
  - step 1 runs every position; every later step gathers K_cap = ceil(c N) slots per sequence, the
    row's FIRST K_cap running positions, then padding slots that run and are discarded (they reach
    no expert's matmul and stay out of the MoE statistics and aux losses);
  - overflow: a running position beyond its row's first K_cap halts before the step with the state
    it has (weight 1 - cum: its output is e_{l-1}, as at any halting step), counted in the stat
    "capacity_overflow" (overflowing / running, over steps 2..L). Its slot depends on how many
    positions s <= t of its row run, i.e. on tokens 0..t only: causal;
  - the loop always runs the L steps (a step where every position has halted runs on padding and
    counts for nothing in the means of the aux losses and stats; its sparse layers still draw noise
    and, in training, update their calibration EMA);
  - halting units run on every position, masked; with exits the first exit test scores every
    position with the head (halted ones: their final output), later ones the K_cap slots;
  - the sparse layers take the same capacity (SparseBKLayer's own static path); their overflow stat
    is named "sparse_capacity_overflow" here.
  - learned length pools into ceil(c N) segment slots per row (segment_pool's slots); a row's
    segments beyond them are not pooled, counted in the stat "length_capacity_overflow".
capacity=1.0 never overflows and gives the values, aux losses and gradients of None.

Switches off reduce to the single-technique models with the same weights (tests/test_step6_all.py):
multi-scale only = MultiScaleLM, everything off = ResNetBKLM, ACT + multi-scale = ACTMultiScaleLM,
sparsity + multi-scale = MultiScaleSparseLM, conditional MoE only = ConditionalMoELM, learned
length only = AdaptiveLengthLM (its post blocks are the stack), early exit only = EarlyExitLM
without exits (with exits they differ in the halted positions' state in later chains, above).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from resnet_bk.layers.act import (
    AdaptiveDepth,
    active_rows,
    add_weighted,
    capacity_rows,
    check_capacity,
    halt_overflow,
    run_bk_block,
    scatter_rows,
    weighted_means,
)
from resnet_bk.layers.adaptive_length import (
    BoundaryPredictor,
    boundary_prior_nll,
    boundary_rate_constraint,
    causal_upsample,
    segment_close_positions,
    segment_pool,
    segment_slots,
)
from resnet_bk.layers.bk_layer import BKLayer, ResNetBKBlock
from resnet_bk.layers.conditional_moe import ConditionalMoEFeedForward
from resnet_bk.layers.dropout import consume_dropout
from resnet_bk.layers.early_exit import Confidence, confidence, head_on_slots, read_exit_enabled
from resnet_bk.layers.multiscale import MLPRefine, MultiScaleBlock, Refine
from resnet_bk.layers.sparsity import (
    Core,
    MultiScaleSparseBlock,
    SparseResNetBKBlock,
    set_temperature,
    sparse_layers,
)
from resnet_bk.models.base import TiedEmbeddingLM, init_weights
from resnet_bk.models.config import BKConfig
from resnet_bk.models.early_exit_lm import EarlyExitOutput
from resnet_bk.models.multiscale_lm import work_stats
from resnet_bk.models.output import LMOutput
from resnet_bk.models.resnet_bk_lm import bk_block


class Step6AllLM(TiedEmbeddingLM):
    """input_ids (B, N) long -> LMOutput, or EarlyExitOutput when early exit is on.

    Args:
        vocab_size, config: as for ResNetBKLM (resnet_bk.models.BKConfig); config.n_layers counts
            every residual block (module docstring).
        multiscale: the stack's steps are multi-scale blocks (MultiScaleLM); hierarchical, refine,
            refine_d_ff as there. Off: each step is one ResNet-BK block.
        act: Graves' ACT over the stack's steps (ACTMultiScaleLM); act_threshold, halt_bias_init
            as there.
        sparsity: learned sparsity in the stack's ResNet-BK layers (MultiScaleSparseLM /
            SparseResNetBKLM); target_sparsity, core, predictor_kernel, interp_kernel as there.
            Needs config.causal; with multi-scale, simple blocks with a BK refinement.
        adaptive_length: learned sequence length before the stack (AdaptiveLengthLM): n_pre blocks,
            the boundary predictor, n_inner blocks on the closed segments; boundary_temperature,
            init_boundary_rate, prior_rate, length_multiple, eval_sampling, rate_target as there.
        early_exit: exits through the tied head (EarlyExitLM); exit_threshold, confidence,
            min_exit_layer as there (min_exit_layer counts the stack's steps). Train it with
            lightning_modules.early_exit.EarlyExitLanguageModel.
        conditional_moe: every feed-forward is top-p routed (ConditionalMoELM); top_p,
            min_experts, max_experts as there (config.top_k must stay 1).
        capacity: None (exact gathers: host syncs, data-dependent shapes) or a fraction in (0, 1]:
            static shapes for the step loop (ACT / exits), the sparse layers and the learned
            length's segments (module docstring).

    forward(input_ids, exits=None): exits as EarlyExitLM (None: in eval mode when a threshold is set).

    aux_losses (unweighted; each only when its technique is on): "load_balance" (mean over the
        blocks that ran), "ponder", "sparsity", "boundary_prior" or "length", "rate_constraint",
        "compute".
    stats: "g_abs_mean" and expert loads; ACT: "layers_executed", "layers_run", "halt_frac/<l>";
        sparsity: "sparsity", "expected_sparsity", "threshold"; learned length:
        "compression_ratio", "inner_length_fraction", "boundary_rate", "boundary_prob_mean"
        ("thresholded_rate" with rate_target); early exit: "exit_layer_mean" (steps each position
        took, by either rule), "exit_frac" (fraction that left by the confidence test);
        conditional MoE: "experts_per_token"; multi-scale: "ffn_rows/res<r>", "mix_tokens/res<r>"
        per input position; always "ffn_rows_fraction" (stack feed-forward rows run / rows of a
        pass without halting, exits or sparsity; padding slots included); with a capacity
        "capacity_overflow" (when ACT or exits are on) and "sparse_capacity_overflow" (sparsity on).
    """

    def __init__(
        self,
        vocab_size: int,
        config: BKConfig = BKConfig(),
        multiscale: bool = True,
        hierarchical: bool = False,
        refine: Refine = "bk",
        refine_d_ff: Optional[int] = None,
        act: bool = True,
        act_threshold: float = 0.99,
        halt_bias_init: float = 1.0,
        sparsity: bool = True,
        target_sparsity: float = 0.5,
        core: Core = "reduced",
        predictor_kernel: int = 3,
        interp_kernel: int = 3,
        capacity: Optional[float] = None,
        adaptive_length: bool = True,
        n_pre: int = 1,
        n_inner: int = 1,
        boundary_temperature: float = 1.0,
        init_boundary_rate: float = 0.25,
        prior_rate: Optional[float] = None,
        length_multiple: int = 1,
        eval_sampling: bool = False,
        rate_target: Optional[float] = None,
        early_exit: bool = True,
        exit_threshold: Optional[float] = None,
        confidence: Confidence = "max_prob",
        min_exit_layer: int = 1,
        conditional_moe: bool = True,
        top_p: float = 0.5,
        min_experts: int = 1,
        max_experts: Optional[int] = None,
    ):
        config = BKConfig.of(config)
        super().__init__(vocab_size, config)
        name, c = type(self).__name__, config
        self.causal = c.causal
        if sparsity and not c.causal:
            raise ValueError(
                f"{name}: learned sparsity is causal only; set config.causal to true or sparsity to false."
            )
        if sparsity and multiscale and (hierarchical or refine != "bk"):
            raise ValueError(
                f"{name}: sparse multi-scale blocks are simple with a BK refinement; set hierarchical: false and "
                "refine: bk, or sparsity: false."
            )
        if conditional_moe and c.top_k != 1:
            raise ValueError(f"{name}: conditional MoE routes by top_p; leave config.top_k at 1, got {c.top_k}.")
        if confidence not in ("max_prob", "entropy"):
            raise ValueError(f"{name}: confidence must be 'max_prob' or 'entropy', got {confidence!r}.")
        check_capacity(name, capacity)
        self.capacity = capacity

        # Learned length: pre and inner blocks before the stack.
        n_stack = c.n_layers
        self.adaptive_length = adaptive_length
        if adaptive_length:
            n_stack = c.n_layers - n_pre - n_inner
            if n_pre < 1 or n_inner < 0 or n_stack < 1:
                raise ValueError(
                    f"{name}: learned length needs n_pre >= 1, n_inner >= 0 and at least one residual block left for "
                    f"the stack (n_pre + n_inner < config.n_layers), got n_pre {n_pre}, n_inner {n_inner}, "
                    f"n_layers {c.n_layers}."
                )
            if prior_rate is not None and not 0.0 < prior_rate < 1.0:
                raise ValueError(f"{name}: prior_rate must be in (0, 1) or None, got {prior_rate}.")
            if rate_target is not None and not 0.0 < rate_target < 1.0:
                raise ValueError(f"{name}: rate_target must be in (0, 1) or None, got {rate_target}.")
            if length_multiple < 1:
                raise ValueError(f"{name}: length_multiple must be >= 1, got {length_multiple}.")
            self.prior_rate, self.rate_target, self.length_multiple = prior_rate, rate_target, length_multiple
            self.pre_blocks = nn.ModuleList(bk_block(c) for _ in range(n_pre))
            self.inner_blocks = nn.ModuleList(bk_block(c) for _ in range(n_inner))
            self.boundary = BoundaryPredictor(c.d_model, boundary_temperature, init_boundary_rate, eval_sampling)
            self.null = nn.Parameter(torch.zeros(c.d_model))  # what a position sees before any segment closes

        # The stack.
        self.multiscale, self.hierarchical, self.refine_kind = multiscale, hierarchical, refine
        bk_args = (c.d_model, c.ffn_width, c.num_experts, c.top_k, c.resolvent, c.causal, c.dropout)
        sparse_args = (target_sparsity, core, predictor_kernel, interp_kernel, capacity)
        if multiscale:
            per_step = 4 if hierarchical else 2
            if n_stack % per_step:
                raise ValueError(
                    f"{name}: the stack's residual blocks (config.n_layers{' - n_pre - n_inner' if adaptive_length else ''}"
                    f" = {n_stack}) must be a multiple of {per_step}, those of one multi-scale block."
                )
            n_steps = n_stack // per_step
            if sparsity:
                blocks = [MultiScaleSparseBlock(*bk_args[:5], c.dropout, *sparse_args) for _ in range(n_steps)]
            else:
                blocks = [MultiScaleBlock(*bk_args, hierarchical, refine, refine_d_ff) for _ in range(n_steps)]
        elif sparsity:
            blocks = [SparseResNetBKBlock(*bk_args, *sparse_args) for _ in range(n_stack)]
        else:
            blocks = [bk_block(c) for _ in range(n_stack)]
        self.blocks = nn.ModuleList(blocks)
        n_steps = len(self.blocks)

        # Depth: ACT's halting units (in an AdaptiveDepth, whose threshold and units the loop uses).
        self.act = AdaptiveDepth(c.d_model, n_steps, act_threshold, halt_bias_init) if act else None
        self.early_exit = early_exit
        if early_exit:
            if n_steps < 2:
                raise ValueError(f"{name}: early exit needs at least 2 steps in the stack, got {n_steps}.")
            if not 1 <= min_exit_layer <= n_steps - 1:
                raise ValueError(
                    f"{name}: min_exit_layer must be in 1..{n_steps - 1} (stack steps - 1), got {min_exit_layer}."
                )
            self.confidence, self.min_exit_layer = confidence, min_exit_layer
            # Buffers, so that a calibrated threshold is saved with the weights (as EarlyExitLM).
            self.register_buffer("exit_threshold", torch.tensor(0.0))
            self.register_buffer("exit_enabled", torch.tensor(False))
            self.exit_enabled_host = False  # exit_enabled, read without a host sync in forward
            self.register_load_state_dict_post_hook(read_exit_enabled)
            self.set_exit_threshold(exit_threshold)

        n_residual = sum(isinstance(m, (ResNetBKBlock, MLPRefine)) for m in self.modules())
        self.init_weights(n_residual=n_residual)
        # The techniques' own inits, after the model-wide one (as their models do it).
        if self.act is not None:
            for unit in self.act.halting:
                unit.reset_parameters()
        if adaptive_length:
            self.boundary.reset_bias()
        for layer in sparse_layers(self):
            layer.reset_sparsity_parameters()
        self.conditional_moe = conditional_moe
        if conditional_moe:  # every BK layer's feed-forward, the sparse ones included
            for layer in (m for m in self.modules() if isinstance(m, BKLayer)):
                moe = ConditionalMoEFeedForward(
                    c.d_model, c.ffn_width, c.num_experts, top_p, min_experts, max_experts, c.dropout
                )
                moe.apply(init_weights)
                nn.init.normal_(moe.experts.c_proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * n_residual))
                layer.moe = moe

    # ------------------------------------------------------------------ the training module's hooks
    def set_temperature(self, tau: float) -> None:
        """The Gumbel-sigmoid temperature of every sparse layer (callbacks.SparsityTemperature)."""
        set_temperature(self, tau)

    def set_exit_threshold(self, threshold: float | None) -> None:
        """The confidence at which positions exit; None or +inf: no exits."""
        if not self.early_exit:
            raise ValueError(f"{type(self).__name__}: early exit is off; set early_exit: true to use a threshold.")
        if threshold is not None and (math.isnan(threshold) or threshold < 0):
            raise ValueError(f"{type(self).__name__}: exit_threshold must be >= 0, +inf or None, got {threshold}.")
        enabled = threshold is not None and math.isfinite(threshold)
        self.exit_enabled.fill_(enabled)
        self.exit_enabled_host = enabled
        self.exit_threshold.fill_(threshold if enabled else 0.0)

    def get_exit_threshold(self) -> float | None:
        """The threshold in use, or None when positions do not exit (always None with early exit off)."""
        if not self.early_exit:
            return None
        return float(self.exit_threshold) if self.exit_enabled_host else None

    # ------------------------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, exits: bool | None = None) -> LMOutput:
        enabled = self.early_exit and self.exit_enabled_host
        if exits is None:
            exits = not self.training and enabled
        if exits and not enabled:
            raise ValueError(
                f"{type(self).__name__}: exits=True needs early exit on and a threshold (set_exit_threshold)."
            )
        bsz, n = input_ids.shape
        x = self.embed(input_ids)  # (B, N, D)
        aux_all: dict[str, list] = {}  # name -> (value, weight), one per block (or stack step) that ran
        stat_all: dict[str, list] = {}

        def record(aux: dict, stats: dict, weight=1.0) -> None:
            add_weighted(aux_all, aux, weight)
            add_weighted(stat_all, stats, weight)

        extra_aux, extra_stats = {}, {}
        if self.adaptive_length:
            x, extra_aux, extra_stats = self._learned_length(x, record)
        logits, hidden, stack_aux, stack_stats = self._stack(x, record, self.exit_threshold if exits else None)

        aux_losses, stats = weighted_means(aux_all), weighted_means(stat_all)
        aux_losses.update(extra_aux)
        aux_losses.update(stack_aux)
        stats.update(extra_stats)
        stats.update(stack_stats)
        if self.early_exit:
            return EarlyExitOutput(logits, aux_losses, stats, layer_hidden=hidden)
        return LMOutput(logits=logits, aux_losses=aux_losses, stats=stats)

    def _learned_length(self, x: torch.Tensor, record) -> tuple[torch.Tensor, dict, dict]:
        """AdaptiveLengthLM's pre -> pool -> inner -> upsample: (B, N, D) -> ((B, N, D), aux, stats)."""
        bsz, n, d = x.shape
        for block in self.pre_blocks:
            x, aux, stats = block(x)
            record(aux, stats)
        b, p = self.boundary(x)  # (B, N) straight-through boundaries, probabilities
        slots = segment_slots(self.capacity, n)  # None: the batch's most closed segments (a host read)
        z, closed, k_pad = segment_pool(x, b, self.length_multiple, slots)  # (B, K_pad, D)
        if k_pad > 0:  # dropout in the inner blocks is drawn per closing position, on the (B, N) grid
            gathered = (segment_close_positions(b, k_pad), bsz * n)
            for block in self.inner_blocks:
                z, aux, stats = block(z, gathered)
                record(aux, stats)
        else:  # nothing to run; the random stream after this does not depend on it
            consume_dropout(self.inner_blocks, bsz * n, d, x)
        x = x + causal_upsample(z, b, self.null)

        aux: dict[str, torch.Tensor] = {}
        stats: dict[str, torch.Tensor] = {}
        if self.prior_rate is None:
            aux["length"] = (b.sum(1) / max(n, 1)).mean()
        else:
            aux["boundary_prior"] = boundary_prior_nll(b, self.prior_rate)
        if self.rate_target is not None:
            aux["rate_constraint"], stats["thresholded_rate"] = boundary_rate_constraint(p, self.rate_target)
        stats["compression_ratio"] = (bsz * n) / closed.sum().clamp_min(1)
        stats["inner_length_fraction"] = torch.full((), k_pad / max(n, 1), device=x.device)
        stats["boundary_rate"] = (b.detach() > 0.5).float().mean()
        stats["boundary_prob_mean"] = p.detach().mean()
        if slots is not None:
            stats["length_capacity_overflow"] = 1 - closed.sum() / (b.detach() > 0.5).sum().clamp_min(1)
        return x, aux, stats

    def _step(self, block: nn.Module, x: torch.Tensor, running: Optional[torch.Tensor], slots: Optional[int]):
        """One stack step: (x (B, N, D), running (B, N) bool or None = all, slots: None or the rows
        per sequence of the static gather) -> (x_new, aux, stats, work). x_new is meaningless where
        not running (the caller keeps the frozen state there)."""
        b, n, _ = x.shape
        if isinstance(block, MultiScaleSparseBlock):  # its predictors choose the rows (module docstring)
            x_new, aux, stats, work = block(x)
            return x_new, aux, _sparse_stats(stats), work
        if isinstance(block, MultiScaleBlock):
            return block(x, running, slots)
        if isinstance(block, SparseResNetBKBlock):
            x_new, aux, stats = block(x)
            work = {"ffn_rows/res1": block.bk.last_rows, "mix_tokens/res1": block.bk.last_rows}
            return x_new, aux, _sparse_stats(stats), work
        x_new, aux, stats, rows = run_bk_block(block, x, running, slots)
        return x_new, aux, stats, {"ffn_rows/res1": rows, "mix_tokens/res1": b * n}

    def _full_ffn_rows(self, b: int, n: int) -> int:
        """Feed-forward rows of one stack step that runs every position (no halting, exit or sparsity)."""
        if not self.multiscale:
            return b * n
        half = n // 2
        if not self.hierarchical:
            return b * n + b * half
        return b * n + 2 * b * half + b * (half // 2)

    def _halting_probability(self, l: int, x: torch.Tensor, idx: Optional[torch.Tensor]) -> torch.Tensor:
        """(B, N) p_l of ACT's unit l, computed on the running rows (flat indices idx; None: all), 0 elsewhere."""
        unit = self.act.halting[l]
        if idx is None:
            return unit(x)
        b, n, d = x.shape
        p_run = unit(x.reshape(b * n, d).index_select(0, idx))
        return x.new_zeros(b * n, dtype=p_run.dtype).index_copy(0, idx, p_run).view(b, n)

    def _stack(self, x: torch.Tensor, record, exit_threshold: Optional[torch.Tensor]):
        """The stack under the depth rule of the module docstring: x (B, N, D), exit_threshold a
        0-dim tensor (exits on) or None -> (logits (B, N, V), layer_hidden [e_1 .. e_{L-1}] (training
        the exits; empty with exits), aux, stats)."""
        b, n, d = x.shape
        n_steps = len(self.blocks)
        act, exits = self.act is not None, exit_threshold is not None
        adaptive = act or exits
        static = adaptive and self.capacity is not None  # fixed-size gathers, no host sync
        slots = max(1, math.ceil(self.capacity * n)) if static else None
        cum = x.new_zeros(b, n, dtype=torch.promote_types(x.dtype, torch.float32))  # sum of p before halting
        remainder, n_updates = torch.zeros_like(cum), torch.zeros_like(cum)
        cut = cum.new_zeros(2)  # capacity: position-steps cut, asked for
        running = torch.ones(b, n, dtype=torch.bool, device=x.device)
        exited = torch.zeros_like(running)  # left by the confidence test
        y = torch.zeros_like(x)  # the ACT-weighted output
        halt_frac = [cum.new_zeros(()) for _ in range(n_steps)]
        hidden: list[torch.Tensor] = []
        # With exits, rows written as positions halt where the head ran: (B*N, V); static: the latest
        # logits of each position, (B*N + 1, V), row B*N taking the padding slots'.
        logits = None
        written = torch.zeros(b * n, dtype=torch.bool, device=x.device)
        work: dict[str, int] = {}
        steps_run, idx = 0, None  # idx: flat indices of the running positions; None while all run
        for l, block in enumerate(self.blocks):
            last = l == n_steps - 1
            step_weight = 1.0  # of this step's aux losses and stats in their means over steps
            all_running = idx is None
            if static and l > 0:
                # Each row's first `slots` running positions take the step; the others halt here
                # with the state they have (Graves' remainder), like positions halting at step l.
                running, y, remainder, over, cut = halt_overflow(running, slots, cum, x, y, remainder, cut)
                halt_frac[l - 1] = halt_frac[l - 1] + over.float().mean()
                step_weight = running.any().to(cum.dtype)  # a step with no running position adds nothing
                all_running = False
            elif l > 0 and adaptive:
                idx = active_rows(running)  # one host sync per step: skip the rest, or gather
                if idx.numel() == 0:
                    break  # every position has halted: the remaining steps change no output
                if idx.numel() == b * n:
                    idx = None
                all_running = idx is None
            x_new, aux, stats, step_work = self._step(block, x, None if all_running else running, slots)
            record(aux, stats, step_weight)
            steps_run += 1
            for k, v in step_work.items():
                work[k] = work.get(k, 0) + v
            x = x_new if all_running else torch.where(running.unsqueeze(-1), x_new, x)  # halted: frozen

            if act and not last:
                if static:  # every position, masked: no gather of a data-dependent size
                    p = torch.where(running, self.act.halting[l](x), 0.0)
                else:
                    p = self._halting_probability(l, x, idx)
                new_cum = cum + p
                halt_now = running & (new_cum >= self.act.threshold)
            else:
                p = new_cum = cum
                halt_now = running if last else torch.zeros_like(running)
            if self.early_exit and not last:
                # e_l: the output if the position halted here (for halted ones: their final y)
                exit_state = y + torch.where(running, 1.0 - cum, torch.zeros_like(cum)).unsqueeze(-1).to(x.dtype) * x
                if not exits:
                    hidden.append(exit_state)
                elif l + 1 >= self.min_exit_layer and static:
                    first = l + 1 == self.min_exit_layer
                    logits, by_confidence = self._exit_test_static(
                        exit_state, running, slots, first, logits, exit_threshold
                    )
                    exited = exited | by_confidence
                    halt_now = halt_now | by_confidence
                elif l + 1 >= self.min_exit_layer:
                    rows = idx if idx is not None else torch.arange(b * n, device=x.device)
                    layer_logits = self.head(exit_state.reshape(b * n, d).index_select(0, rows))  # running rows
                    by_confidence = confidence(layer_logits, self.confidence) >= exit_threshold
                    exited.view(-1).index_copy_(0, rows, by_confidence)
                    halt_now = halt_now | (running & exited)
                    leaving = halt_now.view(-1).index_select(0, rows)  # either cause: e_l is their output
                    if logits is None:
                        logits = layer_logits.new_zeros(b * n, layer_logits.shape[-1])
                    logits.index_copy_(0, rows[leaving], layer_logits[leaving])
                    written.index_fill_(0, rows[leaving], True)
            cont = running & ~halt_now
            # Graves: weight p_l while running on, the remainder 1 - cum at the halting step.
            weight = torch.where(halt_now, 1.0 - cum, torch.where(cont, p, torch.zeros_like(p)))
            y = y + weight.unsqueeze(-1).to(x.dtype) * x
            remainder = torch.where(halt_now, 1.0 - cum, remainder)
            n_updates = n_updates + running.to(n_updates.dtype)
            cum = torch.where(cont, new_cum, cum)
            halt_frac[l] = halt_now.float().mean()
            if last and static and logits is not None:  # the positions of the last step: head(y) there
                logits = self._head_slots(y, running, slots, logits)[0]
            running = cont
        if self.early_exit and not exits:
            hidden += [y] * (n_steps - 1 - len(hidden))  # steps skipped once all halted: their output is final

        if logits is None:
            logits = self.head(y)  # (B, N, V)
        elif static:
            logits = logits[: b * n].view(b, n, -1)
        else:  # the head has not run at the halting step of these rows
            rest = (~written).nonzero().squeeze(1)
            if rest.numel() > 0:
                logits.index_copy_(0, rest, self.head(y.reshape(b * n, d).index_select(0, rest)).to(logits.dtype))
            logits = logits.view(b, n, -1)

        aux: dict[str, torch.Tensor] = {}
        stats: dict[str, torch.Tensor | float] = {}
        if act:
            aux["ponder"] = (n_updates + remainder).mean()
            stats["layers_executed"] = n_updates.detach().mean()
            stats["layers_run"] = float(steps_run)
            for l, f in enumerate(halt_frac):
                stats[f"halt_frac/{l + 1}"] = f.detach()
        if self.early_exit:
            stats["exit_layer_mean"] = n_updates.detach().mean()
            stats["exit_frac"] = exited.float().mean()
        if static:
            stats["capacity_overflow"] = (cut[0] / cut[1].clamp_min(1)).detach()
        ran = sum(v for k, v in work.items() if k.startswith("ffn_rows/"))
        stats["ffn_rows_fraction"] = torch.full(
            (), ran / max(n_steps * self._full_ffn_rows(b, n), 1), device=logits.device
        )
        if self.multiscale:
            stats.update(work_stats(work, b * n))
        return logits, hidden, aux, stats

    def _head_slots(self, state: torch.Tensor, running: torch.Tensor, slots: int, logits: Optional[torch.Tensor]):
        """The head on each row's running positions, static shapes: state (B, N, D), running (B, N)
        bool with at most `slots` True per row -> (logits (B*N + 1, V) with those positions' rows
        written (padding slots: row B*N), their logits (B*slots, V))."""
        index, valid, _ = capacity_rows(running, slots)
        return head_on_slots(self.head, state, index, valid, logits)

    def _exit_test_static(self, exit_state, running, slots, first, logits, threshold):
        """The exit test of one step, static shapes: exit_state (B, N, D) e_l, running (B, N) bool
        (at most `slots` per row unless `first`), logits as _head_slots' -> (logits, by_confidence
        (B, N) bool: running positions whose confidence reaches the threshold). The first test
        scores every position, so a position halted earlier gets head(e_l) = head(its final y)."""
        b, n, d = exit_state.shape
        if first:
            rows = self.head(exit_state).reshape(b * n, -1)
            if logits is None:
                logits = rows.new_zeros(b * n + 1, rows.shape[-1])
            logits[: b * n] = rows
            done = (confidence(rows, self.confidence) >= threshold).view(b, n)
        else:
            logits, rows = self._head_slots(exit_state, running, slots, logits)
            done_rows = confidence(rows, self.confidence) >= threshold
            done = scatter_rows(done_rows[:, None], running, torch.zeros_like(running)[..., None])[..., 0]
        return logits, running & done


def _sparse_stats(stats: dict) -> dict:
    """A sparse block's stats with its layers' "capacity_overflow" named "sparse_capacity_overflow"
    (the step loop's own "capacity_overflow" is another count)."""
    if "capacity_overflow" not in stats:
        return stats
    stats = dict(stats)
    stats["sparse_capacity_overflow"] = stats.pop("capacity_overflow")
    return stats
