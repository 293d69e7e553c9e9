"""SubsetSampler: a training sampler that draws from an *active subset* of the examples, in a given
order or weighting, sharded across ranks, deterministic from a seed, and resumable mid-epoch.

Why a sampler and not a new DataLoader per subset: a curriculum grows its subset every step and an
active-learning round swaps it every K steps; rebuilding the DataLoader (and Lightning's loop state
around it) that often is slow and loses the position within the epoch. Here the subset is data the
sampler reads lazily, one index at a time, so a change takes effect at the next index drawn.

The sample stream. An epoch is a fixed number of draws, `len(sampler) = ceil(n / num_replicas)` per
rank, whatever the subset (so "epoch" keeps meaning "n examples' worth of training"). The epoch is a
sequence of *segments*; `set_subset` starts a new one at the next undrawn position. Within a segment
all ranks read one shared stream, made of passes over the subset:

    "shuffle":  pass j is a random permutation of the subset (sampling without replacement);
    "ordered":  every pass is the subset in the order given (e.g. easiest first);
    "weighted": pass j is len(subset) draws with replacement, probability proportional to weights.

Rank r takes stream positions r, r + W, r + 2W, ... (W = num_replicas), so within one pass the ranks
get disjoint shards that together cover the subset. Every random pass is generated from
(seed, epoch, segment uid, pass number), so the stream is reproducible and identical on every rank.
With no subset set, the single segment is a "shuffle" of all n examples: one random permutation per
epoch, i.e. plain shuffled sampling (split across ranks like DistributedSampler).

Resuming. `state_dict(consumed)` stores the epoch, the number of examples this rank has *consumed*
(trained on) and the segments still needed from there on; `load_state_dict` makes the next
iteration of that epoch start at the consumed position. The consumed count is not the number drawn:
DataLoader workers draw ahead, so the owner (WikiTextDataModule) passes the count from the trainer's
progress. Segments started at positions drawn ahead of the checkpoint are kept, so a resumed run
switches subsets at the same positions as the uninterrupted one.

It subclasses DistributedSampler only so that Lightning, seeing a distributed sampler already in
place, does not wrap it in another one (which would shard twice).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DistributedSampler

MODES = ("shuffle", "ordered", "weighted")
IdsLike = Union[torch.Tensor, np.ndarray, Sequence[int]]


@dataclass
class Segment:
    """From local position `start` on (until the next segment), draw from `ids` in `mode`."""

    start: int
    ids: torch.Tensor  # LongTensor (m,), m >= 1, each in [0, n)
    mode: str = "shuffle"
    weights: Optional[torch.Tensor] = None  # float (m,), for mode "weighted"
    uid: int = 0  # seeds this segment's random passes

    def same_selection(self, other: "Segment") -> bool:
        """Same ids, mode and weights (positions and uid aside)."""
        if self.mode != other.mode or not torch.equal(self.ids, other.ids):
            return False
        if (self.weights is None) != (other.weights is None):
            return False
        return self.weights is None or torch.equal(self.weights, other.weights)

    def to_state(self) -> dict:
        return {
            "start": self.start,
            "ids": self.ids.clone(),
            "mode": self.mode,
            "weights": None if self.weights is None else self.weights.clone(),
            "uid": self.uid,
        }

    @classmethod
    def from_state(cls, state: dict) -> "Segment":
        return cls(int(state["start"]), state["ids"].long(), state["mode"], state["weights"], int(state["uid"]))


class SubsetSampler(DistributedSampler):
    """Indices of the active subset of range(n) for one rank; see the module docstring.

    Args:
        n: number of examples (the dataset's length).
        seed: seeds every random pass (together with the epoch and the segment).
        num_replicas, rank: this process's place among W data-parallel ranks (default 1, 0);
            `set_distributed` may change them before iterating.
    """

    def __init__(self, n: int, seed: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        if n < 1:
            raise ValueError(f"SubsetSampler needs n >= 1 examples, got {n}")
        # DistributedSampler.__init__ only validates and stores; it reads len(dataset) -> pass a range.
        super().__init__(range(n), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.n = n
        self.epoch = 0
        self._segments = [Segment(0, torch.arange(n), "shuffle", None, 0)]
        self._next_uid = 1
        self._drawn = 0  # local positions drawn so far in the current epoch
        self._resume_at: Optional[int] = None  # local position to start the next iteration of self.epoch at
        self._epoch_set = True  # set_epoch since the last iteration began (else the next one auto-advances)
        self._started = False  # an iteration of self.epoch has begun
        self._pass_cache: dict = {}

    # ---- configuration ------------------------------------------------------------------
    def set_distributed(self, num_replicas: int, rank: int) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"invalid rank {rank} for num_replicas {num_replicas}")
        self.num_replicas, self.rank = num_replicas, rank
        self.num_samples = len(self)
        self.total_size = self.num_samples * num_replicas
        self._pass_cache.clear()

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this at every epoch start (and again, with the same epoch, on resume)."""
        if epoch != self.epoch:
            self._resume_at = None  # a checkpoint's position belongs to its own epoch only
            self._new_epoch()
        self.epoch = epoch
        self._epoch_set = True

    def _new_epoch(self) -> None:
        """A new epoch starts at position 0 with the latest selection."""
        last = self.active
        self._segments = [Segment(0, last.ids, last.mode, last.weights, last.uid)]
        self._drawn = 0
        self._started = False

    def __len__(self) -> int:
        return math.ceil(self.n / self.num_replicas)

    # ---- the active subset --------------------------------------------------------------
    @property
    def active(self) -> Segment:
        """The most recent selection (what draws from now on use)."""
        return self._segments[-1]

    @property
    def is_full(self) -> bool:
        """True while the active selection is all n examples, shuffled (plain shuffled sampling)."""
        seg = self.active
        return seg.mode == "shuffle" and seg.ids.numel() == self.n and torch.equal(seg.ids, torch.arange(self.n))

    def set_subset(
        self,
        ids: Optional[IdsLike],
        mode: str = "shuffle",
        weights: Optional[IdsLike] = None,
        consumed: Optional[int] = None,
    ) -> bool:
        """Draw from `ids` (None: all examples, shuffled) from the next undrawn position on.

        mode: "shuffle", "ordered" (ids in the order given) or "weighted" (with replacement, by
        `weights`). consumed: this rank's consumed position, if known, to free segments no longer
        needed for resuming. Returns False (and changes nothing) if the selection is the active one.
        """
        if ids is None:
            ids, mode, weights = torch.arange(self.n), "shuffle", None
        seg = Segment(self._position_for_new(), *_check_selection(ids, mode, weights, self.n), uid=self._next_uid)
        if seg.same_selection(self.active):
            return False
        self._next_uid += 1
        self._push(seg)
        self._prune(self._drawn if consumed is None else min(consumed, self._drawn))
        return True

    def _position_for_new(self) -> int:
        # Before an epoch's first draw (or after its last), the new selection starts the next epoch.
        return self._drawn if self._started else 0

    def _push(self, seg: Segment) -> None:
        if seg.start == self._segments[-1].start:
            self._segments[-1] = seg  # nothing was drawn from the previous one
        else:
            self._segments.append(seg)

    def _prune(self, consumed: int) -> None:
        """Drop segments that end at or before `consumed` (no resume can need them)."""
        while len(self._segments) > 1 and self._segments[1].start <= consumed:
            self._segments.pop(0)

    # ---- drawing ------------------------------------------------------------------------
    def __iter__(self) -> Iterator[int]:
        # A generator: nothing below runs until the first index is asked for, so a selection set
        # between iter() and the first draw (e.g. in on_train_start) applies from the first batch.
        if self._resume_at is not None:
            start, self._resume_at = self._resume_at, None
        else:
            if not self._epoch_set and self._started:
                self.epoch += 1  # used without set_epoch (plain DataLoader): a new shuffle each time
            start = 0
            self._new_epoch()
        self._epoch_set = False
        self._started = True
        self._pass_cache.clear()
        epoch = self.epoch
        self._drawn = start
        for p in range(start, len(self)):
            if self.epoch != epoch:
                return  # set_epoch(new) during a stale iteration: stop it
            self._drawn = p + 1
            yield self._index_at(p, epoch)

    def _index_at(self, p: int, epoch: int) -> int:
        seg = self._segment_at(p)
        m = seg.ids.numel()
        q = (p - seg.start) * self.num_replicas + self.rank  # position in the segment's shared stream
        j, i = divmod(q, m)
        if seg.mode == "ordered":
            return int(seg.ids[i])
        return int(seg.ids[self._pass(seg, epoch, j)[i]])

    def _segment_at(self, p: int) -> Segment:
        for seg in reversed(self._segments):
            if seg.start <= p:
                return seg
        return self._segments[0]

    def _pass(self, seg: Segment, epoch: int, j: int) -> torch.Tensor:
        key = (seg.uid, seg.start, epoch, j)
        if key not in self._pass_cache:
            if len(self._pass_cache) > 4:
                self._pass_cache.clear()
            g = torch.Generator().manual_seed(_mix(self.seed, epoch, seg.uid, j))
            m = seg.ids.numel()
            if seg.mode == "weighted":
                self._pass_cache[key] = torch.multinomial(seg.weights, m, replacement=True, generator=g)
            else:
                self._pass_cache[key] = torch.randperm(m, generator=g)
        return self._pass_cache[key]

    # ---- checkpointing ------------------------------------------------------------------
    def state_dict(self, consumed: Optional[int] = None) -> dict:
        """State for resuming at `consumed` (default: everything drawn so far counts as consumed)."""
        consumed = self._drawn if consumed is None else max(0, min(consumed, len(self)))
        if not self._started:
            consumed = 0
        segments = [
            s
            for i, s in enumerate(self._segments)
            if i + 1 == len(self._segments) or self._segments[i + 1].start > consumed
        ]
        return {
            "version": 1,
            "n": self.n,
            "seed": self.seed,
            "num_replicas": self.num_replicas,
            "epoch": self.epoch,
            "consumed": consumed,
            "started": self._started,
            "segments": [s.to_state() for s in segments],
            "next_uid": self._next_uid,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != self.n:
            raise ValueError(
                f"sampler state is for {state['n']} examples, this training set has {self.n}; "
                "the data (source, seq_len, max_train_tokens) must match the checkpoint's"
            )
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self._next_uid = int(state["next_uid"])
        segments = [Segment.from_state(s) for s in state["segments"]]
        consumed = int(state["consumed"])
        if state["num_replicas"] != self.num_replicas:  # positions are per rank: rescale them
            warnings.warn(
                f"resuming a sampler saved with {state['num_replicas']} ranks on {self.num_replicas}: "
                "the epoch continues at the same fraction, not the exact sample sequence",
                stacklevel=2,
            )
            scale = state["num_replicas"] / self.num_replicas
            consumed = int(consumed * scale)
            for s in segments:
                s.start = int(s.start * scale)
        self._segments = segments
        self._started = bool(state["started"])
        self._drawn = consumed
        self._resume_at = consumed if self._started else None
        self._epoch_set = True
        self._pass_cache.clear()


def _check_selection(ids: IdsLike, mode: str, weights: Optional[IdsLike], n: int):
    if mode not in MODES:
        raise ValueError(f"subset mode must be one of {MODES}, got {mode!r}")
    ids = torch.as_tensor(np.asarray(ids), dtype=torch.long).flatten().clone()
    if ids.numel() == 0:
        raise ValueError("an active subset needs at least one example")
    if int(ids.min()) < 0 or int(ids.max()) >= n:
        raise ValueError(f"subset ids must lie in [0, {n}), got [{int(ids.min())}, {int(ids.max())}]")
    if mode == "weighted":
        if weights is None:
            raise ValueError("mode 'weighted' needs weights")
        weights = torch.as_tensor(np.asarray(weights), dtype=torch.float64).flatten().clone()
        if weights.shape != ids.shape or not torch.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError("weights must be finite, >= 0, not all 0, one per id")
    elif weights is not None:
        raise ValueError(f"weights are only used with mode 'weighted', not {mode!r}")
    return ids, mode, weights


def _mix(*values: int) -> int:
    """One 63-bit seed from several integers (numpy's SeedSequence: well mixed, platform-independent)."""
    return int(np.random.SeedSequence([int(v) % (2**63) for v in values]).generate_state(1, np.uint64)[0] >> 1)
