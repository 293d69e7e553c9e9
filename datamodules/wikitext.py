"""WikiText language-modelling data: a LightningDataModule over fixed-length windows of one token
stream per split.

Data: the bundled WikiText-2 (datamodules/data/wikitext-2/, see its README for licence and the
training split's provenance), a local folder of wiki.{train,valid,test}.tokens[.xz], or the HF Hub
(`hf:<config>`). Text is read through HF `datasets`.

Windows (L = seq_len): window i holds tokens stream[i*L : i*L + L + 1]; its inputs are the first L,
its targets the last L (next-token prediction). Training keeps full windows only. Evaluation keeps
the last partial window, padded (inputs with PAD_ID, targets with IGNORE_INDEX), so every token of
stream[1:] is scored exactly once and perplexity is token-weighted over the whole split (DESIGN §4).

Training subsets: the training loader draws through a SubsetSampler (datamodules/sampling.py). By
default it is plain shuffled sampling of every window; a callback (callbacks/curriculum.py,
callbacks/active_learning.py) calls `set_train_subset(ids, mode, weights)` to make it draw from an
active subset instead. The subset, its order and the position within the epoch are part of the data
module's state_dict, which Lightning saves in every checkpoint and restores on resume, so a run
resumed mid-epoch draws the same sequence as an uninterrupted one. Validation and test are never
subset: their loaders always visit every window once, in order.

Corpora larger than memory: each split is tokenized once, in chunks, into a flat file of token ids
(uint16 when the vocabulary fits, else int32), keyed by a content hash, and read back as a
read-only numpy memmap. The training and evaluation windows read their tokens from that memmap,
so a WikiText-103-sized corpus (or any local corpus in the same layout) trains with only the pages
in use in RAM. `stream(split)` still returns the whole split as an int64 tensor, for small splits
and tests; `tokens(split)` is the memmap.

Caches (under `cache_dir`, default ~/.cache/resnet_bk or $RESNET_BK_CACHE):
    vocab/    word vocabularies, keyed by the training file's sha256
    streams/  token ids (.<dtype>.bin), keyed by the split file's sha256 + the tokenizer's fingerprint
    hf/       HF `datasets` Arrow cache of the local text files
"""

from __future__ import annotations

import codecs
import lzma
import os
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.sampling import SubsetSampler
from datamodules.tokenization import build_tokenizer, encode_to_file, sha256_file

BUNDLED_DIR = Path(__file__).parent / "data" / "wikitext-2"
SPLITS = ("train", "valid", "test")
HF_SPLITS = {"train": "train", "valid": "validation", "test": "test"}  # our name -> HF wikitext's
PAD_ID = 0  # input id at padded positions; never a target, and causal models never look ahead
IGNORE_INDEX = -100  # target at padded positions (torch cross_entropy's default ignore_index)


class TokenWindows(Dataset):
    """Windows of one token stream, stride seq_len; item i is window i, with its id.

    Item i: {"input_ids": LongTensor (seq_len,), "targets": LongTensor (seq_len,), "index": int i}
    with input_ids = stream[i*L : i*L+L] and targets = stream[i*L+1 : i*L+L+1].
    pad_last=False: only full windows, len = (n-1) // L (the last < L targets are dropped).
    pad_last=True:  len = ceil((n-1) / L); the last window is padded (PAD_ID / IGNORE_INDEX).

    `tokens` may be a LongTensor or any 1-D integer numpy array, e.g. a memmap of the token file:
    an item then reads only its own L + 1 ids, so the stream need not fit in memory.
    """

    def __init__(self, tokens: torch.Tensor | np.ndarray, seq_len: int, pad_last: bool) -> None:
        if tokens.ndim != 1 or len(tokens) < 2:
            raise ValueError(f"TokenWindows needs a 1-D stream of >= 2 tokens, got shape {tuple(tokens.shape)}")
        self.tokens = tokens
        self.seq_len = seq_len
        self.pad_last = pad_last
        n_targets = len(tokens) - 1
        self.n = -(-n_targets // seq_len) if pad_last else n_targets // seq_len

    @property
    def stream(self) -> torch.Tensor:
        """The whole stream as a LongTensor (materialised: 8 bytes per token; for small splits)."""
        if isinstance(self.tokens, torch.Tensor):
            return self.tokens
        return torch.from_numpy(np.asarray(self.tokens, dtype=np.int64))

    def __len__(self) -> int:
        return self.n

    def __getstate__(self) -> dict:
        # A memmap pickles as a full in-memory copy: send spawned loader workers its file instead.
        state = dict(self.__dict__)
        if isinstance(self.tokens, np.memmap):
            t = self.tokens
            state["tokens"] = ("memmap", t.filename, t.dtype.str, t.offset, t.shape)
        return state

    def __setstate__(self, state: dict) -> None:
        if isinstance(state["tokens"], tuple) and state["tokens"][0] == "memmap":
            _, filename, dtype, offset, shape = state["tokens"]
            state["tokens"] = np.memmap(filename, dtype=dtype, mode="r", offset=offset, shape=shape)
        self.__dict__.update(state)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.n:
            raise IndexError(f"window {i} out of range [0, {self.n})")
        start, L = i * self.seq_len, self.seq_len
        chunk = self.tokens[start : start + L + 1]
        if not isinstance(chunk, torch.Tensor):
            chunk = torch.from_numpy(np.array(chunk, dtype=np.int64))  # a copy: the memmap is read-only
        inputs, targets = chunk[:-1], chunk[1:]
        if len(targets) < L:  # last window of an evaluation split
            pad = L - len(targets)
            inputs = torch.cat([inputs, inputs.new_full((pad,), PAD_ID)])
            targets = torch.cat([targets, targets.new_full((pad,), IGNORE_INDEX)])
        return {"input_ids": inputs, "targets": targets, "index": i}


class WikiTextDataModule(L.LightningDataModule):
    """WikiText next-token windows for language modelling.

    Batches are dicts: input_ids LongTensor (B, seq_len); targets LongTensor (B, seq_len), -100 on
    padding; index LongTensor (B,), window ids within the split.

    The tokenizer is ready after __init__ (`vocab_size` is a plain int, linked into the model by
    the CLI); token streams are built or loaded in `prepare_data`/`setup`.

    Args:
        source: where the text comes from. "bundled": the WikiText-2 copy shipped in the package
            (no network). A directory path: it must hold wiki.train.tokens, wiki.valid.tokens and
            wiki.test.tokens, each plain or .xz. "hf:<config>", e.g. "hf:wikitext-103-raw-v1":
            load_dataset("wikitext", <config>) from the HF Hub (needs network or the HF cache).
        tokenizer: "word" (whitespace words + <eos> per line, vocabulary from the training split;
            right for the pre-tokenized WikiText "-v1" data), or a `transformers` tokenizer name or
            folder (e.g. "gpt2"), used only if found locally unless HF_HUB_OFFLINE=0.
        seq_len: tokens per example (inputs and targets each have seq_len positions).
        batch_size: training examples per batch.
        eval_batch_size: validation/test examples per batch; default batch_size.
        num_workers: DataLoader worker processes (0: load in the main process); None: 0 without
            CUDA, else min(4, CPUs per device - 1), as many as Lightning's loader check asks for.
        cache_dir: folder for the vocabulary, token streams and HF Arrow caches; default
            $RESNET_BK_CACHE or ~/.cache/resnet_bk.
        max_train_tokens: keep only the first this many tokens of the training stream (smoke
            runs); None keeps all. Validation and test are never truncated.
        seed: seeds the training sampler's shuffles; None takes the run's seed (seed_everything's
            PL_GLOBAL_SEED, which the CLI sets), else 0. The sample sequence is a function of this
            seed, the epoch and the subsets set, the same on every rank.
    """

    def __init__(
        self,
        source: str = "bundled",
        tokenizer: str = "word",
        seq_len: int = 256,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int | None = None,
        cache_dir: str | None = None,
        max_train_tokens: int | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        checks = {"seq_len": (seq_len, 1), "batch_size": (batch_size, 1), "num_workers": (num_workers or 0, 0)}
        for name, (value, low) in checks.items():
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1 or None, got {eval_batch_size}")
        if max_train_tokens is not None and max_train_tokens < 2:
            raise ValueError(f"max_train_tokens must be >= 2 or None, got {max_train_tokens}")
        self.save_hyperparameters()
        self.source = source
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.max_train_tokens = max_train_tokens
        cache_dir = cache_dir or os.environ.get("RESNET_BK_CACHE") or "~/.cache/resnet_bk"
        self.cache_dir = Path(cache_dir).expanduser()

        self._text = None  # HF DatasetDict, loaded on first need
        if source.startswith("hf:"):
            self.hf_config = source[3:]
            if not self.hf_config:
                raise ValueError("source 'hf:' needs a config name, e.g. hf:wikitext-103-raw-v1")
            self.files = None
            self.hashes = {s: self._load_text()[HF_SPLITS[s]]._fingerprint for s in SPLITS}
        else:
            self.hf_config = None
            self.files = find_split_files(BUNDLED_DIR if source == "bundled" else Path(source).expanduser())
            self.hashes = {s: sha256_file(f) for s, f in self.files.items()}

        self.tokenizer = build_tokenizer(tokenizer, self._lines("train"), self.cache_dir, self.hashes["train"])
        self.vocab_size: int = self.tokenizer.vocab_size
        self._tokens: dict[str, np.ndarray] = {}  # memmaps of the token files
        self.train_dataset = self.val_dataset = self.test_dataset = None
        self.seed = seed
        self.train_sampler: SubsetSampler | None = None  # made in setup("fit")
        self._sampler_state: dict | None = None  # a checkpoint's, if loaded before setup

    # ---- text ---------------------------------------------------------------------------
    def _load_text(self):
        """All three splits as a HF DatasetDict with one "text" column (one row per line)."""
        if self._text is None:
            import datasets

            if self.hf_config is not None:
                try:
                    self._text = datasets.load_dataset("wikitext", self.hf_config)
                except Exception as e:
                    raise ValueError(
                        f"could not load wikitext config {self.hf_config!r} from the HF Hub or cache ({type(e).__name__}); "
                        "check the config name and network access (HF_HUB_OFFLINE=0), or use source: bundled"
                    ) from e
            else:
                try:
                    self._text = datasets.load_dataset(
                        "text",
                        data_files={s: str(f) for s, f in self.files.items()},
                        keep_linebreaks=False,
                        cache_dir=str(self.cache_dir / "hf"),
                    )
                except Exception as e:
                    problem = _unreadable_file(self.files)  # read again only on this error path
                    if problem is None:
                        raise
                    raise ValueError(problem) from e
        return self._text

    def _lines(self, split: str) -> Iterator[str]:
        """Lines of a split without line breaks (lazy: nothing is read until iterated)."""
        name = HF_SPLITS[split] if self.hf_config is not None else split
        # In batches from the memory-mapped Arrow table: memory stays bounded for any corpus size.
        for batch in self._load_text()[name].iter(batch_size=10_000):
            for line in batch["text"]:
                yield line[:-1] if line.endswith("\n") else line  # HF wikitext rows keep their "\n"

    # ---- token streams ------------------------------------------------------------------
    def tokens(self, split: str) -> np.ndarray:
        """The whole split as a read-only memmap of token ids, tokenized now unless cached.

        The file is built once, in chunks (memory bounded), and keyed by the split file's content
        hash and the tokenizer's fingerprint, so a changed file or vocabulary is never read stale."""
        if split not in self._tokens:
            dtype = np.dtype(np.uint16 if self.vocab_size <= 2**16 else np.int32)
            key = f"{split}-{self.hashes[split][:32]}-{self.tokenizer.fingerprint[:32]}.{dtype.name}.bin"
            path = self.cache_dir / "streams" / key
            if not path.exists():
                encode_to_file(self.tokenizer, self._lines(split), path, dtype)
            n = path.stat().st_size // dtype.itemsize
            if n < 2:
                raise ValueError(f"the {split} split of {self.source!r} has {n} tokens; it needs at least 2")
            self._tokens[split] = np.memmap(path, dtype=dtype, mode="r", shape=(n,))
        return self._tokens[split]

    def stream(self, split: str) -> torch.Tensor:
        """The whole split as one LongTensor (n_tokens,), in memory (8 bytes per token)."""
        return torch.from_numpy(np.asarray(self.tokens(split), dtype=np.int64))

    def prepare_data(self) -> None:
        """Tokenize and cache every split once (Lightning runs this on one process per node)."""
        for split in SPLITS:
            self.tokens(split)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_dataset is None:
            train = self.tokens("train")
            if self.max_train_tokens is not None:
                train = train[: self.max_train_tokens]
            if len(train) < self.seq_len + 1:
                raise ValueError(
                    f"the training stream has {len(train)} tokens, fewer than seq_len + 1 = {self.seq_len + 1}; "
                    "lower seq_len or raise max_train_tokens"
                )
            self.train_dataset = TokenWindows(train, self.seq_len, pad_last=False)
            seed = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
            trainer = getattr(self, "trainer", None)  # its strategy (world size, rank) is set up before setup()
            world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
            self.train_sampler = SubsetSampler(len(self.train_dataset), seed=seed, num_replicas=world, rank=rank)
            if self._sampler_state is not None:
                self.train_sampler.load_state_dict(self._sampler_state)
                self._sampler_state = None
        if stage in (None, "fit", "validate") and self.val_dataset is None:
            self.val_dataset = TokenWindows(self.tokens("valid"), self.seq_len, pad_last=True)
        if stage in (None, "test") and self.test_dataset is None:
            self.test_dataset = TokenWindows(self.tokens("test"), self.seq_len, pad_last=True)

    # ---- training subsets ---------------------------------------------------------------
    @property
    def num_train_examples(self) -> int:
        """Number of training windows; their ids are 0 .. num_train_examples - 1 (batch["index"])."""
        self._require_train()
        return len(self.train_dataset)

    @property
    def train_subset(self) -> torch.Tensor | None:
        """Ids of the active training subset (in its order), or None while every window is drawn."""
        self._require_train()
        return None if self.train_sampler.is_full else self.train_sampler.active.ids

    def set_train_subset(self, ids, mode: str = "shuffle", weights=None) -> bool:
        """Draw training windows from `ids` only, from the next batch on (None: all windows again).

        mode "shuffle": each pass a random permutation of ids; "ordered": ids in the order given;
        "weighted": with replacement, probability proportional to `weights` (one per id). Every rank
        must call this with the same arguments at the same step (the callbacks do). Returns False
        if this selection is already the active one.
        """
        self._require_train()
        return self.train_sampler.set_subset(ids, mode, weights, consumed=self._consumed())

    def _require_train(self) -> None:
        if self.train_sampler is None:
            raise RuntimeError("call setup('fit') before using the training set's subsets")

    def _consumed(self) -> int | None:
        """Training examples this rank has trained on in the current epoch, from the trainer's
        progress (the sampler itself only knows how many were drawn, which workers run ahead of)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return None
        try:
            batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        except AttributeError:
            return None
        return batches * self.batch_size

    def state_dict(self) -> dict:
        """The training sampler's state (subset, order, epoch, position): saved in checkpoints."""
        if self.train_sampler is None:
            return {} if self._sampler_state is None else {"sampler": self._sampler_state}
        return {"sampler": self.train_sampler.state_dict(consumed=self._consumed())}

    def load_state_dict(self, state_dict: dict) -> None:
        state = state_dict.get("sampler")
        if state is None:
            return
        if self.train_sampler is None:
            self._sampler_state = state  # applied in setup("fit")
        else:
            self.train_sampler.load_state_dict(state)

    # ---- loaders ------------------------------------------------------------------------
    def _loader(self, dataset: Dataset | None, batch_size: int, shuffle: bool = False, sampler=None) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        workers = self.num_workers
        if workers is None:
            trainer = getattr(self, "trainer", None)
            workers = default_num_workers(trainer.num_devices if trainer is not None else 1)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        """Batches drawn by the training sampler: all windows shuffled, or the active subset.

        Under a trainer, each rank draws its own shard (trainer.world_size / global_rank)."""
        self._require_train()
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            self.train_sampler.set_distributed(trainer.world_size, trainer.global_rank)
        return self._loader(self.train_dataset, self.batch_size, sampler=self.train_sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, self.eval_batch_size, shuffle=False)


def find_split_files(directory: Path) -> dict[str, Path]:
    """{split: path} for wiki.{train,valid,test}.tokens (plain preferred, else .xz) in `directory`,
    with one-line errors for a missing folder, a missing file or an empty file."""
    layout = "wiki.train.tokens, wiki.valid.tokens and wiki.test.tokens (plain or .xz)"
    if not directory.is_dir():
        raise FileNotFoundError(
            f"WikiText data directory not found: {str(directory)!r}; pass source=bundled, hf:<config>, "
            f"or a directory holding {layout}"
        )
    files = {}
    for split in SPLITS:
        plain = directory / f"wiki.{split}.tokens"
        path = plain if plain.is_file() else plain.with_name(plain.name + ".xz")
        if not path.is_file():
            raise FileNotFoundError(f"missing wiki.{split}.tokens (or .xz) in {str(directory)!r}; it needs {layout}")
        if _is_empty(path):
            raise ValueError(f"{str(path)!r} is empty; every split file needs at least one line of text")
        files[split] = path
    return files


def _is_empty(path: Path) -> bool:
    """Whether the file holds no text; a ValueError naming the file if it cannot be read."""
    try:
        with lzma.open(path, "rb") if path.suffix == ".xz" else open(path, "rb") as f:
            return f.read(1) == b""
    except (OSError, lzma.LZMAError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ValueError(
            f"cannot read {str(path)!r} ({reason}); fix its permissions (chmod a+r) or replace the file "
            "(a truncated download? re-compress it with xz, or store it uncompressed)"
        ) from e


def _unreadable_file(files: dict[str, Path]) -> str | None:
    """A one-line message for the first split file that cannot be read in full as UTF-8 text, else None."""
    for path in files.values():
        offset = 0
        decoder = codecs.getincrementaldecoder("utf-8")()
        try:
            with lzma.open(path, "rb") if path.suffix == ".xz" else open(path, "rb") as f:
                while block := f.read(1 << 20):
                    decoder.decode(block)
                    offset += len(block)
                decoder.decode(b"", final=True)
        except UnicodeDecodeError as e:
            return (
                f"{str(path)!r} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {offset + e.start}); "
                "convert it, e.g. iconv -f latin1 -t utf-8 FILE > FILE.utf8, and point source at the converted files"
            )
        except (OSError, EOFError, lzma.LZMAError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
            return (
                f"cannot read {str(path)!r} ({reason}); fix its permissions (chmod a+r) or replace the file "
                "(a truncated download? re-compress it with xz, or store it uncompressed)"
            )
    return None


def default_num_workers(devices_per_node: int) -> int:
    """DataLoader workers for num_workers=None: 0 without CUDA (a CPU step outlasts loading a batch
    of token ids), else min(4, CPUs per device - 1), Lightning's suggestion capped at 4."""
    if not torch.cuda.is_available():
        return 0
    from lightning.fabric.utilities.data import suggested_max_num_workers

    return min(4, suggested_max_num_workers(devices_per_node))
