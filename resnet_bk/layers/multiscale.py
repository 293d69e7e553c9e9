"""Multi-scale ResNet-BK blocks: causal learned pooling of position pairs, ResNet-BK blocks at the
coarse resolution, causal learned upsampling, and a refinement at full resolution.

    simple:        N -> N/2 -> N                  (pool, BK block at N/2, upsample, refine at N)
    hierarchical:  N -> N/2 -> N/4 -> N/2 -> N    (a U-Net: pool, BK at N/2, pool, BK at N/4,
                                                   upsample + skip, BK at N/2, upsample + skip, refine)

Causality (docs/design.md section 3). Coarse token j pools positions 2j and 2j+1, so it may feed only
positions >= 2j+1. Upsampling therefore shifts by one position before broadcasting: fine position
t receives coarse token j(t) = (t - 1) // 2 (positions 2j+1 and 2j+2 get token j, position 0 gets
nothing from the coarse path). The coarse blocks use the causal BK-core, so coarse token j's output
depends on coarse tokens 0..j, i.e. on positions 0..2j+1 <= t. Levels compose: a level-2 token k
pools positions 4k..4k+3 and reaches level-1 positions >= 2k+1, i.e. fine positions >= 4k+3.

Lengths. Only complete pairs are pooled: N positions give N // 2 coarse tokens. The unpaired last
position of an odd N is not pooled and nothing is padded: its pair's coarse token could only feed
position N, which does not exist, so padding would be wasted work (and nothing from a pad can
leak). N = 1 has no coarse token: the coarse path is skipped and only the refinement runs.

Cost. Pooling and upsampling are per-channel weights (O(D) per position): the coarse blocks' own
feed-forwards mix the channels. A coarse BK block costs half (N/2) or a quarter (N/4) of a
full-resolution one; the refinement costs a full-resolution block ("bk") or a position-wise MLP
("mlp", no sequence mixing at full resolution).

Under ACT (resnet_bk.layers.act) a block takes a `running` mask: the refinement's feed-forward
runs on running positions only, and a coarse token's feed-forward runs only if one of the two
positions it pools is still running (a causal rule: it reads positions 2j, 2j+1 and feeds
positions >= 2j+1); every BK-core mix still runs over the whole sequence at its resolution.
With ACT's capacity (static shapes) the block also takes `slots`, the rows per sequence gathered at
full resolution (running holds at most that many per row); a level of m tokens gathers
min(slots, m): every active coarse token has a running position of its own among the two it pools,
so a coarse level never holds more active tokens than its finer level, and never overflows.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn as nn

from resnet_bk.layers.act import active_rows, add_weighted, capacity_rows, run_bk_block, scatter_rows, weighted_means
from resnet_bk.layers.bk_layer import ResNetBKBlock
from resnet_bk.layers.dropout import PositionDropout
from resnet_bk.layers.moe import Expert
from resnet_bk.layers.resolvent import ResolventConfig

Refine = Literal["bk", "mlp"]


class CausalDownsample(nn.Module):
    """(B, N, D) -> (B, N // 2, D): c_j = w_even * x_{2j} + w_odd * x_{2j+1} + bias (per channel).

    Initialised to the mean of the pair. 1-D parameters: no weight decay pulls them to zero.
    """

    def __init__(self, d_model: int):
        super().__init__()
        self.w_even = nn.Parameter(torch.full((d_model,), 0.5))
        self.w_odd = nn.Parameter(torch.full((d_model,), 0.5))
        self.bias = nn.Parameter(torch.zeros(d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        m = n // 2
        pairs = x[:, : 2 * m].reshape(b, m, 2, d)
        return pairs[:, :, 0] * self.w_even + pairs[:, :, 1] * self.w_odd + self.bias


class CausalUpsample(nn.Module):
    """(B, M, D) coarse -> (B, n, D) with 2M <= n <= 2M + 1, shifted so that nothing leaks:

        out[0] = 0,  out[2j+1] = w_odd * c_j + b_odd,  out[2j+2] = w_even * c_j + b_even.

    A transposed convolution of kernel 2 and stride 2 (per channel) moved one position right.
    Initialised to the plain broadcast (w = 1, b = 0).
    """

    def __init__(self, d_model: int):
        super().__init__()
        self.w_odd = nn.Parameter(torch.ones(d_model))
        self.w_even = nn.Parameter(torch.ones(d_model))
        self.b_odd = nn.Parameter(torch.zeros(d_model))
        self.b_even = nn.Parameter(torch.zeros(d_model))

    def forward(self, c: torch.Tensor, n: int) -> torch.Tensor:
        b, m, d = c.shape
        if not 2 * m <= n <= 2 * m + 1:
            raise ValueError(f"CausalUpsample: {m} coarse tokens cannot fill {n} positions (need 2M <= n <= 2M + 1).")
        both = torch.stack([c * self.w_odd + self.b_odd, c * self.w_even + self.b_even], dim=2)  # (B, M, 2, D)
        out = torch.cat([c.new_zeros(b, 1, d), both.reshape(b, 2 * m, d)], dim=1)  # positions 0..2M
        return out[:, :n]


class MLPRefine(nn.Module):
    """Position-wise pre-norm refinement x + MLP(LN(x)) (no mixing across positions)."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0):
        super().__init__()
        self.ln = nn.LayerNorm(d_model)
        self.mlp = Expert(d_model, d_ff)
        self.dropout = PositionDropout(dropout)

    def forward(self, x: torch.Tensor, running: Optional[torch.Tensor] = None, slots: Optional[int] = None):
        """-> (x + MLP(LN(x)) at the running rows (x elsewhere), rows run). slots: static shapes,
        B * slots gathered rows (resnet_bk.layers.act.capacity_rows), padding included in rows run."""
        b, n, d = x.shape
        if running is not None and slots is not None:
            index, _, within = capacity_rows(running, slots)
            rows = x.reshape(b * n, d).index_select(0, index)
            y = rows + self.dropout(self.mlp(self.ln(rows)), (index, b * n))
            return scatter_rows(y, within, x), b * slots
        idx = active_rows(running)
        if idx is None or idx.numel() == b * n:
            return x + self.dropout(self.mlp(self.ln(x))), b * n
        flat = x.reshape(b * n, d)
        if idx.numel() == 0:
            self.dropout.consume(b * n, d, x)  # the stream after this does not depend on it
            return x, 0
        rows = flat.index_select(0, idx)
        y = rows + self.dropout(self.mlp(self.ln(rows)), (idx, b * n))
        return flat.index_copy(0, idx, y.to(flat.dtype)).view(b, n, d), idx.numel()


def pair_any(mask: Optional[torch.Tensor], m: int) -> Optional[torch.Tensor]:
    """(B, n) bool -> (B, m) bool: coarse token j is active if position 2j or 2j+1 is."""
    if mask is None:
        return None
    return mask[:, 0 : 2 * m : 2] | mask[:, 1 : 2 * m : 2]


class MultiScaleBlock(nn.Module):
    """(B, N, D) -> (x, aux_losses, stats, work); the simple or hierarchical multi-scale block.

    Args:
        d_model, d_ff, num_experts, top_k, resolvent, causal, dropout: as for ResNetBKBlock
            (every BK block here, at any resolution, has its own MoE feed-forward).
        hierarchical: False: N -> N/2 -> N; True: N -> N/2 -> N/4 -> N/2 -> N.
        refine: "bk", a ResNet-BK block at full resolution; "mlp", a position-wise MLP of width
            refine_d_ff (default d_ff).

    forward(x, running=None, slots=None): running (B, N) bool restricts the feed-forwards as
    described in the module docstring (None: everything runs); slots (an int, with running): static
    shapes, min(slots, tokens) rows gathered per sequence at each resolution. work counts, per
    resolution r in {1, 2, 4} (1/r of the positions): "ffn_rows/res<r>" rows that entered a
    feed-forward, "mix_tokens/res<r>" positions that went through a BK-core mix.
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
        hierarchical: bool = False,
        refine: Refine = "bk",
        refine_d_ff: Optional[int] = None,
    ):
        super().__init__()
        if refine not in ("bk", "mlp"):
            raise ValueError(f"MultiScaleBlock: refine must be 'bk' or 'mlp', got {refine!r}.")
        self.hierarchical, self.refine_kind = hierarchical, refine

        def bk_block():
            return ResNetBKBlock(d_model, d_ff, num_experts, top_k, resolvent, causal, dropout)

        self.ln_down = nn.LayerNorm(d_model)
        self.down = CausalDownsample(d_model)
        self.coarse = bk_block()  # N/2 (the encoder side when hierarchical)
        if hierarchical:
            self.ln_down2 = nn.LayerNorm(d_model)
            self.down2 = CausalDownsample(d_model)
            self.coarse2 = bk_block()  # N/4
            self.up2 = CausalUpsample(d_model)
            self.coarse_dec = bk_block()  # N/2, decoder side
        self.up = CausalUpsample(d_model)
        self.refine = bk_block() if refine == "bk" else MLPRefine(d_model, refine_d_ff or d_ff, dropout)

    def forward(self, x: torch.Tensor, running: Optional[torch.Tensor] = None, slots: Optional[int] = None):
        b, n, _ = x.shape
        static = running is not None and slots is not None
        aux_sums: dict[str, list] = {}  # name -> (value, weight), one per BK block that returned it
        stat_sums: dict[str, list] = {}
        counts: dict[str, int] = {}

        def bk(block, h, mask, res):
            level_slots = min(slots, h.shape[1]) if static else None
            h, aux, stats, rows = run_bk_block(block, h, mask, level_slots)
            # Static: a block whose every slot is padding counts for nothing in the means (as the
            # exact path, where such a block returns no aux losses or stats).
            weight = mask.any().to(torch.float32) if static else 1.0
            add_weighted(aux_sums, aux, weight)
            add_weighted(stat_sums, stats, weight)
            counts[f"ffn_rows/res{res}"] = counts.get(f"ffn_rows/res{res}", 0) + rows
            counts[f"mix_tokens/res{res}"] = counts.get(f"mix_tokens/res{res}", 0) + h.shape[0] * h.shape[1]
            return h

        m1 = n // 2
        if m1 > 0:  # N = 1 has no complete pair: no coarse path
            mask1 = pair_any(running, m1)
            c = bk(self.coarse, self.down(self.ln_down(x)), mask1, 2)  # (B, N/2, D)
            if self.hierarchical:
                m2 = m1 // 2
                if m2 > 0:
                    c2 = bk(self.coarse2, self.down2(self.ln_down2(c)), pair_any(mask1, m2), 4)  # (B, N/4, D)
                    c = c + self.up2(c2, m1)  # skip connection at N/2
                c = bk(self.coarse_dec, c, mask1, 2)
            x = x + self.up(c, n)  # skip connection at N
        if self.refine_kind == "bk":
            x = bk(self.refine, x, running, 1)
        else:
            x, rows = self.refine(x, running, slots) if static else self.refine(x, running)
            counts["ffn_rows/res1"] = counts.get("ffn_rows/res1", 0) + rows

        return x, weighted_means(aux_sums), weighted_means(stat_sums), counts
