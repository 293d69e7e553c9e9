"""The causal BK-core over a subset of kept positions, at length K < N (a Schur complement).

Setting. H = H0 + diag(v) with H0 the discrete Laplacian (couplings b_i = c_i = 1, so k_i = 1), and
every SKIPPED position carrying the same potential v_skip (a learned scalar in the sparse layer).
The kept positions are p_0 < p_1 < ... < p_{K-1}; L_r = p_r - p_{r-1} - 1 is the number of skipped
positions just before p_r (p_{-1} = -1). We want the causal g at the kept positions,
g_{p_r} = 1 / d_{p_r} with d the left-to-right Riccati sweep of docs/design.md section 2.

Eliminating a run. Over a run the sweep applies the Moebius maps of M_s = [[alpha_s, -1], [1, 0]]
(alpha_s = -2 + v_skip - z, the same matrix at every skipped site), then the kept site's
M_p = [[alpha_p, -1], [1, 0]]. With U_L the Chebyshev-like sequence U_L = alpha_s U_{L-1} - U_{L-2},
U_0 = 1, U_{-1} = 0, one has M_s^L = [[U_L, -U_{L-1}], [U_{L-1}, -U_{L-2}]], hence

    d_{p_r} = alpha'_r - k'_{r-1} / (d_{p_{r-1}} + beta_{r-1})

    alpha'_r = alpha_{p_r} - rho_{L_r},   beta_{r-1} = -rho_{L_r},   k'_{r-1} = 1 / U_{L_r}^2,
    rho_L = U_{L-1} / U_L                          (rho_0 = 0: an empty run changes nothing)

(a Moebius map (A x + B) / (C x + D) is A/C - (AD - BC)/C^2 / (x + D/C), and det M = 1).
So d~_r = d_{p_r} + beta_r obeys an ordinary tridiagonal Riccati sweep of length K,

    d~_r = (alpha'_r + beta_r) - k'_{r-1} / d~_{r-1},

whose matrix is the Schur complement of the skipped positions, and the causal value is read out
WITHOUT the shift beta_r (which belongs to the run after p_r, i.e. to the future):

    g_{p_0} = 1 / alpha'_0,   g_{p_r} = 1 / (alpha'_r - k'_{r-1} g~_{r-1}),   g~ = 1 / d~.

g~_{r-1} depends on the runs up to p_r only, so g_{p_r} depends on positions 0..p_r: causal, also in
floating point. The length-K sweep is resnet_bk.kernels.reduced_op.reduced_sweep: the PyTorch
reference (bk_core's exact-adjoint recurrence, complex k' allowed) or the fused Triton kernels
(resnet_bk.kernels.reduced_triton). The run factors rho_L, 1/U_L have the closed form of a two-term
recurrence (eigenvalues lam1 lam2 = 1, |lam1| > 1):

    rho_L = (1 - mu^L) / (lam1 (1 - mu^(L+1))),   1/U_L = (1 - mu) / (lam1^L (1 - mu^(L+1))),   mu = lam2/lam1,

so a run of any length costs O(1): the core's work is O(K), not O(N). Long runs decouple
(k' = 1/U_L^2 -> 0 geometrically). Bound: Im alpha_s = -Im z < 0 gives Im rho_L >= 0, hence
Im d~_r <= Im d_{p_r} <= -Im z: no division by (near) zero.

Static shapes: `pack_kept(keep, capacity)` packs each row's first `capacity` kept positions into a
fixed (B, capacity) layout, and the run factors are computed per entry, so nothing here reads a
value back to the host. `reduced_green_diagonal` is the fast path; `reduced_green_diagonal_reference`
scatters the kept potentials into the full chain and runs the O(N^4) float64 dense reference (tests
only).
"""

from __future__ import annotations

from typing import Optional

import torch

from resnet_bk.kernels.reduced_op import reduced_sweep
from resnet_bk.reference.bk_recurrences import dense_green_diagonal, laplacian_couplings

_COMPLEX_OF = {torch.float32: torch.complex64, torch.float64: torch.complex128}


def pack_kept(keep: torch.Tensor, capacity: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, N) bool -> (positions (B, K) long, valid (B, K) bool, run_lengths (B, K) long).

    K = capacity: a static number (no host sync, shapes independent of the data); a row with more
    kept positions keeps its FIRST K (a choice that depends on the past only, so it stays causal;
    the later ones are left out of the output). capacity=None: K = the largest number of kept
    positions in a row (read back to the host: one sync, data-dependent shapes).
    Row b's kept positions come first, in order; entries r >= (kept in row b) are padding (valid
    False, position 0, run length 0). Padding sits after every real entry, so by causality it
    changes none. `valid` in row-major order lists the kept positions in the order of
    keep.reshape(-1).nonzero() (when none is left out).
    """
    b, n = keep.shape
    rank = keep.long().cumsum(1)  # kept positions up to and including t
    counts = rank[:, -1] if n else keep.new_zeros(b, dtype=torch.long)
    k = int(counts.max()) if capacity is None and b * n else (capacity or 0)
    # slot r of row b <- the position of its (r+1)-th kept entry; the rest into a dump column k
    slot = torch.where(keep & (rank <= k), rank - 1, torch.full_like(rank, k))
    idx = torch.arange(n, device=keep.device).expand(b, n)
    order = torch.zeros((b, k + 1), dtype=torch.long, device=keep.device).scatter(1, slot, idx)[:, :k]
    valid = torch.arange(k, device=keep.device)[None, :] < counts[:, None]
    pos = torch.where(valid, order, torch.zeros_like(order))
    prev = torch.cat([pos.new_full((b, 1), -1), pos[:, :-1]], dim=1)
    runs = torch.where(valid, pos - prev - 1, torch.zeros_like(pos))
    return pos, valid, runs


def _parts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.real, x.imag


def _mul(a, b):
    return a[0] * b[0] - a[1] * b[1], a[0] * b[1] + a[1] * b[0]


def _div(a, b):
    den = b[0] * b[0] + b[1] * b[1]
    return (a[0] * b[0] + a[1] * b[1]) / den, (a[1] * b[0] - a[0] * b[1]) / den


def _exp_times(ell: torch.Tensor, log_x: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """x^ell = exp(ell log x) as (re, im), for real ell and log x = (re, im)."""
    mag, phase = torch.exp(ell * log_x[0]), ell * log_x[1]
    return mag * torch.cos(phase), mag * torch.sin(phase)


def run_factor_parts(alpha_s: torch.Tensor, lengths: torch.Tensor) -> tuple[tuple, tuple]:
    """((Re rho_L, Im rho_L), (Re 1/U_L, Im 1/U_L)) at each run length L of `lengths`, closed form
    (see the module docstring); real tensors of the broadcast shape, differentiable in alpha_s.

    alpha_s: complex tensor, a scalar or (R, 1) (the a - z of a skipped site, per row), Im alpha_s < 0.
    lengths: integer tensor broadcastable with alpha_s, e.g. (R, K) run lengths or (L + 1,).
    Complex arithmetic only on alpha_s's shape (one value per row); the per-entry work is real and
    elementwise (it fuses under torch.compile), O(1) per run of any length, and nothing depends on
    the longest run (no host sync).
    """
    disc = torch.sqrt(alpha_s * alpha_s - 4)
    lam_a, lam_b = (alpha_s + disc) / 2, (alpha_s - disc) / 2
    lam1 = torch.where(lam_a.abs() >= lam_b.abs(), lam_a, lam_b)  # |lam1| > 1 > |lam2|, lam1 lam2 = 1
    mu = 1 / (lam1 * lam1)  # lam2 / lam1
    ell = lengths.to(alpha_s.real.dtype)
    mu_l = _exp_times(ell, _parts(torch.log(mu)))  # mu^L (|mu| < 1: decays, never overflows)
    mu_l1 = _mul(mu_l, _parts(mu))
    denom = (1 - mu_l1[0], -mu_l1[1])  # 1 - mu^(L+1)
    rho = _div((1 - mu_l[0], -mu_l[1]), _mul(_parts(lam1), denom))
    lam_inv_l = _exp_times(-ell, _parts(torch.log(lam1)))  # lam1^-L
    inv_u = _div(_mul(_parts(1 - mu), lam_inv_l), denom)
    return rho, inv_u


def run_factors(alpha_s: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rho_L, 1/U_L) as complex tensors: `run_factor_parts` put together."""
    rho, inv_u = run_factor_parts(alpha_s, lengths)
    return torch.complex(*rho), torch.complex(*inv_u)


def run_table(alpha_s: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`run_factors` for L = 0..max_len: two complex (max_len + 1,) or (R, max_len + 1) tensors."""
    return run_factors(alpha_s, torch.arange(max_len + 1, device=alpha_s.device))


def reduced_green_diagonal(
    v_kept: torch.Tensor,
    run_lengths: torch.Tensor,
    v_skip: torch.Tensor | float,
    z: complex | torch.Tensor = 1j,
    method: str = "scan",
    lengths: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Causal g at the kept positions of the chain H0 + diag(v), computed at length K.

    Args:
        v_kept: (B, K) real potentials at the kept positions (padding after the last kept entry of a
            row may hold anything finite).
        run_lengths: (B, K) long, number of skipped positions just before each kept one (see
            `pack_kept`); 0 on padding.
        v_skip: real scalar (float or 0-dim tensor, may require grad): the potential at every skipped
            position.
        z: spectral shift, Im z > 0: a Python complex, or a complex (B, 1) tensor (one per row).
        method: "scan" or "sequential" (the PyTorch reference sweep) or "triton" (the fused kernels of
            resnet_bk.kernels.reduced_triton; complex64), see resnet_bk.kernels.reduced_op.
        lengths: (B,) long, the number of real (kept) entries of each row; None: all K. The output
            is 0 at the padding r >= lengths[b] (and the fused sweep stops there).
    Returns:
        (B, K) complex (complex128 for float64 input, else complex64): g_{p_r} of the FULL causal
        chain (equal to green_diagonal over all N positions, read at the kept ones).
    """
    real = v_kept.dtype if v_kept.dtype in _COMPLEX_OF else torch.float32
    cdtype = _COMPLEX_OF[real]
    b, k = v_kept.shape
    if k == 0:
        return torch.zeros((b, 0), dtype=cdtype, device=v_kept.device)
    if lengths is None:
        lengths = torch.full((b,), k, dtype=torch.long, device=v_kept.device)
    # The run factors in double precision (elementwise, O(B K)), then cast down. Real and imaginary
    # parts are kept apart up to the sweep's inputs (complex ops do not fuse under torch.compile).
    v_s = (
        v_skip.to(torch.float64)
        if isinstance(v_skip, torch.Tensor)
        else torch.tensor(float(v_skip), dtype=torch.float64)
    )
    v_s = v_s.to(v_kept.device)
    if isinstance(z, torch.Tensor):
        alpha_s = (-2.0 + v_s).to(torch.complex128) - z.to(torch.complex128)
        z_re, z_im = z.real.to(real), z.imag.to(real)
    else:
        alpha_s = (-2.0 + v_s).to(torch.complex128) - complex(z)
        z_re, z_im = complex(z).real, complex(z).imag
    rho, inv_u = (tuple(t.to(real) for t in pair) for pair in run_factor_parts(alpha_s, run_lengths))  # (B, K)

    alpha_red = (-2.0 + v_kept.to(real) - z_re - rho[0], -z_im - rho[1])  # alpha'_r = alpha_r - rho_{L_r}
    k_red = _mul(inv_u, inv_u)  # 1 / U_L^2
    zero = torch.zeros_like(rho[0][:, :1])
    k_prev = tuple(torch.cat([zero, t[:, 1:]], dim=1) for t in k_red)  # k'_{r-1}, 0 at r = 0
    beta = tuple(torch.cat([-t[:, 1:], zero], dim=1) for t in rho)  # beta_r = -rho_{L_{r+1}}
    alpha_red, beta, k_prev = (torch.view_as_complex(torch.stack(t, dim=-1)) for t in (alpha_red, beta, k_prev))
    return reduced_sweep(alpha_red, beta, k_prev, lengths, method)


def scatter_potential(
    v_kept: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, n: int, v_skip
) -> torch.Tensor:
    """(B, K) kept potentials -> (B, N) full potential with v_skip at every skipped position.
    Static shapes: padding entries are written to a dump column, then dropped."""
    b = v_kept.shape[0]
    full = torch.as_tensor(v_skip, dtype=v_kept.dtype, device=v_kept.device).expand(b, n + 1)
    index = torch.where(valid, positions, torch.full_like(positions, n))
    return full.scatter(1, index, v_kept)[:, :n]


def reduced_green_diagonal_reference(v_kept: torch.Tensor, keep: torch.Tensor, v_skip, z: complex = 1j) -> torch.Tensor:
    """Float64 dense reference for `reduced_green_diagonal`: the full (B, N) chain with v_skip at the
    skipped positions, inverted densely (bk_core.dense_green_diagonal), read at the kept positions.
    Returns (B, K) complex128 in `pack_kept`'s layout (0 on padding)."""
    b, n = keep.shape
    pos, valid, _ = pack_kept(keep)
    v = scatter_potential(v_kept.double(), pos, valid, n, float(v_skip))
    h0, sub, sup = laplacian_couplings(b, n, torch.float64)
    g = dense_green_diagonal(h0 + v, sub, sup, z, causal=True)
    out = torch.gather(g, 1, pos)
    return torch.where(valid, out, torch.zeros_like(out))


def kept_green_diagonal_full(
    v_kept: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor,
    n: int,
    v_skip,
    z: complex = 1j,
    method: str = "auto",
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """The same values by the full-length core: scatter into (B, N), green_diagonal at length N
    (Triton on CUDA), gather at the kept positions. (B, K) complex."""
    from resnet_bk.bk_core import green_diagonal

    b = v_kept.shape[0]
    v = scatter_potential(v_kept, positions, valid, n, v_skip)
    h0, sub, sup = laplacian_couplings(b, n, v.dtype, v.device)
    g = green_diagonal(h0 + v, sub, sup, z, True, method=method, validate=False)
    return torch.gather(g, 1, positions)
