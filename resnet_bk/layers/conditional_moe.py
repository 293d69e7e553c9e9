"""Conditional mixture of experts: each token chooses HOW MANY experts it uses (top-p routing).

References:
1) Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic Routing in MoE Models": top-p
   routing (a token takes the most probable experts until their probabilities sum to p) and the
   router-entropy "dynamic loss" that pushes confident routers to use fewer experts.
2) Switch Transformers (Fedus et al. 2021): the load-balancing loss num_experts * sum_e f_e P_e.

Per token t with router probabilities p_t (softmax over E experts, sorted descending p_(1) >= ...):

    k_t = smallest k with p_(1) + ... + p_(k) >= top_p, clamped to [min_experts, max_experts]
    out_t = sum over the k_t chosen experts e of p_t[e] * expert_e(x_t)

The gates are the raw router probabilities (not renormalised over the chosen set): a token that
takes one expert would otherwise get the gate 1 and the router no gradient from the LM loss.

Causality (docs/design.md section 3): k_t and the chosen experts depend on x_t alone; there is no expert
capacity (a capacity limit drops tokens depending on what other positions chose).

Compute: each token's max_experts most probable experts are its candidate pairs (a static shape);
the chosen ones are sorted by expert and run in one grouped matrix product
(resnet_bk.layers.moe.dispatch), the others are sorted past the last group and never reach a
matmul. So a token that takes one expert costs one expert MLP, and nothing is read back to the host.

Aux losses (unweighted; the training module weights them):
  "load_balance": Switch loss with f_e = fraction of all (token, expert) rows sent to e;
  "compute": mean router entropy / log(E), in [0, 1]. The number of experts a token takes is a
      step function of its probabilities (no gradient); a low-entropy router reaches top_p with
      fewer experts, so this is the differentiable price of compute (reference 1).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from resnet_bk.layers.dropout import Gathered, PositionDropout
from resnet_bk.layers.moe import GroupedExperts, dispatch


def top_p_expert_mask(probs: torch.Tensor, top_p: float, min_experts: int, max_experts: int) -> torch.Tensor:
    """(T, E) probabilities -> (T, E) bool, True where the token uses that expert.

    A token keeps its most probable experts until their probabilities reach top_p (the expert that
    crosses top_p is kept), at least min_experts and at most max_experts of them. Row-wise only.
    """
    sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
    mass_before = sorted_p.cumsum(-1) - sorted_p  # probability of the experts ranked above
    rank = torch.arange(probs.shape[-1], device=probs.device)
    keep_sorted = (mass_before < top_p) | (rank < min_experts)
    keep_sorted &= rank < max_experts
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


class ConditionalMoEFeedForward(nn.Module):
    """Top-p routed mixture of `num_experts` MLPs; a token uses min_experts..max_experts of them.

    forward(x) with x (..., d_model) returns (out (..., d_model), aux_losses, stats):
      aux_losses: {"load_balance", "compute"} scalars, unweighted (see the module docstring);
      stats: detached scalars "experts_per_token" (mean k_t), "expert_load/<e>" (fraction of the
        routed rows that expert e ran) and "expert_load_max" (1/num_experts when balanced).
    gathered: None, or (index, G) when x holds rows gathered from a grid of G positions
      (resnet_bk.layers.dropout), so that the dropout mask is drawn for the whole grid.
    valid: None, or (...) bool like x without its last dimension, False at the padding rows of a
      static-shape batch: they get output 0, reach no expert's matmul and are left out of the aux
      losses and stats, so those equal the ones of the real rows alone.
    After each forward, `last_rows_per_expert` is an (E,) device tensor of how many rows each expert
    ran on; they sum to sum_t k_t over the real rows, the work actually done.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int = 4,
        top_p: float = 0.5,
        min_experts: int = 1,
        max_experts: int | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        max_experts = num_experts if max_experts is None else max_experts
        if num_experts < 2:
            raise ValueError(f"ConditionalMoEFeedForward: num_experts must be >= 2, got {num_experts}.")
        if not 1 <= min_experts <= max_experts <= num_experts:
            raise ValueError(
                "ConditionalMoEFeedForward: need 1 <= min_experts <= max_experts <= num_experts, got "
                f"min_experts={min_experts}, max_experts={max_experts}, num_experts={num_experts}."
            )
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"ConditionalMoEFeedForward: top_p must be in (0, 1], got {top_p}.")
        self.num_experts, self.top_p = num_experts, top_p
        self.min_experts, self.max_experts = min_experts, max_experts
        self.router = nn.Linear(d_model, num_experts, bias=False)
        self.experts = GroupedExperts(num_experts, d_model, d_ff)
        self.dropout = PositionDropout(dropout)
        self.last_rows_per_expert: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, gathered: Gathered | None = None, valid: torch.Tensor | None = None):
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (T, D)
        probs = F.softmax(self.router(x).float(), dim=-1)  # (T, E); float: the cumsum decides k
        chosen = top_p_expert_mask(probs.detach(), self.top_p, self.min_experts, self.max_experts)
        if valid is not None:  # padding rows choose no expert
            valid = valid.reshape(-1)
            chosen = chosen & valid[:, None]

        # Candidate pairs: each token's max_experts most probable experts, valid where chosen.
        # The same stable sort as top_p_expert_mask, so every chosen expert is among them.
        top_expert = probs.detach().sort(dim=-1, descending=True, stable=True)[1][:, : self.max_experts]  # (T, m)
        top_prob = probs.gather(-1, top_expert)
        pair_valid = chosen.gather(-1, top_expert)
        token = torch.arange(x.shape[0], device=x.device).repeat_interleave(self.max_experts)
        # Gates: the raw router probability of each pair.
        out, counts_t = dispatch(
            x, self.experts, token, top_expert.reshape(-1), top_prob.reshape(-1), pair_valid.reshape(-1)
        )
        self.last_rows_per_expert = counts_t

        n_rows = chosen.sum().clamp_min(1)
        f = counts_t.to(probs.dtype) / n_rows
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)  # (T,)
        if valid is None:
            n_tokens, mean_probs, entropy = max(x.shape[0], 1), probs.mean(0), entropy.mean()
        else:  # real rows only (a count on the device: no host sync)
            n_tokens = valid.sum().clamp_min(1).to(probs.dtype)
            mean_probs = torch.where(valid[:, None], probs, 0.0).sum(0) / n_tokens
            entropy = torch.where(valid, entropy, 0.0).sum() / n_tokens
        load_balance = self.num_experts * (f * mean_probs).sum()
        compute = entropy / math.log(self.num_experts)
        stats = {f"expert_load/{e}": f[e] for e in range(self.num_experts)}
        stats["expert_load_max"] = f.max()
        stats["experts_per_token"] = counts_t.sum().to(probs.dtype) / n_tokens
        aux_losses = {"load_balance": load_balance, "compute": compute}
        return self.dropout(out, gathered).reshape(shape), aux_losses, stats
