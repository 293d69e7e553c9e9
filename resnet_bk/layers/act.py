"""Adaptive computation time over layers, per position, with the skipped work really skipped.

References:
1) Graves 2016, "Adaptive Computation Time for Recurrent Neural Networks": the halting unit
   p = sigmoid(w . s + b), the cumulative halting probability, the remainder R and the ponder
   cost N + R.
2) Dehghani et al. 2019, "Universal Transformers" (tensor2tensor): ACT over depth per position,
   halting threshold 1 - eps with eps = 0.01, halting bias initialised to 1.0.

The rule, for a stack of L steps (layers) and each position t on its own:

    s_0 = input;  s_l = step_l(s_{l-1})              for the steps position t takes
    p_l = sigmoid(w_l . norm(s_l) + b_l)               read from s_l only, for l = 1..L-1
    N   = the first l with p_1 + ... + p_l >= threshold, else L (the last step always halts)
    R   = 1 - (p_1 + ... + p_{N-1})                    the remainder
    out = sum_{l<N} p_l s_l + R s_N                    the ACT-weighted state (a convex combination)
    ponder = N + R                                     (its gradient flows through R only)

Causality (docs/design.md section 3): p_l at t reads s_l at t, which every step computes from positions
0..t (the BK-core is causal), so N(t), R(t) and the output at t depend on tokens 0..t only.
Stopping the layer loop once every position of the batch has halted changes no output (a halted
position's output is final), so that batch-wide decision leaks nothing either; the steps it skips
draw no dropout, so a model using AdaptiveDepth draws no noise after it (the ACT models here run
only the final LayerNorm and head). Dropout in a step is drawn for every position and gathered
(resnet_bk.layers.dropout), so a running position's mask does not depend on which others halted.

What a halted position costs in a later step (`run_bk_block` below):
  skipped:  its feed-forward / MoE rows (the running rows are gathered, run and scattered back),
            its halting unit, and the whole step once every position of the batch has halted;
  not skipped: the step's LayerNorm and the BK-core `mix` (v_proj, the O(N) resolvent scan and
            the Linear(2 -> D) read-out) over the whole sequence, because the resolvent chain at a
            running position t runs through every position before it. A halted position enters
            the mix with its frozen state in place of the feed-forward output: h = LN(x_frozen)
            (the feed-forward is replaced by the identity), and its state stays x_frozen whatever
            the step computes there.
The mix is O(N) with a small constant (about 6 D FLOPs per position) against about 16 D^2 per
position for the feed-forward at d_ff = 4D, so skipping the feed-forward is where the saving is.

Static shapes (`capacity`, default None). The path above gathers exactly the running rows: their
number is read back to the host at every step (data-dependent shapes), and the loop stops on a
value read back too. With a capacity c in (0, 1] nothing is read back and every shape is fixed:
  - step 1 runs every position (no position has halted yet);
  - every later step gathers K_cap = ceil(c N) slots per sequence (row of the batch): the row's
    FIRST K_cap running positions, in order, then padding slots that run and are discarded (they
    reach no expert's matmul and stay out of the MoE load statistics);
  - overflow: a running position beyond its row's first K_cap halts before the step, with the
    state it has (weight R = 1 - cum, as at any halting step; N = the steps it took), and is
    counted in the stat "capacity_overflow" (overflowing / running, over steps 2..L);
  - the loop always runs the L steps: a step where every position has halted runs on padding;
  - halting units run on every position and are masked (O(D) per position, like the mix).
Whether position t gets a slot depends on how many positions s <= t of its row are running, i.e.
on tokens 0..t only: causal. Dropout draws the whole grid at every step either way, so the random
stream is the same at every capacity. capacity=1.0 never overflows and gives the values and
gradients of the exact path. A list of fractions gives each of steps 2..L its own capacity, e.g.
[1.0, 0.1, 0.1] for a stack where most positions halt after step 2: step 2 runs every position and
steps 3 and 4 only a tenth of the slots.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from resnet_bk.layers.bk_layer import ResNetBKBlock
from resnet_bk.layers.dropout import consume_dropout
from resnet_bk.reduced_chain import pack_kept

#: A step of the stack: (x (B, N, D), running (B, N) bool or None = all[, slots]) ->
#: (x_new (B, N, D), aux_losses, stats, work). x_new is ignored at positions that are not running;
#: work counts what the step executed, e.g. {"ffn_rows/res1": rows} (plain ints). AdaptiveDepth
#: passes the third argument `slots` (an int) only with a capacity: the step then gathers that many
#: rows per sequence (static shapes, see capacity_rows), and running holds at most `slots` per row.
Step = Callable[..., tuple]


def active_rows(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """(B, N) bool mask -> flat indices (T,) into B*N of its True entries; None (all) stays None.

    One host sync (the number of running rows decides the shapes of the gathered work).
    """
    return None if mask is None else mask.reshape(-1).nonzero().squeeze(1)


def capacity_rows(mask: torch.Tensor, slots: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Static-shape gather of each row's first `slots` True positions, no host sync.

    mask (B, n) bool -> (index (B * slots,) long: flat positions into B * n, padding slots at their
    row's position 0; valid (B * slots,) bool, False at padding; within (B, n) bool: the positions
    that got a slot, i.e. mask & (the count of True up to and including t <= slots)).
    """
    b, n = mask.shape
    pos, valid, _ = pack_kept(mask, slots)  # (B, slots) each
    index = (torch.arange(b, device=mask.device)[:, None] * n + pos).reshape(-1)
    within = mask & (mask.long().cumsum(1) <= slots)
    return index, valid.reshape(-1), within


def scatter_rows(rows: torch.Tensor, within: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Inverse of capacity_rows: rows (B * slots, D) -> (B, n, D), position t of row b taking its
    slot's row where within (B, n), fill (B, n, D) elsewhere. A gather (its backward adds each
    position's gradient into its slot once): no scatter of the padding slots."""
    b, n, d = fill.shape
    slots = rows.shape[0] // max(b, 1)
    slot = (within.long().cumsum(1) - 1).clamp(0, max(slots - 1, 0))  # (B, n)
    taken = torch.gather(rows.reshape(b, slots, d), 1, slot[..., None].expand(b, n, d))
    return torch.where(within[..., None], taken.to(fill.dtype), fill)


def halt_overflow(running: torch.Tensor, slots: int, cum, x: torch.Tensor, y: torch.Tensor, remainder, cut):
    """Static shapes: each row's first `slots` running positions take the next step; the others halt
    now with the state they have (Graves' remainder 1 - cum, as at any halting step).

    running (B, N) bool, cum and remainder (B, N), x the current state and y the ACT-weighted output
    (B, N, D), cut (2,) the totals [positions halted here, positions asked for] so far ->
    (running (B, N) bool, at most `slots` per row; y; remainder; over (B, N) bool, the positions
    halted here; cut with this step's counts added).
    """
    _, _, within = capacity_rows(running, slots)
    over = running & ~within
    y = y + torch.where(over, 1.0 - cum, 0.0).unsqueeze(-1).to(x.dtype) * x
    remainder = torch.where(over, 1.0 - cum, remainder)
    cut = cut + torch.stack([over.sum(), running.sum()]).to(cut.dtype)
    return within, y, remainder, over, cut


def run_bk_block(
    block: ResNetBKBlock, x: torch.Tensor, running: Optional[torch.Tensor] = None, slots: Optional[int] = None
):
    """One pre-norm ResNet-BK block, x + BKLayer(LN(x)), with the feed-forward on running rows only.

    Args:
        block: a ResNetBKBlock (its ln, bk.feed_forward and bk.mix are used).
        x: (B, N, D) state.
        running: (B, N) bool, the positions whose feed-forward runs; None: all of them.
        slots: None: exactly the running rows are gathered (one host sync). An int: static shapes,
            B * slots rows, each row's first `slots` running positions then padding (capacity_rows);
            a running position beyond them is treated as not running (callers cap `running` first).
    Returns:
        (x + out (B, N, D), aux_losses, stats, ffn_rows). At a position that is not running the
        feed-forward output is replaced by LN(x) (see the module docstring) and the returned state
        there is meaningless to the caller, who keeps its frozen state. ffn_rows: rows that entered
        the feed-forward (B * slots with slots, padding included).
    """
    b, n, d = x.shape
    xn = block.ln(x)
    if running is not None and slots is not None:
        index, valid, within = capacity_rows(running, slots)
        rows_in = xn.reshape(b * n, d).index_select(0, index)
        h_run, aux, stats = block.bk.feed_forward(rows_in, (index, b * n), valid)
        h = scatter_rows(h_run, within, xn)
        out, mix_stats = block.bk.mix(h)
        return x + out, aux, {**stats, **mix_stats}, b * slots
    idx = active_rows(running)
    if idx is None or idx.numel() == b * n:
        h, aux, stats = block.bk.feed_forward(xn)
        rows = b * n
    else:
        flat = xn.reshape(b * n, d)
        rows = idx.numel()
        if rows == 0:  # nothing runs (e.g. a coarse level whose pairs have all halted)
            h, aux, stats = xn, {}, {}
            consume_dropout(block.bk.moe, b * n, d, x)  # the stream after this does not depend on it
        else:
            h_run, aux, stats = block.bk.feed_forward(flat.index_select(0, idx), (idx, b * n))
            h = flat.index_copy(0, idx, h_run.to(flat.dtype)).view(b, n, d)
    out, mix_stats = block.bk.mix(h)  # the whole sequence: the resolvent chain needs every position
    stats = {**stats, **mix_stats}
    return x + out, aux, stats, rows


class HaltingUnit(nn.Module):
    """p = sigmoid(w . LN(s) + b) per position; LN without parameters makes p independent of the
    scale of the residual stream. (..., D) -> (...,)."""

    def __init__(self, d_model: int, bias_init: float = 1.0):
        super().__init__()
        self.proj = nn.Linear(d_model, 1)
        self.bias_init = bias_init
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.proj.weight, mean=0.0, std=0.02)
        nn.init.constant_(self.proj.bias, self.bias_init)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(self.proj(F.layer_norm(s, s.shape[-1:])).squeeze(-1))
        return p.to(torch.promote_types(p.dtype, torch.float32))  # at least float32 (autocast: bf16)


class AdaptiveDepth(nn.Module):
    """Graves' ACT over a stack of `n_steps` steps; it owns only the n_steps - 1 halting units.

    forward(x, steps) with x (B, N, D) and `steps` a sequence of n_steps callables (see `Step`)
    returns (y, aux_losses, stats, work):
        y: (B, N, D) the ACT-weighted state;
        aux_losses: {"ponder": mean over positions of N + R} plus the steps' aux losses, each
            averaged over the steps that ran;
        stats: "layers_executed" (mean N over positions), "layers_run" (steps the batch entered),
            "halt_frac/<l>" (fraction of positions halting at step l, l = 1..n_steps), and the
            steps' stats averaged over the steps that ran;
        work: the steps' work counts, summed over the steps that ran.

    Args:
        d_model: width of the state.
        n_steps: L, the most steps a position can take.
        threshold: a position halts once its cumulative halting probability reaches this (1 - eps).
        halt_bias_init: initial bias of every halting unit; 1.0 (p ~ 0.73) as in Universal
            Transformers, so at initialisation every position halts at step 2. A negative value
            (e.g. -2: p ~ 0.12) starts with every position running all steps.
        capacity: None: the running rows are gathered exactly and the loop ends once every
            position has halted (host syncs, data-dependent shapes). A fraction c in (0, 1]: static
            shapes, no host sync (see the module docstring): steps 2..L gather ceil(c N) slots per
            sequence and call step(x, running, slots); overflow halts early, counted in the stat
            "capacity_overflow"; "layers_run" is then always n_steps. A list of n_steps - 1
            fractions: one per step 2..L.
    """

    def __init__(
        self,
        d_model: int,
        n_steps: int,
        threshold: float = 0.99,
        halt_bias_init: float = 1.0,
        capacity: Optional[float] = None,
    ):
        super().__init__()
        if n_steps < 1:
            raise ValueError(f"AdaptiveDepth: n_steps must be >= 1, got {n_steps}.")
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"AdaptiveDepth: threshold must be in (0, 1], got {threshold}.")
        check_capacity("AdaptiveDepth", capacity, n_steps - 1)
        self.n_steps, self.threshold, self.capacity = n_steps, threshold, capacity
        # The last step always halts, so it needs no halting unit.
        self.halting = nn.ModuleList(HaltingUnit(d_model, halt_bias_init) for _ in range(n_steps - 1))

    def forward(self, x: torch.Tensor, steps: Sequence[Step]):
        if len(steps) != self.n_steps:
            raise ValueError(f"AdaptiveDepth: expected {self.n_steps} steps, got {len(steps)}.")
        b, n, d = x.shape
        static = self.capacity is not None
        step_slots = capacity_slots(self.capacity, n, self.n_steps - 1) if static else None  # steps 2..L
        # sum of p over the steps taken, before halting; at least float32 (under autocast too)
        cum = x.new_zeros(b, n, dtype=torch.promote_types(x.dtype, torch.float32))
        remainder = torch.zeros_like(cum)
        n_updates = torch.zeros_like(cum)
        running = torch.ones(b, n, dtype=torch.bool, device=x.device)
        y = torch.zeros_like(x)
        halt_frac = [cum.new_zeros(()) for _ in range(self.n_steps)]
        cut = cum.new_zeros(2)  # capacity: position-steps cut, asked for
        aux_sums: dict[str, list] = {}  # name -> (value, weight), one per step that returned it
        stat_sums: dict[str, list] = {}
        work: dict[str, int] = {}
        steps_run = 0
        idx = None  # flat indices of the running positions; None while all run
        for l, step in enumerate(steps):
            weight = 1.0  # of this step's aux losses and stats in their means over steps
            if static and l > 0:
                # Each row's first `slots` running positions take the step; the others halt here
                # with the state they have (Graves' remainder), like positions halting at step l.
                slots = step_slots[l - 1]
                running, y, remainder, over, cut = halt_overflow(running, slots, cum, x, y, remainder, cut)
                halt_frac[l - 1] = halt_frac[l - 1] + over.float().mean()
                weight = running.any().to(cum.dtype)  # a step with no running position adds nothing
                all_running = False
                x_new, aux, stats, step_work = step(x, running, slots)
            else:
                if l > 0:
                    idx = active_rows(running)  # one host sync per step: skip the step, or gather
                    if idx.numel() == 0:
                        break  # every position has halted: the remaining steps change no output
                    if idx.numel() == b * n:
                        idx = None
                all_running = idx is None
                x_new, aux, stats, step_work = step(x, None if all_running else running)
            steps_run += 1
            add_weighted(aux_sums, aux, weight)
            add_weighted(stat_sums, stats, weight)
            for k, v in step_work.items():
                work[k] = work.get(k, 0) + v
            # Halted positions keep their frozen state.
            x = x_new if all_running else torch.where(running.unsqueeze(-1), x_new, x)

            if l < self.n_steps - 1:
                if static:  # every position, masked: no gather of a data-dependent size
                    p = torch.where(running, self.halting[l](x), 0.0)
                else:
                    p = self._halting_probability(l, x, idx)
                new_cum = cum + p
                halt_now = running & (new_cum >= self.threshold)
            else:
                p = new_cum = cum
                halt_now = running
            cont = running & ~halt_now
            # Graves: weight p_l while running on, the remainder 1 - cum at the halting step.
            weight = torch.where(halt_now, 1.0 - cum, torch.where(cont, p, torch.zeros_like(p)))
            y = y + weight.unsqueeze(-1).to(x.dtype) * x
            remainder = torch.where(halt_now, 1.0 - cum, remainder)
            n_updates = n_updates + running.to(n_updates.dtype)
            cum = torch.where(cont, new_cum, cum)
            halt_frac[l] = halt_now.float().mean()
            running = cont

        aux_losses = weighted_means(aux_sums)
        aux_losses["ponder"] = (n_updates + remainder).mean()
        stats = weighted_means(stat_sums)
        stats["layers_executed"] = n_updates.detach().mean()
        stats["layers_run"] = float(steps_run)
        for l, f in enumerate(halt_frac):
            stats[f"halt_frac/{l + 1}"] = f.detach()
        if static:
            stats["capacity_overflow"] = (cut[0] / cut[1].clamp_min(1)).detach()
        return y, aux_losses, stats, work

    def _halting_probability(self, l: int, x: torch.Tensor, idx: Optional[torch.Tensor]) -> torch.Tensor:
        """(B, N) p_l, computed on the running rows (flat indices idx; None: all) only, 0 elsewhere."""
        if idx is None:
            return self.halting[l](x)
        b, n, d = x.shape
        p_run = self.halting[l](x.reshape(b * n, d).index_select(0, idx))
        return x.new_zeros(b * n, dtype=p_run.dtype).index_copy(0, idx, p_run).view(b, n)


def _is_fraction(c) -> bool:
    return isinstance(c, (int, float)) and not isinstance(c, bool) and 0.0 < c <= 1.0


def check_capacity(owner: str, capacity, steps: Optional[int] = None) -> None:
    """A ValueError naming `owner` unless capacity is None or a fraction in (0, 1]; with `steps`, a
    list of `steps` such fractions (one per gathered step) is accepted too."""
    if capacity is None or _is_fraction(capacity):
        return
    if steps is not None and isinstance(capacity, (list, tuple)):
        if len(capacity) == steps and all(_is_fraction(c) for c in capacity):
            return
        raise ValueError(
            f"{owner}: a capacity list needs {steps} fractions in (0, 1] (one per step after the first), "
            f"got {list(capacity)!r}."
        )
    raise ValueError(
        f"{owner}: capacity must be None (exact gather) or a fraction in (0, 1] of the positions"
        + (f" (or a list of {steps}, one per step after the first)" if steps is not None else "")
        + f", got {capacity!r}."
    )


def capacity_slots(capacity, n: int, steps: int) -> list[int]:
    """Slots per sequence for each of `steps` gathered steps: ceil(c N), at least 1, for a capacity c
    (the same for every step) or a list of them (one per step)."""
    fractions = list(capacity) if isinstance(capacity, (list, tuple)) else [capacity] * steps
    return [max(1, math.ceil(c * n)) for c in fractions]


def add_weighted(sums: dict[str, list], values: dict, weight=1.0) -> None:
    """Append (value, weight) to sums[name] for every entry of values (see weighted_means)."""
    for k, v in values.items():
        sums.setdefault(k, []).append((v, weight))


def weighted_means(sums: dict[str, list]) -> dict:
    """name -> sum(w v) / sum(w) over its (value, weight) pairs; with every weight the Python 1.0
    the plain mean. Tensor weights (0 or 1, e.g. "this step had a running position") keep the
    mean over the steps that did work without reading that back to the host."""
    out = {}
    for k, pairs in sums.items():
        if all(isinstance(w, float) and w == 1.0 for _, w in pairs):
            out[k] = sum(v for v, _ in pairs) / len(pairs)
        else:
            total = sum(w for _, w in pairs)
            out[k] = sum(w * v for v, w in pairs) / (
                total.clamp_min(1) if isinstance(total, torch.Tensor) else max(total, 1)
            )
    return out
