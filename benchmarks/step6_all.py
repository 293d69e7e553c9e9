"""Task 7.11: every Step-6 variant, the best combination that exists, and a Transformer of equal
size, trained and measured under the same budget in ONE run on ONE device.

    python benchmarks/step6_all.py --out /path/out                    # the device run (CUDA)
    python benchmarks/step6_all.py --report benchmarks/results/step6_all.json --readme
                                                                      # table, figure, README section
    python benchmarks/step6_all.py --smoke --out /tmp/s6all           # CPU check (tiny, ~1 min)

Each variant is one entry of VARIANTS: a config in configs/ (its LightningModule, network and their
hyper-parameters), the Step-6 techniques it uses, and overrides. Variants whose config is not in
this checkout (e.g. learned sparsity before it lands) are listed as missing, never guessed.
Every variant trains from the same seed on the same WikiText-2 batches (same steps x batch x
seq_len tokens, AdamW, warmup + cosine) and is measured by benchmarks/step6_part3.run_variant:
  val ppl       token-weighted exp(mean NLL) over the WHOLE validation split (docs/design.md section 4);
  FLOPs/token   torch.utils.flop_counter.FlopCounterMode on the operations executed (matrix
                products, convolutions, attention; not the BK-core recurrences nor elementwise work);
  tokens/s      wall-clock, synchronised, after warm-up: training over the run itself (forward,
                backward, AdamW), inference as the median of 5 timings of eval forwards.
Ratios are to the plain ResNet-BK of the same run (the baseline) and to the Transformer.

"Cumulative" here is what a COMBINED model measures against the baseline: there is no model with
every technique at once, so the headline is the combination with the most techniques (ties: the
highest measured training tokens/s). The product of the single-technique factors is shown beside
it, labelled: it is what multiplying factors predicts (the seeds' method), not a measurement. The
seeds' figures (SEED_PROJECTIONS) are projections and are shown only as such.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import re
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
README_BEGIN, README_END = "<!-- step6_all:begin -->", "<!-- step6_all:end -->"
BASELINE, TRANSFORMER = "resnet_bk", "transformer"
EQUAL_PARAMS = "equal_params"  # a d_ff override: chosen so the network has the baseline's parameter count

# The seeds' projected speedups (never results): shown beside what the combinations measure.
SEED_PROJECTIONS = {
    ("act", "multiscale"): (2.8, "seed 000: ACT 1.4x times multi-scale 2x"),
    ("act", "multiscale", "sparsity"): (5.0, "seed 003: 1.4 x 2 x 1.8"),
    "all": (10.0, "seeds 003/004: the 'cumulative 10x' target for all of Step 6"),
}


@dataclass(frozen=True)
class Variant:
    config: str  # file in configs/: LightningModule, network, their hyper-parameters
    techniques: tuple[str, ...]  # Step-6 techniques it uses; () for the two baselines
    description: str
    network: dict = field(default_factory=dict)  # overrides of the network's init_args


VARIANTS: dict[str, Variant] = {
    BASELINE: Variant("resnet_bk.yaml", (), "plain ResNet-BK, 4 layers, top-1 of 4 experts (the baseline)",
                      {"d_model": 128, "n_layers": 4, "dropout": 0.1}),
    TRANSFORMER: Variant("transformer.yaml", (), "Transformer, 4 layers, 4 heads, d_ff for the baseline's parameter count",
                         {"d_model": 128, "n_layers": 4, "n_heads": 4, "d_ff": EQUAL_PARAMS}),
    "act": Variant("act.yaml", ("act",), "ACT over 4 layers (halting bias init 1.0)"),
    "multiscale": Variant("multiscale.yaml", ("multiscale",), "2 simple multi-scale blocks N -> N/2 -> N"),
    "act_multiscale": Variant("act_multiscale.yaml", ("act", "multiscale"), "ACT over 4 multi-scale blocks, d_ff 2D"),
    "sparse": Variant("sparse_bk.yaml", ("sparsity",), "learned sparsity in the BK-core"),
    "multiscale_sparse": Variant("multiscale_sparse.yaml", ("multiscale", "sparsity"), "multi-scale with learned sparsity"),
    "adaptive_length": Variant("adaptive_length.yaml", ("adaptive_length",), "learned sequence length, binomial prior 0.25"),
    "early_exit": Variant("early_exit.yaml", ("early_exit",), "early exit, threshold calibrated for <= 10% disagreement"),
    "conditional_moe": Variant("conditional_moe.yaml", ("conditional_moe",), "conditional MoE, top-p 0.5, 1..2 experts"),
}


# ------------------------------------------------------------------------------------ building
def _load(class_path: str):
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def config_path(variant: Variant) -> Path:
    return ROOT / "configs" / variant.config


def available(names=None) -> tuple[list[str], list[str]]:
    """(variants whose config exists in this checkout, missing ones), in VARIANTS order."""
    names = list(VARIANTS) if names is None else names
    present = [n for n in names if config_path(VARIANTS[n]).exists()]
    return present, [n for n in names if n not in present]


def spec(name: str, args, vocab_size: int, baseline_params: int | None = None):
    """(LightningModule class, network factory, module kwargs) of a variant, as
    step6_part3.run_variant takes them, from its config plus overrides."""
    import yaml

    variant = VARIANTS[name]
    model = yaml.safe_load(config_path(variant).read_text())["model"]
    module_cls = _load(model.get("class_path", "lightning_modules.LanguageModel"))
    init = dict(model.get("init_args", {}))
    network = init.pop("network")
    net_cls, net_args = _load(network["class_path"]), {**network.get("init_args", {}), **variant.network}
    if args.d_model and "d_model" in net_args:  # smaller runs: scale the width, keep the shape
        scale = args.d_model / net_args["d_model"]
        net_args["d_model"] = args.d_model
        if isinstance(net_args.get("d_ff"), int):
            net_args["d_ff"] = max(1, round(net_args["d_ff"] * scale))
    if "max_seq_len" in net_args:
        net_args["max_seq_len"] = args.seq_len
    if net_args.get("d_ff") == EQUAL_PARAMS:
        net_args["d_ff"] = equal_param_d_ff(net_cls, net_args, vocab_size, baseline_params)
    for key in ("lr", "warmup_steps", "vocab_size"):  # one schedule for all: run_variant sets these
        init.pop(key, None)
    return module_cls, partial(net_cls, **net_args), init


def equal_param_d_ff(net_cls, net_args: dict, vocab_size: int, target: int | None) -> int:
    """The d_ff that gives net_cls the target parameter count (it is linear in d_ff)."""
    from resnet_bk.models import count_parameters

    if target is None:
        raise ValueError("equal_params needs the baseline's parameter count: run the baseline first")
    p1, p2 = (count_parameters(net_cls(vocab_size, **{**net_args, "d_ff": d})) for d in (1, 2))
    return max(1, round(1 + (target - p1) / (p2 - p1)))


# ------------------------------------------------------------------------------------- running
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--only", nargs="*", help="variants to run, in VARIANTS order (default: all present)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--d-model", type=int, default=None, help="default: each config's width (128)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--calib-steps", type=int, default=100, help="early exit: calibration batches")
    p.add_argument("--sweep-disagreement", type=float, nargs="*", default=[], help="early exit: extra thresholds")
    p.add_argument("--infer-batches", type=int, default=20)
    p.add_argument("--progress", type=int, default=200, help="print the loss every this many steps (0: never)")
    p.add_argument("--no-amp", dest="amp", action="store_false")
    p.add_argument("--bk-method", default=None, help="force the BK-core method (scan, triton)")
    p.add_argument("--deadline-s", type=float, default=float("inf"),
                   help="skip (and list) the variants that would end after this many seconds")
    p.add_argument("--smoke", action="store_true", help="tiny CPU settings: checks the code, measures nothing")
    p.add_argument("--report", default=None, metavar="JSON", help="only write table/figure from a results JSON")
    p.add_argument("--readme", action="store_true", help="also regenerate the README section")
    p.add_argument("--figure", default=None, help="PNG (default: <out>/step6_all.png)")
    if "--smoke" in (sys.argv[1:] if argv is None else argv):  # smoke defaults; explicit flags still win
        p.set_defaults(steps=8, batch_size=4, eval_batch_size=4, seq_len=32, d_model=16, warmup=2, calib_steps=2,
                       infer_batches=1, progress=0)
    return p.parse_args(argv)


def run(args) -> dict:
    """Train and measure every present variant; rewrites <out>/step6_all.{json,md} after each."""
    import platform

    import torch

    from benchmarks.step6_part3 import bk_core_method_now, choose_bk_method, load_data, run_variant
    from resnet_bk import bk_core

    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    args.amp = args.amp and device.type == "cuda"  # bf16 autocast on a CPU is slow and measures nothing
    names, missing = available(args.only)
    if BASELINE not in names:
        raise SystemExit(f"the baseline {BASELINE!r} must be among the variants")
    names.remove(BASELINE)
    names.insert(0, BASELINE)  # first: the Transformer's size and every ratio depend on it
    bk_method = choose_bk_method(args.bk_method, device)
    vocab_size, windows, val_x, val_y = load_data(args, device)
    report = {
        "meta": {
            "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__,
            "bk_method": bk_method,
            "amp": args.amp,
            "command": "python benchmarks/step6_all.py " + " ".join(sys.argv[1:] if __name__ == "__main__" else []),
            "vocab_size": vocab_size,
            "val_tokens": int((val_y != -100).sum()),
            "smoke": args.smoke,
            "args": {k: v for k, v in vars(args).items() if k not in ("report", "readme")},
        },
        "variants": {n: {"config": f"configs/{VARIANTS[n].config}", "techniques": list(VARIANTS[n].techniques),
                         "description": VARIANTS[n].description} for n in names},
        "missing": missing,
        "skipped": [],
        "results": [],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    longest = 0.0
    with bk_core.use_method(bk_method) if hasattr(bk_core, "use_method") else contextlib.nullcontext():
        for name in names:
            elapsed = time.perf_counter() - start
            if elapsed + 1.2 * longest > args.deadline_s:
                report["skipped"].append(name)
                print(f"skipping {name}: {elapsed:.0f}s spent, deadline {args.deadline_s:.0f}s", flush=True)
                continue
            t0 = time.perf_counter()
            base = report["results"][0]["params"] if report["results"] else None
            result = run_variant(name, spec(name, args, vocab_size, base), vocab_size, windows, val_x, val_y, args, device)
            result["techniques"] = list(VARIANTS[name].techniques)
            result["seconds"] = time.perf_counter() - t0
            longest = max(longest, result["seconds"])
            report["results"].append(result)
            print(f"{name}: {result['seconds']:.0f}s, val ppl {result['val_ppl']:.1f}, train "
                  f"{result['train_tokens_per_s']:,.0f} tok/s, infer {result['infer_tokens_per_s']:,.0f} tok/s", flush=True)
            if bk_core_method_now() != bk_method and hasattr(bk_core, "use_method"):
                raise RuntimeError("the BK-core method changed during the run")
            report["meta"]["seconds"] = time.perf_counter() - start
            write(report, out)
    return report


def write(report: dict, out: Path) -> None:
    (out / "step6_all.json").write_text(json.dumps(report, indent=1, default=float))
    (out / "step6_all.md").write_text(markdown(report))


# ----------------------------------------------------------------------------------- analysis
def _by_name(report: dict) -> dict:
    return {r["variant"]: r for r in report["results"]}


def cumulative(report: dict) -> dict | None:
    """The measured factors of every combination (>= 2 techniques) against the baseline, the
    product of its single-technique factors (NOT a measurement) and the headline combination."""
    rows, base = _by_name(report), _by_name(report).get(BASELINE)
    if base is None:
        return None
    singles = {tuple(r["techniques"]): r for r in rows.values() if len(r["techniques"]) == 1}
    combos = []
    for r in rows.values():
        if len(r["techniques"]) < 2:
            continue
        parts = [singles.get((t,)) for t in r["techniques"]]
        product = (math.prod(p["train_tokens_per_s"] / base["train_tokens_per_s"] for p in parts)
                   if all(parts) else None)
        projection = SEED_PROJECTIONS.get(tuple(sorted(r["techniques"])))
        combos.append({
            "variant": r["variant"],
            "techniques": r["techniques"],
            "train_speedup": r["train_tokens_per_s"] / base["train_tokens_per_s"],
            "infer_speedup": r["infer_tokens_per_s"] / base["infer_tokens_per_s"],
            "infer_flops_ratio": r["infer_flops_per_token_excl_head"] / base["infer_flops_per_token_excl_head"],
            "val_ppl": r["val_ppl"],
            "val_ppl_ratio": r["val_ppl"] / base["val_ppl"],
            "product_of_single_train_speedups": product,
            "seed_projection": projection[0] if projection else None,
            "seed_projection_source": projection[1] if projection else None,
        })
    if not combos:
        return None
    headline = max(combos, key=lambda c: (len(c["techniques"]), c["train_speedup"]))
    all_steps = sorted({t for v in VARIANTS.values() for t in v.techniques})
    return {"baseline": BASELINE, "baseline_val_ppl": base["val_ppl"], "combinations": combos,
            "headline": headline["variant"], "all_step6_techniques": all_steps,
            "headline_has_all": sorted(headline["techniques"]) == all_steps,
            "seed_target": SEED_PROJECTIONS["all"]}


def cumulative_sentence(report: dict) -> str:
    c = cumulative(report)
    if c is None:
        return "No combined Step-6 model was measured in this run."
    h = next(x for x in c["combinations"] if x["variant"] == c["headline"])
    missing = [t for t in c["all_step6_techniques"] if t not in h["techniques"]]
    target, source = c["seed_target"]
    text = (
        f"Cumulative factor MEASURED (best combination that exists, {h['variant']} = {' + '.join(h['techniques'])}, "
        f"against the plain ResNet-BK of the same run): training {h['train_speedup']:.2f}x, inference "
        f"{h['infer_speedup']:.2f}x tokens/s, {h['infer_flops_ratio']:.2f}x the body FLOPs/token; it cost "
        f"val ppl {h['val_ppl']:.1f} vs {c['baseline_val_ppl']:.1f} ({h['val_ppl_ratio']:.2f}x). "
        f"The seeds' projection is {target:g}x ({source}); measured, the gap is {target / h['train_speedup']:.1f}x "
        "in training speed."
    )
    if h["seed_projection"]:
        text += f" For this very combination the seeds projected {h['seed_projection']:g}x ({h['seed_projection_source']})."
    if h["product_of_single_train_speedups"] is not None:
        text += (f" Multiplying its parts' single measured factors would predict {h['product_of_single_train_speedups']:.2f}x"
                 " (not a measurement).")
    if missing:
        text += f" No model in this checkout combines all Step-6 techniques; not in this combination: {', '.join(missing)}."
    return text


def _variant_measure(r: dict) -> str:
    s = r.get("val_stats", {})
    keys = ("layers_executed", "experts_per_token", "exit_layer_mean", "ffn_rows_fraction", "compression_ratio",
            "inner_length_fraction", "ffn_rows/res1", "ffn_rows/res2")
    shown = [f"{k} {s[k]:.2f}" for k in keys if k in s]
    shown += [f"{k} {v:.2f}" for k, v in s.items() if re.fullmatch("(expected_)?sparsity", k)]
    if "val_ppl_all_layers" in r:
        shown.append(f"ppl all layers {r['val_ppl_all_layers']:.1f}")
    return "; ".join(shown) or "-"


def markdown(report: dict) -> str:
    meta, rows = report["meta"], report["results"]
    if not rows:
        return "# Step 6, all variants: no results yet\n"
    by = _by_name(report)
    base, tf = by.get(BASELINE), by.get(TRANSFORMER)
    a = meta["args"]

    def x(r, key, ref):
        return f" ({r[key] / ref[key]:.2f}x)" if ref is not None and ref is not r else ""

    lines = [
        "# Step 6, all variants together, measured (Task 7.11)",
        "",
        ("**SMOKE RUN: tiny sizes on a CPU; these numbers check the code and measure nothing.**\n"
         if meta.get("smoke") else "")
        + f"Device: {meta['device']}; torch {meta['torch']}; BK-core method {meta['bk_method']}; bf16 autocast "
        f"{meta['amp']}. One process, one device, one after another. Command: `{meta['command']}`.",
        f"Budget per variant: {a['steps']} steps x {a['batch_size']} x {a['seq_len']} = "
        f"{a['steps'] * a['batch_size'] * a['seq_len']:,} training tokens of WikiText-2 (bundled, word level, "
        f"V = {meta['vocab_size']:,}), same seed and batches, AdamW lr {a['lr']}, warmup {a['warmup']} + cosine. "
        f"Val ppl: token-weighted over {meta['val_tokens']:,} validation tokens"
        + (" (the whole split)." if not meta.get("smoke") else " (SMOKE: 8 windows only)."),
        "FLOPs/token: FlopCounterMode, executed matrix products/attention (not the BK-core recurrences), "
        "body = without the LM head; inference on one validation batch, training = forward + backward. "
        "Tokens/s: wall-clock, synchronised, after warm-up. (x) = ratio to the plain ResNet-BK; [x] = to the Transformer.",
        "",
        "| variant | techniques | params | val ppl (x) | infer MFLOP/tok body (x) | train MFLOP/tok body "
        "| train tok/s (x) [x] | infer tok/s (x) [x] | what it did |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {' + '.join(r['techniques']) or '-'} | {r['params'] / 1e6:.2f}M "
            f"| {r['val_ppl']:.1f}{x(r, 'val_ppl', base)} "
            f"| {r['infer_flops_per_token_excl_head'] / 1e6:.2f}{x(r, 'infer_flops_per_token_excl_head', base)} "
            f"| {r['train_flops_per_token_excl_head'] / 1e6:.2f} "
            f"| {r['train_tokens_per_s']:,.0f}{x(r, 'train_tokens_per_s', base)}"
            f"{' [' + format(r['train_tokens_per_s'] / tf['train_tokens_per_s'], '.2f') + 'x]' if tf and tf is not r else ''} "
            f"| {r['infer_tokens_per_s']:,.0f}{x(r, 'infer_tokens_per_s', base)}"
            f"{' [' + format(r['infer_tokens_per_s'] / tf['infer_tokens_per_s'], '.2f') + 'x]' if tf and tf is not r else ''} "
            f"| {_variant_measure(r)} |"
        )
    c = cumulative(report)
    if c:
        lines += ["", "Combinations (measured) against the plain ResNet-BK, beside what multiplying single factors "
                  "predicts (not a measurement) and the seeds' projection (not a result):", "",
                  "| combination | train speedup | infer speedup | infer FLOPs | val ppl (x) | product of single train factors "
                  "| seeds' projection |", "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
        for h in c["combinations"]:
            prod = f"{h['product_of_single_train_speedups']:.2f}x" if h["product_of_single_train_speedups"] else "-"
            proj = f"{h['seed_projection']:g}x ({h['seed_projection_source']})" if h["seed_projection"] else "-"
            lines.append(f"| {h['variant']} | {h['train_speedup']:.2f}x | {h['infer_speedup']:.2f}x "
                         f"| {h['infer_flops_ratio']:.2f}x | {h['val_ppl']:.1f} ({h['val_ppl_ratio']:.2f}x) | {prod} | {proj} |")
    lines += ["", cumulative_sentence(report), "", "Variants:"]
    lines += [f"- {n}: {v['description']} (`{v['config']}`)" for n, v in report["variants"].items()]
    if report["missing"]:
        lines.append(f"- not in this checkout (no config): {', '.join(report['missing'])}")
    if any(r["variant"].endswith("sparse") for r in rows):
        lines.append("\nNote: run_variant trains without Lightning hooks, so SparseLanguageModel's Gumbel-sigmoid "
                     "temperature schedule (on_train_batch_start) did not run: tau stayed at 1.0. It shapes only the "
                     "straight-through gradient (the keep probability does not depend on it); the configs anneal it "
                     "to 0.2 over 2000 steps.")
    if report["skipped"]:
        lines.append(f"\nWARNING: skipped at the deadline (not measured): {', '.join(report['skipped'])}")
    return "\n".join(lines) + "\n"


def plot(report: dict, path) -> None:
    """Val ppl against measured training and inference tokens/s, and the combinations' measured
    speedups beside the seeds' projection."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, by = report["results"], _by_name(report)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for ax, key, label in ((axes[0], "train_tokens_per_s", "training"), (axes[1], "infer_tokens_per_s", "inference")):
        for r in rows:
            color = "k" if r["variant"] == BASELINE else "tab:gray" if r["variant"] == TRANSFORMER else \
                "tab:red" if len(r["techniques"]) > 1 else "tab:blue"
            ax.scatter(r[key], r["val_ppl"], color=color, s=40)
            ax.annotate(r["variant"], (r[key], r["val_ppl"]), fontsize=8, xytext=(4, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel(f"measured {label} tokens/s")
        ax.set_ylabel("val ppl (whole split)")
        ax.grid(alpha=0.3, which="both")
        ax.set_title(f"val ppl vs {label} speed")
    c = cumulative(report)
    ax = axes[2]
    if c:
        labels, measured, product = [], [], []
        for h in c["combinations"]:
            labels.append(h["variant"])
            measured.append(h["train_speedup"])
            product.append(h["product_of_single_train_speedups"] or 0)
        xs = range(len(labels))
        ax.bar([i - 0.2 for i in xs], measured, 0.4, label="measured (train tok/s)", color="tab:red")
        ax.bar([i + 0.2 for i in xs], product, 0.4, label="product of single factors (not measured)", color="tab:pink")
        ax.axhline(c["seed_target"][0], color="k", ls="--", lw=1, label="seeds' projection, 10x (not a result)")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(list(xs), labels)
        ax.set_yscale("log")
        ax.set_ylabel("speedup vs plain ResNet-BK")
        ax.legend(fontsize=8)
    ax.set_title("cumulative: measured vs projected")
    base = by.get(BASELINE)
    fig.suptitle(f"Step 6 variants, {report['meta']['device']}, equal budget"
                 + (f" (baseline ppl {base['val_ppl']:.1f})" if base else "")
                 + (" - SMOKE, measures nothing" if report["meta"].get("smoke") else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -------------------------------------------------------------------------------------- README
def readme_section(report: dict, figure: str = "benchmarks/results/step6_all.png") -> str:
    by, meta = _by_name(report), report["meta"]
    base, tf = by.get(BASELINE), by.get(TRANSFORMER)
    a = meta["args"]
    lines = [
        README_BEGIN,
        "<!-- generated by benchmarks/step6_all.py from benchmarks/results/step6_all.json; do not edit by hand -->",
        "### Step 6, all variants at equal budget (measured)",
        "",
        f"{meta['device']}, one run: each model trained {a['steps']} steps x {a['batch_size']} x {a['seq_len']} tokens "
        "of WikiText-2 (same seed and batches), val ppl token-weighted over the whole validation split, FLOPs "
        "counted on the executed operations, tokens/s wall-clock. Ratios to the plain ResNet-BK; full table: "
        "[`benchmarks/results/step6_all.md`](benchmarks/results/step6_all.md).",
        "",
        "| variant | val ppl | infer MFLOP/token (body) | train tok/s | infer tok/s |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in report["results"]:
        def rel(key, r=r):
            return f" ({r[key] / base[key]:.2f}x)" if base and r is not base else ""

        lines.append(f"| {r['variant']} | {r['val_ppl']:.1f} | {r['infer_flops_per_token_excl_head'] / 1e6:.2f} "
                     f"| {r['train_tokens_per_s']:,.0f}{rel('train_tokens_per_s')} "
                     f"| {r['infer_tokens_per_s']:,.0f}{rel('infer_tokens_per_s')} |")
    lines += ["", cumulative_sentence(report)]
    if tf and base:
        lines += ["", f"The Transformer of equal parameter count reached val ppl {tf['val_ppl']:.1f}; the plain ResNet-BK "
                  f"trained at {base['train_tokens_per_s'] / tf['train_tokens_per_s']:.2f}x and inferred at "
                  f"{base['infer_tokens_per_s'] / tf['infer_tokens_per_s']:.2f}x its tokens/s."]
    if report["skipped"]:
        lines += ["", f"Not measured in this run (skipped at its time limit): {', '.join(report['skipped'])}."]
    if report["missing"]:
        lines += ["", f"Not in the checkout that ran (no config): {', '.join(report['missing'])}."]
    lines += ["", f"![Step 6 variants]({figure})", README_END]
    return "\n".join(lines)


def update_readme(report: dict, readme: Path = ROOT / "README.md") -> None:
    """Replace the text between the step6_all markers; without markers, add them at the end of
    the '## Results' section. Nothing else in the README changes."""
    text = readme.read_text()
    section = readme_section(report)
    if README_BEGIN in text and README_END in text:
        head, rest = text.split(README_BEGIN, 1)
        text = head + section + rest.split(README_END, 1)[1]
    else:
        match = re.search(r"^## Results[^\n]*\n", text, flags=re.M)
        if match is None:
            raise SystemExit("README.md has no '## Results' section")
        nxt = re.search(r"^## ", text[match.end():], flags=re.M)
        at = match.end() + (nxt.start() if nxt else len(text) - match.end())
        body = text[:at].rstrip("\n")
        text = body + "\n\n" + section + "\n\n" + text[at:]
    readme.write_text(text)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report:
        report = json.loads(Path(args.report).read_text())
        out = Path(args.report).parent
    else:
        report = run(args)
        out = Path(args.out)
    write(report, out)
    plot(report, args.figure or out / "step6_all.png")
    if args.readme:
        update_readme(report)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
