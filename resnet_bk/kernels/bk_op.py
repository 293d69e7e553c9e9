"""Glue between ``resnet_bk.bk_core.green_diagonal`` (the dispatch above it) and the fused Triton kernels.

Two entry points compute the same function with the same exact adjoint:

* eager: ``TritonGreen`` (a ``torch.autograd.Function`` around ``bk_triton.forward/backward``),
  the lowest-overhead path and the one CUDA graphs capture;
* ``torch.compile``: the ``torch.library`` custom ops ``resnet_bk::green_diagonal`` and
  ``resnet_bk::green_diagonal_backward`` with fake (meta) implementations and a registered
  autograd formula, so a compiled model keeps the BK-core inside one graph (no graph break).
  Their ``impl`` argument picks the body: "triton" (the kernels) or "scan"/"sequential" (the
  PyTorch reference, so the op also works, and is tested, on CPU).

Nothing here imports Triton at module import: ``bk_triton`` is loaded on first use (so tests can
set TRITON_INTERPRET=1 first, and CPU-only installs never need Triton).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

from resnet_bk.reference.bk_recurrences import ResolventDiagonal, alpha_and_k

HAS_TRITON = importlib.util.find_spec("triton") is not None
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpret_mode() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kernels():
    from resnet_bk.kernels import bk_triton

    return bk_triton


def check_triton_inputs(diag: torch.Tensor, sub: torch.Tensor, sup: torch.Tensor) -> None:
    """Raise a clear error where the Triton kernels cannot run these inputs."""
    if not HAS_TRITON:
        raise RuntimeError("green_diagonal(method='triton'): Triton is not installed; use method='scan'.")
    if not (diag.is_cuda or interpret_mode()):
        raise ValueError(
            f"green_diagonal(method='triton') needs CUDA tensors (got {diag.device}); use method='scan' on CPU "
            "(or set TRITON_INTERPRET=1 before importing Triton to run the kernels in its interpreter)."
        )
    for name, t in (("diag", diag), ("sub", sub), ("sup", sup)):
        if t.dtype not in TRITON_DTYPES:
            raise ValueError(
                f"green_diagonal(method='triton'): {name} is {t.dtype}; the kernels take float32/bfloat16/float16 "
                "and compute in float32. Use method='scan' for float64."
            )


def _split_z(z):
    """(tensor or None, re, im) for the custom op's signature."""
    if isinstance(z, torch.Tensor):
        return z, 0.0, 0.0
    z = complex(z)
    return None, z.real, z.imag


# --------------------------------------------------------------------------------------------
# Eager path
# --------------------------------------------------------------------------------------------
class TritonGreen(torch.autograd.Function):
    """(diag, sub, sup, z) -> g or G through the Triton kernels; exact adjoint in backward."""

    @staticmethod
    def forward(ctx, diag, sub, sup, z, causal: bool):
        out, carries = _kernels().forward(diag, sub, sup, z, causal)
        z_tensor = z if isinstance(z, torch.Tensor) else None
        ctx.causal, ctx.z_const = causal, (None if z_tensor is not None else z)
        ctx.save_for_backward(diag, sub, sup, carries, z_tensor)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        diag, sub, sup, carries, z_tensor = ctx.saved_tensors
        z = z_tensor if z_tensor is not None else ctx.z_const
        need_z = z_tensor is not None and ctx.needs_input_grad[3]
        g_diag, g_sub, g_sup, g_alpha = _kernels().backward(grad, diag, sub, sup, z, carries, ctx.causal, need_z)
        g_z = (-g_alpha).sum_to_size(z_tensor.shape).to(z_tensor.dtype) if need_z else None
        need = ctx.needs_input_grad
        return (g_diag if need[0] else None, g_sub if need[1] else None, g_sup if need[2] else None, g_z, None)


# --------------------------------------------------------------------------------------------
# torch.library custom ops (used under torch.compile)
# --------------------------------------------------------------------------------------------
class _Stash:
    """A stand-in autograd ctx, to run the reference's verified forward/backward below autograd."""

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


def _torch_reference(diag, sub, sup, z, causal: bool, impl: str):
    alpha, k = alpha_and_k(diag, sub, sup, z)
    stash = _Stash()
    out = ResolventDiagonal.forward(stash, alpha, k, causal, impl)
    return out, stash


def _empty_carries(diag: torch.Tensor) -> torch.Tensor:
    return diag.new_empty((0,), dtype=torch.float32)


@torch.library.custom_op("resnet_bk::green_diagonal", mutates_args=())
def green_diagonal_op(
    diag: torch.Tensor,
    sub: torch.Tensor,
    sup: torch.Tensor,
    z: Optional[torch.Tensor],
    z_re: float,
    z_im: float,
    causal: bool,
    impl: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, carries): out as green_diagonal; carries the kernels' saved per-chunk states
    (float32 (B, carry_slots(N), 8) for impl 'triton', empty otherwise)."""
    zz = z if z is not None else complex(z_re, z_im)
    if impl == "triton":
        return _kernels().forward(diag, sub, sup, zz, causal)
    out, _ = _torch_reference(diag, sub, sup, zz, causal, impl)
    return out, _empty_carries(diag)


@green_diagonal_op.register_fake
def _green_diagonal_fake(diag, sub, sup, z, z_re, z_im, causal, impl):
    b, n = diag.shape
    if impl == "triton":
        out = diag.new_empty((b, n), dtype=torch.complex64)
        return out, diag.new_empty((b, _kernels().carry_slots(n), 8), dtype=torch.float32)
    cdtype = torch.complex128 if diag.dtype == torch.float64 else torch.complex64
    return diag.new_empty((b, n), dtype=cdtype), _empty_carries(diag)


@torch.library.custom_op("resnet_bk::green_diagonal_backward", mutates_args=())
def green_diagonal_backward_op(
    grad: torch.Tensor,
    diag: torch.Tensor,
    sub: torch.Tensor,
    sup: torch.Tensor,
    z: Optional[torch.Tensor],
    z_re: float,
    z_im: float,
    causal: bool,
    impl: str,
    carries: torch.Tensor,
    z_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_diag, grad_sub, grad_sup, grad_alpha); grad_alpha is empty unless z_grad."""
    zz = z if z is not None else complex(z_re, z_im)
    if impl == "triton":
        g_diag, g_sub, g_sup, g_alpha = _kernels().backward(grad, diag, sub, sup, zz, carries, causal, z_grad)
        if g_alpha is None:
            g_alpha = diag.new_empty((0,), dtype=torch.complex64)
        return g_diag, g_sub.contiguous(), g_sup.contiguous(), g_alpha
    out, stash = _torch_reference(diag, sub, sup, zz, causal, impl)
    stash.causal, stash.method = causal, impl
    g_alpha, g_k = ResolventDiagonal.backward(stash, grad.to(out.dtype))[:2]
    g_kr = g_k.real
    g_diag = g_alpha.real.to(diag.dtype).clone()
    g_sub = (g_kr * sup.to(g_kr.dtype)).to(sub.dtype)
    g_sup = (g_kr * sub.to(g_kr.dtype)).to(sup.dtype)
    g_alpha = g_alpha.clone() if z_grad else diag.new_empty((0,), dtype=out.dtype)
    return g_diag, g_sub, g_sup, g_alpha


@green_diagonal_backward_op.register_fake
def _green_diagonal_backward_fake(grad, diag, sub, sup, z, z_re, z_im, causal, impl, carries, z_grad):
    cdtype = torch.complex128 if (impl != "triton" and diag.dtype == torch.float64) else torch.complex64
    g_alpha = diag.new_empty(diag.shape if z_grad else (0,), dtype=cdtype)
    return torch.empty_like(diag), torch.empty_like(sub), torch.empty_like(sup), g_alpha


def _setup_context(ctx, inputs, output):
    diag, sub, sup, z, z_re, z_im, causal, impl = inputs
    ctx.save_for_backward(diag, sub, sup, z, output[1])
    ctx.args = (z_re, z_im, causal, impl)
    ctx.z_is_tensor = z is not None


def _backward(ctx, grad, _grad_carries):
    diag, sub, sup, z, carries = ctx.saved_tensors
    z_re, z_im, causal, impl = ctx.args
    need_z = ctx.z_is_tensor and ctx.needs_input_grad[3]
    g_diag, g_sub, g_sup, g_alpha = torch.ops.resnet_bk.green_diagonal_backward(
        grad, diag, sub, sup, z, z_re, z_im, causal, impl, carries, need_z
    )
    g_z = (-g_alpha).sum_to_size(z.shape).to(z.dtype) if need_z else None
    return g_diag, g_sub, g_sup, g_z, None, None, None, None


green_diagonal_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Entry point used by bk_core.green_diagonal
# --------------------------------------------------------------------------------------------
def fused_green_diagonal(diag, sub, sup, z, causal: bool, impl: str) -> torch.Tensor:
    """The custom op under torch.compile (any impl); the eager autograd Function otherwise
    (impl 'triton' only: eager 'scan'/'sequential' stay on bk_core's own path)."""
    if impl == "triton":
        check_triton_inputs(diag, sub, sup)
    if torch.compiler.is_compiling():
        zt, z_re, z_im = _split_z(z)
        out, _ = torch.ops.resnet_bk.green_diagonal(diag, sub, sup, zt, z_re, z_im, causal, impl)
        return out
    if impl != "triton":
        raise ValueError(f"fused_green_diagonal: eager impl must be 'triton', got {impl!r}")
    return TritonGreen.apply(diag, sub, sup, z, causal)
