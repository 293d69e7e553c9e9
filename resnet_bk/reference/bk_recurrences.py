"""The BK-core's reference implementation: pure-PyTorch recurrences with their exact adjoint, and a
float64 dense check. A leaf: it imports nothing from this project.

H is tridiagonal with real diagonal a_i (i = 0..N-1), sub-diagonal c_i = H[i+1, i] and
super-diagonal b_i = H[i, i+1] (i = 0..N-2). With alpha_i = a_i - z and k_i = b_i c_i, the stable
(continued-fraction / Riccati) recurrences are

    d_0 = alpha_0,        d_i = alpha_i - k_{i-1} / d_{i-1}        (left to right)
    e_{N-1} = alpha_{N-1}, e_i = alpha_i - k_i / e_{i+1}            (right to left)

    causal:         g_i  = 1 / d_i                    = [(H - zI) restricted to 0..i]^-1_ii
    bidirectional:  G_ii = 1 / (d_i + e_i - alpha_i)  = [(H - zI)^-1]_ii

Two interchangeable implementations of the same recurrences ("scan": a log-depth Hillis-Steele scan
of normalised 2x2 Moebius matrices; "sequential": a loop over positions, the specification), both
behind ``ResolventDiagonal``, an autograd Function whose backward is the exact adjoint sweep (again
a first-order linear recurrence, computed by the same scan machinery). ``dense_green_diagonal`` is
the O(N^3) float64 check, for tests. The public op is ``resnet_bk.bk_core.green_diagonal``.
"""

from __future__ import annotations

import math
from typing import Union

import torch

ComplexLike = Union[complex, float, torch.Tensor]

COMPLEX_OF = {torch.float32: torch.complex64, torch.float64: torch.complex128}
METHODS = ("scan", "sequential")


# --------------------------------------------------------------------------------------------
# Log-depth scan of 2x2 matrices
# --------------------------------------------------------------------------------------------
def _matmul2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Batched 2x2 product x @ y for tensors of shape (..., 2, 2), written out (faster than matmul
    for 2x2 complex blocks on CPU)."""
    x00, x01, x10, x11 = x[..., 0, 0], x[..., 0, 1], x[..., 1, 0], x[..., 1, 1]
    y00, y01, y10, y11 = y[..., 0, 0], y[..., 0, 1], y[..., 1, 0], y[..., 1, 1]
    return torch.stack(
        (
            torch.stack((x00 * y00 + x01 * y10, x00 * y01 + x01 * y11), dim=-1),
            torch.stack((x10 * y00 + x11 * y10, x10 * y01 + x11 * y11), dim=-1),
        ),
        dim=-2,
    )


def _normalise(m: torch.Tensor) -> torch.Tensor:
    """Divide each 2x2 matrix by its largest |entry|. Only ratios of entries are used downstream,
    so this changes no result and keeps long products inside the floating-point range."""
    scale = m.abs().flatten(-2).amax(-1).clamp_min(torch.finfo(m.real.dtype).tiny)
    return m / scale[..., None, None]


def _prefix_products(m: torch.Tensor) -> torch.Tensor:
    """Normalised inclusive prefix products P_i ~ M_i M_{i-1} ... M_0 along dim 1.

    Args:
        m: (B, N, 2, 2) complex.
    Returns:
        (B, N, 2, 2) complex, each P_i scaled by an arbitrary positive factor.
    """
    p = _normalise(m)
    n = p.shape[1]
    offset = 1
    while offset < n:
        # Hillis-Steele step: P_i <- P_i @ P_{i-offset} for i >= offset (later index on the left).
        head = p[:, :offset]
        tail = _normalise(_matmul2(p[:, offset:], p[:, :-offset]))
        p = torch.cat((head, tail), dim=1)
        offset *= 2
    return p


def _riccati_scan(alpha: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """d_i of the left-to-right recurrence by a log-depth scan.

    d_i = p_i / q_i with (p_i, q_i) = M_i (p_{i-1}, q_{i-1}), M_i = [[alpha_i, -k_{i-1}], [1, 0]],
    (p_{-1}, q_{-1}) = (1, 0), so (p_i, q_i) is the first column of the prefix product.
    """
    b, n = alpha.shape
    k_prev = torch.cat((torch.zeros_like(alpha[:, :1]), k), dim=1)  # k_{i-1}, with k_{-1} = 0
    m = torch.stack(
        (torch.stack((alpha, -k_prev), dim=-1), torch.stack((torch.ones_like(alpha), torch.zeros_like(alpha)), dim=-1)),
        dim=-2,
    )
    p = _prefix_products(m)
    return p[..., 0, 0] / p[..., 1, 0]


def _affine_scan(mult: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
    """x_i = add_i + mult_i * x_{i-1}, x_{-1} = 0, by a log-depth scan.

    [x_i, 1] = [[mult_i, add_i], [0, 1]] [x_{i-1}, 1], so x_i is the ratio of the second column's
    entries of the (normalised) prefix product.
    """
    zeros, ones = torch.zeros_like(add), torch.ones_like(add)
    m = torch.stack((torch.stack((mult, add), dim=-1), torch.stack((zeros, ones), dim=-1)), dim=-2)
    p = _prefix_products(m)
    return p[..., 0, 1] / p[..., 1, 1]


def _riccati_sequential(alpha: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """d_i of the left-to-right recurrence by a loop over positions (vectorised over the batch)."""
    d = [alpha[:, 0]]
    for i in range(1, alpha.shape[1]):
        d.append(alpha[:, i] - k[:, i - 1] / d[-1])
    return torch.stack(d, dim=1)


def _affine_sequential(mult: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
    """x_i = add_i + mult_i * x_{i-1}, x_{-1} = 0, by a loop over positions."""
    x = [add[:, 0]]
    for i in range(1, add.shape[1]):
        x.append(add[:, i] + mult[:, i] * x[-1])
    return torch.stack(x, dim=1)


_RICCATI = {"scan": _riccati_scan, "sequential": _riccati_sequential}
_AFFINE = {"scan": _affine_scan, "sequential": _affine_sequential}


def _forward_sweeps(alpha: torch.Tensor, k: torch.Tensor, causal: bool, method: str):
    """d (and e for the bidirectional core) for complex alpha (B, N) and k (B, N-1)."""
    d = _RICCATI[method](alpha, k)
    if causal:
        return d, None
    e = _RICCATI[method](alpha.flip(1), k.flip(1)).flip(1)
    return d, e


def _adjoint_right_to_left(direct: torch.Tensor, k: torch.Tensor, d: torch.Tensor, method: str) -> torch.Tensor:
    """U_i = direct_i + U_{i+1} k_i / d_i^2, U_N = 0: the adjoint of d_i (right to left)."""
    mult = torch.zeros_like(direct)
    mult[:, :-1] = k / d[:, :-1].square()
    # Reversed (j = N-1-i) this is x_j = direct_j + mult_j x_{j-1} with x_{-1} = 0.
    return _AFFINE[method](mult.flip(1), direct.flip(1)).flip(1)


class ResolventDiagonal(torch.autograd.Function):
    """Holomorphic map (alpha, k) -> g (causal) or G (bidirectional) with the exact adjoint.

    All maps here are complex-analytic, so for outputs w and an input v PyTorch's vector-Jacobian
    product is grad_v = conj(sum_w dw/dv * conj(grad_w)); we propagate lam = conj(grad) with
    ordinary derivatives and conjugate once at the end.
    """

    @staticmethod
    def forward(ctx, alpha: torch.Tensor, k: torch.Tensor, causal: bool, method: str) -> torch.Tensor:
        d, e = _forward_sweeps(alpha, k, causal, method)
        out = d.reciprocal() if causal else (d + e - alpha).reciprocal()
        ctx.causal, ctx.method = causal, method
        ctx.save_for_backward(k, d, e if e is not None else d, out)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        k, d, e, out = ctx.saved_tensors
        lam_out = grad_out.conj()
        # d out / d s = -out^2 where s is d (causal) or d + e - alpha (bidirectional).
        lam_s = -lam_out * out.square()
        u = _adjoint_right_to_left(lam_s, k, d, ctx.method)  # adjoint of d
        if ctx.causal:
            lam_alpha = u
            lam_k = -u[:, 1:] / d[:, :-1]
        else:
            # e runs right to left, so its adjoint runs left to right:
            # V_i = lam_s_i + V_{i-1} k_{i-1} / e_i^2.
            mult = torch.zeros_like(lam_s)
            mult[:, 1:] = k / e[:, 1:].square()
            v = _AFFINE[ctx.method](mult, lam_s)
            lam_alpha = u + v - lam_s
            lam_k = -u[:, 1:] / d[:, :-1] - v[:, :-1] / e[:, 1:]
        return lam_alpha.conj(), lam_k.conj(), None, None


def alpha_and_k(diag: torch.Tensor, sub: torch.Tensor, sup: torch.Tensor, z: ComplexLike):
    """alpha = a - z and k = b c as complex tensors (complex128 for float64 input, else complex64)."""
    real_dtype = diag.dtype if diag.dtype in COMPLEX_OF else torch.float32
    cdtype = COMPLEX_OF[real_dtype]
    alpha = diag.to(real_dtype).to(cdtype) - (z.to(cdtype) if isinstance(z, torch.Tensor) else z)
    k = (sub.to(real_dtype) * sup.to(real_dtype)).to(cdtype)
    return alpha, k


def tridiagonal_matrix(diag: torch.Tensor, sub: torch.Tensor, sup: torch.Tensor) -> torch.Tensor:
    """Dense (B, N, N) H from its three diagonals (for tests and plots)."""
    return torch.diag_embed(diag) + torch.diag_embed(sub, offset=-1) + torch.diag_embed(sup, offset=1)


def dense_green_diagonal(
    diag: torch.Tensor, sub: torch.Tensor, sup: torch.Tensor, z: ComplexLike = 1j, causal: bool = True
) -> torch.Tensor:
    """Float64 dense reference: explicit inverses, O(N^3) (bidirectional) or O(N^4) (causal).

    Only for tests at small N. Returns (B, N) complex128.
    """
    h = tridiagonal_matrix(diag.double(), sub.double(), sup.double()).to(torch.complex128)
    n = h.shape[-1]
    zc = z.to(torch.complex128) if isinstance(z, torch.Tensor) else complex(z)
    if isinstance(zc, torch.Tensor) and zc.dim() > 0:
        zc = zc.expand(h.shape[0], n)
        a = h - torch.diag_embed(zc)
    else:
        a = h - zc * torch.eye(n, dtype=torch.complex128)
    if not causal:
        return torch.linalg.inv(a).diagonal(dim1=-2, dim2=-1)
    return torch.stack([torch.linalg.inv(a[:, : i + 1, : i + 1])[:, i, i] for i in range(n)], dim=1)


def laplacian_couplings(batch: int, n: int, dtype: torch.dtype = torch.float32, device=None) -> tuple:
    """(H0 diagonal, sub, sup) of the discrete Laplacian: -2 on the diagonal, 1 off it.

    Shapes (B, N), (B, N-1), (B, N-1); built for the length at hand (no fixed-length buffers).
    """
    h0 = torch.full((batch, n), -2.0, dtype=dtype, device=device)
    ones = torch.ones((batch, max(n - 1, 0)), dtype=dtype, device=device)
    return h0, ones, ones


def resolvent_bound(z: ComplexLike) -> float:
    """The bound 1 / Im z on |g_i| and |G_ii| that holds whenever sub * sup >= 0."""
    im = float(torch.as_tensor(z).imag.min()) if isinstance(z, torch.Tensor) else complex(z).imag
    return 1.0 / im if im > 0 else math.inf
