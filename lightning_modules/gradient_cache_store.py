"""GradientCache: an LRU store of gradients keyed by unit vectors, bounded in bytes.

Used by lightning_modules.gradient_caching_module (seed 002, Step 7 "gradient caching"). Each entry is one
batch's flattened gradient (all parameters that had one, concatenated) and the batch's key, a unit
vector. `lookup(key)` finds the most similar stored key by cosine similarity with ONE matrix-vector
product against the stacked keys (the seed compares keys one by one in a Python loop).

Memory: every entry costs grad.numel() * itemsize (in `dtype`, on `device`) + key.numel() * 4 bytes
(the keys stay float32 beside the computation, so the lookup matmul runs where the keys are made).
`nbytes` never exceeds `max_bytes`: before an entry is added, the least recently used entries are
evicted until it fits; an entry larger than `max_bytes` on its own is not stored (put -> False).
"Used" means stored or returned by `get`; `lookup` alone does not refresh an entry.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass
class CacheEntry:
    key: torch.Tensor  # (D,) float32, unit norm
    grad: torch.Tensor  # (numel,) in the cache's dtype and device
    meta: object = None  # caller's bookkeeping (e.g. which parameters had a gradient); not counted in nbytes

    @property
    def nbytes(self) -> int:
        return entry_nbytes(self.key, self.grad)


def entry_nbytes(key: torch.Tensor, grad: torch.Tensor) -> int:
    return key.numel() * key.element_size() + grad.numel() * grad.element_size()


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class GradientCache:
    """LRU cache {key -> flat gradient}, bounded by max_bytes (and optionally max_entries).

    Args:
        max_bytes: upper bound on the sum of entry sizes (keys + gradients), in bytes.
        max_entries: optional bound on the number of entries.
        dtype: storage dtype of the gradients (torch.bfloat16 halves the memory of float32).
        device: where the gradients are kept (e.g. "cpu" to spare accelerator memory); None: where
            they come from. Keys stay on the device they come from.
    """

    def __init__(
        self,
        max_bytes: int,
        max_entries: int | None = None,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        if max_bytes < 0:
            raise ValueError(f"GradientCache: max_bytes must be >= 0, got {max_bytes}.")
        if max_entries is not None and max_entries < 0:
            raise ValueError(f"GradientCache: max_entries must be >= 0 or None, got {max_entries}.")
        self.max_bytes, self.max_entries = int(max_bytes), max_entries
        self.dtype = dtype
        self.device = None if device is None else torch.device(device)
        self._entries: OrderedDict[int, CacheEntry] = OrderedDict()  # least recently used first
        self._next_id = 0
        self._nbytes = 0
        self._keys: torch.Tensor | None = None  # (n, D) stacked keys, rebuilt after put/evict
        self._key_ids: list[int] = []  # entry id of each row of _keys
        self.evictions = 0

    # ---------------------------------------------------------------------------- queries
    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, entry_id: int) -> bool:
        return entry_id in self._entries

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def ids(self) -> list[int]:
        """Entry ids, least recently used first."""
        return list(self._entries)

    def lookup(self, key: torch.Tensor) -> tuple[int | None, torch.Tensor]:
        """(id of the stored key most similar to `key`, its cosine similarity as a 0-d tensor).

        `key` must be unit norm (as stored keys are), so the dot product is the cosine. One
        matrix-vector product over all entries; (None, -inf) when the cache is empty. The similarity
        stays on the key's device (no host sync here); the caller decides when to read it.
        """
        if not self._entries:
            return None, torch.tensor(float("-inf"), device=key.device)
        if self._keys is None:
            self._key_ids = list(self._entries)
            self._keys = torch.stack([self._entries[i].key for i in self._key_ids])
        sims = self._keys @ key.to(self._keys.dtype)  # (n,)
        best = int(torch.argmax(sims))
        return self._key_ids[best], sims[best]

    def get(self, entry_id: int) -> CacheEntry:
        """The entry, now marked most recently used."""
        self._entries.move_to_end(entry_id)
        return self._entries[entry_id]

    # ---------------------------------------------------------------------------- updates
    def put(self, key: torch.Tensor, grad: torch.Tensor, meta: object = None) -> int | None:
        """Store a copy of `grad` (flattened, cast to the cache dtype, moved to the cache device) under `key`.

        Evicts least recently used entries until the new one fits; returns its id, or None if it
        cannot fit at all (larger than max_bytes, or max_entries == 0).
        """
        key = key.detach().float().reshape(-1)
        size = key.numel() * key.element_size() + grad.numel() * _itemsize(self.dtype)
        if size > self.max_bytes or self.max_entries == 0:
            return None
        while self._entries and (
            self._nbytes + size > self.max_bytes or (self.max_entries is not None and len(self) >= self.max_entries)
        ):
            self._evict_lru()
        device = self.device or grad.device
        if device.type == "cpu" and grad.device.type == "cuda":
            # pinned host memory: the copy is asynchronous and ordered on the current stream
            stored = torch.empty(grad.numel(), dtype=self.dtype, pin_memory=True)
            stored.copy_(grad.detach().reshape(-1), non_blocking=True)
        else:
            stored = grad.detach().reshape(-1).to(device=device, dtype=self.dtype, copy=True)
        entry_id = self._next_id
        self._next_id += 1
        self._entries[entry_id] = CacheEntry(key.clone(), stored, meta)
        self._nbytes += size
        self._keys = None
        return entry_id

    def clear(self) -> None:
        self._entries.clear()
        self._nbytes = 0
        self._keys = None

    def _evict_lru(self) -> None:
        _, entry = self._entries.popitem(last=False)
        self._nbytes -= entry.nbytes
        self._keys = None
        self.evictions += 1
