"""Step 7, measured: uniform sampling vs curriculum vs active learning on the same model and seeds.

For each seed and method, one training run of the plain ResNet-BK on the bundled WikiText-2 (word
level), validated on the WHOLE validation split every `--eval-every` steps (token-weighted
perplexity, docs/design.md section 4). Recorded at every validation: optimizer steps, training tokens,
training wall-clock (CUDA-synchronised; validation time excluded, scoring time INCLUDED, since the
callbacks score inside the training loop) and the callbacks' scoring cost (seconds, forward FLOPs).

Reported per method, mean ± standard deviation over seeds (and min..max):
  - steps, tokens and wall-clock to reach a fixed validation perplexity: the target is fixed by a
    rule stated before the runs (`--target-ratio` x the mean final val ppl of uniform sampling,
    i.e. "within 10% of where uniform ends"), or given with --target-ppl; the crossing is linearly
    interpolated in log-perplexity between the two validations around it;
  - final val ppl at the fixed step budget (`--max-steps`), and the scoring share of wall-clock.

The methods (same model, optimizer, schedule, seeds and data order seed):
  uniform     no callback: plain shuffled sampling;
  curriculum  callbacks.Curriculum: unigram-surprisal difficulty, linear pacing from 20% of the
              windows to all of them at half the steps;
  active      callbacks.ActiveLearning: after the first `al-every` steps, every `al-every` steps score
              a random pool of 4096 windows by predictive entropy and train on the top half (80% top,
              20% random from the rest).

    # on the GPU (results, table, TensorBoard curves of val ppl under --out):
    python benchmarks/step7_data.py --out benchmarks/results --cache-dir .cache/step7
    # table, figure and docs from a results file, anywhere:
    python benchmarks/step7_data.py --report benchmarks/results/step7_data.json
    # CPU smoke run:
    python benchmarks/step7_data.py --device cpu --seeds 0 --max-steps 20 --eval-every 10 \\
        --d-model 16 --n-layers 1 --limit-val-batches 2 --out /tmp/step7
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ("uniform", "curriculum", "active")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--max-steps", type=int, default=1500, help="step budget per run (0: plan from --time-budget)")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--time-budget", type=float, default=0.0,
                   help="seconds for all runs; with --max-steps 0 the step budget is planned from a timed warm-up")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--num-experts", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--al-every", type=int, default=200)
    p.add_argument("--al-pool", type=int, default=4096)
    p.add_argument("--limit-val-batches", type=float, default=1.0, help="1.0 = the whole validation split")
    p.add_argument("--max-train-tokens", type=int, default=None)
    p.add_argument("--device", default="cuda")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--target-ratio", type=float, default=1.10)
    p.add_argument("--target-ppl", type=float, default=None)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--figure", default=None, help="PNG path (default: none on a run, docs/step7_data.png on --report)")
    p.add_argument("--report", default=None, help="only summarise this results JSON (no training)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------- runs
def make_clock():
    import torch
    from lightning.pytorch.callbacks import Callback

    class Clock(Callback):
        """Training wall-clock without validation; one record per validation."""

        def __init__(self, method_cb, tokens_per_step):
            self.method_cb, self.tokens_per_step = method_cb, tokens_per_step
            self.records, self.t0, self.paused, self.t_val = [], None, 0.0, None

        def _now(self, pl_module):
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize(pl_module.device)
            return time.perf_counter()

        def on_train_start(self, trainer, pl_module):
            self.t0 = self._now(pl_module)

        def on_validation_start(self, trainer, pl_module):
            if not trainer.sanity_checking:
                self.t_val = self._now(pl_module)

        def on_validation_end(self, trainer, pl_module):
            if trainer.sanity_checking:
                return
            step = trainer.global_step
            cb = self.method_cb
            self.records.append({
                "step": step,
                "tokens": step * self.tokens_per_step,
                "train_seconds": self.t_val - self.t0 - self.paused,
                "scoring_seconds": getattr(cb, "scoring_seconds", 0.0),
                "scoring_flops": getattr(cb, "scoring_flops", 0.0),
                "val_ppl": float(trainer.callback_metrics["val/ppl"]),
            })
            self.paused += self._now(pl_module) - self.t_val

    return Clock


def build_model(args, vocab_size):
    from lightning_modules import LanguageModel
    from resnet_bk.models import ResNetBKLM

    network = partial(ResNetBKLM, d_model=args.d_model, n_layers=args.n_layers, num_experts=args.num_experts,
                      max_seq_len=args.seq_len, dropout=0.0)
    return LanguageModel(network, vocab_size, lr=args.lr, warmup_steps=args.warmup_steps)


def method_callback(method, args):
    from callbacks import ActiveLearning, Curriculum

    if method == "uniform":
        return None
    if method == "curriculum":
        return Curriculum(difficulty="unigram", pacing="linear", start_fraction=0.2, full_at_fraction=0.5)
    return ActiveLearning(every_n_steps=args.al_every, pool_size=args.al_pool, keep_fraction=0.5,
                          random_fraction=0.2, score="entropy", score_batch_size=64)


def make_datamodule(args, seed):
    from datamodules import WikiTextDataModule

    return WikiTextDataModule(source="bundled", tokenizer="word", seq_len=args.seq_len, batch_size=args.batch_size,
                              eval_batch_size=64, cache_dir=args.cache_dir, max_train_tokens=args.max_train_tokens,
                              seed=seed)


def run_one(method, seed, args, max_steps, eval_every, limit_val=None):
    import lightning as L

    L.seed_everything(seed, verbose=False)
    dm = make_datamodule(args, seed)
    model = build_model(args, dm.vocab_size)
    cb = method_callback(method, args)
    clock = make_clock()(cb, args.batch_size * args.seq_len)
    trainer = L.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu", devices=1, max_steps=max_steps,
        val_check_interval=eval_every, check_val_every_n_epoch=None,
        limit_val_batches=args.limit_val_batches if limit_val is None else limit_val,
        num_sanity_val_steps=0, gradient_clip_val=1.0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[c for c in (cb, clock) if c is not None],
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    return {
        "method": method, "seed": seed, "max_steps": max_steps, "records": clock.records,
        "scored_examples": getattr(cb, "scored_examples", 0), "fit_seconds": time.perf_counter() - start,
        "n_train_windows": dm.num_train_examples,
    }, model, dm


def train_flops_per_step(model, dm, device):
    """Forward + backward FLOPs of one training step, counted by FlopCounterMode (no .grad side effect)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model = model.to(device)
    batch = next(iter(dm.train_dataloader()))
    batch = {k: v.to(device) for k, v in batch.items()}
    params = [p for p in model.parameters() if p.requires_grad]
    with FlopCounterMode(display=False) as counter:
        loss = model.compute_loss(batch, "train").loss
        torch.autograd.grad(loss, params, allow_unused=True)
    return counter.get_total_flops()


def device_name(device):
    import torch

    return torch.cuda.get_device_name() if device == "cuda" and torch.cuda.is_available() else "cpu"


def run_all(args):
    import torch

    torch.set_float32_matmul_precision("high")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    meta = {"device": device_name(args.device), "torch": torch.__version__, "args": vars(args),
            "command": " ".join(sys.argv)}

    # warm-up (kernel compilation, cuBLAS heuristics), timed to plan the step budget
    eval_every = args.eval_every
    warm, model, dm = run_one("uniform", 12345, args, max_steps=2 * eval_every, eval_every=eval_every, limit_val=1.0)
    recs = warm["records"]
    step_seconds = (recs[1]["train_seconds"] - recs[0]["train_seconds"]) / eval_every
    eval_seconds = warm["fit_seconds"] - recs[-1]["train_seconds"]  # ~2 validations + setup
    meta["warmup"] = {"step_seconds": step_seconds, "fit_seconds": warm["fit_seconds"], "eval_seconds_x2": eval_seconds}
    meta["train_flops_per_step"] = train_flops_per_step(model, dm, args.device)
    meta["n_train_windows"] = dm.num_train_examples
    del model, dm

    max_steps = args.max_steps
    if max_steps <= 0:
        runs = len(args.seeds) * len(args.methods)
        left = args.time_budget - (time.perf_counter() - t_start)
        per_run = left / runs
        # per run: steps * step_seconds * (1 + ~15% callbacks/scoring) + evals (~half the warm-up's 2)
        # + ~2 s setup; evals scale with max_steps / eval_every
        per_eval = eval_seconds / 2
        steps = (per_run - 2.0) / (step_seconds * 1.15 + per_eval / eval_every)
        max_steps = max(2 * eval_every, min(3000, int(steps // eval_every) * eval_every))
    meta["max_steps"] = max_steps
    print(f"[step7] warm-up: {step_seconds * 1e3:.1f} ms/step, planned max_steps={max_steps}", flush=True)

    results = {"meta": meta, "runs": []}
    for seed in args.seeds:  # all methods of one seed together, so a cut-off run loses whole seeds
        for method in args.methods:
            result, _, _ = run_one(method, seed, args, max_steps, eval_every)
            results["runs"].append(result)
            last = result["records"][-1]
            print(f"[step7] seed {seed} {method:10s} final val ppl {last['val_ppl']:.2f} "
                  f"train {last['train_seconds']:.1f}s (scoring {last['scoring_seconds']:.1f}s) "
                  f"elapsed {time.perf_counter() - t_start:.0f}s", flush=True)
            (out / "step7_data.json").write_text(json.dumps(results, indent=1))
    write_tensorboard(results, out / "tb")
    return results


def write_tensorboard(results, logdir):
    """val ppl curves of every run in ONE event file: tags <method>/seed<seed>/val_ppl (by step) and
    <method>/seed<seed>/val_ppl_by_ms (by training milliseconds, scoring included)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return
    writer = SummaryWriter(str(logdir), filename_suffix=".step7")
    for run in results["runs"]:
        tag = f"{run['method']}/seed{run['seed']}"
        for r in run["records"]:
            writer.add_scalar(f"{tag}/val_ppl", r["val_ppl"], r["step"])
            writer.add_scalar(f"{tag}/val_ppl_by_ms", r["val_ppl"], int(r["train_seconds"] * 1e3))
    writer.close()


# -------------------------------------------------------------------------------------- report
def crossing(records, target):
    """(step, tokens, seconds) where val ppl first reaches `target`, interpolated in log ppl
    between the validations around it; None if it never does."""
    prev = None
    for r in records:
        if r["val_ppl"] <= target:
            if prev is None:
                return r["step"], r["tokens"], r["train_seconds"]
            a, b = math.log(prev["val_ppl"]), math.log(r["val_ppl"])
            w = (a - math.log(target)) / (a - b)
            return tuple(prev[k] + w * (r[k] - prev[k]) for k in ("step", "tokens", "train_seconds"))
        prev = r
    return None


def mean_sd(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": mean, "sd": sd, "min": min(values), "max": max(values), "n": len(values)}


def summarize(results, target_ratio=1.10, target_ppl=None):
    runs = results["runs"]
    methods = [m for m in METHODS if any(r["method"] == m for r in runs)]
    finals = {m: [r["records"][-1]["val_ppl"] for r in runs if r["method"] == m] for m in methods}
    rule = "given"
    if target_ppl is None:
        target_ppl = target_ratio * statistics.fmean(finals["uniform"])
        rule = f"{target_ratio} x the mean final val ppl of uniform sampling"
    rows = {}
    for m in methods:
        mruns = [r for r in runs if r["method"] == m]
        cross = [crossing(r["records"], target_ppl) for r in mruns]
        last = [r["records"][-1] for r in mruns]
        rows[m] = {
            "seeds": [r["seed"] for r in mruns],
            "final_val_ppl": mean_sd([x["val_ppl"] for x in last]),
            "reached": sum(c is not None for c in cross),
            "steps_to_target": mean_sd([c[0] if c else None for c in cross]),
            "tokens_to_target": mean_sd([c[1] if c else None for c in cross]),
            "seconds_to_target": mean_sd([c[2] if c else None for c in cross]),
            "train_seconds": mean_sd([x["train_seconds"] for x in last]),
            "scoring_seconds": mean_sd([x["scoring_seconds"] for x in last]),
            "scoring_flops": mean_sd([x["scoring_flops"] for x in last]),
        }
    return {"target_ppl": target_ppl, "target_rule": rule, "rows": rows}


def fmt(stat, digits=1, scale=1.0, unit=""):
    if stat is None:
        return "not reached"
    return (f"{stat['mean'] / scale:.{digits}f} ± {stat['sd'] / scale:.{digits}f}{unit} "
            f"({stat['min'] / scale:.{digits}f}..{stat['max'] / scale:.{digits}f})")


def markdown_table(results, summary):
    meta = results["meta"]
    fps = meta.get("train_flops_per_step", 0.0)
    lines = [
        f"Target val ppl {summary['target_ppl']:.2f} ({summary['target_rule']}); "
        f"budget {meta['max_steps']} steps; device {meta['device']}; mean ± sd (min..max) over seeds.",
        "",
        "| method | final val ppl | reached target | steps to target | tokens to target (M) | wall-clock to target (s) "
        "| train wall-clock (s) | of which scoring (s) | scoring FLOPs / train FLOPs |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m, row in summary["rows"].items():
        ratio = "0" if not row["scoring_flops"] or not fps else \
            f"{row['scoring_flops']['mean'] / (fps * meta['max_steps']):.3f}"
        lines.append(
            f"| {m} | {fmt(row['final_val_ppl'], 2)} | {row['reached']}/{len(row['seeds'])} "
            f"| {fmt(row['steps_to_target'], 0)} | {fmt(row['tokens_to_target'], 2, 1e6)} "
            f"| {fmt(row['seconds_to_target'], 1)} | {fmt(row['train_seconds'], 1)} "
            f"| {fmt(row['scoring_seconds'], 2)} | {ratio} |")
    return "\n".join(lines) + "\n"


def plot(results, summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    colors = {"uniform": "tab:gray", "curriculum": "tab:blue", "active": "tab:red"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for m in summary["rows"]:
        mruns = [r for r in results["runs"] if r["method"] == m]
        steps = np.array([x["step"] for x in mruns[0]["records"]])
        ppl = np.array([[x["val_ppl"] for x in r["records"]] for r in mruns])
        secs = np.array([[x["train_seconds"] for x in r["records"]] for r in mruns])
        for ax, xs in ((axes[0], steps), (axes[1], secs.mean(0))):
            ax.plot(xs, ppl.mean(0), color=colors[m], label=f"{m} (n={len(mruns)})")
            ax.fill_between(xs, ppl.min(0), ppl.max(0), color=colors[m], alpha=0.2)
    for ax, xlabel in ((axes[0], "optimizer steps"), (axes[1], "training wall-clock, s (scoring included)")):
        ax.axhline(summary["target_ppl"], color="k", ls=":", lw=1, label="target")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("val ppl (whole split)")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend()
    fig.suptitle(f"Step 7 data selection, ResNet-BK on WikiText-2, {results['meta']['device']}: "
                 "mean, min..max over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def report(results, args, out_dir):
    summary = summarize(results, args.target_ratio, args.target_ppl)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results, summary)
    (out_dir / "step7_data.md").write_text(
        "# Step 7 data selection: uniform vs curriculum vs active learning (measured)\n\n"
        f"Command: `{results['meta']['command']}`\n\n" + table)
    print(table)
    if args.figure:
        plot(results, summary, args.figure)
    return summary


def main(argv=None):
    args = parse_args(argv)
    if args.report:
        results = json.loads(Path(args.report).read_text())
        args.figure = args.figure or str(ROOT / "docs" / "step7_data.png")
        report(results, args, Path(args.report).parent)
        return 0
    if args.cache_dir:
        os.environ.setdefault("RESNET_BK_CACHE", args.cache_dir)
    results = run_all(args)
    report(results, args, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
