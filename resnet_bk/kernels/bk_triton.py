"""Fused Triton kernels for the BK-core: causal and bidirectional, forward and exact backward.

The specification is the PyTorch reference in ``resnet_bk.bk_core`` (``method="scan"`` /
``"sequential"``, and ``dense_green_diagonal`` in float64); ``tests/test_bk_triton.py`` compares
values and gradients of these kernels against it, and ``tests/test_fused_resolvent.py`` the
multi-channel entry points against ``resnet_bk.layers.resolvent``'s reference path. Notation as there: alpha_i = a_i - z,
k_i = b_i c_i (real, since sub and sup are real), and

    d_0 = alpha_0,         d_i = alpha_i - k_{i-1} / d_{i-1}     (left to right)
    e_{N-1} = alpha_{N-1}, e_i = alpha_i - k_i / e_{i+1}         (right to left)
    causal g_i = 1 / d_i,  bidirectional G_i = 1 / (d_i + e_i - alpha_i).

Backward is the exact adjoint sweep (docs/design.md section 2). With lam = conj(grad) and S
the output (g or G), lam_s = -lam_out S^2 and

    u_i = lam_s_i + (k_i / d_i^2) u_{i+1}            (adjoint of d, right to left, u_N = 0)
    V_i = lam_s_i + (k_{i-1} / e_i^2) V_{i-1}        (adjoint of e, left to right, V_{-1} = 0)
    lam_alpha_i = u_i (causal)  or  u_i + V_i - lam_s_i (bidirectional)
    lam_k_j = -u_{j+1} / d_j  [ - V_j / e_{j+1} ]

Scheme: three levels, all arithmetic in float32 on real/imag parts (inputs float32/bf16/fp16).

* Thread: each thread owns S = 8 consecutive positions (a "row" of the tile [R, S]) and runs
  the recurrences over them sequentially in registers, in their cheapest form: the Riccati step
  d = alpha - k g_prev, g = 1/d (one complex reciprocal); the adjoint step u = lam_s + m u_next.
  To know where to start, it first composes its S steps into one map: the 2x2 Moebius matrix
  M_{S-1} ... M_0 with M_i = [[alpha_i, -k_{i-1}], [1, 0]] (12 flops a step, renormalised every 4
  steps; only ratios matter), or the affine map x -> B + A x for the adjoints.
* Program: one program per (chain, chunk of BLOCK = R*S positions). ``tl.associative_scan``
  over the R rows composes the row maps (log depth; a Moebius product is divided by its largest
  |component| at each combine); the state entering each row is the neighbouring row's result,
  moved over by one more small scan (registers cannot be indexed).
* Grid: rows longer than one block are cut into chunks. A "summary" launch writes each chunk's
  composed map; a one-program-per-row "carry" launch scans those (forward and/or backward) and
  writes each chunk's incoming state; the "final" launch runs the chunk from that state. A row
  that fits in one block (N <= 4096 by default) needs only the final launch: one launch forward,
  one backward. Forward's incoming states (8 floats per chunk) are kept for the backward.

Layouts. A "chain" (one tridiagonal system) is a row of the grid's axis 0. With C (a constexpr)
chains per sequence, chain r = b * C + c reads positions i of contiguous arrays at

    diag[b, i, c]   (B, N, C)          couplings[b, i, c]   (B, N-1, C)
    out[b, i, 2c], out[b, i, 2c + 1]   (B, N, 2C) float32: Re and Im of g_i (the grad likewise)

so C = 1 is the (B, N) layout of ``green_diagonal`` (out: complex64 (B, N) seen as real) and
C > 1 is the multi-channel layer's (B, N, C) projection output and (B, N, 2C) features, read and
written with no permute. Further parameters: a constant ``dshift`` added to the diagonal (the
Laplacian's -2); z as two constants, or read at z_re/z_im + b * zsb + c * zsc + i * zsn (a complex
tensor broadcast to (B, N), or one real z per channel); couplings as two arrays (k = sub * sup),
one symmetric array b (SYM: k = b^2, grad_b = 2 b grad_k), or none (HAS_K False: k = 1, nothing
read); the z gradient as per-position complex grad_alpha (Z_GRAD 1) or one (Re, Im) sum of grad_z
per program (Z_GRAD 2), summed over programs afterwards in a fixed order (no atomics). Entry points:
``forward`` / ``backward`` (C = 1) and ``features_forward`` / ``features_backward`` (C chains).
A chain's positions are C elements apart: for C > 1 the loads are not coalesced within a program;
neighbouring channels run in neighbouring programs (rows on grid axis 0) and share cache lines.

Backward recomputes d (and e) from the inputs instead of reading saved complex intermediates:
reading a, b, c (12 bytes/position in float32) is cheaper than d, e (16 bytes).

Limits: partial Moebius products are renormalised every 4 steps, so |alpha|, |k| up to ~1e9 are
fine in float32; the adjoint's products of k/d^2 are not renormalised (they are the sensitivities
themselves: if they overflow float32, so does the gradient).
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import triton
import triton.language as tl

# --------------------------------------------------------------------------------------------
# Launch configuration (module-level so benchmarks and tests can change it; see `config`).
# --------------------------------------------------------------------------------------------
CONFIG = {
    # Rows with N <= single_max run as one block per row (no summary or carry launch).
    "single_max": 4096,
    # Chunk length for longer rows (a power of two, >= min_chunk).
    "chunk": 1024,
    # Smallest chunk ever used: the saved-state buffer has cdiv(N, min_chunk) slots per row, a shape
    # that depends on N alone (so torch.compile's fake implementation can predict it).
    "min_chunk": 256,
    # Positions per thread (4 or 8) in the forward and backward kernels.
    "rows_fwd": 8,
    "rows_bwd": 8,
    # Fewest threads' rows in a single-block row (32: one warp; tests lower it, since Triton's
    # interpreter runs scans element by element).
    "min_rows": 32,
    # Most warps per program.
    "max_warps": 16,
    # Chunk summaries the carry kernel scans per loop step.
    "carry_block": 1024,
}


@contextlib.contextmanager
def config(**overrides):
    """Temporarily change launch parameters, e.g. ``with config(chunk=64, single_max=64): ...``."""
    unknown = set(overrides) - set(CONFIG)
    if unknown:
        raise KeyError(f"bk_triton.config: unknown keys {sorted(unknown)}; known: {sorted(CONFIG)}")
    old = dict(CONFIG)
    CONFIG.update(overrides)
    try:
        yield CONFIG
    finally:
        CONFIG.clear()
        CONFIG.update(old)


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------
@triton.jit
def _cmul(ar, ai, br, bi):
    return ar * br - ai * bi, ar * bi + ai * br


@triton.jit
def _cdiv(ar, ai, br, bi):
    inv = 1.0 / (br * br + bi * bi)
    return (ar * br + ai * bi) * inv, (ai * br - ar * bi) * inv


@triton.jit
def _crecip(br, bi):
    inv = 1.0 / (br * br + bi * bi)
    return br * inv, -bi * inv


@triton.jit
def _amax4(a, b, c, d):
    return tl.maximum(tl.maximum(tl.abs(a), tl.abs(b)), tl.maximum(tl.abs(c), tl.abs(d)))


@triton.jit
def _norm8(m):
    inv = 1.0 / tl.maximum(tl.maximum(_amax4(m[0], m[1], m[2], m[3]), _amax4(m[4], m[5], m[6], m[7])), 1e-30)
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
def _shift_combine4(lc, lp0, lp1, lp2, lp3, ll0, ll1, ll2, ll3, rc, rp0, rp1, rp2, rp3, rl0, rl1, rl2, rl3):
    """Scan whose 'prev' field ends up holding the previous element's 'last' (a shift by one)."""
    t = rc > 1
    return (
        lc + rc,
        tl.where(t, rp0, ll0),
        tl.where(t, rp1, ll1),
        tl.where(t, rp2, ll2),
        tl.where(t, rp3, ll3),
        rl0,
        rl1,
        rl2,
        rl3,
    )


@triton.jit
def _shift_combine2(lc, lp0, lp1, ll0, ll1, rc, rp0, rp1, rl0, rl1):
    t = rc > 1
    return lc + rc, tl.where(t, rp0, ll0), tl.where(t, rp1, ll1), rl0, rl1


@triton.jit
def _shift4(v, b0, b1, b2, b3, rr, R: tl.constexpr, REVERSE: tl.constexpr):
    """Row r receives row r-1's 4-vector (r+1's if REVERSE); the first row receives (b0..b3)."""
    cnt = tl.full([R], 1, tl.int32)
    zero = v[0] * 0.0
    s = tl.associative_scan((cnt, zero, zero, zero, zero, v[0], v[1], v[2], v[3]), 0, _shift_combine4, reverse=REVERSE)
    edge = rr == REVERSE * (R - 1)
    return (tl.where(edge, b0, s[1]), tl.where(edge, b1, s[2]), tl.where(edge, b2, s[3]), tl.where(edge, b3, s[4]))


@triton.jit
def _shift2(vr, vi, b0, b1, rr, R: tl.constexpr, REVERSE: tl.constexpr):
    cnt = tl.full([R], 1, tl.int32)
    zero = vr * 0.0
    s = tl.associative_scan((cnt, zero, zero, vr, vi), 0, _shift_combine2, reverse=REVERSE)
    edge = rr == REVERSE * (R - 1)
    return tl.where(edge, b0, s[1]), tl.where(edge, b1, s[2])


@triton.jit
def _pick(x, sel):
    """The one element of block x where sel is true, as a scalar."""
    return tl.sum(tl.where(sel, x, 0.0), axis=0)


# --------------------------------------------------------------------------------------------
# Tiles [R, S] <-> S columns [R]
# --------------------------------------------------------------------------------------------
@triton.jit
def _split4(x, R: tl.constexpr):
    e, o = tl.split(tl.reshape(x, [R, 2, 2]))  # columns (0, 2), (1, 3)
    c0, c2 = tl.split(e)
    c1, c3 = tl.split(o)
    return c0, c1, c2, c3


@triton.jit
def _join4(c, R: tl.constexpr):
    return tl.reshape(tl.join(tl.join(c[0], c[2]), tl.join(c[1], c[3])), [R, 4])


@triton.jit
def _split8(x, R: tl.constexpr):
    e, o = tl.split(tl.reshape(x, [R, 4, 2]))  # columns (0, 2, 4, 6), (1, 3, 5, 7)
    ee, eo = tl.split(tl.reshape(e, [R, 2, 2]))  # (0, 4), (2, 6)
    oe, oo = tl.split(tl.reshape(o, [R, 2, 2]))  # (1, 5), (3, 7)
    c0, c4 = tl.split(ee)
    c2, c6 = tl.split(eo)
    c1, c5 = tl.split(oe)
    c3, c7 = tl.split(oo)
    return c0, c1, c2, c3, c4, c5, c6, c7


@triton.jit
def _join8(c, R: tl.constexpr):
    e = tl.reshape(tl.join(tl.join(c[0], c[4]), tl.join(c[2], c[6])), [R, 4])
    o = tl.reshape(tl.join(tl.join(c[1], c[5]), tl.join(c[3], c[7])), [R, 4])
    return tl.reshape(tl.join(e, o), [R, 8])


@triton.jit
def _cols(x, R: tl.constexpr, S: tl.constexpr):
    if S == 8:
        out = _split8(x, R)
    else:
        out = _split4(x, R)
    return out


@triton.jit
def _tile(c, R: tl.constexpr, S: tl.constexpr):
    if S == 8:
        out = _join8(c, R)
    else:
        out = _join4(c, R)
    return out


@triton.jit
def _offsets(row, pos, L, C: tl.constexpr):
    """Element offsets of positions pos of chain `row` in a contiguous (B, L, C) array, where
    row = b * C + c (for C = 1: a (B, L) array, row = b)."""
    if C == 1:
        off = row * L + pos
    else:
        off = ((row // C) * L + pos) * C + row % C
    return off


@triton.jit
def _store_complex(ptr, row, N, rstart, pos, re, im, C: tl.constexpr, R: tl.constexpr, S: tl.constexpr):
    """Store columns (re, im) as the pair (re, im) of chain `row` at positions pos of a float32
    (B, N, 2C) array: C = 1 is a (B, N) complex64 array seen as real."""
    if C == 1:
        v = tl.reshape(tl.join(_tile(re, R, S), _tile(im, R, S)), [R, 2 * S])
        p2 = rstart[:, None] * 2 + tl.arange(0, 2 * S)[None, :]
        tl.store(ptr + row * N * 2 + p2, v, mask=p2 < 2 * N)
    else:
        off = _offsets(row, pos, N, C) * 2
        m = pos < N
        tl.store(ptr + off, _tile(re, R, S), mask=m)
        tl.store(ptr + off + 1, _tile(im, R, S), mask=m)


@triton.jit
def _load_complex(ptr, row, N, rstart, pos, C: tl.constexpr, R: tl.constexpr, S: tl.constexpr):
    """Columns (re, im) of chain `row` from a (B, N, 2C) pair array (the layout _store_complex writes)."""
    if C == 1:
        p2 = rstart[:, None] * 2 + tl.arange(0, 2 * S)[None, :]
        re, im = tl.split(tl.reshape(tl.load(ptr + row * N * 2 + p2, mask=p2 < 2 * N, other=0.0), [R, S, 2]))
    else:
        off = _offsets(row, pos, N, C) * 2
        m = pos < N
        re = tl.load(ptr + off, mask=m, other=0.0)
        im = tl.load(ptr + off + 1, mask=m, other=0.0)
    return _cols(re.to(tl.float32), R, S), _cols(im.to(tl.float32), R, S)


@triton.jit
def _store8(ptr, t, sel):
    for i in tl.static_range(8):
        tl.store(ptr + i, t[i], mask=sel)


# --------------------------------------------------------------------------------------------
# Loads
# --------------------------------------------------------------------------------------------
@triton.jit
def _load_alpha(
    diag_ptr,
    z_ptr,
    zi_ptr,
    zr,
    zi,
    zsb,
    zsc,
    zsn,
    dshift,
    row,
    pos,
    N,
    C: tl.constexpr,
    Z_TENSOR: tl.constexpr,
    R: tl.constexpr,
    S: tl.constexpr,
):
    """Columns of alpha = a + dshift - z (re, im); positions >= N read a = 0 (alpha finite).

    z is (zr, zi), or with Z_TENSOR read at z_ptr / zi_ptr + b * zsb + c * zsc + pos * zsn."""
    m = pos < N
    a = _cols(tl.load(diag_ptr + _offsets(row, pos, N, C), mask=m, other=0.0).to(tl.float32) + dshift, R, S)
    if Z_TENSOR:
        if C == 1:
            zo = row * zsb + pos * zsn
        else:
            zo = (row // C) * zsb + (row % C) * zsc + pos * zsn
        zre = _cols(tl.load(z_ptr + zo, mask=m, other=0.0).to(tl.float32), R, S)
        zim = _cols(tl.load(zi_ptr + zo, mask=m, other=1.0).to(tl.float32), R, S)
        ar = ()
        ai = ()
        for j in tl.static_range(S):
            ar = ar + (a[j] - zre[j],)
            ai = ai + (-zim[j],)
    else:
        ar = ()
        ai = ()
        for j in tl.static_range(S):
            ar = ar + (a[j] - zr,)
            ai = ai + (a[j] * 0.0 - zi,)
    return ar, ai


@triton.jit
def _load_k(sub_ptr, sup_ptr, row, pos, N, C: tl.constexpr, HAS_K: tl.constexpr, SYM: tl.constexpr):
    """k = sub * sup at positions pos (any shape), zero outside [0, N-1).

    HAS_K False: every coupling is 1 (the Laplacian; nothing read). SYM: sub and sup are the same
    array b, k = b^2 (one read)."""
    m = (pos >= 0) & (pos < N - 1)
    if HAS_K:
        off = _offsets(row, pos, N - 1, C)
        c = tl.load(sub_ptr + off, mask=m, other=0.0).to(tl.float32)
        if SYM:
            k = c * c
        else:
            k = c * tl.load(sup_ptr + off, mask=m, other=0.0).to(tl.float32)
    else:
        k = tl.where(m, 1.0, 0.0)
    return k


@triton.jit
def _load_couplings(
    sub_ptr,
    sup_ptr,
    row,
    pos,
    rstart,
    N,
    C: tl.constexpr,
    HAS_K: tl.constexpr,
    SYM: tl.constexpr,
    R: tl.constexpr,
    S: tl.constexpr,
):
    """Columns of k_j and of k_{j-1} (the latter's first column read from the previous row)."""
    kk = _cols(_load_k(sub_ptr, sup_ptr, row, pos, N, C, HAS_K, SYM), R, S)
    km = (_load_k(sub_ptr, sup_ptr, row, rstart - 1, N, C, HAS_K, SYM),)
    for j in tl.static_range(S - 1):
        km = km + (kk[j],)
    return kk, km


# --------------------------------------------------------------------------------------------
# Per-thread pieces
# --------------------------------------------------------------------------------------------
@triton.jit
def _row_mobius(ar, ai, kk, REVERSE: tl.constexpr, S: tl.constexpr):
    """The row's Moebius product (8-tuple 00r, 00i, 01r, 01i, 10r, 10i, 11r, 11i).

    Forward: M_{S-1} ... M_0 with M_j = [[alpha_j, -kk_j], [1, 0]] (pass kk = k_{j-1});
    REVERSE: N_0 ... N_{S-1} with N_j = [[alpha_j, -kk_j], [1, 0]] (pass kk = k_j)."""
    j0: tl.constexpr = REVERSE * (S - 1)
    zero = ar[0] * 0.0
    m = (ar[j0], ai[j0], -kk[j0], zero, zero + 1.0, zero, zero, zero)
    for t in tl.static_range(1, S):
        # column j = t (or S-1-t); written inline: a name bound in the loop would not stay constexpr.
        xr = ar[t + REVERSE * (S - 1 - 2 * t)]
        xi = ai[t + REVERSE * (S - 1 - 2 * t)]
        xk = kk[t + REVERSE * (S - 1 - 2 * t)]
        # [[alpha, -k], [1, 0]] @ m: row 0 <- alpha row 0 - k row 1, row 1 <- row 0
        n00r = xr * m[0] - xi * m[1] - xk * m[4]
        n00i = xr * m[1] + xi * m[0] - xk * m[5]
        n01r = xr * m[2] - xi * m[3] - xk * m[6]
        n01i = xr * m[3] + xi * m[2] - xk * m[7]
        m = (n00r, n00i, n01r, n01i, m[0], m[1], m[2], m[3])
        if t % 4 == 3:
            m = _norm8(m)
    return _norm8(m)


@triton.jit
def _apply_state(t, pr, pi, qr, qi):
    """T (p, q) for a block of matrices T (8-tuple) and a scalar state, renormalised."""
    a, b = _cmul(t[0], t[1], pr, pi)
    c, d = _cmul(t[2], t[3], qr, qi)
    e, f = _cmul(t[4], t[5], pr, pi)
    g, h = _cmul(t[6], t[7], qr, qi)
    npr = a + c
    npi = b + d
    nqr = e + g
    nqi = f + h
    inv = 1.0 / tl.maximum(_amax4(npr, npi, nqr, nqi), 1e-30)
    return npr * inv, npi * inv, nqr * inv, nqi * inv


@triton.jit
def _entering_d(ar, ai, km, rr, cpr, cpi, cqr, cqi, R: tl.constexpr, S: tl.constexpr):
    """State (p, q) entering each row for the left-to-right Riccati recurrence."""
    t = tl.associative_scan(_row_mobius(ar, ai, km, False, S), 0, _mobius_combine)
    return _shift4(_apply_state(t, cpr, cpi, cqr, cqi), cpr, cpi, cqr, cqi, rr, R, False)


@triton.jit
def _entering_e(ar, ai, kk, rr, cpr, cpi, cqr, cqi, R: tl.constexpr, S: tl.constexpr):
    """State (p, q) entering each row from the right for the right-to-left recurrence."""
    t = tl.associative_scan(_row_mobius(ar, ai, kk, True, S), 0, _mobius_combine, reverse=True)
    return _shift4(_apply_state(t, cpr, cpi, cqr, cqi), cpr, cpi, cqr, cqi, rr, R, True)


@triton.jit
def _riccati_fwd(ar, ai, km, v, S: tl.constexpr):
    """d_j and g_j = 1/d_j over the row, from the entering state v = (p, q) (g_prev = q/p)."""
    gr, gi = _cdiv(v[2], v[3], v[0], v[1])
    dr_ = ()
    di_ = ()
    gr_ = ()
    gi_ = ()
    for j in tl.static_range(S):
        dr = ar[j] - km[j] * gr
        di = ai[j] - km[j] * gi
        gr, gi = _crecip(dr, di)
        dr_ = dr_ + (dr,)
        di_ = di_ + (di,)
        gr_ = gr_ + (gr,)
        gi_ = gi_ + (gi,)
    return dr_, di_, gr_, gi_


@triton.jit
def _riccati_rev(ar, ai, kk, w, S: tl.constexpr):
    """e_j and 1/e_j over the row, right to left, from the state w entering from the right."""
    gr, gi = _cdiv(w[2], w[3], w[0], w[1])
    er_ = ()
    ei_ = ()
    gr_ = ()
    gi_ = ()
    for t in tl.static_range(S):
        er = ar[S - 1 - t] - kk[S - 1 - t] * gr
        ei = ai[S - 1 - t] - kk[S - 1 - t] * gi
        gr, gi = _crecip(er, ei)
        er_ = (er,) + er_
        ei_ = (ei,) + ei_
        gr_ = (gr,) + gr_
        gi_ = (gi,) + gi_
    return er_, ei_, gr_, gi_


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------
@triton.jit
def _fwd_kernel(
    diag_ptr,
    sub_ptr,
    sup_ptr,
    z_ptr,
    zi_ptr,
    zr,
    zi,
    zsb,
    zsc,
    zsn,
    dshift,
    out_ptr,
    summ_ptr,
    carry_ptr,
    N,
    NCA,
    C: tl.constexpr,
    HAS_K: tl.constexpr,
    SYM: tl.constexpr,
    CAUSAL: tl.constexpr,
    Z_TENSOR: tl.constexpr,
    SUMMARY: tl.constexpr,
    HAS_CARRY: tl.constexpr,
    BLOCK: tl.constexpr,
    S: tl.constexpr,
):
    R: tl.constexpr = BLOCK // S
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    rr = tl.arange(0, R)
    rstart = c * BLOCK + rr * S
    pos = rstart[:, None] + tl.arange(0, S)[None, :]

    ar, ai = _load_alpha(diag_ptr, z_ptr, zi_ptr, zr, zi, zsb, zsc, zsn, dshift, row, pos, N, C, Z_TENSOR, R, S)
    kk, km = _load_couplings(sub_ptr, sup_ptr, row, pos, rstart, N, C, HAS_K, SYM, R, S)

    if SUMMARY:
        # The chunk's products: M_end ... M_start (last row of the scan), N_start ... N_end (first).
        sbase = summ_ptr + (row * NCA + c) * 16 + rr * 0
        t = tl.associative_scan(_row_mobius(ar, ai, km, False, S), 0, _mobius_combine)
        _store8(sbase, t, rr == R - 1)
        if not CAUSAL:
            t = tl.associative_scan(_row_mobius(ar, ai, kk, True, S), 0, _mobius_combine, reverse=True)
            _store8(sbase + 8, t, rr == 0)
    else:
        one = tl.sum(rr * 0, axis=0).to(tl.float32) + 1.0
        zero = one * 0.0
        if HAS_CARRY:
            cbase = carry_ptr + (row * NCA + c) * 8
            v = _entering_d(
                ar, ai, km, rr, tl.load(cbase), tl.load(cbase + 1), tl.load(cbase + 2), tl.load(cbase + 3), R, S
            )
        else:
            v = _entering_d(ar, ai, km, rr, one, zero, zero, zero, R, S)
        dr, di, gr, gi = _riccati_fwd(ar, ai, km, v, S)
        if not CAUSAL:
            if HAS_CARRY:
                w = _entering_e(
                    ar, ai, kk, rr, tl.load(cbase + 4), tl.load(cbase + 5), tl.load(cbase + 6), tl.load(cbase + 7), R, S
                )
            else:
                w = _entering_e(ar, ai, kk, rr, one, zero, zero, zero, R, S)
            er, ei, _hr, _hi = _riccati_rev(ar, ai, kk, w, S)
            gr = ()
            gi = ()
            for j in tl.static_range(S):
                xr, xi = _crecip(dr[j] + er[j] - ar[j], di[j] + ei[j] - ai[j])
                gr = gr + (xr,)
                gi = gi + (xi,)
        _store_complex(out_ptr, row, N, rstart, pos, gr, gi, C, R, S)


# --------------------------------------------------------------------------------------------
# Carries: one program per (batch row, direction) scans the chunk summaries
# --------------------------------------------------------------------------------------------
@triton.jit
def _carry_kernel(
    summ_ptr,
    carry_ptr,
    NC,
    NCA,
    MOBIUS: tl.constexpr,
    HAS_FWD: tl.constexpr,
    FWD_SOFF: tl.constexpr,
    FWD_COFF: tl.constexpr,
    REV_SOFF: tl.constexpr,
    REV_COFF: tl.constexpr,
    SSTRIDE: tl.constexpr,
    CSTRIDE: tl.constexpr,
    CB: tl.constexpr,
):
    """carry[c] = the state entering chunk c: forward, the summaries of chunks 0..c-1 applied (in
    order) to the initial state; reverse, those of chunks NC-1..c+1. Initial state: (p, q) = (1, 0)
    for Moebius summaries (16 floats per chunk), x = 0 for affine maps (8 floats per chunk)."""
    row = tl.program_id(0).to(tl.int64)
    if HAS_FWD:
        rev = tl.program_id(1) == 1
    else:
        rev = tl.program_id(1) >= 0
    soff = tl.where(rev, REV_SOFF, FWD_SOFF)
    coff = tl.where(rev, REV_COFF, FWD_COFF)
    idx = tl.arange(0, CB)
    sbase = summ_ptr + row * NCA * SSTRIDE + soff
    cbase = carry_ptr + row * NCA * CSTRIDE + coff
    one = tl.sum(idx * 0, axis=0).to(tl.float32) + 1.0
    zero = one * 0.0
    last = idx == CB - 1
    if MOBIUS:
        pr, pi, qr, qi = one, zero, zero, zero
    else:
        pr, pi = zero, zero
    first_slot = tl.where(rev, NC - 1, 0)
    fs = cbase + first_slot * CSTRIDE + idx * 0
    tl.store(fs, pr + idx * 0.0, mask=idx == 0)
    tl.store(fs + 1, pi + idx * 0.0, mask=idx == 0)
    if MOBIUS:
        tl.store(fs + 2, qr + idx * 0.0, mask=idx == 0)
        tl.store(fs + 3, qi + idx * 0.0, mask=idx == 0)
    for s in range(0, NC, CB):
        # chunk index in application order (left to right, or right to left)
        cc = tl.where(rev, NC - 1 - s - idx, s + idx)
        m = (cc >= 0) & (cc < NC)
        sp = sbase + cc * SSTRIDE
        dst = tl.where(rev, cc - 1, cc + 1)  # the chunk this state enters
        dm = m & (dst >= 0) & (dst < NC)
        dp = cbase + dst * CSTRIDE
        if MOBIUS:
            t = tl.associative_scan(
                (
                    tl.load(sp, mask=m, other=1.0),
                    tl.load(sp + 1, mask=m, other=0.0),
                    tl.load(sp + 2, mask=m, other=0.0),
                    tl.load(sp + 3, mask=m, other=0.0),
                    tl.load(sp + 4, mask=m, other=0.0),
                    tl.load(sp + 5, mask=m, other=0.0),
                    tl.load(sp + 6, mask=m, other=1.0),
                    tl.load(sp + 7, mask=m, other=0.0),
                ),
                0,
                _mobius_combine,
            )
            st = _apply_state(t, pr, pi, qr, qi)
            tl.store(dp, st[0], mask=dm)
            tl.store(dp + 1, st[1], mask=dm)
            tl.store(dp + 2, st[2], mask=dm)
            tl.store(dp + 3, st[3], mask=dm)
            pr, pi, qr, qi = _pick(st[0], last), _pick(st[1], last), _pick(st[2], last), _pick(st[3], last)
        else:
            t = tl.associative_scan(
                (
                    tl.load(sp, mask=m, other=1.0),
                    tl.load(sp + 1, mask=m, other=0.0),
                    tl.load(sp + 2, mask=m, other=0.0),
                    tl.load(sp + 3, mask=m, other=0.0),
                ),
                0,
                _affine_combine,
            )
            xr, xi = _cmul(t[0], t[1], pr, pi)
            xr += t[2]
            xi += t[3]
            tl.store(dp, xr, mask=dm)
            tl.store(dp + 1, xi, mask=dm)
            pr, pi = _pick(xr, last), _pick(xi, last)


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------
@triton.jit
def _bwd_kernel(
    diag_ptr,
    sub_ptr,
    sup_ptr,
    z_ptr,
    zi_ptr,
    zr,
    zi,
    zsb,
    zsc,
    zsn,
    dshift,
    grad_ptr,
    fcarry_ptr,
    asum_ptr,
    bcarry_ptr,
    gdiag_ptr,
    gsub_ptr,
    gsup_ptr,
    galpha_ptr,
    N,
    NCA,
    C: tl.constexpr,
    HAS_K: tl.constexpr,
    SYM: tl.constexpr,
    CAUSAL: tl.constexpr,
    Z_TENSOR: tl.constexpr,
    SUMMARY: tl.constexpr,
    HAS_CARRY: tl.constexpr,
    Z_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
    S: tl.constexpr,
):
    R: tl.constexpr = BLOCK // S
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    rr = tl.arange(0, R)
    rstart = c * BLOCK + rr * S
    pos = rstart[:, None] + tl.arange(0, S)[None, :]
    valid = pos < N

    ar, ai = _load_alpha(diag_ptr, z_ptr, zi_ptr, zr, zi, zsb, zsc, zsn, dshift, row, pos, N, C, Z_TENSOR, R, S)
    kk, km = _load_couplings(sub_ptr, sup_ptr, row, pos, rstart, N, C, HAS_K, SYM, R, S)
    gre, gim = _load_complex(grad_ptr, row, N, rstart, pos, C, R, S)

    one = tl.sum(rr * 0, axis=0).to(tl.float32) + 1.0
    zero = one * 0.0
    # Recompute d (and e) from the chunk's saved incoming states.
    if HAS_CARRY:
        cbase = fcarry_ptr + (row * NCA + c) * 8
        v = _entering_d(
            ar, ai, km, rr, tl.load(cbase), tl.load(cbase + 1), tl.load(cbase + 2), tl.load(cbase + 3), R, S
        )
    else:
        v = _entering_d(ar, ai, km, rr, one, zero, zero, zero, R, S)
    dr, di, gdr, gdi = _riccati_fwd(ar, ai, km, v, S)
    if CAUSAL:
        sr = gdr
        si = gdi
    else:
        if HAS_CARRY:
            w = _entering_e(
                ar, ai, kk, rr, tl.load(cbase + 4), tl.load(cbase + 5), tl.load(cbase + 6), tl.load(cbase + 7), R, S
            )
        else:
            w = _entering_e(ar, ai, kk, rr, one, zero, zero, zero, R, S)
        er, ei, ger, gei = _riccati_rev(ar, ai, kk, w, S)
        ge_edge_r, ge_edge_i = _cdiv(w[2], w[3], w[0], w[1])  # 1/e at the first position of the next row
        sr = ()
        si = ()
        for j in tl.static_range(S):
            xr, xi = _crecip(dr[j] + er[j] - ar[j], di[j] + ei[j] - ai[j])
            sr = sr + (xr,)
            si = si + (xi,)

    # lam_s = -conj(grad) S^2 ; m_j = k_j / d_j^2 ; row map of the u recurrence (right to left)
    lsr = ()
    lsi = ()
    mr = ()
    mi = ()
    for j in tl.static_range(S):
        s2r, s2i = _cmul(sr[j], si[j], sr[j], si[j])
        xr, xi = _cmul(-gre[j], gim[j], s2r, s2i)
        lsr = lsr + (xr,)
        lsi = lsi + (xi,)
        g2r, g2i = _cmul(gdr[j], gdi[j], gdr[j], gdi[j])
        mr = mr + (kk[j] * g2r,)
        mi = mi + (kk[j] * g2i,)
    uar = one + rr * 0.0
    uai = zero + rr * 0.0
    ubr = uai
    ubi = uai
    for t in tl.static_range(S):
        nar, nai = _cmul(mr[S - 1 - t], mi[S - 1 - t], uar, uai)
        nbr, nbi = _cmul(mr[S - 1 - t], mi[S - 1 - t], ubr, ubi)
        uar, uai, ubr, ubi = nar, nai, nbr + lsr[S - 1 - t], nbi + lsi[S - 1 - t]
    U = tl.associative_scan((uar, uai, ubr, ubi), 0, _affine_combine, reverse=True)
    if not CAUSAL:
        # V recurrence (left to right): V_j = lam_s_j + mV_j V_{j-1}, mV_j = k_{j-1} / e_j^2
        vmr = ()
        vmi = ()
        for j in tl.static_range(S):
            g2r, g2i = _cmul(ger[j], gei[j], ger[j], gei[j])
            vmr = vmr + (km[j] * g2r,)
            vmi = vmi + (km[j] * g2i,)
        var = one + rr * 0.0
        vai = zero + rr * 0.0
        vbr = vai
        vbi = vai
        for j in tl.static_range(S):
            nar, nai = _cmul(vmr[j], vmi[j], var, vai)
            nbr, nbi = _cmul(vmr[j], vmi[j], vbr, vbi)
            var, vai, vbr, vbi = nar, nai, nbr + lsr[j], nbi + lsi[j]
        Vs = tl.associative_scan((var, vai, vbr, vbi), 0, _affine_combine)

    if SUMMARY:
        abase = asum_ptr + (row * NCA + c) * 8 + rr * 0
        first = rr == 0
        tl.store(abase + 0, U[0], mask=first)
        tl.store(abase + 1, U[1], mask=first)
        tl.store(abase + 2, U[2], mask=first)
        tl.store(abase + 3, U[3], mask=first)
        if not CAUSAL:
            lastr = rr == R - 1
            tl.store(abase + 4, Vs[0], mask=lastr)
            tl.store(abase + 5, Vs[1], mask=lastr)
            tl.store(abase + 6, Vs[2], mask=lastr)
            tl.store(abase + 7, Vs[3], mask=lastr)
    else:
        if HAS_CARRY:
            bbase = bcarry_ptr + (row * NCA + c) * 4
            cwr = tl.load(bbase)
            cwi = tl.load(bbase + 1)
        else:
            cwr = zero
            cwi = zero
        # u at each row's first position, then moved to the row on its left: u entering from the right.
        xr, xi = _cmul(U[0], U[1], cwr, cwi)
        unr, uni = _shift2(xr + U[2], xi + U[3], cwr, cwi, rr, R, True)
        if not CAUSAL:
            if HAS_CARRY:
                cvr = tl.load(bbase + 2)
                cvi = tl.load(bbase + 3)
            else:
                cvr = zero
                cvi = zero
            xr, xi = _cmul(Vs[0], Vs[1], cvr, cvi)
            vpr, vpi = _shift2(xr + Vs[2], xi + Vs[3], cvr, cvi, rr, R, False)
            Vr = ()
            Vi = ()
            for j in tl.static_range(S):
                xr, xi = _cmul(vmr[j], vmi[j], vpr, vpi)
                vpr = xr + lsr[j]
                vpi = xi + lsi[j]
                Vr = Vr + (vpr,)
                Vi = Vi + (vpi,)
        lar = ()
        lai = ()
        lkr = ()
        for t in tl.static_range(S):
            # column j = S-1-t (inline, to stay constexpr). lam_k_j = -u_{j+1} / d_j  [- V_j / e_{j+1}]
            xr, xi = _cmul(unr, uni, gdr[S - 1 - t], gdi[S - 1 - t])
            lk = -xr
            xr, xi = _cmul(mr[S - 1 - t], mi[S - 1 - t], unr, uni)
            unr = xr + lsr[S - 1 - t]
            uni = xi + lsi[S - 1 - t]
            if CAUSAL:
                lar = (unr,) + lar
                lai = (uni,) + lai
            else:
                if t == 0:
                    yr, yi = _cmul(Vr[S - 1], Vi[S - 1], ge_edge_r, ge_edge_i)
                else:
                    yr, yi = _cmul(Vr[S - 1 - t], Vi[S - 1 - t], ger[S - t], gei[S - t])
                lk -= yr
                lar = (unr + Vr[S - 1 - t] - lsr[S - 1 - t],) + lar
                lai = (uni + Vi[S - 1 - t] - lsi[S - 1 - t],) + lai
            lkr = (lk,) + lkr
        # gradients w.r.t. the real inputs: Re(conj(lam)) = Re(lam)
        tl.store(gdiag_ptr + _offsets(row, pos, N, C), _tile(lar, R, S).to(gdiag_ptr.dtype.element_ty), mask=valid)
        if HAS_K:
            kmask = pos < N - 1
            koff = _offsets(row, pos, N - 1, C)
            lk = _tile(lkr, R, S)
            cvals = tl.load(sub_ptr + koff, mask=kmask, other=0.0).to(tl.float32)
            if SYM:  # k = b^2: dk/db = 2 b
                tl.store(gsub_ptr + koff, (2.0 * lk * cvals).to(gsub_ptr.dtype.element_ty), mask=kmask)
            else:
                bvals = tl.load(sup_ptr + koff, mask=kmask, other=0.0).to(tl.float32)
                tl.store(gsub_ptr + koff, (lk * bvals).to(gsub_ptr.dtype.element_ty), mask=kmask)
                tl.store(gsup_ptr + koff, (lk * cvals).to(gsup_ptr.dtype.element_ty), mask=kmask)
        if Z_GRAD == 1:  # grad_alpha per position, complex (C = 1 layout)
            nlai = ()
            for j in tl.static_range(S):
                nlai = nlai + (-lai[j],)
            _store_complex(galpha_ptr, row, N, rstart, pos, lar, nlai, C, R, S)
        if Z_GRAD == 2:  # this program's sums of grad_z = -grad_alpha: (Re, Im) at (row, chunk)
            zre_sum = -tl.sum(tl.sum(tl.where(valid, _tile(lar, R, S), 0.0), axis=1), axis=0)
            zim_sum = tl.sum(tl.sum(tl.where(valid, _tile(lai, R, S), 0.0), axis=1), axis=0)
            zbase = galpha_ptr + (row * tl.num_programs(1) + c) * 2
            tl.store(zbase, zre_sum)
            tl.store(zbase + 1, zim_sum)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def plan(n: int, backward: bool = False) -> tuple:
    """(BLOCK, number of chunks, num_warps, positions per thread S) for a row of length n."""
    cfg = CONFIG
    s = cfg["rows_bwd" if backward else "rows_fwd"]
    if n <= cfg["single_max"]:
        block = max(s * cfg["min_rows"], _next_pow2(n))
    else:
        block = cfg["chunk"]
        if block < cfg["min_chunk"] or block & (block - 1) or block < 2 * s:
            raise ValueError(f"bk_triton: chunk must be a power of two >= min_chunk and >= 2 S, got {CONFIG}")
    warps = min(cfg["max_warps"], max(1, block // (32 * s)))
    return block, triton.cdiv(n, block), warps, s


def carry_slots(n: int) -> int:
    """Saved incoming states per row: depends on n (and min_chunk) only."""
    return triton.cdiv(n, CONFIG["min_chunk"])


def _z_args(z, b: int, n: int, device):
    """(re_ptr, im_ptr, zr, zi, zsb, zsc, zsn, Z_TENSOR) for a Python complex or a complex tensor
    broadcastable to (B, N) (one chain per row, C = 1)."""
    if isinstance(z, torch.Tensor):
        zv = torch.view_as_real(z.to(device=device, dtype=torch.complex64).expand(b, n))
        return zv[..., 0], zv[..., 1], 0.0, 0.0, zv.stride(0), 0, zv.stride(1), True
    z = complex(z)
    return None, None, float(z.real), float(z.imag), 0, 0, 0, False


def _channel_z_args(z_re, z_im, device):
    """The same for one z per channel: real (C,) tensors z_re, z_im, or two Python floats."""
    if isinstance(z_re, torch.Tensor):
        zr, zi = z_re.to(device, torch.float32), z_im.to(device, torch.float32)
        if zr.stride(0) != zi.stride(0):
            zr, zi = zr.contiguous(), zi.contiguous()
        return zr, zi, 0.0, 0.0, 0, zr.stride(0), 0, True
    return None, None, float(z_re), float(z_im), 0, 0, 0, False


def _contig(x: torch.Tensor) -> torch.Tensor:
    return x if x.is_contiguous() else x.contiguous()


def _launch(kernel, grid, args, consts, num_warps):
    kernel[grid](*args, **consts, num_warps=num_warps)


class Layout(NamedTuple):
    """rows = B * channels chains of length n in (B, n, channels) arrays; dshift added to the
    diagonal; couplings: has_k (else k = 1) and sym (one array b, k = b^2; else k = sub * sup)."""

    rows: int
    n: int
    channels: int
    dshift: float
    has_k: bool
    sym: bool


def _run_forward(diag, sub, sup, out, lay: Layout, zargs, causal):
    """Launch the forward; write out (float32 (B, n, 2 * channels)) and return the saved incoming
    states (rows, carry_slots(n), 8)."""
    rows, n = lay.rows, lay.n
    zp, zip_, zr, zi, zsb, zsc, zsn, z_tensor = zargs
    if not z_tensor:  # valid pointers that are never read
        zp = zip_ = out
    block, nc, warps, s = plan(n)
    nca = carry_slots(n)
    carries = torch.empty((rows, nca, 8), dtype=torch.float32, device=out.device)
    grid = (rows, nc)
    layout = dict(C=lay.channels, HAS_K=lay.has_k, SYM=lay.sym, CAUSAL=causal, Z_TENSOR=z_tensor, BLOCK=block, S=s)
    dshift = lay.dshift
    if nc > 1:
        summ = torch.empty((rows, nca, 16), dtype=torch.float32, device=out.device)
        _launch(
            _fwd_kernel,
            grid,
            (diag, sub, sup, zp, zip_, zr, zi, zsb, zsc, zsn, dshift, out, summ, carries, n, nca),
            dict(layout, SUMMARY=True, HAS_CARRY=True),
            warps,
        )
        cb = min(CONFIG["carry_block"], max(16, _next_pow2(nc)))
        _launch(
            _carry_kernel,
            (rows, 1 if causal else 2),
            (summ, carries, nc, nca),
            dict(
                MOBIUS=True, HAS_FWD=True, FWD_SOFF=0, FWD_COFF=0, REV_SOFF=8, REV_COFF=4, SSTRIDE=16, CSTRIDE=8, CB=cb
            ),
            4,
        )
    else:
        summ = carries
    _launch(
        _fwd_kernel,
        grid,
        (diag, sub, sup, zp, zip_, zr, zi, zsb, zsc, zsn, dshift, out, summ, carries, n, nca),
        dict(layout, SUMMARY=False, HAS_CARRY=nc > 1),
        warps,
    )
    return carries


def _run_backward(grad, diag, sub, sup, carries, grads, lay: Layout, zargs, causal, z_grad: int):
    """Launch the backward; write grads = (g_diag, g_sub, g_sup, g_z) (z_grad 1: per-position
    complex grad_alpha in g_z; 2: per-(row, chunk) sums of grad_z; 0: nothing)."""
    rows, n = lay.rows, lay.n
    g_diag, g_sub, g_sup, g_z = grads
    zp, zip_, zr, zi, zsb, zsc, zsn, z_tensor = zargs
    if not z_tensor:
        zp = zip_ = grad
    block, nc, warps, s = plan(n, backward=True)
    if plan(n)[1] != nc:
        raise ValueError("bk_triton: forward and backward must cut rows into the same chunks")
    nca = carry_slots(n)
    grid = (rows, nc)
    layout = dict(C=lay.channels, HAS_K=lay.has_k, SYM=lay.sym, CAUSAL=causal, Z_TENSOR=z_tensor, BLOCK=block, S=s)
    layout.update(Z_GRAD=z_grad)
    dshift = lay.dshift
    if nc > 1:
        asum = torch.empty((rows, nca, 8), dtype=torch.float32, device=grad.device)
        bcar = torch.empty((rows, nca, 4), dtype=torch.float32, device=grad.device)
        _launch(
            _bwd_kernel,
            grid,
            (diag, sub, sup, zp, zip_, zr, zi, zsb, zsc, zsn, dshift, grad, carries, asum, bcar)
            + (g_diag, g_sub, g_sup, g_z, n, nca),
            dict(layout, SUMMARY=True, HAS_CARRY=True),
            warps,
        )
        cb = min(CONFIG["carry_block"], max(16, _next_pow2(nc)))
        # u (right to left) at offset 0, V (left to right) at offset 4 of the summaries.
        _launch(
            _carry_kernel,
            (rows, 1 if causal else 2),
            (asum, bcar, nc, nca),
            dict(
                MOBIUS=False,
                HAS_FWD=not causal,
                FWD_SOFF=4,
                FWD_COFF=2,
                REV_SOFF=0,
                REV_COFF=0,
                SSTRIDE=8,
                CSTRIDE=4,
                CB=cb,
            ),
            4,
        )
    else:
        asum = bcar = carries
    _launch(
        _bwd_kernel,
        grid,
        (diag, sub, sup, zp, zip_, zr, zi, zsb, zsc, zsn, dshift, grad, carries, asum, bcar)
        + (g_diag, g_sub, g_sup, g_z, n, nca),
        dict(layout, SUMMARY=False, HAS_CARRY=nc > 1),
        warps,
    )


# --------------------------------------------------------------------------------------------
# Entry points: one chain per row (B, N), and C chains per sequence (B, N, C)
# --------------------------------------------------------------------------------------------
def forward(diag: torch.Tensor, sub: torch.Tensor, sup: torch.Tensor, z, causal: bool):
    """g (causal) or G (bidirectional), complex64 (B, N), and the saved per-chunk incoming states.

    Args as ``green_diagonal`` (real float32/bfloat16/float16 diag (B, N), sub/sup (B, N-1);
    z a Python complex or a complex tensor broadcastable to (B, N)).
    Returns (out, carries) with carries float32 (B, carry_slots(N), 8).
    """
    b, n = diag.shape
    diag, sub, sup = _contig(diag), _contig(sub), _contig(sup)
    if n == 1:  # no couplings: point sub/sup at valid memory, every load of them is masked anyway
        sub = sup = diag
    out = torch.empty((b, n), dtype=torch.complex64, device=diag.device)
    zargs = _z_args(z, b, n, diag.device)
    lay = Layout(rows=b, n=n, channels=1, dshift=0.0, has_k=True, sym=False)
    carries = _run_forward(diag, sub, sup, torch.view_as_real(out), lay, zargs, causal)
    return out, carries


def backward(
    grad: torch.Tensor,
    diag: torch.Tensor,
    sub: torch.Tensor,
    sup: torch.Tensor,
    z,
    carries: torch.Tensor,
    causal: bool,
    z_grad: bool,
):
    """Exact vector-Jacobian product of ``forward``.

    Returns (grad_diag, grad_sub, grad_sup, grad_alpha) where grad_alpha (complex64 (B, N), the
    gradient w.r.t. alpha = diag - z, so grad_z = -grad_alpha summed to z's shape) is None unless
    z_grad.
    """
    b, n = diag.shape
    sub_dtype, sup_dtype = sub.dtype, sup.dtype
    diag, sub, sup = _contig(diag), _contig(sub), _contig(sup)
    if n == 1:
        sub = sup = diag
    grad = torch.view_as_real(_contig(grad.to(torch.complex64).resolve_conj()))
    dev = diag.device
    g_diag = torch.empty((b, n), dtype=diag.dtype, device=dev)
    g_sub = torch.empty((b, max(n - 1, 1)), dtype=sub_dtype, device=dev)
    g_sup = torch.empty((b, max(n - 1, 1)), dtype=sup_dtype, device=dev)
    g_alpha = torch.empty((b, n), dtype=torch.complex64, device=dev) if z_grad else None
    gav = torch.view_as_real(g_alpha) if z_grad else g_diag
    zargs = _z_args(z, b, n, dev)
    lay = Layout(rows=b, n=n, channels=1, dshift=0.0, has_k=True, sym=False)
    _run_backward(grad, diag, sub, sup, carries, (g_diag, g_sub, g_sup, gav), lay, zargs, causal, 1 if z_grad else 0)
    return g_diag, g_sub[:, : n - 1], g_sup[:, : n - 1], g_alpha


def features_forward(v: torch.Tensor, couplings, z_re, z_im, causal: bool, dshift: float = -2.0):
    """The resolvent features of C chains per sequence, read and written in the model's layouts.

    Chain c of sequence b is H = tridiag(b_c, dshift + v[b, :, c], b_c) with shift z_c.

    Args:
        v: (B, N, C) real potentials, float32/bfloat16/float16 (made contiguous if it is not).
        couplings: (B, N-1, C) real b_i joining positions i and i+1 (sub = sup = b, k = b^2), or
            None for b = 1 (nothing is read).
        z_re, z_im: (C,) real tensors, or Python floats for one z of every channel.
        causal: g_i (positions 0..i) or the bidirectional G_ii.
        dshift: constant added to the diagonal (-2: the Laplacian's).
    Returns:
        (features, carries): features float32 (B, N, 2C), [Re g_c, Im g_c] at each position;
        carries float32 (B * C, carry_slots(N), 8), the saved chunk states for ``features_backward``.
    """
    b, n, c = v.shape
    v = _contig(v)
    k = _contig(couplings) if couplings is not None and n > 1 else v
    out = torch.empty((b, n, 2 * c), dtype=torch.float32, device=v.device)
    zargs = _channel_z_args(z_re, z_im, v.device)
    lay = Layout(rows=b * c, n=n, channels=c, dshift=float(dshift), has_k=couplings is not None, sym=True)
    carries = _run_forward(v, k, k, out, lay, zargs, causal)
    return out, carries


def features_backward(
    grad: torch.Tensor,
    v: torch.Tensor,
    couplings,
    z_re,
    z_im,
    carries: torch.Tensor,
    causal: bool,
    z_grad: bool,
    dshift: float = -2.0,
):
    """Exact vector-Jacobian product of ``features_forward``.

    Args: grad, the (B, N, 2C) gradient of the features; the rest as ``features_forward`` (carries
    its second output); z_grad: also return the gradient of z (z_re, z_im must be tensors).
    Returns (grad_v (B, N, C) v.dtype, grad_couplings (B, N-1, C) couplings.dtype or None,
    grad_z float32 (C, 2) [d/d Re z_c, d/d Im z_c] summed over batch and positions, or None).
    grad_z is summed in a fixed order (per-program sums, then a tensor sum): deterministic.
    """
    b, n, c = v.shape
    v = _contig(v)
    has_k = couplings is not None
    k = _contig(couplings) if has_k and n > 1 else v
    grad = _contig(grad.to(torch.float32))
    dev = v.device
    g_v = torch.empty((b, n, c), dtype=v.dtype, device=dev)
    g_k = torch.empty((b, n - 1, c), dtype=couplings.dtype, device=dev) if has_k else None
    nc = plan(n, backward=True)[1]
    g_z = torch.empty((b * c, nc, 2), dtype=torch.float32, device=dev) if z_grad else None
    zargs = _channel_z_args(z_re, z_im, dev)
    grads = (g_v, g_k if (has_k and n > 1) else g_v, g_v, g_z if z_grad else g_v)  # unused ones: never written
    lay = Layout(rows=b * c, n=n, channels=c, dshift=float(dshift), has_k=has_k, sym=True)
    _run_backward(grad, v, k, k, carries, grads, lay, zargs, causal, 2 if z_grad else 0)
    return g_v, g_k, (g_z.view(b, c, nc, 2).sum((0, 2)) if z_grad else None)
