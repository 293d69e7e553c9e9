"""BK-core: the diagonal of the resolvent (H - zI)^-1 of a tridiagonal H, in O(N).

H has real diagonal a_i (i = 0..N-1), sub-diagonal c_i = H[i+1, i] and super-diagonal
b_i = H[i, i+1] (i = 0..N-2). With alpha_i = a_i - z and k_i = b_i c_i, the stable
(continued-fraction / Riccati) recurrences are

    d_0 = alpha_0,        d_i = alpha_i - k_{i-1} / d_{i-1}        (left to right)
    e_{N-1} = alpha_{N-1}, e_i = alpha_i - k_i / e_{i+1}            (right to left)

    causal:         g_i  = 1 / d_i                    = [(H - zI) restricted to 0..i]^-1_ii
    bidirectional:  G_ii = 1 / (d_i + e_i - alpha_i)  = [(H - zI)^-1]_ii

If every k_i >= 0 then Im d_i <= -Im z, so |g_i|, |G_ii| <= 1 / Im z: nothing is clamped.
The derivation and the exact adjoint used in backward: docs/design.md section 2.

``green_diagonal`` is the one public op; this module only dispatches it:
  * ``"scan"`` / ``"sequential"``: the pure-PyTorch reference (``resnet_bk.reference.bk_recurrences``,
    a log-depth scan or a loop over positions, exact adjoint in backward), the default on CPU;
  * ``"triton"``: the fused kernels (``resnet_bk.kernels.bk_triton``, tested against the reference),
    chosen by ``"auto"`` on CUDA when Triton is installed; ``use_method`` forces a path.
Under ``torch.compile`` every method runs as the ``torch.library`` custom op
``resnet_bk::green_diagonal`` (``resnet_bk.kernels.bk_op``), so the core never breaks a graph.
Imports point one way: this module -> kernels.bk_op -> reference (a leaf).
"""

from __future__ import annotations

import contextlib
from typing import Literal, Optional

import torch

from resnet_bk.kernels import bk_op
from resnet_bk.reference.bk_recurrences import (
    COMPLEX_OF,
    METHODS,
    ComplexLike,
    ResolventDiagonal,
    alpha_and_k,
    dense_green_diagonal,
    laplacian_couplings,
    resolvent_bound,
    tridiagonal_matrix,
)

Method = Literal["auto", "scan", "sequential", "triton"]


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def _check_inputs(
    diag: torch.Tensor, sub: torch.Tensor, sup: torch.Tensor, z: ComplexLike, check_values: bool = True
) -> None:
    """Shapes and dtypes always; with check_values also finiteness and Im z > 0 of tensors, which
    reads device values (a host sync: not allowed under torch.compile or CUDA-graph capture)."""
    if diag.dim() != 2:
        raise ValueError(f"green_diagonal: diag must have shape (B, N), got {tuple(diag.shape)}.")
    b, n = diag.shape
    if n < 1:
        raise ValueError("green_diagonal: the sequence is empty (N = 0); pass at least one position.")
    for name, t in (("sub", sub), ("sup", sup)):
        if tuple(t.shape) != (b, n - 1):
            raise ValueError(
                f"green_diagonal: {name} must have shape (B, N-1) = {(b, n - 1)} for diag of shape {(b, n)}, "
                f"got {tuple(t.shape)}."
            )
    for name, t in (("diag", diag), ("sub", sub), ("sup", sup)):
        if t.is_complex() or not t.is_floating_point():
            raise ValueError(f"green_diagonal: {name} must be a real floating tensor, got {t.dtype}.")
        if t.dtype not in COMPLEX_OF and t.dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"green_diagonal: unsupported dtype {t.dtype} for {name}.")
        if check_values and not bool(torch.isfinite(t).all()):
            raise ValueError(f"green_diagonal: {name} contains NaN or Inf; check the layer that produced it.")
    if not check_values:
        if not isinstance(z, torch.Tensor) and not (isinstance(z, complex) and z.imag > 0):
            raise ValueError(f"green_diagonal: Im z must be > 0 (got z = {z!r}), e.g. z = 1j.")
        return
    im = torch.as_tensor(z).imag if (isinstance(z, torch.Tensor) and z.is_complex()) or isinstance(z, complex) else None
    if im is None or not bool((torch.as_tensor(im) > 0).all()):
        raise ValueError(
            f"green_diagonal: Im z must be > 0 (got z = {z!r}); the resolvent needs a spectral shift off the real axis, "
            "e.g. z = 1j."
        )
    if isinstance(z, torch.Tensor) and not bool(torch.isfinite(torch.view_as_real(z)).all()):
        raise ValueError("green_diagonal: z contains NaN or Inf.")


_METHOD_OVERRIDE: Optional[str] = None


@contextlib.contextmanager
def use_method(method: Optional[str]):
    """Force what ``method="auto"`` resolves to inside the block, e.g. ``use_method("scan")`` to run
    the PyTorch path on CUDA, or ``use_method("triton")``; ``None`` restores the default choice.
    Explicit ``method=`` arguments are not affected."""
    global _METHOD_OVERRIDE
    if method not in (None, "scan", "sequential", "triton"):
        raise ValueError(f"use_method: unknown method {method!r}; use 'scan', 'sequential', 'triton' or None.")
    old, _METHOD_OVERRIDE = _METHOD_OVERRIDE, method
    try:
        yield
    finally:
        _METHOD_OVERRIDE = old


def resolve_method(method: str, diag: torch.Tensor) -> str:
    if method == "auto":
        if _METHOD_OVERRIDE is not None:
            return _METHOD_OVERRIDE
        if diag.is_cuda and bk_op.HAS_TRITON and diag.dtype in bk_op.TRITON_DTYPES:
            return "triton"
        return "scan"
    if method not in METHODS and method != "triton":
        raise ValueError(f"green_diagonal: unknown method {method!r}; use 'auto', 'scan', 'sequential' or 'triton'.")
    return method


def _tracing_or_capturing(t: torch.Tensor) -> bool:
    """Under torch.compile tracing or CUDA-graph capture, where a host sync is an error."""
    if torch.compiler.is_compiling():
        return True
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def green_diagonal(
    diag: torch.Tensor,
    sub: torch.Tensor,
    sup: torch.Tensor,
    z: ComplexLike = 1j,
    causal: bool = True,
    *,
    method: Method = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """Diagonal of the resolvent of a tridiagonal matrix, causal or bidirectional.

    Args:
        diag: (B, N) real, the diagonal a_i of H.
        sub: (B, N-1) real, sub-diagonal H[i+1, i].
        sup: (B, N-1) real, super-diagonal H[i, i+1].
        z: spectral shift with Im z > 0: a Python complex, or a complex tensor broadcastable to
            (B, N) (e.g. a learnable scalar); gradients flow to it when it requires grad.
        causal: True for g_i = [(H - zI)_{0..i}^-1]_ii, which depends on positions 0..i only (use it
            for next-token prediction); False for the full diagonal G_ii = [(H - zI)^-1]_ii, which
            depends on every position.
        method: "scan" (log-depth), "sequential" (loop over positions), "triton" (the fused kernels
            of ``resnet_bk.kernels.bk_triton``: CUDA, float32/bf16/fp16 inputs, float32 arithmetic) or
            "auto" ("triton" on CUDA when Triton is installed and the input is not float64, else
            "scan"; ``use_method`` overrides this choice).
        validate: check shapes, finiteness and Im z > 0. The value checks cost a host sync on GPU;
            under torch.compile tracing and CUDA-graph capture they are skipped (shapes, dtypes and a
            Python z are still checked), since a sync there is an error.

    Returns:
        (B, N) complex64 for float32/bf16/fp16 input (and always for "triton"), complex128 for
        float64 input.
    """
    if validate:
        _check_inputs(diag, sub, sup, z, check_values=not _tracing_or_capturing(diag))
    method = resolve_method(method, diag)
    if method == "triton" or torch.compiler.is_compiling():
        # Under torch.compile every method runs as one custom op (no graph break around the core).
        return bk_op.fused_green_diagonal(diag, sub, sup, z, causal, method)
    alpha, k = alpha_and_k(diag, sub, sup, z)
    return ResolventDiagonal.apply(alpha, k, causal, method)


__all__ = [
    "green_diagonal",
    "use_method",
    "resolve_method",
    "dense_green_diagonal",
    "laplacian_couplings",
    "resolvent_bound",
    "tridiagonal_matrix",
    "ComplexLike",
]
