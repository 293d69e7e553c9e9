"""Multi-scale (resnet_bk.layers.multiscale, models.multiscale_lm, models.act_multiscale_lm):
the causal shift of the upsampling, causality of every variant in train and eval mode, N = 1..9,
work counts per resolution, ACT over multi-scale really skipping, and every Step-6 config parsing
(with a 2-step fit of configs/act_multiscale.yaml)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from fit_args import tiny_fit_args

from resnet_bk.layers.multiscale import CausalDownsample, CausalUpsample, pair_any
from resnet_bk.models.act_multiscale_lm import ACTMultiScaleLM
from resnet_bk.models.config import BKConfig
from resnet_bk.models.multiscale_lm import MultiScaleLM

V, D = 40, 16
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _mixed_halting(model, scale: float = 2.0):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for unit in model.act.halting:
            unit.proj.weight.copy_(torch.randn(unit.proj.weight.shape, generator=g) * scale)
            unit.proj.bias.fill_(0.0)
    return model


def _config(n_layers: int, num_experts: int = 2) -> BKConfig:
    """n_layers residual blocks: 2 per simple multi-scale block, 4 per hierarchical one."""
    return BKConfig(d_model=D, n_layers=n_layers, num_experts=num_experts, max_seq_len=64)


MODELS = {
    "simple": lambda: MultiScaleLM(V, _config(4)),
    "hierarchical": lambda: MultiScaleLM(V, _config(4), hierarchical=True),
    "simple_mlp": lambda: MultiScaleLM(V, _config(4, num_experts=1), refine="mlp"),
    "act_simple": lambda: _mixed_halting(ACTMultiScaleLM(V, _config(6))),
    "act_hierarchical": lambda: _mixed_halting(ACTMultiScaleLM(V, _config(12), hierarchical=True, refine="mlp")),
}


def _perturb(x: torch.Tensor, t: int) -> torch.Tensor:
    y = x.clone()
    y[:, t] = (y[:, t] + 1 + torch.arange(len(y))) % V
    return y


def _assert_causal(model, x, positions):
    with torch.no_grad():
        base = model(x).logits
        for t in positions:
            moved = model(_perturb(x, t)).logits
            torch.testing.assert_close(moved[:, :t], base[:, :t], atol=1e-12, rtol=0)
            assert (moved[:, t] - base[:, t]).abs().max() > 1e-9


def test_upsample_shift_and_downsample_pairs():
    d = 3
    up, down = CausalUpsample(d), CausalDownsample(d)
    c = torch.arange(1.0, 4.0).view(1, 3, 1).expand(1, 3, d)  # coarse tokens 1, 2, 3
    for n in (6, 7):
        got = up(c, n)[0, :, 0].tolist()
        # position t gets coarse token (t - 1) // 2; position 0 gets nothing
        assert got == [0.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0][:n]
    with pytest.raises(ValueError):
        up(c, 8)
    x = torch.arange(7.0).view(1, 7, 1).expand(1, 7, d)
    assert down(x)[0, :, 0].tolist() == [0.5, 2.5, 4.5]  # pairs (0,1), (2,3), (4,5); 6 unpaired
    assert down(x[:, :1]).shape == (1, 0, d)
    mask = torch.tensor([[True, False, False, False, False, True, True]])
    assert pair_any(mask, 3).tolist() == [[True, False, True]]


def test_causality_test_catches_an_unshifted_upsample(monkeypatch):
    """Upsampling without the shift (position 2j gets token j, which pooled 2j+1) must fail."""

    def leaky(self, c, n):
        b, m, d = c.shape
        out = c.repeat_interleave(2, dim=1)
        return torch.cat([out, c.new_zeros(b, n - 2 * m, d)], dim=1)

    monkeypatch.setattr(CausalUpsample, "forward", leaky)
    torch.manual_seed(0)
    model = MODELS["simple"]().double().eval()
    with pytest.raises(AssertionError):
        _assert_causal(model, torch.randint(0, V, (2, 12)), (5,))


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_short_and_odd_lengths(name, n):
    torch.manual_seed(0)
    model = MODELS[name]()
    out = model(torch.randint(0, V, (2, n)))
    assert out.logits.shape == (2, n, V) and torch.isfinite(out.logits).all()
    out.logits.sum().backward()
    for value in [*out.aux_losses.values(), *out.stats.values()]:
        assert torch.as_tensor(value).dim() == 0


@pytest.mark.parametrize("n", [1, 7, 16])
def test_work_per_resolution(n):
    out = MODELS["hierarchical"]()(torch.randint(0, V, (2, n)))
    tokens = 2 * n
    assert out.stats["mix_tokens/res1"] == 1.0  # one refinement block at full resolution
    assert out.stats["mix_tokens/res2"] == pytest.approx(2 * 2 * (n // 2) / tokens)  # encoder + decoder
    assert out.stats["mix_tokens/res4"] == pytest.approx(2 * (n // 4) / tokens)
    assert out.stats["ffn_rows/res2"] == out.stats["mix_tokens/res2"]


def test_act_multiscale_halting_at_block_1_runs_one_block():
    torch.manual_seed(0)
    model = ACTMultiScaleLM(V, _config(6))
    with torch.no_grad():
        model.act.halting[0].proj.bias.fill_(20.0)
    calls = [0] * len(model.blocks)
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    out = model(torch.randint(0, V, (2, 11)))
    assert calls == [1, 0, 0]
    assert float(out.stats["layers_executed"]) == 1.0
    assert out.stats["ffn_rows/res1"] == 1.0 and out.stats["ffn_rows/res2"] == pytest.approx(2 * 5 / 22)


def test_act_multiscale_skips_halted_rows_at_every_resolution():
    torch.manual_seed(0)
    model = MODELS["act_simple"]()
    with torch.no_grad():
        out = model(torch.randint(0, V, (4, 16)))
    executed = float(out.stats["layers_executed"])
    assert 1.0 < executed < 3.0
    # full resolution: one feed-forward row per block a position takes
    assert out.stats["ffn_rows/res1"] == pytest.approx(executed)
    assert out.stats["mix_tokens/res1"] == float(out.stats["layers_run"])  # mixes run everywhere
    assert out.stats["ffn_rows/res2"] < out.stats["mix_tokens/res2"]  # some coarse pairs halted


def test_gradient_reaches_halting_unit():
    torch.manual_seed(0)
    model = ACTMultiScaleLM(V, _config(6))
    out = model(torch.randint(0, V, (2, 9)))
    (out.logits.square().mean() + out.aux_losses["ponder"]).backward()
    assert model.act.halting[0].proj.weight.grad.abs().sum() > 0


def test_bad_refine_is_an_error():
    with pytest.raises(ValueError, match="refine"):
        MultiScaleLM(V, BKConfig(d_model=D), refine="conv")


def test_n_layers_fill_whole_multiscale_blocks():
    assert (
        len(MultiScaleLM(V, _config(6)).blocks) == 3
        and len(ACTMultiScaleLM(V, _config(8), hierarchical=True).blocks) == 2
    )
    with pytest.raises(ValueError, match=r"MultiScaleLM: config.n_layers must be a multiple of 2 .* got 3"):
        MultiScaleLM(V, _config(3))
    with pytest.raises(ValueError, match=r"ACTMultiScaleLM: config.n_layers must be a multiple of 4 .* got 6"):
        ACTMultiScaleLM(V, _config(6), hierarchical=True)


# ------------------------------------------------------------------------------------- configs
_TINY = tiny_fit_args(seq_len=15, d_model=16)
STEP6_CONFIGS = {
    "act.yaml": "ACTResNetBKLM",
    "multiscale.yaml": "MultiScaleLM",
    "multiscale_hierarchical.yaml": "MultiScaleLM",
    "act_multiscale.yaml": "ACTMultiScaleLM",
}


@pytest.mark.parametrize("config", STEP6_CONFIGS)
def test_config_parses(config):
    from resnet_bk.cli import build

    with tempfile.TemporaryDirectory() as root:
        cli = build(["--config", str(CONFIGS / config), *_TINY, "--trainer.default_root_dir", root])
    assert type(cli.model.model).__name__ == STEP6_CONFIGS[config]
    assert cli.model.model.ln_f.normalized_shape == (16,)
    if "act" in config:
        assert cli.model.aux_loss_weights["ponder"] == 0.01


def test_act_multiscale_config_trains_two_steps():
    from resnet_bk.cli import build

    with tempfile.TemporaryDirectory() as root:
        cli = build(
            [
                "--config",
                str(CONFIGS / "act_multiscale.yaml"),
                *_TINY,
                "--trainer.default_root_dir",
                root,
                "--model.init_args.network.init_args.config.n_layers",
                "4",
                "--trainer.callbacks+=callbacks.FlopsPerToken",
            ]
        )
        cli.trainer.fit(cli.model, cli.datamodule)
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == 2
    assert torch.isfinite(metrics["val/ppl"])
    for key in (
        "train/aux/ponder",
        "train/stats/layers_executed",
        "val/stats/layers_executed",
        "val/stats/halt_frac/1",
        "val/stats/ffn_rows/res2",
        "val/flops_per_token",
    ):
        assert key in metrics, key
