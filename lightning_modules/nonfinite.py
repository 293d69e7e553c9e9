"""NonFiniteWatch: remembers, on the device, the first step whose loss or gradient was not finite.

Reading a GPU value on the host (`bool(torch.isfinite(loss))`) waits for the GPU to finish, so a
check at every step serialises the host and the GPU. Here a step only records, with device
operations, whether and where it went wrong; the host reads that record (one synchronisation) at
check points chosen by the caller: every step on a CPU (where reading costs nothing), at logging
steps and before every checkpoint on a GPU.

The record is a float64 tensor [step, batch, loss, ce, what] of the FIRST bad event (step = -1 while
none); `what` indexes a name list (e.g. "train loss", "gradient of <param>").
"""

from __future__ import annotations

from typing import Optional

import torch


class NonFiniteWatch:
    def __init__(self):
        self.record: Optional[torch.Tensor] = None

    def note(
        self, bad: torch.Tensor, step: int, batch: int, loss: torch.Tensor, ce: torch.Tensor, what: torch.Tensor | int
    ) -> None:
        """Remember this event if `bad` (a 0-d bool tensor) holds and no earlier one was noted.
        No host synchronisation: `bad`, `loss`, `ce` and `what` stay on their device."""
        device = loss.device
        # Filled in place (fill kernels and device copies): torch.tensor(x, device=cuda) would copy
        # from the host, and a blocking host-to-device copy synchronises.
        event = torch.full((5,), float(step), dtype=torch.float64, device=device)
        event[1] = float(batch)
        event[2] = loss.detach().reshape(())
        event[3] = ce.detach().reshape(())
        event[4] = what if isinstance(what, torch.Tensor) else float(what)
        if self.record is None or self.record.device != device:
            self.record = torch.full((5,), -1.0, dtype=torch.float64, device=device)
        take = bad & (self.record[0] < 0)
        self.record = torch.where(take, event, self.record)

    def first(self) -> Optional[dict]:
        """The first noted event as {"step", "batch", "loss", "ce", "what"} (host values), or None.
        One host synchronisation."""
        if self.record is None:
            return None
        step, batch, loss, ce, what = self.record.tolist()
        if step < 0:
            return None
        return {"step": int(step), "batch": int(batch), "loss": loss, "ce": ce, "what": int(what)}
