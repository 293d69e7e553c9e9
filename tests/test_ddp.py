"""2-process DDP on CPU (gloo) for the plain model: WikiTextDataModule +
LanguageModel at global batch 4 as 2 ranks x 2 equal 1 process x 4 (same windows, same losses and
weights up to float32 reduction order), and a non-finite loss on one rank only makes both ranks
skip that step together (no hang, replicas identical)."""

import os
import socket
import time
from functools import partial

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp

from datamodules import WikiTextDataModule
from lightning_modules.language_model import LanguageModel
from resnet_bk.models import BKConfig, ResNetBKLM

# dropout 0: deterministic
NET = partial(ResNetBKLM, config=BKConfig(d_model=16, n_layers=1, num_experts=1, max_seq_len=8, dropout=0.0))
STEPS = 6


def corpus(folder):
    words = [f"w{i}" for i in range(30)]
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(words[j] for j in torch.randint(0, 30, (12,), generator=g).tolist()) for _ in range(60)]
    os.makedirs(folder, exist_ok=True)
    for split, part in (("train", lines), ("valid", lines[:5]), ("test", lines[5:10])):
        with open(os.path.join(folder, f"wiki.{split}.tokens"), "w") as f:
            f.write("\n".join(part) + "\n")
    return folder


class Poisoned(LanguageModel):
    def __init__(self, *args, nan_at=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.nan_at, self.losses = nan_at, []

    def compute_loss(self, batch, stage):
        out = super().compute_loss(batch, stage)
        if stage == "train" and self.nan_at == (self.global_step, self.global_rank):
            out = out._replace(loss=out.loss * float("nan"))
        return out

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.losses.append(None if outputs is None else float(outputs["loss"]))


def train(out_dir, devices, batch_size, nan_at=None):
    """Fit on the corpus in out_dir/data (written beforehand, once: ranks writing it at once race)."""
    torch.manual_seed(0)
    data = WikiTextDataModule(source=os.path.join(out_dir, "data"), seq_len=8, batch_size=batch_size,
                              cache_dir=os.path.join(out_dir, "cache"), seed=0)  # fmt: skip
    model = Poisoned(network=NET, vocab_size=data.vocab_size, lr=0.01, warmup_steps=0, nonfinite="skip", nan_at=nan_at)
    kwargs = {}
    if devices > 1:
        from lightning.pytorch.strategies import DDPStrategy

        kwargs["strategy"] = DDPStrategy(process_group_backend="gloo")
    trainer = L.Trainer(accelerator="cpu", devices=devices, max_steps=STEPS, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, **kwargs)  # fmt: skip
    trainer.fit(model, data)
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    return {"losses": model.losses, "params": params, "skipped": model.nonfinite_skipped}


def _worker(rank, out_dir, port, nan_at):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK="0",
                      LOCAL_RANK=str(rank), RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    torch.save(train(out_dir, 2, 2, nan_at), os.path.join(out_dir, f"rank{rank}.pt"))


def run_ddp(out_dir, nan_at=None):
    corpus(os.path.join(out_dir, "data"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_worker, args=(str(out_dir), port, nan_at), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 240
    try:
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail("2-process DDP run did not finish in 240 s (hang?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    return [torch.load(out_dir / f"rank{r}.pt") for r in (0, 1)]


def test_two_ranks_equal_one_process_at_the_same_global_batch(tmp_path):
    r0, r1 = run_ddp(tmp_path)
    single = train(str(tmp_path), 1, 4)
    assert torch.equal(r0["params"], r1["params"])  # replicas identical
    global_losses = [(a + b) / 2 for a, b in zip(r0["losses"], r1["losses"])]  # equal-size shards
    assert len(global_losses) == STEPS
    assert global_losses == pytest.approx(single["losses"], rel=0, abs=2e-5)
    torch.testing.assert_close(r0["params"], single["params"], rtol=0, atol=2e-5)


def test_a_nan_on_one_rank_makes_every_rank_skip_that_step(tmp_path):
    r0, r1 = run_ddp(tmp_path, nan_at=(2, 1))  # rank 1's loss at step 2
    assert torch.equal(r0["params"], r1["params"]) and torch.isfinite(r0["params"]).all()
    assert r0["skipped"] == r1["skipped"] == 1
    assert r0["losses"][2] == r1["losses"][2] == 0.0 and len(r0["losses"]) == STEPS  # the stand-in zero loss
