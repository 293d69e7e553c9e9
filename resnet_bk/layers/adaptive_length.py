"""Learned sequence length, causal form: dynamic token pooling with boundaries read from causal states.

References:
1) Nawrot et al. 2023, "Efficient Transformers with Dynamic Token Pooling" (DTP): a boundary
   predictor on each position's hidden state, Gumbel-sigmoid boundaries with a straight-through
   estimator, mean pooling of each segment, a shortened inner stack, upsampling back to full
   resolution, and a binomial prior on the number of boundaries.
2) Nawrot et al. 2022, "Hierarchical Transformers Are More Efficient Language Models" (Hourglass):
   the shift that keeps a shortened autoregressive model causal.

Why not the seed's version. Seed 004 pools the WHOLE input into one vector, predicts a length bin
from it, truncates the input to that length, runs the model and pads the output back. For a
language model that is unusable: (a) the length decision reads every position, so the logits at
position t depend on tokens after t (it sees the future, docs/design.md section 3); (b) the truncated
positions get padded outputs that were never computed from their inputs, so they either drop out
of the perplexity or are scored with garbage (docs/design.md section 4: every evaluated token is scored).

The causal form. With b_t in {0, 1} ("segment closes at t", decided from x_t alone):
    segment id      s_t = sum_{u<t} b_u                     (position t belongs to segment s_t)
    closed segments K   = sum_t b_t                         (the inner length; an open tail is unused)
    summary         z_j = mean{x_t : s_t = j} * b_{c_j}     (c_j the closing position, b = 1 in value;
                                                             the product carries the ST gradient)
    inner           y   = inner_stack(z_0 .. z_{K-1})       (causal over segments)
    upsampled       u_t = y_{j(t)},  j(t) = sum_{u<=t} b_u - 1, the last segment closed at or before t
                    u_t = null (learned) when j(t) < 0
z_j reads tokens <= c_j and y_j reads z_0..z_j, so u_t reads tokens <= c_{j(t)} <= t: causal. A
position inside an open segment gets its own full-resolution path plus the closed segments before
it; the segment it is in reaches it only once closed (at its closing position and after).

Within a batch the inner sequences are padded at the end to the longest row (optionally rounded
up to a multiple, the seed's "length bins", for fewer distinct shapes); causal inner layers never
let the padding reach a real segment. Static shapes (segment_pool's `slots`, the models'
`capacity`): every row pads to a fixed number of segment slots instead, so nothing is read back to
the host; a row's segments beyond its slots are not pooled, and the positions after them keep
reading the last pooled segment (still causal: that segment closed before them).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def gumbel_sigmoid(logits: torch.Tensor, temperature: float, noise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Straight-through relaxed Bernoulli: (logits (...,)) -> (b (...,) in {0, 1} in value, soft (...,)).

    noise=True adds independent logistic noise to each entry (one draw per position), so that
    P(b = 1) = sigmoid(logits); noise=False thresholds sigmoid(logits) at 0.5. The gradient of b is
    that of soft = sigmoid((logits + noise) / temperature).
    """
    if noise:
        u = torch.rand_like(logits, dtype=torch.float32).clamp(1e-6, 1 - 1e-6)
        logits = logits + (u.log() - (-u).log1p()).to(logits.dtype)
    soft = torch.sigmoid(logits / temperature)
    hard = (soft > 0.5).to(soft.dtype)
    return hard + (soft - soft.detach()), soft  # exactly 0/1 in value (x - x == 0), soft's gradient


class BoundaryPredictor(nn.Module):
    """x (B, N, D) -> (b (B, N) straight-through boundaries, p (B, N) boundary probabilities).

    A two-layer MLP on each position's own state (causal). In training mode b is sampled
    (Gumbel-sigmoid, P(b_t = 1) = p_t). In eval mode b_t = [p_t > 0.5] (DTP), or, with
    eval_sampling=True, sampled as in training: a random segmentation drawn independently of the
    tokens, so each draw is still a causal LM, and the boundary rate matches training's even while
    the p_t are far from 0 and 1. init_rate sets the output bias (boundary rate at initialisation).
    """

    def __init__(self, d_model: int, temperature: float = 1.0, init_rate: float = 0.25, eval_sampling: bool = False):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"BoundaryPredictor: temperature must be > 0, got {temperature}.")
        if not 0.0 < init_rate < 1.0:
            raise ValueError(f"BoundaryPredictor: init_rate must be in (0, 1), got {init_rate}.")
        self.temperature, self.init_rate, self.eval_sampling = temperature, init_rate, eval_sampling
        self.mlp = nn.Sequential(nn.Linear(d_model, d_model), nn.GELU(), nn.Linear(d_model, 1))
        self.reset_bias()

    def reset_bias(self) -> None:
        nn.init.constant_(self.mlp[-1].bias, math.log(self.init_rate) - math.log1p(-self.init_rate))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.mlp(x).squeeze(-1).float()
        b, _ = gumbel_sigmoid(logits, self.temperature, noise=self.training or self.eval_sampling)
        return b, torch.sigmoid(logits)


def segment_pool(x: torch.Tensor, b: torch.Tensor, length_multiple: int = 1, slots: int | None = None):
    """Mean-pool each closed segment: (x (B, N, D), b (B, N) 0/1 straight-through) ->
    (z (B, K_pad, D), closed (B,) long = segments pooled per row, K_pad).

    Row i's summaries fill z[i, :closed[i]]; the rest is zero padding. slots None: K_pad =
    max(closed) rounded up to a multiple of length_multiple (0 when no row closes a segment; one
    host sync, the inner length is a shape). slots an int (static shapes, no host sync): K_pad =
    slots, and a row's segments after its first `slots` pool nowhere (like an open tail; they are
    not in `closed`): whether segment j of a row is pooled depends on j alone, so on the past.
    """
    bsz, n, d = x.shape
    hard = b.detach() > 0.5
    closed = hard.sum(1)  # (B,)
    if slots is None:
        k_max = int(closed.max()) if n > 0 else 0
        k_pad = -(-k_max // length_multiple) * length_multiple
    else:
        k_pad = slots
        closed = closed.clamp_max(slots)
    if k_pad == 0:
        return x.new_zeros(bsz, 0, d), closed, 0
    seg = hard.long().cumsum(1) - hard.long()  # (B, N) segment of each position
    in_closed = seg < closed.unsqueeze(1)  # positions of the open tail (and beyond the slots) pool nowhere
    slot = (torch.arange(bsz, device=x.device).unsqueeze(1) * k_pad + seg.clamp_max(k_pad - 1)).flatten()
    weight = in_closed.to(x.dtype).flatten()
    sums = x.new_zeros(bsz * k_pad, d).index_add(0, slot, x.flatten(0, 1) * weight.unsqueeze(1))
    counts = x.new_zeros(bsz * k_pad).index_add(0, slot, weight)
    # Gate: the straight-through b at each pooled segment's closing position (1 in value), the LM
    # loss's gradient path into the boundary predictor.
    gate = x.new_zeros(bsz * k_pad).index_add(0, slot, (b * hard * in_closed).to(x.dtype).flatten())
    z = sums / counts.clamp_min(1).unsqueeze(1) * gate.unsqueeze(1)
    return z.view(bsz, k_pad, d), closed, k_pad


def segment_slots(capacity: float | None, n: int) -> int | None:
    """Segment slots per row for a capacity (a fraction of the N positions): ceil(c N), at least 1;
    None (no capacity) stays None."""
    return None if capacity is None else max(1, math.ceil(capacity * n))


def segment_close_positions(b: torch.Tensor, k_pad: int) -> torch.Tensor:
    """(b (B, N) 0/1 boundaries, K_pad) -> (B * K_pad,) long: the flat position (row * N + c_j) in
    the (B, N) grid of each pooled slot's closing position c_j; padding slots get the row's last
    position. With these, the inner blocks draw dropout per closing position (layers.dropout), so a
    segment's mask does not depend on how many segments the batch has."""
    bsz, n = b.shape
    hard = (b.detach() > 0.5).long()
    seg = hard.cumsum(1) - hard  # (B, N) segment of each position
    slot = torch.where((hard > 0) & (seg < k_pad), seg, torch.full_like(seg, k_pad))  # others: a spare slot
    pos = torch.full((bsz, k_pad + 1), n - 1, dtype=torch.long, device=b.device)
    pos.scatter_(1, slot, torch.arange(n, device=b.device).expand(bsz, n))
    return (pos[:, :k_pad] + n * torch.arange(bsz, device=b.device).unsqueeze(1)).reshape(-1)


def causal_upsample(y: torch.Tensor, b: torch.Tensor, null: torch.Tensor) -> torch.Tensor:
    """(y (B, K_pad, D) inner outputs, b (B, N) boundaries, null (D,)) -> u (B, N, D).

    u_t = y[j(t)] with j(t) the last segment closed at or before t; null before the first close.
    Past K_pad segments (segment_pool's slots) u_t stays the last pooled one, y[K_pad - 1].
    """
    bsz, n = b.shape
    j = (b.detach() > 0.5).long().cumsum(1).clamp_max(y.shape[1])  # j(t) + 1: 0 means "no closed segment yet"
    y_ext = torch.cat((null.to(y.dtype).expand(bsz, 1, -1), y), dim=1)  # (B, 1 + K_pad, D)
    return y_ext.gather(1, j.unsqueeze(-1).expand(bsz, n, y.shape[-1]))


def boundary_prior_nll(b: torch.Tensor, rate: float) -> torch.Tensor:
    """DTP's binomial prior: -log Binomial(K; N, rate) / N averaged over rows, K = sum_t b_t.

    Differentiable in K through the straight-through b (log C(N, K) via lgamma). Minimal near
    K = rate * N, so it holds the boundary rate near `rate` instead of only pushing it down.
    """
    n = b.shape[1]
    k = b.sum(1).double()
    if not 0.0 < rate < 1.0:
        raise ValueError(f"boundary_prior_nll: rate must be in (0, 1), got {rate}.")
    log_choose = math.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)
    log_binom = log_choose + k * math.log(rate) + (n - k) * math.log1p(-rate)
    return (-log_binom / max(n, 1)).mean().to(b.dtype)


def boundary_rate_constraint(p: torch.Tensor, target: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss that holds the thresholded boundary rate at `target`: (p (B, N) boundary
    probabilities, target in (0, 1)) -> (loss (), rate () = fraction of positions with p_t > 0.5,
    the rate evaluation closes segments at).

    loss = binary cross-entropy of p_t against y_t = [p_t among the batch's top `target` fraction]
    (the k = ceil(target * B * N) largest, found on the device, no host sync): it pushes the top
    fraction above 0.5 and the rest below, so both the thresholded rate and the sampled one (mean
    p_t, once the p_t are near 0 or 1) go to the target, from above or from below. Which positions
    rank highest is left to the LM loss (its straight-through gradient reaches the same logits);
    this loss fixes only how many. A multiplier on the rate (dual ascent) cannot do this while the
    p_t are alike: the thresholded rate then jumps between 0 and nearly 1 as their shared bias
    crosses 0.
    """
    flat = p.float().flatten()
    k = max(1, math.ceil(target * flat.numel()))
    cut = flat.detach().topk(k).values[-1]  # the k-th largest probability
    labels = (flat.detach() >= cut).float()
    rate = (flat.detach() > 0.5).float().mean()
    with torch.autocast(flat.device.type, enabled=False):  # CUDA autocast refuses binary_cross_entropy
        return torch.nn.functional.binary_cross_entropy(flat, labels), rate
