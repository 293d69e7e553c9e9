"""Gradient caching (lightning_modules.gradient_caching_module / gradient_cache_store): the manual loop equals the
automatic one when nothing hits (clipping, scheduler, accumulation included), a hit applies exactly
the stored gradient without backward, the cache respects max_bytes and LRU order, 2-process DDP
(gloo, CPU) neither hangs nor lets the replicas drift, checkpoints resume, the config trains."""

import os
import socket
import tempfile
import time
from functools import partial

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp
from fit_args import tiny_fit_args
from torch.utils.data import DataLoader

from lightning_modules.gradient_cache_store import GradientCache
from lightning_modules.gradient_caching_module import GradientCachingLanguageModel
from lightning_modules.language_model import LanguageModel
from resnet_bk.models import BKConfig, ResNetBKLM

V = 40
NET = partial(ResNetBKLM, config=BKConfig(d_model=16, n_layers=1, num_experts=2, max_seq_len=16))
# one expert: DDP needs every parameter used
NET_DENSE = partial(ResNetBKLM, config=BKConfig(d_model=16, n_layers=1, num_experts=1, max_seq_len=16))


def make_batches(n, b=3, n_seq=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(0, V, (b, n_seq), generator=g),
            "targets": torch.randint(0, V, (b, n_seq), generator=g),
            "index": torch.arange(b),
        }
        for _ in range(n)
    ]


def loader(batches):
    return DataLoader(batches, batch_size=None)


def trainer(**kwargs):
    defaults = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    return L.Trainer(**{**defaults, **kwargs})


def flat_params(module):
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


class Record(L.Callback):
    """LR at each batch start; gradients as the optimizer step sees them before clipping."""

    def __init__(self):
        self.lrs, self.grads = [], []

    def on_train_batch_start(self, trainer, *args):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # runs before the module's hook (clipping)
        self.grads.append([None if p.grad is None else p.grad.detach().clone() for p in pl_module.parameters()])


class CountingModel(GradientCachingLanguageModel):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.backward_calls = 0
        self.forward_calls = 0
        self.model.register_forward_pre_hook(lambda *_: setattr(self, "forward_calls", self.forward_calls + 1))

    def manual_backward(self, loss, *args, **kwargs):
        self.backward_calls += 1
        super().manual_backward(loss, *args, **kwargs)


# ------------------------------------------------------------------------------ equivalence
@pytest.mark.parametrize(
    "clip_val, algorithm, accumulate, cache",
    [
        (0.05, "norm", 1, {"threshold": 1.5}),  # cache filled, never hit
        (0.002, "value", 2, {"threshold": 1.5}),  # 5 batches / epoch: an incomplete window at each epoch end
        (0.05, "norm", 2, {"threshold": 0.0, "max_bytes": 0}),
    ],  # caching off
)
def test_without_hits_the_manual_loop_equals_the_automatic_loop(clip_val, algorithm, accumulate, cache):
    batches = make_batches(5)
    common = dict(network=NET, vocab_size=V, lr=0.02, warmup_steps=3, min_lr_ratio=0.1)

    torch.manual_seed(0)
    auto = LanguageModel(**common)
    rec_auto = Record()
    trainer(
        max_steps=6,
        callbacks=[rec_auto],
        gradient_clip_val=clip_val,
        gradient_clip_algorithm=algorithm,
        accumulate_grad_batches=accumulate,
    ).fit(auto, train_dataloaders=loader(batches))

    torch.manual_seed(0)
    manual = CountingModel(
        **common,
        **cache,
        cache_dtype="float32",
        gradient_clip_val=clip_val,
        gradient_clip_algorithm=algorithm,
        accumulate_grad_batches=accumulate,
    )
    rec = Record()
    t = trainer(max_steps=6, callbacks=[rec])
    t.fit(manual, train_dataloaders=loader(batches))

    assert t.global_step == 6 and manual.hits == 0
    assert manual.backward_calls == len(rec.lrs) == len(rec_auto.lrs)  # same number of batches
    assert rec.lrs == pytest.approx(rec_auto.lrs, rel=0, abs=1e-12)  # the scheduler stepped per optimizer step
    assert len(set(rec.lrs)) > 3
    # clipping was active (pre-clip gradients exceed the clip value) and gave the same result
    pre = rec.grads[0]
    if algorithm == "norm":
        assert torch.cat([g.reshape(-1) for g in pre if g is not None]).norm() > clip_val
    else:
        assert max(g.abs().max() for g in pre if g is not None) > clip_val
    torch.testing.assert_close(flat_params(manual), flat_params(auto), rtol=0, atol=1e-6)
    assert (flat_params(manual) - flat_params(auto)).abs().max() <= 1e-6
    if cache.get("max_bytes", 1) > 0:
        assert len(manual.cache) > 0  # entries were stored, and still nothing changed


def test_trainer_clipping_and_accumulation_are_refused_so_the_module_hparams_must_be_used():
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    model = GradientCachingLanguageModel(network=NET, vocab_size=V)
    with pytest.raises(MisconfigurationException, match="gradient_clip_val"):
        trainer(max_steps=1, gradient_clip_val=1.0).fit(model, train_dataloaders=loader(make_batches(1)))


def test_clipping_works_with_a_fused_optimizer():
    """On a GPU under bf16 the optimizer is a fused AdamW, for which Lightning's clip_gradients refuses
    to clip; the manual loop clips through LanguageModel.configure_gradient_clipping, which clips it
    directly (nothing is scaled without a GradScaler)."""
    model = GradientCachingLanguageModel(network=NET, vocab_size=V, gradient_clip_val=1e-3)
    model.trainer = L.Trainer(
        accelerator="cpu", precision="bf16-mixed", max_steps=0, logger=False, enable_checkpointing=False
    )
    optimizer = torch.optim.AdamW(model.parameters())
    optimizer._step_supports_amp_scaling = True  # what a fused AdamW declares
    model._fused_adamw = True
    for p in model.parameters():
        p.grad = torch.full_like(p, 10.0)
    model.on_before_optimizer_step(optimizer)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters()]))
    assert norm == pytest.approx(1e-3, rel=1e-4)


# ---------------------------------------------------------------------------------- hits
@pytest.mark.parametrize("scale, monitor", [(1.0, False), (0.5, True)])
def test_a_hit_applies_exactly_the_stored_gradient_without_backward(scale, monitor):
    batch = make_batches(1)[0]
    torch.manual_seed(0)
    model = CountingModel(
        network=NET,
        vocab_size=V,
        lr=0.01,
        warmup_steps=0,
        key="token_histogram",
        threshold=0.999,
        cache_dtype="float32",
        hit_grad_scale=scale,
        monitor_hits=monitor,
    )
    rec = Record()
    t = trainer(max_steps=3, callbacks=[rec])
    t.fit(model, train_dataloaders=loader([batch, batch, batch]))  # the same batch: similarity 1

    assert (model.hits, model.lookups) == (2, 3)
    assert model.backward_calls == 1  # only the first batch ran backward
    assert model.forward_calls == (3 if monitor else 1)  # no forward on a hit unless monitored
    stored = rec.grads[0]
    for step in (1, 2):
        for got, want in zip(rec.grads[step], stored):
            assert (got is None) == (want is None)
            if want is not None:
                assert torch.equal(got, want * scale)  # exactly the stored gradient (times the scale)
    assert t.callback_metrics["train/cache_hit_rate"] == pytest.approx(2 / 3)
    assert ("train/loss" in t.callback_metrics) and t.global_step == 3


def test_hits_inside_an_accumulation_window_add_the_stored_contribution():
    a, b = make_batches(2)
    torch.manual_seed(0)
    model = CountingModel(
        network=NET,
        vocab_size=V,
        key="token_histogram",
        threshold=0.999,
        cache_dtype="float32",
        accumulate_grad_batches=2,
        lr=1e-30,
    )  # float32 weights do not move: grads comparable
    rec = Record()
    trainer(max_steps=2, callbacks=[rec]).fit(model, train_dataloaders=loader([a, b, b, a]))
    assert model.backward_calls == 2 and model.hits == 2
    # window 1 = grad(a)/2 + grad(b)/2 computed; window 2 = the same two contributions, from the cache
    for first, second in zip(*rec.grads):
        if first is not None:
            torch.testing.assert_close(second, first, rtol=1e-6, atol=1e-9)


# --------------------------------------------------------------------------------- cache
def test_cache_stays_within_max_bytes_and_evicts_least_recently_used():
    d, n = 4, 10
    entry = d * 4 + n * 2  # float32 key + bfloat16 gradient
    cache = GradientCache(max_bytes=3 * entry + 5, dtype=torch.bfloat16)
    keys = torch.nn.functional.normalize(torch.eye(d) + 0.01, dim=1)
    ids = [cache.put(keys[i], torch.full((n,), float(i))) for i in range(3)]
    assert cache.nbytes == 3 * entry and len(cache) == 3
    cache.get(ids[0])  # 0 is now the most recently used; 1 the least
    ids.append(cache.put(keys[3], torch.full((n,), 3.0)))
    assert cache.ids() == [ids[2], ids[0], ids[3]] and cache.evictions == 1
    assert cache.nbytes <= cache.max_bytes
    assert cache.get(ids[0]).grad.dtype == torch.bfloat16 and cache.get(ids[0]).grad[0] == 0.0
    # best match by cosine, found with one matrix product whatever the number of entries
    calls = []

    class CountMatmul(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in ("matmul", "__matmul__", "mm", "mv", "dot"):
                calls.append(func)
            return func(*args, **(kwargs or {}))

    with CountMatmul():
        best, sim = cache.lookup(keys[2])
    assert best == ids[2] and sim == pytest.approx(1.0) and len(calls) == 1
    # an entry larger than the whole budget is not stored; nothing is evicted for it
    assert cache.put(keys[0], torch.zeros(1000)) is None and len(cache) == 3
    float32 = GradientCache(max_bytes=10**6, dtype=torch.float32)
    float32.put(keys[0], torch.zeros(n))
    assert float32.nbytes == d * 4 + n * 4


def test_training_never_exceeds_max_bytes():
    n_params = sum(p.numel() for p in NET(V).parameters())
    max_bytes = 2 * (n_params * 2 + 16 * 4) + 100  # room for two bfloat16 entries
    seen = []

    class Watch(L.Callback):
        def on_train_batch_end(self, trainer, module, *args):
            seen.append((len(module.cache), module.cache.nbytes))

    torch.manual_seed(0)
    model = GradientCachingLanguageModel(network=NET, vocab_size=V, threshold=1.5, max_bytes=max_bytes)
    trainer(max_steps=5, callbacks=[Watch()]).fit(model, train_dataloaders=loader(make_batches(5)))
    assert [n for n, _ in seen] == [1, 2, 2, 2, 2]
    assert all(b <= max_bytes for _, b in seen) and model.cache.evictions == 3


# ----------------------------------------------------------------------------------- DDP
class _DisagreeingModel(GradientCachingLanguageModel):
    """Rank 1 reports a local miss at lookup `force_miss_at`: the ranks must still agree (on a miss)."""

    def __init__(self, *args, force_miss_at: int = -1, **kwargs):
        super().__init__(*args, **kwargs)
        self.force_miss_at = force_miss_at
        self.decisions, self.local = [], []

    def _lookup(self, key):
        entry_id, sim = super()._lookup(key)
        if self.global_rank == 1 and self.lookups == self.force_miss_at:
            entry_id, sim = None, float("-inf")
        self.local.append(entry_id is not None and sim >= self.threshold)
        return entry_id, sim

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        self.decisions.append(self.last_hit)
        return out


def _ddp_worker(rank, out_dir, port):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE="2",
        NODE_RANK="0",
        LOCAL_RANK=str(rank),
        RANK=str(rank),
    )
    torch.set_num_threads(1)
    from lightning.pytorch.strategies import DDPStrategy

    torch.manual_seed(0)
    model = _DisagreeingModel(
        network=NET_DENSE,
        vocab_size=V,
        key="token_histogram",
        threshold=0.999,
        lr=0.01,
        warmup_steps=0,
        gradient_clip_val=0.5,
        force_miss_at=5,
    )
    t = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=DDPStrategy(process_group_backend="gloo"),
        max_steps=8,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
    )
    # each rank its own 4 batches, then the same 4 again: the global batches 5-8 repeat 1-4
    batches = make_batches(4, b=2, seed=rank)
    t.fit(model, train_dataloaders=loader(batches + batches))
    torch.save(
        {"params": flat_params(model), "decisions": model.decisions, "local": model.local, "entries": len(model.cache)},
        os.path.join(out_dir, f"rank{rank}.pt"),
    )


def test_ddp_two_processes_agree_on_hits_and_keep_replicas_identical(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_ddp_worker, args=(str(tmp_path), port), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 240
    try:
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail("2-process DDP run did not finish in 240 s (hang?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(r0["params"], r1["params"])  # replicas identical
    assert r0["decisions"] == r1["decisions"] and len(r0["decisions"]) == 8
    assert r0["decisions"][:4] == [False] * 4  # batches 1-4: new
    # batches 5-8 repeat 1-4: hits, except at lookup 6, where rank 1 alone said miss -> both missed
    assert r0["local"][5] is True and r1["local"][5] is False
    assert r0["decisions"] == [False] * 4 + [True, False, True, True]
    assert r0["entries"] == r1["entries"] == 5


# ------------------------------------------------------------------------------- resume
def test_checkpoint_resume_continues_the_run_with_an_empty_cache(tmp_path):
    batches = make_batches(2)
    # min_lr_ratio 1: after the warmup the LR is flat, so stopping after epoch 1 (max_epochs=1) and
    # resuming for epoch 2 runs the same schedule as one 2-epoch run; the warmup state is restored
    kwargs = dict(
        network=NET, vocab_size=V, lr=0.02, warmup_steps=3, min_lr_ratio=1.0, threshold=1.5, gradient_clip_val=0.05
    )

    torch.manual_seed(0)
    straight = GradientCachingLanguageModel(**kwargs)
    trainer(max_epochs=2).fit(straight, train_dataloaders=loader(batches))

    torch.manual_seed(0)
    first = GradientCachingLanguageModel(**kwargs)
    t = trainer(max_epochs=1)
    t.fit(first, train_dataloaders=loader(batches))
    assert t.global_step == 2 and len(first.cache) == 2
    ckpt = tmp_path / "half.ckpt"
    t.save_checkpoint(ckpt)

    torch.manual_seed(1)
    resumed = GradientCachingLanguageModel(**kwargs)
    seen, rec = [], Record()

    class AtStart(L.Callback):
        def on_train_start(self, trainer, module):
            seen.append((len(module.cache), module.lookups, trainer.global_step))

    t2 = trainer(max_epochs=2, callbacks=[AtStart(), rec])
    t2.fit(resumed, train_dataloaders=loader(batches), ckpt_path=ckpt, weights_only=False)  # hparams hold a partial
    assert seen == [(0, 2, 2)]  # cache dropped; counters and step restored
    assert rec.lrs == pytest.approx([0.02, 0.02])  # warmup (1/3, 2/3, 1) resumed at its 3rd step
    assert t2.global_step == 4 and resumed.lookups == 4 and len(resumed.cache) == 2
    torch.testing.assert_close(flat_params(resumed), flat_params(straight), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------- config
def test_config_trains_a_few_steps_through_the_cli():
    from resnet_bk.cli import build

    tiny = [
        *tiny_fit_args(seq_len=16, d_model=16, n_layers=1),
        *("--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--model.init_args.warmup_steps", "1"),
        "--model.init_args.threshold=-1.0",  # every batch after the first hits
    ]
    with tempfile.TemporaryDirectory() as root:
        cli = build(["--config", "configs/gradient_caching.yaml", *tiny, "--trainer.default_root_dir", root])
        assert isinstance(cli.model, GradientCachingLanguageModel) and not cli.model.automatic_optimization
        cli.trainer.fit(cli.model, cli.datamodule)
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == 3 and cli.model.hits == 2
    for key in ("val/ppl", "train/cache_hit_rate", "train/cache_bytes", "train/cache_entries"):
        assert torch.isfinite(metrics[key]), key
