"""BK-core against the float64 dense reference: values, gradients, bounds, lengths, errors."""

import pytest
import torch

from resnet_bk.bk_core import dense_green_diagonal, green_diagonal, resolvent_bound

METHODS = ["scan", "sequential"]


def random_chain(b, n, dtype=torch.float64, scale=3.0, symmetric=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    diag = torch.randn(b, n, generator=g, dtype=dtype) * scale
    sub = torch.randn(b, max(n - 1, 0), generator=g, dtype=dtype)
    sup = sub.clone() if symmetric else torch.randn(b, max(n - 1, 0), generator=g, dtype=dtype)
    return diag, sub, sup


def rel_err(out, ref):
    return ((out.to(ref.dtype) - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n", [1, 2, 3, 8, 31])
def test_matches_dense_reference_non_symmetric(method, causal, n):
    diag, sub, sup = random_chain(3, n, seed=n)
    z = 0.4 + 0.6j
    out = green_diagonal(diag, sub, sup, z, causal, method=method)
    assert out.dtype == torch.complex128 and out.shape == (3, n)
    assert rel_err(out, dense_green_diagonal(diag, sub, sup, z, causal)) < 1e-12


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "diag_scale,coupling_scale,z",
    [(1e-6, 1e-6, 1e-3j), (1e6, 1.0, 1j), (1.0, 1e3, 0.5 + 1e-2j), (50.0, 1e-3, -3.0 + 1e-4j)],
)
def test_extreme_inputs_match_dense_reference(causal, diag_scale, coupling_scale, z):
    diag, sub, sup = random_chain(2, 24, seed=7)
    diag, sub, sup = diag * diag_scale, sub * coupling_scale, sup * coupling_scale
    ref = dense_green_diagonal(diag, sub, sup, z, causal)
    for method in METHODS:
        out = green_diagonal(diag, sub, sup, z, causal, method=method)
        assert torch.isfinite(torch.view_as_real(out)).all()
        assert rel_err(out, ref) < 1e-8


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("causal", [True, False])
def test_gradcheck_float64(method, causal):
    diag, sub, sup = random_chain(2, 9, seed=3)
    z = torch.tensor(0.3 + 0.8j, dtype=torch.complex128)
    inputs = tuple(t.requires_grad_() for t in (diag, sub, sup, z))
    f = lambda a, c, b, zz: green_diagonal(a, c, b, zz, causal, method=method)  # noqa: E731
    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("causal", [True, False])
def test_gradcheck_per_position_z_and_length_one(causal):
    for n in (1, 5):
        diag, sub, sup = random_chain(2, n, seed=11)
        z = torch.full((2, 1), 0.1 + 1.3j, dtype=torch.complex128)
        inputs = tuple(t.requires_grad_() for t in (diag, sub, sup, z))
        assert torch.autograd.gradcheck(lambda a, c, b, zz: green_diagonal(a, c, b, zz, causal), inputs)


def test_gradient_equals_dense_identity():
    """dG_ii/da_j = -G_ij G_ji: the adjoint sweep against the explicit inverse."""
    diag, sub, sup = random_chain(1, 12, seed=5)
    z = 0.2 + 0.9j
    diag.requires_grad_()
    w = torch.randn(12, dtype=torch.float64)
    (green_diagonal(diag, sub, sup, z, causal=False).real * w).sum().backward()
    from resnet_bk.bk_core import tridiagonal_matrix

    inv = torch.linalg.inv(tridiagonal_matrix(diag.detach(), sub, sup)[0].to(torch.complex128) - z * torch.eye(12))
    expected = (w[:, None] * (-inv * inv.T)).real.sum(0)
    assert torch.allclose(diag.grad[0], expected, atol=1e-12)


@pytest.mark.parametrize("causal", [True, False])
def test_resolvent_bound_holds_without_clamping(causal):
    diag, sub, _ = random_chain(4, 200, dtype=torch.float32, scale=1e3, seed=2)
    sub = sub.abs() * 10  # sub * sup >= 0
    for z in (1j, 0.5 + 0.05j, -2.0 + 3.0j):
        out = green_diagonal(diag, sub, sub, z, causal)
        assert out.abs().max().item() <= resolvent_bound(z) * (1 + 1e-5)
    # The bound is attained closely somewhere when the diagonal is near the real part of z:
    flat = torch.zeros(1, 64)
    ones = torch.ones(1, 63)
    assert green_diagonal(flat, ones * 0, ones * 0, 0.05j).abs().max().item() == pytest.approx(20.0, rel=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_float32_long_sequences_match_float64(causal):
    """The seeds' theta/phi recursion breaks near N = 1000; the Riccati form is fine at 65,536+."""
    diag, sub, sup = random_chain(2, 65_536, scale=2.0, symmetric=True, seed=9)
    diag = diag - 2.0
    ref = green_diagonal(diag, sub, sup, 1j, causal, method="scan")
    out = green_diagonal(diag.float(), sub.float(), sup.float(), 1j, causal)
    assert out.dtype == torch.complex64
    assert rel_err(out, ref) <= 1e-4


@pytest.mark.parametrize("causal", [True, False])
def test_scan_agrees_with_sequential(causal):
    diag, sub, sup = random_chain(3, 3000, scale=2.0, seed=4)
    a = green_diagonal(diag, sub, sup, 0.1 + 0.5j, causal, method="scan")
    b = green_diagonal(diag, sub, sup, 0.1 + 0.5j, causal, method="sequential")
    assert rel_err(a, b) < 1e-10
    diag.requires_grad_()
    grads = []
    for method in METHODS:
        diag.grad = None
        green_diagonal(diag, sub, sup, 0.1 + 0.5j, causal, method=method).abs().sum().backward()
        grads.append(diag.grad.clone())
    assert torch.allclose(grads[0], grads[1], rtol=1e-8, atol=1e-10)


def test_causal_core_ignores_the_future_and_bidirectional_does_not():
    diag, sub, sup = random_chain(1, 16, seed=8)
    t = 10
    moved = diag.clone()
    moved[0, t] += 1.0
    sup2 = sup.clone()
    sup2[0, t] += 1.0  # coupling between t and t+1
    for changed_diag, changed_sup in ((moved, sup), (diag, sup2)):
        before = green_diagonal(diag, sub, sup, 1j, causal=True)
        after = green_diagonal(changed_diag, sub, changed_sup, 1j, causal=True)
        first_moved = t if changed_sup is sup else t + 1
        assert torch.equal(before[:, :first_moved], after[:, :first_moved])
        assert not torch.allclose(before[:, first_moved:], after[:, first_moved:])
    bidirectional = green_diagonal(moved, sub, sup, 1j, causal=False) - green_diagonal(diag, sub, sup, 1j, causal=False)
    assert bidirectional[:, :t].abs().max() > 1e-6


def test_dtypes():
    diag, sub, sup = random_chain(1, 5, dtype=torch.float32)
    assert green_diagonal(diag, sub, sup).dtype == torch.complex64
    assert green_diagonal(diag.double(), sub.double(), sup.double()).dtype == torch.complex128
    assert green_diagonal(diag.bfloat16(), sub.bfloat16(), sup.bfloat16()).dtype == torch.complex64


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(z=1.0 + 0j), "Im z must be > 0"),
        (dict(z=1 - 1j), "Im z must be > 0"),
        (dict(z=torch.tensor([1j, -1j])), "Im z must be > 0"),
        (dict(z=2.0), "Im z must be > 0"),
    ],
)
def test_bad_z(kwargs, match):
    diag, sub, sup = random_chain(2, 4)
    with pytest.raises(ValueError, match=match):
        green_diagonal(diag, sub, sup, **kwargs)


def test_bad_shapes_and_values():
    diag, sub, sup = random_chain(2, 4)
    with pytest.raises(ValueError, match=r"sub must have shape \(B, N-1\)"):
        green_diagonal(diag, sub[:, :2], sup)
    with pytest.raises(ValueError, match="diag must have shape"):
        green_diagonal(diag[0], sub, sup)
    with pytest.raises(ValueError, match="N = 0"):
        green_diagonal(diag[:, :0], sub[:, :0], sup[:, :0])
    bad = diag.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="diag contains NaN or Inf"):
        green_diagonal(bad, sub, sup)
    with pytest.raises(ValueError, match="real floating tensor"):
        green_diagonal(diag.to(torch.complex128), sub, sup)
    with pytest.raises(ValueError, match="unknown method"):
        green_diagonal(diag, sub, sup, method="magic")
