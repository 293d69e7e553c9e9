"""The fused resolvent features (resnet_bk.kernels.fused_resolvent) against the reference path
(resnet_bk.layers.resolvent.resolvent_features_reference, evaluated in float64): values and
gradients of v, couplings, Re z and Im z; float32 and bf16 inputs; causal and bidirectional;
C = 1, 3, 64; N = 1, 2, odd, and rows cut into several chunks. Plus dispatch, the custom op under
torch.compile / fake tensors, and errors.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py), which runs every scan
element by element and every (chain, chunk) as its own program: shapes are tiny, blocks are 4
threads' rows (min_rows=4) and chunks 16 positions, so N = 23 already takes the multi-chunk path.
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

from resnet_bk.bk_core import use_method  # noqa: E402
from resnet_bk.kernels import fused_resolvent  # noqa: E402
from resnet_bk.kernels.fused_resolvent import resolvent_features_fused  # noqa: E402
from resnet_bk.layers.resolvent import resolvent_features, resolvent_features_reference  # noqa: E402


def _load_kernels():
    from triton.runtime.interpreter import InterpretedFunction

    from resnet_bk.kernels import bk_triton

    if not CUDA and not isinstance(bk_triton._fwd_kernel, InterpretedFunction):
        bk_triton = importlib.reload(sys.modules["resnet_bk.kernels.bk_triton"])
    return bk_triton


bk_triton = _load_kernels()
DEVICE = "cuda" if CUDA else "cpu"
TINY = dict(single_max=16, chunk=16, min_chunk=16, rows_fwd=4, rows_bwd=4, carry_block=2, min_rows=4)


def random_inputs(b, n, c, with_couplings, seed):
    """float64 v (B, N, C), couplings (B, N-1, C) in [0.5, 1.5] or None, z_re, z_im (C,) with Im z > 0."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(b, n, c, generator=g, dtype=torch.float64) * 2
    k = 0.5 + torch.rand(b, n - 1, c, generator=g, dtype=torch.float64) if with_couplings else None
    z_re = torch.randn(c, generator=g, dtype=torch.float64) * 0.5
    z_im = 0.3 + torch.rand(c, generator=g, dtype=torch.float64)
    return v, k, z_re, z_im


DTYPES_VZK = (torch.float32, torch.complex64)  # resolvent_features' (v, z, couplings)


def values_and_grads(fn, inputs, weight, dtype, z_dtype):
    """fn's output and the gradients of sum(weight * out) w.r.t. every tensor input: (v, couplings,
    z_re, z_im) in dtype, dtype, z_dtype, z_dtype, or (v, z, couplings) in dtype, z_dtype, dtype."""
    dtypes = (dtype, dtype, z_dtype, z_dtype) if len(inputs) == 4 else (dtype, z_dtype, dtype)
    leaves = [None if t is None else t.to(DEVICE, d).detach().requires_grad_() for t, d in zip(inputs, dtypes)]
    out = fn(*leaves)
    (out.double() * weight.to(out.device)).sum().backward()
    return out, [leaf.grad for leaf in leaves if leaf is not None]


def reference(v, k, z_re, z_im, causal):
    return resolvent_features_reference(v, torch.complex(z_re, z_im), k, causal)


def rel_err(out, ref):
    if ref.numel() == 0:
        return 0.0
    return ((out.detach().cpu().to(ref.dtype) - ref).abs().max() / ref.abs().max()).item()


def check(b, n, c, with_couplings, causal, dtype=torch.float32, tol=2e-5, grad_tol=2e-5, seed=0):
    v, k, z_re, z_im = random_inputs(b, n, c, with_couplings, seed)
    if dtype != torch.float32:  # the reference sees the same rounded inputs
        v = v.to(dtype).double()
        k = k.to(dtype).double() if k is not None else None
    weight = torch.randn(b, n, 2 * c, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    ref, ref_grads = values_and_grads(
        lambda *a: reference(*a, causal), (v, k, z_re, z_im), weight, torch.float64, torch.float64
    )
    with bk_triton.config(**TINY):
        out, grads = values_and_grads(
            lambda *a: resolvent_features_fused(*a, causal), (v, k, z_re, z_im), weight, dtype, torch.float32
        )
    assert out.dtype == torch.float32 and out.shape == (b, n, 2 * c)
    assert rel_err(out, ref) < tol
    for name, g, r, want in zip(
        ("v", "couplings", "z_re", "z_im") if k is not None else ("v", "z_re", "z_im"),
        grads,
        ref_grads,
        (dtype, dtype, torch.float32, torch.float32) if k is not None else (dtype, torch.float32, torch.float32),
    ):
        assert g.shape == r.shape and g.dtype == want, name
        assert rel_err(g, r) < grad_tol, (name, rel_err(g, r))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "b,n,c,with_couplings",
    [(2, 1, 3, True), (2, 2, 1, True), (2, 9, 3, True), (2, 9, 3, False), (1, 23, 3, True), (1, 23, 1, False)],
)
def test_matches_reference(b, n, c, with_couplings, causal):
    """N = 1, 2, odd (one block per chain) and 23 (two chunks); C = 1 and 3; couplings or b = 1."""
    check(b, n, c, with_couplings, causal, seed=n + c)


def test_64_channels():
    check(1, 3, 64, True, True, seed=64)


@pytest.mark.parametrize("causal", [True, False])
def test_bfloat16_inputs(causal):
    """bf16 v and couplings, float32 arithmetic: the values as exact as float32 inputs, bf16 gradients."""
    check(2, 9, 3, True, causal, dtype=torch.bfloat16, tol=2e-5, grad_tol=1e-2, seed=5)


def test_python_float_z():
    """One fixed z for every channel (the seeds' layer): the same as a (C,) tensor holding it."""
    v, k, _, _ = random_inputs(2, 5, 2, True, seed=3)
    v, k = v.float().to(DEVICE), k.float().to(DEVICE)
    with bk_triton.config(**TINY):
        out = resolvent_features_fused(v, k, 0.25, 0.75, True)
        as_tensor = resolvent_features_fused(v, k, torch.full((2,), 0.25), torch.full((2,), 0.75), True)
    assert torch.equal(out, as_tensor)
    assert rel_err(out, resolvent_features_reference(v.double(), 0.25 + 0.75j, k.double(), True)) < 2e-5


def test_resolvent_features_dispatches_to_the_fused_path(monkeypatch):
    """Where the BK-core resolves to "triton", resolvent_features runs the fused Function; else the reference."""
    calls = []
    apply = fused_resolvent.FusedResolventFeatures.apply
    monkeypatch.setattr(fused_resolvent.FusedResolventFeatures, "apply", lambda *a: calls.append(1) or apply(*a))
    v, k, z_re, z_im = random_inputs(1, 4, 2, True, seed=4)
    z = torch.complex(z_re, z_im)
    weight = torch.randn(1, 4, 4, dtype=torch.float64)
    with bk_triton.config(**TINY):
        with use_method("triton"):  # a complex (C,) z: the fused path reads z.real, z.imag (strided views)
            fused, grads = values_and_grads(lambda *a: resolvent_features(*a, True), (v, z, k), weight, *DTYPES_VZK)
        assert len(calls) == 1
        ref, ref_grads = values_and_grads(
            lambda *a: resolvent_features(*a, True), (v, z, k), weight, torch.float64, torch.complex128
        )
        assert len(calls) == 1  # float64 never goes to the float32 kernels
        assert rel_err(fused, ref) < 2e-5
        for g, r in zip(grads, ref_grads):
            assert g.shape == r.shape and rel_err(g, r) < 2e-5
        v, z, k = v.float().to(DEVICE), z.to(DEVICE, torch.complex64), k.float().to(DEVICE)
        with use_method("scan"):
            resolvent_features(v, z, k, True)
        assert len(calls) == 1


@pytest.mark.parametrize("with_couplings", [True, False])
def test_custom_op_compiles_in_one_graph_and_opcheck(with_couplings):
    """torch.compile(fullgraph=True) keeps the op in one graph (impl "scan": the PyTorch body on CPU),
    with the reference's values and gradients; opcheck: schema, fake impl and autograd agree."""
    torch._dynamo.reset()
    v, k, z_re, z_im = (None if t is None else t.float() for t in random_inputs(2, 6, 3, with_couplings, seed=6))

    def f(v, k, z_re, z_im):
        return (resolvent_features_fused(v, k, z_re, z_im, True, impl="scan") * 1.5).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    leaves = [None if t is None else t.clone().requires_grad_() for t in (v, k, z_re, z_im)]
    compiled(*leaves).backward()
    ref_leaves = [None if t is None else t.clone().requires_grad_() for t in (v, k, z_re, z_im)]
    (reference(*ref_leaves, True) * 1.5).square().sum().backward()
    for a, b in zip(leaves, ref_leaves):
        if a is not None:
            assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6)
    for causal in (True, False):
        args = (v.clone().requires_grad_(), k, z_re.clone().requires_grad_(), z_im, 0.0, 0.0, causal, "scan")
        torch.library.opcheck(fused_resolvent.resolvent_features_op, args)


def test_triton_op_traces_with_fake_tensors():
    """Shapes of the triton op's fake implementation (what torch.compile sees), forward and backward."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with bk_triton.config(**TINY), FakeTensorMode():
        v = torch.empty(4, 37, 8, dtype=torch.bfloat16)
        k = torch.empty(4, 36, 8, dtype=torch.bfloat16)
        z = torch.empty(8)
        out, carries = torch.ops.resnet_bk.resolvent_features(v, k, z, z, 0.0, 0.0, True, "triton")
        assert out.shape == (4, 37, 16) and out.dtype == torch.float32
        assert carries.shape == (32, bk_triton.carry_slots(37), 8)
        g_v, g_k, g_z = torch.ops.resnet_bk.resolvent_features_backward(
            out, v, k, z, z, 0.0, 0.0, True, "triton", carries, True
        )
        assert (g_v.shape, g_v.dtype, g_k.shape, g_z.shape) == (v.shape, v.dtype, k.shape, (8, 2))


def test_bad_inputs_raise_one_line_errors():
    v = torch.zeros(2, 5, 3)
    with pytest.raises(ValueError, match=r"couplings must have shape \(B, N-1, C\)"):
        resolvent_features_fused(v, torch.zeros(2, 5, 3), 0.0, 1.0, impl="scan")
    with pytest.raises(ValueError, match=r"v must have shape \(B, N, C\)"):
        resolvent_features_fused(torch.zeros(2, 5), None, 0.0, 1.0, impl="scan")
    with pytest.raises(ValueError, match="both"):
        resolvent_features_fused(v, None, torch.zeros(3), 1.0, impl="scan")
    with pytest.raises(ValueError, match=r"real \(C,\)"):
        resolvent_features_fused(v, None, torch.zeros(4), torch.ones(4), impl="scan")
    with pytest.raises(ValueError, match="Im z must be > 0"):
        resolvent_features_fused(v, None, 0.0, -1.0, impl="scan")
    with pytest.raises(ValueError, match="float64"):
        resolvent_features_fused(v.double().to(DEVICE), None, 0.0, 1.0)
    with pytest.raises(ValueError, match="unknown impl"):
        resolvent_features_fused(v, None, 0.0, 1.0, impl="fast")
