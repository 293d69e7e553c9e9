"""The ResNet-BK layer and its pre-norm residual block (DESIGN sections 1 and 3b).

    h   = MoE-FFN(x)                                    x is already layer-normed by the block
    v   = v_proj(h)                                     (B, N, C)  one real potential per position and chain
    b   = 2 sigmoid(coupling_proj(h))[1:]               (B, N-1, C) couplings (option; else b = 1)
    f   = resolvent_features(v, z, b)                   (B, N, 2C) [Re g_c, Im g_c] of C chains
    f   = f * act(gate_proj(h))                         output gate (option)
    out = h + bk_scale * g_proj(f)                      2C -> D

Each chain c is H_c = tridiag(b_c, -2 + v_c, b_c) with its own shift z_c (fixed or learned,
Im z_c > 0 by construction), so |g| <= 1 / Im z_c and nothing is clamped. H is built for the
length at hand, so any N works. With causal=True, g at position t depends on positions 0..t only:
the coupling b_{t-1} between t-1 and t is computed from h_t. causal=False uses the full resolvent
diagonal, which sees the future. The options live in ResolventConfig; its defaults (C = 1, the
Laplacian, z = i, no gate) are the seeds' layer, parameter for parameter.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from resnet_bk.layers.dropout import Gathered, PositionDropout
from resnet_bk.layers.moe import MoEFeedForward
from resnet_bk.layers.resolvent import ResolventConfig, resolvent_features


class BKLayer(nn.Module):
    """(B, N, D) -> (out (B, N, D), aux_losses, stats).

    The two halves are separate methods so that a variant can run the feed-forward on a gathered
    subset of positions (ACT, sparsity, early exit) and still mix the whole sequence:
      feed_forward(x): (..., D) -> (h, aux_losses, stats), position-wise;
      mix(h): (B, N, D) -> (out, stats), where the positions interact through the resolvent.
    resolvent_features(v, couplings) is the whole potential -> BK-core -> real features path, the
    one place that touches complex numbers.

    resolvent: a ResolventConfig (None: the seeds' layer; a mapping of its options is accepted too).
    stats (detached scalars): "g_abs_mean" (mean |g| over positions and chains, <= 1 / min Im z);
    with a per-channel z also "z_imag_min", "z_imag_mean", "z_imag_max", "z_real_mean".
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
    ):
        super().__init__()
        cfg = ResolventConfig.of(resolvent)
        self.resolvent, self.bk_scale, self.causal = cfg, cfg.bk_scale, causal
        c = cfg.channels
        self.moe = MoEFeedForward(d_model, d_ff, num_experts, top_k, dropout)
        self.v_proj = nn.Linear(d_model, c)
        self.coupling_proj = nn.Linear(d_model, c) if cfg.couplings == "input" else None
        self.gate_proj = nn.Linear(d_model, 2 * c) if cfg.gate != "none" else None
        self.g_proj = nn.Linear(2 * c, d_model)
        self.dropout = PositionDropout(dropout)
        re, im = cfg.initial_z()
        if cfg.z_is_constant:
            self.z = complex(cfg.z_real, cfg.z_imag)  # a Python complex: the seeds' path
        elif cfg.learn_z:
            self.z_real = nn.Parameter(re)
            self.z_imag_raw = nn.Parameter(im + torch.log(-torch.expm1(-im)))  # softplus^-1(im)
        else:
            self.register_buffer("z_real", re, persistent=False)
            self.register_buffer("z_imag_fixed", im, persistent=False)

    def shift_parts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Re z, Im z), real (C,) tensors with Im z > 0; for a per-channel z only."""
        im = F.softplus(self.z_imag_raw) if self.resolvent.learn_z else self.z_imag_fixed
        return self.z_real, im

    def shift(self):
        """z: a Python complex (every channel) or a complex (C,) tensor with Im z > 0."""
        return self.z if self.resolvent.z_is_constant else torch.complex(*self.shift_parts())

    def couplings(self, h: torch.Tensor) -> Optional[torch.Tensor]:
        """(B, N, D) -> b (B, N-1, C) in (0, 2), b_i from h_{i+1}; None for the Laplacian (b = 1)."""
        if self.coupling_proj is None:
            return None
        u = self.coupling_proj(h[:, 1:])
        return 2.0 * torch.sigmoid(u.to(torch.promote_types(u.dtype, torch.float32)))

    def resolvent_features(self, v: torch.Tensor, couplings: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Potentials v (B, N, C) and couplings (B, N-1, C) or None -> features (B, N, 2C), float32
        (float64 for float64 input): [Re g_c, Im g_c] of each chain with this layer's z."""
        return resolvent_features(v, self.shift(), couplings, self.causal)

    def mix(self, h: torch.Tensor, gathered: Gathered | None = None):
        """(B, N, D) -> (h + bk_scale * g_proj(features) (B, N, D), stats). gathered: when h's B * N
        positions are gathered from a larger grid (as for feed_forward)."""
        features = self.resolvent_features(self.v_proj(h), self.couplings(h))
        return self.read_out(h, features, gathered), self.mix_stats(features)

    def read_out(self, h: torch.Tensor, features: torch.Tensor, gathered: Gathered | None = None) -> torch.Tensor:
        """h (..., D), features (..., 2C) -> h + bk_scale * g_proj(features, gated by h) (..., D)."""
        features = features.to(h.dtype)
        if self.gate_proj is not None:
            act = torch.sigmoid if self.resolvent.gate == "sigmoid" else F.silu
            features = features * act(self.gate_proj(h))
        return h + self.bk_scale * self.dropout(self.g_proj(features), gathered)

    def mix_stats(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Detached scalars (no host sync) from the (..., 2C) features and this layer's z."""
        f = features.detach()
        stats = {"g_abs_mean": torch.hypot(f[..., 0::2], f[..., 1::2]).mean()}
        if not self.resolvent.z_is_constant:
            re, im = (t.detach() for t in self.shift_parts())
            stats.update(z_imag_min=im.min(), z_imag_mean=im.mean(), z_imag_max=im.max(), z_real_mean=re.mean())
        return stats

    def feed_forward(self, x: torch.Tensor, gathered: Gathered | None = None, valid: torch.Tensor | None = None):
        """(..., D) -> (h (..., D), aux_losses, stats); each position on its own. gathered:
        (index, G) when x holds rows gathered from a grid of G positions (dropout draws the grid).
        valid: None, or (...) bool, False at padding rows of a static-shape batch (h = 0 there; they
        are left out of the MoE's load statistics)."""
        if valid is None:
            return self.moe(x, gathered)
        return self.moe(x, gathered, valid)

    def forward(self, x: torch.Tensor, gathered: Gathered | None = None):
        h, aux_losses, stats = self.feed_forward(x, gathered)
        out, mix_stats = self.mix(h, gathered)
        stats.update(mix_stats)
        return out, aux_losses, stats


class ResNetBKBlock(nn.Module):
    """Pre-norm residual block: x + BKLayer(LayerNorm(x)). (B, N, D) -> (x, aux_losses, stats)."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int = 4,
        top_k: int = 1,
        resolvent: Optional[ResolventConfig] = None,
        causal: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.ln = nn.LayerNorm(d_model)
        self.bk = BKLayer(d_model, d_ff, num_experts, top_k, resolvent, causal, dropout)

    def forward(self, x: torch.Tensor, gathered: Gathered | None = None):
        out, aux_losses, stats = self.bk(self.ln(x), gathered)
        return x + out, aux_losses, stats
