"""Early exit: causality with exits, skipped feed-forward rows counted, exit logits, calibration,
aux-loss gradients, config."""

import math
import tempfile

import pytest
import torch
import torch.nn.functional as F
from fit_args import tiny_fit_args

from lightning_modules.early_exit import EarlyExitLanguageModel
from resnet_bk.layers.early_exit import calibrate_threshold, confidence, exit_outcomes
from resnet_bk.models.config import BKConfig
from resnet_bk.models.early_exit_lm import EarlyExitLM

V, D, L = 40, 16, 3


def _model(**kw):
    return EarlyExitLM(V, BKConfig(d_model=D, n_layers=L, num_experts=2, max_seq_len=64), **kw)


def _perturb(x: torch.Tensor, t: int) -> torch.Tensor:
    y = x.clone()
    y[:, t] = (y[:, t] + 1 + torch.arange(len(y))) % V
    return y


def _median_threshold(model, x) -> float:
    """A threshold at which about half of the positions exit after layer 1."""
    with torch.no_grad():
        hidden = model(x, exits=False).layer_hidden[0]
        return float(confidence(model.head(hidden)).median())


def _sharpen(model):
    # A larger embedding scale spreads the confidences, so that exits happen after several layers.
    with torch.no_grad():
        model.tok_emb.weight.mul_(50)
    return model


@pytest.mark.parametrize("n", [9, 24])
def test_causality_with_exits(n):
    torch.manual_seed(0)
    model = _sharpen(_model()).double().eval()
    x = torch.randint(0, V, (3, n))
    model.set_exit_threshold(_median_threshold(model, x))
    with torch.no_grad():
        out = model(x)
        assert 1.0 < out.stats["exit_layer_mean"] < L  # some positions exit, some run on
        for t in sorted({0, 1, n // 2, n - 1}):
            moved = model(_perturb(x, t)).logits
            torch.testing.assert_close(moved[:, :t], out.logits[:, :t], atol=1e-12, rtol=0)
            assert (moved[:, t] - out.logits[:, t]).abs().max() > 1e-6


def test_causality_in_train_mode():
    torch.manual_seed(0)
    model = _model().double().train()
    x = torch.randint(0, V, (2, 13))
    with torch.no_grad():
        base = model(x)
        assert len(base.layer_hidden) == L - 1
        for t in (0, 6, 12):
            moved = model(_perturb(x, t))
            torch.testing.assert_close(moved.logits[:, :t], base.logits[:, :t], atol=1e-12, rtol=0)
            for h_moved, h_base in zip(moved.layer_hidden, base.layer_hidden):
                torch.testing.assert_close(h_moved[:, :t], h_base[:, :t], atol=1e-12, rtol=0)


def test_exited_rows_skip_the_feed_forward_and_keep_their_exit_logits():
    torch.manual_seed(0)
    model = _sharpen(_model()).double().eval()
    x = torch.randint(0, V, (3, 20))
    rows = []
    for block in model.blocks:
        block.bk.moe.register_forward_hook(lambda m, inp, out: rows.append(inp[0].reshape(-1, D).shape[0]))
    with torch.no_grad():
        full = model(x, exits=False)
        layer1 = model.head(full.layer_hidden[0])
        threshold = _median_threshold(model, x)
        model.set_exit_threshold(threshold)
        rows.clear()
        out = model(x)
    exit_after_1 = confidence(layer1) >= threshold
    # Feed-forward rows: all positions in layer 1, then only the positions still running.
    assert rows == model.last_ffn_rows
    assert rows[0] == 60 and rows[1] == 60 - int(exit_after_1.sum()) and rows[2] <= rows[1]
    assert sum(rows) < L * 60
    assert out.stats["ffn_rows_fraction"].item() == pytest.approx(sum(rows) / (L * 60))
    # Positions that exit after layer 1 have exactly layer 1's logits (no one exited before them).
    torch.testing.assert_close(out.logits[exit_after_1], layer1[exit_after_1])
    assert not torch.allclose(out.logits[exit_after_1], full.logits[exit_after_1])


def test_infinite_threshold_matches_the_full_model():
    torch.manual_seed(0)
    model = _model().double().eval()
    x = torch.randint(0, V, (2, 11))
    with torch.no_grad():
        full = model(x)  # no threshold: all layers
        model.set_exit_threshold(math.inf)
        assert model(x).layer_hidden, "an infinite threshold runs all layers without per-layer heads"
        with pytest.raises(ValueError, match="needs an exit threshold"):
            model(x, exits=True)
        model.set_exit_threshold(2.0)  # above any confidence
        forced = model(x, exits=True)  # the exit path, nobody exits
    torch.testing.assert_close(forced.logits, full.logits)
    assert forced.stats["exit_layer_mean"].item() == L


def test_all_positions_exit_and_the_loop_ends():
    torch.manual_seed(0)
    model = _model().eval()
    model.set_exit_threshold(0.0)
    x = torch.randint(0, V, (2, 7))
    with torch.no_grad():
        out = model(x)
    assert model.last_ffn_rows == [14] and out.stats["exit_layer_mean"].item() == 1.0


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_short_and_odd_lengths(n):
    torch.manual_seed(0)
    model = _sharpen(_model()).eval()
    x = torch.randint(0, V, (2, n))
    model.set_exit_threshold(_median_threshold(model, x))
    with torch.no_grad():
        out = model(x)
    assert out.logits.shape == (2, n, V) and torch.isfinite(out.logits).all()


def test_exit_outcomes_and_calibration():
    # 2 intermediate layers, 4 positions.
    conf = torch.tensor([[0.9, 0.2, 0.6, 0.1], [0.95, 0.7, 0.8, 0.3]])
    agree = torch.tensor([[True, False, False, True], [True, True, True, False]])
    thresholds = torch.tensor([0.5, 0.75, 0.99])
    disagree, exit_layer_sum = exit_outcomes(conf, agree, thresholds)
    # 0.5: exits at layer 1,2,1,never -> disagreements: position 2 (layer-1 argmax wrong).
    # 0.75: exits at 1, never, 2, never -> none wrong. 0.99: nobody exits.
    assert disagree.tolist() == [1, 0, 0]
    assert exit_layer_sum.tolist() == [1 + 2 + 1 + 3, 1 + 3 + 2 + 3, 12]
    assert calibrate_threshold(disagree, 4, thresholds, 0.0) == 0.75
    assert calibrate_threshold(disagree, 4, thresholds, 0.25) == 0.5
    assert calibrate_threshold(torch.tensor([4, 4, 4]), 4, thresholds, 0.1) == math.inf


def test_module_adds_the_exit_loss_with_a_gradient_to_the_lower_layers_and_calibrates():
    torch.manual_seed(0)
    module = EarlyExitLanguageModel(lambda v: _model(), V, exit_loss_weight=0.5, max_disagreement=0.2)
    batch = {"input_ids": torch.randint(0, V, (2, 12)), "targets": torch.randint(0, V, (2, 12))}
    batch["targets"][0, -3:] = -100
    result = module.compute_loss(batch, "train")
    assert result.loss.item() == pytest.approx(
        (result.logs["ce"] + 0.01 * result.logs["aux/load_balance"] + 0.5 * result.logs["aux/exit_ce"]).item(), rel=1e-5
    )
    # The intermediate-head loss alone trains the layers below the last and the shared (tied) head.
    out = module.model(batch["input_ids"])
    exit_ce = F.cross_entropy(module.model.head(out.layer_hidden[0]).flatten(0, 1), batch["targets"].flatten())
    exit_ce.backward()
    assert module.model.blocks[0].bk.moe.experts.c_fc.weight.grad.abs().sum() > 0
    assert module.model.tok_emb.weight.grad.abs().sum() > 0
    assert module.model.blocks[-1].bk.moe.experts.c_fc.weight.grad is None
    # Calibration used the 21 scored training positions of the step above.
    assert int(module._calib_positions) == 21
    threshold = module.calibrate()
    assert threshold is not None and module.model.get_exit_threshold() == threshold


def test_config_trains_two_steps_and_logs_the_cost_of_exiting():
    from resnet_bk.cli import build

    with tempfile.TemporaryDirectory() as root:
        cli = build(
            [
                "--config",
                "configs/early_exit.yaml",
                *_TINY,
                "--trainer.default_root_dir",
                root,
                "--model.init_args.network.init_args.config.d_model",
                "16",
                "--model.init_args.network.init_args.config.n_layers",
                "2",
                "--model.init_args.max_disagreement",
                "1.0",
            ]  # exit everywhere possible: the exit path runs
        )
        cli.trainer.fit(cli.model, cli.datamodule)
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == 2
    for key in ("val/ppl", "val/ppl_all_layers", "val/ppl_exit_cost", "val/stats/exit_layer_mean", "train/aux/exit_ce"):
        assert torch.isfinite(metrics[key]), key
    assert metrics["val/stats/exit_layer_mean"] < 2


_TINY = tiny_fit_args(seq_len=16)


def test_a_run_without_validation_ends_with_a_usable_checkpoint(tmp_path):
    """Not calibrated is a state of its own, not a non-finite weight that the checkpoint guard refuses."""
    from resnet_bk.cli import main

    args = [
        "--config", "configs/early_exit.yaml", "--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--data.init_args.seq_len", "16", "--data.init_args.batch_size", "2", "--data.init_args.max_train_tokens", "2000",
        "--data.init_args.num_workers", "0", "--model.init_args.network.init_args.config.d_model", "16",
        "--model.init_args.network.init_args.config.n_layers", "2", "--trainer.default_root_dir", str(tmp_path),
    ]  # fmt: skip
    assert main(["fit", *args, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0"]) == 0
    (last,) = tmp_path.rglob("last.ckpt")
    state = torch.load(last, weights_only=False)["state_dict"]
    assert not bool(state["model.exit_enabled"]) and torch.isfinite(state["model.exit_threshold"])
    assert main(["validate", *args, "--trainer.limit_val_batches", "1", "--ckpt_path", str(last)]) == 0
