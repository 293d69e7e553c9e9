"""WikiText data module: vocabulary of the bundled data, windows, every eval token scored once,
caches, errors, a tiny local source end to end, the transformers adapter."""

import lzma
from unittest import mock

import pytest
import torch

from datamodules import WikiTextDataModule, WordTokenizer, build_tokenizer
from datamodules.tokenization import EOS, UNK
from datamodules.wikitext import BUNDLED_DIR, IGNORE_INDEX, PAD_ID

SEQ_LEN = 256


@pytest.fixture(scope="session")
def bundled_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def bundled(bundled_cache):
    """The bundled WikiText-2, tokenized once for the whole session into a temporary cache."""
    dm = WikiTextDataModule(seq_len=SEQ_LEN, batch_size=64, eval_batch_size=48, cache_dir=str(bundled_cache))
    dm.setup()
    return dm


def read_words(split):
    with lzma.open(BUNDLED_DIR / f"wiki.{split}.tokens.xz", "rt", encoding="utf-8") as f:
        return f.read().split()


def write_tiny(root, files=None):
    """A tiny WikiText-like folder: plain train and test, xz-compressed valid."""
    root.mkdir(parents=True, exist_ok=True)
    files = files or {
        "train": " = A = \n the cat sat on the mat . \n\n the dog <unk> . \n" * 3,
        "valid": " the cat sat . \n the mat <unk> dog \n",
        "test": " the zebra sat . \n",  # "zebra" is not a training word -> <unk>
    }
    for split, text in files.items():
        if split == "valid":
            with lzma.open(root / f"wiki.{split}.tokens.xz", "wt", encoding="utf-8") as f:
                f.write(text)
        else:
            (root / f"wiki.{split}.tokens").write_text(text, encoding="utf-8")
    return root


# ---- bundled WikiText-2 ---------------------------------------------------------------------
def test_bundled_vocabulary_is_33278_words_plus_eos(bundled):
    tok = bundled.tokenizer
    assert isinstance(bundled.vocab_size, int) and bundled.vocab_size == tok.vocab_size == 33_278 + 1
    assert EOS in tok.stoi and UNK in tok.stoi  # <unk> is one of the 33,278 training words
    train_words = set(read_words("train"))
    assert len(train_words) == 33_278 and set(tok.itos) == train_words | {EOS}
    for split in ("valid", "test"):  # no unknown word outside <unk> itself: nothing added
        assert set(read_words(split)) <= train_words
    # deterministic order: by frequency, then string
    assert tok.itos[:3] == ["the", ",", "."]


def test_bundled_stream_sizes_match_readme(bundled):
    sizes = {s: bundled.stream(s).numel() for s in ("train", "valid", "test")}
    assert sizes == {"train": 2_088_059, "valid": 217_646, "test": 245_569}
    assert all(bundled.stream(s).dtype == torch.int64 for s in sizes)
    assert int((bundled.stream("valid") == bundled.tokenizer.eos_id).sum()) == 3_760  # one per line


@pytest.mark.parametrize("split", ["valid", "test"])
def test_every_eval_token_scored_exactly_once(bundled, split):
    stream = bundled.stream(split)
    loader = bundled.val_dataloader() if split == "valid" else bundled.test_dataloader()
    inputs, targets, ids = [], [], []
    for batch in loader:
        assert batch["input_ids"].shape == batch["targets"].shape and batch["input_ids"].shape[1] == SEQ_LEN
        keep = batch["targets"] != IGNORE_INDEX
        assert (batch["input_ids"][~keep] == PAD_ID).all()
        inputs.append(batch["input_ids"][keep])
        targets.append(batch["targets"][keep])
        ids.append(batch["index"])
    assert (stream.numel() - 1) % SEQ_LEN != 0  # so the padded last window is exercised
    assert torch.equal(torch.cat(targets), stream[1:])
    assert torch.equal(torch.cat(inputs), stream[:-1])
    assert torch.equal(torch.cat(ids), torch.arange(len(loader.dataset)))


def test_train_windows_are_shifted_and_ids_unique(bundled):
    ds, stream = bundled.train_dataset, bundled.stream("train")
    assert len(ds) == (stream.numel() - 1) // SEQ_LEN  # last partial window dropped
    for i in (0, 1, len(ds) // 2, len(ds) - 1):
        item = ds[i]
        assert item["index"] == i
        assert item["input_ids"].shape == item["targets"].shape == (SEQ_LEN,)
        assert torch.equal(item["input_ids"], stream[i * SEQ_LEN : (i + 1) * SEQ_LEN])
        assert torch.equal(item["targets"], stream[i * SEQ_LEN + 1 : (i + 1) * SEQ_LEN + 1])
    with pytest.raises(IndexError):
        ds[len(ds)]
    ids = torch.cat([b["index"] for b in bundled.train_dataloader()])
    assert ids.numel() == len(ds) and torch.equal(ids.sort().values, torch.arange(len(ds)))
    assert not torch.equal(ids, torch.arange(len(ds)))  # shuffled


def test_warm_init_reuses_the_caches(bundled, bundled_cache):
    """A second data module on the same cache reads neither the text nor counts any word."""
    boom = mock.Mock(side_effect=AssertionError("rebuilt"))
    with (
        mock.patch("datasets.load_dataset", boom),
        mock.patch.object(WordTokenizer, "from_lines", boom),
        mock.patch.object(WordTokenizer, "encode_lines", boom),
    ):
        dm = WikiTextDataModule(seq_len=SEQ_LEN, cache_dir=str(bundled_cache))
        dm.setup()
    assert dm.tokenizer.itos == bundled.tokenizer.itos
    assert torch.equal(dm.stream("valid"), bundled.stream("valid"))
    assert not boom.called


# ---- tiny local sources ---------------------------------------------------------------------
def test_tiny_local_source_end_to_end(tmp_path):
    import lightning as L

    data = write_tiny(tmp_path / "data")
    dm = WikiTextDataModule(source=str(data), seq_len=4, batch_size=2, cache_dir=str(tmp_path / "cache"))
    tok = dm.tokenizer
    train_words = set((data / "wiki.train.tokens").read_text().split())
    assert dm.vocab_size == len(train_words) + 1 and tok.itos[:2] == [EOS, "the"]  # 12 lines, 9 "the"
    assert tok.encode(" the zebra .") == [tok.stoi["the"], tok.unk_id, tok.stoi["."], tok.eos_id]
    assert tok.decode(tok.encode(" the cat  sat ")) == "the cat sat\n"
    dm.setup()
    assert dm.stream("test").tolist() == tok.encode(" the zebra sat . ")
    valid = tok.encode(" the cat sat .") + tok.encode("the mat <unk> dog")
    assert dm.stream("valid").tolist() == valid  # read from .xz

    class Tiny(L.LightningModule):
        def __init__(self, vocab_size):
            super().__init__()
            self.emb = torch.nn.Embedding(vocab_size, 8)
            self.head = torch.nn.Linear(8, vocab_size)

        def step(self, batch):
            logits = self.head(self.emb(batch["input_ids"]))
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten())

        def training_step(self, batch, _):
            return self.step(batch)

        def validation_step(self, batch, _):
            self.log("val_loss", self.step(batch))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Tiny(dm.vocab_size), datamodule=dm)
    assert torch.isfinite(trainer.callback_metrics["val_loss"])


def test_max_train_tokens_and_env_cache_dir(tmp_path, monkeypatch):
    data = write_tiny(tmp_path / "data")
    monkeypatch.setenv("RESNET_BK_CACHE", str(tmp_path / "env-cache"))
    dm = WikiTextDataModule(source=str(data), seq_len=3, max_train_tokens=10)
    assert dm.cache_dir == tmp_path / "env-cache" and (dm.cache_dir / "vocab").is_dir()
    dm.setup("fit")
    assert len(dm.train_dataset) == 3 and dm.test_dataset is None  # 10 tokens -> 9 targets
    with pytest.raises(ValueError, match="fewer than seq_len"):
        WikiTextDataModule(source=str(data), seq_len=50, max_train_tokens=10).setup("fit")


def test_word_tokenizer_save_load_and_unk_added_when_absent(tmp_path):
    tok = WordTokenizer.from_lines(["b a b", "c"])
    assert tok.itos == [EOS, "b", "a", "c", UNK]  # counts 2, 2, 1, 1, ties by string; <unk> appended
    tok.save(tmp_path / "v.json")
    assert WordTokenizer.load(tmp_path / "v.json").itos == tok.itos
    assert build_tokenizer("word", ["b a b", "c"], tmp_path).itos == tok.itos
    assert tok.encode_lines(["a z", ""]).tolist() == [2, 4, 0, 0]


# ---- errors ---------------------------------------------------------------------------------
def test_error_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="data directory not found"):
        WikiTextDataModule(source=str(tmp_path / "nope"), cache_dir=str(tmp_path))


def test_error_missing_split_file(tmp_path):
    data = write_tiny(tmp_path / "data")
    (data / "wiki.test.tokens").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing wiki\.test\.tokens"):
        WikiTextDataModule(source=str(data), cache_dir=str(tmp_path))


@pytest.mark.parametrize("split", ["train", "valid"])  # plain and .xz
def test_error_empty_file(tmp_path, split):
    data = write_tiny(tmp_path / "data")
    write_tiny(data, {split: ""})
    with pytest.raises(ValueError, match="is empty"):
        WikiTextDataModule(source=str(data), cache_dir=str(tmp_path))


@pytest.mark.parametrize(
    "kwargs", [{"seq_len": 0}, {"batch_size": 0}, {"eval_batch_size": 0}, {"max_train_tokens": 1}, {"source": "hf:"}]
)
def test_error_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        WikiTextDataModule(cache_dir=str(tmp_path), **kwargs)


# ---- transformers adapter (offline: a tokenizer saved to a local folder) --------------------
def test_transformers_tokenizer_from_local_folder(tmp_path):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "the", "cat", "sat", "on", "mat", ".", "=", "A", "dog", "<eos>"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.normalizer = normalizers.Replace("\n", " <eos> ")
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(tmp_path / "tok")

    data = write_tiny(tmp_path / "data")
    dm = WikiTextDataModule(source=str(data), tokenizer=str(tmp_path / "tok"), seq_len=4, cache_dir=str(tmp_path))
    dm.setup()
    assert dm.vocab_size == len(words)
    assert dm.stream("test").tolist() == [1, 0, 3, 6, 10]  # the <unk> sat . <eos>


def test_transformers_tokenizer_offline_error_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # default: local files only, no network
    with pytest.raises(ValueError, match="tokenizer: word") as err:
        build_tokenizer("no-such-org/no-such-tokenizer", [], tmp_path)
    assert "\n" not in str(err.value) and "no-such-org/no-such-tokenizer" in str(err.value)


def test_hf_source_uses_wikitext_split_names_and_strips_line_breaks(tmp_path, monkeypatch):
    """hf:<config> offline: load_dataset is faked with rows shaped like HF wikitext's ("...\\n")."""
    import datasets

    rows = {"train": ["", " = A = \n", " the cat sat . \n"] * 2, "validation": [" the cat \n"], "test": ["", " sat \n"]}
    fake = datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in rows.items()})
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append(a) or fake)
    dm = WikiTextDataModule(source="hf:wikitext-2-v1", seq_len=2, cache_dir=str(tmp_path))
    dm.setup()
    assert calls == [("wikitext", "wikitext-2-v1")]
    tok = dm.tokenizer
    assert dm.vocab_size == 8  # <eos> = A the cat sat . + <unk> (appended: absent from train)
    assert dm.stream("valid").tolist() == tok.encode("the cat")
    assert dm.stream("test").tolist() == tok.encode("") + tok.encode(" sat")
