"""BK-core on a GPU: the Triton kernels against the PyTorch scan, causal FlashAttention and the
memory-bandwidth floor, plus an accuracy check against float64. Run on a CUDA device:

    python benchmarks/bk_core.py                  # full run -> benchmarks/results/bk_core.{json,md,png}
    python benchmarks/bk_core.py --sweep          # launch-configuration sweep at a few shapes (printed)
    python benchmarks/bk_core.py --quick          # small subset, for a smoke test
    python benchmarks/bk_core.py --overhead       # host-side cost of an eager call, with a profile
    python benchmarks/bk_core.py --render         # redraw bk_core.md/png from the JSON (no GPU)

Timing rules (docs/design.md section 4):
* ``ms``: median over repetitions of CUDA-event timings around one eager call (forward, or
  forward + ``torch.autograd.grad``), the queue drained before each call, so Python, dispatcher
  and launch overheads are included, after warm-up (compilation excluded).
* ``graph_ms``: the same work captured once in a CUDA graph, timed over back-to-back replays
  (launch overhead excluded).
* Inputs rotate among several sets whose total exceeds the L2 cache, so large shapes are timed
  from device memory, not from L2.
* ``floor_ms``: the bytes that must move (each input read once, each output written once) over
  the device-to-device copy bandwidth measured in the same run (bytes read + bytes written).
* SDPA: ``F.scaled_dot_product_attention(is_causal=True)`` on bf16 (B, 4 heads, N, 64) under
  the FlashAttention backend, i.e. d_model 256 at the same B and N.
* Accuracy: relative error (max |out - ref| / max |ref|, and the L2 version) of the float32
  kernels against the float64 PyTorch scan on the GPU, for values and all three gradients.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from resnet_bk.bk_core import green_diagonal  # noqa: E402
from resnet_bk.kernels import bk_triton  # noqa: E402

DEV = "cuda"
L2_BYTES = 50 * 2**20


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------
def time_eager(fns, reps, warmup=3, budget_s=2.0):
    """Median ms of single eager calls (cycling over fns, one per input set), queue drained before each."""
    for i in range(warmup):
        fns[i % len(fns)]()
    torch.cuda.synchronize()
    t_start, times = time.perf_counter(), []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for r in range(reps):
        torch.cuda.synchronize()
        start.record()
        fns[r % len(fns)]()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
        if time.perf_counter() - t_start > budget_s and len(times) >= 3:
            break
    return statistics.median(times)


def time_graph(fns, reps=20, inner=None):
    """Median ms per call of a CUDA graph that runs every fn once (one per input set)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            for f in fns:
                f()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    g.replay()
    end.record()
    end.synchronize()
    one = start.elapsed_time(end)
    inner = inner or max(1, min(50, int(20.0 / max(one, 1e-3))))
    times = []
    for _ in range(reps):
        start.record()
        for _ in range(inner):
            g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner / len(fns))
    del g
    return statistics.median(times)


def measure_bandwidth():
    """Device-to-device copy of 1 GiB: (bytes read + bytes written) / time, in bytes/s."""
    n = 2**28
    x = torch.randn(n, device=DEV)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(20):
        start.record()
        y.copy_(x)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del x, y
    return 2 * n * 4 / statistics.median(times)


# --------------------------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------------------------
def model_inputs(b, n, dtype=torch.float32, seed=0, grad=True):
    """The ResNet-BK layer's core input: H0 (Laplacian) + v with v ~ N(0, 1), z = i."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    diag = (-2.0 + torch.randn(b, n, device=DEV, generator=g)).to(dtype)
    sub = torch.ones(b, n - 1, device=DEV, dtype=dtype)
    sup = torch.ones(b, n - 1, device=DEV, dtype=dtype)
    out_grad = torch.randn(b, n, device=DEV, dtype=torch.complex64, generator=g)
    ins = [t.requires_grad_(grad) for t in (diag, sub, sup)]
    return ins, out_grad


def n_sets(bytes_per_call, cap=32):
    return max(1, min(cap, math.ceil(2 * L2_BYTES / max(bytes_per_call, 1))))


def bk_callables(method, b, n, causal, mode, dtype=torch.float32):
    in_bytes = torch.finfo(dtype).bits // 8
    per_call = b * n * (3 * in_bytes + 8) * (2 if mode == "fwd+bwd" else 1)
    fns = []
    for s in range(n_sets(per_call)):
        ins, og = model_inputs(b, n, dtype, seed=s, grad=(mode == "fwd+bwd"))
        if mode == "fwd":

            def f(ins=ins):
                return green_diagonal(*ins, 1j, causal, method=method, validate=False)

        else:

            def f(ins=ins, og=og):
                out = green_diagonal(*ins, 1j, causal, method=method, validate=False)
                return torch.autograd.grad(out, ins, og)

        fns.append(f)
    return fns


def sdpa_callables(b, n, mode, heads=4, head_dim=64):
    per_call = 4 * b * heads * n * head_dim * 2 * (2 if mode == "fwd+bwd" else 1)
    fns = []
    for s in range(n_sets(per_call, cap=8)):
        g = torch.Generator(device=DEV).manual_seed(s)
        q, k, v = (
            torch.randn(b, heads, n, head_dim, device=DEV, dtype=torch.bfloat16, generator=g).requires_grad_(
                mode == "fwd+bwd"
            )
            for _ in range(3)
        )
        do = torch.randn(b, heads, n, head_dim, device=DEV, dtype=torch.bfloat16, generator=g)

        def f(q=q, k=k, v=v, do=do):
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                if mode == "fwd":
                    return o
                return torch.autograd.grad(o, (q, k, v), do)

        fns.append(f)
    return fns


def floor_bytes(b, n, mode, in_bytes=4):
    """Each input read once, each output written once: fwd reads a, b, c and writes complex g;
    bwd reads a, b, c and grad g and writes the three real gradients."""
    fwd = b * n * 3 * in_bytes + b * n * 8
    bwd = b * n * 3 * in_bytes + b * n * 8 + b * n * 3 * in_bytes
    return fwd if mode == "fwd" else fwd + bwd


# --------------------------------------------------------------------------------------------
# Accuracy
# --------------------------------------------------------------------------------------------
def rel_errs(out, ref):
    d = (out.to(ref.dtype) - ref).abs()
    return (d.max() / ref.abs().max()).item(), (d.norm() / ref.abs().norm()).item()


def accuracy(b, n, causal, kind, seed=0):
    """Values and gradients of the float32 kernels (and the float32 PyTorch scan) vs float64 scan."""
    g = torch.Generator(device=DEV).manual_seed(1000 + seed)
    if kind == "laplacian":
        diag = -2.0 + torch.randn(b, n, device=DEV, dtype=torch.float64, generator=g)
        sub = torch.ones(b, n - 1, device=DEV, dtype=torch.float64)
        sup = torch.ones(b, n - 1, device=DEV, dtype=torch.float64)
        z = 1j
    else:  # non-symmetric couplings with k = sub * sup > 0, z off the imaginary axis
        diag = 3.0 * torch.randn(b, n, device=DEV, dtype=torch.float64, generator=g)
        sub = 0.5 + torch.rand(b, n - 1, device=DEV, dtype=torch.float64, generator=g)
        sup = 0.5 + torch.rand(b, n - 1, device=DEV, dtype=torch.float64, generator=g)
        z = 0.3 + 0.5j
    w = torch.randn(b, n, device=DEV, dtype=torch.complex128, generator=g)

    def run(dtype, method):
        ins = [t.to(dtype).requires_grad_() for t in (diag, sub, sup)]
        out = green_diagonal(*ins, z, causal, method=method, validate=False)
        grads = torch.autograd.grad(out, ins, w.to(out.dtype))
        return [out.detach()] + [x.detach() for x in grads]

    ref = run(torch.float64, "scan")
    rec = {"B": b, "N": n, "causal": causal, "inputs": kind}
    for name, res in (("triton", run(torch.float32, "triton")), ("scan_fp32", run(torch.float32, "scan"))):
        for part, o, r in zip(("out", "grad_diag", "grad_sub", "grad_sup"), res, ref):
            mx, l2 = rel_errs(o, r)
            rec[f"{name}_{part}_max"] = mx
            rec[f"{name}_{part}_l2"] = l2
            rec.setdefault(f"{name}_finite", True)
            rec[f"{name}_finite"] &= bool(torch.isfinite(torch.view_as_real(o) if o.is_complex() else o).all())
    del ref
    torch.cuda.empty_cache()
    return rec


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------
def versions():
    import triton

    return {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "device_name": torch.cuda.get_device_name(),
        "python": platform.python_version(),
    }


def sweep(args):
    """Time a few launch configurations (printed, not stored)."""
    configs = [
        dict(),
        dict(chunk=1024),
        dict(rows_bwd=4),
        dict(single_max=2048),
        dict(rows_fwd=4, rows_bwd=4, chunk=1024),
    ]
    shapes = [(8, 4096), (8, 65536), (1, 2**20)]
    for cfg in configs:
        with bk_triton.config(**cfg):
            for b, n in shapes:
                row = []
                for mode in ("fwd", "fwd+bwd"):
                    fns = bk_callables("triton", b, n, True, mode)
                    row.append((mode, time_eager(fns, 30), time_graph(fns, 10)))
                print(
                    cfg or "default",
                    f"B={b} N={n} plan={bk_triton.plan(n)}/{bk_triton.plan(n, True)}",
                    " ".join(f"{m}: eager {e:.4f} graph {g:.4f}" for m, e, g in row),
                    flush=True,
                )


def kernel_breakdown(b, n, causal=True, iters=10):
    """GPU time per kernel for one eager fwd+bwd (torch.profiler), in microseconds."""
    from torch.profiler import ProfilerActivity, profile

    fns = bk_callables("triton", b, n, causal, "fwd+bwd")[:1]
    for _ in range(3):
        fns[0]()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fns[0]()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t and e.count:
            out[f"{e.key} x{e.count // iters}"] = round(t / iters, 2)
    return out


def overhead():
    """Where the eager time goes at a small shape (host-side microseconds per call, and a profile)."""
    import cProfile
    import pstats

    b, n = 8, 4096
    (diag, sub, sup), og = model_inputs(b, n)
    out, carries = bk_triton.forward(diag, sub, sup, 1j, True)
    bk_triton.backward(og, diag, sub, sup, 1j, carries, True, False)

    def host_us(f, reps=300):
        for _ in range(10):
            f()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            f()
        dt = (time.perf_counter() - t) / reps * 1e6
        torch.cuda.synchronize()
        return dt

    block, nc, warps, s = bk_triton.plan(n)
    ov = torch.view_as_real(out)
    args = (diag, sub, sup, ov, 0.0, 1.0, 0, 0, ov, carries, carries, n, carries.shape[1])
    consts = dict(CAUSAL=True, Z_TENSOR=False, SUMMARY=False, HAS_CARRY=False, BLOCK=block, S=s)

    def raw_launch():
        bk_triton._fwd_kernel[(nc, b)](*args, **consts, num_warps=warps)

    x = torch.randn(b, n, device=DEV, requires_grad=True)
    xc = torch.randn(b, n, device=DEV, dtype=torch.complex64)

    def fwd_backward():
        out = green_diagonal(diag, sub, sup, 1j, validate=False)
        out.backward(og)

    items = {
        "torch.empty": lambda: torch.empty((b, n), device=DEV),
        "one triton launch": raw_launch,
        "bk_triton.forward": lambda: bk_triton.forward(diag, sub, sup, 1j, True),
        "bk_triton.backward": lambda: bk_triton.backward(og, diag, sub, sup, 1j, carries, True, False),
        "green_diagonal fwd (no grad)": lambda: green_diagonal(
            *(t.detach() for t in (diag, sub, sup)), 1j, validate=False
        ),
        "green_diagonal fwd (grad)": lambda: green_diagonal(diag, sub, sup, 1j, validate=False),
        "autograd.grad of x*2 (baseline)": lambda: torch.autograd.grad(x * 2.0, x, x),
        "autograd.grad of complex mul": lambda: torch.autograd.grad(x * xc, x, xc),
        "fwd + autograd.grad": lambda: torch.autograd.grad(
            green_diagonal(diag, sub, sup, 1j, validate=False), (diag, sub, sup), og
        ),
        "fwd + out.backward": fwd_backward,
    }
    for name, f in items.items():
        print(f"host {name:32s} {host_us(f):8.1f} us/call", flush=True)
    pr = cProfile.Profile()
    f = items["fwd + autograd.grad"]
    pr.enable()
    for _ in range(200):
        f()
    pr.disable()
    torch.cuda.synchronize()
    pstats.Stats(pr).sort_stats("tottime").print_stats(25)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--overhead", action="store_true", help="host-side cost of an eager call, with a profile")
    ap.add_argument("--no-scan", action="store_true", help="skip the PyTorch scan timings")
    ap.add_argument("--render", action="store_true", help="only redraw bk_core.md/png from the JSON in --out")
    ap.add_argument("--config", default="", help="bk_triton.config overrides, e.g. chunk=1024,elems_fwd=8")
    args = ap.parse_args()
    if args.render:
        with open(os.path.join(args.out, "bk_core.json")) as f:
            records = json.load(f)
        with open(os.path.join(args.out, "bk_core_meta.json")) as f:
            meta = json.load(f)
        write_markdown(
            records,
            meta["accuracy"],
            meta["info"],
            meta["peak_bytes_per_s"],
            os.path.join(args.out, "bk_core.md"),
            meta.get("kernel_breakdown_us"),
        )
        plot(records, os.path.join(args.out, "bk_core.png"), meta["info"])
        return
    assert torch.cuda.is_available(), "benchmarks/bk_core.py needs a CUDA device"
    overrides = {k: int(v) for k, v in (kv.split("=") for kv in args.config.split(",") if kv)}
    bk_triton.CONFIG.update(overrides)
    info = versions()
    print(info, "config", bk_triton.CONFIG, flush=True)
    if args.sweep:
        sweep(args)
        return
    if args.overhead:
        overhead()
        return

    peak = measure_bandwidth()
    print(f"peak device-to-device bandwidth: {peak / 1e12:.3f} TB/s (read + write)", flush=True)

    # ---- accuracy ----
    acc_shapes = [(8, 256), (8, 4096), (8, 65536), (1, 2**20)]
    if args.quick:
        acc_shapes = [(8, 4096), (1, 2**18)]
    accs = []
    for b, n in acc_shapes:
        for causal in (True, False):
            for kind in ("laplacian", "random"):
                rec = accuracy(b, n, causal, kind)
                accs.append(rec)
                tol = 1e-4 if n <= 65536 else 1e-3
                worst = max(rec[f"triton_{p}_max"] for p in ("out", "grad_diag", "grad_sub", "grad_sup"))
                rec["tolerance"], rec["pass"] = tol, bool(worst <= tol and rec["triton_finite"])
                print(
                    f"accuracy B={b} N={n} causal={causal} {kind}: triton max rel err out "
                    f"{rec['triton_out_max']:.2e} grads {rec['triton_grad_diag_max']:.2e}/"
                    f"{rec['triton_grad_sub_max']:.2e}/{rec['triton_grad_sup_max']:.2e} "
                    f"(fp32 scan: out {rec['scan_fp32_out_max']:.2e} grad_diag {rec['scan_fp32_grad_diag_max']:.2e})"
                    f" -> {'PASS' if rec['pass'] else 'FAIL'} (tol {tol:g})",
                    flush=True,
                )

    # ---- per-kernel GPU time ----
    breakdown = {}
    for b, n in [(8, 4096), (8, 65536), (1, 2**20)] if not args.quick else [(8, 4096)]:
        breakdown[f"B={b} N={n}"] = kernel_breakdown(b, n)
        print(f"kernels, causal fwd+bwd B={b} N={n} (us per call):", breakdown[f"B={b} N={n}"], flush=True)

    # ---- timings ----
    shapes = [(8, n) for n in (256, 1024, 4096, 16384, 65536)] + [(1, n) for n in (4096, 65536, 2**18, 2**20)]
    if args.quick:
        shapes = [(8, 4096), (8, 65536), (1, 2**20)]
    records = []
    os.makedirs(args.out, exist_ok=True)

    def save():
        with open(os.path.join(args.out, "bk_core.json"), "w") as f:
            json.dump(records, f, indent=1)
        meta = {
            "info": info,
            "config": dict(bk_triton.CONFIG),
            "peak_bytes_per_s": peak,
            "accuracy": accs,
            "kernel_breakdown_us": breakdown,
        }
        with open(os.path.join(args.out, "bk_core_meta.json"), "w") as f:
            json.dump(meta, f, indent=1)

    def add(impl, dtype, mode, causal, b, n, ms, graph_ms, **extra):
        rec = dict(
            impl=impl,
            device=info["device_name"],
            dtype=dtype,
            mode=mode,
            causal=causal,
            B=b,
            N=n,
            ms=ms,
            graph_ms=graph_ms,
            torch=info["torch"],
            triton=info["triton"],
            **extra,
        )
        records.append(rec)
        gs = f"{graph_ms:.4f}" if graph_ms is not None else "-"
        print(
            f"{impl:12s} {dtype:5s} {mode:8s} causal={causal!s:5s} B={b} N={n:8d} ms={ms:.4f} graph_ms={gs}", flush=True
        )

    for b, n in shapes:
        for mode in ("fwd", "fwd+bwd"):
            fb = floor_bytes(b, n, mode)
            add("floor", "fp32", mode, None, b, n, fb / peak * 1e3, None, bytes=fb, peak_bytes_per_s=peak)
            for causal in (True, False):
                fns = bk_callables("triton", b, n, causal, mode)
                add(
                    "triton",
                    "fp32",
                    mode,
                    causal,
                    b,
                    n,
                    time_eager(fns, 50),
                    time_graph(fns),
                    plan=list(bk_triton.plan(n, mode != "fwd")),
                )
                del fns
            if b == 8 and n in (4096, 65536):
                fns = bk_callables("triton", b, n, True, mode, dtype=torch.bfloat16)
                add("triton", "bf16", mode, True, b, n, time_eager(fns, 50), time_graph(fns))
                del fns
            if not args.no_scan and (n <= 65536 or b == 1):
                for causal in (True, False) if n <= 4096 else (True,):
                    fns = bk_callables("scan", b, n, causal, mode)
                    ms = time_eager(fns, 20, budget_s=3.0)
                    add("torch_scan", "fp32", mode, causal, b, n, ms, time_graph(fns, 5) if ms < 50 else None)
                    del fns
            if b * n <= 8 * 65536 or (b == 1 and (mode == "fwd" or n <= 2**18)):
                fns = sdpa_callables(b, n, mode)
                ms = time_eager(fns, 20, warmup=1, budget_s=3.0)
                add(
                    "sdpa_flash",
                    "bf16",
                    mode,
                    True,
                    b,
                    n,
                    ms,
                    time_graph(fns, 5) if ms < 50 else None,
                    heads=4,
                    head_dim=64,
                )
                del fns
            torch.cuda.empty_cache()
        save()  # partial results survive a time limit

    # bk_core.json is the list of records; the run's context is in bk_core_meta.json.
    save()
    write_markdown(records, accs, info, peak, os.path.join(args.out, "bk_core.md"), breakdown)
    plot(records, os.path.join(args.out, "bk_core.png"), info)
    print(open(os.path.join(args.out, "bk_core.md")).read(), flush=True)


def _get(records, **kw):
    for r in records:
        if all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def write_markdown(records, accs, info, peak, path, breakdown=None):
    lines = [
        f"# BK-core benchmark ({info['device_name']}, torch {info['torch']}, triton {info['triton']})",
        "",
        f"Peak device-to-device bandwidth measured in the same run: {peak / 1e12:.2f} TB/s (read + write).",
        "Times in ms: eager (CUDA events around one call, launches included) / CUDA-graph replay. "
        "floor = bytes that must move / peak bandwidth. Triton and the PyTorch scan take float32 inputs; "
        "SDPA is causal FlashAttention in bf16 with 4 heads x 64.",
        "",
    ]
    for mode in ("fwd", "fwd+bwd"):
        lines += [
            f"## {mode}",
            "",
            "| B | N | triton causal | triton bidir | torch scan causal | SDPA flash causal | floor | "
            "SDPA / triton (graph) | triton / floor (graph) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        shapes = sorted({(r["B"], r["N"]) for r in records if r["mode"] == mode}, key=lambda s: (-s[0], s[1]))
        for b, n in shapes:

            def cell(impl, causal, dtype=None):
                kw = dict(impl=impl, mode=mode, B=b, N=n, causal=causal)
                if dtype:
                    kw["dtype"] = dtype
                r = _get(records, **kw)
                if r is None:
                    return "-", None
                g = r["graph_ms"]
                return (f"{r['ms']:.4f} / {g:.4f}" if g is not None else f"{r['ms']:.3f} / -"), (g or r["ms"])

            tc, tcv = cell("triton", True, "fp32")
            tb, _ = cell("triton", False, "fp32")
            sc, _ = cell("torch_scan", True)
            fa, fav = cell("sdpa_flash", True)
            fl = _get(records, impl="floor", mode=mode, B=b, N=n)
            flv = fl["ms"] if fl else None
            ratio_fa = f"{fav / tcv:.1f}x" if (fav and tcv) else "-"
            ratio_fl = f"{tcv / flv:.1f}x" if (flv and tcv) else "-"
            lines.append(f"| {b} | {n} | {tc} | {tb} | {sc} | {fa} | {flv:.5f} | {ratio_fa} | {ratio_fl} |")
        lines.append("")
    bf = [r for r in records if r["impl"] == "triton" and r["dtype"] == "bf16"]
    if bf:
        lines += ["## bf16 inputs (triton, causal)", "", "| B | N | mode | eager | graph |", "|---|---|---|---|---|"]
        for r in bf:
            lines.append(f"| {r['B']} | {r['N']} | {r['mode']} | {r['ms']:.4f} | {r['graph_ms']:.4f} |")
        lines.append("")
    if breakdown:
        lines += ["## GPU time per kernel, causal fwd+bwd (torch.profiler, us per call)", ""]
        for shape, ks in breakdown.items():
            lines.append(f"- {shape}: " + ", ".join(f"`{k}` {v:.1f}" for k, v in ks.items()))
        lines.append("")
    lines += [
        "## Accuracy vs float64 (max |err| / max |ref|)",
        "",
        "| B | N | causal | inputs | triton out | triton grad diag / sub / sup | fp32 scan out / grad diag | tol | |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for a in accs:
        lines.append(
            f"| {a['B']} | {a['N']} | {a['causal']} | {a['inputs']} | {a['triton_out_max']:.1e} | "
            f"{a['triton_grad_diag_max']:.1e} / {a['triton_grad_sub_max']:.1e} / {a['triton_grad_sup_max']:.1e} | "
            f"{a['scan_fp32_out_max']:.1e} / {a['scan_fp32_grad_diag_max']:.1e} | {a['tolerance']:g} | "
            f"{'pass' if a['pass'] else 'FAIL'} |"
        )
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(records, path, info):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    styles = {
        ("triton", True): ("Triton causal", "C0", "-"),
        ("triton", False): ("Triton bidirectional", "C0", "--"),
        ("torch_scan", True): ("PyTorch scan causal", "C1", "-"),
        ("sdpa_flash", True): ("SDPA FlashAttention causal (bf16, 4x64)", "C3", "-"),
        ("floor", None): ("bandwidth floor", "k", ":"),
    }
    for ax, b in zip(axes, (8, 1)):
        for (impl, causal), (label, color, ls) in styles.items():
            for mode, marker in (("fwd", "o"), ("fwd+bwd", "s")):
                pts = sorted(
                    (r["N"], r["graph_ms"] if r["graph_ms"] is not None else r["ms"])
                    for r in records
                    if r["impl"] == impl
                    and r["causal"] == causal
                    and r["B"] == b
                    and r["mode"] == mode
                    and r["dtype"] in ("fp32", "bf16")
                    and (impl != "triton" or r["dtype"] == "fp32")
                )
                if pts:
                    ax.plot(
                        *zip(*pts),
                        color=color,
                        ls=ls,
                        marker=marker,
                        ms=4,
                        alpha=1.0 if mode == "fwd+bwd" else 0.5,
                        label=f"{label} {mode}",
                    )
        ns = sorted({r["N"] for r in records if r["B"] == b})
        if ns:
            ref = _get(records, impl="triton", causal=True, B=b, mode="fwd+bwd", N=ns[-1], dtype="fp32")
            if ref:
                t = ref["graph_ms"] or ref["ms"]
                ax.plot(ns, [t * n / ns[-1] for n in ns], color="0.6", lw=0.8, label="slope 1 (linear in N)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N (sequence length)")
        ax.set_title(f"B = {b}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("ms (CUDA-graph replay; eager where not captured)")
    axes[1].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"BK-core vs causal attention, {info['device_name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
