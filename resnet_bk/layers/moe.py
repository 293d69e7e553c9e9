"""Mixture-of-experts feed-forward with top-k token routing, dispatched by one grouped GEMM.

References:
1) Switch Transformers (Fedus, Zoph, Shazeer 2021): top-1 routing and the load-balancing loss
   num_experts * sum_e f_e * P_e.
2) GShard (Lepikhin et al. 2020): top-k routing with gates renormalised over the chosen experts.
3) MegaBlocks (Gale et al. 2022): dropless MoE as a grouped (block-sparse) matrix product.

Each token is routed on its own hidden state only and there is no expert capacity: a capacity
limit drops tokens depending on what the other positions chose, so the output at position t would
depend on the future. The (token, expert) pairs are sorted by expert and every expert runs on
exactly its rows in one grouped matrix product (``torch._grouped_mm``): nothing is computed densely
and masked, every shape is static (T * top_k rows), and nothing is read back to the host, so the
layer compiles into one graph and CUDA graphs can capture it.

``experts_reference`` is the specification of the grouped path: a loop over experts on host-side
row counts (one host sync per call). Tests compare the two; it is also the path taken where the
grouped product is unavailable (no ``torch._grouped_mm``, float64, or float32 under ``torch.compile``).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from resnet_bk.layers.dropout import Gathered, PositionDropout


class Expert(nn.Module):
    """Two-layer MLP d_model -> d_ff -> d_model with GELU (the nanoGPT MLP without dropout)."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.c_fc = nn.Linear(d_model, d_ff)
        self.c_proj = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class GroupedLinear(nn.Module):
    """E independent linear maps in_features -> out_features, stored stacked.

    weight (E, out_features, in_features) and bias (E, out_features): expert e's map is
    x @ weight[e].T + bias[e], the layout of nn.Linear, so init and weight decay treat it alike.
    """

    def __init__(self, num_groups: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_groups, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(num_groups, out_features))
        bound = 1.0 / math.sqrt(in_features)  # nn.Linear's default init
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)


class GroupedExperts(nn.Module):
    """num_experts GELU MLPs d_model -> d_ff -> d_model (parameters c_fc, c_proj: GroupedLinear).

    forward(x, group_end, expert, valid=None) runs expert e on the rows of its group:
      x: (R, d_model) rows sorted by expert; group_end: (E,) int32, cumulative row counts (rows
      group_end[e-1]..group_end[e]-1 belong to expert e); expert: (R,) long, each row's expert;
      valid: optional (R,) bool, False exactly for the rows from group_end[-1] on, which belong to
      no expert: their output is 0 and no gradient flows through them.
    Returns (R, d_model).
    """

    def __init__(self, num_experts: int, d_model: int, d_ff: int):
        super().__init__()
        self.num_experts = num_experts
        self.c_fc = GroupedLinear(num_experts, d_model, d_ff)
        self.c_proj = GroupedLinear(num_experts, d_ff, d_model)

    def forward(self, x: torch.Tensor, group_end=None, expert=None, valid=None) -> torch.Tensor:
        if self.num_experts == 1:  # a plain MLP: no grouping needed
            h = F.gelu(F.linear(x, self.c_fc.weight[0], self.c_fc.bias[0]))
            return F.linear(h, self.c_proj.weight[0], self.c_proj.bias[0])
        if not _grouped_mm_available(x):
            return experts_reference(self, x, group_end)
        dtype = _compute_dtype(x)
        # The grouped product leaves rows outside every group undefined, in forward and in the
        # gradient of its left operand; torch.where (not a product, which keeps NaN) cuts them out
        # of both, at each product's input and output.
        x = x.to(dtype) if valid is None else torch.where(valid[:, None], x.to(dtype), 0.0)
        h = _grouped_linear(x, self.c_fc, group_end, expert, valid, dtype)
        return _grouped_linear(F.gelu(h), self.c_proj, group_end, expert, valid, dtype)


def _grouped_linear(x, lin: GroupedLinear, group_end, expert, valid, dtype) -> torch.Tensor:
    # weight[e].T as a column-major (in, out) view: the layout the grouped kernels read directly.
    y = torch._grouped_mm(x, lin.weight.to(dtype).transpose(-2, -1), offs=group_end)
    # Each row's bias as one_hot(expert) @ bias, a (R, E) @ (E, out) product: its backward is a plain
    # matmul, where gathering bias[expert] would scatter-add R rows into E (a slow, contended kernel).
    one_hot = (expert[:, None] == torch.arange(lin.bias.shape[0], device=x.device)).to(dtype)
    y = y + one_hot @ lin.bias.to(dtype)
    return y if valid is None else torch.where(valid[:, None], y, 0.0)


def experts_reference(experts: GroupedExperts, x, group_end) -> torch.Tensor:
    """Loop over experts on host-side row counts (the specification of GroupedExperts.forward);
    rows outside every group get 0."""
    ends = [0] + group_end.tolist()  # one host sync
    out = x.new_zeros(x.shape[0], experts.c_proj.weight.shape[1])
    for e in range(experts.num_experts):
        lo, hi = ends[e], ends[e + 1]
        if hi > lo:
            h = F.gelu(F.linear(x[lo:hi], experts.c_fc.weight[e], experts.c_fc.bias[e]))
            out[lo:hi] = F.linear(h, experts.c_proj.weight[e], experts.c_proj.bias[e]).to(out.dtype)
    return out


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run a matmul in (torch._grouped_mm is not on autocast's lists)."""
    if x.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _grouped_mm_available(x: torch.Tensor) -> bool:
    dtype = _compute_dtype(x)
    if not hasattr(torch, "_grouped_mm") or dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    # Compiled, the grouped product exists for bfloat16 only; eager, torch falls back for the others.
    return dtype == torch.bfloat16 or not torch.compiler.is_compiling()


def dispatch(
    x: torch.Tensor,
    experts: GroupedExperts,
    pair_token: torch.Tensor,
    pair_expert: torch.Tensor,
    pair_gate: torch.Tensor,
    pair_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run each (token, expert) pair's expert on the token and sum the gated outputs per token.

    Args:
        x: (T, D) tokens. pair_token, pair_expert: (P,) long. pair_gate: (P,) weight of each pair.
        pair_valid: optional (P,) bool; invalid pairs are sorted past the last group, never reach an
            expert's matmul and contribute nothing (static shapes for a data-dependent pair count).
    Returns:
        out (T, D) in x's dtype, and rows_per_expert (E,) int64 (valid pairs each expert ran).
    """
    num_experts = experts.num_experts
    key = pair_expert if pair_valid is None else torch.where(pair_valid, pair_expert, num_experts)
    order = key.argsort(stable=True)
    rows = torch.zeros(num_experts + 1, dtype=torch.long, device=x.device)
    rows = rows.scatter_add(0, key, torch.ones_like(key))[:num_experts]  # scatter_add: no host sync
    group_end = rows.cumsum(0).to(torch.int32)
    token, expert = pair_token[order], pair_expert[order]
    valid = None if pair_valid is None else pair_valid[order]
    # index_select: its backward is an index_add (each row once), not the sort-based index_put.
    gate = pair_gate.index_select(0, order)[:, None].to(x.dtype)
    y = experts(x.index_select(0, token), group_end, expert, valid) * gate
    out = x.new_zeros(x.shape).index_add(0, token, y.to(x.dtype))  # sum each token's pairs
    return out, rows


@register_flop_formula(torch.ops.aten._grouped_mm, get_raw=True)
def _grouped_mm_flops(mat_a, mat_b, offs=None, *args, out_val=None, **kwargs) -> int:
    """FLOPs of torch._grouped_mm as executed: 2 * (rows inside the groups) * K * N.

    FlopCounterMode has no formula for it; without this, routed experts would count 0 FLOPs. Reads
    offs back to the host: counting runs outside the training step.
    """
    if offs is None:  # (E, M, K) @ (E, K, N)
        return 2 * mat_a.shape[0] * mat_a.shape[1] * mat_a.shape[2] * mat_b.shape[-1]
    rows = int(offs[-1]) if offs.numel() else 0
    if mat_a.dim() == 2 and mat_b.dim() == 3:  # (M, K) @ (E, K, N), groups along M
        return 2 * rows * mat_a.shape[1] * mat_b.shape[2]
    if mat_a.dim() == 2 and mat_b.dim() == 2:  # (K, M) @ (M, N) -> (E, K, N), groups along M
        return 2 * mat_a.shape[0] * rows * mat_b.shape[1]
    return 2 * mat_a.shape[1] * mat_a.shape[2] * rows  # (E, M, K) @ (K, N), groups along N


class MoEFeedForward(nn.Module):
    """Top-k routed mixture of `num_experts` MLPs; with num_experts=1 a plain MLP (no router).

    forward(x) with x (..., d_model) returns (out (..., d_model), aux_losses, stats):
      aux_losses: {"load_balance": scalar} (empty when num_experts=1), unweighted;
      stats: detached scalars, "expert_load/<e>" (fraction of routed rows per expert) and
        "expert_load_max" (1/num_experts when perfectly balanced).
    gathered: None, or (index, G) when x holds rows gathered from a grid of G positions
      (resnet_bk.layers.dropout), so that the dropout mask is drawn for the whole grid.
    valid: None, or (T,) bool marking the real rows of a static-shape batch whose other rows are
      padding: padding rows get output 0, reach no expert's matmul (num_experts > 1) and are left out
      of the load-balance loss and the expert loads, so those equal the ones of the real rows alone.
    After each forward, `last_rows_per_expert` is an (E,) device tensor of how many rows each expert
    ran on; the rows sum to T * top_k for T (real) tokens.
    """

    def __init__(self, d_model: int, d_ff: int, num_experts: int = 4, top_k: int = 1, dropout: float = 0.0):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"MoEFeedForward: num_experts must be >= 1, got {num_experts}.")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"MoEFeedForward: top_k must be in 1..num_experts={num_experts}, got {top_k}.")
        self.num_experts, self.top_k = num_experts, top_k
        self.router = nn.Linear(d_model, num_experts, bias=False) if num_experts > 1 else None
        self.experts = GroupedExperts(num_experts, d_model, d_ff)
        self.dropout = PositionDropout(dropout)
        self.last_rows_per_expert: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, gathered: Gathered | None = None, valid: torch.Tensor | None = None):
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (T, D)
        valid = None if valid is None else valid.reshape(-1)
        if self.router is None:
            if valid is None:
                self.last_rows_per_expert = torch.full((1,), x.shape[0], device=x.device)
                return self.dropout(self.experts(x), gathered).reshape(shape), {}, {}
            self.last_rows_per_expert = valid.sum().reshape(1)
            out = torch.where(valid[:, None], self.experts(x), 0.0)
            return self.dropout(out, gathered).reshape(shape), {}, {}

        probs = F.softmax(self.router(x), dim=-1)  # (T, E)
        # (T, k) each; max for k = 1: a row-wise reduction, where topk launches a slow selection kernel
        gate, expert = probs.max(-1, keepdim=True) if self.top_k == 1 else probs.topk(self.top_k, dim=-1)
        if self.top_k > 1:
            # GShard: weights sum to one over the chosen experts. For k=1 keep the raw probability,
            # otherwise the gate would be 1 and the router would get no gradient from the LM loss.
            gate = gate / gate.sum(-1, keepdim=True)
        token = torch.arange(x.shape[0], device=x.device).repeat_interleave(self.top_k)
        pair_valid = None if valid is None else valid.repeat_interleave(self.top_k)
        out, rows = dispatch(x, self.experts, token, expert.reshape(-1), gate.reshape(-1), pair_valid)
        self.last_rows_per_expert = rows

        # Switch load-balancing loss: f_e = fraction of routed rows, P_e = mean router probability.
        # Only P_e carries a gradient; the loss is 1 at perfect balance and num_experts at collapse.
        if valid is None:
            f = rows.to(probs.dtype) / max(expert.numel(), 1)
            mean_probs = probs.mean(0)
        else:  # real rows only (a count on the device: no host sync)
            n_valid = valid.sum().clamp_min(1).to(probs.dtype)
            f = rows.to(probs.dtype) / (n_valid * self.top_k)
            mean_probs = torch.where(valid[:, None], probs, 0.0).sum(0) / n_valid
        load_balance = self.num_experts * (f * mean_probs).sum()
        stats = {f"expert_load/{e}": f[e] for e in range(self.num_experts)}
        stats["expert_load_max"] = f.max()
        return self.dropout(out, gathered).reshape(shape), {"load_balance": load_balance}, stats
