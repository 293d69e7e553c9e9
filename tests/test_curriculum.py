"""Curriculum callback: pacing schedules (subset sizes), easiest-first order, the difficulty sources
(unigram surprisal, reference scores, the current model's loss with its logged cost), and
configs/curriculum.yaml training a few steps through the CLI."""

import math
import random
from pathlib import Path

import lightning as L
import pytest
import torch

from callbacks import Curriculum
from callbacks.curriculum import competence, easiest_first, subset_size, unigram_surprisal
from datamodules import WikiTextDataModule

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write_corpus(root, seed=0):
    """Train lines are either all "the" (easy: the most frequent word) or rare words (hard)."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(48):
        lines.append(" ".join(["the"] * 7) if i % 3 == 0 else " ".join(rng.choices([f"r{j}" for j in range(40)], k=7)))
    (root / "wiki.train.tokens").write_text("\n".join(lines) + "\n")  # 48 lines x 8 tokens = 384
    (root / "wiki.valid.tokens").write_text("the r1 r2 the\nthe r3\n")
    (root / "wiki.test.tokens").write_text("the r4\n")
    return root


class Tiny(L.LightningModule):
    def __init__(self, vocab_size):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab_size, 8)
        self.head = torch.nn.Linear(8, vocab_size)
        self.seen = []

    def forward(self, input_ids):
        return self.head(self.emb(input_ids))

    def training_step(self, batch, _):
        self.seen.append(batch["index"].tolist())
        return torch.nn.functional.cross_entropy(self(batch["input_ids"]).flatten(0, 1), batch["targets"].flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(tmp_path, callback, max_steps=8):
    L.seed_everything(0)
    dm = WikiTextDataModule(
        source=str(write_corpus(tmp_path / "data")), seq_len=8, batch_size=4, cache_dir=str(tmp_path / "cache")
    )
    model = Tiny(dm.vocab_size)
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        log_every_n_steps=1,
    )
    trainer.fit(model, datamodule=dm)
    return model, dm, trainer


# ---- pacing -----------------------------------------------------------------------------------
def test_pacing_subset_sizes():
    n, T, c0 = 100, 10, 0.2
    linear = [subset_size(t, n, T, c0, "linear") for t in (0, 1, 5, 9, 10, 50)]
    assert linear == [20, 28, 60, 92, 100, 100]
    root = [subset_size(t, n, T, c0, "root") for t in (0, 5, 10)]
    assert root == [20, math.ceil(100 * math.sqrt(0.04 + 0.96 * 0.5)), 100] == [20, 73, 100]
    step = [subset_size(t, n, T, c0, "step", num_stages=4) for t in range(11)]
    assert step == [20, 20, 20, 40, 40, 60, 60, 60, 80, 80, 100]
    for pacing in ("linear", "root", "step"):  # grows monotonically from c0 to 1, never to 0
        sizes = [subset_size(t, 7, 13, 0.1, pacing) for t in range(20)]
        assert sizes[0] == 1 and sizes[-1] == 7 and sizes == sorted(sizes)
    assert competence(0, 0, 0.2) == 1.0  # T = 0: everything from the start
    with pytest.raises(ValueError):
        competence(0, 10, 0.2, "cubic")


def test_easiest_first_order_and_unigram_surprisal():
    assert easiest_first(torch.tensor([3.0, 1.0, 2.0, 1.0])).tolist() == [1, 3, 2, 0]  # ties by id
    stream = torch.tensor([0, 0, 0, 1, 0, 2, 0, 0, 0])  # counts 7, 1, 1 of 9 tokens; V = 3
    s = unigram_surprisal(stream, seq_len=4, n_windows=2)
    p = torch.tensor([8 / 12, 2 / 12, 2 / 12]).double()
    expect = [-(p[[0, 0, 1, 0]].log()).mean(), -(p[[2, 0, 0, 0]].log()).mean()]
    assert torch.allclose(s, torch.stack(expect))


# ---- through a Trainer ------------------------------------------------------------------------
def test_starts_on_the_easiest_windows_and_grows(tmp_path):
    cb = Curriculum(difficulty="unigram", pacing="step", start_fraction=0.25, full_at_step=6, num_stages=2)
    model, dm, trainer = fit(tmp_path, cb, max_steps=8)
    n = dm.num_train_examples
    easy = set(cb.order[: math.ceil(0.25 * n)].tolist())
    # the easiest windows are those of the "the" lines (7 of 8 targets "the" or <eos>; windows are
    # shifted by one token, so the 8th is the next line's first word); steps 0-2 draw from them alone
    assert all(set(b) <= easy for b in model.seen[:3])
    frequent = {dm.tokenizer.stoi["the"], dm.tokenizer.eos_id}
    for i in easy:
        assert sum(t in frequent for t in dm.train_dataset[i]["targets"].tolist()) >= 7
    assert not all(set(b) <= easy for b in model.seen[3:])
    assert dm.train_subset is None  # full set (shuffled) from step 6 on
    logged = trainer.logged_metrics
    assert logged["curriculum/active_fraction"] == 1.0 and "curriculum/batch_difficulty" in logged
    assert logged["budget/scoring_flops"] == 0.0 and logged["budget/scoring_seconds"] > 0  # no model forward


def test_ordered_within_draws_easiest_first(tmp_path):
    cb = Curriculum(start_fraction=0.5, full_at_step=100, within="ordered")
    model, dm, _ = fit(tmp_path, cb, max_steps=1)
    assert model.seen[0] == cb.order[:4].tolist()


def test_reference_scores_file_sets_the_order(tmp_path):
    n = 47  # 384 tokens -> (384 - 1) // 8 windows
    scores = torch.arange(n, 0, -1).double()  # the last window is the easiest
    torch.save(scores, tmp_path / "scores.pt")
    cb = Curriculum(difficulty="reference", reference=str(tmp_path / "scores.pt"), start_fraction=0.1, full_at_step=100)
    model, dm, _ = fit(tmp_path, cb, max_steps=2)
    assert dm.num_train_examples == n
    assert set(model.seen[0]) <= set(range(n - 5, n))


def test_current_model_difficulty_is_rescored_and_costed(tmp_path):
    cb = Curriculum(difficulty="current", refresh_every=3, start_fraction=0.5, full_at_step=100, score_batch_size=16)
    _, dm, trainer = fit(tmp_path, cb, max_steps=7)
    assert cb.last_refresh == 6  # rescored at steps 3 and 6 (unigram warm start before)
    # two rescorings of 47 windows: FLOPs counted by FlopCounterMode, > 0
    assert cb.scored_examples == 47 * 3 and cb.scoring_flops > 0
    per_window = 2 * 8 * 8 * dm.vocab_size  # the head's matmul: 2 * positions * d * V
    assert cb.scoring_flops == pytest.approx(2 * 47 * per_window, rel=0.01)
    assert trainer.logged_metrics["budget/scoring_flops"] == pytest.approx(cb.scoring_flops)


def test_bad_arguments():
    for kwargs in (
        {"difficulty": "oracle"},
        {"pacing": "cubic"},
        {"start_fraction": 0.0},
        {"difficulty": "reference"},
        {"within": "hardest"},
    ):
        with pytest.raises(ValueError):
            Curriculum(**kwargs)


# ---- the config -------------------------------------------------------------------------------
def test_config_trains_a_few_steps_on_cpu(tmp_path):
    from resnet_bk.cli import build

    data = write_corpus(tmp_path / "data")
    cli = build(
        [
            "--config",
            str(CONFIGS / "curriculum.yaml"),
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
            "--trainer.callbacks.init_args.full_at_step",
            "100",
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
    assert any(isinstance(cb, Curriculum) for cb in cli.trainer.callbacks)
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.global_step == 3
    assert 0.2 < float(cli.trainer.logged_metrics["curriculum/active_fraction"]) < 1.0
    assert torch.isfinite(cli.trainer.callback_metrics["val/ppl"])
