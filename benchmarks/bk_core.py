"""BK-core on a GPU: the Triton kernels against the PyTorch scan, causal FlashAttention and the
memory-bandwidth floor, plus an accuracy check against float64. Run on a CUDA device:

    python benchmarks/bk_core.py                  # full run -> benchmarks/results/bk_core.{json,md}
    python benchmarks/bk_core.py --quick          # small subset, for a smoke test
    python benchmarks/bk_core.py --quick --config chunk=2048,rows_bwd=4   # one launch configuration
    python benchmarks/bk_core.py --overhead       # host-side cost of an eager call
    python benchmarks/bk_core.py --render         # rewrite bk_core.md from the JSON (no GPU)

Timing rules (docs/design.md section 4):
* ``ms``: median over repetitions of CUDA-event timings around one eager call (forward, or
  forward + ``torch.autograd.grad``), the queue drained before each call, so Python, dispatcher
  and launch overheads are included, after warm-up (compilation excluded).
* ``graph_ms``: the same work captured once in a CUDA graph, timed over back-to-back replays
  (launch overhead excluded); not measured where an eager call takes 50 ms or more.
* Inputs rotate among several sets whose total exceeds the L2 cache, so large shapes are timed
  from device memory, not from L2.
* ``floor_ms``: the bytes that must move (each input read once, each output written once) over
  the device-to-device copy bandwidth measured in the same run (bytes read + bytes written).
* SDPA: ``F.scaled_dot_product_attention(is_causal=True)`` on bf16 (B, 4 heads, N, 64) under
  the FlashAttention backend, i.e. d_model 256 at the same B and N.
* Accuracy: relative error (max |out - ref| / max |ref|, and the L2 version) of the float32
  kernels against the float64 PyTorch scan on the GPU, for values and all three gradients.

Outputs: bk_core.json (one record per implementation, dtype, mode, causality and shape),
bk_core_meta.json (versions, launch configuration, bandwidth, accuracy, GPU time per kernel)
and bk_core.md (the tables).
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
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from resnet_bk.bk_core import green_diagonal
from resnet_bk.kernels import bk_triton

DEV = "cuda"
L2_BYTES = 50 * 2**20
GRAPH_BELOW_MS = 50.0  # eager calls this slow are not captured in a CUDA graph


# ------------------------------------------------------------------------------------------ timing
def event_ms(fn, inner: int = 1) -> float:
    """GPU-clock ms per call of `inner` back-to-back calls of fn, between two CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(inner):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / inner


def time_eager(fns, reps, warmup=3, budget_s=2.0):
    """Median ms of single eager calls (cycling over fns, one per input set), queue drained before each."""
    for i in range(warmup):
        fns[i % len(fns)]()
    t_start, times = time.perf_counter(), []
    for r in range(reps):
        torch.cuda.synchronize()
        times.append(event_ms(fns[r % len(fns)]))
        if time.perf_counter() - t_start > budget_s and len(times) >= 3:
            break
    return statistics.median(times)


def time_graph(fns, reps=20):
    """Median ms per call of a CUDA graph that runs every fn once (one per input set)."""
    s = torch.cuda.Stream()  # warm-up on a side stream, as graph capture requires
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
    inner = max(1, min(50, int(20.0 / max(event_ms(g.replay), 1e-3))))  # ~20 ms of replays per timing
    times = [event_ms(g.replay, inner) / len(fns) for _ in range(reps)]
    del g
    return statistics.median(times)


def timed(fns, reps, graph_reps=20, warmup=3, budget_s=2.0):
    """(eager ms, CUDA-graph ms or None) of the callables."""
    ms = time_eager(fns, reps, warmup, budget_s)
    return ms, (time_graph(fns, graph_reps) if ms < GRAPH_BELOW_MS else None)


def measure_bandwidth():
    """Device-to-device copy of 1 GiB: (bytes read + bytes written) / time, in bytes/s."""
    x = torch.randn(2**28, device=DEV)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    ms = statistics.median(event_ms(lambda: y.copy_(x)) for _ in range(20))
    return 2 * x.numel() * x.element_size() / (ms / 1e3)


# --------------------------------------------------------------------------------------- workloads
def model_inputs(b, n, dtype=torch.float32, seed=0, grad=True):
    """The ResNet-BK layer's core input: H0 (Laplacian) + v with v ~ N(0, 1), z = i; and an output gradient."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    diag = (-2.0 + torch.randn(b, n, device=DEV, generator=g)).to(dtype)
    sub, sup = (torch.ones(b, n - 1, device=DEV, dtype=dtype) for _ in range(2))
    out_grad = torch.randn(b, n, device=DEV, dtype=torch.complex64, generator=g)
    return [t.requires_grad_(grad) for t in (diag, sub, sup)], out_grad


def n_sets(bytes_per_call, cap=32):
    """Input sets to rotate through so that together they exceed twice the L2 cache."""
    return max(1, min(cap, math.ceil(2 * L2_BYTES / max(bytes_per_call, 1))))


def bk_callables(method, b, n, causal, mode, dtype=torch.float32):
    """One call of green_diagonal (mode "fwd") or of it and its gradient ("fwd+bwd") per input set."""
    in_bytes = torch.finfo(dtype).bits // 8
    per_call = b * n * (3 * in_bytes + 8) * (2 if mode == "fwd+bwd" else 1)
    fns = []
    for s in range(n_sets(per_call)):
        ins, og = model_inputs(b, n, dtype, seed=s, grad=(mode == "fwd+bwd"))

        def f(ins=ins, og=og):
            out = green_diagonal(*ins, 1j, causal, method=method, validate=False)
            return out if mode == "fwd" else torch.autograd.grad(out, ins, og)

        fns.append(f)
    return fns


def sdpa_callables(b, n, mode, heads=4, head_dim=64):
    """Causal FlashAttention on bf16 (b, heads, n, head_dim), forward or forward + gradient, per input set."""
    per_call = 4 * b * heads * n * head_dim * 2 * (2 if mode == "fwd+bwd" else 1)
    fns = []
    for s in range(n_sets(per_call, cap=8)):
        g = torch.Generator(device=DEV).manual_seed(s)
        q, k, v, do = (
            torch.randn(b, heads, n, head_dim, device=DEV, dtype=torch.bfloat16, generator=g) for _ in range(4)
        )
        for t in (q, k, v):
            t.requires_grad_(mode == "fwd+bwd")

        def f(q=q, k=k, v=v, do=do):
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                return o if mode == "fwd" else torch.autograd.grad(o, (q, k, v), do)

        fns.append(f)
    return fns


def floor_bytes(b, n, mode, in_bytes=4):
    """Each input read once, each output written once: fwd reads a, b, c and writes complex g;
    bwd reads a, b, c and grad g and writes the three real gradients."""
    fwd = b * n * (3 * in_bytes + 8)
    bwd = b * n * (3 * in_bytes + 8 + 3 * in_bytes)
    return fwd if mode == "fwd" else fwd + bwd


# ---------------------------------------------------------------------------------------- accuracy
def accuracy(b, n, causal, kind, seed=0):
    """Values and gradients of the float32 kernels (and the float32 PyTorch scan) vs the float64 scan."""
    g = torch.Generator(device=DEV).manual_seed(1000 + seed)
    f64 = dict(device=DEV, dtype=torch.float64)
    if kind == "laplacian":
        diag = -2.0 + torch.randn(b, n, generator=g, **f64)
        sub, sup = torch.ones(b, n - 1, **f64), torch.ones(b, n - 1, **f64)
        z = 1j
    else:  # non-symmetric couplings with k = sub * sup > 0, z off the imaginary axis
        diag = 3.0 * torch.randn(b, n, generator=g, **f64)
        sub, sup = (0.5 + torch.rand(b, n - 1, generator=g, **f64) for _ in range(2))
        z = 0.3 + 0.5j
    w = torch.randn(b, n, device=DEV, dtype=torch.complex128, generator=g)

    def run(dtype, method):
        ins = [t.to(dtype).requires_grad_() for t in (diag, sub, sup)]
        out = green_diagonal(*ins, z, causal, method=method, validate=False)
        return [out.detach(), *torch.autograd.grad(out, ins, w.to(out.dtype))]

    ref = run(torch.float64, "scan")
    rec = {"B": b, "N": n, "causal": causal, "inputs": kind}
    for name, res in (("triton", run(torch.float32, "triton")), ("scan_fp32", run(torch.float32, "scan"))):
        rec[f"{name}_finite"] = all(bool(torch.isfinite(o).all()) for o in res)
        for part, o, r in zip(("out", "grad_diag", "grad_sub", "grad_sup"), res, ref):
            d = (o.to(r.dtype) - r).abs()
            rec[f"{name}_{part}_max"] = (d.max() / r.abs().max()).item()
            rec[f"{name}_{part}_l2"] = (d.norm() / r.abs().norm()).item()
    rec["tolerance"] = 1e-4 if n <= 65536 else 1e-3
    worst = max(rec[f"triton_{p}_max"] for p in ("out", "grad_diag", "grad_sub", "grad_sup"))
    rec["pass"] = bool(worst <= rec["tolerance"] and rec["triton_finite"])
    del ref
    torch.cuda.empty_cache()
    return rec


# ---------------------------------------------------------------------------------------- profiles
def kernel_breakdown(b, n, causal=True, iters=10):
    """GPU time per kernel for one eager fwd+bwd (torch.profiler), in microseconds."""
    from torch.profiler import ProfilerActivity, profile

    (fn,) = bk_callables("triton", b, n, causal, "fwd+bwd")[:1]
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t and e.count:
            out[f"{e.key} x{e.count // iters}"] = round(t / iters, 2)
    return out


def overhead(b=8, n=4096, reps=300):
    """Host-side microseconds per call of each piece of an eager causal call at a small shape."""
    (diag, sub, sup), og = model_inputs(b, n)
    out, carries = bk_triton.forward(diag, sub, sup, 1j, True)
    block, nc, warps, s = bk_triton.plan(n)
    ov = torch.view_as_real(out)
    launch_args = (diag, sub, sup, ov, 0.0, 1.0, 0, 0, ov, carries, carries, n, carries.shape[1])
    consts = dict(CAUSAL=True, Z_TENSOR=False, SUMMARY=False, HAS_CARRY=False, BLOCK=block, S=s)
    x = torch.randn(b, n, device=DEV, requires_grad=True)
    items = {
        "torch.empty": lambda: torch.empty((b, n), device=DEV),
        "one triton launch": lambda: bk_triton._fwd_kernel[(nc, b)](*launch_args, **consts, num_warps=warps),
        "bk_triton.forward": lambda: bk_triton.forward(diag, sub, sup, 1j, True),
        "bk_triton.backward": lambda: bk_triton.backward(og, diag, sub, sup, 1j, carries, True, False),
        "green_diagonal fwd (grad)": lambda: green_diagonal(diag, sub, sup, 1j, validate=False),
        "autograd.grad of x*2 (baseline)": lambda: torch.autograd.grad(x * 2.0, x, x),
        "fwd + autograd.grad": lambda: torch.autograd.grad(
            green_diagonal(diag, sub, sup, 1j, validate=False), (diag, sub, sup), og
        ),
    }
    for name, f in items.items():
        for _ in range(10):
            f()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            f()
        us = (time.perf_counter() - t) / reps * 1e6
        torch.cuda.synchronize()
        print(f"host {name:32s} {us:8.1f} us/call")


# ------------------------------------------------------------------------------------ the full run
def timings(shapes, info, peak, save):
    """One record per implementation, dtype, mode and causality at each (B, N); `save()` after each shape."""
    records = []

    def add(impl, dtype, mode, causal, b, n, ms, graph_ms, **extra):
        what = {"impl": impl, "device": info["device_name"], "dtype": dtype, "mode": mode, "causal": causal}
        times = {"B": b, "N": n, "ms": ms, "graph_ms": graph_ms, "torch": info["torch"], "triton": info["triton"]}
        records.append({**what, **times, **extra})
        gs = f"{graph_ms:.4f}" if graph_ms is not None else "-"
        print(f"{impl:12s} {dtype:5s} {mode:8s} causal={causal!s:5s} B={b} N={n:8d} ms={ms:.4f} graph_ms={gs}")

    for b, n in shapes:
        for mode in ("fwd", "fwd+bwd"):
            fb = floor_bytes(b, n, mode)
            add("floor", "fp32", mode, None, b, n, fb / peak * 1e3, None, bytes=fb, peak_bytes_per_s=peak)
            for causal in (True, False):
                fns = bk_callables("triton", b, n, causal, mode)
                add("triton", "fp32", mode, causal, b, n, *timed(fns, 50), plan=list(bk_triton.plan(n, mode != "fwd")))
            if b == 8 and n in (4096, 65536):
                fns = bk_callables("triton", b, n, True, mode, dtype=torch.bfloat16)
                add("triton", "bf16", mode, True, b, n, *timed(fns, 50))
            if n <= 65536 or b == 1:
                for causal in (True, False) if n <= 4096 else (True,):
                    fns = bk_callables("scan", b, n, causal, mode)
                    add("torch_scan", "fp32", mode, causal, b, n, *timed(fns, 20, graph_reps=5, budget_s=3.0))
            if b * n <= 8 * 65536 or (b == 1 and (mode == "fwd" or n <= 2**18)):
                fns = sdpa_callables(b, n, mode)
                ms = timed(fns, 20, graph_reps=5, warmup=1, budget_s=3.0)
                add("sdpa_flash", "bf16", mode, True, b, n, *ms, heads=4, head_dim=64)
            del fns
            torch.cuda.empty_cache()
        save(records)  # partial results survive a time limit
    return records


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--quick", action="store_true", help="a few shapes only")
    ap.add_argument("--overhead", action="store_true", help="host-side cost of an eager call (printed)")
    ap.add_argument("--render", action="store_true", help="only rewrite bk_core.md from the JSON in --out")
    ap.add_argument("--config", default="", help="bk_triton.CONFIG overrides, e.g. chunk=1024,rows_bwd=4")
    args = ap.parse_args()
    paths = {ext: os.path.join(args.out, f"bk_core{ext}") for ext in (".json", "_meta.json", ".md")}
    if args.render:
        with open(paths[".json"]) as f, open(paths["_meta.json"]) as g:
            records, meta = json.load(f), json.load(g)
        return write_markdown(records, meta, paths[".md"])
    assert torch.cuda.is_available(), "benchmarks/bk_core.py needs a CUDA device"
    sys.stdout.reconfigure(line_buffering=True)  # progress shows as it comes, also through a pipe
    bk_triton.CONFIG.update({k: int(v) for k, v in (kv.split("=") for kv in args.config.split(",") if kv)})
    info = {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "device_name": torch.cuda.get_device_name(),
        "python": platform.python_version(),
    }
    print(info, "config", bk_triton.CONFIG)
    if args.overhead:
        return overhead()

    meta = {"info": info, "config": dict(bk_triton.CONFIG), "peak_bytes_per_s": measure_bandwidth()}
    print(f"peak device-to-device bandwidth: {meta['peak_bytes_per_s'] / 1e12:.3f} TB/s (read + write)")
    meta["accuracy"] = []
    for b, n in [(8, 4096), (1, 2**18)] if args.quick else [(8, 256), (8, 4096), (8, 65536), (1, 2**20)]:
        for causal in (True, False):
            for kind in ("laplacian", "random"):
                meta["accuracy"].append(a := accuracy(b, n, causal, kind))
                print("accuracy", accuracy_row(a))
    meta["kernel_breakdown_us"] = {}
    for b, n in [(8, 4096)] if args.quick else [(8, 4096), (8, 65536), (1, 2**20)]:
        meta["kernel_breakdown_us"][f"B={b} N={n}"] = ks = kernel_breakdown(b, n)
        print(f"kernels, causal fwd+bwd B={b} N={n} (us per call):", ks)

    def save(records):
        os.makedirs(args.out, exist_ok=True)
        for key, obj in ((".json", records), ("_meta.json", meta)):
            with open(paths[key], "w") as f:
                json.dump(obj, f, indent=1)

    shapes = [(8, 4096), (8, 65536), (1, 2**20)]
    if not args.quick:
        shapes = [(8, n) for n in (256, 1024, 4096, 16384, 65536)] + [(1, n) for n in (4096, 65536, 2**18, 2**20)]
    records = timings(shapes, info, meta["peak_bytes_per_s"], save)
    write_markdown(records, meta, paths[".md"])
    print(open(paths[".md"]).read())


# ----------------------------------------------------------------------------------------- reports
def _get(records, **kw):
    return next((r for r in records if all(r.get(k) == v for k, v in kw.items())), None)


def _ms(r):
    """A record's CUDA-graph time, else its eager time."""
    return r["graph_ms"] if r["graph_ms"] is not None else r["ms"]


def _cell(r):
    """ "eager / graph" ms of a record, "-" without one."""
    if r is None:
        return "-"
    return f"{r['ms']:.4f} / {r['graph_ms']:.4f}" if r["graph_ms"] else f"{r['ms']:.3f} / -"


# The timed columns of the markdown tables: (impl, causal, dtype).
TABLE_COLUMNS = (
    ("triton", True, "fp32"),
    ("triton", False, "fp32"),
    ("torch_scan", True, "fp32"),
    ("sdpa_flash", True, "bf16"),
)


def write_markdown(records, meta, path):
    info, peak = meta["info"], meta["peak_bytes_per_s"]
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
            tc, tb, sc, fa = (
                _get(records, impl=impl, mode=mode, B=b, N=n, causal=causal, dtype=dtype)
                for impl, causal, dtype in TABLE_COLUMNS
            )
            floor = _get(records, impl="floor", mode=mode, B=b, N=n)["ms"]
            ratio_fa = f"{_ms(fa) / _ms(tc):.1f}x" if fa and tc else "-"
            ratio_fl = f"{_ms(tc) / floor:.1f}x" if tc else "-"
            cells = " | ".join(_cell(r) for r in (tc, tb, sc, fa))
            lines.append(f"| {b} | {n} | {cells} | {floor:.5f} | {ratio_fa} | {ratio_fl} |")
        lines.append("")
    bf = [r for r in records if r["impl"] == "triton" and r["dtype"] == "bf16"]
    if bf:
        lines += ["## bf16 inputs (triton, causal)", "", "| B | N | mode | eager | graph |", "|---|---|---|---|---|"]
        lines += [f"| {r['B']} | {r['N']} | {r['mode']} | {r['ms']:.4f} | {r['graph_ms']:.4f} |" for r in bf]
        lines.append("")
    if meta.get("kernel_breakdown_us"):
        lines += ["## GPU time per kernel, causal fwd+bwd (torch.profiler, us per call)", ""]
        for shape, ks in meta["kernel_breakdown_us"].items():
            lines.append(f"- {shape}: " + ", ".join(f"`{k}` {v:.1f}" for k, v in ks.items()))
        lines.append("")
    lines += [
        "## Accuracy vs float64 (max |err| / max |ref|)",
        "",
        "| B | N | causal | inputs | triton out | triton grad diag / sub / sup | fp32 scan out / grad diag | tol | |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [accuracy_row(a) for a in meta["accuracy"]]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def accuracy_row(a):
    """One accuracy record as a row of the markdown table."""
    return (
        f"| {a['B']} | {a['N']} | {a['causal']} | {a['inputs']} | {a['triton_out_max']:.1e} | "
        f"{a['triton_grad_diag_max']:.1e} / {a['triton_grad_sub_max']:.1e} / {a['triton_grad_sup_max']:.1e} | "
        f"{a['scan_fp32_out_max']:.1e} / {a['scan_fp32_grad_diag_max']:.1e} | {a['tolerance']:g} | "
        f"{'pass' if a['pass'] else 'FAIL'} |"
    )


if __name__ == "__main__":
    main()
