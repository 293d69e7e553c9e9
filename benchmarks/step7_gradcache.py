"""Step 7, gradient caching, measured: hit rate, time per step and validation perplexity vs wall-clock.

Runs, one after another in ONE process on ONE device, the same ResNet-BK on the bundled WikiText-2 with
the same seed, data order and number of training batches (the budget):

    automatic      lightning_modules.LanguageModel, Lightning's automatic loop (the baseline)
    cache@T        lightning_modules.gradient_caching_module.GradientCachingLanguageModel, threshold T

for several thresholds T, one of them above 1 (nothing can hit: it must match the baseline, and it
shows what the cache's bookkeeping costs). Clipping (norm 1.0) and the warmup + cosine schedule are
active in every run; precision bf16-mixed. Every run uses Trainer(deterministic="warn"), so that the
never-hit run can be compared with the baseline parameter by parameter.

Measured per run (DESIGN §4: wall-clock, side by side, same device): the time of every training batch
(CUDA-synchronised at its start and end, so it includes Lightning's own per-batch work and excludes
validation), the hit rate, validation perplexity on the WHOLE validation split (token-weighted) every
--val_every steps against the training time spent so far, peak GPU memory, and the largest parameter
difference from the baseline at the end.

Outputs: <out>/step7_gradcache.json, <out>/step7_gradcache.md (the table), <figure> (val ppl vs
training seconds and vs step), TensorBoard logs under <tb_dir>/<run>/ (train/*, val/ppl, lr, and
bench/val_ppl_by_train_ms whose x axis is training milliseconds).

    python benchmarks/step7_gradcache.py                       # the device run (see docs/step7_gradcache.md)
    python benchmarks/step7_gradcache.py --steps 4 --val_every 2 --d_model 16 --n_layers 1 \
        --batch_size 2 --seq_len 16 --max_train_tokens 2000 --limit_val_batches 2 --accelerator cpu   # smoke
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

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (before CUDA starts)

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datamodules.wikitext import WikiTextDataModule  # noqa: E402
from lightning_modules.gradient_caching_module import GradientCachingLanguageModel  # noqa: E402
from lightning_modules.language_model import LanguageModel  # noqa: E402
from resnet_bk.models import ResNetBKLM  # noqa: E402


class StepTimer(L.Callback):
    """Per-batch training time (synchronised), hit flags, and (step, train seconds, val ppl) at each validation."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.hits: list[bool] = []
        self.train_seconds = 0.0
        self.curve: list[tuple[int, float, float]] = []
        self._t0 = 0.0

    def _sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._sync()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self._sync()
        dt = time.perf_counter() - self._t0
        self.times.append(dt)
        self.hits.append(bool(getattr(module, "last_hit", False)))
        self.train_seconds += dt

    def on_validation_end(self, trainer, module) -> None:
        if trainer.sanity_checking or "val/ppl" not in trainer.callback_metrics:
            return
        ppl = float(trainer.callback_metrics["val/ppl"])
        self.curve.append((trainer.global_step, self.train_seconds, ppl))
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_scalar("bench/val_ppl_by_train_ms", ppl, int(round(self.train_seconds * 1000)))


def median_ms(values: list[float]) -> float | None:
    return round(1000 * statistics.median(values), 3) if values else None


def run_one(name: str, threshold: float | None, args, dm: WikiTextDataModule, baseline: torch.Tensor | None):
    L.seed_everything(args.seed, verbose=False)
    network = partial(
        ResNetBKLM, d_model=args.d_model, n_layers=args.n_layers, num_experts=args.num_experts,
        max_seq_len=args.seq_len, dropout=args.dropout,
    )
    common = dict(network=network, vocab_size=dm.vocab_size, lr=args.lr, warmup_steps=args.warmup_steps)
    clip = dict(gradient_clip_val=args.clip, gradient_clip_algorithm="norm")
    if threshold is None:
        module, trainer_clip = LanguageModel(**common), clip
    else:
        module = GradientCachingLanguageModel(
            **common, **clip, threshold=threshold, key=args.key, max_bytes=int(args.cache_mib * 2**20),
            cache_dtype=args.cache_dtype, cache_device=args.cache_device,
        )
        trainer_clip = {}
    timer = StepTimer()
    logger = TensorBoardLogger(save_dir=args.tb_dir, name=name, version=0, default_hp_metric=False)
    trainer = L.Trainer(
        accelerator=args.accelerator, devices=1, precision=args.precision, max_steps=args.steps,
        val_check_interval=args.val_every, check_val_every_n_epoch=None, limit_val_batches=args.limit_val_batches,
        num_sanity_val_steps=0, log_every_n_steps=10, logger=logger, callbacks=[timer],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        deterministic="warn", **trainer_clip,
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    wall = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    wall = time.perf_counter() - wall
    params = torch.cat([p.detach().float().reshape(-1).cpu() for p in module.parameters()])

    skip = min(args.warmup_batches, max(len(timer.times) - 1, 0))  # first batches: kernel compilation, autotuning
    times, hits = timer.times[skip:], timer.hits[skip:]
    n_hits = sum(timer.hits)
    result = {
        "name": name,
        "loop": "automatic" if threshold is None else "gradient caching",
        "threshold": threshold,
        "key": None if threshold is None else args.key,
        "batches": len(timer.times),
        "optimizer_steps": trainer.global_step,
        "hits": n_hits,
        "hit_rate": n_hits / max(len(timer.times), 1),
        "ms_per_step_mean": round(1000 * statistics.fmean(times), 3) if times else None,
        "ms_per_step_median": median_ms(times),
        "ms_miss_median": median_ms([t for t, h in zip(times, hits) if not h]),
        "ms_hit_median": median_ms([t for t, h in zip(times, hits) if h]),
        "timed_from_batch": skip,
        "train_seconds": round(timer.train_seconds, 3),
        "fit_wall_seconds": round(wall, 3),
        "val_curve": [{"step": s, "train_seconds": round(t, 3), "val_ppl": p} for s, t, p in timer.curve],
        "final_val_ppl": timer.curve[-1][2] if timer.curve else None,
        "best_val_ppl": min(p for _, _, p in timer.curve) if timer.curve else None,
        "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None,
        "cache_entries_end": len(module.cache) if threshold is not None else None,
        "cache_mib_end": round(module.cache.nbytes / 2**20, 2) if threshold is not None else None,
        "max_abs_param_diff_vs_automatic": None if baseline is None else float((params - baseline).abs().max()),
    }
    return result, params


def ppl_at(curve: list[dict], seconds: float) -> float | None:
    """A run's val ppl after `seconds` of training: linear in log ppl between its measured points
    (None before its first validation or after its last)."""
    points = [(c["train_seconds"], c["val_ppl"]) for c in curve]
    for (t0, p0), (t1, p1) in zip(points, points[1:]):
        if t0 <= seconds <= t1:
            w = (seconds - t0) / (t1 - t0) if t1 > t0 else 1.0
            return math.exp((1 - w) * math.log(p0) + w * math.log(p1))
    if points and abs(points[-1][0] - seconds) < 1e-9:
        return points[-1][1]
    return None


def markdown_table(results: list[dict], meta: dict) -> str:
    def fmt(value, spec):
        return "—" if value is None else format(value, spec)

    lines = [
        f"Device: {meta['device']}; {meta['model']}; {meta['budget']}.",
        "",
        "| run | threshold | hit rate | ms/step mean | ms/step median (miss / hit) | train s | final val ppl | "
        "automatic's val ppl at the same train s | best val ppl | max abs param diff vs automatic | peak GPU GiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r['name']} | {fmt(r['threshold'], 'g')} | {r['hit_rate']:.1%} | {fmt(r['ms_per_step_mean'], '.2f')} | "
            f"{fmt(r['ms_miss_median'], '.2f')} / {fmt(r['ms_hit_median'], '.2f')} | {r['train_seconds']:.1f} | "
            f"{fmt(r['final_val_ppl'], '.1f')} | {fmt(r.get('automatic_ppl_at_same_time'), '.1f')} | {fmt(r['best_val_ppl'], '.1f')} | "
            f"{fmt(r['max_abs_param_diff_vs_automatic'], '.2e')} | {fmt(r['peak_gpu_mem_gib'], '.2f')} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in results:
        curve = r["val_curve"]
        if not curve:
            continue
        label = f"{r['name']} (hits {r['hit_rate']:.0%})"
        style = dict(marker="o", markersize=3, linestyle="--" if r["threshold"] is None else "-")
        ax_t.plot([c["train_seconds"] for c in curve], [c["val_ppl"] for c in curve], label=label, **style)
        ax_s.plot([c["step"] for c in curve], [c["val_ppl"] for c in curve], label=label, **style)
    for ax, xlabel in ((ax_t, "training wall-clock (s, validation excluded)"), (ax_s, "training batches")):
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation perplexity (whole split)")
        ax.grid(alpha=0.3, which="both")
    ax_s.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)


def key_similarity(args, dm: WikiTextDataModule) -> dict:
    """How well the keys tell batches apart: for each of the first n training batches (at initialisation,
    no training), the best cosine similarity of its key to the keys of the batches before it."""
    L.seed_everything(args.seed, verbose=False)
    network = partial(ResNetBKLM, d_model=args.d_model, n_layers=args.n_layers, num_experts=args.num_experts,
                      max_seq_len=args.seq_len)
    out = {}
    for key in ("mean_embedding", "token_histogram"):
        module = GradientCachingLanguageModel(network=network, vocab_size=dm.vocab_size, key=key)
        keys = []
        for i, batch in enumerate(dm.train_dataloader()):
            if i == args.key_similarity:
                break
            keys.append(module.batch_key(batch))
        sims = torch.stack(keys) @ torch.stack(keys).T
        best = torch.tensor([sims[i, :i].max().item() for i in range(1, len(keys))])
        q = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])
        out[key] = dict(zip(["min", "q10", "median", "q90", "max"], [round(v, 4) for v in torch.quantile(best, q).tolist()]))
    return out


def figure_title(meta: dict) -> str:
    return f"Gradient caching vs the automatic loop, {meta['device']}\n{meta['model']}; key {meta['key']}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--thresholds", type=float, nargs="+", default=[1.01, 0.9, 0.99, 0.98, 0.995],
                   help="caching runs, in this order (the first above 1: nothing hits)")
    p.add_argument("--steps", type=int, default=1000, help="training batches per run (the budget)")
    p.add_argument("--val_every", type=int, default=100)
    p.add_argument("--limit_val_batches", type=float, default=1.0, help="1.0: the whole validation split")
    p.add_argument("--d_model", type=int, default=128)
    p.add_argument("--n_layers", type=int, default=4)
    p.add_argument("--num_experts", type=int, default=4)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--eval_batch_size", type=int, default=64)
    p.add_argument("--max_train_tokens", type=int, default=None)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup_steps", type=int, default=100)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--key", default="mean_embedding", choices=["mean_embedding", "token_histogram"])
    p.add_argument("--cache_mib", type=float, default=256)
    p.add_argument("--cache_dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--cache_device", default="device", choices=["device", "cpu"])
    p.add_argument("--precision", default=None, help="default: bf16-mixed on CUDA, 32-true on CPU")
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--warmup_batches", type=int, default=20, help="batches left out of the per-step times")
    p.add_argument("--warmup_fit_steps", type=int, default=30,
                   help="an untimed short fit of each loop first (kernel compilation); 0: none")
    p.add_argument("--deadline_s", type=float, default=float("inf"),
                   help="skip a run that would, judging by the baseline's wall time, end after this many seconds")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--figure", default=str(ROOT / "docs" / "step7_gradcache.png"))
    p.add_argument("--tb_dir", default=str(ROOT / "runs" / "step7_gradcache"))
    p.add_argument("--replot", default=None, metavar="JSON", help="only redraw --figure from a results JSON")
    p.add_argument("--key_similarity", type=int, default=0, metavar="N",
                   help="only print the best key similarity to earlier batches over the first N batches (CPU is fine)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot:
        saved = json.loads(Path(args.replot).read_text())
        plot(saved["runs"], Path(args.figure), figure_title(saved["meta"]))
        return 0
    start = time.perf_counter()
    cuda = torch.cuda.is_available() and args.accelerator in ("auto", "gpu", "cuda")
    args.precision = args.precision or ("bf16-mixed" if cuda else "32-true")

    dm = WikiTextDataModule(seq_len=args.seq_len, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size,
                            max_train_tokens=args.max_train_tokens)
    dm.prepare_data()
    dm.setup("fit")
    if args.key_similarity:
        print(json.dumps({"batches": args.key_similarity, "batch": f"{args.batch_size}x{args.seq_len}",
                          "best_cosine_to_earlier_batches": key_similarity(args, dm)}))
        return 0
    device = torch.cuda.get_device_name() if cuda else "CPU"
    meta = {
        "device": device,
        "torch": torch.__version__,
        "lightning": L.__version__,
        "model": f"ResNetBKLM d_model={args.d_model} n_layers={args.n_layers} num_experts={args.num_experts} "
                 f"dropout={args.dropout}, vocab {dm.vocab_size}, {args.precision}",
        "budget": f"{args.steps} batches of {args.batch_size}x{args.seq_len} tokens, AdamW lr {args.lr}, warmup "
                  f"{args.warmup_steps} + cosine, clip norm {args.clip}, seed {args.seed}; val ppl on the whole "
                  f"validation split every {args.val_every} batches",
        "key": args.key,
        "cache": f"{args.cache_mib:g} MiB, {args.cache_dtype}, on {args.cache_device}",
        "command": "python benchmarks/step7_gradcache.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "setup_seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(meta), flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, skipped = [], []
    baseline = None
    if args.warmup_fit_steps > 0:  # compile / autotune kernels and start cuBLAS before anything is timed
        warm = argparse.Namespace(**{**vars(args), "steps": args.warmup_fit_steps, "val_every": args.warmup_fit_steps,
                                     "limit_val_batches": 2, "tb_dir": str(Path(args.tb_dir) / "_warmup")})
        for threshold in (None, args.thresholds[0]):
            run_one("warmup", threshold, warm, dm, None)
        meta["warmup_seconds"] = round(time.perf_counter() - start - meta["setup_seconds"], 1)
    plan = [("automatic", None)] + [(f"cache_{t:g}", t) for t in args.thresholds]
    for name, threshold in plan:
        elapsed = time.perf_counter() - start
        if results and elapsed + 1.15 * results[0]["fit_wall_seconds"] > args.deadline_s:
            skipped.append(name)
            print(f"skipping {name}: {elapsed:.0f} s spent, deadline {args.deadline_s:.0f} s", flush=True)
            continue
        result, params = run_one(name, threshold, args, dm, baseline)
        if baseline is None:
            baseline = params
        else:
            result["automatic_ppl_at_same_time"] = ppl_at(results[0]["val_curve"], result["train_seconds"])
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "val_curve"}), flush=True)
        meta["skipped"] = skipped
        (out / "step7_gradcache.json").write_text(json.dumps({"meta": meta, "runs": results}, indent=2))
        (out / "step7_gradcache.md").write_text(markdown_table(results, meta))
    meta["skipped"] = skipped
    meta["total_seconds"] = round(time.perf_counter() - start, 1)
    (out / "step7_gradcache.json").write_text(json.dumps({"meta": meta, "runs": results}, indent=2))
    (out / "step7_gradcache.md").write_text(markdown_table(results, meta))
    plot(results, Path(args.figure), figure_title(meta))
    print(markdown_table(results, meta), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
