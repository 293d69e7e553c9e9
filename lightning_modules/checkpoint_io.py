"""AtomicCheckpointIO: checkpoints written whole or not at all, and never with non-finite weights.

Lightning's TorchCheckpointIO serialises to memory and then writes into the target file itself, so
a crash (or a full disk) during the write leaves a truncated last.ckpt where a good one stood. Here
the bytes go to a temporary file in the same folder, are flushed to disk (fsync), and only then
os.replace()-d over the target: a reader sees the old file or the new one, never a mixture, and a
crash at any point leaves the previous checkpoint intact (the temporary file is removed on error).

Before writing, every floating tensor of the model state is checked: non-finite weights raise
FloatingPointError and the previous checkpoint stays as it was (LanguageModel stops or skips a
non-finite step before it is applied, so this is the last line of defence, not the first).

The CLI installs it on every trainer whose strategy uses the default TorchCheckpointIO;
elsewhere pass Trainer(plugins=[AtomicCheckpointIO()]).

`read_checkpoint(path)` is the reading side for --ckpt_path: the checkpoint, or a one-line
ValueError for a file that is empty, truncated, not a checkpoint, or not a Lightning checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO


def first_nonfinite(state_dict: dict[str, Any]) -> Optional[str]:
    """Name of the first floating tensor in `state_dict` with a NaN or Inf, else None."""
    for name, value in state_dict.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return name
    return None


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO that writes via temp file + fsync + os.replace and refuses non-finite weights."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint does not take storage_options.")
        bad = first_nonfinite(checkpoint.get("state_dict", {}))
        if bad is not None:
            raise FloatingPointError(
                f"refusing to write {str(path)!r}: weight {bad} is not finite (global step {checkpoint.get('global_step')}); "
                "the previous checkpoint is kept. Try a lower lr or model.init_args.nonfinite: skip."
            )
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


def read_checkpoint(path: _PATH) -> dict[str, Any]:
    """The Lightning checkpoint at `path` (tensors memory-mapped where the format allows), or a
    one-line ValueError saying what the file is instead: empty, truncated or corrupt, not a
    checkpoint, or a checkpoint without Lightning's training state.

    Loads with weights_only=False, as Lightning does for a checkpoint the user names."""
    path = Path(path)
    fix = "pass another .ckpt (e.g. the other checkpoint beside it) or drop --ckpt_path to start fresh"
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"checkpoint {str(path)!r} is empty (0 bytes; its writer was cut off?); {fix}")
    with open(path, "rb") as f:
        head = f.read(4)
    try:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)  # legacy (non-zip) format
    except Exception as err:  # noqa: BLE001 - whatever torch.load says, the file is not a usable checkpoint
        reason = (str(err).splitlines() or [type(err).__name__])[0].split(". ")[0]  # torch's first sentence
        if head.startswith(b"PK"):  # torch.save's zip container
            raise ValueError(
                f"checkpoint {str(path)!r} is truncated or corrupt ({size} bytes; {reason}); {fix}"
            ) from None
        raise ValueError(f"{str(path)!r} is not a checkpoint (torch.load: {reason}); {fix}") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "global_step" not in checkpoint:
        what = (
            f"a dict with keys {sorted(checkpoint)[:4]}"
            if isinstance(checkpoint, dict)
            else f"a {type(checkpoint).__name__}"
        )
        raise ValueError(
            f"{str(path)!r} is not a Lightning checkpoint (it holds {what}, no state_dict and global_step; "
            f"a bare model state_dict cannot resume a run); {fix}"
        )
    return checkpoint
