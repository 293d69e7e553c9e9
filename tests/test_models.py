"""Models: the bidirectional core leaks (so the causality tests of tests/test_model_contract.py can fail),
the resolvent bound, MoE dispatch and its aux loss. Shapes, causality, generation, save/load and
gradient flow of every model: tests/test_model_contract.py."""

import pytest
import torch

from resnet_bk.layers import ResolventConfig
from resnet_bk.models import BKConfig, ModelConfig, ResNetBKLM, TransformerLM

V, D, MAX_LEN = 50, 16, 64

MODELS = {  # name -> factory(**config fields)
    "resnet_bk": lambda **kw: ResNetBKLM(V, BKConfig(d_model=D, n_layers=2, num_experts=4, max_seq_len=MAX_LEN, **kw)),
    "transformer": lambda **kw: TransformerLM(
        V, ModelConfig(d_model=D, n_layers=2, max_seq_len=MAX_LEN, **kw), n_heads=2
    ),
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
    model = ResNetBKLM(V, BKConfig(d_model=D, n_layers=2, resolvent=ResolventConfig(z_imag=2.0)))
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
