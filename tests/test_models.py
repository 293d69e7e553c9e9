"""Models: the bidirectional core leaks (so the causality tests of tests/test_model_contract.py can fail),
the resolvent bound, MoE dispatch and its aux loss. Shapes, causality, generation, save/load and
gradient flow of every model: tests/test_model_contract.py."""

import pytest
import torch
import torch.nn.functional as F

from resnet_bk.layers import BKLayer, MoEFeedForward
from resnet_bk.models import ResNetBKLM, TransformerLM

V, D, MAX_LEN = 50, 16, 64

MODELS = {
    "resnet_bk": lambda **kw: ResNetBKLM(V, d_model=D, n_layers=2, num_experts=4, max_seq_len=MAX_LEN, **kw),
    "transformer": lambda **kw: TransformerLM(V, d_model=D, n_layers=2, n_heads=2, max_seq_len=MAX_LEN, **kw),
}


def _perturb(x: torch.Tensor, t: int) -> torch.Tensor:
    y = x.clone()
    y[:, t] = (y[:, t] + 1 + torch.arange(len(y))) % V  # a different token at t in every row
    return y


def test_bidirectional_core_leaks_the_future():
    """causal=False must fail the causality test, otherwise that test proves nothing."""
    torch.manual_seed(0)
    model = MODELS["resnet_bk"](causal=False).double().eval()
    x = torch.randint(0, V, (2, 16))
    with torch.no_grad():
        moved = model(_perturb(x, 8)).logits[:, :8] - model(x).logits[:, :8]
    # The resolvent's off-diagonal decays geometrically (about 4x per position at z = i and a small
    # init), so look at the neighbour: ~1e-6 there, far above float64 round-off (~1e-16).
    assert moved[:, -1].abs().max() > 1e-10


def test_resolvent_bound_and_bad_z():
    model = ResNetBKLM(V, d_model=D, n_layers=2, z_imag=2.0)
    assert float(model(torch.randint(0, V, (2, 9))).stats["g_abs_mean"]) <= 0.5
    for z in (-1j, 0j, 1.0 + 0j):
        with pytest.raises(ValueError, match="Im z"):
            BKLayer(D, 2 * D, z=z)
    with pytest.raises(ValueError, match="Im z"):
        ResNetBKLM(V, z_imag=0.0)


def test_load_balance_gradient_reaches_router():
    torch.manual_seed(0)
    model = MODELS["resnet_bk"]()
    out = model(torch.randint(0, V, (2, 12)))
    out.aux_losses["load_balance"].backward()
    for block in model.blocks:
        assert block.bk.moe.router.weight.grad.abs().sum() > 0


def _expert_rows(moe: MoEFeedForward) -> list:
    """Record, through forward hooks, how many rows each expert really ran on."""
    seen = [0] * moe.num_experts
    for e, expert in enumerate(moe.experts):
        expert.register_forward_hook(lambda mod, inp, out, e=e: seen.__setitem__(e, seen[e] + inp[0].shape[0]))
    return seen


@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_dispatch_matches_router_and_dense_reference(top_k):
    torch.manual_seed(0)
    moe = MoEFeedForward(D, 2 * D, num_experts=4, top_k=top_k).double()
    seen = _expert_rows(moe)
    x = torch.randn(3, 11, D, dtype=torch.float64)
    out, aux, stats = moe(x)

    probs = F.softmax(moe.router(x.reshape(-1, D)), dim=-1)
    gate, idx = probs.topk(top_k, dim=-1)
    expected = torch.bincount(idx.reshape(-1), minlength=4).tolist()
    assert moe.last_rows_per_expert == expected == seen
    assert sum(seen) == 3 * 11 * top_k  # each token ran top_k experts, not all of them

    # Dense reference, for the test only: every token through its chosen experts one by one.
    gate = gate / gate.sum(-1, keepdim=True) if top_k > 1 else gate
    tokens = x.reshape(-1, D)
    ref = torch.stack(
        [sum(gate[i, j] * moe.experts[int(idx[i, j])](tokens[i]) for j in range(top_k)) for i in range(len(tokens))]
    )
    torch.testing.assert_close(out.reshape(-1, D), ref)
    assert aux["load_balance"] >= 1.0 - 1e-9  # the Switch loss is minimised (= 1) at a uniform router
    assert abs(sum(float(stats[f"expert_load/{e}"]) for e in range(4)) - 1.0) < 1e-9


def test_moe_skips_unrouted_experts():
    moe = MoEFeedForward(D, 2 * D, num_experts=4, top_k=1)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[2, 0] = 1.0  # every token with a positive first feature goes to expert 2
    seen = _expert_rows(moe)
    x = torch.randn(2, 5, D)
    x[..., 0] = 10.0
    moe(x)
    assert seen == moe.last_rows_per_expert == [0, 0, 10, 0]


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
    moe = MoEFeedForward(D, 2 * D, num_experts=1)
    out, aux, stats = moe(torch.randn(2, 7, D))
    assert moe.router is None and aux == {} and moe.last_rows_per_expert == [14]
    model = ResNetBKLM(V, d_model=D, n_layers=2, num_experts=1)
    assert model(torch.randint(0, V, (2, 5))).aux_losses == {}


def test_bf16_autocast_runs():
    model = MODELS["resnet_bk"]()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randint(0, V, (2, 10)))
    assert torch.isfinite(out.logits.float()).all()
