"""Step 6 measured: ACT, multi-scale (simple, hierarchical) and ACT over multi-scale against the
plain ResNet-BK, at about equal parameter count and exactly equal token budget, in one run on one
device (docs/design.md section 4: wall-clock, executed FLOPs, token-weighted perplexity).

    python benchmarks/step6_act_multiscale.py --device cuda --steps 1000 --out benchmarks/results

For every variant, in the same process and on the same device:
  - train `steps` AdamW steps on random windows of the WikiText-2 training stream (the same
    windows, in the same order, for every variant; bf16 autocast on CUDA), loss = CE +
    0.01 * load_balance + act_lambda * ponder;
  - training tokens/s: wall clock over the steps after the first `--warmup-steps` (synchronised);
  - validation perplexity: token-weighted exp(mean NLL) over the WHOLE validation split (the last
    window padded and its padding not scored), eval mode;
  - inference tokens/s: a second, timed pass over the validation split (forward only, eval mode);
  - executed FLOPs per token: FlopCounterMode over one forward pass of the first validation batch
    in eval mode, with and without the (shared, identical) LM head;
  - layers executed per position (ACT: mean over the validation split of the layers a position
    took) and feed-forward rows per position at each resolution (multi-scale).
Writes <out>/step6_act_multiscale.json and .md (after each variant, so a cut-off run keeps what
finished).
"""

from __future__ import annotations

import argparse
import json
import lzma
import math
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from resnet_bk.models import count_parameters  # noqa: E402
from resnet_bk.models.act_lm import ACTResNetBKLM  # noqa: E402
from resnet_bk.models.act_multiscale_lm import ACTMultiScaleLM  # noqa: E402
from resnet_bk.models.multiscale_lm import MultiScaleLM  # noqa: E402
from resnet_bk.models.resnet_bk_lm import ResNetBKLM  # noqa: E402

IGNORE_INDEX = -100

try:
    from callbacks.flops import flop_breakdown
except ImportError:  # no Lightning on this machine: the same count, without the module around it
    from torch.utils.flop_counter import FlopCounterMode

    def flop_breakdown(model, input_ids, exclude=("lm_head",)):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(input_ids)
        counts, root = counter.get_flop_counts(), type(model).__name__
        left_out = sum(sum(counts.get(f"{root}.{name}", {}).values()) for name in exclude)
        total = counter.get_total_flops()
        return {"total": total / input_ids.numel(), "kept": (total - left_out) / input_ids.numel()}


# ------------------------------------------------------------------------------------ variants
def variants(d_model: int, max_seq_len: int, dropout: float) -> dict:
    """name -> (factory(vocab_size), description). Same width, experts and about equal parameters:
    4 ResNet-BK blocks of 4 experts each (act_multiscale: 8 blocks of half-width experts)."""
    common = dict(d_model=d_model, num_experts=4, top_k=1, max_seq_len=max_seq_len, dropout=dropout)
    return {
        "resnet_bk": (lambda v: ResNetBKLM(v, n_layers=4, **common), "plain ResNet-BK, 4 layers (baseline)"),
        "act": (lambda v: ACTResNetBKLM(v, n_layers=4, halt_bias_init=1.0, **common),
                "ACT over 4 layers, halting bias init 1.0 (configs/act.yaml)"),
        "multiscale": (lambda v: MultiScaleLM(v, n_blocks=2, **common),
                       "2 simple blocks N->N/2->N, BK refine (configs/multiscale.yaml)"),
        "multiscale_hierarchical": (lambda v: MultiScaleLM(v, n_blocks=1, hierarchical=True, **common),
                                    "1 block N->N/2->N/4->N/2->N, BK refine (configs/multiscale_hierarchical.yaml)"),
        "act_multiscale": (lambda v: ACTMultiScaleLM(v, n_blocks=4, d_ff=2 * d_model, halt_bias_init=1.0, **common),
                           "ACT over 4 simple blocks, d_ff 2D (configs/act_multiscale.yaml)"),
        "act_deep_init": (lambda v: ACTResNetBKLM(v, n_layers=4, halt_bias_init=-2.0, **common),
                          "ACT over 4 layers, halting bias init -2.0 (starts running all layers)"),
        "resnet_bk_2layers": (lambda v: ResNetBKLM(v, n_layers=2, **common),
                              "CONTROL, fewer parameters: plain ResNet-BK with 2 layers (what ACT is when every "
                              "position halts at layer 2)"),
    }


# ---------------------------------------------------------------------------------------- data
def load_streams(cache_dir: str | None) -> tuple[dict[str, torch.Tensor], int]:
    """Train/valid token streams of the bundled WikiText-2 and the vocabulary size.

    Through datamodules.wikitext (the training pipeline's tokenizer and caches) when its
    dependencies import; otherwise the same word-level rule inline (whitespace words + <eos> per
    line, vocabulary from the training split), which gives the same perplexities.
    """
    try:
        from datamodules.wikitext import WikiTextDataModule

        dm = WikiTextDataModule(source="bundled", tokenizer="word", cache_dir=cache_dir)
        return {s: dm.stream(s) for s in ("train", "valid")}, dm.vocab_size
    except Exception as err:  # noqa: BLE001 - e.g. no Lightning / HF datasets on the device
        print(f"[data] datamodules unavailable ({type(err).__name__}: {err}); tokenizing inline", flush=True)
    folder = ROOT / "datamodules" / "data" / "wikitext-2"
    lines = {s: lzma.open(folder / f"wiki.{s}.tokens.xz", "rt", encoding="utf-8").read().splitlines() for s in ("train", "valid")}
    counts: Counter[str] = Counter()
    for line in lines["train"]:
        counts.update(line.split())
    counts["<eos>"] += len(lines["train"])
    stoi = {w: i for i, w in enumerate(sorted(counts, key=lambda w: (-counts[w], w)))}
    if "<unk>" not in stoi:
        stoi["<unk>"] = len(stoi)
    unk, eos = stoi["<unk>"], stoi["<eos>"]
    streams = {s: torch.tensor([i for line in ls for i in [*(stoi.get(w, unk) for w in line.split()), eos]])
               for s, ls in lines.items()}
    return streams, len(stoi)


def eval_windows(stream: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All of stream[1:] as targets, once: (W, L) inputs and targets, the last window padded."""
    n_targets = stream.numel() - 1
    w = -(-n_targets // seq_len)
    pad = w * seq_len - n_targets
    inputs = torch.cat([stream[:-1], stream.new_zeros(pad)]).view(w, seq_len)
    targets = torch.cat([stream[1:], stream.new_full((pad,), IGNORE_INDEX)]).view(w, seq_len)
    return inputs, targets


# ------------------------------------------------------------------------------------ training
def make_optimizer(model: nn.Module, lr: float, weight_decay: float, steps: int, warmup: int):
    """AdamW + linear warmup + cosine to 0.1 * lr, no decay on biases, norms, embeddings
    (lightning_modules.LanguageModel's rule)."""
    embeddings = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim < 2 or id(p) in embeddings else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))

    def schedule(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_variant(name, factory, vocab_size, streams, args, device) -> dict:
    torch.manual_seed(0)
    model = factory(vocab_size).to(device)
    params = count_parameters(model)
    opt, sched = make_optimizer(model, args.lr, 0.1, args.steps, args.lr_warmup)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    train = streams["train"]
    gen = torch.Generator().manual_seed(1234)  # the same windows for every variant
    offsets = torch.arange(args.seq_len + 1)

    model.train()
    losses, t_start, steps_done, timed_tokens = [], None, 0, 0
    t_begin = time.perf_counter()
    for step in range(args.steps):
        if step == args.warmup_steps:
            sync(device)
            t_start = time.perf_counter()
        starts = torch.randint(0, train.numel() - args.seq_len - 1, (args.batch_size,), generator=gen)
        chunk = train[starts[:, None] + offsets].to(device, non_blocking=True)
        x, y = chunk[:, :-1], chunk[:, 1:]
        with amp:
            out = model(x)
            ce = F.cross_entropy(out.logits.float().flatten(0, 1), y.flatten())
            loss = ce + sum(args.aux_weights.get(k, 0.0) * v for k, v in out.aux_losses.items())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        steps_done += 1
        if step >= args.warmup_steps:
            timed_tokens += x.numel()
        if step % 100 == 0 or step == args.steps - 1:
            losses.append((step, float(ce.detach())))
            print(f"[{name}] step {step} ce {losses[-1][1]:.3f} ({time.perf_counter() - t_begin:.0f}s)", flush=True)
        if time.perf_counter() - t_begin > args.max_train_seconds:
            print(f"[{name}] STOPPED at step {step + 1}: over --max-train-seconds", flush=True)
            break
    sync(device)
    train_seconds = time.perf_counter() - t_start if t_start is not None else float("nan")

    # ---- evaluation: ppl + stats (pass 1), then timed forward-only pass (pass 2)
    model.eval()
    inputs, targets = eval_windows(streams["valid"], args.seq_len)
    if args.eval_windows:  # smoke runs only: the reported runs score the whole split
        inputs, targets = inputs[: args.eval_windows], targets[: args.eval_windows]
    batches = [(inputs[i : i + args.batch_size], targets[i : i + args.batch_size]) for i in range(0, len(inputs), args.batch_size)]
    nll_sum, n_scored, positions = 0.0, 0, 0
    stat_sums: dict[str, float] = {}
    with torch.no_grad(), amp:
        for xb, yb in batches:
            xb, yb = xb.to(device), yb.to(device)
            out = model(xb)
            nll_sum += float(F.cross_entropy(out.logits.float().flatten(0, 1), yb.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"))
            n_scored += int((yb != IGNORE_INDEX).sum())
            positions += xb.numel()
            for k, v in out.stats.items():
                stat_sums[k] = stat_sums.get(k, 0.0) + float(v) * xb.numel()
        flops = flop_breakdown(model, batches[0][0].to(device), exclude=("lm_head",))
        sync(device)
        t0 = time.perf_counter()
        for xb, _ in batches:
            model(xb.to(device))
        sync(device)
        infer_seconds = time.perf_counter() - t0
    stats = {k: v / positions for k, v in stat_sums.items()}
    result = {
        "name": name,
        "params": params,
        "steps": steps_done,
        "train_tokens": steps_done * args.batch_size * args.seq_len,
        "train_tokens_per_s": timed_tokens / train_seconds,
        "train_seconds_timed": train_seconds,
        "final_train_ce": losses[-1][1],
        "train_ce_curve": losses,
        "val_tokens": n_scored,
        "val_nll": nll_sum / n_scored,
        "val_ppl": math.exp(nll_sum / n_scored),
        "infer_tokens_per_s": positions / infer_seconds,
        "flops_per_token": flops["total"],
        "flops_per_token_body": flops["kept"],
        "layers_executed": stats.get("layers_executed"),
        "stats": {k: v for k, v in stats.items() if not k.startswith("expert_load/")},
    }
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def scale_probe(name, factory, vocab_size, args, device) -> dict:
    """Throughput of the UNTRAINED variant at a larger, more compute-bound size (d_model, seq_len
    and batch from --probe-*): fwd+bwd and forward-only tokens/s on random tokens, and executed
    FLOPs. ACT halts where its initial halting bias puts it (not where training would)."""
    torch.manual_seed(0)
    model = factory(vocab_size).to(device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab_size, (args.probe_batch, args.probe_seq_len), generator=gen).to(device)

    def timed(fn, reps=args.probe_reps, warm=2):
        for _ in range(warm):
            fn()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync(device)
        return (time.perf_counter() - t0) / reps

    def train_step():
        with amp:
            out = model(x)
            loss = out.logits.float().logsumexp(-1).mean() + sum(v for v in out.aux_losses.values())
        loss.backward()
        model.zero_grad(set_to_none=True)

    def infer():
        with torch.no_grad(), amp:
            model(x)

    model.train()
    t_train = timed(train_step)
    model.eval()
    t_infer = timed(infer)
    with amp:
        flops = flop_breakdown(model, x, exclude=("lm_head",))
    with torch.no_grad(), amp:
        stats = model(x).stats
    result = {
        "name": name,
        "params": count_parameters(model),
        "train_tokens_per_s": x.numel() / t_train,
        "infer_tokens_per_s": x.numel() / t_infer,
        "flops_per_token": flops["total"],
        "flops_per_token_body": flops["kept"],
        "layers_executed": float(stats["layers_executed"]) if "layers_executed" in stats else None,
    }
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


# ------------------------------------------------------------------------------------- report
def markdown(report: dict) -> str:
    rows = report["results"]
    base = next((r for r in rows if r["name"] == "resnet_bk"), None)
    lines = [
        "# Step 6: ACT and multi-scale vs the plain ResNet-BK (measured)",
        "",
        f"Device: {report['device']}; torch {report['torch']}; command: `{report['command']}`",
        f"Token budget per variant: {report['args']['steps']} steps x {report['args']['batch_size']} x "
        f"{report['args']['seq_len']} tokens; validation: "
        + ("the whole WikiText-2 validation split" if not report["args"]["eval_windows"]
           else f"ONLY the first {report['args']['eval_windows']} validation windows (smoke run)")
        + f" ({rows[0]['val_tokens'] if rows else '?'} scored tokens), token-weighted.",
        "FLOPs: FlopCounterMode, executed, eval mode, first validation batch; 'body' leaves out the tied LM head "
        "(identical for every variant). Ratios are relative to resnet_bk in this run.",
        "",
        "| variant | params | val ppl | layers executed / token | body MFLOP / token | total MFLOP / token "
        "| train tok/s | infer tok/s | FFN rows / token (res 1, 1/2, 1/4) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        s = r["stats"]
        ffn = ", ".join(f"{s.get(f'ffn_rows/res{k}', float('nan')):.2f}" for k in (1, 2, 4)) if "ffn_rows/res1" in s else "-"
        layers = f"{r['layers_executed']:.2f}" if r["layers_executed"] is not None else "-"

        def rel(key, r=r):
            return f" ({r[key] / base[key]:.2f}x)" if base and base is not r else ""

        lines.append(
            f"| {r['name']} | {r['params'] / 1e6:.3f} M | {r['val_ppl']:.1f}{rel('val_ppl')} | {layers} "
            f"| {r['flops_per_token_body'] / 1e6:.3f}{rel('flops_per_token_body')} | {r['flops_per_token'] / 1e6:.2f}{rel('flops_per_token')} "
            f"| {r['train_tokens_per_s']:,.0f}{rel('train_tokens_per_s')} | {r['infer_tokens_per_s']:,.0f}{rel('infer_tokens_per_s')} | {ffn} |"
        )
    probe = report.get("probe") or []
    pbase = next((r for r in probe if r["name"] == "resnet_bk"), None)
    if probe:
        a = report["args"]
        lines += [
            "",
            f"Throughput probe, UNTRAINED models at d_model {a['probe_d_model']}, seq_len {a['probe_seq_len']}, "
            f"batch {a['probe_batch']} (random tokens; ACT halts where its initial bias puts it):",
            "",
            "| variant | params | layers executed / token | body MFLOP / token | fwd+bwd tok/s | infer tok/s |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in probe:
            def prel(key, r=r):
                return f" ({r[key] / pbase[key]:.2f}x)" if pbase and pbase is not r else ""

            layers = f"{r['layers_executed']:.2f}" if r["layers_executed"] is not None else "-"
            lines.append(
                f"| {r['name']} | {r['params'] / 1e6:.2f} M | {layers} | {r['flops_per_token_body'] / 1e6:.2f}{prel('flops_per_token_body')} "
                f"| {r['train_tokens_per_s']:,.0f}{prel('train_tokens_per_s')} | {r['infer_tokens_per_s']:,.0f}{prel('infer_tokens_per_s')} |"
            )
    lines += ["", "Variants:"] + [f"- {k}: {v}" for k, v in report["descriptions"].items() if any(r["name"] == k for r in rows)]
    short = [r["name"] for r in rows if r["steps"] < report["args"]["steps"]]
    if short:
        lines.append(f"\nWARNING: stopped early by --max-train-seconds (unequal token budget): {', '.join(short)}")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variants", default="resnet_bk,act,multiscale,multiscale_hierarchical,act_multiscale,act_deep_init,resnet_bk_2layers")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-warmup", type=int, default=100)
    p.add_argument("--act-lambda", type=float, default=0.01)
    p.add_argument("--warmup-steps", type=int, default=20, help="steps left out of the training tokens/s")
    p.add_argument("--max-train-seconds", type=float, default=float("inf"), help="safety stop per variant (flagged)")
    p.add_argument("--probe-d-model", type=int, default=512)
    p.add_argument("--probe-seq-len", type=int, default=1024)
    p.add_argument("--probe-batch", type=int, default=16)
    p.add_argument("--probe-reps", type=int, default=5)
    p.add_argument("--no-probe", action="store_true", help="skip the untrained throughput probe")
    p.add_argument("--eval-windows", type=int, default=None, help="smoke runs: score only the first windows")
    p.add_argument("--bk-method", default=None, help="force the BK-core method (scan / triton); default auto")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args()
    args.aux_weights = {"load_balance": 0.01, "ponder": args.act_lambda}

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    streams, vocab_size = load_streams(args.cache_dir)
    table = variants(args.d_model, args.seq_len, args.dropout)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {list(table)}")
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    report = {
        "device": dev_name,
        "torch": torch.__version__,
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix().split("/work/main/")[-1], *sys.argv[1:]]),
        "args": {k: v for k, v in vars(args).items() if k != "aux_weights"} | {"aux_weights": args.aux_weights},
        "vocab_size": vocab_size,
        "descriptions": {k: table[k][1] for k in names},
        "results": [],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from resnet_bk.bk_core import use_method

    def save():
        (out / "step6_act_multiscale.json").write_text(json.dumps(report, indent=2, default=float))
        (out / "step6_act_multiscale.md").write_text(markdown(report))

    with use_method(args.bk_method):
        for name in names:
            result = run_variant(name, table[name][0], vocab_size, streams, args, device)
            report["results"].append(result)
            print(json.dumps({k: v for k, v in result.items() if k not in ("train_ce_curve", "stats")}), flush=True)
            save()
        if not args.no_probe:
            report["probe"] = []
            big = variants(args.probe_d_model, args.probe_seq_len, 0.0)
            for name in names:
                report["probe"].append(scale_probe(name, big[name][0], vocab_size, args, device))
                print(json.dumps(report["probe"][-1]), flush=True)
                save()
    print(markdown(report))


if __name__ == "__main__":
    main()
