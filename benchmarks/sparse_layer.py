"""The learned-sparsity layer against the dense one on a GPU: is skipping half the positions faster?

    python benchmarks/sparse_layer.py                 # -> benchmarks/results/sparse_layer.{json,md}
    python benchmarks/sparse_layer.py --out DIR

Per shape (B, N) at d_model 128, d_ff 512, 4 experts (configs/sparse_bk.yaml's layer), in bf16
autocast as the configs train: the dense BKLayer, and SparseBKLayer (target sparsity 0.5, static
shapes at capacity c, core "reduced": the fused Triton Schur-complement chain over the kept
positions, or "full": the length-N chain with a skip potential). Timed, each in one CUDA graph
replayed back to back (the GPU's time, no host launches): training forward + backward, and the
eval forward. Also checked: the fused reduced chain against its float64 PyTorch reference on the
GPU (max |g - g_ref| / max |g_ref| of the values and the gradient of the potentials).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from resnet_bk.layers.bk_layer import BKLayer
from resnet_bk.layers.sparsity import SparseBKLayer
from resnet_bk.reduced_chain import pack_kept, reduced_green_diagonal

D, D_FF, EXPERTS = 128, 512, 4
SHAPES = [(32, 256), (8, 4096)]
LAYERS = {  # name -> (target sparsity, core, capacity); sparsity 0 is the dense BKLayer
    "dense": (0.0, None, None),
    "sparse_reduced_c0.6": (0.5, "reduced", 0.6),
    "sparse_reduced_c0.5": (0.5, "reduced", 0.5),
    "sparse_full_c0.6": (0.5, "full", 0.6),
}


def graph_ms(fn, reps: int = 50) -> float:
    """ms per call of fn captured once in a CUDA graph (after 3 warm-up calls on a side stream)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def make_layer(sparsity: float, core, capacity) -> torch.nn.Module:
    if sparsity == 0:
        return BKLayer(D, D_FF, EXPERTS, 1, causal=True).cuda()
    return SparseBKLayer(D, D_FF, EXPERTS, 1, target_sparsity=sparsity, core=core, capacity=capacity).cuda()


def time_layer(layer: torch.nn.Module, b: int, n: int) -> dict:
    x = torch.randn(b, n, D, device="cuda", requires_grad=True)
    params = [p for p in layer.parameters() if p.requires_grad]

    def train_step():
        with torch.autocast("cuda", torch.bfloat16):
            out = layer(x)[0]
        torch.autograd.grad(out.float().square().mean(), [x, *params], allow_unused=True)

    def infer():
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
            layer(x)

    layer.train()
    train = graph_ms(train_step)
    kept_train = getattr(layer, "last_rows", b * n) / (b * n)
    layer.eval()
    if getattr(layer, "predictor", None) is not None:  # eval keeps logits above the calibrated threshold
        with torch.no_grad():
            layer.train()
            for _ in range(20):
                layer(x)  # the EMA of the training batches' target quantile
            layer.eval()
    evaluation = graph_ms(infer)
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        layer(x)
    keep = getattr(layer, "last_keep", None)
    kept_eval = float(keep.float().mean()) if keep is not None else 1.0
    return {"train_ms": train, "eval_ms": evaluation, "rows_frac_train": kept_train, "kept_frac_eval": kept_eval}


def accuracy(b: int = 8, n: int = 512) -> dict:
    """The fused reduced chain (complex64) against the float64 reference sweep, values and gradient."""
    torch.manual_seed(0)
    keep = torch.rand(b, n, device="cuda") < 0.5
    pos, valid, runs = pack_kept(keep)
    v = torch.randn(*valid.shape, device="cuda", dtype=torch.float64) * 0.5
    lengths = valid.sum(1)
    out = {}
    results = {}
    for method, dtype in (("triton", torch.float32), ("scan", torch.float64)):
        leaf = v.to(dtype).requires_grad_(True)
        g = reduced_green_diagonal(leaf, runs, 0.3, 1j, method, lengths=lengths)
        (grad,) = torch.autograd.grad(torch.view_as_real(g).sum(), leaf)
        results[method] = (g.to(torch.complex128), grad.double())
    (g, dg), (g_ref, dg_ref) = results["triton"], results["scan"]
    out["values_rel_err"] = float((g - g_ref).abs().max() / g_ref.abs().max())
    out["grad_rel_err"] = float((dg - dg_ref).abs().max() / dg_ref.abs().max())
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--shapes", nargs="+", default=[f"{b}x{n}" for b, n in SHAPES], help="BxN, e.g. 32x256 8x4096")
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    if not torch.cuda.is_available():
        print("error: benchmarks/sparse_layer.py times CUDA graphs; run it on a CUDA device", file=sys.stderr)
        return 2
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    try:
        report["accuracy"] = accuracy()
    except Exception as err:  # noqa: BLE001 - recorded; the timings still run
        report["accuracy"] = {"error": f"{type(err).__name__}: {err}".splitlines()[0]}
    print(f"accuracy (fused reduced chain vs float64 reference): {report['accuracy']}", flush=True)
    for b, n in shapes:
        for name, (sparsity, core, capacity) in LAYERS.items():
            torch.manual_seed(0)
            row = {"layer": name, "B": b, "N": n}
            try:
                row.update(time_layer(make_layer(sparsity, core, capacity), b, n))
            except Exception as err:  # noqa: BLE001 - recorded, and the other layers still run
                row["error"] = f"{type(err).__name__}: {err}".splitlines()[0]
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sparse_layer.json"), "w") as f:
        json.dump(report, f, indent=1)
    dense = {(r["B"], r["N"]): r for r in report["rows"] if r["layer"] == "dense"}
    lines = [
        "# The learned-sparsity layer against the dense layer (one layer, CUDA graphs)",
        "",
        f"Made by `python benchmarks/sparse_layer.py --shapes {' '.join(args.shapes)}` on {report['device']}, torch {report['torch']}. "
        f"d_model {D}, d_ff {D_FF}, {EXPERTS} experts, bf16 autocast; ms per call of one CUDA graph replayed "
        "back to back. Fused reduced chain against the float64 reference (relative max error): "
        + ", ".join(f"{k} {v:.1e}" if isinstance(v, float) else f"{k} {v}" for k, v in report["accuracy"].items())
        + ".",
        "",
        "| layer | B | N | train fwd+bwd ms | eval fwd ms | rows (train) | kept (eval) | train time ÷ dense | eval time ÷ dense |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        d = dense.get((r["B"], r["N"]), {})
        if "error" in r or "error" in d:
            lines.append(f"| {r['layer']} | {r['B']} | {r['N']} | {r.get('error') or 'dense failed'} | | | | | |")
            continue
        lines.append(
            f"| {r['layer']} | {r['B']} | {r['N']} | {r['train_ms']:.3f} | {r['eval_ms']:.3f} | "
            f"{r['rows_frac_train']:.2f} | {r['kept_frac_eval']:.2f} | "
            f"{r['train_ms'] / d['train_ms']:.2f}x | {r['eval_ms'] / d['eval_ms']:.2f}x |"
        )
    with open(os.path.join(args.out, "sparse_layer.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
