"""Triton kernels for the reduced-chain sweep of learned sparsity: forward and exact adjoint backward.

The specification is ``resnet_bk.kernels.reduced_op.reduced_sweep_reference`` (the PyTorch path);
``tests/test_reduced_chain_triton.py`` compares values and gradients of these kernels against it.
Per row (one reduced chain of K kept positions, K' = lengths[row] of them real), with complex
alpha_r (= alpha'_r of ``resnet_bk.reduced_chain``), beta_r and kp_r = k'_{r-1} (kp_0 = 0):

    t_r  = alpha_r - kp_r gs_{r-1}          (gs_{-1} = 0)
    g_r  = 1 / t_r                          output: the causal g at kept position r
    gs_r = 1 / (t_r + beta_r)               the shifted sweep carried to r + 1

Backward, with lam = conj(grad g) and the holomorphic derivatives U_r = dL/dt_r, W_r = dL/d(t_r + beta_r):

    W_r = U_{r+1} kp_{r+1} gs_r^2           (U_{K'} = 0)
    U_r = -lam_r g_r^2 + W_r
    dL/dalpha_r = U_r,  dL/dbeta_r = W_r,  dL/dkp_{r+1} = -U_{r+1} gs_r,  dL/dkp_0 = 0

and PyTorch's gradients are their conjugates. Entries r >= lengths[row] are padding: output 0,
gradient 0, and they never enter the sweep of a real entry (they come after every one).

Scheme: one program per block of BLOCK_R rows (one row per lane); a loop over the positions of the
longest row of the block (a device-side bound: no host sync), S positions per step, whose loads are
issued together before the S dependent sweep steps run in registers. All arithmetic in float32 on
real/imag parts. Forward saves gs (complex64) for the backward, which runs right to left.
Input and output tensors are complex64 (R, K), passed as their (R, K, 2) float32 views.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: rows per program, positions per loop step, warps per program
CONFIG = {"block_rows": 32, "steps": 8, "num_warps": 1}


@triton.jit
def _cmul(ar, ai, br, bi):
    return ar * br - ai * bi, ar * bi + ai * br


@triton.jit
def _crecip(br, bi):
    inv = 1.0 / (br * br + bi * bi)
    return br * inv, -bi * inv


@triton.jit
def _load2(ptr, off, mask):
    """(re, im) of the complex64 entries at element offsets off of a (.., 2) float32 view."""
    return tl.load(ptr + off, mask=mask, other=0.0), tl.load(ptr + off + 1, mask=mask, other=0.0)


@triton.jit
def _reduced_fwd_kernel(
    alpha_ptr, beta_ptr, kp_ptr, len_ptr, g_ptr, gs_ptr, R, K, BLOCK_R: tl.constexpr, S: tl.constexpr
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_rows = rows < R
    n = tl.load(len_ptr + rows, mask=in_rows, other=0).to(tl.int32)
    n = tl.minimum(n, K)
    top = tl.max(n, axis=0)
    base = rows.to(tl.int64) * K * 2
    gsr = tl.zeros([BLOCK_R], dtype=tl.float32)
    gsi = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c in range(0, top, S):
        # all loads of the S steps first (independent of the sweep), then the dependent steps
        ar_ = ()
        ai_ = ()
        br_ = ()
        bi_ = ()
        kr_ = ()
        ki_ = ()
        for j in tl.static_range(S):
            m = in_rows & (c + j < n)
            off = base + (c + j) * 2
            xr, xi = _load2(alpha_ptr, off, m)
            ar_ = ar_ + (xr,)
            ai_ = ai_ + (xi,)
            xr, xi = _load2(beta_ptr, off, m)
            br_ = br_ + (xr,)
            bi_ = bi_ + (xi,)
            xr, xi = _load2(kp_ptr, off, m)
            kr_ = kr_ + (xr,)
            ki_ = ki_ + (xi,)
        for j in tl.static_range(S):
            m = in_rows & (c + j < n)
            off = base + (c + j) * 2
            pr, pi = _cmul(kr_[j], ki_[j], gsr, gsi)
            tr = tl.where(m, ar_[j] - pr, 1.0)  # padding lanes: a finite dummy, never stored
            ti = ai_[j] - pi
            gr, gi = _crecip(tr, ti)
            gsr, gsi = _crecip(tr + br_[j], ti + bi_[j])
            tl.store(g_ptr + off, gr, mask=m)
            tl.store(g_ptr + off + 1, gi, mask=m)
            tl.store(gs_ptr + off, gsr, mask=m)
            tl.store(gs_ptr + off + 1, gsi, mask=m)


@triton.jit
def _reduced_bwd_kernel(
    grad_ptr,
    g_ptr,
    gs_ptr,
    kp_ptr,
    len_ptr,
    galpha_ptr,
    gbeta_ptr,
    gkp_ptr,
    R,
    K,
    BLOCK_R: tl.constexpr,
    S: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_rows = rows < R
    n = tl.load(len_ptr + rows, mask=in_rows, other=0).to(tl.int32)
    n = tl.minimum(n, K)
    top = tl.cdiv(tl.max(n, axis=0), S) * S
    base = rows.to(tl.int64) * K * 2
    # carried from position r + 1: U_{r+1} and kp_{r+1} (zero past the row's end)
    ur = tl.zeros([BLOCK_R], dtype=tl.float32)
    ui = tl.zeros([BLOCK_R], dtype=tl.float32)
    kr = tl.zeros([BLOCK_R], dtype=tl.float32)
    ki = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c in range(0, top, S):
        lr_ = ()
        li_ = ()
        gr_ = ()
        gi_ = ()
        sr_ = ()
        si_ = ()
        qr_ = ()
        qi_ = ()
        for j in tl.static_range(S):
            r = top - 1 - c - j  # right to left
            m = in_rows & (r < n)
            off = base + r * 2
            xr, xi = _load2(grad_ptr, off, m)
            lr_ = lr_ + (xr,)
            li_ = li_ + (-xi,)  # lam = conj(grad)
            xr, xi = _load2(g_ptr, off, m)
            gr_ = gr_ + (xr,)
            gi_ = gi_ + (xi,)
            xr, xi = _load2(gs_ptr, off, m)
            sr_ = sr_ + (xr,)
            si_ = si_ + (xi,)
            xr, xi = _load2(kp_ptr, off, m)
            qr_ = qr_ + (xr,)
            qi_ = qi_ + (xi,)
        for j in tl.static_range(S):
            r = top - 1 - c - j
            m = in_rows & (r < n)
            off = base + r * 2
            # dL/dkp_{r+1} = -U_{r+1} gs_r, stored at r + 1 (only where r + 1 is a real entry)
            xr, xi = _cmul(ur, ui, sr_[j], si_[j])
            m1 = in_rows & (r + 1 < n)
            tl.store(gkp_ptr + off + 2, -xr, mask=m1)
            tl.store(gkp_ptr + off + 3, xi, mask=m1)  # conj(-x) = (-xr, +xi)
            # W_r = U_{r+1} kp_{r+1} gs_r^2
            s2r, s2i = _cmul(sr_[j], si_[j], sr_[j], si_[j])
            yr, yi = _cmul(ur, ui, kr, ki)
            wr, wi = _cmul(yr, yi, s2r, s2i)
            # U_r = -lam_r g_r^2 + W_r
            g2r, g2i = _cmul(gr_[j], gi_[j], gr_[j], gi_[j])
            xr, xi = _cmul(lr_[j], li_[j], g2r, g2i)
            ur = tl.where(m, wr - xr, 0.0)
            ui = tl.where(m, wi - xi, 0.0)
            kr = tl.where(m, qr_[j], 0.0)
            ki = tl.where(m, qi_[j], 0.0)
            tl.store(galpha_ptr + off, ur, mask=m)
            tl.store(galpha_ptr + off + 1, -ui, mask=m)
            tl.store(gbeta_ptr + off, wr, mask=m)
            tl.store(gbeta_ptr + off + 1, -wi, mask=m)


def _view(x: torch.Tensor) -> torch.Tensor:
    """complex64 (R, K) -> contiguous float32 (R, K, 2)."""
    return torch.view_as_real(x.to(torch.complex64).resolve_conj().contiguous())


def _grid(r: int):
    return (triton.cdiv(r, CONFIG["block_rows"]),)


def forward(alpha: torch.Tensor, beta: torch.Tensor, k_prev: torch.Tensor, lengths: torch.Tensor):
    """(g, gs): complex64 (R, K) each, zero at r >= lengths. alpha, beta, k_prev complex (R, K)
    (k_prev[:, 0] is not read); lengths (R,) integer, the real entries of each row."""
    r, k = alpha.shape
    g = torch.zeros((r, k), dtype=torch.complex64, device=alpha.device)
    gs = torch.zeros_like(g)
    if r * k:
        _reduced_fwd_kernel[_grid(r)](
            _view(alpha),
            _view(beta),
            _view(k_prev),
            lengths.contiguous(),
            torch.view_as_real(g),
            torch.view_as_real(gs),
            r,
            k,
            BLOCK_R=CONFIG["block_rows"],
            S=CONFIG["steps"],
            num_warps=CONFIG["num_warps"],
        )
    return g, gs


def backward(grad: torch.Tensor, g: torch.Tensor, gs: torch.Tensor, k_prev: torch.Tensor, lengths: torch.Tensor):
    """Exact vector-Jacobian product of ``forward``: (grad_alpha, grad_beta, grad_k_prev), complex64
    (R, K) each (PyTorch's convention for complex inputs), zero at padding and at k_prev[:, 0]."""
    r, k = g.shape
    g_alpha = torch.zeros((r, k), dtype=torch.complex64, device=g.device)
    g_beta, g_kp = torch.zeros_like(g_alpha), torch.zeros_like(g_alpha)
    if r * k:
        _reduced_bwd_kernel[_grid(r)](
            _view(grad),
            _view(g),
            _view(gs),
            _view(k_prev),
            lengths.contiguous(),
            torch.view_as_real(g_alpha),
            torch.view_as_real(g_beta),
            torch.view_as_real(g_kp),
            r,
            k,
            BLOCK_R=CONFIG["block_rows"],
            S=CONFIG["steps"],
            num_warps=CONFIG["num_warps"],
        )
    return g_alpha, g_beta, g_kp
