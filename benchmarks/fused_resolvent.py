"""Kernel micro-benchmark of the resolvent features, fwd+bwd: the reference path against the fused one.

Run from the repository root on a CUDA machine:   python benchmarks/fused_resolvent.py
Prints one JSON line per (shape, couplings, path, mode), then one line per (shape, couplings) with
the largest differences between the two paths (a GPU-side check of the fused kernels).

  path  "reference": resnet_bk.layers.resolvent.resolvent_features_reference (permute to (B*C, N),
        green_diagonal's Triton kernels with complex64 output, view_as_real, permute back)
        "fused":     resnet_bk.kernels.fused_resolvent.resolvent_features_fused ((B, N, C) in,
        (B, N, 2C) float32 out, no complex tensors)
  mode  "graph": one fwd+bwd captured in a CUDA graph, replayed; "eager": plain calls.
  ms    median milliseconds per fwd+bwd, CUDA events (the timers of benchmarks/bk_core.py).

Inputs: v (B, N, C) bf16; couplings (B, N-1, C) bf16 or None (the Laplacian); z_re, z_im (C,)
float32; causal; backward to v, couplings, z_re, z_im with torch.autograd.grad (no .grad
accumulation, so the captured graph replays cleanly).
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.getcwd())

from benchmarks.bk_core import time_eager, time_graph  # noqa: E402
from resnet_bk.kernels.fused_resolvent import resolvent_features_fused  # noqa: E402
from resnet_bk.layers.resolvent import resolvent_features_reference  # noqa: E402

SHAPES = [(256, 256, 64), (8, 4096, 64), (2, 16384, 64), (1, 65536, 64)]


def make_inputs(b, n, c, with_couplings):
    g = torch.Generator(device="cuda").manual_seed(0)
    v = torch.randn(b, n, c, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
    k = None
    if with_couplings:
        k = (0.5 + torch.rand(b, n - 1, c, device="cuda", generator=g)).to(torch.bfloat16).requires_grad_()
    z_re = (0.1 * torch.randn(c, device="cuda", generator=g)).requires_grad_()
    z_im = (0.2 + torch.rand(c, device="cuda", generator=g)).requires_grad_()
    grad_out = torch.randn(b, n, 2 * c, device="cuda", generator=g)
    return v, k, z_re, z_im, grad_out


def step_fn(path, v, k, z_re, z_im, grad_out):
    leaves = [t for t in (v, k, z_re, z_im) if t is not None]

    def step():
        if path == "fused":
            out = resolvent_features_fused(v, k, z_re, z_im, True)
        else:
            out = resolvent_features_reference(v, torch.complex(z_re, z_im), k, True)
        return (out,) + torch.autograd.grad(out, leaves, grad_out)

    return step


def main():
    device = torch.cuda.get_device_name()
    for b, n, c in SHAPES:
        for with_couplings in (False, True):
            inputs = make_inputs(b, n, c, with_couplings)
            results = {}
            for path in ("reference", "fused"):
                step = step_fn(path, *inputs)
                results[path] = [t.detach().float() for t in step()]
                for mode, ms in (("graph", time_graph([step])), ("eager", time_eager([step], reps=20))):
                    row = dict(device=device, B=b, N=n, C=c, couplings=with_couplings, path=path, mode=mode, ms=ms)
                    print(json.dumps(row), flush=True)
            names = ["out", "grad_v"] + (["grad_couplings"] if with_couplings else []) + ["grad_z_re", "grad_z_im"]
            diffs = {
                name: float((f - r).abs().max() / r.abs().max().clamp_min(1e-30))
                for name, f, r in zip(names, results["fused"], results["reference"])
            }
            print(json.dumps(dict(B=b, N=n, C=c, couplings=with_couplings, max_rel_diff_fused_vs_reference=diffs)))
            del inputs, results
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
