"""Learned sparsity in the ResNet-BK layer: a causal importance predictor picks the positions whose
feed-forward, potential and resolvent read-out run; the others get a causal interpolation of the
outputs of earlier kept positions. The skipped work is really skipped (gathered rows).

References:
1) The ResNet-BK seed documents 001 and 003: importance predictor, Gumbel-sigmoid masks, a
   sparsity loss toward a target, interpolation of skipped positions. Their predictor and
   interpolator use centred convolutions and their inference takes the top-k positions of the whole
   sequence (both see the future); their sparse core computes everything and then masks it.
2) Jang et al. 2017 / Maddison et al. 2017 (Gumbel-softmax, Concrete): the relaxed Bernoulli
   sigmoid((l + log u - log(1 - u)) / tau) and the straight-through hard sample.

One layer, with x already layer-normed by the block:

    l    = ImportancePredictor(x)                 (B, N) logits; causal (left-padded depthwise conv)
    keep = train: sigmoid((l + logistic noise)/tau) > 0.5       (P(keep) = sigmoid(l) at any tau)
           eval:  l > threshold, threshold = EMA over training batches of the target_sparsity-
                  quantile of l (calibrated on training data; a per-position rule, no top-k)
    rows = the kept positions, gathered:  h = MoE(x[rows]),  v = v_proj(h)  (T, C): C chains
           (capacity set: each row's first K_cap = ceil(capacity N) kept positions, in a static
           (B, K_cap) layout, see SparseBKLayer),
           g = causal BK-core of each chain at the kept positions (core="reduced": the Schur-complement
               chain of length K, resnet_bk.reduced_chain; core="full": the length-N chain with v_skip
               at the skipped positions), y = BKLayer.read_out(h, [Re g, Im g])      (rows only)
    out  = m * scatter(y) + (1 - m) * Interp(scatter(y), keep)
           m = the hard mask (straight-through gradient to the soft mask in training)
    Interp: position t takes the output of the last kept position s < t (zero-order hold),
            then a left-padded depthwise conv over that hold (taps t, t-1, ...: all earlier kept).
    aux "sparsity" = (mean(1 - sigmoid(l)) - target)^2: the expected skipped fraction of the hard
            mask against the target (unweighted; the training module weights it).

Skipped positions enter the resolvent chain with a learned constant potential v_skip (they have
no feed-forward output to read one from). Causality (docs/design.md section 3): l at t reads x at t, t-1,
.. (left-padded conv); the mask at t is a per-position test of l_t; the core is causal in both
forms; the interpolation at t reads kept outputs at s < t only. So nothing at t depends on t' > t.

What a skipped position costs: the predictor (a depthwise conv and a D -> 1 product), the hold and
the interpolation conv (O(D) each); NOT the MoE feed-forward (16 D^2 FLOPs at d_ff = 4D), v_proj,
g_proj, nor (core="reduced") a step of the resolvent sweep.

target_sparsity = 0 builds no predictor and runs exactly the dense BKLayer.

The BK-core runs as resnet_bk.bk_core.resolve_method("auto") says: the fused Triton kernels on CUDA
(resnet_bk.kernels.reduced_triton for core="reduced"), the PyTorch reference otherwise.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from resnet_bk.bk_core import resolve_method
from resnet_bk.layers.bk_layer import BKLayer, ResNetBKBlock
from resnet_bk.layers.dropout import Gathered, consume_dropout
from resnet_bk.layers.resolvent import ResolventConfig
from resnet_bk.reduced_chain import kept_green_diagonal_full, pack_kept, reduced_green_diagonal

Core = Literal["reduced", "full"]


def gumbel_sigmoid(logits: torch.Tensor, tau: float, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(hard {0,1} mask with a straight-through gradient, soft relaxed sample), both like logits.

    soft = sigmoid((logits + log u - log(1 - u)) / tau), u ~ U(0, 1); hard = soft > 0.5, whose
    probability is sigmoid(logits) whatever tau is (tau only shapes the gradient).
    """
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
    u = u.clamp(1e-6, 1 - 1e-6)
    soft = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / tau)
    hard = (soft > 0.5).to(soft.dtype)
    return hard - soft.detach() + soft, soft


class CausalDepthwiseConv(nn.Module):
    """(B, N, D) -> (B, N, D): y_t = sum_j weight[:, j] * x_{t-k+1+j} + bias, per channel, with
    zeros before position 0 (a left-padded depthwise convolution, written as k shifted products:
    k is 2-4, and this avoids the slow CPU path of grouped conv1d)."""

    def __init__(self, d_model: int, kernel_size: int, identity_init: bool = False):
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"CausalDepthwiseConv: kernel_size must be >= 1, got {kernel_size}.")
        self.kernel_size, self.identity_init = kernel_size, identity_init
        self.weight = nn.Parameter(torch.empty(d_model, kernel_size))
        self.bias = nn.Parameter(torch.zeros(d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.identity_init:  # start as the identity: only the tap at position t, weight 1
            nn.init.zeros_(self.weight)
            with torch.no_grad():
                self.weight[:, -1] = 1.0
        else:
            nn.init.normal_(self.weight, std=1.0 / math.sqrt(self.kernel_size))
        nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, n = self.kernel_size, x.shape[1]
        xp = F.pad(x, (0, 0, k - 1, 0))  # (B, N + k - 1, D), zeros in front
        w = self.weight.to(x.dtype)
        y = self.bias.to(x.dtype) + xp[:, k - 1 : k - 1 + n] * w[:, -1]
        for j in range(k - 1):
            y = y + xp[:, j : j + n] * w[:, j]
        return y


class ImportancePredictor(nn.Module):
    """(B, N, D) -> (B, N) keep logits, float32: Linear(GELU(causal depthwise conv(x))).

    The bias starts at log((1 - s) / s), so that P(keep) = 1 - s = 1 - target_sparsity at init.
    """

    def __init__(self, d_model: int, kernel_size: int, target_sparsity: float):
        super().__init__()
        self.target_sparsity = target_sparsity
        self.conv = CausalDepthwiseConv(d_model, kernel_size)
        self.proj = nn.Linear(d_model, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.conv.reset_parameters()
        nn.init.normal_(self.proj.weight, std=0.02)
        s = min(max(self.target_sparsity, 1e-3), 1 - 1e-3)
        nn.init.constant_(self.proj.bias, math.log((1 - s) / s))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.proj(F.gelu(self.conv(x))).squeeze(-1)
        return logits.to(torch.promote_types(logits.dtype, torch.float32))


def last_kept_before(keep: torch.Tensor) -> torch.Tensor:
    """(B, N) bool -> (B, N) long: the last kept position s <= t (-1 if none). At a skipped t this is
    the last kept s < t."""
    n = keep.shape[1]
    idx = torch.arange(n, device=keep.device).expand_as(keep)
    return torch.where(keep, idx, torch.full_like(idx, -1)).cummax(dim=1).values


class SparseBKLayer(BKLayer):
    """BKLayer whose feed-forward, potential and read-out run on the kept positions only.

    Args (besides BKLayer's; causal must be True when target_sparsity > 0):
        target_sparsity: wanted fraction of skipped positions, in [0, 1). 0: the dense BKLayer.
        core: "reduced" (resolvent at length K, resnet_bk.reduced_chain) or "full" (length N with
            v_skip at the skipped positions; Triton on CUDA). Both give the same values.
        predictor_kernel, interp_kernel: widths of the causal convolutions.
        calibration_momentum: EMA momentum of the eval threshold (the target-quantile of the
            training batches' logits).
        capacity: None: exactly the kept positions are gathered (their number and the longest
            row's are read back to the host: two syncs per layer, data-dependent shapes). A fraction in (0, 1]: static shapes,
            no host sync (torch.compile fullgraph, CUDA graphs): every row gathers K_cap =
            ceil(capacity N) slots; a row's kept positions beyond its first K_cap are skipped
            (interpolated like any skipped position; this depends on the past only, so it stays
            causal), counted in the stat "capacity_overflow" (fraction of kept positions dropped);
            slots beyond a row's kept count are padding rows that run and are discarded (they reach
            no expert's matmul and stay out of the MoE's aux losses and load statistics).
            capacity=1.0 gives the values of None.
    forward(x) -> (out (B, N, D), aux_losses, stats). After a forward, `last_rows` is the number of
    rows that entered the feed-forward, v_proj and g_proj (B K_cap with a capacity), and
    `last_keep` the (B, N) bool mask of the positions computed.
    `tau` (attribute, default 1.0) is the Gumbel-sigmoid temperature (see set_temperature).
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int = 4,
        top_k: int = 1,
        resolvent: Optional[ResolventConfig] = None,
        causal: bool = True,
        dropout: float = 0.0,
        target_sparsity: float = 0.5,
        core: Core = "reduced",
        predictor_kernel: int = 3,
        interp_kernel: int = 3,
        calibration_momentum: float = 0.9,
        capacity: Optional[float] = None,
    ):
        super().__init__(d_model, d_ff, num_experts, top_k, resolvent, causal, dropout)
        if capacity is not None and not 0.0 < capacity <= 1.0:
            raise ValueError(
                f"SparseBKLayer: capacity must be None or in (0, 1] (a fraction of the positions), got {capacity}."
            )
        if not 0.0 <= target_sparsity < 1.0:
            raise ValueError(f"SparseBKLayer: target_sparsity must be in [0, 1), got {target_sparsity}.")
        if core not in ("reduced", "full"):
            raise ValueError(f"SparseBKLayer: core must be 'reduced' or 'full', got {core!r}.")
        if target_sparsity > 0 and not causal:
            raise ValueError("SparseBKLayer: sparsity needs the causal core (causal=True).")
        if target_sparsity > 0 and self.coupling_proj is not None:
            raise ValueError(
                "SparseBKLayer: input-dependent couplings need every position's state, and a skipped position "
                "has none; use resolvent.couplings='laplacian' with target_sparsity > 0."
            )
        self.target_sparsity, self.core, self.momentum = target_sparsity, core, calibration_momentum
        self.capacity = capacity
        self.tau = 1.0
        self.last_rows, self.last_keep = 0, None
        if target_sparsity == 0:
            self.predictor = None
            return
        self.predictor = ImportancePredictor(d_model, predictor_kernel, target_sparsity)
        self.interp = CausalDepthwiseConv(d_model, interp_kernel, identity_init=True)
        self.v_skip = nn.Parameter(torch.zeros(()))  # the potential of a skipped site
        s = target_sparsity
        self.register_buffer("threshold", torch.tensor(math.log((1 - s) / s)))
        self.register_buffer("calibrated", torch.tensor(False))

    def reset_sparsity_parameters(self) -> None:
        """Re-initialise predictor and interpolation (a model-wide init may have overwritten them)."""
        if self.predictor is not None:
            self.predictor.reset_parameters()
            self.interp.reset_parameters()

    @torch.no_grad()
    def _calibrate(self, logits: torch.Tensor) -> None:
        """EMA of the target-quantile of this training batch's logits (no host sync)."""
        q = torch.quantile(logits.detach().float().reshape(-1), self.target_sparsity)
        ema = self.momentum * self.threshold + (1 - self.momentum) * q
        self.threshold.copy_(torch.where(self.calibrated, ema, q))
        self.calibrated.fill_(True)

    def kept_green(self, v: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor, runs: torch.Tensor, n: int):
        """Potentials (B, K, C) at pack_kept's slots -> causal g (B, K, C) complex of each chain
        (C chains, each with every skipped site at v_skip), 0 at the padding slots."""
        b, k, c = v.shape
        rows = v.permute(0, 2, 1).reshape(b * c, k)  # row b*C + c: channel c of sequence b
        pos, valid, runs = (t.repeat_interleave(c, dim=0) for t in (pos, valid, runs))
        z = self.shift()
        if isinstance(z, torch.Tensor):
            z = z.repeat(b)[:, None]  # (B*C, 1)
        v_skip = self.v_skip.to(rows.dtype)
        method = resolve_method("auto", rows)
        if self.core == "reduced":
            g = reduced_green_diagonal(rows, runs, v_skip, z, method, lengths=valid.sum(1))
        else:
            g = kept_green_diagonal_full(rows, pos, valid, n, v_skip, z, method)
            g = torch.where(valid, g, torch.zeros_like(g))
        return g.view(b, c, k).permute(0, 2, 1)

    def _potential(self, h: torch.Tensor) -> torch.Tensor:
        v = self.v_proj(h)
        return v.to(torch.promote_types(v.dtype, torch.float32))  # the core runs in >= float32

    def _compute_dynamic(self, x: torch.Tensor, keep: torch.Tensor):
        """capacity=None: the kept rows exactly (host syncs: their number, and K in pack_kept) ->
        (computed (B, N, D), zero at skipped positions, aux, stats)."""
        b, n, d = x.shape
        idx = keep.reshape(-1).nonzero().squeeze(1)  # one host sync: the gathered shapes
        self.last_rows = idx.numel()
        flat = x.reshape(b * n, d)
        if idx.numel() == 0:  # everything skipped: nothing computed
            consume_dropout(self, b * n, d, x)  # the stream after this does not depend on it
            return x.new_zeros(b, n, d), {}, {}
        gathered = (idx, b * n)  # dropout masks are drawn for all B * N positions (layers.dropout)
        h, aux, stats = self.feed_forward(flat.index_select(0, idx), gathered)  # (T, D): kept rows only
        v = self._potential(h)  # (T, C)
        pos, valid, runs = pack_kept(keep)  # (B, K) each
        v = v.new_zeros((*valid.shape, v.shape[1])).masked_scatter(valid[..., None], v)  # (B, K, C)
        g = self.kept_green(v, pos, valid, runs, n)[valid]  # (T, C)
        features = torch.view_as_real(g).reshape(g.shape[0], -1)
        y = self.read_out(h, features, gathered)
        computed = flat.new_zeros(b * n, d).index_copy(0, idx, y.to(flat.dtype)).view(b, n, d)
        return computed, aux, {**stats, **self.mix_stats(features)}

    def _compute_static(self, x: torch.Tensor, keep: torch.Tensor, k_cap: int):
        """Static shapes, no host sync: B * k_cap rows (each row's first k_cap kept positions, then
        padding) -> (computed (B, N, D), zero at skipped positions, aux, stats). keep must hold at
        most k_cap kept positions per row."""
        b, n, d = x.shape
        pos, valid, runs = pack_kept(keep, k_cap)  # (B, K) each
        self.last_rows = b * k_cap
        idx = (torch.arange(b, device=x.device)[:, None] * n + pos).reshape(-1)  # padding: position 0
        gathered = (idx, b * n)
        rows = x.reshape(b * n, d).index_select(0, idx)
        h, aux, stats = self.feed_forward(rows, gathered, valid.reshape(-1))  # (B K, D), 0 at padding
        v = self._potential(h).view(b, k_cap, -1)  # (B, K, C)
        g = self.kept_green(v, pos, valid, runs, n)  # (B, K, C), 0 at padding
        features = torch.view_as_real(g).reshape(b * k_cap, -1)
        y = self.read_out(h, features, gathered).view(b, k_cap, d)
        # position t of row b takes slot (kept up to t) - 1 if kept, else 0 (a gather: no scatter of padding)
        slot = (keep.long().cumsum(1) - 1).clamp(0, k_cap - 1)
        computed = torch.gather(y, 1, slot[..., None].expand(b, n, d)) * keep[..., None].to(y.dtype)
        stats = {**stats, **self.mix_stats(features)}
        magnitude = torch.hypot(features.detach()[:, 0::2], features.detach()[:, 1::2])  # (B K, C)
        stats["g_abs_mean"] = magnitude.sum() / (valid.sum() * magnitude.shape[1]).clamp_min(1)  # real slots
        return computed.to(x.dtype), aux, stats

    def forward(self, x: torch.Tensor, gathered: Gathered | None = None):
        if gathered is not None:
            raise ValueError("SparseBKLayer: runs on whole sequences; it cannot run on gathered rows.")
        if self.predictor is None:
            out, aux, stats = super().forward(x)
            self.last_rows, self.last_keep = x.shape[0] * x.shape[1], None
            stats["sparsity"] = torch.zeros((), device=x.device)
            return out, aux, stats
        b, n, d = x.shape
        logits = self.predictor(x)  # (B, N) float32
        if self.training:
            gate, _ = gumbel_sigmoid(logits, self.tau)
            keep = gate.detach() > 0.5
            self._calibrate(logits)
        else:
            keep = logits > self.threshold
            gate = keep.to(logits.dtype)
        overflow = None
        if self.capacity is None:
            computed, aux, stats = self._compute_dynamic(x, keep)
        else:
            k_cap = max(1, math.ceil(self.capacity * n))
            within = keep.long().cumsum(1) <= k_cap  # the first k_cap kept positions: the past only
            overflow = (keep & ~within).sum() / keep.sum().clamp_min(1)
            keep = keep & within
            gate = gate * within.to(gate.dtype)
            computed, aux, stats = self._compute_static(x, keep, k_cap)
        self.last_keep = keep
        # Causal interpolation: hold the last kept output before t, then a left-padded conv.
        last = last_kept_before(keep)
        hold = torch.gather(computed, 1, last.clamp_min(0)[..., None].expand(b, n, d))
        hold = hold * (last >= 0)[..., None].to(hold.dtype)
        interp = self.interp(hold)
        m = gate[..., None].to(x.dtype)
        out = m * computed + (1 - m) * interp

        expected_sparsity = 1 - torch.sigmoid(logits).mean()
        aux = dict(aux)
        aux["sparsity"] = (expected_sparsity - self.target_sparsity).square()
        stats = dict(stats)
        stats["sparsity"] = 1 - keep.float().mean()
        stats["expected_sparsity"] = expected_sparsity.detach()
        stats["threshold"] = self.threshold.detach().clone()
        if overflow is not None:
            stats["capacity_overflow"] = overflow.detach()
        return out, aux, stats


class SparseResNetBKBlock(ResNetBKBlock):
    """Pre-norm residual block x + SparseBKLayer(LN(x)); args as SparseBKLayer."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int = 4,
        top_k: int = 1,
        resolvent: Optional[ResolventConfig] = None,
        causal: bool = True,
        dropout: float = 0.0,
        target_sparsity: float = 0.5,
        core: Core = "reduced",
        predictor_kernel: int = 3,
        interp_kernel: int = 3,
        capacity: Optional[float] = None,
    ):
        nn.Module.__init__(self)
        self.ln = nn.LayerNorm(d_model)
        self.bk = SparseBKLayer(
            d_model,
            d_ff,
            num_experts,
            top_k,
            resolvent,
            causal,
            dropout,
            target_sparsity,
            core,
            predictor_kernel,
            interp_kernel,
            capacity=capacity,
        )


def set_temperature(model: nn.Module, tau: float) -> None:
    """Set the Gumbel-sigmoid temperature of every SparseBKLayer in `model`."""
    if tau <= 0:
        raise ValueError(f"set_temperature: tau must be > 0, got {tau}.")
    for m in model.modules():
        if isinstance(m, SparseBKLayer):
            m.tau = tau


def sparse_layers(model: nn.Module) -> list[SparseBKLayer]:
    return [m for m in model.modules() if isinstance(m, SparseBKLayer)]


class MultiScaleSparseBlock(nn.Module):
    """The simple multi-scale block (resnet_bk.layers.multiscale: causal pooling of position pairs,
    a block at N/2, shifted upsampling, a refinement at N) with a SparseResNetBKBlock at BOTH
    resolutions: at N/2 the predictor picks coarse tokens (coarse token j pools positions 2j, 2j+1
    and reaches positions >= 2j+1 only, so its mask is as causal as the pooling), at N it picks
    positions. (B, N, D) -> (x, aux_losses, stats, work) like MultiScaleBlock, with work
    "ffn_rows/res<r>" (rows that entered a feed-forward) and "mix_tokens/res<r>" (positions whose
    resolvent value was computed: the kept ones, the reduced core's K) for r = 1, 2.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int = 4,
        top_k: int = 1,
        resolvent: Optional[ResolventConfig] = None,
        dropout: float = 0.0,
        target_sparsity: float = 0.5,
        core: Core = "reduced",
        predictor_kernel: int = 3,
        interp_kernel: int = 3,
        capacity: Optional[float] = None,
    ):
        super().__init__()
        from resnet_bk.layers.multiscale import CausalDownsample, CausalUpsample

        def block():
            return SparseResNetBKBlock(
                d_model,
                d_ff,
                num_experts,
                top_k,
                resolvent,
                True,
                dropout,
                target_sparsity,
                core,
                predictor_kernel,
                interp_kernel,
                capacity=capacity,
            )

        self.ln_down = nn.LayerNorm(d_model)
        self.down = CausalDownsample(d_model)
        self.coarse = block()
        self.up = CausalUpsample(d_model)
        self.refine = block()

    def forward(self, x: torch.Tensor, running=None):
        if running is not None:
            raise ValueError("MultiScaleSparseBlock: ACT's running mask is not supported here.")
        b, n, _ = x.shape
        aux_all: dict[str, list] = {}
        stat_all: dict[str, list] = {}
        work: dict[str, int] = {}

        def run(block, h, res):
            h, aux, stats = block(h)
            for key, value in aux.items():
                aux_all.setdefault(key, []).append(value)
            for key, value in stats.items():
                stat_all.setdefault(key, []).append(value)
            for kind in ("ffn_rows", "mix_tokens"):
                work[f"{kind}/res{res}"] = work.get(f"{kind}/res{res}", 0) + block.bk.last_rows
            return h

        if n // 2 > 0:
            c = run(self.coarse, self.down(self.ln_down(x)), 2)
            x = x + self.up(c, n)
        x = run(self.refine, x, 1)
        aux = {k: sum(v) / len(v) for k, v in aux_all.items()}
        stats = {k: sum(v) / len(v) for k, v in stat_all.items()}
        return x, aux, stats, work
