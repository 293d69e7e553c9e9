"""The reduced-chain sweep of learned sparsity: its PyTorch reference, the Triton path, and the glue.

For R rows of K kept positions (resnet_bk.reduced_chain derives the inputs), with complex
alpha_r, beta_r and k_prev_r = k'_{r-1} (k_prev[:, 0] unused):

    t_r = alpha_r - k_prev_r gs_{r-1},   g_r = 1 / t_r,   gs_r = 1 / (t_r + beta_r)   (gs_{-1} = 0)

`reduced_sweep` returns g (R, K), zero at the padding entries r >= lengths[row]. Paths:

* ``reduced_sweep_reference``: the specification, through the BK-core reference's exact-adjoint
  recurrence (``ResolventDiagonal``, complex couplings allowed) on d~ = t + beta, then the read-out;
  method "scan" or "sequential"; any float/complex precision;
* ``"triton"``: ``resnet_bk.kernels.reduced_triton`` (complex64, float32 arithmetic), eager through
  the autograd Function ``TritonReducedSweep``;
* under ``torch.compile`` the Triton path runs as the custom op ``resnet_bk::reduced_sweep`` (fake
  implementation and registered backward), so the sparse layer compiles without a graph break; the
  reference is traced as it is (its autograd Function included).

Triton is imported on first use only (tests set TRITON_INTERPRET=1 first; CPU installs need none).
"""

from __future__ import annotations

import torch

from resnet_bk.kernels.bk_op import HAS_TRITON, interpret_mode
from resnet_bk.reference.bk_recurrences import ResolventDiagonal

REFERENCE_METHODS = ("scan", "sequential")


def _kernels():
    from resnet_bk.kernels import reduced_triton

    return reduced_triton


def reduced_sweep_reference(
    alpha: torch.Tensor, beta: torch.Tensor, k_prev: torch.Tensor, lengths: torch.Tensor, method: str = "scan"
) -> torch.Tensor:
    """g (R, K), complex like alpha, zero at r >= lengths; differentiable (exact adjoint inside)."""
    r, k = alpha.shape
    if k == 0:
        return alpha.new_zeros((r, 0))
    k_red = k_prev[:, 1:]
    g_shift = ResolventDiagonal.apply(alpha + beta, k_red, True, method)  # gs = 1 / d~
    first = alpha[:, :1].reciprocal()
    rest = (alpha[:, 1:] - k_red * g_shift[:, :-1]).reciprocal()
    g = torch.cat([first, rest], dim=1)
    valid = torch.arange(k, device=alpha.device)[None, :] < lengths[:, None]
    return torch.where(valid, g, torch.zeros_like(g))


def check_triton_inputs(alpha: torch.Tensor) -> None:
    """Raise a clear error where the Triton kernels cannot run."""
    if not HAS_TRITON:
        raise RuntimeError("reduced_sweep(method='triton'): Triton is not installed; use method='scan'.")
    if not (alpha.is_cuda or interpret_mode()):
        raise ValueError(
            f"reduced_sweep(method='triton') needs CUDA tensors (got {alpha.device}); use method='scan' on CPU "
            "(or set TRITON_INTERPRET=1 before importing Triton to run the kernels in its interpreter)."
        )
    if alpha.dtype == torch.complex128:
        raise ValueError(
            "reduced_sweep(method='triton'): the kernels compute in complex64; use method='scan' for float64."
        )


# --------------------------------------------------------------------------------------------
# Eager path
# --------------------------------------------------------------------------------------------
class TritonReducedSweep(torch.autograd.Function):
    """(alpha, beta, k_prev, lengths) -> g through the Triton kernels; exact adjoint in backward."""

    @staticmethod
    def forward(ctx, alpha, beta, k_prev, lengths):
        g, gs = _kernels().forward(alpha, beta, k_prev, lengths)
        ctx.save_for_backward(g, gs, k_prev, lengths)
        return g

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        g, gs, k_prev, lengths = ctx.saved_tensors
        g_alpha, g_beta, g_kp = _kernels().backward(grad, g, gs, k_prev, lengths)
        return g_alpha, g_beta, g_kp, None


# --------------------------------------------------------------------------------------------
# torch.library custom ops (used under torch.compile)
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("resnet_bk::reduced_sweep", mutates_args=())
def reduced_sweep_op(
    alpha: torch.Tensor, beta: torch.Tensor, k_prev: torch.Tensor, lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(g, gs) of the Triton forward: g as reduced_sweep, gs the shifted sweep saved for backward."""
    return _kernels().forward(alpha, beta, k_prev, lengths)


@reduced_sweep_op.register_fake
def _reduced_sweep_fake(alpha, beta, k_prev, lengths):
    g = alpha.new_empty(alpha.shape, dtype=torch.complex64)
    return g, torch.empty_like(g)


@torch.library.custom_op("resnet_bk::reduced_sweep_backward", mutates_args=())
def reduced_sweep_backward_op(
    grad: torch.Tensor, g: torch.Tensor, gs: torch.Tensor, k_prev: torch.Tensor, lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_alpha, grad_beta, grad_k_prev) of reduced_sweep_op's g (the Triton backward)."""
    return _kernels().backward(grad, g, gs, k_prev, lengths)


@reduced_sweep_backward_op.register_fake
def _reduced_sweep_backward_fake(grad, g, gs, k_prev, lengths):
    return tuple(g.new_empty(g.shape) for _ in range(3))


def _setup_context(ctx, inputs, output):
    _alpha, _beta, k_prev, lengths = inputs
    ctx.save_for_backward(output[0], output[1], k_prev, lengths)


def _backward(ctx, grad, _grad_gs):
    g, gs, k_prev, lengths = ctx.saved_tensors
    g_alpha, g_beta, g_kp = torch.ops.resnet_bk.reduced_sweep_backward(grad, g, gs, k_prev, lengths)
    return g_alpha, g_beta, g_kp, None


reduced_sweep_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Entry point used by resnet_bk.reduced_chain
# --------------------------------------------------------------------------------------------
def reduced_sweep(
    alpha: torch.Tensor, beta: torch.Tensor, k_prev: torch.Tensor, lengths: torch.Tensor, method: str = "scan"
) -> torch.Tensor:
    """g (R, K) of the reduced sweep, zero at r >= lengths[row].

    Args:
        alpha, beta, k_prev: complex (R, K) (k_prev[:, 0] unused); complex64 for "triton".
        lengths: (R,) integer, the number of real entries of each row (the padding follows them).
        method: "scan" / "sequential" (the reference) or "triton" (the kernels: CUDA, or Triton's
            interpreter; under torch.compile the custom op).
    Returns:
        (R, K) complex: complex64 for "triton", alpha's dtype otherwise.
    """
    if method not in (*REFERENCE_METHODS, "triton"):
        raise ValueError(f"reduced_sweep: unknown method {method!r}; use 'scan', 'sequential' or 'triton'.")
    if method == "triton":
        check_triton_inputs(alpha)
        alpha, beta, k_prev = (t.to(torch.complex64) for t in (alpha, beta, k_prev))
        if torch.compiler.is_compiling():
            return torch.ops.resnet_bk.reduced_sweep(alpha, beta, k_prev, lengths)[0]
        return TritonReducedSweep.apply(alpha, beta, k_prev, lengths)
    return reduced_sweep_reference(alpha, beta, k_prev, lengths, method)
