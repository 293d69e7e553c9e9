"""Step 6, part 3, measured: conditional MoE, early exit and learned sequence length vs plain ResNet-BK.

    python benchmarks/step6_part3.py --out benchmarks/results            # the device run (CUDA)
    python benchmarks/step6_part3.py --smoke --out /tmp/s6p3             # a CPU check of the script

Every variant is trained from the same seed on the same WikiText-2 batches (equal token budget:
steps x batch x seq_len), at about equal parameter count, one after the other in one process on
one device, and then measured the same way:
  val ppl        token-weighted exp(mean NLL) over the WHOLE validation split (docs/design.md section 4);
  FLOPs/token    counted by torch.utils.flop_counter.FlopCounterMode on the operations actually
                 executed (one validation batch for inference, one training step for training),
                 divided by the tokens in the batch; also without the LM head. FlopCounterMode
                 counts matrix products (and convolutions/attention), not elementwise work, so
                 the BK-core recurrences, activations and gathers are not in these numbers;
  tokens/s       wall-clock, torch.cuda.synchronize() around the timed region, after warm-up:
                 training (forward + backward + AdamW step) over the training run itself, and
                 inference (eval forward) over validation batches.
The baseline every ratio is relative to is the first row, plain ResNet-BK (top-1 MoE).

Variant-specific evaluation:
  early exit: the threshold is calibrated on the last training batches (max_disagreement), then
      val ppl is measured with exits and again forcing all layers (the cost of exiting);
  learned length: val ppl with the deterministic boundaries (p > 0.5) and with sampled ones.

Results go to <out>/step6_part3.json and <out>/step6_part3.md, rewritten after every variant.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import sys
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.wikitext import IGNORE_INDEX, TokenWindows, WikiTextDataModule
from lightning_modules.early_exit import EarlyExitLanguageModel
from lightning_modules.language_model import LanguageModel, warmup_cosine, weight_decay_groups
from resnet_bk import bk_core
from resnet_bk.layers.early_exit import calibrate_threshold
from resnet_bk.models import ResNetBKLM, count_parameters
from resnet_bk.models.adaptive_length_lm import AdaptiveLengthLM
from resnet_bk.models.conditional_moe_lm import ConditionalMoELM
from resnet_bk.models.early_exit_lm import EarlyExitLM


def variants(args) -> dict:
    """name -> (LightningModule class, network factory, module kwargs). Same width, depth, experts."""
    common = dict(d_model=args.d_model, num_experts=args.num_experts, max_seq_len=args.seq_len)
    return {
        "resnet_bk": (LanguageModel, partial(ResNetBKLM, n_layers=args.n_layers, top_k=1, **common), {}),
        "conditional_moe": (
            LanguageModel,
            partial(ConditionalMoELM, n_layers=args.n_layers, top_p=args.top_p, min_experts=1, max_experts=2, **common),
            {"aux_loss_weights": {"load_balance": 0.01, "compute": args.compute_weight}},
        ),
        "early_exit": (
            EarlyExitLanguageModel,
            partial(EarlyExitLM, n_layers=args.n_layers, top_k=1, confidence="max_prob", **common),
            {"exit_loss_weight": args.exit_loss_weight, "max_disagreement": args.max_disagreement},
        ),
        "adaptive_length": (
            LanguageModel,
            partial(
                AdaptiveLengthLM,
                n_pre=1,
                n_inner=args.n_layers - 2,
                n_post=1,
                top_k=1,
                prior_rate=None,
                init_boundary_rate=args.prior_rate,
                length_multiple=8,
                **common,
            ),
            {"aux_loss_weights": {"load_balance": 0.01, "length": args.length_weight}},
        ),
        "adaptive_length_prior": (
            LanguageModel,
            partial(
                AdaptiveLengthLM,
                n_pre=1,
                n_inner=args.n_layers - 2,
                n_post=1,
                top_k=1,
                prior_rate=args.prior_rate,
                init_boundary_rate=args.prior_rate,
                length_multiple=8,
                **common,
            ),
            {"aux_loss_weights": {"load_balance": 0.01, "boundary_prior": args.boundary_prior_weight}},
        ),
    }


# ------------------------------------------------------------------------------------------ data
def load_data(args, device):
    dm = WikiTextDataModule(source="bundled", tokenizer="word", seq_len=args.seq_len, batch_size=args.batch_size)
    train = dm.stream("train")
    n_windows = (train.numel() - 1) // args.seq_len
    idx = torch.arange(n_windows).unsqueeze(1) * args.seq_len + torch.arange(args.seq_len + 1)
    windows = train[idx]  # (W, L + 1)
    val = TokenWindows(dm.stream("valid"), args.seq_len, pad_last=True)
    val_inputs = torch.stack([val[i]["input_ids"] for i in range(len(val))])
    val_targets = torch.stack([val[i]["targets"] for i in range(len(val))])
    if args.smoke:
        val_inputs, val_targets = val_inputs[:8], val_targets[:8]
    return dm.vocab_size, windows.to(device), val_inputs.to(device), val_targets.to(device)


def train_batches(windows: torch.Tensor, steps: int, batch_size: int, seed: int):
    """The same sequence of random batches for every variant."""
    g = torch.Generator().manual_seed(seed)
    order = torch.cat(
        [torch.randperm(len(windows), generator=g) for _ in range(-(-steps * batch_size // len(windows)))]
    )
    for s in range(steps):
        w = windows[order[s * batch_size : (s + 1) * batch_size].to(windows.device)]
        yield {"input_ids": w[:, :-1], "targets": w[:, 1:]}


# ------------------------------------------------------------------------------------ measuring
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def autocast(device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else nullcontext()


def make_optimizer(module: LanguageModel, args):
    opt = torch.optim.AdamW(weight_decay_groups(module, 0.1), lr=args.lr, betas=(0.9, 0.95))
    schedule = partial(warmup_cosine, warmup_steps=args.warmup, total_steps=args.steps, min_lr_ratio=0.1)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


@torch.no_grad()
def evaluate(model, inputs, targets, batch_size, device, amp, **forward_kwargs):
    """Token-weighted NLL over the whole split -> (ppl, mean of each stat over batches)."""
    nll, tokens, stats = 0.0, 0, {}
    for i in range(0, len(inputs), batch_size):
        x, y = inputs[i : i + batch_size], targets[i : i + batch_size]
        with autocast(device, amp):
            out = model(x, **forward_kwargs)
        nll += float(
            F.cross_entropy(out.logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        )
        tokens += int((y != IGNORE_INDEX).sum())
        for k, v in out.stats.items():
            if not k.startswith("expert_load/"):
                stats.setdefault(k, []).append(float(v))
    return math.exp(nll / tokens), {k: sum(v) / len(v) for k, v in stats.items()}


def count_flops(fn) -> tuple[float, float]:
    """(total FLOPs, LM-head FLOPs) of the operations fn() executes."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    head = sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items() if name.endswith("lm_head"))
    return float(counter.get_total_flops()), float(head)


@torch.no_grad()
def inference_tokens_per_s(model, inputs, batch_size, device, amp, n_batches, repeats=5, **forward_kwargs):
    """Median over `repeats` timings of n_batches eval forwards (full validation batches, cycled)."""
    full = [inputs[i : i + batch_size] for i in range(0, len(inputs) - batch_size + 1, batch_size)]
    batches = [full[i % len(full)] for i in range(n_batches)]
    for b in batches[:5]:  # warm-up
        with autocast(device, amp):
            model(b, **forward_kwargs)
    rates = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        for b in batches:
            with autocast(device, amp):
                model(b, **forward_kwargs)
        sync(device)
        rates.append(sum(b.numel() for b in batches) / (time.perf_counter() - start))
    return sorted(rates)[len(rates) // 2]


# ---------------------------------------------------------------------------------------- a run
def run_variant(name, spec, vocab_size, windows, val_x, val_y, args, device) -> dict:
    module_cls, network, kwargs = spec
    torch.manual_seed(args.seed)
    module = module_cls(network, vocab_size, lr=args.lr, warmup_steps=args.warmup, **kwargs).to(device)
    model = module.model
    opt, sched = make_optimizer(module, args)
    n_tok = args.batch_size * args.seq_len
    result = {
        "variant": name,
        "params": count_parameters(module),
        "steps": args.steps,
        "train_tokens": args.steps * n_tok,
    }

    # Training: timed after `warm` steps; the early-exit calibration sees the last calib_steps batches.
    warm = min(20, args.steps // 4)
    train_stats: dict[str, float] = {}
    losses = []
    start = None
    t_start = time.perf_counter()
    for step, batch in enumerate(train_batches(windows, args.steps, args.batch_size, args.seed)):
        if step == warm:
            sync(device)
            start = time.perf_counter()
        if isinstance(module, EarlyExitLanguageModel) and step == args.steps - args.calib_steps:
            module._reset_calibration()
        with autocast(device, args.amp):
            out = module.compute_loss(batch, "train")
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if args.progress and (step + 1) % args.progress == 0:
            print(
                f"  {name} step {step + 1}: ce {float(out.logs['ce']):.3f}, {time.perf_counter() - t_start:.1f}s",
                flush=True,
            )
        if step >= args.steps - 50:
            losses.append(out.logs["ce"])
            for k, v in out.logs.items():
                if k.startswith("stats/") and "expert_load/" not in k:
                    train_stats.setdefault(k[6:], []).append(v)
    sync(device)
    elapsed = time.perf_counter() - start
    result["train_tokens_per_s"] = (args.steps - warm) * n_tok / elapsed
    result["train_seconds"] = elapsed
    result["final_train_ce"] = float(torch.stack(losses).mean())
    result["train_stats"] = {k: float(torch.stack(v).float().mean()) for k, v in train_stats.items()}
    if isinstance(module, EarlyExitLanguageModel):
        calib = (module._calib_disagree.clone(), int(module._calib_positions))
        result["exit_threshold"] = module.calibrate()
        result["predicted_disagreement"] = float(module._predicted.get("exit/predicted_disagreement", float("nan")))

    # Training FLOPs: one more training step's forward + loss + backward (no update), with what the
    # model has learned (experts per token, boundary rate), on the first training batch.
    first = next(train_batches(windows, 1, args.batch_size, args.seed))

    def train_step():
        with autocast(device, args.amp):
            loss = module.compute_loss(first, "train").loss
        loss.backward()

    total, head = count_flops(train_step)
    opt.zero_grad(set_to_none=True)
    result["train_flops_per_token"] = total / n_tok
    result["train_flops_per_token_excl_head"] = (total - head) / n_tok

    module.eval()
    ppl, stats = evaluate(model, val_x, val_y, args.eval_batch_size, device, args.amp)
    result["val_ppl"], result["val_stats"] = ppl, stats
    if isinstance(module, EarlyExitLanguageModel):
        result["val_ppl_all_layers"], _ = evaluate(
            model, val_x, val_y, args.eval_batch_size, device, args.amp, exits=False
        )
        result["val_ppl_exit_cost"] = ppl / result["val_ppl_all_layers"]
    if isinstance(model, AdaptiveLengthLM):
        model.boundary.eval_sampling = True
        torch.manual_seed(args.seed)
        result["val_ppl_sampled_boundaries"], result["val_stats_sampled_boundaries"] = evaluate(
            model, val_x, val_y, args.eval_batch_size, device, args.amp
        )
        model.boundary.eval_sampling = False

    # Inference FLOPs and speed: full windows of the validation split, in eval mode (exits on).
    x = val_x[: args.eval_batch_size]
    with torch.no_grad():
        total, head = count_flops(lambda: model(x))
    result["infer_flops_per_token"] = total / x.numel()
    result["infer_flops_per_token_excl_head"] = (total - head) / x.numel()
    result["infer_tokens_per_s"] = inference_tokens_per_s(
        model, val_x, args.eval_batch_size, device, args.amp, args.infer_batches
    )
    if isinstance(module, EarlyExitLanguageModel):
        with torch.no_grad():
            total, head = count_flops(lambda: model(x, exits=False))
        result["infer_flops_per_token_all_layers"] = total / x.numel()
        result["infer_tokens_per_s_all_layers"] = inference_tokens_per_s(
            model, val_x, args.eval_batch_size, device, args.amp, args.infer_batches, exits=False
        )
        result["exit_sweep"] = exit_sweep(module, calib, x, val_x, val_y, args, device)
    if isinstance(model, AdaptiveLengthLM):
        model.boundary.eval_sampling = True
        with torch.no_grad():
            total, head = count_flops(lambda: model(x))
        result["infer_flops_per_token_sampled_boundaries"] = total / x.numel()
        result["infer_tokens_per_s_sampled_boundaries"] = inference_tokens_per_s(
            model, val_x, args.eval_batch_size, device, args.amp, args.infer_batches
        )
        model.boundary.eval_sampling = False
    return result


def exit_sweep(module, calib, x, val_x, val_y, args, device) -> list[dict]:
    """The trained early-exit model at thresholds calibrated for several disagreement targets."""
    model, rows = module.model, []
    for target in args.sweep_disagreement:
        threshold = calibrate_threshold(calib[0], calib[1], module.thresholds, target)
        model.set_exit_threshold(threshold)
        ppl, stats = evaluate(model, val_x, val_y, args.eval_batch_size, device, args.amp)
        with torch.no_grad():
            total, head = count_flops(lambda: model(x))
        rows.append(
            {
                "max_disagreement": target,
                "threshold": threshold,
                "val_ppl": ppl,
                "exit_layer_mean": stats.get("exit_layer_mean"),
                "ffn_rows_fraction": stats.get("ffn_rows_fraction"),
                "infer_flops_per_token": total / x.numel(),
                "infer_flops_per_token_excl_head": (total - head) / x.numel(),
                "infer_tokens_per_s": inference_tokens_per_s(
                    model, val_x, args.eval_batch_size, device, args.amp, args.infer_batches
                ),
            }
        )
    model.set_exit_threshold(None)
    return rows


# ------------------------------------------------------------------------------------- reporting
def markdown(results: list[dict], meta: dict) -> str:
    base = results[0]
    lines = [
        "# Step 6, part 3: measured",
        "",
        f"Device: {meta['device']}; torch {meta['torch']}; BK-core method: {meta['bk_method']}; "
        f"bf16 autocast: {meta['amp']}. Command: `{meta['command']}`.",
        f"Each variant: {base['steps']} steps x {meta['batch_size']} x {meta['seq_len']} tokens = "
        f"{base['train_tokens']:,} training tokens of WikiText-2 (bundled, word-level, V = {meta['vocab_size']:,}), "
        "same seed and batches; val ppl over the whole validation split, token-weighted.",
        "FLOPs/token: torch.utils.flop_counter.FlopCounterMode on the executed operations (matrix products only; "
        "inference on one validation batch, training on one forward+backward after training; "
        "the BK-core recurrences and other elementwise work are not counted); 'body' excludes the LM head. "
        "Tokens/s: wall-clock, same run, same device (inference: median of 5 timings of 20 batches); "
        "ratios are to the first row.",
        "",
        "| variant | params | val ppl | infer MFLOP/token (body) | train MFLOP/token (body) | train tok/s (x) "
        "| infer tok/s (x) | variant measure |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r['variant']} | {r['params'] / 1e6:.2f}M | {r['val_ppl']:.1f} | "
            f"{r['infer_flops_per_token'] / 1e6:.2f} ({r['infer_flops_per_token_excl_head'] / 1e6:.2f}) | "
            f"{r['train_flops_per_token'] / 1e6:.2f} ({r['train_flops_per_token_excl_head'] / 1e6:.2f}) | "
            f"{r['train_tokens_per_s']:,.0f} ({r['train_tokens_per_s'] / base['train_tokens_per_s']:.2f}x) | "
            f"{r['infer_tokens_per_s']:,.0f} ({r['infer_tokens_per_s'] / base['infer_tokens_per_s']:.2f}x) | "
            f"{variant_measure(r)} |"
        )
    for r in results:
        if "exit_sweep" in r:
            lines += [
                "",
                "Early exit, the same trained model at thresholds calibrated (on its last "
                f"{meta['args']['calib_steps']} training batches) for several targets of disagreement "
                "with the full model's argmax; "
                "'none' = all layers, no per-layer head:",
                "",
                "| max disagreement | threshold | val ppl | mean exit layer | FFN rows | infer MFLOP/token (body) "
                "| infer tok/s (x) |",
                "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
                f"| none | - | {r['val_ppl_all_layers']:.1f} | {meta['args']['n_layers']} | 1.00 | "
                f"{r['infer_flops_per_token_all_layers'] / 1e6:.2f} | {r['infer_tokens_per_s_all_layers']:,.0f} "
                f"({r['infer_tokens_per_s_all_layers'] / base['infer_tokens_per_s']:.2f}x) |",
            ]
            for row in r["exit_sweep"]:
                lines.append(
                    f"| {row['max_disagreement']} | {row['threshold']:.2f} | {row['val_ppl']:.1f} | "
                    f"{row['exit_layer_mean']:.2f} | {row['ffn_rows_fraction']:.2f} | "
                    f"{row['infer_flops_per_token'] / 1e6:.2f} ({row['infer_flops_per_token_excl_head'] / 1e6:.2f}) | "
                    f"{row['infer_tokens_per_s']:,.0f} "
                    f"({row['infer_tokens_per_s'] / base['infer_tokens_per_s']:.2f}x) |"
                )
    return "\n".join(lines) + "\n"


def variant_measure(r: dict) -> str:
    nan = float("nan")
    s, train = r["val_stats"], r["train_stats"]
    if r["variant"] == "conditional_moe":
        return f"experts/token {s.get('experts_per_token', nan):.2f} (train {train.get('experts_per_token', nan):.2f})"
    if r["variant"] == "early_exit":
        return (
            f"threshold {r['exit_threshold']:.2f}; mean exit layer {s.get('exit_layer_mean', float('nan')):.2f}; "
            f"FFN rows {s.get('ffn_rows_fraction', float('nan')):.2f}; ppl all layers {r['val_ppl_all_layers']:.1f} "
            f"(cost x{r['val_ppl_exit_cost']:.3f}); all-layer infer {r['infer_tokens_per_s_all_layers']:,.0f} tok/s, "
            f"{r['infer_flops_per_token_all_layers'] / 1e6:.2f} MFLOP/token"
        )
    if r["variant"].startswith("adaptive_length"):
        t = r["val_stats_sampled_boundaries"]
        return (
            f"compression {s.get('compression_ratio', nan):.2f}x, "
            f"inner length {s.get('inner_length_fraction', nan):.2f} N "
            f"(train {train.get('compression_ratio', nan):.2f}x); sampled boundaries: ppl "
            f"{r['val_ppl_sampled_boundaries']:.1f}, compression {t.get('compression_ratio', nan):.2f}x, "
            f"inner length {t.get('inner_length_fraction', nan):.2f} N, "
            f"{r['infer_flops_per_token_sampled_boundaries'] / 1e6:.2f} MFLOP/token, "
            f"{r['infer_tokens_per_s_sampled_boundaries']:,.0f} tok/s"
        )
    return "top-1 of 4 experts"


def bk_core_method_now() -> str:
    resolve = getattr(bk_core, "_resolve_method", None)
    return (
        resolve("auto", torch.zeros(1, 8, device="cuda" if torch.cuda.is_available() else "cpu")) if resolve else "scan"
    )


def choose_bk_method(requested: str | None, device: torch.device) -> str:
    """The BK-core method "auto" picks here, unless it fails or disagrees with the PyTorch scan on a
    random input (then "scan", so that a kernel in progress cannot spoil the comparison)."""
    if requested:
        return requested
    resolve = getattr(bk_core, "_resolve_method", None)
    method = resolve("auto", torch.zeros(1, 8, device=device)) if resolve else "scan"
    if method == "scan":
        return method
    try:
        torch.manual_seed(0)
        diag = (-2 + 0.5 * torch.randn(4, 1000, device=device)).requires_grad_()
        sub = torch.ones(4, 999, device=device)
        g_fast = bk_core.green_diagonal(diag, sub, sub, 1j, True, method=method)
        g_ref = bk_core.green_diagonal(diag, sub, sub, 1j, True, method="scan")
        (grad_fast,) = torch.autograd.grad(g_fast.abs().sum(), diag)
        (grad_ref,) = torch.autograd.grad(g_ref.abs().sum(), diag)
        ok = torch.allclose(g_fast, g_ref, atol=1e-4, rtol=1e-4) and torch.allclose(
            grad_fast, grad_ref, atol=1e-3, rtol=1e-3
        )
    except Exception as err:
        print(f"BK-core method {method!r} failed ({type(err).__name__}: {err}); using 'scan'", flush=True)
        return "scan"
    if not ok:
        print(f"BK-core method {method!r} disagrees with 'scan'; using 'scan'", flush=True)
    return method if ok else "scan"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--only", nargs="*", help="variants to run (default: all)")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--num-experts", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--top-p", type=float, default=0.5)
    p.add_argument("--compute-weight", type=float, default=0.01)
    p.add_argument("--exit-loss-weight", type=float, default=0.3)
    p.add_argument("--max-disagreement", type=float, default=0.1)
    p.add_argument("--calib-steps", type=int, default=100)
    p.add_argument("--sweep-disagreement", type=float, nargs="*", default=[0.0, 0.01, 0.02, 0.05, 0.1, 0.2])
    p.add_argument("--length-weight", type=float, default=0.01)
    p.add_argument("--prior-rate", type=float, default=0.25, help="binomial prior rate (and initial rate)")
    p.add_argument("--boundary-prior-weight", type=float, default=1.0)
    p.add_argument("--infer-batches", type=int, default=20)
    p.add_argument("--progress", type=int, default=100, help="print the loss every this many steps (0: never)")
    p.add_argument("--no-amp", dest="amp", action="store_false")
    p.add_argument("--bk-method", default=None, help="force the BK-core method (e.g. scan, triton)")
    p.add_argument("--smoke", action="store_true", help="tiny CPU settings to check the script")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.batch_size, args.eval_batch_size, args.seq_len = 12, 4, 4, 32
        args.d_model, args.warmup, args.calib_steps, args.infer_batches = 16, 2, 4, 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True

    bk_method = choose_bk_method(args.bk_method, device)
    stack = contextlib.ExitStack()  # held until main returns: the method applies to every variant
    if hasattr(bk_core, "use_method"):
        stack.enter_context(bk_core.use_method(bk_method))

    vocab_size, windows, val_x, val_y = load_data(args, device)
    meta = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "bk_method": bk_method,
        "amp": args.amp,
        "command": "python " + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if argv is None else str(argv),
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "vocab_size": vocab_size,
        "val_tokens": int((val_y != IGNORE_INDEX).sum()),
        "args": vars(args),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for name, spec in variants(args).items():
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        results.append(run_variant(name, spec, vocab_size, windows, val_x, val_y, args, device))
        print(f"{name}: {time.perf_counter() - t0:.0f}s {json.dumps(results[-1])}", flush=True)
        if bk_core_method_now() != bk_method:
            raise RuntimeError("the BK-core method changed during the run")
        (out / "step6_part3.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
        (out / "step6_part3.md").write_text(markdown(results, meta))
    print(markdown(results, meta))


if __name__ == "__main__":
    main()
