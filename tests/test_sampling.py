"""Training subsets in the data module: SubsetSampler (plain shuffle by default, subsets in order or
by weight, disjoint shards across ranks, state round trip with workers drawing ahead), and through a
real Trainer: a run resumed mid-epoch from a checkpoint draws the same batches as an uninterrupted
one, and validation/test loaders are never subset."""

import random
from collections import Counter

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks import ActiveLearning, Curriculum
from datamodules import WikiTextDataModule
from datamodules.sampling import SubsetSampler


def write_corpus(root, n_train_lines=40, seed=0):
    """A small WikiText-like folder: Zipf-ish words w0..w29, 10 words a line."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(30)]
    weights = [1 / (i + 1) for i in range(30)]
    root.mkdir(parents=True, exist_ok=True)
    for split, lines in (("train", n_train_lines), ("valid", 6), ("test", 5)):
        text = "\n".join(" ".join(rng.choices(words, weights, k=10)) for _ in range(lines))
        (root / f"wiki.{split}.tokens").write_text(text + "\n")
    return root


# ---- the sampler alone ----------------------------------------------------------------------
def test_default_is_plain_shuffled_sampling():
    s = SubsetSampler(50, seed=3)
    first, second = list(s), list(s)  # without set_epoch each iteration is a new epoch
    assert sorted(first) == sorted(second) == list(range(50))
    assert first != list(range(50)) and first != second
    s.set_epoch(0)
    assert list(s) == first  # a function of (seed, epoch)
    assert list(SubsetSampler(50, seed=3)) == first and list(SubsetSampler(50, seed=4)) != first
    assert s.is_full and len(s) == 50


def test_subset_modes():
    s = SubsetSampler(20, seed=0)
    s.set_subset([5, 1, 7], mode="ordered")
    assert list(s)[:7] == [5, 1, 7, 5, 1, 7, 5] and len(list(s)) == 20  # an epoch stays n draws
    s.set_subset([2, 9, 4, 11], mode="shuffle")
    drawn = list(s)
    for j in range(0, 20, 4):  # every pass is a permutation of the subset
        assert sorted(drawn[j : j + 4]) == [2, 4, 9, 11]
    s = SubsetSampler(4000, seed=0)
    s.set_subset([0, 1, 2], mode="weighted", weights=[0.0, 1.0, 3.0])
    counts = Counter(list(s))
    assert counts[0] == 0 and 2.5 < counts[2] / counts[1] < 3.5
    assert not s.set_subset([0, 1, 2], mode="weighted", weights=[0.0, 1.0, 3.0])  # same selection: no-op
    with pytest.raises(ValueError):
        s.set_subset([0, 4000])
    with pytest.raises(ValueError):
        s.set_subset([1], mode="weighted")


@pytest.mark.parametrize("subset", [None, list(range(3, 40, 3)), list(range(10))])
def test_two_ranks_get_disjoint_shards_that_cover_the_subset(subset):
    n = 41
    ranks = [SubsetSampler(n, seed=7, num_replicas=2, rank=r) for r in range(2)]
    for s in ranks:
        if subset is not None:
            s.set_subset(subset)
        s.set_epoch(2)
    shards = [list(s) for s in ranks]
    assert len(shards[0]) == len(shards[1]) == 21  # ceil(41 / 2) each
    active = list(range(n)) if subset is None else subset
    m = len(active)
    # rank r takes positions r, r + 2, ... of one shared stream: the first pass over the subset is
    # split between the two ranks without overlap and covers it
    first_pass = [shards[q % 2][q // 2] for q in range(m)]
    assert sorted(first_pass) == sorted(active)
    assert not set(shards[0][: (m + 1) // 2]) & set(shards[1][: m // 2])
    assert set(shards[0]) | set(shards[1]) == set(active)


def test_state_round_trip_mid_epoch_with_draws_ahead():
    """Workers draw ahead of training: the state is taken at the consumed position, and a subset set
    while draws were ahead still starts at the same position after resuming."""

    def run(s):
        it = iter(s)
        drawn = [next(it) for _ in range(30)]  # consumed 22, 8 drawn ahead
        s.set_subset(list(range(0, 60, 2)), consumed=22)  # starts at drawn position 30
        drawn += [next(it) for _ in range(10)]
        return it, drawn

    ref = SubsetSampler(100, seed=5)
    ref.set_epoch(3)
    it, drawn = run(ref)
    rest = list(it)
    full = drawn + rest
    twin = SubsetSampler(100, seed=5)
    twin.set_epoch(3)
    _, _ = run(twin)
    state = twin.state_dict(consumed=22)
    assert state["consumed"] == 22 and [s["start"] for s in state["segments"]] == [0, 30]

    resumed = SubsetSampler(100, seed=0)  # the seed comes from the state
    resumed.load_state_dict(state)
    resumed.set_epoch(3)  # Lightning sets the same epoch again on resume
    assert list(resumed) == full[22:]
    resumed.set_epoch(4)  # the next epoch starts over, on the latest subset
    nxt = list(resumed)
    assert len(nxt) == 100 and set(nxt) == set(range(0, 60, 2))
    with pytest.raises(ValueError, match="examples"):
        SubsetSampler(99).load_state_dict(state)


# ---- through the data module and a Trainer -------------------------------------------------
class Recorder(L.LightningModule):
    """A bigram model that records the ids of every batch it sees."""

    def __init__(self, vocab_size):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab_size, 8)
        self.head = torch.nn.Linear(8, vocab_size)
        self.seen, self.val_seen, self.test_seen = [], [], []

    def forward(self, input_ids):
        return self.head(self.emb(input_ids))

    def loss(self, batch):
        return torch.nn.functional.cross_entropy(self(batch["input_ids"]).flatten(0, 1), batch["targets"].flatten())

    def training_step(self, batch, _):
        self.seen.append(batch["index"].tolist())
        return self.loss(batch)

    def validation_step(self, batch, _):
        self.val_seen.append(batch["index"].tolist())

    def test_step(self, batch, _):
        self.test_seen.append(batch["index"].tolist())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(data, cache, callback=None, ckpt_path=None, save_dir=None, max_steps=25, every=13):
    L.seed_everything(0)
    dm = WikiTextDataModule(source=str(data), seq_len=8, batch_size=4, cache_dir=str(cache))
    model = Recorder(dm.vocab_size)
    callbacks = [callback] if callback is not None else []
    if save_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=save_dir, every_n_train_steps=every, save_top_k=-1, filename="{step}"))
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        callbacks=callbacks,
        enable_checkpointing=save_dir is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        val_check_interval=5,
        limit_val_batches=2,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model, dm, trainer


CALLBACKS = {
    "uniform": lambda: None,
    "curriculum": lambda: Curriculum(start_fraction=0.3, full_at_step=20),
    "active": lambda: ActiveLearning(every_n_steps=4, pool_size=20, keep_fraction=0.5),
}


@pytest.mark.parametrize("name, at", [("uniform", 13), ("curriculum", 13), ("active", 13), ("curriculum", 14)])
def test_resume_mid_epoch_continues_the_same_sample_sequence(tmp_path, name, at):
    """54 windows / batch 4 = 14 batches an epoch; the checkpoint at step 13 is the last-but-one
    batch of epoch 0 (at 14: the epoch's last batch) and the runs go on to step 25 in epoch 1, with
    the subset changing on the way (every step for the curriculum, every 4 for active learning)."""
    data, cache = write_corpus(tmp_path / "data"), tmp_path / "cache"
    full, dm, _ = fit(data, cache, CALLBACKS[name](), save_dir=tmp_path / "ckpt", every=at)
    assert dm.num_train_examples == 54 and len(full.seen) == 25
    ckpt = str(tmp_path / "ckpt" / f"step={at}.ckpt")
    resumed, _, _ = fit(data, cache, CALLBACKS[name](), ckpt_path=ckpt)
    assert resumed.seen == full.seen[at:]
    if name == "uniform":  # control: without the sampler state, the resumed run draws other batches
        original = WikiTextDataModule.load_state_dict
        try:
            WikiTextDataModule.load_state_dict = lambda self, state: None
            blind, _, _ = fit(data, cache, None, ckpt_path=ckpt)
        finally:
            WikiTextDataModule.load_state_dict = original
        assert blind.seen != full.seen[at:]
    elif name == "curriculum":  # the subsets did bite: steps 0-3 draw from the 22 easiest windows at most
        assert len({i for b in full.seen[:4] for i in b}) <= 22
    else:  # round 1 at step 4 keeps 10 of a pool of 20
        assert len({i for b in full.seen[4:8] for i in b}) <= 10


def test_validation_and_test_are_never_subset(tmp_path):
    data, cache = write_corpus(tmp_path / "data"), tmp_path / "cache"
    model, dm, trainer = fit(data, cache, Curriculum(start_fraction=0.1, full_at_step=1000), max_steps=10)
    assert dm.train_subset is not None and len(dm.train_subset) < dm.num_train_examples
    n_val = len(dm.val_dataset)
    for i in range(0, len(model.val_seen), 2):  # every validation visits the same windows in order
        assert sum(model.val_seen[i : i + 2], []) == list(range(min(n_val, 2 * 4)))
    dm.setup("test")
    dm.set_train_subset([0, 1])
    for loader, ds in ((dm.val_dataloader(), dm.val_dataset), (dm.test_dataloader(), dm.test_dataset)):
        assert torch.cat([b["index"] for b in loader]).tolist() == list(range(len(ds)))
    trainer.test(model, datamodule=dm, verbose=False)
    assert sum(model.test_seen, []) == list(range(len(dm.test_dataset)))
    ids = torch.cat([b["index"] for b in dm.train_dataloader()])
    assert set(ids.tolist()) == {0, 1}
    dm.set_train_subset(None)
    assert dm.train_subset is None


def test_subset_before_setup_is_an_error(tmp_path):
    dm = WikiTextDataModule(source=str(write_corpus(tmp_path / "data")), seq_len=8, cache_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match="setup"):
        dm.set_train_subset([0])
