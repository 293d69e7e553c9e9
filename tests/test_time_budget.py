"""callbacks.TrainTimeBudget: a fit that stops after its seconds of training, with the LR cosine over that time."""

from __future__ import annotations

import math

import pytest

from callbacks.time_budget import TrainTimeBudget
from resnet_bk.cli import build
from tests.fit_args import tiny_fit_args


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_lr_factor_is_warmup_in_steps_then_cosine_in_budget_time(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr("callbacks.time_budget.time.perf_counter", clock)
    budget = TrainTimeBudget(seconds=10.0, start_after_steps=0)
    budget._warmup_steps, budget._min_lr_ratio = 4, 0.1
    assert budget.lr_factor(0) == pytest.approx(0.25)  # warmup by steps, whatever the clock says
    budget._since = clock.now  # the clock runs
    assert budget.lr_factor(10) == pytest.approx(1.0)
    clock.now += 5.0
    assert budget.lr_factor(10) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    budget._pause()  # validation: time stands still
    clock.now += 100.0
    assert budget.progress() == pytest.approx(0.5)
    budget._since = clock.now
    clock.now += 5.0
    assert budget.progress() == 1.0 and budget.lr_factor(10) == pytest.approx(0.1)
    assert budget.state_dict()["elapsed"] == pytest.approx(10.0)


def test_bad_budget_is_one_line():
    with pytest.raises(ValueError, match="seconds must be > 0"):
        TrainTimeBudget(seconds=0)
    with pytest.raises(ValueError, match="start_after_steps must be >= 0"):
        TrainTimeBudget(seconds=1, start_after_steps=-1)


def test_fit_stops_on_time_and_ends_at_the_cosine_floor():
    args = ["--config", "configs/quickstart.yaml", *tiny_fit_args(), "--trainer.max_steps", "100000"]
    args += ["--trainer.val_check_interval", "null", "--trainer.limit_val_batches", "0"]
    args += [
        "--model.init_args.warmup_steps",
        "0",
    ]  # however few steps a loaded machine runs, the cosine alone sets the LR
    cli = build(args)
    budget = TrainTimeBudget(seconds=1.0, start_after_steps=2)
    cli.trainer.callbacks.append(budget)
    cli.trainer.fit(cli.model, cli.datamodule)
    steps = cli.trainer.global_step
    assert 2 < steps < 100000
    assert 1.0 <= budget.elapsed < 3.0
    lr = cli.trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(cli.model.lr * cli.model.min_lr_ratio, rel=1e-6)
