"""The ResNet-BK layer and its pre-norm residual block (DESIGN section 1).

    h   = MoE-FFN(x)                                    x is already layer-normed by the block
    v   = v_proj(h)                                     (B, N)  one real potential per position
    G   = green_diagonal(H0 + diag(v), z, causal)       (B, N)  complex, H0 the discrete Laplacian
    out = h + bk_scale * Linear(2 -> D)([Re G, Im G])

H0 is built for the length at hand, so any N works. With causal=True, G at position t depends on
positions 0..t only; causal=False uses the full resolvent diagonal, which sees the future.
|G| <= 1 / Im z holds by construction (H0 + diag(v) has unit off-diagonals), so nothing is clamped.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from resnet_bk.bk_core import green_diagonal, laplacian_couplings
from resnet_bk.layers.dropout import Gathered, PositionDropout
from resnet_bk.layers.moe import MoEFeedForward


class BKLayer(nn.Module):
    """(B, N, D) -> (out (B, N, D), aux_losses, stats).

    The two halves are separate methods so that a variant can run the feed-forward on a gathered
    subset of positions (ACT, sparsity, early exit) and still mix the whole sequence:
      feed_forward(x): (..., D) -> (h, aux_losses, stats), position-wise;
      mix(h): (B, N, D) -> (out, G), where the positions interact through the resolvent.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int = 4,
        top_k: int = 1,
        z: complex = 1j,
        bk_scale: float = 1.0,
        causal: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        z = complex(z)
        if not (math.isfinite(z.real) and math.isfinite(z.imag)) or z.imag <= 0:
            raise ValueError(
                f"BKLayer: Im z must be > 0 and z finite, got z = {z}; the resolvent (H - zI)^-1 needs a shift "
                "off the real axis (e.g. z_real=0.0, z_imag=1.0)."
            )
        self.z, self.bk_scale, self.causal = z, bk_scale, causal
        self.moe = MoEFeedForward(d_model, d_ff, num_experts, top_k, dropout)
        self.v_proj = nn.Linear(d_model, 1)
        self.g_proj = nn.Linear(2, d_model)
        self.dropout = PositionDropout(dropout)

    def feed_forward(self, x: torch.Tensor, gathered: Gathered | None = None):
        """(..., D) -> (h (..., D), aux_losses, stats); each position on its own. gathered:
        (index, G) when x holds rows gathered from a grid of G positions (dropout draws the grid)."""
        return self.moe(x, gathered)

    def mix(self, h: torch.Tensor, gathered: Gathered | None = None):
        """(B, N, D) -> (h + bk_scale * features of G (B, N, D), G (B, N) complex). gathered: when h's
        B * N positions are gathered from a larger grid (as for feed_forward)."""
        b, n, _ = h.shape
        v = self.v_proj(h).squeeze(-1)  # (B, N)
        # The core runs in at least float32 (under autocast v may be bf16; -2 + v would lose digits).
        dtype = torch.promote_types(v.dtype, torch.float32)
        h0, sub, sup = laplacian_couplings(b, n, dtype, h.device)
        # Shapes, dtypes and Im z are right by construction; skip the validation's host sync.
        g = green_diagonal(h0 + v, sub, sup, self.z, self.causal, validate=False)
        features = self.g_proj(torch.view_as_real(g).to(h.dtype))  # (B, N, 2) = [Re G, Im G]
        return h + self.bk_scale * self.dropout(features, gathered), g

    def forward(self, x: torch.Tensor, gathered: Gathered | None = None):
        h, aux_losses, stats = self.feed_forward(x, gathered)
        out, g = self.mix(h, gathered)
        stats["g_abs_mean"] = g.detach().abs().mean()
        return out, aux_losses, stats


class ResNetBKBlock(nn.Module):
    """Pre-norm residual block: x + BKLayer(LayerNorm(x)). (B, N, D) -> (x, aux_losses, stats)."""

    def __init__(self, d_model: int, d_ff: int, num_experts: int = 4, top_k: int = 1, z: complex = 1j,
                 bk_scale: float = 1.0, causal: bool = True, dropout: float = 0.0):
        super().__init__()
        self.ln = nn.LayerNorm(d_model)
        self.bk = BKLayer(d_model, d_ff, num_experts, top_k, z, bk_scale, causal, dropout)

    def forward(self, x: torch.Tensor, gathered: Gathered | None = None):
        out, aux_losses, stats = self.bk(self.ln(x), gathered)
        return x + out, aux_losses, stats
