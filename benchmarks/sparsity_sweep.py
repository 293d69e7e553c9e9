"""Perplexity vs sparsity: a sweep of target sparsities for the learned-sparsity ResNet-BK, against
the plain ResNet-BK, in one run on one device, into ONE TensorBoard log dir.

    python -m benchmarks.sparsity_sweep --device cuda --steps 400 --out benchmarks/results --logdir runs/sparsity_sweep
    tensorboard --logdir runs/sparsity_sweep      # SCALARS: val/ppl per run; HPARAMS; IMAGES: summary

Runs (same windows in the same order for every run, bf16 autocast on CUDA, AdamW + warmup +
cosine, loss = CE + 0.01 load_balance + sparsity_weight * sparsity, Gumbel temperature annealed
geometrically tau_start -> tau_end over the run):
  resnet_bk                 plain ResNetBKLM (the baseline)
  sparse_<s>                SparseResNetBKLM, target sparsity s in --targets (0 is the dense
                            architecture with its own random init: a seed-noise reference)
  multiscale_sparse_<s>     MultiScaleSparseLM, s in --multiscale-targets (0: dense multi-scale)
Measured per run: val ppl (token-weighted, the WHOLE validation split, every --val-every steps and
at the end), achieved sparsity in training (fraction of positions the hard masks skipped, mean of
the last 50 steps) and at evaluation (calibrated per-position threshold, over the validation
split), training tokens/s (wall clock after --warmup-steps, synchronised), inference tokens/s (a
timed forward-only pass over the validation split), executed FLOPs/token (FlopCounterMode, eval
mode, first validation batch). A core probe times the resolvent alone: full-length core (Triton on
CUDA) vs the reduced chain at length K, forward + backward, for random masks.

TensorBoard (one sub-directory per run under --logdir): train/ce, train/sparsity, train/tau,
val/ppl, val/sparsity, and the HPARAMS tab (variant, target_sparsity, core; metrics
hparams/final_val_ppl, hparams/achieved_sparsity_{train,eval}, hparams/{train,infer}_tokens_per_s,
hparams/flops_per_token); <logdir>/summary holds the figure (final val ppl and tokens/s against
achieved sparsity). Writes <out>/sparsity_sweep.json and .md after every run (a cut-off run keeps
what finished) and <out>/sparsity_sweep.png. `--replot JSON` redraws the figure (and logs it to
--logdir) from a finished JSON, e.g. where the device lacks matplotlib.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.step6_act_multiscale import (  # noqa: E402
    IGNORE_INDEX,
    eval_windows,
    flop_breakdown,
    load_streams,
    make_optimizer,
    sync,
)
from resnet_bk.layers.sparsity import set_temperature  # noqa: E402
from resnet_bk.models import count_parameters  # noqa: E402
from resnet_bk.models.resnet_bk_lm import ResNetBKLM  # noqa: E402
from resnet_bk.models.sparse_lm import MultiScaleSparseLM, SparseResNetBKLM  # noqa: E402
from resnet_bk.reduced_chain import kept_green_diagonal_full, pack_kept, reduced_green_diagonal  # noqa: E402


def annealed_tau(step: int, tau_start: float, tau_end: float, anneal_steps: int) -> float:
    """callbacks.sparsity_temperature.annealed_tau (inline: the device may lack Lightning)."""
    frac = min(1.0, step / anneal_steps) if anneal_steps > 0 else 1.0
    return tau_start * (tau_end / tau_start) ** frac


def runs(args) -> list[tuple[str, dict, callable, str]]:
    """(name, hparams, factory(vocab), description), in the order they run."""
    common = dict(d_model=args.d_model, num_experts=4, top_k=1, max_seq_len=args.seq_len, dropout=args.dropout)
    out = [("resnet_bk", {"variant": "resnet_bk", "target_sparsity": 0.0, "core": "-"},
            lambda v: ResNetBKLM(v, n_layers=args.n_layers, **common),
            f"plain ResNet-BK, {args.n_layers} layers (BASELINE)")]
    for s in args.targets:
        out.append((f"sparse_{s:g}", {"variant": "sparse_bk", "target_sparsity": s, "core": args.core},
                    lambda v, s=s: SparseResNetBKLM(v, n_layers=args.n_layers, target_sparsity=s, core=args.core, **common),
                    f"SparseResNetBKLM, {args.n_layers} layers, target sparsity {s:g} (configs/sparse_bk.yaml)"))
    for s in args.multiscale_targets:
        out.append((f"multiscale_sparse_{s:g}", {"variant": "multiscale_sparse", "target_sparsity": s, "core": args.core},
                    lambda v, s=s: MultiScaleSparseLM(v, n_blocks=args.n_layers // 2, target_sparsity=s, core=args.core,
                                                      **common),
                    f"MultiScaleSparseLM, {args.n_layers // 2} simple blocks, target {s:g} "
                    "(configs/multiscale_sparse.yaml; target 0 = dense multi-scale)"))
    return out


def validate(model, batches, device, amp) -> dict:
    nll, scored, positions, sparsity = 0.0, 0, 0, 0.0
    with torch.no_grad(), amp:
        for xb, yb in batches:
            xb, yb = xb.to(device), yb.to(device)
            out = model(xb)
            nll += float(F.cross_entropy(out.logits.float().flatten(0, 1), yb.flatten(), ignore_index=IGNORE_INDEX,
                                         reduction="sum"))
            scored += int((yb != IGNORE_INDEX).sum())
            positions += xb.numel()
            sparsity += float(out.stats.get("sparsity", 0.0)) * xb.numel()
    return {"val_ppl": math.exp(nll / scored), "val_nll": nll / scored, "val_tokens": scored,
            "eval_sparsity": sparsity / positions}


def run_one(name, hp, factory, vocab_size, streams, args, device, writer_cls) -> dict:
    torch.manual_seed(0)
    model = factory(vocab_size).to(device)
    opt, sched = make_optimizer(model, args.lr, 0.1, args.steps, args.lr_warmup)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    inputs, targets = eval_windows(streams["valid"], args.seq_len)
    if args.eval_windows:  # smoke runs only
        inputs, targets = inputs[: args.eval_windows], targets[: args.eval_windows]
    batches = [(inputs[i : i + args.batch_size], targets[i : i + args.batch_size])
               for i in range(0, len(inputs), args.batch_size)]
    writer = writer_cls(str(Path(args.logdir) / name)) if writer_cls else None
    train = streams["train"]
    gen = torch.Generator().manual_seed(1234)  # the same windows for every run
    offsets = torch.arange(args.seq_len + 1)
    curve, train_sparsity, t_start, timed_tokens = [], [], None, 0
    t_begin = time.perf_counter()
    for step in range(args.steps):
        model.train()
        if step == args.warmup_steps:
            sync(device)
            t_start = time.perf_counter()
        tau = annealed_tau(step, args.tau_start, args.tau_end, args.steps)
        set_temperature(model, tau)
        starts = torch.randint(0, train.numel() - args.seq_len - 1, (args.batch_size,), generator=gen)
        chunk = train[starts[:, None] + offsets].to(device, non_blocking=True)
        x, y = chunk[:, :-1], chunk[:, 1:]
        with amp:
            out = model(x)
            ce = F.cross_entropy(out.logits.float().flatten(0, 1), y.flatten())
            weights = {"load_balance": 0.01, "sparsity": args.sparsity_weight}
            loss = ce + sum(weights[k] * v for k, v in out.aux_losses.items())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step >= args.warmup_steps:
            timed_tokens += x.numel()
        s_now = out.stats.get("sparsity")
        if s_now is not None:
            train_sparsity.append(s_now.detach() if isinstance(s_now, torch.Tensor) else torch.tensor(s_now))
        if writer and (step % 10 == 0 or step == args.steps - 1):
            writer.add_scalar("train/ce", float(ce.detach()), step)
            writer.add_scalar("train/tau", tau, step)
            if s_now is not None:
                writer.add_scalar("train/sparsity", float(s_now), step)
        if (step + 1) % args.val_every == 0 and step + 1 < args.steps:
            sync(device)
            t_pause = time.perf_counter()
            model.eval()
            v = validate(model, batches, device, amp)
            curve.append((step + 1, v["val_ppl"], v["eval_sparsity"]))
            if writer:
                writer.add_scalar("val/ppl", v["val_ppl"], step + 1)
                writer.add_scalar("val/sparsity", v["eval_sparsity"], step + 1)
            print(f"[{name}] step {step + 1} ce {float(ce.detach()):.3f} val ppl {v['val_ppl']:.1f} eval sparsity "
                  f"{v['eval_sparsity']:.3f} ({time.perf_counter() - t_begin:.0f}s)", flush=True)
            sync(device)
            if t_start is not None:  # validation is not training time
                t_start += time.perf_counter() - t_pause
    sync(device)
    train_seconds = time.perf_counter() - t_start if t_start is not None else float("nan")
    model.eval()
    final = validate(model, batches, device, amp)
    curve.append((args.steps, final["val_ppl"], final["eval_sparsity"]))
    with amp:
        flops = flop_breakdown(model, batches[0][0].to(device), exclude=("lm_head",))
    with torch.no_grad(), amp:
        for xb, _ in batches[:2]:  # warm
            model(xb.to(device))
        sync(device)
        t0 = time.perf_counter()
        for xb, _ in batches:
            model(xb.to(device))
        sync(device)
        infer_seconds = time.perf_counter() - t0
    last = train_sparsity[-50:]
    result = {
        "name": name, **hp, "params": count_parameters(model), "steps": args.steps,
        "train_tokens": args.steps * args.batch_size * args.seq_len,
        "achieved_sparsity_train": float(torch.stack(last).float().mean()) if last else 0.0,
        "achieved_sparsity_eval": final["eval_sparsity"],
        "val_ppl": final["val_ppl"], "val_nll": final["val_nll"], "val_tokens": final["val_tokens"],
        "train_tokens_per_s": timed_tokens / train_seconds,
        "infer_tokens_per_s": sum(xb.numel() for xb, _ in batches) / infer_seconds,
        "flops_per_token": flops["total"], "flops_per_token_body": flops["kept"],
        "val_curve": curve,
    }
    if writer:
        writer.add_scalar("val/ppl", final["val_ppl"], args.steps)
        writer.add_scalar("val/sparsity", final["eval_sparsity"], args.steps)
        log_hparams(writer, hp | {"steps": args.steps, "d_model": args.d_model}, result)
        writer.close()
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


HPARAM_METRICS = {
    "hparams/final_val_ppl": "val_ppl", "hparams/achieved_sparsity_train": "achieved_sparsity_train",
    "hparams/achieved_sparsity_eval": "achieved_sparsity_eval", "hparams/train_tokens_per_s": "train_tokens_per_s",
    "hparams/infer_tokens_per_s": "infer_tokens_per_s", "hparams/flops_per_token": "flops_per_token",
}


def log_hparams(writer, hparams: dict, result: dict) -> None:
    """The HPARAMS tab entry of this run, in the run's own event file (metrics as scalars)."""
    from torch.utils.tensorboard.summary import hparams as hparams_summary

    metrics = {tag: result[key] for tag, key in HPARAM_METRICS.items()}
    for summary in hparams_summary(hparams, metrics):
        writer.file_writer.add_summary(summary)
    for tag, value in metrics.items():
        writer.add_scalar(tag, value, result["steps"])


def core_probe(args, device) -> list[dict]:
    """Resolvent alone, fwd+bwd, random masks: full-length core vs the reduced chain at length K."""
    rows = []
    for n in args.probe_lengths:
        for s in (0.0, 0.5, 0.9):
            g = torch.Generator().manual_seed(0)
            keep = (torch.rand(args.probe_batch, n, generator=g) >= s).to(device)
            keep[:, 0] = True
            pos, valid, runs_ = pack_kept(keep)
            v = torch.randn(valid.shape, device=device, requires_grad=True)
            v_skip = torch.zeros((), device=device, requires_grad=True)
            fns = {"full": lambda: kept_green_diagonal_full(v, pos, valid, n, v_skip),
                   "reduced": lambda: reduced_green_diagonal(v, runs_, v_skip)}
            row = {"n": n, "sparsity": s, "k": valid.shape[1]}
            for name, fn in fns.items():
                def step():
                    torch.view_as_real(fn()).square().sum().backward()
                for _ in range(3):
                    step()
                sync(device)
                t0 = time.perf_counter()
                for _ in range(args.probe_reps):
                    step()
                sync(device)
                row[f"{name}_ms"] = (time.perf_counter() - t0) / args.probe_reps * 1e3
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


# ------------------------------------------------------------------------------------- report
def markdown(report: dict) -> str:
    a, rows = report["args"], report["results"]
    base = next((r for r in rows if r["name"] == "resnet_bk"), None)

    def rel(r, key):
        return f" ({r[key] / base[key]:.2f}x)" if base and r is not base else ""

    lines = [
        "# Perplexity vs learned sparsity (measured)", "",
        f"Device: {report['device']}; torch {report['torch']}; command: `{report['command']}`",
        f"Per run: {a['steps']} steps x {a['batch_size']} x {a['seq_len']} tokens (the same windows for every run), "
        f"d_model {a['d_model']}, {a['n_layers']} layers, 4 experts, core `{a['core']}`, sparsity weight "
        f"{a['sparsity_weight']}, tau {a['tau_start']} -> {a['tau_end']}. Validation: "
        + ("the whole WikiText-2 validation split" if not a["eval_windows"] else f"ONLY {a['eval_windows']} windows (smoke)")
        + f" ({rows[0]['val_tokens'] if rows else '?'} scored tokens), token-weighted. Baseline: `resnet_bk` "
        "(plain ResNet-BK, same budget, same run); ratios are to it.", "",
        "| run | target | achieved sparsity train / eval | val ppl | train tok/s | infer tok/s | MFLOP/token body (total) | params |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['target_sparsity']:g} | {r['achieved_sparsity_train']:.3f} / {r['achieved_sparsity_eval']:.3f} "
            f"| {r['val_ppl']:.1f}{rel(r, 'val_ppl')} | {r['train_tokens_per_s']:,.0f}{rel(r, 'train_tokens_per_s')} "
            f"| {r['infer_tokens_per_s']:,.0f}{rel(r, 'infer_tokens_per_s')} "
            f"| {r['flops_per_token_body'] / 1e6:.3f}{rel(r, 'flops_per_token_body')} ({r['flops_per_token'] / 1e6:.2f}) "
            f"| {r['params'] / 1e6:.2f} M |")
    probe = report.get("probe") or []
    if probe:
        lines += ["", f"Core probe (resolvent only, forward + backward, batch {a['probe_batch']}, random masks; "
                  "full = length-N core (Triton on CUDA) with scatter/gather, reduced = Schur-complement chain at length K "
                  "(PyTorch scan)):", "",
                  "| N | sparsity | K (max kept) | full ms | reduced ms |", "| ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {p['n']} | {p['sparsity']:g} | {p['k']} | {p['full_ms']:.2f} | {p['reduced_ms']:.2f} |" for p in probe]
    lines += ["", "Runs:"] + [f"- {k}: {v}" for k, v in report["descriptions"].items()]
    return "\n".join(lines) + "\n"


def figure(report: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    base = next((r for r in rows if r["name"] == "resnet_bk"), None)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for variant, marker, label in (("sparse_bk", "o", "sparse ResNet-BK"), ("multiscale_sparse", "s", "multi-scale + sparse")):
        rs = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["achieved_sparsity_eval"])
        if not rs:
            continue
        xs = [r["achieved_sparsity_eval"] for r in rs]
        ax1.plot(xs, [r["val_ppl"] for r in rs], marker=marker, label=label)
        for r in rs:
            ax1.annotate(f"{r['target_sparsity']:g}", (r["achieved_sparsity_eval"], r["val_ppl"]), fontsize=7,
                         xytext=(3, 3), textcoords="offset points")
        ax2.plot(xs, [r["train_tokens_per_s"] / 1e3 for r in rs], marker=marker, label=f"{label}: train")
        ax2.plot(xs, [r["infer_tokens_per_s"] / 1e3 for r in rs], marker=marker, linestyle="--", label=f"{label}: inference")
    if base:
        ax1.axhline(base["val_ppl"], color="k", linestyle=":", label="plain ResNet-BK (baseline)")
        ax2.axhline(base["train_tokens_per_s"] / 1e3, color="k", linestyle=":", label="baseline: train")
        ax2.axhline(base["infer_tokens_per_s"] / 1e3, color="gray", linestyle="-.", label="baseline: inference")
    ax1.set_xlabel("achieved sparsity at evaluation (fraction of positions skipped)")
    ax1.set_ylabel("final val perplexity (whole split)")
    ax1.set_title("perplexity vs sparsity (labels: target)")
    ax2.set_xlabel("achieved sparsity at evaluation")
    ax2.set_ylabel("k tokens / s (wall clock)")
    ax2.set_title("measured speed vs sparsity")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{report['device']}: {report['args']['steps']} steps x {report['args']['batch_size']}x"
                 f"{report['args']['seq_len']} tokens per run, d_model {report['args']['d_model']}", fontsize=9)
    fig.tight_layout()
    return fig


def write_figure(report: dict, out: Path, logdir: Path | None) -> None:
    try:
        fig = figure(report)
    except ImportError as err:
        print(f"[figure] skipped ({err}); redraw with --replot", flush=True)
        return
    fig.savefig(out / "sparsity_sweep.png", dpi=130)
    if logdir is not None:
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(logdir / "summary"))
            writer.add_figure("summary/ppl_and_speed_vs_sparsity", fig, global_step=report["args"]["steps"])
            writer.add_text("summary/table", markdown(report))
            writer.close()
        except ImportError:
            pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--targets", default="0,0.25,0.5,0.75,0.9")
    p.add_argument("--multiscale-targets", default="0,0.5")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--core", default="reduced", choices=["reduced", "full"])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-warmup", type=int, default=50)
    p.add_argument("--sparsity-weight", type=float, default=10.0)
    p.add_argument("--tau-start", type=float, default=1.0)
    p.add_argument("--tau-end", type=float, default=0.2)
    p.add_argument("--val-every", type=int, default=100)
    p.add_argument("--warmup-steps", type=int, default=20, help="steps left out of the training tokens/s")
    p.add_argument("--eval-windows", type=int, default=None, help="smoke runs: score only the first windows")
    p.add_argument("--probe-lengths", default="256,1024,4096")
    p.add_argument("--probe-batch", type=int, default=32)
    p.add_argument("--probe-reps", type=int, default=10)
    p.add_argument("--no-probe", action="store_true")
    p.add_argument("--max-seconds", type=float, default=float("inf"), help="start no new run after this (flagged)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--logdir", default=str(ROOT / "runs" / "sparsity_sweep"))
    p.add_argument("--replot", default=None, help="redraw figure + TensorBoard summary from this JSON and exit")
    args = p.parse_args()
    out, logdir = Path(args.out), Path(args.logdir)
    out.mkdir(parents=True, exist_ok=True)
    if args.replot:
        write_figure(json.loads(Path(args.replot).read_text()), out, logdir)
        return
    args.targets = [float(s) for s in args.targets.split(",") if s.strip()]
    args.multiscale_targets = [float(s) for s in args.multiscale_targets.split(",") if s.strip()]
    args.probe_lengths = [int(n) for n in args.probe_lengths.split(",") if n.strip()]
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        from torch.utils.tensorboard import SummaryWriter as writer_cls
    except ImportError:
        writer_cls = None
        print("[tensorboard] not installed: no event files", flush=True)
    streams, vocab_size = load_streams(args.cache_dir)
    plan = runs(args)
    if args.no_baseline:
        plan = plan[1:]
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix().split("/work/main/")[-1], *sys.argv[1:]]),
        "args": vars(args) | {"logdir": str(logdir)}, "vocab_size": vocab_size,
        "descriptions": {name: desc for name, _, _, desc in plan}, "results": [], "skipped": [],
    }

    def save():
        (out / "sparsity_sweep.json").write_text(json.dumps(report, indent=1, default=float))
        (out / "sparsity_sweep.md").write_text(markdown(report))

    t0 = time.perf_counter()
    if not args.no_probe:
        report["probe"] = core_probe(args, device)
        save()
    for name, hp, factory, _ in plan:
        if time.perf_counter() - t0 > args.max_seconds:
            report["skipped"].append(name)
            print(f"[{name}] SKIPPED: over --max-seconds", flush=True)
            continue
        result = run_one(name, hp, factory, vocab_size, streams, args, device, writer_cls)
        report["results"].append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "val_curve"}), flush=True)
        save()
        print(f"[sweep] elapsed {time.perf_counter() - t0:.0f}s", flush=True)
    save()
    write_figure(report, out, logdir)
    print(markdown(report))


if __name__ == "__main__":
    main()
