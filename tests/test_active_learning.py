"""Active learning: the selection rule (top share + random share), that scoring prefers the windows
the model is uncertain about on a constructed case, the counted scoring cost, rounds through a
Trainer, and configs/active_learning.yaml training a few steps through the CLI."""

from pathlib import Path

import lightning as L
import pytest
import torch

from callbacks import ActiveLearning
from callbacks.active_learning import select
from callbacks.scoring import score_examples, window_scores
from datamodules import WikiTextDataModule

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write_corpus(root):
    """Lines alternate between "a ..." (where the model below is unsure) and "b ..." (sure)."""
    root.mkdir(parents=True, exist_ok=True)
    lines = [" ".join((["a"] if i % 4 == 0 else ["b"]) * 7) for i in range(40)]
    (root / "wiki.train.tokens").write_text("\n".join(lines) + "\n")  # 40 x 8 tokens
    (root / "wiki.valid.tokens").write_text("a b a b\n")
    (root / "wiki.test.tokens").write_text("b a\n")
    return root


class Unsure(L.LightningModule):
    """Flat logits (maximal entropy) after the token `unsure_id`, one sharp guess after the others."""

    def __init__(self, vocab_size, unsure_id):
        super().__init__()
        self.vocab_size, self.unsure_id = vocab_size, unsure_id
        self.scale = torch.nn.Parameter(torch.tensor(1.0))
        self.proj = torch.nn.Linear(4, 4)  # a matmul, so that FlopCounterMode has something to count

    def forward(self, input_ids):
        B, N = input_ids.shape
        h = self.proj(torch.ones(B, N, 4))
        sharp = torch.full((B, N, self.vocab_size), -10.0)
        sharp[..., 0] = 10.0
        flat = torch.zeros(B, N, self.vocab_size)
        unsure = (input_ids == self.unsure_id)[..., None]
        return torch.where(unsure, flat, sharp) * self.scale + 0 * h.sum(-1, keepdim=True)

    def training_step(self, batch, _):
        logits = self(batch["input_ids"])
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def setup_data(tmp_path, batch_size=4):
    dm = WikiTextDataModule(
        source=str(write_corpus(tmp_path / "data")), seq_len=8, batch_size=batch_size, cache_dir=str(tmp_path / "cache")
    )
    dm.setup("fit")
    return dm


def unsure_windows(dm):
    a = dm.tokenizer.stoi["a"]
    return {i for i in range(len(dm.train_dataset)) if (dm.train_dataset[i]["input_ids"] == a).any()}


# ---- selection --------------------------------------------------------------------------------
def test_select_keeps_top_share_plus_random_share():
    pool = torch.arange(100, 200)
    scores = torch.arange(100.0)  # pool[i] scores i: the best are 199, 198, ...
    kept = select(scores, pool, keep_fraction=0.2, random_fraction=0.25, generator=torch.Generator().manual_seed(0))
    assert len(kept) == 20 and len(set(kept.tolist())) == 20
    assert kept[:15].tolist() == list(range(199, 184, -1))  # 75% top
    assert all(100 <= i <= 184 for i in kept[15:].tolist())  # 25% random from the rest
    again = select(scores, pool, 0.2, 0.25, generator=torch.Generator().manual_seed(0))
    assert torch.equal(kept, again)
    assert select(scores, pool, 0.2, 0.0).tolist() == list(range(199, 179, -1))
    with pytest.raises(ValueError):
        select(scores, pool, 0.0, 0.1)


def test_window_scores_entropy_and_loss():
    logits = torch.zeros(1, 2, 4)
    logits[0, 1, 2] = 100.0
    targets = torch.tensor([[1, -100]])
    assert torch.allclose(window_scores(logits, targets, "entropy"), torch.tensor([torch.log(torch.tensor(4.0))]))
    assert torch.allclose(window_scores(logits, targets, "loss"), torch.tensor([torch.log(torch.tensor(4.0))]))


def test_prefers_high_entropy_examples(tmp_path):
    dm = setup_data(tmp_path)
    model = Unsure(dm.vocab_size, dm.tokenizer.stoi["a"])
    n = dm.num_train_examples
    unsure = unsure_windows(dm)
    assert 0 < len(unsure) < n / 2
    scores, cost = score_examples(model, dm.train_dataset, torch.arange(n), "entropy", batch_size=8)
    kept = select(scores, torch.arange(n), keep_fraction=len(unsure) / n, random_fraction=0.0)
    assert set(kept.tolist()) == unsure
    # with a random share, the top part is still all uncertain windows
    kept = select(
        scores, torch.arange(n), keep_fraction=0.5, random_fraction=0.2, generator=torch.Generator().manual_seed(1)
    )
    assert set(kept[: len(unsure)].tolist()) == unsure
    # cost: FlopCounterMode on the first batch (2 * 8 positions * 4 * 4 per window), times n
    assert cost.flops == pytest.approx(n * 2 * 8 * 4 * 4) and cost.seconds > 0 and cost.examples == n
    assert model.training  # mode restored


def test_rounds_through_a_trainer(tmp_path):
    dm = setup_data(tmp_path)
    model = Unsure(dm.vocab_size, dm.tokenizer.stoi["a"])
    seen = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(batch["index"].tolist())

    cb = ActiveLearning(every_n_steps=3, pool_size=None, keep_fraction=0.25, random_fraction=0.0, score="entropy")
    trainer = L.Trainer(
        max_steps=7,
        accelerator="cpu",
        logger=False,
        callbacks=[cb, Spy()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        log_every_n_steps=1,
    )
    trainer.fit(model, datamodule=dm)
    unsure = unsure_windows(dm)
    assert cb.rounds == 2 and cb.last_round_step == 6  # rounds at steps 3 and 6
    assert set(dm.train_subset.tolist()) == unsure
    assert all(set(b) <= unsure for b in seen[3:])  # after the first round, only uncertain windows
    logged = trainer.logged_metrics
    assert logged["active/fraction"] == pytest.approx(len(unsure) / dm.num_train_examples)
    assert logged["budget/scoring_flops"] == pytest.approx(2 * 2 * dm.num_train_examples * 8 * 16)
    assert logged["budget/scoring_seconds"] > 0


def test_bad_arguments():
    for kwargs in (
        {"every_n_steps": 0},
        {"keep_fraction": 1.5},
        {"random_fraction": -0.1},
        {"score": "margin"},
        {"pool_size": 0},
    ):
        with pytest.raises(ValueError):
            ActiveLearning(**kwargs)


# ---- the config -------------------------------------------------------------------------------
def test_config_trains_a_few_steps_on_cpu(tmp_path):
    from resnet_bk.cli import build

    data = write_corpus(tmp_path / "data")
    cli = build(
        [
            "--config",
            str(CONFIGS / "active_learning.yaml"),
            "--data.init_args.source",
            str(data),
            "--data.init_args.cache_dir",
            str(tmp_path / "cache"),
            "--data.init_args.seq_len",
            "8",
            "--data.init_args.batch_size",
            "4",
            "--model.init_args.network.init_args.config.d_model",
            "16",
            "--model.init_args.network.init_args.config.n_layers",
            "1",
            "--model.init_args.network.init_args.config.num_experts",
            "1",
            "--model.init_args.network.init_args.config.max_seq_len",
            "8",
            "--model.init_args.warmup_steps",
            "1",
            "--trainer.callbacks.init_args.every_n_steps",
            "1",
            "--trainer.callbacks.init_args.pool_size",
            "16",
            "--trainer.accelerator",
            "cpu",
            "--trainer.max_steps",
            "3",
            "--trainer.val_check_interval",
            "3",
            "--trainer.limit_val_batches",
            "1",
            "--trainer.log_every_n_steps",
            "1",
            "--trainer.default_root_dir",
            str(tmp_path / "runs"),
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.enable_model_summary",
            "false",
        ]
    )
    cb = next(cb for cb in cli.trainer.callbacks if isinstance(cb, ActiveLearning))
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.global_step == 3 and cb.rounds == 2  # after steps 1 and 2; none after the last
    assert len(cli.datamodule.train_subset) == 8  # half of the pool of 16
    assert cli.trainer.logged_metrics["budget/scoring_flops"] > 0
    assert torch.isfinite(cli.trainer.callback_metrics["val/ppl"])
