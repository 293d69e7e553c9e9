"""Dropout whose mask at a position does not depend on which other positions run.

Several variants run a layer on a data-dependent subset of positions, gathered into rows: ACT's
running positions, sparsity's kept ones, early exit's active ones, adaptive length's closed
segments. A dropout mask drawn for the gathered rows only consumes the random stream in an order
that depends on which positions were kept, which depends on later tokens: position i's mask would
then depend on the future, in train mode (docs/design.md section 3).

PositionDropout draws the mask for the whole grid of G positions, (G, D), and gathers the rows it
needs, so that the mask of a position depends on the random state and the position only, and
every call consumes the same amount of the stream whatever was gathered. Without `rows` the input
is the whole grid and the mask is the same draw. `consume` draws (and discards) what a call would
have drawn, for code paths that skip a layer on a data-dependent condition.
"""

from __future__ import annotations

import torch
from torch import nn

#: Gathered rows: (flat indices (T,) long into a grid of G positions, G).
Gathered = tuple[torch.Tensor, int]


class PositionDropout(nn.Dropout):
    """forward(x (..., D), gathered=None) -> x with dropout; the mask is drawn per grid position.

    gathered=None: x's leading dimensions are the grid (G = x.numel() // D). gathered=(index, G): x holds
    the T gathered rows, x.numel() == T * D, index (T,) their flat positions in the grid.
    """

    def forward(self, x: torch.Tensor, gathered: Gathered | None = None) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.p == 1.0:
            return torch.zeros_like(x)
        d = x.shape[-1]
        if gathered is None:
            keep = self._draw(x.numel() // max(d, 1), d, x)
        else:
            index, grid = gathered
            keep = self._draw(grid, d, x).index_select(0, index.reshape(-1))
        return x * keep.view(x.shape)

    def consume(self, grid: int, d: int, like: torch.Tensor) -> None:
        """Draw, and discard, the mask a call over a grid of `grid` positions would draw."""
        if self.training and 0.0 < self.p < 1.0:
            self._draw(grid, d, like)

    def _draw(self, grid: int, d: int, like: torch.Tensor) -> torch.Tensor:
        """(grid, D) mask: 0 with probability p, else 1 / (1 - p)."""
        keep = torch.empty(grid, d, dtype=like.dtype, device=like.device).bernoulli_(1.0 - self.p)
        return keep.div_(1.0 - self.p)


def consume_dropout(module: nn.Module, grid: int, d: int, like: torch.Tensor) -> None:
    """Consume the draws of every PositionDropout in `module`, once each: what one forward over a
    grid of `grid` positions of width d would draw, for a module skipped on a data-dependent
    condition (so the random stream after it does not depend on that condition)."""
    for m in module.modules():
        if isinstance(m, PositionDropout):
            m.consume(grid, d, like)
