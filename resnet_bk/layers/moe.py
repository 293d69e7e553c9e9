"""Mixture-of-experts feed-forward with top-k token routing, dispatched by gather.

References:
1) Switch Transformers (Fedus, Zoph, Shazeer 2021): top-1 routing and the load-balancing loss
   num_experts * sum_e f_e * P_e.
2) GShard (Lepikhin et al. 2020): top-k routing with gates renormalised over the chosen experts.

Each token is routed on its own hidden state only and there is no expert capacity: a capacity
limit drops tokens depending on what the other positions chose, so the output at position t would
depend on the future (DESIGN section 3). Each expert runs on exactly the rows routed to it
(index_select -> expert -> index_add); nothing is computed densely and masked.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from resnet_bk.layers.dropout import Gathered, PositionDropout


class Expert(nn.Module):
    """Two-layer MLP d_model -> d_ff -> d_model with GELU (the nanoGPT MLP without dropout)."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.c_fc = nn.Linear(d_model, d_ff)
        self.c_proj = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class MoEFeedForward(nn.Module):
    """Top-k routed mixture of `num_experts` MLPs; with num_experts=1 a plain MLP (no router).

    forward(x) with x (..., d_model) returns (out (..., d_model), aux_losses, stats):
      aux_losses: {"load_balance": scalar} (empty when num_experts=1), unweighted;
      stats: detached scalars, "expert_load/<e>" (fraction of routed rows per expert) and
        "expert_load_max" (1/num_experts when perfectly balanced).
    gathered: None, or (index, G) when x holds rows gathered from a grid of G positions
      (resnet_bk.layers.dropout), so that the dropout mask is drawn for the whole grid.
    After each forward, `last_rows_per_expert` is the list of how many rows each expert ran on;
    the rows sum to T * top_k for T tokens.
    """

    def __init__(self, d_model: int, d_ff: int, num_experts: int = 4, top_k: int = 1, dropout: float = 0.0):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"MoEFeedForward: num_experts must be >= 1, got {num_experts}.")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"MoEFeedForward: top_k must be in 1..num_experts={num_experts}, got {top_k}.")
        self.num_experts, self.top_k = num_experts, top_k
        self.router = nn.Linear(d_model, num_experts, bias=False) if num_experts > 1 else None
        self.experts = nn.ModuleList(Expert(d_model, d_ff) for _ in range(num_experts))
        self.dropout = PositionDropout(dropout)
        self.last_rows_per_expert: list[int] = []

    def forward(self, x: torch.Tensor, gathered: Gathered | None = None):
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (T, D)
        if self.router is None:
            self.last_rows_per_expert = [x.shape[0]]
            return self.dropout(self.experts[0](x), gathered).reshape(shape), {}, {}

        probs = F.softmax(self.router(x), dim=-1)  # (T, E)
        gate, expert = probs.topk(self.top_k, dim=-1)  # (T, k) each
        if self.top_k > 1:
            # GShard: weights sum to one over the chosen experts. For k=1 keep the raw probability,
            # otherwise the gate would be 1 and the router would get no gradient from the LM loss.
            gate = gate / gate.sum(-1, keepdim=True)

        # Flatten the (token, choice) pairs and group them by expert.
        flat_expert = expert.reshape(-1)  # (T*k,)
        flat_token = torch.arange(x.shape[0], device=x.device).repeat_interleave(self.top_k)
        flat_gate = gate.reshape(-1, 1)
        order = flat_expert.argsort(stable=True)
        counts_t = torch.bincount(flat_expert, minlength=self.num_experts)
        counts = counts_t.tolist()  # split sizes must live on the host: one sync per layer
        self.last_rows_per_expert = counts

        out = torch.zeros_like(x)
        for e, rows in enumerate(order.split(counts)):
            if rows.numel() == 0:
                continue
            tokens = flat_token[rows]
            y = self.experts[e](x.index_select(0, tokens)) * flat_gate[rows]
            out = out.index_add(0, tokens, y.to(out.dtype))  # .to: autocast may run experts in bf16

        # Switch load-balancing loss: f_e = fraction of routed rows, P_e = mean router probability.
        # Only P_e carries a gradient; the loss is 1 at perfect balance and num_experts at collapse.
        f = counts_t.to(probs.dtype) / max(flat_expert.numel(), 1)
        load_balance = self.num_experts * (f * probs.mean(0)).sum()
        stats = {f"expert_load/{e}": f[e] for e in range(self.num_experts)}
        stats["expert_load_max"] = f.max()
        return self.dropout(out, gathered).reshape(shape), {"load_balance": load_balance}, stats
