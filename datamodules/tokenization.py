"""Tokenizers for the language-model data: a word-level one for pre-tokenized corpora (WikiText)
and a thin adapter for any Hugging Face `transformers` tokenizer, behind one small interface:

    tok.vocab_size                  int
    tok.encode(line) -> list[int]   one line of text (no line break) -> ids, end of line included
    tok.encode_lines(lines)         many lines -> one int64 numpy stream, shape (total_tokens,)
    tok.decode(ids) -> str
    tok.fingerprint                 sha256 hex of what fixes the ids (keys the token-stream cache)

The word vocabulary is built from the training split only and cached on disk, keyed by a
content hash of the training file, so a second run loads a JSON file instead of re-counting.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO

import numpy as np

EOS = "<eos>"  # end-of-line token, appended to every line
UNK = "<unk>"  # WikiText's own unknown-word token: an ordinary word of the corpus
WORD_FORMAT_VERSION = 1  # bump when the vocabulary rule changes; part of the cache key


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 hex digest of a file's bytes (as stored, i.e. of the .xz file if compressed)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Write a file via a temp file in the same folder + os.replace: readers (and concurrent
    writers, e.g. DDP ranks) never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class WordTokenizer:
    """Word-level tokenizer for text that is already tokenized (WikiText).

    A line is split on whitespace and `<eos>` is appended, so a file of W words and L lines is
    W + L tokens. `<unk>` is an ordinary word (WikiText marks rare words with it); a word never
    seen in training also maps to `<unk>` (added to the vocabulary, last, if training lacks it).
    Ids are ranks in the training counts, sorted by (-frequency, string): deterministic.
    """

    def __init__(self, vocab: Sequence[str]) -> None:
        self.itos = list(vocab)
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("WordTokenizer: the vocabulary has duplicate entries")
        if EOS not in self.stoi or UNK not in self.stoi:
            raise ValueError(f"WordTokenizer: the vocabulary must contain {EOS} and {UNK}")
        self.eos_id = self.stoi[EOS]
        self.unk_id = self.stoi[UNK]
        self.fingerprint = hashlib.sha256(self._to_json().encode()).hexdigest()

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    @classmethod
    def from_lines(cls, lines: Iterable[str]) -> WordTokenizer:
        """Count the words of `lines` (the training split) and rank them."""
        counts: Counter[str] = Counter()
        n_lines = 0
        for line in lines:
            counts.update(line.split())
            n_lines += 1
        counts[EOS] += n_lines  # the end-of-line token is a token of the stream like any word
        vocab = sorted(counts, key=lambda w: (-counts[w], w))
        if UNK not in counts:
            vocab.append(UNK)
        return cls(vocab)

    def encode(self, line: str) -> list[int]:
        """One line (without its line break) -> word ids + [eos_id]."""
        get, unk = self.stoi.get, self.unk_id
        return [get(w, unk) for w in line.split()] + [self.eos_id]

    def encode_lines(self, lines: Iterable[str]) -> np.ndarray:
        """Lines -> one stream, int64 array of shape (words + lines,)."""
        get, unk, eos = self.stoi.get, self.unk_id, self.eos_id

        def ids():
            for line in lines:
                for w in line.split():
                    yield get(w, unk)
                yield eos

        return np.fromiter(ids(), dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text: words joined by spaces, a line break after each `<eos>`."""
        out, words = [], []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                out.append(" ".join(words) + "\n")
                words = []
            else:
                words.append(self.itos[i])
        return "".join(out) + " ".join(words)

    def _to_json(self) -> str:
        return json.dumps({"type": "word", "version": WORD_FORMAT_VERSION, "vocab": self.itos})

    def save(self, path: str | os.PathLike) -> None:
        """Write the vocabulary as JSON (atomically)."""
        data = self._to_json().encode()
        atomic_write(path, lambda f: f.write(data))

    @classmethod
    def load(cls, path: str | os.PathLike) -> WordTokenizer:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if data.get("type") != "word" or data.get("version") != WORD_FORMAT_VERSION:
            raise ValueError(f"{path} is not a word vocabulary of format {WORD_FORMAT_VERSION}")
        return cls(data["vocab"])

    @classmethod
    def cached(cls, train_lines: Iterable[str], cache_dir: str | os.PathLike, train_hash: str) -> WordTokenizer:
        """Load the vocabulary of the training file with content hash `train_hash` from
        `cache_dir/vocab/`, or build it from `train_lines` and save it there. On a hit,
        `train_lines` is never iterated (pass a generator to keep a warm start cheap)."""
        path = Path(cache_dir) / "vocab" / f"word-v{WORD_FORMAT_VERSION}-{train_hash[:32]}.json"
        if path.exists():
            return cls.load(path)
        tok = cls.from_lines(train_lines)
        tok.save(path)
        return tok


def encode_to_file(
    tokenizer, lines: Iterable[str], path: str | os.PathLike, dtype: np.dtype, chunk_lines: int = 100_000
) -> int:
    """Tokenize `lines` into a flat file of `dtype` token ids at `path` (atomically), `chunk_lines`
    lines at a time, so memory stays bounded whatever the corpus size. Returns the token count."""
    dtype = np.dtype(dtype)
    limit = np.iinfo(dtype).max
    count = 0

    def write(f: IO[bytes]) -> None:
        nonlocal count
        batch: list[str] = []
        for line in itertools.chain(lines, [None]):
            if line is not None:
                batch.append(line)
                if len(batch) < chunk_lines:
                    continue
            if batch:
                ids = tokenizer.encode_lines(batch)
                if ids.size and int(ids.max()) > limit:
                    raise ValueError(f"token id {int(ids.max())} does not fit {dtype.name}")
                f.write(ids.astype(dtype).tobytes())
                count += ids.size
                batch = []

    atomic_write(path, write)
    return count


def _downloads_allowed() -> bool:
    """Hub downloads are opt-in: only when HF_HUB_OFFLINE is explicitly set to 0/false."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"0", "false", "no", "off"}


class HFTokenizer:
    """Adapter for a `transformers` tokenizer (`AutoTokenizer.from_pretrained(name)`), where
    `name` is a Hub id or a local folder. Looked up in the local HF cache only, unless
    HF_HUB_OFFLINE=0 is set. Each line is encoded with its trailing "\\n" and no special tokens,
    so the line structure is whatever the tokenizer makes of a newline.
    """

    def __init__(self, name: str) -> None:
        from transformers import AutoTokenizer

        tok, error = None, None
        for local_only in (True, False) if _downloads_allowed() else (True,):
            try:
                tok = AutoTokenizer.from_pretrained(name, local_files_only=local_only)
                break
            except (OSError, ValueError) as e:  # not found / not cached / invalid repo id
                error = e
        if tok is None:
            raise ValueError(
                f"tokenizer {name!r} could not be loaded offline (not a local folder nor in the HF cache); "
                "set HF_HUB_OFFLINE=0 with network access to download it, or use tokenizer: word"
            ) from error
        tok.model_max_length = sys.maxsize  # we encode whole lines; windows are cut later
        self.name = name
        self.tok = tok
        backend = getattr(tok, "backend_tokenizer", None)
        spec = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
        self.fingerprint = hashlib.sha256(f"{type(tok).__name__}\n{spec}".encode()).hexdigest()

    @property
    def vocab_size(self) -> int:
        return len(self.tok)  # includes added tokens

    def encode(self, line: str) -> list[int]:
        return self.tok(line + "\n", add_special_tokens=False, verbose=False)["input_ids"]

    def encode_lines(self, lines: Iterable[str], chunk: int = 10_000) -> np.ndarray:
        """Lines -> one stream, int64 array of shape (total_tokens,); batched for speed."""
        parts, batch = [], []

        def flush():
            enc = self.tok([s + "\n" for s in batch], add_special_tokens=False, verbose=False)["input_ids"]
            parts.extend(np.asarray(ids, dtype=np.int64) for ids in enc)
            batch.clear()

        for line in lines:
            batch.append(line)
            if len(batch) == chunk:
                flush()
        if batch:
            flush()
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids])


def build_tokenizer(
    name: str,
    train_lines: Iterable[str],
    cache_dir: str | os.PathLike,
    train_hash: str | None = None,
) -> WordTokenizer | HFTokenizer:
    """`name == "word"`: the word vocabulary of `train_lines`, cached under `cache_dir` by
    `train_hash` (content hash of the training file; hashed from the lines if not given).
    Any other name: `HFTokenizer(name)`; `train_lines` is ignored."""
    if name == "word":
        if train_hash is None:
            train_lines = list(train_lines)
            train_hash = hashlib.sha256("\n".join(train_lines).encode()).hexdigest()
        return WordTokenizer.cached(train_lines, cache_dir, train_hash)
    return HFTokenizer(name)
