"""Training speed of ResNet-BK against the equal-size Transformer: tokens/s, GPU busy, launches and
host synchronisations per step, peak memory; eager and compiled, one process, one GPU.

    python benchmarks/lm_speed.py                       # N = 256 .. 64K, both models, eager + compiled
    python benchmarks/lm_speed.py --n 256 4096 --modes compiled --fit

Every row trains through the project's own code path: the LightningModule that `lightning fit`
builds from configs/resnet_bk.yaml or configs/transformer.yaml (only max_seq_len, the compile
option and the batch shape changed), its compute_loss (forward, cross-entropy, weighted aux
losses), backward, gradient clipping at 1.0 and fused AdamW, in bf16 autocast. Tokens per step are
fixed (--tokens, default 65,536 = B x N), random token ids.

Per row: tokens_per_s over --steps timed steps after --warmup steps (compilation included in the
warmup); from a torch.profiler window of --profile-steps steps: gpu_busy (GPU kernel time / wall
time, the kernel time per step from the profiled window over the unprofiled step time), launches_per_step (kernel and CUDA-graph launches); host_syncs_per_step (synchronising CUDA
calls counted by torch.cuda.set_sync_debug_mode over the same steps); peak_mem_gb. A row with
"dispatch": "loop" runs the MoE through its loop reference (host-side split sizes, one sync per
layer: the dispatch the grouped GEMM replaced). --fit adds the throughput of `lightning fit
--config configs/<model>.yaml` itself (its own batch shape, validation and checkpoints off) with
the GPU busy fraction of a profiled window. Writes benchmarks/results/lm_speed.json and .md.
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
import lightning as L  # noqa: E402

import resnet_bk.layers.moe as moe_module  # noqa: E402
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


def raw_loop(model: str, n: int, tokens: int, compiled: bool, dispatch: str, args) -> dict:
    b = max(1, tokens // n)
    module = build_module(model, n, "default" if compiled else False).cuda()
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

    original = moe_module._grouped_mm_available
    if dispatch == "loop":
        moe_module._grouped_mm_available = lambda x: False
    try:
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
    finally:
        moe_module._grouped_mm_available = original
    step_ms = 1e3 * elapsed / args.steps
    # GPU busy: kernel time per step (profiled) over the step's wall time (timed without the profiler,
    # whose own host cost would stretch the step).
    prof["gpu_busy"] = min(1.0, prof["gpu_busy_us_per_step"] / (1e3 * step_ms))
    row = {
        "model": model,
        "N": n,
        "B": b,
        "compiled": compiled,
        "dispatch": dispatch if model == "resnet_bk" else None,
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


class FitMeter(L.Callback):
    """Tokens/s of the training loop from batch `start` on, and GPU busy as lm_speed's rows measure it:
    kernel time per step of a profiled window over the mean step time of the timed batches."""

    def __init__(self, start: int, profile_at: int, profile_steps: int):
        self.start, self.profile_at, self.profile_steps = start, profile_at, profile_steps
        self.t0 = self.tokens = None
        self.batches = 0
        self.prof = None
        self.kernel_us_per_step = self.gpu_busy = None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        step = trainer.global_step
        if step == self.start:
            torch.cuda.synchronize()
            self.t0, self.tokens = time.perf_counter(), 0
        if step == self.profile_at:
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
            self.prof.__enter__()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.tokens is not None:
            self.tokens += batch["input_ids"].numel()
            self.batches += 1
        if self.prof is not None and trainer.global_step == self.profile_at + self.profile_steps:
            torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)
            kernels = [e for e in self.prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            self.kernel_us_per_step = sum(e.time_range.elapsed_us() for e in kernels) / self.profile_steps
            self.prof = None

    def on_train_end(self, trainer, module):
        torch.cuda.synchronize()
        self.elapsed = time.perf_counter() - self.t0
        if self.kernel_us_per_step is not None and self.batches:
            self.gpu_busy = min(1.0, self.kernel_us_per_step / (1e6 * self.elapsed / self.batches))


def lightning_fit(model: str, steps: int) -> dict:
    meter = FitMeter(start=30, profile_at=steps - 15, profile_steps=10)
    cli = build(
        [
            "--config",
            CONFIGS[model],
            "--trainer.max_steps",
            str(steps),
            "--trainer.limit_val_batches",
            "0",
            "--trainer.logger",
            "false",
            "--trainer.enable_checkpointing",
            "false",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.enable_model_summary",
            "false",
        ]
    )
    cli.trainer.callbacks.append(meter)
    cli.trainer.fit(cli.model, cli.datamodule)
    dm = cli.datamodule
    torch._dynamo.reset()
    return {
        "model": model,
        "N": dm.seq_len,
        "B": dm.batch_size,
        "lightning_fit": True,
        "compiled": cli.model.compile_mode is not None,
        "tokens_per_s": meter.tokens / meter.elapsed,
        "gpu_busy": meter.gpu_busy,
        "steps_timed": steps - 30,
    }


def to_markdown(result: dict) -> str:
    lines = [
        f"# Training speed: ResNet-BK vs Transformer ({result['device']})",
        "",
        f"`{result['command']}`; torch {result['torch']}; {result['tokens_per_step']} tokens per step, bf16 "
        "autocast, fused AdamW, clip 1.0, random tokens, one process.",
        "",
        "| model | N | B | compiled | MoE dispatch | tokens/s | step ms | GPU busy | launches/step | syncs/step | peak GB |",
        "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["records"]:
        lines.append(
            f"| {r['model']} | {r['N']} | {r['B']} | {r['compiled']} | {r.get('dispatch') or '-'} | "
            f"{r['tokens_per_s']:,.0f} | {r['step_ms']:.2f} | {r['gpu_busy']:.2f} | {r['launches_per_step']:.0f} | "
            f"{r['host_syncs_per_step']:.0f} | {r['peak_mem_gb']:.2f} |"
        )
    by = {(r["model"], r["N"], r["compiled"], r.get("dispatch")): r["tokens_per_s"] for r in result["records"]}
    lines += [
        "",
        "Ratio ResNet-BK / Transformer (tokens/s, grouped dispatch):",
        "",
        "| N | eager | compiled |",
        "|---:|---:|---:|",
    ]
    for n in sorted({r["N"] for r in result["records"]}):
        cells = []
        for c in (False, True):
            bk, tr = by.get(("resnet_bk", n, c, "grouped")), by.get(("transformer", n, c, None))
            cells.append(f"{bk / tr:.2f}" if bk and tr else "-")
        lines.append(f"| {n} | {cells[0]} | {cells[1]} |")
    if result.get("fit"):
        lines += [
            "",
            "`lightning fit --config configs/<model>.yaml` (its own batch shape):",
            "",
            "| model | N | B | compiled | tokens/s | GPU busy | ÷ raw loop of the same shape |",
            "|---|---:|---:|---|---:|---:|---:|",
        ]
        raw = {(r["model"], r["N"], r["B"], r["compiled"]): r["tokens_per_s"] for r in result["records"]}
        for r in result["fit"]:
            busy = f"{r['gpu_busy']:.2f}" if r.get("gpu_busy") is not None else "-"
            same = raw.get((r["model"], r["N"], r["B"], r["compiled"]))
            ratio = f"{r['tokens_per_s'] / same:.2f}" if same else "-"
            lines.append(
                f"| {r['model']} | {r['N']} | {r['B']} | {r['compiled']} | {r['tokens_per_s']:,.0f} | {busy} | {ratio} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[256, 1024, 4096, 16384, 65536], help="sequence lengths")
    ap.add_argument("--tokens", type=int, default=65536, help="tokens per step (B = tokens // N)")
    ap.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    ap.add_argument("--loop-dispatch", action="store_true", help="also run ResNet-BK eager with the loop MoE dispatch")
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--fit", type=int, default=0, metavar="STEPS", help="also time `lightning fit` for STEPS steps")
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
        "fit": [],
    }
    plan = [(m, n, mode == "compiled", "grouped") for n in args.n for m in args.models for mode in args.modes]
    if args.loop_dispatch and "resnet_bk" in args.models:
        plan += [("resnet_bk", n, False, "loop") for n in args.n]
    for model, n, compiled, dispatch in plan:
        try:
            row = raw_loop(model, n, args.tokens, compiled, dispatch, args)
        except torch.OutOfMemoryError as err:
            print(f"{model} N={n} compiled={compiled}: out of memory ({str(err)[:80]})", flush=True)
            result["records"].append({"model": model, "N": n, "compiled": compiled, "error": "out of memory"})
            torch.cuda.empty_cache()
            continue
        table = row.pop("profile_table")
        if args.profiles:
            os.makedirs(args.profiles, exist_ok=True)
            with open(
                os.path.join(args.profiles, f"{model}_{n}_{'compiled' if compiled else 'eager'}_{dispatch}.txt"), "w"
            ) as f:
                f.write(table)
        result["records"].append(row)
        print(json.dumps(row), flush=True)
    if args.fit:
        for model in args.models:
            result["fit"].append(lightning_fit(model, args.fit))
            print(json.dumps(result["fit"][-1]), flush=True)
    result["records"] = [r for r in result["records"] if "error" not in r] + [
        r for r in result["records"] if "error" in r
    ]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(to_markdown({**result, "records": [r for r in result["records"] if "error" not in r]}))
    print(to_markdown({**result, "records": [r for r in result["records"] if "error" not in r]}))


if __name__ == "__main__":
    main()
