"""NaN safety: a non-finite loss or gradient is caught at the step it occurs; the
run stops (default) naming the step and the tensor, or skips the step (no parameter or optimizer
update) and counts it; a non-finite model is never written over a good checkpoint."""

from functools import partial

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_modules.checkpoint_io import AtomicCheckpointIO
from lightning_modules.language_model import LanguageModel
from resnet_bk.models import BKConfig, ResNetBKLM

V = 40
NET = partial(ResNetBKLM, config=BKConfig(d_model=16, n_layers=1, num_experts=2, max_seq_len=8))


def batches(n, b=2, n_seq=8):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, V, (b, n_seq), generator=g), "targets": torch.randint(0, V, (b, n_seq), generator=g),
             "index": torch.arange(b)} for _ in range(n)]  # fmt: skip


class Poisoned(LanguageModel):
    """Makes the loss (or one parameter's gradient) NaN at the given global steps."""

    def __init__(self, *args, nan_loss_at=(), nan_grad_at=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.nan_loss_at, self.nan_grad_at = set(nan_loss_at), set(nan_grad_at)
        self.model.ln_f.weight.register_hook(lambda g: g * float("nan") if self.global_step in self.nan_grad_at else g)

    def compute_loss(self, batch, stage):
        out = super().compute_loss(batch, stage)
        if stage == "train" and self.global_step in self.nan_loss_at:
            return out._replace(loss=out.loss * float("nan"))
        return out


class Snapshots(L.Callback):
    """Parameters before each training batch, by global step."""

    def __init__(self):
        self.params = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.params[trainer.global_step] = torch.cat([p.detach().flatten().clone() for p in module.parameters()])


def fit(module, tmp_path, steps=6, **kwargs):
    snaps = Snapshots()
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_last=True, save_top_k=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                        callbacks=[snaps, ckpt], plugins=[AtomicCheckpointIO()], **kwargs)  # fmt: skip
    trainer.fit(module, train_dataloaders=DataLoader(batches(steps), batch_size=None))
    return trainer, snaps


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_stop_names_the_step_and_tensor_and_keeps_the_last_good_checkpoint(tmp_path, where):
    torch.manual_seed(0)
    module = Poisoned(network=NET, vocab_size=V, warmup_steps=0, **{f"nan_{where}_at": [3]})
    with pytest.raises(FloatingPointError) as info:
        fit(module, tmp_path)
    message = str(info.value)
    assert "global step 3" in message
    assert ("train loss (nan" in message) if where == "loss" else ("gradient of model.ln_f.weight" in message)
    last = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert last["global_step"] == 3  # written after steps 0-2, the last good ones
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
    assert all(torch.isfinite(p).all() for p in module.parameters())  # nothing was applied


def test_skip_drops_exactly_the_bad_steps_and_counts_them(tmp_path):
    torch.manual_seed(0)
    module = Poisoned(network=NET, vocab_size=V, warmup_steps=0, nonfinite="skip", nan_loss_at=[1], nan_grad_at=[3])
    trainer, snaps = fit(module, tmp_path, steps=6, gradient_clip_val=1.0)
    assert trainer.global_step == 6 and module.nonfinite_skipped == 2
    assert float(trainer.callback_metrics["train/nonfinite_skipped"]) == 2
    for step in range(5):  # a skipped step leaves the parameters (and AdamW's moments) untouched
        changed = not torch.equal(snaps.params[step], snaps.params[step + 1])
        assert changed == (step not in (1, 3)), step
    assert all(torch.isfinite(p).all() for p in module.parameters())
    last = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert last["resnet_bk"]["nonfinite_skipped"] == 2  # the counter survives a resume


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    torch.manual_seed(0)
    module = LanguageModel(network=NET, vocab_size=V, warmup_steps=0)

    class Corrupt(L.Callback):  # weights go bad after step 2's update, behind the guards' back
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.global_step == 2:
                with torch.no_grad():
                    next(module.parameters()).fill_(float("inf"))

    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_last=True, save_top_k=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[Corrupt(), ckpt],
                        plugins=[AtomicCheckpointIO()])  # fmt: skip
    with pytest.raises(FloatingPointError, match="refusing to write .* is not finite"):
        trainer.fit(module, train_dataloaders=DataLoader(batches(4), batch_size=None))
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == 1


def test_deferred_check_names_the_first_bad_step_and_checkpoints_nothing_after_it(tmp_path):
    """With the record read only every 3 steps (the GPU default reads it at logging steps), the bad
    step is still the one named, and no checkpoint is written after it."""
    torch.manual_seed(0)
    module = Poisoned(network=NET, vocab_size=V, warmup_steps=0, nan_loss_at=[3], nonfinite_check_interval=3)
    with pytest.raises(FloatingPointError, match=r"train loss \(nan.* at global step 3, batch 3") as info:
        fit(module, tmp_path)
    assert "nothing after it was checkpointed" in str(info.value)
    last = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert last["global_step"] == 3  # written after steps 0-2, the last good ones
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


def test_stop_mode_reads_no_value_between_checks(monkeypatch, tmp_path):
    """Between checks a training step reads nothing back from the device: the watch's first() (the
    only read) runs once per interval and before each checkpoint."""
    from lightning_modules.nonfinite import NonFiniteWatch

    reads = []
    original = NonFiniteWatch.first
    monkeypatch.setattr(NonFiniteWatch, "first", lambda self: reads.append(1) or original(self))
    module = LanguageModel(network=NET, vocab_size=V, warmup_steps=0, nonfinite_check_interval=4)
    trainer = L.Trainer(accelerator="cpu", max_steps=8, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, enable_checkpointing=False)  # fmt: skip
    trainer.fit(module, train_dataloaders=DataLoader(batches(8), batch_size=None))
    assert len(reads) == 4  # steps 3 and 7: once after the loss, once after the gradients
