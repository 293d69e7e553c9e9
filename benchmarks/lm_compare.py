"""ResNet-BK vs Transformer on WikiText-2, side by side in one process on one device.

    python benchmarks/lm_compare.py --out benchmarks/results --max-epochs 6

Part 1, the README's results table: each config (configs/resnet_bk.yaml, configs/transformer.yaml:
equal parameter count, same data, schedule and token budget) is trained through the project's own
CLI (`resnet_bk.cli.build`, i.e. exactly `lightning fit --config C --trainer.max_epochs E`), then
`trainer.test` scores the whole test split with the final weights. Recorded: val/ppl after every
epoch (whole validation split, token-weighted), final test/ppl, training tokens/s (wall-clock of
the training batches after the first epoch, CUDA-synchronised; validation excluded) and the whole
fit's wall-clock.

Part 2, the O(N) claim in tokens/s: the same two architectures (d_model 256, 6 layers) trained for
a few AdamW steps on random tokens at N = 1K, 4K, 16K with 32K tokens per step, bf16 autocast,
eager mode (the BK-core dispatches to the Triton kernel on CUDA; attention is PyTorch SDPA, which
picks FlashAttention on Hopper). Recorded: training tokens/s and peak memory.

Writes <out>/lm_compare.json and <out>/lm_compare.md after every record, so a cut-off run keeps
what finished.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402

from resnet_bk.cli import build  # noqa: E402
from resnet_bk.models import ResNetBKLM, TransformerLM, count_parameters  # noqa: E402

CONFIGS = {"resnet_bk": "configs/resnet_bk.yaml", "transformer": "configs/transformer.yaml"}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class TrainThroughput(L.Callback):
    """Training tokens/s over the batches after the first epoch, and val/ppl after every epoch."""

    def __init__(self) -> None:
        self.tokens, self.seconds, self.val_ppl = 0, 0.0, []
        self._t0 = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch >= 1:
            _sync()
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._t0 is not None:
            _sync()
            self.seconds += time.perf_counter() - self._t0
            self.tokens += batch["input_ids"].numel()
            self._t0 = None

    def on_validation_end(self, trainer, pl_module):  # after the module has logged this epoch's val/ppl
        if not trainer.sanity_checking and "val/ppl" in trainer.callback_metrics:
            self.val_ppl.append(round(float(trainer.callback_metrics["val/ppl"]), 2))


def full_run(name: str, args) -> dict:
    cli_args = ["--config", str(ROOT / CONFIGS[name]), "--trainer.max_epochs", str(args.max_epochs),
                "--trainer.default_root_dir", str(args.runs), "--trainer.enable_progress_bar", "false"]
    if args.limit_train_batches:
        cli_args += ["--trainer.limit_train_batches", str(args.limit_train_batches),
                     "--trainer.limit_val_batches", str(args.limit_train_batches),
                     "--trainer.limit_test_batches", str(args.limit_train_batches)]
    if args.cpu:
        cli_args += ["--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--data.init_args.num_workers", "0"]
    cli = build(cli_args)
    meter = TrainThroughput()
    cli.trainer.callbacks.append(meter)
    t0 = time.perf_counter()
    cli.trainer.fit(cli.model, cli.datamodule)
    fit_seconds = time.perf_counter() - t0
    test = cli.trainer.test(cli.model, cli.datamodule, verbose=False)[0]
    return {
        "model": name,
        "config": CONFIGS[name],
        "command": f"lightning fit --config {CONFIGS[name]} --trainer.max_epochs {args.max_epochs}",
        "params": count_parameters(cli.model.model),
        "epochs": args.max_epochs,
        "train_tokens": int(cli.trainer.global_step * cli.datamodule.batch_size * cli.datamodule.seq_len),
        "val_ppl_per_epoch": meter.val_ppl,
        "val_ppl": meter.val_ppl[-1] if meter.val_ppl else None,
        "test_ppl": round(float(test["test/ppl"]), 2),
        "train_tokens_per_s": round(meter.tokens / meter.seconds) if meter.seconds else None,
        "fit_seconds": round(fit_seconds, 1),
    }


def throughput(name: str, seq_len: int, tokens_per_step: int, steps: int, device: torch.device) -> dict:
    """Training tokens/s of a d_model-256, 6-layer model on random tokens at one sequence length."""
    vocab = 33_279
    torch.manual_seed(0)
    if name == "resnet_bk":
        model = ResNetBKLM(vocab, d_model=256, n_layers=6, num_experts=4, top_k=1, max_seq_len=seq_len)
    else:
        model = TransformerLM(vocab, d_model=256, n_layers=6, n_heads=4, d_ff=3584, max_seq_len=seq_len)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = max(1, tokens_per_step // seq_len)
    x = torch.randint(0, vocab, (batch, seq_len + 1), device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step():
        with amp:
            logits = model(x[:, :-1]).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    _sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync()
    seconds = time.perf_counter() - t0
    return {
        "model": name, "seq_len": seq_len, "batch": batch, "steps": steps,
        "train_tokens_per_s": round(batch * seq_len * steps / seconds),
        "ms_per_step": round(1000 * seconds / steps, 2),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
    }


def markdown(result: dict) -> str:
    info = result["info"]
    lines = [f"# ResNet-BK vs Transformer ({info['device']}, torch {info['torch']})", "",
             "## WikiText-2, equal parameters, equal training budget", "",
             "| model | params | epochs | train tokens | val ppl per epoch | val ppl | test ppl | train tokens/s | fit wall-clock (s) |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in result["full"]:
        lines.append(f"| {r['model']} | {r['params']:,} | {r['epochs']} | {r['train_tokens']:,} | "
                     f"{' / '.join(str(p) for p in r['val_ppl_per_epoch'])} | {r['val_ppl']} | {r['test_ppl']} | "
                     f"{r['train_tokens_per_s']:,} | {r['fit_seconds']} |")
    lines += ["", "Commands: " + "; ".join(f"`{r['command']}`" for r in result["full"]), "",
              "## Training tokens/s against sequence length (random tokens, 32K tokens per step, bf16, eager)", "",
              "| model | N | batch | ms/step | train tokens/s | peak memory (GiB) |", "|---|---:|---:|---:|---:|---:|"]
    for r in result["throughput"]:
        lines.append(f"| {r['model']} | {r['seq_len']:,} | {r['batch']} | {r['ms_per_step']} | {r['train_tokens_per_s']:,} | {r['peak_mem_gib']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "lm_compare", help="Lightning runs (logs, checkpoints)")
    parser.add_argument("--max-epochs", type=int, default=6)
    parser.add_argument("--limit-train-batches", type=int, default=0, help="smoke runs only")
    parser.add_argument("--seq-lens", type=int, nargs="*", default=[1024, 4096, 16384])
    parser.add_argument("--tokens-per-step", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--skip-full", action="store_true")
    parser.add_argument("--cpu", action="store_true", help="smoke test on CPU")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    result = {"info": {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
                       "torch": torch.__version__, "argv": sys.argv[1:]}, "full": [], "throughput": []}
    args.out.mkdir(parents=True, exist_ok=True)

    def save():
        (args.out / "lm_compare.json").write_text(json.dumps(result, indent=1))
        (args.out / "lm_compare.md").write_text(markdown(result))

    if not args.skip_full:
        for name in CONFIGS:
            result["full"].append(full_run(name, args))
            print(json.dumps(result["full"][-1]), flush=True)
            save()
    for seq_len in args.seq_lens:
        for name in CONFIGS:
            try:
                record = throughput(name, seq_len, args.tokens_per_step, args.steps, device)
            except torch.OutOfMemoryError:
                record = {"model": name, "seq_len": seq_len, "batch": max(1, args.tokens_per_step // seq_len),
                          "steps": 0, "train_tokens_per_s": 0, "ms_per_step": "OOM", "peak_mem_gib": None}
                torch.cuda.empty_cache()
            result["throughput"].append(record)
            print(json.dumps(record), flush=True)
            save()


if __name__ == "__main__":
    main()
