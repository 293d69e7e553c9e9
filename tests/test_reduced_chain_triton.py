"""The reduced-chain sweep of learned sparsity (resnet_bk.kernels.reduced_op / reduced_triton): the
Triton kernels against the PyTorch reference (values and exact gradients, complex couplings,
padded rows, rows spread over several blocks), the reference against gradcheck, and the sweep
under torch.compile (fullgraph: the kernel as a custom op, the reference traced).

Without a GPU the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set before the
kernel module is imported); sizes stay small.
"""

import importlib
import os
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from resnet_bk.kernels.reduced_op import reduced_sweep, reduced_sweep_reference  # noqa: E402
from resnet_bk.reduced_chain import (  # noqa: E402
    pack_kept,
    reduced_green_diagonal,
    reduced_green_diagonal_reference,
)


def _load_kernels():
    from triton.runtime.interpreter import InterpretedFunction

    from resnet_bk.kernels import reduced_triton

    if not CUDA and not isinstance(reduced_triton._reduced_fwd_kernel, InterpretedFunction):
        reduced_triton = importlib.reload(sys.modules["resnet_bk.kernels.reduced_triton"])
    return reduced_triton


reduced_triton = _load_kernels()
DEVICE = "cuda" if CUDA else "cpu"


def random_sweep(r, k, seed):
    """alpha, beta, k_prev complex128 (R, K) in the ranges the layer produces (Im alpha' < 0,
    Im beta >= 0 small, |k'| <= 1 complex), and lengths (R,) with a full row, an empty one, one of 1."""
    g = torch.Generator().manual_seed(seed)

    def c(scale, shift=0j):
        return torch.complex(torch.randn(r, k, generator=g), torch.randn(r, k, generator=g)).double() * scale + shift

    alpha = c(1.0, -2.0 - 1.0j)
    alpha = torch.complex(alpha.real, -alpha.imag.abs() - 0.5)
    beta = c(0.2)
    beta = torch.complex(beta.real, beta.imag.abs())
    k_prev = c(0.5)
    lengths = torch.randint(0, k + 1, (r,), generator=g)
    lengths[0] = k
    if r > 2:
        lengths[1], lengths[2] = 0, 1
    return alpha, beta, k_prev, lengths


def sweep_and_grads(alpha, beta, k_prev, lengths, method, weight):
    leaves = [t.detach().clone().requires_grad_() for t in (alpha, beta, k_prev)]
    out = reduced_sweep(*leaves, lengths, method)
    (out * weight.to(out.dtype)).real.sum().backward()
    return out.detach(), [t.grad for t in leaves]


# Blocks of 2 lanes x 2 positions .. 4 x 2: rows of 19 span several blocks (the carry between them),
# chunks end inside a row and past it, as at K in the thousands with the default blocks.
SMALL_BLOCKS = dict(steps=2, min_lanes=2, max_lanes=4)


@pytest.mark.parametrize("r, k, blocks", [(1, 1, {}), (3, 5, {}), (3, 19, {}), (6, 19, SMALL_BLOCKS)])
def test_kernel_equals_reference_sweep(r, k, blocks):
    alpha, beta, k_prev, lengths = random_sweep(r, k, seed=r + k)
    weight = torch.randn(r, k, dtype=torch.complex128, generator=torch.Generator().manual_seed(7))
    ref, ref_grads = sweep_and_grads(alpha, beta, k_prev, lengths, "scan", weight)
    seq = reduced_sweep(alpha, beta, k_prev, lengths, "sequential")
    torch.testing.assert_close(seq, ref, atol=1e-12, rtol=1e-12)
    dev = [t.to(DEVICE, torch.complex64) for t in (alpha, beta, k_prev)]
    with reduced_triton.config(**blocks):
        out, grads = sweep_and_grads(*dev, lengths.to(DEVICE), "triton", weight.to(DEVICE))
    assert out.dtype == torch.complex64 and out.shape == (r, k)
    valid = torch.arange(k)[None, :] < lengths[:, None]
    assert (out.cpu()[~valid] == 0).all()  # padding: exactly zero
    torch.testing.assert_close(out.cpu().to(ref.dtype), ref, atol=2e-5, rtol=2e-5)
    for name, got, want in zip(("alpha", "beta", "k_prev"), grads, ref_grads):
        torch.testing.assert_close(got.cpu().to(want.dtype), want, atol=5e-5, rtol=5e-5, msg=name)
    assert (grads[2].cpu()[:, 0] == 0).all()  # k_prev[:, 0] is not an input of the sweep


@pytest.mark.parametrize("z", [0.3 + 0.9j, "tensor"])
def test_kernel_through_reduced_green_diagonal_equals_dense(z):
    """v_kept, v_skip and z (a learned per-row tensor) get the reference's gradients through the kernel."""
    b, n = 4, 30
    keep = torch.rand(b, n, generator=torch.Generator().manual_seed(3)) > 0.55
    keep[0] = True
    keep[1] = False
    keep[1, -1] = True
    pos, valid, runs = pack_kept(keep)
    lengths = valid.sum(1)
    g = torch.Generator().manual_seed(4)
    v = torch.randn(valid.shape, dtype=torch.float64, generator=g)
    zz = torch.full((b, 1), 0.3 + 0.9j, dtype=torch.complex128) if z == "tensor" else z
    weight = torch.randn(valid.shape, dtype=torch.complex128, generator=g)

    def run(dtype, method, device):
        cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
        leaves = [
            v.to(device, dtype).clone().requires_grad_(),
            torch.tensor(-0.3, dtype=dtype, device=device).requires_grad_(),
        ]
        zl = zz.to(device, cdtype).clone().requires_grad_() if z == "tensor" else zz
        out = reduced_green_diagonal(leaves[0], runs.to(device), leaves[1], zl, method, lengths=lengths.to(device))
        (out * weight.to(device, out.dtype)).real.sum().backward()
        return out.detach().cpu(), [t.grad.cpu() for t in leaves + ([zl] if z == "tensor" else [])]

    ref, ref_grads = run(torch.float64, "scan", "cpu")
    dense = reduced_green_diagonal_reference(v, keep, -0.3, 0.3 + 0.9j)
    torch.testing.assert_close(ref, dense, atol=1e-12, rtol=1e-12)
    out, grads = run(torch.float32, "triton", DEVICE)
    torch.testing.assert_close(out.to(ref.dtype), ref, atol=2e-5, rtol=2e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.to(want.dtype), want, atol=1e-4, rtol=1e-4)


def test_reference_gradcheck():
    """The reduced core in float64 (v_kept, v_skip and a per-row z) against finite differences."""
    keep = torch.tensor(
        [[True, False, False, True, True, False, True], [False, True, False, False, False, False, True]]
    )
    pos, valid, runs = pack_kept(keep)
    g = torch.Generator().manual_seed(0)
    v = torch.randn(valid.shape, dtype=torch.float64, generator=g, requires_grad=True)
    v_skip = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    z = torch.full((2, 1), 0.1 + 0.8j, dtype=torch.complex128, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda v, s, z: reduced_green_diagonal(v, runs, s, z, lengths=valid.sum(1)), (v, v_skip, z)
    )


@pytest.mark.parametrize("method", ["scan", "triton"])
def test_custom_op_compiles_fullgraph(method):
    """torch.compile(fullgraph=True) runs the sweep as the custom op (fake shapes, registered backward):
    the same values and gradients as eager."""
    alpha, beta, k_prev, lengths = random_sweep(3, 6, seed=11)
    dtype = torch.complex64 if method == "triton" else torch.complex128
    inputs = [t.to(DEVICE, dtype) for t in (alpha, beta, k_prev)]
    weight = torch.randn(3, 6, dtype=dtype, generator=torch.Generator().manual_seed(2)).to(DEVICE)

    def loss(a, b, k):
        return (reduced_sweep(a, b, k, lengths.to(DEVICE), method) * weight).real.sum()

    results = []
    for fn in (loss, torch.compile(loss, fullgraph=True, backend="aot_eager")):
        leaves = [t.clone().requires_grad_() for t in inputs]
        value = fn(*leaves)
        value.backward()
        results.append([value.detach(), *(t.grad for t in leaves)])
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-6)


def test_opcheck():
    alpha, beta, k_prev, lengths = random_sweep(2, 4, seed=5)
    args = [t.to(DEVICE, torch.complex64).requires_grad_() for t in (alpha, beta, k_prev)]
    torch.library.opcheck(torch.ops.resnet_bk.reduced_sweep.default, (*args, lengths.to(DEVICE)))


def test_bad_method_and_dtype():
    alpha, beta, k_prev, lengths = random_sweep(2, 3, seed=1)
    with pytest.raises(ValueError, match="unknown method"):
        reduced_sweep(alpha, beta, k_prev, lengths, "dense")
    if not CUDA:
        with pytest.raises(ValueError, match="float64"):
            reduced_sweep(alpha, beta, k_prev, lengths, "triton")
    torch.testing.assert_close(
        reduced_sweep_reference(alpha, beta, k_prev, lengths), reduced_sweep(alpha, beta, k_prev, lengths, "scan")
    )
