"""Exact resume: a run killed at any step and resumed from its last checkpoint gives the losses of
an uninterrupted run (CPU, float32: identical to 1e-6), through dropout, the data order, validation
in between, an epoch boundary, the curriculum / active-learning sampler state and the LR schedule,
for every config; checkpoints are written atomically; `--ckpt_path last` resumes."""

import hashlib
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_modules.checkpoint_io import AtomicCheckpointIO
from resnet_bk.cli import build, main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))
NET = "--model.init_args.network.init_args."
TINY = [
    "--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--data.init_args.num_workers", "0",
    f"{NET}d_model", "16", f"{NET}max_seq_len", "16", f"{NET}dropout", "0.1",
    "--model.init_args.warmup_steps", "4", "--data.init_args.seq_len", "16", "--data.init_args.batch_size", "4",
    "--data.init_args.max_train_tokens", "1000",  # 62 windows: 16 batches per epoch, the last one short
]  # fmt: skip
MAX_STEPS, KILL_AT, EVERY = 20, 13, 5  # killed mid-epoch 1 after the step-10 checkpoint; epoch 2 starts at 16
SHORT = {"max_steps": 6, "every": 3, "val_every": 4}  # the other configs: killed at 5, after the step-3 checkpoint


def depth_args(config: str) -> list[str]:
    """The fewest layers/blocks the config's network takes (its depth keys, whichever it has)."""
    network = yaml.safe_load((ROOT / "configs" / f"{config}.yaml").read_text())["model"]["init_args"]["network"]
    least = {"n_layers": 2 if "early_exit" in config else 1, "n_blocks": 2 if "act" in config else 1, "n_inner": 1}
    return [a for key, n in least.items() if key in network["init_args"] for a in (f"{NET}{key}", str(n))]


class Killed(Exception):
    pass


class Record(L.Callback):
    """Loss of every training step (by global step after it) and LR; kills the run after step `kill_at`."""

    def __init__(self, kill_at=None):
        self.kill_at, self.losses, self.lrs = kill_at, {}, {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = float(outputs["loss"])
        self.lrs[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]
        if trainer.global_step == self.kill_at:
            raise Killed


def fit(config, root, ckpt_path=None, kill_at=None, max_steps=MAX_STEPS, every=EVERY, val_every=7):
    extra_args = depth_args(config)
    if config == "gradient_caching":  # the cache is not checkpointed (documented): run without hits
        extra_args += ["--model.init_args.threshold", "2.0"]
    cli = build(["--config", str(ROOT / "configs" / f"{config}.yaml"), *TINY, *extra_args,
                 "--trainer.default_root_dir", str(root)])
    extra = [cb for cb in cli.trainer.callbacks if type(cb).__module__.startswith("callbacks")]  # curriculum / AL
    for cb in extra:  # scaled to this short run: still growing at the end; a new AL round every 4 steps
        cb.full_at_fraction, cb.every_n_steps, cb.start_step, cb.pool_size = 2.0, 4, 4, 32
    record = Record(kill_at)
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=every, save_last=True, save_top_k=0)
    manual = not cli.model.automatic_optimization  # Lightning refuses trainer clipping then; the module clips
    trainer = L.Trainer(
        accelerator="cpu", max_steps=max_steps, val_check_interval=val_every, limit_val_batches=1, logger=False,
        callbacks=[*extra, record, checkpoint], plugins=[AtomicCheckpointIO()], enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, gradient_clip_val=None if manual else 1.0,
    )  # fmt: skip
    try:
        trainer.fit(cli.model, cli.datamodule, ckpt_path=ckpt_path, weights_only=False)
    except Killed:
        pass
    return record, cli


@pytest.mark.parametrize("config", ["quickstart", "curriculum", "active_learning"])
def test_killed_mid_epoch_and_resumed_equals_uninterrupted(tmp_path, config):
    straight, _ = fit(config, tmp_path / "straight")
    killed, _ = fit(config, tmp_path / "killed", kill_at=KILL_AT)
    last = tmp_path / "killed" / "ckpt" / "last.ckpt"
    assert max(killed.losses) == KILL_AT and torch.load(last, weights_only=False)["global_step"] == 10
    resumed, cli = fit(config, tmp_path / "killed", ckpt_path=str(last))

    steps = sorted(resumed.losses)
    assert steps == list(range(11, MAX_STEPS + 1))  # steps 11-13 are redone, then the rest
    for step in steps:
        assert resumed.losses[step] == pytest.approx(straight.losses[step], rel=0, abs=1e-6), step
        assert resumed.lrs[step] == pytest.approx(straight.lrs[step], rel=1e-12)
    if config != "quickstart":  # the sampler really draws from a subset
        assert cli.datamodule.train_subset is not None


@pytest.mark.parametrize("config", [c for c in CONFIGS if c not in ("quickstart", "curriculum", "active_learning")])
def test_every_config_resumes_exactly(tmp_path, config):
    """Killed after step 5 (the run so far is the uninterrupted reference), resumed from step 3."""
    killed, _ = fit(config, tmp_path, kill_at=5, **SHORT)
    last = tmp_path / "ckpt" / "last.ckpt"
    assert sorted(killed.losses) == [1, 2, 3, 4, 5] and torch.load(last, weights_only=False)["global_step"] == 3
    resumed, _ = fit(config, tmp_path, ckpt_path=str(last), **SHORT)
    assert sorted(resumed.losses) == [4, 5, 6]  # steps 4-5 are redone (validation ran at 4), then 6
    for step in (4, 5):
        assert resumed.losses[step] == pytest.approx(killed.losses[step], rel=0, abs=1e-6), step


def test_ckpt_path_last_resumes_the_newest_run(tmp_path, capsys):
    args = ["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), *TINY, "--trainer.default_root_dir",
            str(tmp_path), "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]  # fmt: skip
    assert main([*args, "--ckpt_path", "last"]) == 2  # nothing to resume yet: a clear error
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --ckpt_path last: no last.ckpt") and len(err.splitlines()) == 1, err

    assert main([*args, "--trainer.max_steps", "6"]) == 0
    first = tmp_path / "quickstart" / "version_0"
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in first.rglob("*") if p.is_file()}
    assert main([*args, "--trainer.max_steps", "9", "--ckpt_path", "last"]) == 0
    resumed = torch.load(tmp_path / "quickstart" / "version_1" / "checkpoints" / "last.ckpt", weights_only=False)
    assert resumed["global_step"] == 9
    assert before == {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in first.rglob("*") if p.is_file()}


def test_a_crash_while_saving_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)
    good = path.read_bytes()

    def crash(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 2}, path)
    monkeypatch.undo()
    assert path.read_bytes() == good and list(tmp_path.iterdir()) == [path]  # no temp file left behind
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], torch.ones(3))

    # non-finite weights are never written over a good checkpoint
    with pytest.raises(FloatingPointError, match="weight w is not finite"):
        io.save_checkpoint({"state_dict": {"w": torch.tensor([1.0, float("nan")])}, "global_step": 3}, path)
    assert path.read_bytes() == good
