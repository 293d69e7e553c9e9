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

Scheme: one program per row, its L lanes (threads) each owning S consecutive positions of a block of
L*S; blocks run left to right (backward: right to left), carrying one complex state between them.
In a block, (1) each lane composes the maps of its neighbour's chunk: the Moebius maps
gs_r = 1 / (alpha_r + beta_r - kp_r gs_{r-1}), i.e. [[0, 1], [-kp_r, alpha_r + beta_r]] on (p, q)
(renormalised every 4 steps; only p/q matters), or in backward the affine maps U_r = c_r + m_r U_{r+1}
with c_r = -lam_r g_r^2, m_r = kp_{r+1} gs_r^2; (2) ``tl.associative_scan`` over the lanes (log depth)
gives each lane the state entering its chunk (composing the neighbour's chunk rather than its own
makes the scan exclusive without a shift); (3) each lane runs its S steps from that state and stores
the results. Positions past a row's length are identity maps and never stored. All arithmetic in
float32 on real/imag parts. Forward saves gs (complex64) for the backward.
Input and output tensors are complex64 (R, K), passed as their (R, K, 2) float32 views.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

#: positions per lane, fewest and most lanes per program (a block is lanes * steps positions; powers of two)
CONFIG = {"steps": 8, "min_lanes": 16, "max_lanes": 256}


@contextlib.contextmanager
def config(**overrides):
    """Temporarily change the launch parameters, e.g. ``with config(steps=2, min_lanes=2, max_lanes=4)``
    (tests use small blocks so that short rows span several)."""
    unknown = set(overrides) - set(CONFIG)
    if unknown:
        raise KeyError(f"reduced_triton.config: unknown keys {sorted(unknown)}; known: {sorted(CONFIG)}")
    old = dict(CONFIG)
    CONFIG.update(overrides)
    try:
        yield CONFIG
    finally:
        CONFIG.clear()
        CONFIG.update(old)


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
def _norm8(m):
    s = tl.maximum(tl.maximum(tl.abs(m[0]), tl.abs(m[1])), tl.maximum(tl.abs(m[2]), tl.abs(m[3])))
    s = tl.maximum(s, tl.maximum(tl.maximum(tl.abs(m[4]), tl.abs(m[5])), tl.maximum(tl.abs(m[6]), tl.abs(m[7]))))
    inv = 1.0 / tl.maximum(s, 1e-30)
    return (m[0] * inv, m[1] * inv, m[2] * inv, m[3] * inv, m[4] * inv, m[5] * inv, m[6] * inv, m[7] * inv)


@triton.jit
def _mobius_combine(l00r, l00i, l01r, l01i, l10r, l10i, l11r, l11i, r00r, r00i, r01r, r01i, r10r, r10i, r11r, r11i):
    """R @ L (L earlier in scan order), divided by its largest |component|."""
    c00r = r00r * l00r - r00i * l00i + r01r * l10r - r01i * l10i
    c00i = r00r * l00i + r00i * l00r + r01r * l10i + r01i * l10r
    c01r = r00r * l01r - r00i * l01i + r01r * l11r - r01i * l11i
    c01i = r00r * l01i + r00i * l01r + r01r * l11i + r01i * l11r
    c10r = r10r * l00r - r10i * l00i + r11r * l10r - r11i * l10i
    c10i = r10r * l00i + r10i * l00r + r11r * l10i + r11i * l10r
    c11r = r10r * l01r - r10i * l01i + r11r * l11r - r11i * l11i
    c11i = r10r * l01i + r10i * l01r + r11r * l11i + r11i * l11r
    return _norm8((c00r, c00i, c01r, c01i, c10r, c10i, c11r, c11i))


@triton.jit
def _affine_combine(lar, lai, lbr, lbi, rar, rai, rbr, rbi):
    """R o L for maps x -> B + A x (L applied first): (A_R A_L, A_R B_L + B_R)."""
    ar, ai = _cmul(rar, rai, lar, lai)
    br, bi = _cmul(rar, rai, lbr, lbi)
    return ar, ai, br + rbr, bi + rbi


@triton.jit
def _reduced_fwd_kernel(alpha_ptr, beta_ptr, kp_ptr, len_ptr, g_ptr, gs_ptr, K, L: tl.constexpr, S: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    n = tl.minimum(tl.load(len_ptr + row).to(tl.int32), K)
    lane = tl.arange(0, L)
    base = row * K * 2
    zero = tl.zeros([L], dtype=tl.float32)
    # the state entering the block, gs_{r-1} = p / q (gs_{-1} = 0; kp_0 = 0 makes it irrelevant)
    p_r = tl.sum(zero, axis=0)
    p_i = p_r
    q_r = p_r + 1.0
    q_i = p_r
    for blk in range(0, tl.cdiv(n, L * S)):
        start = blk * L * S
        # 1. each lane composes the maps of the PREVIOUS lane's chunk (gs_r = 1 / (alpha_r + beta_r - kp_r gs_{r-1}),
        #    M_r = [[0, 1], [-kp_r, alpha_r + beta_r]] on (p, q)); lane 0: the identity
        m = (zero + 1.0, zero, zero, zero, zero, zero, zero + 1.0, zero)
        for j in tl.static_range(S):
            pos = start + (lane - 1) * S + j
            ok = (lane > 0) & (pos < n)
            off = base + pos * 2
            ar, ai = _load2(alpha_ptr, off, ok)
            br, bi = _load2(beta_ptr, off, ok)
            kr, ki = _load2(kp_ptr, off, ok)
            cr = ar + br
            ci = ai + bi
            # [[0, 1], [-k, c]] @ m: row 0 <- row 1, row 1 <- -k row 0 + c row 1
            x00r, x00i = _cmul(cr, ci, m[4], m[5])
            y00r, y00i = _cmul(kr, ki, m[0], m[1])
            x01r, x01i = _cmul(cr, ci, m[6], m[7])
            y01r, y01i = _cmul(kr, ki, m[2], m[3])
            nm = (m[4], m[5], m[6], m[7], x00r - y00r, x00i - y00i, x01r - y01r, x01i - y01i)
            m = (
                tl.where(ok, nm[0], m[0]),
                tl.where(ok, nm[1], m[1]),
                tl.where(ok, nm[2], m[2]),
                tl.where(ok, nm[3], m[3]),
                tl.where(ok, nm[4], m[4]),
                tl.where(ok, nm[5], m[5]),
                tl.where(ok, nm[6], m[6]),
                tl.where(ok, nm[7], m[7]),
            )
            if j % 4 == 3:
                m = _norm8(m)
        # 2. prefix products over the lanes: lane l holds the maps of chunks 0..l-1 of this block
        t = tl.associative_scan(_norm8(m), 0, _mobius_combine)
        # 3. the state entering each lane, then its own chunk, in order
        e_pr, e_pi = _cmul(t[0], t[1], p_r, p_i)
        f_pr, f_pi = _cmul(t[2], t[3], q_r, q_i)
        e_qr, e_qi = _cmul(t[4], t[5], p_r, p_i)
        f_qr, f_qi = _cmul(t[6], t[7], q_r, q_i)
        den_r, den_i = _crecip(e_qr + f_qr, e_qi + f_qi)
        xr, xi = _cmul(e_pr + f_pr, e_pi + f_pi, den_r, den_i)  # gs entering the lane's chunk
        for j in tl.static_range(S):
            pos = start + lane * S + j
            ok = pos < n
            off = base + pos * 2
            ar, ai = _load2(alpha_ptr, off, ok)
            br, bi = _load2(beta_ptr, off, ok)
            kr, ki = _load2(kp_ptr, off, ok)
            pr, pi = _cmul(kr, ki, xr, xi)
            tr = tl.where(ok, ar - pr, 1.0)  # past the row's end: a finite dummy, never stored
            ti = ai - pi
            gr, gi = _crecip(tr, ti)
            xr, xi = _crecip(tr + br, ti + bi)
            tl.store(g_ptr + off, gr, mask=ok)
            tl.store(g_ptr + off + 1, gi, mask=ok)
            tl.store(gs_ptr + off, xr, mask=ok)
            tl.store(gs_ptr + off + 1, xi, mask=ok)
        # the state leaving the block: the last lane's (p, q) = (gs, 1)
        last = lane == L - 1
        p_r = tl.sum(tl.where(last, xr, 0.0), axis=0)
        p_i = tl.sum(tl.where(last, xi, 0.0), axis=0)
        q_r = p_r * 0.0 + 1.0
        q_i = p_r * 0.0


@triton.jit
def _adjoint_step(ur, ui, lr, li, gr, gi, sr, si, kr, ki):
    """(U_r, W_r) from U_{r+1}: W_r = U_{r+1} kp_{r+1} gs_r^2, U_r = -lam_r g_r^2 + W_r."""
    s2r, s2i = _cmul(sr, si, sr, si)
    yr, yi = _cmul(kr, ki, s2r, s2i)  # m_r = kp_{r+1} gs_r^2
    wr, wi = _cmul(ur, ui, yr, yi)
    g2r, g2i = _cmul(gr, gi, gr, gi)
    xr, xi = _cmul(lr, li, g2r, g2i)
    return wr - xr, wi - xi, wr, wi, yr, yi, -xr, -xi


@triton.jit
def _reduced_bwd_kernel(
    grad_ptr, g_ptr, gs_ptr, kp_ptr, len_ptr, galpha_ptr, gbeta_ptr, gkp_ptr, K, L: tl.constexpr, S: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    n = tl.minimum(tl.load(len_ptr + row).to(tl.int32), K)
    lane = tl.arange(0, L)
    base = row * K * 2
    zero = tl.zeros([L], dtype=tl.float32)
    # U entering the block from the right (U_{K'} = 0)
    c_r = tl.sum(zero, axis=0)
    c_i = c_r
    nblk = tl.cdiv(n, L * S)
    for b in range(0, nblk):
        start = (nblk - 1 - b) * L * S
        # 1. each lane composes the affine maps U_r = c_r + m_r U_{r+1} of the NEXT lane's chunk
        #    (right to left); the last lane: the identity
        aar = zero + 1.0
        aai = zero
        abr = zero
        abi = zero
        for jj in tl.static_range(S):
            pos = start + (lane + 1) * S + (S - 1 - jj)
            ok = (lane < L - 1) & (pos < n)
            off = base + pos * 2
            lr, li = _load2(grad_ptr, off, ok)
            gr, gi = _load2(g_ptr, off, ok)
            sr, si = _load2(gs_ptr, off, ok)
            kr, ki = _load2(kp_ptr, off + 2, ok & (pos + 1 < n))
            _, _, _, _, mr, mi, dr, di = _adjoint_step(zero, zero, lr, -li, gr, gi, sr, si, kr, ki)
            # (c, m) o (A, B): x -> c + m (B + A x)
            nar, nai = _cmul(mr, mi, aar, aai)
            nbr, nbi = _cmul(mr, mi, abr, abi)
            aar = tl.where(ok, nar, aar)
            aai = tl.where(ok, nai, aai)
            abr = tl.where(ok, nbr + dr, abr)
            abi = tl.where(ok, nbi + di, abi)
        # 2. suffix compositions over the lanes: lane l maps U entering the block to U entering its chunk
        t = tl.associative_scan((aar, aai, abr, abi), 0, _affine_combine, reverse=True)
        xr, xi = _cmul(t[0], t[1], c_r, c_i)
        ur = xr + t[2]
        ui = xi + t[3]
        # 3. each lane's own chunk, right to left
        for jj in tl.static_range(S):
            pos = start + lane * S + (S - 1 - jj)
            ok = pos < n
            ok1 = pos + 1 < n
            off = base + pos * 2
            lr, li = _load2(grad_ptr, off, ok)
            gr, gi = _load2(g_ptr, off, ok)
            sr, si = _load2(gs_ptr, off, ok)
            kr, ki = _load2(kp_ptr, off + 2, ok1)
            # dL/dkp_{r+1} = -U_{r+1} gs_r, stored (conjugated) at r + 1
            xr, xi = _cmul(ur, ui, sr, si)
            tl.store(gkp_ptr + off + 2, -xr, mask=ok1)
            tl.store(gkp_ptr + off + 3, xi, mask=ok1)
            nur, nui, wr, wi, _, _, _, _ = _adjoint_step(ur, ui, lr, -li, gr, gi, sr, si, kr, ki)
            ur = tl.where(ok, nur, 0.0)
            ui = tl.where(ok, nui, 0.0)
            tl.store(galpha_ptr + off, ur, mask=ok)
            tl.store(galpha_ptr + off + 1, -ui, mask=ok)
            tl.store(gbeta_ptr + off, wr, mask=ok)
            tl.store(gbeta_ptr + off + 1, -wi, mask=ok)
        # U leaving the block to the left: lane 0's U at the block's first position
        first = lane == 0
        c_r = tl.sum(tl.where(first, ur, 0.0), axis=0)
        c_i = tl.sum(tl.where(first, ui, 0.0), axis=0)


def _view(x: torch.Tensor) -> torch.Tensor:
    """complex64 (R, K) -> contiguous float32 (R, K, 2)."""
    return torch.view_as_real(x.to(torch.complex64).resolve_conj().contiguous())


def _plan(k: int) -> tuple[int, int, int]:
    """(lanes L, positions per lane S, warps) for rows of k entries: L * S covers k up to max_lanes * S."""
    s = CONFIG["steps"]
    lanes = min(CONFIG["max_lanes"], max(CONFIG["min_lanes"], triton.next_power_of_2(triton.cdiv(max(k, 1), s))))
    return lanes, s, max(1, min(8, lanes // 32))


def forward(alpha: torch.Tensor, beta: torch.Tensor, k_prev: torch.Tensor, lengths: torch.Tensor):
    """(g, gs): complex64 (R, K) each, zero at r >= lengths. alpha, beta, k_prev complex (R, K)
    (k_prev[:, 0] is not read); lengths (R,) integer, the real entries of each row."""
    r, k = alpha.shape
    g = torch.zeros((r, k), dtype=torch.complex64, device=alpha.device)
    gs = torch.zeros_like(g)
    if r * k:
        lanes, s, warps = _plan(k)
        _reduced_fwd_kernel[(r,)](
            _view(alpha),
            _view(beta),
            _view(k_prev),
            lengths.contiguous(),
            torch.view_as_real(g),
            torch.view_as_real(gs),
            k,
            L=lanes,
            S=s,
            num_warps=warps,
        )
    return g, gs


def backward(grad: torch.Tensor, g: torch.Tensor, gs: torch.Tensor, k_prev: torch.Tensor, lengths: torch.Tensor):
    """Exact vector-Jacobian product of ``forward``: (grad_alpha, grad_beta, grad_k_prev), complex64
    (R, K) each (PyTorch's convention for complex inputs), zero at padding and at k_prev[:, 0]."""
    r, k = g.shape
    g_alpha = torch.zeros((r, k), dtype=torch.complex64, device=g.device)
    g_beta, g_kp = torch.zeros_like(g_alpha), torch.zeros_like(g_alpha)
    if r * k:
        lanes, s, warps = _plan(k)
        _reduced_bwd_kernel[(r,)](
            _view(grad),
            _view(g),
            _view(gs),
            _view(k_prev),
            lengths.contiguous(),
            torch.view_as_real(g_alpha),
            torch.view_as_real(g_beta),
            torch.view_as_real(g_kp),
            k,
            L=lanes,
            S=s,
            num_warps=warps,
        )
    return g_alpha, g_beta, g_kp
