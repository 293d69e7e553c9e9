"""The resolvent features of C chains per sequence, fused: (B, N, C) potentials in, (B, N, 2C) real
features out, no complex tensors and no layout copies around the BK-core.

Chain c of sequence b is the tridiagonal

    H = tridiag(b_c, -2 + v[b, :, c], b_c)     (the Laplacian's diagonal -2 added in the kernel)
    g = diagonal of (H - z_c I)^-1              causal g_i (positions 0..i) or bidirectional G_ii
    features[b, i, 2c], features[b, i, 2c + 1] = Re g_i, Im g_i

with couplings b (B, N-1, C) (sub = sup = b, k = b^2) or b = 1, and z_c = z_re[c] + i z_im[c]
(Im z_c > 0). This is ``resnet_bk.layers.resolvent.resolvent_features`` (the reference: permute
to (B*C, N) rows, one BK-core call, view_as_real) computed by the Triton kernels of ``bk_triton``
reading and writing the model's layouts directly; tests compare the two, values and gradients.

Entry points, as for ``bk_op``'s green_diagonal:

* eager: ``FusedResolventFeatures`` (an autograd Function around ``bk_triton.features_forward`` /
  ``features_backward``): the lowest-overhead path, CUDA-graph capturable (no host syncs);
* ``torch.compile`` (and any impl other than "triton"): the ``torch.library`` custom ops
  ``resnet_bk::resolvent_features`` / ``resnet_bk::resolvent_features_backward`` with fake
  implementations and an autograd formula, so a compiled model keeps the core in one graph. Their
  ``impl`` picks the body: "triton" (the kernels) or "scan"/"sequential" (``features_reference``,
  the PyTorch recurrences, so the op also runs, and is tested, on CPU).
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from resnet_bk.kernels.bk_op import HAS_TRITON, TRITON_DTYPES, interpret_mode
from resnet_bk.reference.bk_recurrences import METHODS, ResolventDiagonal, alpha_and_k

LAPLACIAN_DIAGONAL = -2.0
Shift = Union[torch.Tensor, float]


def _kernels():
    from resnet_bk.kernels import bk_triton

    return bk_triton


# --------------------------------------------------------------------------------------------
# Reference (the PyTorch recurrences; the body of the custom op for impl "scan"/"sequential")
# --------------------------------------------------------------------------------------------
class _Stash:
    """A stand-in autograd ctx, to run the reference's forward/backward below autograd."""

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


def _reference_rows(v, couplings, z_re, z_im):
    """(alpha, k) complex (B*C, N), (B*C, N-1): row b*C + c is chain c of sequence b."""
    b, n, c = v.shape
    real = torch.promote_types(v.dtype, torch.float32)
    diag = v.permute(0, 2, 1).reshape(b * c, n).to(real) + LAPLACIAN_DIAGONAL
    if couplings is None:
        sub = torch.ones((b * c, max(n - 1, 0)), dtype=real, device=v.device)
    else:
        sub = couplings.permute(0, 2, 1).reshape(b * c, n - 1).to(real)
    if isinstance(z_re, torch.Tensor):
        z = torch.complex(z_re.to(real), z_im.to(real)).repeat(b)[:, None]
    else:
        z = complex(z_re, z_im)
    return alpha_and_k(diag, sub, sub, z)


def _pairs(g: torch.Tensor, b: int, n: int, c: int) -> torch.Tensor:
    """(B*C, N) complex -> (B, N, 2C) real [Re g_c, Im g_c]."""
    return torch.view_as_real(g.view(b, c, n).permute(0, 2, 1)).reshape(b, n, 2 * c)


def features_reference(v, couplings, z_re, z_im, causal: bool, impl: str = "scan"):
    """(features (B, N, 2C), stash): the reference computation, ``impl`` "scan" or "sequential";
    float32 features (float64 for float64 v). stash holds what ``features_reference_backward`` needs."""
    b, n, c = v.shape
    alpha, k = _reference_rows(v, couplings, z_re, z_im)
    stash = _Stash()
    g = ResolventDiagonal.forward(stash, alpha, k, causal, impl)
    stash.causal, stash.method = causal, impl
    return _pairs(g, b, n, c), stash


def features_reference_backward(grad, v, couplings, z_re, z_im, causal: bool, impl: str, z_grad: bool):
    """(grad_v, grad_couplings or None, grad_z (C, 2) or None) of ``features_reference``."""
    b, n, c = v.shape
    _, stash = features_reference(v, couplings, z_re, z_im, causal, impl)
    real = torch.promote_types(v.dtype, torch.float32)
    gr = grad.to(real).view(b, n, c, 2)
    g_out = torch.complex(gr[..., 0], gr[..., 1]).permute(0, 2, 1).reshape(b * c, n)
    g_alpha, g_k = ResolventDiagonal.backward(stash, g_out)[:2]  # PyTorch's conjugate convention
    grad_v = g_alpha.real.view(b, c, n).permute(0, 2, 1).to(v.dtype).contiguous()
    grad_k = None
    if couplings is not None:  # k = b^2
        rows = couplings.permute(0, 2, 1).reshape(b * c, n - 1).to(real)
        grad_k = (2 * rows * g_k.real).view(b, c, n - 1).permute(0, 2, 1).to(couplings.dtype).contiguous()
    grad_z = None
    if z_grad:  # alpha = a - z: grad_z = -grad_alpha, summed over batch and positions
        gz = torch.view_as_real(-g_alpha).view(b, c, n, 2).sum((0, 2))
        grad_z = gz.to(torch.float32)
    return grad_v, grad_k, grad_z


# --------------------------------------------------------------------------------------------
# Eager path
# --------------------------------------------------------------------------------------------
class FusedResolventFeatures(torch.autograd.Function):
    """(v, couplings, z_re, z_im) -> features through the Triton kernels; exact adjoint in backward."""

    @staticmethod
    def forward(ctx, v, couplings, z_re, z_im, causal: bool):
        out, carries = _kernels().features_forward(v, couplings, z_re, z_im, causal, LAPLACIAN_DIAGONAL)
        z_tensor = isinstance(z_re, torch.Tensor)
        ctx.causal, ctx.z_const = causal, (None if z_tensor else (z_re, z_im))
        ctx.save_for_backward(v, couplings, z_re if z_tensor else None, z_im if z_tensor else None, carries)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        v, couplings, z_re, z_im, carries = ctx.saved_tensors
        need = ctx.needs_input_grad
        z_grad = z_re is not None and (need[2] or need[3])
        zr, zi = (z_re, z_im) if z_re is not None else ctx.z_const
        g_v, g_k, g_z = _kernels().features_backward(
            grad, v, couplings, zr, zi, carries, ctx.causal, z_grad, LAPLACIAN_DIAGONAL
        )
        g_zr = g_z[:, 0].to(z_re.dtype) if z_grad and need[2] else None
        g_zi = g_z[:, 1].to(z_im.dtype) if z_grad and need[3] else None
        return (g_v if need[0] else None, g_k if need[1] else None, g_zr, g_zi, None)


# --------------------------------------------------------------------------------------------
# torch.library custom ops (torch.compile, and impl "scan"/"sequential")
# --------------------------------------------------------------------------------------------
def _empty(v: torch.Tensor) -> torch.Tensor:
    return v.new_empty((0,), dtype=torch.float32)


def _out_dtype(v: torch.Tensor, impl: str) -> torch.dtype:
    return torch.float64 if (impl != "triton" and v.dtype == torch.float64) else torch.float32


@torch.library.custom_op("resnet_bk::resolvent_features", mutates_args=())
def resolvent_features_op(
    v: torch.Tensor,
    couplings: Optional[torch.Tensor],
    z_re: Optional[torch.Tensor],
    z_im: Optional[torch.Tensor],
    z_re_const: float,
    z_im_const: float,
    causal: bool,
    impl: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, carries): features as ``resolvent_features_fused``; carries the kernels' saved
    chunk states (float32 (B*C, carry_slots(N), 8) for impl "triton", empty otherwise).
    z is (z_re, z_im), or the constants when z_re is None."""
    zr, zi = (z_re, z_im) if z_re is not None else (z_re_const, z_im_const)
    if impl == "triton":
        return _kernels().features_forward(v, couplings, zr, zi, causal, LAPLACIAN_DIAGONAL)
    return features_reference(v, couplings, zr, zi, causal, impl)[0], _empty(v)


@resolvent_features_op.register_fake
def _resolvent_features_fake(v, couplings, z_re, z_im, z_re_const, z_im_const, causal, impl):
    b, n, c = v.shape
    out = v.new_empty((b, n, 2 * c), dtype=_out_dtype(v, impl))
    if impl == "triton":
        return out, v.new_empty((b * c, _kernels().carry_slots(n), 8), dtype=torch.float32)
    return out, _empty(v)


@torch.library.custom_op("resnet_bk::resolvent_features_backward", mutates_args=())
def resolvent_features_backward_op(
    grad: torch.Tensor,
    v: torch.Tensor,
    couplings: Optional[torch.Tensor],
    z_re: Optional[torch.Tensor],
    z_im: Optional[torch.Tensor],
    z_re_const: float,
    z_im_const: float,
    causal: bool,
    impl: str,
    carries: torch.Tensor,
    z_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_v, grad_couplings, grad_z): grad_couplings empty when couplings is None, grad_z
    float32 (C, 2) [d/d Re z_c, d/d Im z_c] when z_grad, else empty."""
    zr, zi = (z_re, z_im) if z_re is not None else (z_re_const, z_im_const)
    if impl == "triton":
        g_v, g_k, g_z = _kernels().features_backward(grad, v, couplings, zr, zi, carries, causal, z_grad)
    else:
        g_v, g_k, g_z = features_reference_backward(grad, v, couplings, zr, zi, causal, impl, z_grad)
    return g_v, (g_k if g_k is not None else _empty(v)), (g_z if g_z is not None else _empty(v))


@resolvent_features_backward_op.register_fake
def _resolvent_features_backward_fake(
    grad, v, couplings, z_re, z_im, z_re_const, z_im_const, causal, impl, carries, z_grad
):
    g_k = torch.empty_like(couplings) if couplings is not None else _empty(v)
    g_z = v.new_empty((v.shape[2], 2), dtype=torch.float32) if z_grad else _empty(v)
    return torch.empty_like(v), g_k, g_z


def _setup_context(ctx, inputs, output):
    v, couplings, z_re, z_im, z_re_const, z_im_const, causal, impl = inputs
    ctx.save_for_backward(v, couplings, z_re, z_im, output[1])
    ctx.args = (z_re_const, z_im_const, causal, impl)


def _backward(ctx, grad, _grad_carries):
    v, couplings, z_re, z_im, carries = ctx.saved_tensors
    z_re_const, z_im_const, causal, impl = ctx.args
    need = ctx.needs_input_grad
    z_grad = z_re is not None and (need[2] or need[3])
    g_v, g_k, g_z = torch.ops.resnet_bk.resolvent_features_backward(
        grad, v, couplings, z_re, z_im, z_re_const, z_im_const, causal, impl, carries, z_grad
    )
    g_zr = g_z[:, 0].to(z_re.dtype) if z_grad and need[2] else None
    g_zi = g_z[:, 1].to(z_im.dtype) if z_grad and need[3] else None
    return (g_v, g_k if couplings is not None else None, g_zr, g_zi, None, None, None, None)


resolvent_features_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------
def _check(v, couplings, z_re, z_im, impl: str) -> None:
    """Shapes, dtypes and a Python z (no device values read: no host sync)."""
    if v.dim() != 3 or v.shape[1] < 1:
        raise ValueError(f"resolvent_features_fused: v must have shape (B, N, C) with N >= 1, got {tuple(v.shape)}.")
    b, n, c = v.shape
    if couplings is not None and tuple(couplings.shape) != (b, n - 1, c):
        raise ValueError(
            f"resolvent_features_fused: couplings must have shape (B, N-1, C) = {(b, n - 1, c)}, "
            f"got {tuple(couplings.shape)} (or pass None for b = 1)."
        )
    if isinstance(z_re, torch.Tensor) != isinstance(z_im, torch.Tensor):
        raise ValueError("resolvent_features_fused: z_re and z_im must both be (C,) tensors or both Python floats.")
    if isinstance(z_re, torch.Tensor):
        if tuple(z_re.shape) != (c,) or tuple(z_im.shape) != (c,) or z_re.is_complex() or z_im.is_complex():
            raise ValueError(
                f"resolvent_features_fused: z_re and z_im must be real (C,) = ({c},) tensors, "
                f"got {tuple(z_re.shape)} {z_re.dtype} and {tuple(z_im.shape)} {z_im.dtype}."
            )
    elif not float(z_im) > 0:
        raise ValueError(f"resolvent_features_fused: Im z must be > 0, got z_im = {z_im} (e.g. z_im = 1.0).")
    if impl == "triton":
        if not HAS_TRITON:
            raise RuntimeError("resolvent_features_fused(impl='triton'): Triton is not installed; use impl='scan'.")
        if not (v.is_cuda or interpret_mode()):
            raise ValueError(
                f"resolvent_features_fused(impl='triton') needs CUDA tensors (got {v.device}); use impl='scan' on CPU."
            )
        for name, t in (("v", v), ("couplings", couplings)):
            if t is not None and t.dtype not in TRITON_DTYPES:
                raise ValueError(
                    f"resolvent_features_fused(impl='triton'): {name} is {t.dtype}; the kernels take "
                    "float32/bfloat16/float16 (and compute in float32). Use impl='scan' for float64."
                )
    elif impl not in METHODS:
        raise ValueError(f"resolvent_features_fused: unknown impl {impl!r}; use 'triton', 'scan' or 'sequential'.")


def resolvent_features_fused(
    v: torch.Tensor,
    couplings: Optional[torch.Tensor],
    z_re: Shift,
    z_im: Shift,
    causal: bool = True,
    impl: str = "triton",
) -> torch.Tensor:
    """The real features of C resolvent chains per sequence, without complex tensors or layout copies.

    Args:
        v: (B, N, C) real potentials, float32/bfloat16/float16 (made contiguous if it is not).
        couplings: (B, N-1, C) real b_i joining positions i and i+1, or None (b = 1, the Laplacian).
        z_re, z_im: the shift of each channel, real (C,) tensors (gradients flow to them), or
            Python floats for one z of every channel. Im z > 0 (tensors are not checked: no host sync).
        causal: g_i (positions 0..i only) or the bidirectional G_ii (sees the future).
        impl: "triton" (the kernels; CUDA, or Triton's interpreter) or "scan"/"sequential" (the
            PyTorch reference inside the same custom op).
    Returns:
        (B, N, 2C) float32: [Re g_c, Im g_c] for c = 0..C-1 at each position (the layout of
        ``resolvent_features``).
    """
    _check(v, couplings, z_re, z_im, impl)
    if impl == "triton" and not torch.compiler.is_compiling():
        return FusedResolventFeatures.apply(v, couplings, z_re, z_im, causal)
    if isinstance(z_re, torch.Tensor):
        z_args = (z_re, z_im, 0.0, 0.0)
    else:
        z_args = (None, None, float(z_re), float(z_im))
    return torch.ops.resnet_bk.resolvent_features(v, couplings, *z_args, causal, impl)[0]
