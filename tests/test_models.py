"""Models: causality (DESIGN section 3), shapes, length errors, MoE dispatch and its aux loss."""

import pytest
import torch
import torch.nn.functional as F

from resnet_bk.layers import BKLayer, ResolventConfig
from resnet_bk.models import LMOutput, ResNetBKLM, TransformerLM, count_parameters

V, D, MAX_LEN = 50, 16, 64

MODELS = {
    "resnet_bk": lambda **kw: ResNetBKLM(V, d_model=D, n_layers=2, num_experts=4, max_seq_len=MAX_LEN, **kw),
    "transformer": lambda **kw: TransformerLM(V, d_model=D, n_layers=2, n_heads=2, max_seq_len=MAX_LEN, **kw),
}


def _perturb(x: torch.Tensor, t: int) -> torch.Tensor:
    y = x.clone()
    y[:, t] = (y[:, t] + 1 + torch.arange(len(y))) % V  # a different token at t in every row
    return y


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("train", [True, False])
def test_causality(name, train):
    torch.manual_seed(0)
    model = MODELS[name]().double().train(train)
    x = torch.randint(0, V, (3, 24))
    with torch.no_grad():
        base = model(x).logits
        for t in (0, 1, 7, 16, 23):
            moved = model(_perturb(x, t)).logits
            torch.testing.assert_close(moved[:, :t], base[:, :t], atol=1e-12, rtol=0)
            assert (moved[:, t] - base[:, t]).abs().max() > 1e-6  # the change is visible where allowed


def test_bidirectional_core_leaks_the_future():
    """causal=False must fail the causality test above, otherwise that test proves nothing."""
    torch.manual_seed(0)
    model = MODELS["resnet_bk"](causal=False).double().eval()
    x = torch.randint(0, V, (2, 16))
    with torch.no_grad():
        moved = model(_perturb(x, 8)).logits[:, :8] - model(x).logits[:, :8]
    # The resolvent's off-diagonal decays geometrically (about 4x per position at z = i and a small
    # init), so look at the neighbour: ~1e-6 there, far above float64 round-off (~1e-16).
    assert moved[:, -1].abs().max() > 1e-10


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("n", [1, 2, 3, 17])
def test_shapes(name, n):
    model = MODELS[name]()
    out = model(torch.randint(0, V, (2, n)))
    assert isinstance(out, LMOutput)
    assert out.logits.shape == (2, n, V)
    assert torch.isfinite(out.logits).all()
    for value in [*out.aux_losses.values(), *out.stats.values()]:
        assert torch.as_tensor(value).dim() == 0
    assert all(not torch.as_tensor(s).requires_grad for s in out.stats.values())


@pytest.mark.parametrize("name", MODELS)
def test_too_long_raises(name):
    with pytest.raises(ValueError, match=rf"{MAX_LEN + 1}.*{MAX_LEN}.*max_seq_len"):
        MODELS[name]()(torch.randint(0, V, (1, MAX_LEN + 1)))


@pytest.mark.parametrize("name", MODELS)
def test_tied_head(name):
    model = MODELS[name]()
    assert model.lm_head.weight is model.tok_emb.weight
    assert count_parameters(model) == sum(p.numel() for p in set(model.parameters()))


def test_resolvent_bound_and_bad_z():
    model = ResNetBKLM(V, d_model=D, n_layers=2, resolvent=ResolventConfig(z_imag=2.0))
    assert float(model(torch.randint(0, V, (2, 9))).stats["g_abs_mean"]) <= 0.5
    for z_imag in (-1.0, 0.0, float("nan")):
        with pytest.raises(ValueError, match="Im z"):
            ResolventConfig(z_imag=z_imag)
    with pytest.raises(ValueError, match="Im z"):
        ResolventConfig(channels=4, z_imag_max=0.0)


def test_load_balance_gradient_reaches_router():
    torch.manual_seed(0)
    model = MODELS["resnet_bk"]()
    out = model(torch.randint(0, V, (2, 12)))
    out.aux_losses["load_balance"].backward()
    for block in model.blocks:
        assert block.bk.moe.router.weight.grad.abs().sum() > 0


def test_bf16_autocast_runs():
    model = MODELS["resnet_bk"]()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randint(0, V, (2, 10)))
    assert torch.isfinite(out.logits.float()).all()
