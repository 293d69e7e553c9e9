"""Triton BK-core kernels against the float64 reference: values, exact gradients, dispatch, compile.

Without a GPU the kernels run in Triton's CPU interpreter. ``@triton.jit`` decides at decoration
time whether a kernel is interpreted, so TRITON_INTERPRET=1 is set here before the kernel module
is first imported (and the module is reloaded if something imported it earlier without it).
Sizes stay small: the interpreter runs every scan element by element in Python. Small chunks
(16 positions) make rows of 17..40 positions span several chunks, so the cross-chunk summaries and
carries are exercised as on a GPU at N in the thousands.
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

from resnet_bk import bk_core  # noqa: E402
from resnet_bk.bk_core import dense_green_diagonal, green_diagonal, use_method  # noqa: E402
from resnet_bk.kernels import bk_op  # noqa: E402


def _load_kernels():
    from triton.runtime.interpreter import InterpretedFunction

    from resnet_bk.kernels import bk_triton

    if not CUDA and not isinstance(bk_triton._fwd_kernel, InterpretedFunction):
        bk_triton = importlib.reload(sys.modules["resnet_bk.kernels.bk_triton"])
    return bk_triton


bk_triton = _load_kernels()
DEVICE = "cuda" if CUDA else "cpu"
# Rows longer than 16 positions run as several chunks of 16 (4 threads of 4 positions); the carry
# kernel folds 2 chunk summaries a step. SMALL_CHUNKS_S8: chunks of 32 with 8 positions per thread.
SMALL_CHUNKS = dict(single_max=16, chunk=16, min_chunk=16, rows_fwd=4, rows_bwd=4, carry_block=2, min_rows=4)
SMALL_CHUNKS_S8 = dict(single_max=32, chunk=32, min_chunk=32, rows_fwd=8, rows_bwd=8, carry_block=2, min_rows=4)


def random_chain(b, n, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    diag = torch.randn(b, n, generator=g, dtype=torch.float64) * scale
    sub = torch.randn(b, max(n - 1, 0), generator=g, dtype=torch.float64)
    sup = torch.randn(b, max(n - 1, 0), generator=g, dtype=torch.float64)  # non-symmetric: k = sub*sup < 0 too
    return diag, sub, sup


def rel_err(out, ref):
    if ref.numel() == 0:
        return 0.0
    return ((out.detach().cpu().to(ref.dtype) - ref).abs().max() / ref.abs().max()).item()


def values_and_grads(diag, sub, sup, z, causal, method, weight):
    """out and the gradients of sum(weight * [Re out, Im out]) w.r.t. diag, sub, sup (and z if a tensor)."""
    leaves = [t.detach().clone().requires_grad_() for t in (diag, sub, sup)]
    zz = z.detach().clone().requires_grad_() if isinstance(z, torch.Tensor) else z
    out = green_diagonal(*leaves, zz, causal, method=method)
    (torch.view_as_real(out).to(weight.dtype) * weight.to(out.device)).sum().backward()
    grads = [t.grad for t in leaves] + ([zz.grad] if isinstance(z, torch.Tensor) else [])
    return out, grads


def check_against_reference(b, n, causal, z, seed, tol=2e-5, dtype=torch.float32):
    diag, sub, sup = random_chain(b, n, seed)
    weight = torch.randn(b, n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    ref, ref_grads = values_and_grads(diag, sub, sup, z, causal, "scan", weight)
    if n <= 40:  # the scan path itself against explicit inverses
        assert rel_err(ref, dense_green_diagonal(diag, sub, sup, z, causal)) < 1e-11
    dev = [t.to(DEVICE, dtype) for t in (diag, sub, sup)]
    zd = z.to(DEVICE, torch.complex64) if isinstance(z, torch.Tensor) else z
    out, grads = values_and_grads(*dev, zd, causal, "triton", weight)
    assert out.dtype == torch.complex64 and out.shape == (b, n)
    assert rel_err(out, ref) < tol
    for g, r in zip(grads, ref_grads):
        assert g.shape == r.shape and g.dtype == (dtype if r.dtype == torch.float64 else torch.complex64)
        assert rel_err(g, r) < tol, (rel_err(g, r), g, r)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n", [1, 2, 11])
def test_single_block_matches_reference(causal, n):
    """One block per row (one launch each way), N = 1, 2 and not a power of two."""
    with bk_triton.config(**SMALL_CHUNKS):
        check_against_reference(3, n, causal, 0.4 + 0.6j, seed=n)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n,cfg", [(17, SMALL_CHUNKS), (40, SMALL_CHUNKS), (70, SMALL_CHUNKS_S8)])
def test_multi_chunk_matches_reference(causal, n, cfg):
    """Several chunks per row, the last one partial (N not a multiple of the chunk)."""
    with bk_triton.config(**cfg):
        check_against_reference(2, n, causal, -0.3 + 0.8j, seed=100 + n)


@pytest.mark.parametrize("causal", [True, False])
def test_tensor_z_gradients(causal):
    """A learnable scalar z and a per-position z (broadcast (B, N)) get their gradients too."""
    with bk_triton.config(**SMALL_CHUNKS):
        check_against_reference(2, 18, causal, torch.tensor(0.2 + 0.9j, dtype=torch.complex128), seed=7)
        z = 0.1 + (0.5 + torch.rand(2, 18, generator=torch.Generator().manual_seed(3), dtype=torch.float64)) * 1j
        check_against_reference(2, 18, causal, z, seed=8)


def test_bfloat16_inputs_compute_in_float32():
    """bf16 in, complex64 out, bf16 gradients: the error is the inputs' rounding, not the kernel's."""
    diag, sub, sup = random_chain(2, 18, seed=9)
    diag, sub, sup = (t.to(torch.bfloat16) for t in (diag, sub, sup))
    with bk_triton.config(**SMALL_CHUNKS):
        for causal in (True, False):
            ref = green_diagonal(diag.double(), sub.double(), sup.double(), 1j, causal)
            out = green_diagonal(*(t.to(DEVICE) for t in (diag, sub, sup)), 1j, causal, method="triton")
            assert rel_err(out, ref) < 1e-5
            leaves = [t.to(DEVICE).requires_grad_() for t in (diag, sub, sup)]
            green_diagonal(*leaves, 1j, causal, method="triton").abs().sum().backward()
            assert all(t.grad.dtype == torch.bfloat16 and torch.isfinite(t.grad.float()).all() for t in leaves)


def test_laplacian_chain_is_bounded_and_causal():
    """H0 + diag(v) with z = i: |g| <= 1/Im z, and changing position t moves no g_i with i < t."""
    v = torch.randn(2, 40, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    h0, sub, sup = bk_core.laplacian_couplings(2, 40, torch.float64)
    with bk_triton.config(**SMALL_CHUNKS):
        f = lambda a: green_diagonal(  # noqa: E731
            (h0 + a).float().to(DEVICE), sub.float().to(DEVICE), sup.float().to(DEVICE), 1j, True, method="triton"
        ).cpu()
        g = f(v)
        assert g.abs().max() <= 1.0 + 1e-6
        v2 = v.clone()
        v2[:, 25] += 1.0
        g2 = f(v2)
        assert torch.equal(g[:, :25], g2[:, :25]) and not torch.equal(g[:, 25:], g2[:, 25:])


def test_dispatch_and_errors(monkeypatch):
    diag, sub, sup = random_chain(1, 5, seed=1)
    assert bk_core.resolve_method("auto", diag) == "scan"  # float64 never goes to the float32 kernel
    assert bk_core.resolve_method("auto", diag.float().to(DEVICE)) == ("triton" if CUDA else "scan")
    with use_method("sequential"):
        assert bk_core.resolve_method("auto", diag.float().to(DEVICE)) == "sequential"
        assert bk_core.resolve_method("scan", diag.float()) == "scan"  # explicit arguments win
    with use_method("scan"):
        if CUDA:  # forcing the PyTorch path on CUDA
            out = green_diagonal(*(t.float().cuda() for t in (diag, sub, sup)), 1j)
            assert out.is_cuda
    assert bk_core.resolve_method("auto", diag.float().to(DEVICE)) == ("triton" if CUDA else "scan")
    with pytest.raises(ValueError, match="float64"):
        green_diagonal(*(t.to(DEVICE) for t in (diag, sub, sup)), 1j, method="triton")
    with pytest.raises(ValueError, match="unknown method"):
        green_diagonal(diag, sub, sup, 1j, method="fast")
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="CUDA"):
            green_diagonal(diag.float(), sub.float(), sup.float(), 1j, method="triton")


@pytest.mark.parametrize("method", ["auto", "triton"])
def test_torch_compile_fullgraph_no_graph_break(method):
    """The core compiles inside one graph: validation skips its host syncs, the custom op has a fake
    implementation and an autograd formula. On CPU "auto" runs the PyTorch scan inside the op;
    "triton" runs the kernels (interpreted on CPU)."""
    torch._dynamo.reset()
    n = 18
    v = torch.randn(2, n, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    h0, sub, sup = bk_core.laplacian_couplings(2, n, torch.float32, DEVICE)
    z = torch.tensor(0.1 + 1.2j, device=DEVICE)

    def f(v, z):
        g = green_diagonal(h0 + v, sub, sup, z, True, method=method)  # validate=True on purpose
        gb = green_diagonal(h0 - v, sub, sup, 1j, False, method=method)
        return (torch.view_as_real(g) * 1.5).sum() + gb.abs().square().sum()

    with bk_triton.config(**SMALL_CHUNKS):
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        leaves = [v.clone().requires_grad_(), z.clone().requires_grad_()]
        loss = compiled(*leaves)
        loss.backward()
        ref_leaves = [v.clone().requires_grad_(), z.clone().requires_grad_()]
        ref = f(*ref_leaves)
        ref.backward()
    assert torch.allclose(loss, ref, rtol=1e-5)
    for a, b in zip(leaves, ref_leaves):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6)


def test_custom_op_opcheck():
    """torch.library.opcheck: schema, fake implementation and autograd registration are consistent."""
    diag, sub, sup = (t.float() for t in random_chain(2, 6, seed=2))
    for causal in (True, False):
        args = (diag.requires_grad_(), sub, sup, None, 0.2, 0.9, causal, "scan")
        torch.library.opcheck(bk_op.green_diagonal_op, args)
