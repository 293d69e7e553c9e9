"""Conditional MoE: top-p routing rule, causality, gathered dispatch (rows counted), aux-loss gradients, config."""

import tempfile

import pytest
import torch
import torch.nn.functional as F
from fit_args import tiny_fit_args
from test_moe import expert_mlp
from torch.utils.flop_counter import FlopCounterMode

from resnet_bk.layers.conditional_moe import ConditionalMoEFeedForward, top_p_expert_mask
from resnet_bk.models.conditional_moe_lm import ConditionalMoELM
from resnet_bk.models.config import BKConfig

V, D = 40, 16


def _model(**kw):
    config = BKConfig(d_model=D, n_layers=2, num_experts=4, max_seq_len=64)
    return ConditionalMoELM(V, config, **{"top_p": 0.6, "min_experts": 1, "max_experts": 3, **kw})


def _perturb(x: torch.Tensor, t: int) -> torch.Tensor:
    y = x.clone()
    y[:, t] = (y[:, t] + 1 + torch.arange(len(y))) % V
    return y


def test_top_p_mask_takes_experts_until_the_mass_reaches_p_within_min_max():
    probs = torch.tensor([[0.70, 0.20, 0.05, 0.05], [0.30, 0.25, 0.25, 0.20], [0.05, 0.05, 0.50, 0.40]])
    mask = top_p_expert_mask(probs, top_p=0.6, min_experts=1, max_experts=4)
    assert mask.tolist() == [[True, False, False, False], [True, True, True, False], [False, False, True, True]]
    assert top_p_expert_mask(probs, 0.6, 2, 4).sum(-1).tolist() == [2, 3, 2]  # min_experts
    assert top_p_expert_mask(probs, 0.6, 1, 2).sum(-1).tolist() == [1, 2, 2]  # max_experts
    assert top_p_expert_mask(probs, 1.0, 1, 4).sum(-1).tolist() == [4, 4, 4]


def test_output_equals_dense_reference_and_only_chosen_rows_run():
    torch.manual_seed(0)
    moe = ConditionalMoEFeedForward(D, 32, num_experts=4, top_p=0.6, min_experts=1, max_experts=4)
    with torch.no_grad():
        moe.router.weight.mul_(3)  # spread the router so that tokens take different numbers of experts
    x = torch.randn(3, 7, D)
    with FlopCounterMode(display=False) as counter:
        out, aux, stats = moe(x)
    expert_flops = counter.get_total_flops() - 2 * 21 * D * 4  # less the router's matmul

    probs = F.softmax(moe.router(x.reshape(-1, D)), -1)
    mask = top_p_expert_mask(probs, 0.6, 1, 4)
    k = mask.sum(-1)
    assert k.min() < k.max(), "the test needs tokens that take different numbers of experts"
    dense = sum(mask[:, e, None] * probs[:, e, None] * expert_mlp(moe.experts, e, x.reshape(-1, D)) for e in range(4))
    torch.testing.assert_close(out.reshape(-1, D), dense, atol=1e-5, rtol=1e-5)
    # The saving is real: the experts' matmuls ran on sum_t k_t rows, not on T * num_experts.
    assert moe.last_rows_per_expert.tolist() == mask.sum(0).tolist()
    assert int(k.sum()) < 21 * 4
    bias_rows = 21 * 4 * 2 * 4 * (32 + D)  # one_hot(expert) @ bias over every candidate row (max_experts = 4)
    assert expert_flops == int(k.sum()) * 2 * (2 * D * 32) + bias_rows
    assert stats["experts_per_token"].item() == pytest.approx(k.double().mean().item())
    assert sum(stats[f"expert_load/{e}"] for e in range(4)).item() == pytest.approx(1.0)


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_short_and_odd_lengths(n):
    model = _model()
    out = model(torch.randint(0, V, (2, n)))
    assert out.logits.shape == (2, n, V) and torch.isfinite(out.logits).all()
    assert set(out.aux_losses) == {"load_balance", "compute"}
    assert 1.0 <= out.stats["experts_per_token"].item() <= 3.0


def test_each_aux_loss_and_the_lm_loss_reach_the_router():
    torch.manual_seed(0)
    model = _model()
    x = torch.randint(0, V, (2, 12))
    routers = [block.bk.moe.router.weight for block in model.blocks]
    for name in ("load_balance", "compute", "ce"):
        model.zero_grad()
        out = model(x)
        loss = F.cross_entropy(out.logits.flatten(0, 1), x.flatten()) if name == "ce" else out.aux_losses[name]
        loss.backward()
        for w in routers:
            assert w.grad is not None and w.grad.abs().sum() > 0, name


def test_compute_penalty_lowers_experts_per_token():
    """Minimising the router entropy alone must make tokens take fewer experts."""
    torch.manual_seed(0)
    model = _model(top_p=0.9, max_experts=4)
    x = torch.randint(0, V, (4, 16))
    opt = torch.optim.SGD([b.bk.moe.router.weight for b in model.blocks], lr=5.0)
    before = model(x).stats["experts_per_token"].item()
    for _ in range(30):
        opt.zero_grad()
        model(x).aux_losses["compute"].backward()
        opt.step()
    assert model(x).stats["experts_per_token"].item() < before - 0.5


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(ValueError, match="min_experts"):
        ConditionalMoEFeedForward(D, 32, num_experts=4, min_experts=3, max_experts=2)
    with pytest.raises(ValueError, match="top_p"):
        ConditionalMoEFeedForward(D, 32, num_experts=4, top_p=0.0)


def test_config_trains_two_steps():
    from resnet_bk.cli import build

    with tempfile.TemporaryDirectory() as root:
        cli = build(
            [
                "--config",
                "configs/conditional_moe.yaml",
                *_TINY,
                "--trainer.default_root_dir",
                root,
                "--model.init_args.network.init_args.config.d_model",
                "16",
                "--model.init_args.network.init_args.config.n_layers",
                "2",
            ]
        )
        cli.trainer.fit(cli.model, cli.datamodule)
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == 2
    assert torch.isfinite(metrics["val/ppl"]) and "train/stats/experts_per_token" in metrics
    assert "train/aux/compute" in metrics and "val/stats/expert_load/0" in metrics


_TINY = tiny_fit_args(seq_len=16)
