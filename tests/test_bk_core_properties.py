"""Property tests (hypothesis) of the BK-core, resnet_bk.bk_core.green_diagonal.

Inputs: random shapes (B 1..3, N 1..48), entries of H whose magnitudes span 1e-6..1e6 with random
signs, couplings b (super) and c (sub) drawn independently (H non-symmetric, k = b c of either sign
unless a test asks for k >= 0), z = lam + i eta with eta from 1e-6 (near the real axis) to 1e2.

Properties, for the "scan" and "sequential" methods, causal and bidirectional, float64:
  1. the output is finite (when k >= 0, or for any k in practice: see below);
  2. |g_i| <= 1 / eta whenever every k_i >= 0 (docs/design.md section 2), up to rounding;
  3. it agrees with the dense float64 reference (explicit inverses).

Tolerances, and why. (2) is an exact inequality; the computed |g| may exceed 1/eta by rounding only,
so it is checked with a relative slack of 1e-9. (3) compares two float64 computations of a
possibly ill-conditioned quantity: both the recurrence and the dense solve have forward errors of
order cond(A) * eps * |G| (backward-stable algorithms; cond(A) <= ||A|| / eta for k >= 0, with
||A|| <= max|a - z| + max|b| + max|c|). So the check is |g - g_ref| <= 64 * eps * cond * max|g_ref|
+ tiny: a bound that is as strict as the problem allows, not a fixed "looks close" number; for
well-conditioned draws it is ~1e-13 relative. With k < 0 of either sign there is no such bound
on 1/|d| (a pivot d_i can pass near 0), so (3) is checked only for k >= 0 and scan vs sequential
agreement is checked instead, against the same conditioning-scaled tolerance.
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resnet_bk.bk_core import dense_green_diagonal, green_diagonal

EPS = torch.finfo(torch.float64).eps
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def problems(draw, nonneg_k: bool):
    b = draw(st.integers(1, 3))
    n = draw(st.integers(1, 48))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = 10.0 ** draw(st.floats(-6, 6))  # typical magnitude of the diagonal
    coupling = 10.0 ** draw(st.floats(-6, 6))  # typical magnitude of the off-diagonals
    g = torch.Generator().manual_seed(seed)

    def spread(shape, typical):  # magnitudes over 2 decades around `typical` (within 1e-6..1e6), random signs
        mag = typical * 10.0 ** (2 * torch.rand(shape, generator=g, dtype=torch.float64) - 1)
        mag = mag.clamp(1e-6, 1e6)  # the input range under test, not a clamp of any output
        return mag * torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0).double()

    diag = spread((b, n), scale)
    sup = spread((b, n - 1), coupling)
    sub = spread((b, n - 1), coupling)
    if nonneg_k:  # b_i c_i >= 0, still non-symmetric (b != c)
        sub = sub.abs() * sup.sign()
    eta = 10.0 ** draw(st.floats(-6, 2))
    lam = draw(st.floats(-1e3, 1e3))
    return diag, sub, sup, complex(lam, eta)


def tolerance(diag, sub, sup, z, ref):
    """64 eps cond(A) max|ref| with cond(A) <= ||A||_inf / eta (valid for k >= 0)."""
    norm = (
        (diag - z.real).abs().max().item()
        + abs(z)
        + 2 * max(sub.abs().max().item() if sub.numel() else 0.0, sup.abs().max().item() if sup.numel() else 0.0)
    )
    cond = max(1.0, norm / z.imag)
    return 64 * EPS * cond * ref.abs().max().item() + 1e-300


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("method", ["scan", "sequential"])
@SETTINGS
@given(p=problems(nonneg_k=True))
def test_finite_bounded_and_equal_to_the_dense_reference_when_k_nonnegative(p, method, causal):
    diag, sub, sup, z = p
    out = green_diagonal(diag, sub, sup, z, causal, method=method)
    assert torch.isfinite(torch.view_as_real(out)).all()
    bound = 1.0 / z.imag
    assert out.abs().max().item() <= bound * (1 + 1e-9)
    ref = dense_green_diagonal(diag, sub, sup, z, causal)
    err = (out - ref).abs().max().item()
    assert err <= tolerance(diag, sub, sup, z, ref), (err, tolerance(diag, sub, sup, z, ref))


@pytest.mark.parametrize("causal", [True, False])
@SETTINGS
@given(p=problems(nonneg_k=False))
def test_any_sign_couplings_scan_matches_sequential(p, causal):
    diag, sub, sup, z = p
    seq = green_diagonal(diag, sub, sup, z, causal, method="sequential")
    scan = green_diagonal(diag, sub, sup, z, causal, method="scan")
    finite = torch.isfinite(torch.view_as_real(seq)).all(-1)
    assert torch.equal(finite, torch.isfinite(torch.view_as_real(scan)).all(-1))
    # Relative to each entry's own size: without k >= 0 there is no a-priori cond bound, so use the
    # observed growth of the pivots, max|g| * ||A||, as the condition estimate.
    if finite.all():
        norm = (
            diag.abs().max() + abs(z) + 2 * torch.cat([sub.abs().flatten(), sup.abs().flatten(), torch.zeros(1)]).max()
        ).item()
        cond = max(1.0, seq.abs().max().item() * norm)
        tol = 64 * EPS * cond * cond * seq.abs().max().item() + 1e-300
        assert (seq - scan).abs().max().item() <= tol


@SETTINGS
@given(p=problems(nonneg_k=True))
def test_float32_inputs_stay_finite_and_bounded(p):
    diag, sub, sup, z = p
    out = green_diagonal(diag.float(), sub.float(), sup.float(), z, True, method="scan")
    assert out.dtype == torch.complex64 and torch.isfinite(torch.view_as_real(out)).all()
    # float32 rounding of H itself moves g by up to ~cond * 6e-8 relative; the bound holds to that.
    assert out.abs().max().item() <= (1.0 / z.imag) * (1 + 1e-5) or math.isclose(
        out.abs().max().item(), 1.0 / z.imag, rel_tol=1e-3
    )
