"""DDP on 2 GPUs vs 1 GPU at the same global batch, for four configs, through the real CLI.

For each config (resnet_bk, act_multiscale, curriculum, gradient_caching) it runs
`python -m resnet_bk fit --config configs/<name>.yaml` twice, `--trainer.max_steps S`:
  1 GPU:  devices 1, data batch_size B
  2 GPUs: devices 2 (DDP, NCCL), data batch_size B / 2 per rank, so the global batch is B and the
          SubsetSampler hands the two ranks together exactly the windows the single GPU sees.
Overrides for a like-for-like comparison: dropout 0 (no random masks), warmup_steps 20, validation
once at step S on `--val-batches` batches, gradient caching threshold 1.5 (never hits: per-rank keys
differ from the single GPU's whole-batch keys, so hits could not match), strategy
ddp_find_unused_parameters_true (MoE experts and ACT layers can go unused in a step).

StepTimer (a callback added with --trainer.callbacks+=) writes per rank: the local training loss
of every step, wall time per step (the host syncs every step in LanguageModel's finite-loss check,
so host times are device times), and the gap between one step's end and the next step's start,
which is where the next batch is fetched (the dataloader's share of the step). A separate
measurement iterates the resnet_bk training loader alone.

    python benchmarks/ddp_device.py --out results_dir [--steps 100] [--cpu-smoke]

--cpu-smoke: tiny models, 2 CPU processes over gloo (checks the script, measures nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import lightning as L

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["resnet_bk", "act_multiscale", "curriculum", "gradient_caching"]


class StepTimer(L.Callback):
    """Per-step local loss and host timings, written to $STEP_TIMER_OUT/rank<r>.json at the end of fit."""

    def __init__(self):
        self.start, self.end, self.loss = [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.start.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.end.append(time.perf_counter())
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.loss.append(None if loss is None else float(loss))

    def on_train_end(self, trainer, pl_module):
        out = os.environ.get("STEP_TIMER_OUT")
        if not out:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        Path(out).mkdir(parents=True, exist_ok=True)
        with open(Path(out) / f"rank{trainer.global_rank}.json", "w") as f:
            json.dump({"start": self.start, "end": self.end, "loss": self.loss, "val": metrics,
                       "world_size": trainer.world_size}, f)


def run(config: str, devices: int, args, tag: str, timeout: float) -> dict:
    batch = args.batch_size // devices
    out = Path(args.work) / tag
    cmd = [
        sys.executable, "-m", "resnet_bk", "fit", "--config", str(ROOT / "configs" / f"{config}.yaml"),
        "--trainer.devices", str(devices), "--trainer.max_steps", str(args.steps),
        "--trainer.val_check_interval", str(args.steps), "--trainer.check_val_every_n_epoch", "null",
        "--trainer.limit_val_batches", str(max(1, args.val_batches // devices)),  # per rank: the same windows
        "--trainer.num_sanity_val_steps", "0",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(Path(args.work) / "runs" / tag),
        "--trainer.callbacks+=benchmarks.ddp_device.StepTimer",
        "--data.init_args.batch_size", str(batch), "--data.init_args.eval_batch_size", "16",
        "--model.init_args.network.init_args.dropout", "0.0", "--model.init_args.warmup_steps", "20",
    ]  # fmt: skip
    if devices > 1:
        cmd += ["--trainer.strategy", "ddp_find_unused_parameters_true"]
    if config == "gradient_caching":
        cmd += ["--model.init_args.threshold", "1.5"]
    if args.cpu_smoke:
        cmd += ["--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
                "--model.init_args.network.init_args.d_model", "16", "--data.init_args.seq_len", "32",
                "--data.init_args.max_train_tokens", "20000", "--data.init_args.num_workers", "0"]  # fmt: skip
    env = {**os.environ, "STEP_TIMER_OUT": str(out), "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"
    except subprocess.TimeoutExpired:
        status = f"timeout after {timeout:.0f} s (hang?)"
    wall = time.perf_counter() - t0
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    result = {"config": config, "devices": devices, "batch_per_rank": batch, "status": status, "wall_s": wall}
    if len(ranks) == devices:
        skip = min(args.warmup, args.steps - 2)
        losses = [statistics.fmean(r["loss"][i] for r in ranks) for i in range(len(ranks[0]["loss"]))]
        r0 = ranks[0]
        step = [b - a for a, b in zip(r0["end"][skip:], r0["end"][skip + 1 :])]
        gap = [s - e for e, s in zip(r0["end"][skip:], r0["start"][skip + 1 :])]
        med = statistics.median(step)
        result.update(
            loss=losses, val=r0["val"], median_step_s=med, median_gap_s=statistics.median(gap),
            data_share=statistics.median(gap) / med, tokens_per_s=args.batch_size * args.seq_len / med,
        )
    return result


def loader_alone(args) -> dict:
    """The resnet_bk training loader by itself: batches per second (num_workers as in the config and 0)."""
    sys.path.insert(0, str(ROOT))
    from datamodules import WikiTextDataModule

    out = {}
    for workers in (2, 0):
        dm = WikiTextDataModule(seq_len=args.seq_len, batch_size=args.batch_size, num_workers=workers)
        dm.setup("fit")
        it = iter(dm.train_dataloader())
        next(it)
        n, t0 = 0, time.perf_counter()
        for _ in range(min(200, len(dm.train_dataset) // args.batch_size - 2)):
            next(it)
            n += 1
        out[f"num_workers={workers}"] = {"batches_per_s": n / (time.perf_counter() - t0), "batch_size": args.batch_size}
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--work", default="/tmp/ddp_device")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--warmup", type=int, default=20, help="steps left out of the timings")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--val-batches", type=int, default=8)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--budget-s", type=float, default=330, help="start no new run after this many seconds")
    p.add_argument("--cpu-smoke", action="store_true")
    args = p.parse_args()
    if args.cpu_smoke:
        args.seq_len = 32
    t_begin = time.perf_counter()
    results = {"args": vars(args), "runs": []}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for config in args.configs.split(","):
        for devices in (1, 2):
            left = args.budget_s - (time.perf_counter() - t_begin)
            if left < 20:
                results["runs"].append({"config": config, "devices": devices, "status": "not run (time budget)"})
                continue
            r = run(config, devices, args, f"{config}_{devices}", timeout=min(150, left))
            print(json.dumps({k: v for k, v in r.items() if k != "loss"}), flush=True)
            results["runs"].append(r)
            (out / "ddp_device.json").write_text(json.dumps(results, indent=1))
    if not args.cpu_smoke and time.perf_counter() - t_begin < args.budget_s + 30:
        results["loader_alone"] = loader_alone(args)
        print(json.dumps(results["loader_alone"]), flush=True)
    # 1 vs 2 GPU agreement and scaling per config
    summary = {}
    by = {(r["config"], r["devices"]): r for r in results["runs"]}
    for config in args.configs.split(","):
        one, two = by.get((config, 1), {}), by.get((config, 2), {})
        if "loss" in one and "loss" in two:
            diffs = [abs(a - b) for a, b in zip(one["loss"], two["loss"])]
            summary[config] = {
                "max_abs_loss_diff": max(diffs), "final_loss_1gpu": one["loss"][-1], "final_loss_2gpu": two["loss"][-1],
                "val_loss_1gpu": one["val"].get("val/loss"), "val_loss_2gpu": two["val"].get("val/loss"),
                "step_ms_1gpu": 1e3 * one["median_step_s"], "step_ms_2gpu": 1e3 * two["median_step_s"],
                "speedup": one["median_step_s"] / two["median_step_s"],
                "data_share_1gpu": one["data_share"], "data_share_2gpu": two["data_share"],
            }
    results["summary"] = summary
    results["total_s"] = time.perf_counter() - t_begin
    (out / "ddp_device.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
