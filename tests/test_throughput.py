"""callbacks.Throughput: what a fit logs (train and val tokens/s, step time) and when the timers are read."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml
from fit_args import tiny_fit_args

from callbacks import Throughput

ROOT = Path(__file__).resolve().parents[1]


class _Recorder:
    """A logger stand-in: the (step, metrics) of every log_metrics call."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, dict]] = []

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.calls.append((step, dict(metrics)))


def test_timers_are_read_only_at_logging_steps():
    throughput = Throughput(warmup_steps=1, log_every_n_steps=3)
    recorder = _Recorder()
    trainer = SimpleNamespace(world_size=2, log_every_n_steps=50, loggers=[recorder], global_step=0)
    batch = {"input_ids": torch.zeros(4, 8, dtype=torch.long)}
    for i in range(5):
        throughput.on_train_batch_start(trainer, None, batch, i)
        trainer.global_step = i + 1
        throughput.on_train_batch_end(trainer, None, None, batch, i)
        assert len(throughput._pending) == (i + 1) % 3  # marks wait unread between logging steps
    (step, logged), *_ = recorder.calls
    assert len(recorder.calls) == 1 and step == 3 and set(logged) == {"train/tokens_per_s", "train/step_ms"}
    # batches 2 and 3 are timed (batch 1 is warm-up); every rank's 32 tokens count
    assert math.isclose(logged["train/tokens_per_s"] * logged["train/step_ms"] / 1000, 2 * 32)
    s = throughput.summary()
    assert s["tokens"] == 5 * 64 and s["timed_tokens"] == 4 * 64 and s["val_tokens_per_s"] is None
    assert s["timed_seconds"] < s["train_seconds"] and s["peak_mem_gb"] is None and s["gpu_busy"] is None


def test_fit_logs_train_and_val_tokens_per_s(tmp_path):
    from resnet_bk.cli import build

    callback = {"class_path": "callbacks.Throughput", "init_args": {"warmup_steps": 1, "log_every_n_steps": 2}}
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path)}}
    args = [*tiny_fit_args(), "--trainer.max_steps", "4", "--trainer.val_check_interval", "4"]
    args += [f"--trainer.callbacks+={json.dumps(callback)}", "--trainer.logger", json.dumps(logger)]
    cli = build(["--config", str(ROOT / "configs" / "quickstart.yaml"), *args])
    cli.trainer.fit(cli.model, cli.datamodule)
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    logged = {key: [(int(r["step"]), float(r[key])) for r in rows if r.get(key)] for key in rows[0]}
    assert [step for step, _ in logged["train/tokens_per_s"]] == [2, 4]
    assert [step for step, _ in logged["val/tokens_per_s"]] == [4]
    assert all(v > 0 and math.isfinite(v) for key in ("train/tokens_per_s", "val/tokens_per_s") for _, v in logged[key])
    (throughput,) = [c for c in cli.trainer.callbacks if isinstance(c, Throughput)]
    assert throughput.summary()["val_tokens_per_s"] == logged["val/tokens_per_s"][0][1]
    assert throughput.tokens == 4 * 2 * 16  # tiny_fit_args: batches of 2 x 16 tokens


def test_sparse_configs_switch_it_on():
    for config in ("sparse_bk.yaml", "multiscale_sparse.yaml"):
        callbacks = yaml.safe_load((ROOT / "configs" / config).read_text())["trainer"]["callbacks"]
        assert "callbacks.Throughput" in [c["class_path"] for c in callbacks], config
