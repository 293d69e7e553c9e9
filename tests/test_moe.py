"""MoE feed-forward: the grouped dispatch against its loop reference and a per-token dense
reference, routing counts, really-skipped experts, token independence, no host reads."""

import pytest
import torch
import torch.nn.functional as F

from resnet_bk.layers import BKLayer, MoEFeedForward
from resnet_bk.layers.conditional_moe import ConditionalMoEFeedForward
from resnet_bk.layers.moe import GroupedExperts, dispatch, experts_reference
from resnet_bk.models import BKConfig, ResNetBKLM

D = 16


def expert_mlp(experts: GroupedExperts, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e applied to x (..., D), straight from its weights."""
    h = F.gelu(F.linear(x, experts.c_fc.weight[e], experts.c_fc.bias[e]))
    return F.linear(h, experts.c_proj.weight[e], experts.c_proj.bias[e])


@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_matches_router_and_per_token_reference(top_k):
    torch.manual_seed(0)
    moe = MoEFeedForward(D, 2 * D, num_experts=4, top_k=top_k).double()  # float64: the reference loop
    x = torch.randn(3, 11, D, dtype=torch.float64)
    out, aux, stats = moe(x)

    probs = F.softmax(moe.router(x.reshape(-1, D)), dim=-1)
    gate, idx = probs.topk(top_k, dim=-1)
    assert moe.last_rows_per_expert.tolist() == torch.bincount(idx.reshape(-1), minlength=4).tolist()
    assert int(moe.last_rows_per_expert.sum()) == 3 * 11 * top_k  # top_k experts a token, not all

    gate = gate / gate.sum(-1, keepdim=True) if top_k > 1 else gate
    tokens = x.reshape(-1, D)
    ref = torch.stack(
        [
            sum(gate[i, j] * expert_mlp(moe.experts, int(idx[i, j]), tokens[i]) for j in range(top_k))
            for i in range(len(tokens))
        ]
    )
    torch.testing.assert_close(out.reshape(-1, D), ref)
    assert aux["load_balance"] >= 1.0 - 1e-9  # the Switch loss is minimised (= 1) at a uniform router
    assert abs(sum(float(stats[f"expert_load/{e}"]) for e in range(4)) - 1.0) < 1e-9


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_invalid", [False, True])
def test_grouped_dispatch_matches_loop_reference_values_and_gradients(dtype, with_invalid):
    """The grouped product (torch._grouped_mm) against experts_reference, forward and backward."""
    torch.manual_seed(1)
    experts = GroupedExperts(4, D, 3 * D)
    pairs = 40
    x = torch.randn(20, D)
    token = torch.randint(0, 20, (pairs,))
    expert = torch.randint(0, 3, (pairs,))  # expert 3 gets no rows: an empty group
    gate = torch.rand(pairs)
    valid = torch.rand(pairs) > 0.3 if with_invalid else None

    def run(grouped: bool):
        experts.zero_grad()
        xx = x.clone().to(dtype).requires_grad_()
        if grouped:
            out, rows = dispatch(xx, experts.to(dtype), token, expert, gate, valid)
        else:
            import resnet_bk.layers.moe as moe_module

            original = moe_module._grouped_mm_available
            moe_module._grouped_mm_available = lambda _x: False  # force the loop reference
            try:
                out, rows = dispatch(xx, experts.to(dtype), token, expert, gate, valid)
            finally:
                moe_module._grouped_mm_available = original
        out.float().pow(2).sum().backward()
        grads = [xx.grad] + [p.grad.clone() for p in experts.parameters()]
        return out, rows, grads

    out_g, rows_g, grads_g = run(True)
    out_r, rows_r, grads_r = run(False)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(out_g, out_r, **tol)
    assert torch.equal(rows_g, rows_r)
    keep = valid if valid is not None else torch.ones(pairs, dtype=torch.bool)
    assert rows_g.tolist() == torch.bincount(expert[keep], minlength=4).tolist()
    for a, b in zip(grads_g, grads_r):
        torch.testing.assert_close(a, b, **tol)


def test_moe_skips_unrouted_experts():
    moe = MoEFeedForward(D, 2 * D, num_experts=4, top_k=1)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[2, 0] = 1.0  # every token with a positive first feature goes to expert 2
    rows_in = []
    moe.experts.register_forward_hook(lambda mod, inp, out: rows_in.append(inp[0].shape[0]))
    x = torch.randn(2, 5, D)
    x[..., 0] = 10.0
    moe(x)
    assert moe.last_rows_per_expert.tolist() == [0, 0, 10, 0]
    assert rows_in == [10]  # the grouped experts saw T * top_k rows, nothing dense


def test_moe_token_output_is_independent_of_other_tokens():
    """Routing is per token with no capacity limit: one token's output ignores the rest."""
    torch.manual_seed(0)
    moe = MoEFeedForward(D, 2 * D, num_experts=4, top_k=2).double()
    x = torch.randn(2, 9, D, dtype=torch.float64)
    full = moe(x)[0]
    alone = torch.cat([moe(x[:, i : i + 1])[0] for i in range(9)], dim=1)
    torch.testing.assert_close(full, alone, atol=1e-12, rtol=0)
    # A BKLayer's feed-forward on a gathered subset of positions gives the same rows.
    layer = BKLayer(D, 2 * D).double()
    keep = torch.tensor([0, 3, 4, 8])
    torch.testing.assert_close(layer.feed_forward(x[:, keep])[0], layer.feed_forward(x)[0][:, keep])


def test_single_expert_is_plain_mlp():
    torch.manual_seed(0)
    moe = MoEFeedForward(D, 2 * D, num_experts=1)
    x = torch.randn(2, 7, D)
    out, aux, stats = moe(x)
    assert moe.router is None and aux == {} and moe.last_rows_per_expert.tolist() == [14]
    torch.testing.assert_close(out, expert_mlp(moe.experts, 0, x))
    model = ResNetBKLM(50, BKConfig(d_model=D, n_layers=2, num_experts=1))
    assert model(torch.randint(0, 50, (2, 5))).aux_losses == {}


@pytest.mark.parametrize(
    "make", [lambda: MoEFeedForward(D, 2 * D, 4, top_k=2), lambda: ConditionalMoEFeedForward(D, 2 * D, 4)]
)
def test_moe_reads_nothing_back_to_the_host(make):
    """On the meta device every value read (.tolist(), .item(), bool(t)) raises: forward and
    backward run there in bfloat16 only if the dispatch never syncs and all shapes are static."""
    moe = make().to("meta", torch.bfloat16)
    x = torch.randn(3, 11, D, device="meta", dtype=torch.bfloat16, requires_grad=True)
    out, aux, _ = moe(x)
    (out.float().sum() + sum(aux.values())).backward()
    assert out.shape == x.shape and x.grad.shape == x.shape
    with pytest.raises(NotImplementedError):  # the meta device has no values to read
        experts_reference(moe.experts, x[0], torch.zeros(4, dtype=torch.int32, device="meta"))
