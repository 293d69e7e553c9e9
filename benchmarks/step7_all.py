"""Step 7 side by side (notebooks/03_step7_colab.ipynb): uniform sampling, curriculum, active
learning (benchmarks/step7_data.py) and gradient caching (benchmarks/step7_gradcache.py) on the
same plain ResNet-BK, seed, learning rate, schedule, precision and step budget; val ppl (whole
validation split unless limited) against training tokens and against training wall-clock.

    curves = run(steps=1000, eval_every=100)        # {method: [{step, tokens, train_seconds, val_ppl}]}
    plot(curves, "step7.png")

Wall-clock is training time without validation; the data-selection callbacks' scoring time is
included (it is part of what they cost). Tokens are batches x batch size x seq_len: a gradient
cache hit consumes its batch's tokens without a forward or backward pass. The measured H100
comparisons are docs/step7_data.md and docs/step7_gradcache.md.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run(steps: int, eval_every: int, *, d_model: int = 128, n_layers: int = 4, num_experts: int = 4,
        seq_len: int = 128, batch_size: int = 32, lr: float = 2e-3, warmup_steps: int = 100,
        limit_val_batches: float = 1.0, max_train_tokens: int | None = None, al_every: int = 200,
        al_pool: int = 4096, cache_threshold: float = 0.99, seed: int = 0, device: str | None = None,
        methods=("uniform", "curriculum", "active", "gradient_caching")) -> dict[str, list[dict]]:
    """Train one model per method and return its validation curve."""
    import torch

    from benchmarks import step7_data

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    common = ["--d-model", str(d_model), "--n-layers", str(n_layers), "--num-experts", str(num_experts),
              "--seq-len", str(seq_len), "--batch-size", str(batch_size), "--lr", str(lr),
              "--warmup-steps", str(warmup_steps), "--limit-val-batches", str(limit_val_batches),
              "--al-every", str(al_every), "--al-pool", str(al_pool), "--device", device]
    if max_train_tokens:
        common += ["--max-train-tokens", str(max_train_tokens)]
    data_args = step7_data.parse_args(common)
    if device == "cuda":  # compile kernels and start cuBLAS before anything is timed
        step7_data.run_one("uniform", seed, data_args, max_steps=min(steps, 30), eval_every=min(steps, 30), limit_val=2)
    curves = {}
    for method in methods:
        if method == "gradient_caching":
            curves[method] = _gradient_caching(steps, eval_every, data_args, cache_threshold, seed)
        else:
            result, _, _ = step7_data.run_one(method, seed, data_args, steps, eval_every)
            curves[method] = [{k: r[k] for k in ("step", "tokens", "train_seconds", "val_ppl")} for r in result["records"]]
        last = curves[method][-1]
        print(f"{method}: val ppl {last['val_ppl']:.1f} after {last['step']} steps, {last['train_seconds']:.1f}s", flush=True)
    return curves


def _gradient_caching(steps, eval_every, a, threshold, seed) -> list[dict]:
    """The gradient-caching loop with step7_data's model settings (dropout 0, fp32 like its Trainer)."""
    from benchmarks import step7_gradcache
    from datamodules.wikitext import WikiTextDataModule

    args = step7_gradcache.parse_args([
        "--steps", str(steps), "--val_every", str(eval_every), "--limit_val_batches", str(a.limit_val_batches),
        "--d_model", str(a.d_model), "--n_layers", str(a.n_layers), "--num_experts", str(a.num_experts),
        "--dropout", "0", "--seq_len", str(a.seq_len), "--batch_size", str(a.batch_size), "--lr", str(a.lr),
        "--warmup_steps", str(a.warmup_steps), "--precision", "32-true", "--seed", str(seed),
        "--accelerator", "gpu" if a.device == "cuda" else "cpu", "--tb_dir", tempfile.mkdtemp(prefix="step7_gc_"),
    ])
    dm = WikiTextDataModule(seq_len=a.seq_len, batch_size=a.batch_size, eval_batch_size=64,
                            max_train_tokens=a.max_train_tokens, seed=seed)
    dm.prepare_data()
    dm.setup("fit")
    result, _ = step7_gradcache.run_one(f"cache_{threshold:g}", threshold, args, dm, None)
    tokens_per_step = a.batch_size * a.seq_len
    print(f"gradient_caching: hit rate {result['hit_rate']:.2f}", flush=True)
    return [{"step": c["step"], "tokens": c["step"] * tokens_per_step, "train_seconds": c["train_seconds"],
             "val_ppl": c["val_ppl"]} for c in result["val_curve"]]


def plot(curves: dict[str, list[dict]], path=None, title: str = ""):
    """Val ppl against training tokens and against training wall-clock; saved when path is given."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method, recs in curves.items():
        for ax, key in ((axes[0], "tokens"), (axes[1], "train_seconds")):
            ax.plot([r[key] for r in recs], [r["val_ppl"] for r in recs], marker="o", ms=3, label=method)
    for ax, label in ((axes[0], "training tokens"), (axes[1], "training wall-clock, s (scoring included)")):
        ax.set_xlabel(label)
        ax.set_ylabel("val ppl")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend()
    fig.suptitle(title or "Step 7: uniform vs curriculum vs active learning vs gradient caching")
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=110)
    return fig
