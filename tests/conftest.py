"""Test-session setup that must happen before any test module imports its dependencies.

Without a GPU, the Triton kernels run in Triton's CPU interpreter. ``@triton.jit`` picks
interpreted or compiled at decoration time, including for Triton's own helpers such as
``tl.sum``, which are decorated when ``triton`` is first imported (possibly indirectly, through
torch or Lightning, by an earlier test module). So TRITON_INTERPRET is set here, first.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
