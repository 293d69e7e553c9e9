"""Training speed of ResNet-BK against the equal-size Transformer: tokens/s, GPU busy, launches and
host synchronisations per step, peak memory; eager and compiled, one process, one GPU.

    python benchmarks/lm_speed.py                       # N = 256 .. 64K, both models, eager + compiled
    python benchmarks/lm_speed.py --n 256 --tokens 8192 --modes compiled   # lightning fit's batch shape

Every row trains through the project's own code path: the LightningModule that `lightning fit`
builds from configs/resnet_bk.yaml or configs/transformer.yaml (only max_seq_len, the compile
option and the batch shape changed), its compute_loss (forward, cross-entropy, weighted aux
losses), backward, gradient clipping at 1.0 and fused AdamW, in bf16 autocast. Tokens per step are
fixed (--tokens, default 65,536 = B x N), random token ids.

Per row: tokens_per_s over --steps timed steps after --warmup steps (compilation included in the
warmup); from a torch.profiler window of --profile-steps steps: gpu_busy (GPU kernel time / wall
time, the kernel time per step from the profiled window over the unprofiled step time), launches_per_step (kernel and CUDA-graph launches); host_syncs_per_step (synchronising CUDA
calls counted by torch.cuda.set_sync_debug_mode over the same steps); peak_mem_gb. The throughput of
`lightning fit` itself is measured by the runner: `python -m benchmarks.run
benchmarks/specs/fit_speed.yaml`. Writes benchmarks/results/lm_speed.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from lightning_modules.language_model import weight_decay_groups  # noqa: E402
from resnet_bk.cli import build  # noqa: E402

CONFIGS = {"resnet_bk": "configs/resnet_bk.yaml", "transformer": "configs/transformer.yaml"}
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx", "cudaGraphLaunch")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def build_module(model: str, n: int, compile_mode, extra=()):
    args = [
        "--config",
        CONFIGS[model],
        "--model.init_args.network.init_args.config.max_seq_len",
        str(n),
        "--model.init_args.compile",
        str(compile_mode).lower() if isinstance(compile_mode, bool) else compile_mode,
        "--trainer.logger",
        "false",
        *extra,
    ]
    return build(args).model


def profile_steps(step, steps: int) -> dict:
    """GPU busy fraction, launches and host syncs per step over `steps` calls of step()."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            ) as prof:
                for _ in range(steps):
                    step()
                torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sync_warnings = [w for w in caught if "synchroniz" in str(w.message)]
    sites: dict[str, int] = {}
    for w in sync_warnings:  # where in Python each sync was asked for
        site = f"{os.path.relpath(w.filename)}:{w.lineno}"
        sites[site] = sites.get(site, 0) + 1
    events = prof.events()
    intervals = sorted(
        (e.time_range.start, e.time_range.end)
        for e in events
        if e.device_type == torch.autograd.DeviceType.CUDA and e.name and not e.name.startswith("Memcpy")
    )
    busy, cur_s, cur_e = 0.0, None, None
    for s, e in intervals:  # union of kernel intervals
        if cur_e is None or s > cur_e:
            busy += 0 if cur_e is None else cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += 0 if cur_e is None else cur_e - cur_s
    launches = sum(1 for e in events if e.name in LAUNCHES)
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=45, max_name_column_width=90)
    return {
        "gpu_busy_us_per_step": busy / steps,
        "launches_per_step": launches / steps,
        "host_syncs_per_step": len(sync_warnings) / steps,
        "sync_sites": sites,
        "profile_table": table,
    }


def raw_loop(model: str, n: int, tokens: int, compiled: bool, args) -> dict:
    b = max(1, tokens // n)
    module = build_module(model, n, args.compile_mode if compiled else False).cuda()
    module.compile_loss()
    opt = torch.optim.AdamW(weight_decay_groups(module, 0.1), lr=1e-4, fused=True)
    vocab = module.hparams.vocab_size
    g = torch.Generator(device="cuda").manual_seed(0)
    batch = {
        "input_ids": torch.randint(0, vocab, (b, n), device="cuda", generator=g),
        "targets": torch.randint(0, vocab, (b, n), device="cuda", generator=g),
    }

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = module.compute_loss(batch, "train").loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    prof = profile_steps(step, args.profile_steps)
    step_ms = 1e3 * elapsed / args.steps
    # GPU busy: kernel time per step (profiled) over the step's wall time (timed without the profiler,
    # whose own host cost would stretch the step).
    prof["gpu_busy"] = min(1.0, prof["gpu_busy_us_per_step"] / (1e3 * step_ms))
    row = {
        "model": model,
        "N": n,
        "B": b,
        "compiled": compiled,
        "compile_mode": args.compile_mode if compiled else None,
        "tokens_per_s": args.steps * b * n / elapsed,
        "step_ms": step_ms,
        "warmup_s": warmup_s,
        **{k: v for k, v in prof.items() if k != "profile_table"},
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30,
    }
    row["profile_table"] = prof["profile_table"]
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return row


def to_markdown(result: dict) -> str:
    lines = [
        f"# Training speed: ResNet-BK vs Transformer ({result['device']})",
        "",
        f"`{result['command']}`; torch {result['torch']}; {result['tokens_per_step']} tokens per step, bf16 "
        "autocast, fused AdamW, clip 1.0, random tokens, one process.",
        "",
        "| model | N | B | compiled | tokens/s | step ms | GPU busy | launches/step | syncs/step | peak GB |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["records"]:
        lines.append(
            f"| {r['model']} | {r['N']} | {r['B']} | {r['compiled']} | "
            f"{r['tokens_per_s']:,.0f} | {r['step_ms']:.2f} | {r['gpu_busy']:.2f} | {r['launches_per_step']:.0f} | "
            f"{r['host_syncs_per_step']:.0f} | {r['peak_mem_gb']:.2f} |"
        )
    by = {(r["model"], r["N"], r["B"], r["compiled"]): r["tokens_per_s"] for r in result["records"]}
    lines += [
        "",
        "Ratio ResNet-BK / Transformer (tokens/s):",
        "",
        "| N (B) | eager | compiled |",
        "|---:|---:|---:|",
    ]
    for n, b in sorted({(r["N"], r["B"]) for r in result["records"]}):
        cells = []
        for c in (False, True):
            bk, tr = by.get(("resnet_bk", n, b, c)), by.get(("transformer", n, b, c))
            cells.append(f"{bk / tr:.2f}" if bk and tr else "-")
        lines.append(f"| {n} ({b}) | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[256, 1024, 4096, 16384, 65536], help="sequence lengths")
    ap.add_argument("--tokens", type=int, default=65536, help="tokens per step (B = tokens // N)")
    ap.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    ap.add_argument(
        "--compile-mode",
        default="default",
        help="torch.compile mode of the compiled rows (reduce-overhead: CUDA graphs)",
    )
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(RESULTS, "lm_speed"), help="output path without extension")
    ap.add_argument("--profiles", default=None, help="folder for the per-row profiler tables (text)")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "command": " ".join(sys.argv),
        "tokens_per_step": args.tokens,
        "records": [],
    }
    plan = [(m, n, mode == "compiled") for n in args.n for m in args.models for mode in args.modes]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    for model, n, compiled in plan:
        try:
            row = raw_loop(model, n, args.tokens, compiled, args)
        except torch.OutOfMemoryError as err:
            print(f"{model} N={n} compiled={compiled}: out of memory ({str(err)[:80]})", flush=True)
            result["records"].append({"model": model, "N": n, "compiled": compiled, "error": "out of memory"})
            torch.cuda.empty_cache()
            continue
        table = row.pop("profile_table")
        if args.profiles:
            os.makedirs(args.profiles, exist_ok=True)
            with open(os.path.join(args.profiles, f"{model}_{n}_{'compiled' if compiled else 'eager'}.txt"), "w") as f:
                f.write(table)
        result["records"].append(row)
        print(json.dumps(row), flush=True)
        with open(args.out + ".json", "w") as f:  # after every row, so a cut-short sweep keeps what it measured
            json.dump(result, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(markdown := to_markdown({**result, "records": [r for r in result["records"] if "error" not in r]}))
    print(markdown)


if __name__ == "__main__":
    main()
