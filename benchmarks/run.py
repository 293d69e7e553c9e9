"""One experiment runner: train configs through `lightning fit`'s own objects and measure them.

    python -m benchmarks.run benchmarks/specs/lm_compare.yaml               # results into benchmarks/results/
    python -m benchmarks.run benchmarks/specs/lm_compare.yaml --smoke       # tiny CPU check into runs/bench_smoke/
    python -m benchmarks.run SPEC --only resnet_bk --out DIR                # some runs, elsewhere
    python -m benchmarks.run SPEC --commit SHA                              # record SHA as the code's commit

A spec (YAML, benchmarks/specs/) names runs; each run is `lightning fit --config C [--key value]...`
built with resnet_bk.cli.build. The spec keys and the outputs are described in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from torch.utils.benchmark import Timer

from callbacks import Throughput
from callbacks.flops import flop_breakdown
from resnet_bk.cli import build
from resnet_bk.host_sync import host_syncs
from resnet_bk.models import count_parameters

ROOT = Path(__file__).resolve().parents[1]
# The keys of a spec (docs/benchmarks.md): what runs and how, then what is measured and reported.
SPEC_KEYS = {"description", "runs", "overrides", "seeds", "budget", "parallel", "smoke"}
SPEC_KEYS |= {"measure", "infer_batch_sizes", "infer_graph", "warmup_steps", "baseline", "columns", "figures"}
SPEC_KEYS |= {"cumulative"}
RUN_KEYS = {"name", "config", "overrides", "seeds", "meta", "variants"}
MEASURES = {"val_ppl", "test_ppl", "infer_tokens_per_s", "flops_per_token"}
# --smoke: every run on a CPU in seconds (2 steps of 2 x 16 tokens, 1 evaluation batch, small inference batches).
SMOKE = {
    "trainer.accelerator": "cpu",
    "trainer.precision": "32-true",
    "trainer.max_steps": 2,
    "trainer.max_epochs": -1,
    "trainer.val_check_interval": 2,
    "trainer.check_val_every_n_epoch": None,
    "trainer.limit_val_batches": 1,
    "trainer.num_sanity_val_steps": 0,
    "data.init_args.num_workers": 0,
    "data.init_args.batch_size": 2,
    "data.init_args.eval_batch_size": 2,
    "data.init_args.seq_len": 16,
    "data.init_args.max_train_tokens": 5000,
}
SMOKE_EVAL_BATCHES, SMOKE_MAX_INFER_BATCH = 1, 4


class SpecError(ValueError):
    """A spec that cannot run; the message says what to change."""


# ------------------------------------------------------------------------------------------ spec
def load_spec(path: str | Path) -> dict:
    """The spec at `path`, checked: known keys, every run with a name and an existing config."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec not found: {path}; pass a YAML file such as benchmarks/specs/lm_compare.yaml")
    spec = yaml.safe_load(path.read_text()) or {}
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise SpecError(f"{path}: unknown key(s) {sorted(unknown)}; known: {sorted(SPEC_KEYS)}")
    if not spec.get("runs"):
        raise SpecError(f"{path}: no runs; add runs: [{{name: ..., config: configs/....yaml}}]")
    bad = set(spec.get("measure", [])) - MEASURES
    if bad:
        raise SpecError(f"{path}: unknown measure(s) {sorted(bad)}; known: {sorted(MEASURES)}")
    names = [run.get("name") for run in spec["runs"]]
    for run in spec["runs"]:
        if set(run) - RUN_KEYS or not run.get("name") or not run.get("config"):
            raise SpecError(f"{path}: run {run} needs a name and a config (keys: {sorted(RUN_KEYS)})")
        for config in _as_list(run["config"]):
            if not (ROOT / config).is_file():
                raise SpecError(f"{path}: run {run['name']!r}: config {config} does not exist")
        for variant in run.get("variants", []):
            if set(variant) - {"name", "set", "meta"} or not variant.get("name") or not variant.get("set"):
                raise SpecError(
                    f"{path}: run {run['name']!r}: variant {variant} needs a name and a set: {{attribute: value}} "
                    "(and optionally meta)"
                )
    if len(set(names)) != len(names):
        raise SpecError(f"{path}: run names repeat: {names}")
    if spec.get("baseline") not in (None, *names):
        raise SpecError(f"{path}: baseline {spec['baseline']!r} is not a run name ({names})")
    budget = spec.get("budget", {})
    if "seconds" in budget and not (isinstance(budget["seconds"], (int, float)) and budget["seconds"] > 0):
        raise SpecError(f"{path}: budget.seconds must be a number > 0, got {budget['seconds']!r}")
    spec["name"] = path.stem
    return spec


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _cli_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)  # null, true, 0.002, {"a": 1}, [1, 2]


def budget_overrides(budget: dict, warmup_steps: int) -> dict:
    """trainer.* settings of a budget: steps, epochs, or seconds of training (callbacks.TrainTimeBudget,
    which also runs the LR cosine over that time; max_steps is only a cap)."""
    if "steps" in budget:
        return {"trainer.max_steps": budget["steps"], "trainer.max_epochs": -1}
    if "epochs" in budget:
        return {"trainer.max_epochs": budget["epochs"], "trainer.max_steps": -1}
    if "seconds" in budget:
        clock = {"seconds": budget["seconds"], "start_after_steps": warmup_steps}
        return {
            "trainer.max_steps": 10**7,
            "trainer.max_epochs": -1,
            "trainer.callbacks+": {"class_path": "callbacks.TrainTimeBudget", "init_args": clock},
        }
    return {}


def jobs(spec: dict, smoke: bool, runs_root: Path) -> list[dict]:
    """One job per run and seed: the `lightning fit` arguments and what to measure."""
    out = []
    for run in spec["runs"]:
        seeds = run.get("seeds", spec.get("seeds", [1234]))
        for seed in seeds[:1] if smoke else seeds:
            label = run["name"] if len(seeds) == 1 else f"{run['name']}_s{seed}"
            overrides = {
                **budget_overrides(spec.get("budget", {}), spec.get("warmup_steps", 10)),
                **spec.get("overrides", {}),
                **run.get("overrides", {}),
            }
            if smoke:
                overrides.update(SMOKE)
                overrides.update(spec.get("smoke", {}))
            args = [a for c in _as_list(run["config"]) for a in ("--config", str(ROOT / c))]
            args += ["--seed_everything", str(seed)]
            for key, value in overrides.items():
                args += [f"--{key}", _cli_value(value)]
            command = "lightning fit " + " ".join(shlex.quote(a.replace(str(ROOT) + os.sep, "")) for a in args)
            logger = {"save_dir": str(runs_root), "name": label, "default_hp_metric": False}
            logger = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": logger}
            args += ["--trainer.default_root_dir", str(runs_root), "--trainer.logger", json.dumps(logger)]
            args += ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
            out.append(
                {
                    "name": run["name"],
                    "label": label,
                    "seed": seed,
                    "config": _as_list(run["config"]),
                    "overrides": run.get("overrides", {}),
                    "meta": run.get("meta", {}),
                    "args": args,
                    "command": command,
                    "measure": spec.get("measure", ["val_ppl"]),
                    "infer_batch_sizes": [
                        min(b, SMOKE_MAX_INFER_BATCH) if smoke else b for b in spec.get("infer_batch_sizes", [1, 8, 64])
                    ],
                    "warmup_steps": 1 if smoke else spec.get("warmup_steps", 10),
                    "eval_batches": SMOKE_EVAL_BATCHES if smoke else 1.0,
                    "infer_reps": 1 if smoke else 10,
                    "infer_graph": bool(spec.get("infer_graph", False)),
                    "variants": run.get("variants", []),
                    "separate_process": int(overrides.get("trainer.devices", 1)) > 1,
                }
            )
    return out


# ------------------------------------------------------------------------------------ measuring
class ValCurve(L.Callback):
    """Val ppl at every validation during training, against steps, tokens and training seconds (all
    batches: train_seconds; after the warm-up steps, where compilation happens: timed_seconds)."""

    def __init__(self, throughput: Throughput) -> None:
        self.throughput, self.points = throughput, []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and "val/ppl" in trainer.callback_metrics:
            t = self.throughput  # its on_validation_start has read the training timers
            self.points.append(
                {
                    "step": trainer.global_step,
                    "tokens": t.tokens,
                    "train_seconds": t.train_seconds,
                    "timed_seconds": t.timed_seconds,
                    "val_ppl": float(trainer.callback_metrics["val/ppl"]),
                }
            )


@torch.no_grad()
def infer_tokens_per_s(module: L.LightningModule, x: torch.Tensor, context, reps: int, graph: bool = False):
    """Eval-mode forward passes over x (B, N) -> (tokens/s over `reps` passes, how they ran).

    Timed by torch.utils.benchmark.Timer (2 warm-up passes first, the device synchronised at both
    ends, with all of torch's threads). graph (CUDA only): the forward is captured once in a CUDA
    graph and replayed, so the time is the GPU's and not the host's launches ("cuda_graph"); a
    forward that cannot be captured runs eagerly and says why: "eager (host sync: ...)" when one
    eager pass finds it reads values back or builds tensors from Python data (resnet_bk.host_sync,
    e.g. an exact gather; then no capture is tried), "eager (capture failed: ...)" otherwise."""

    def forward():
        with context():
            module(x)

    mode, replay = "eager", forward
    if graph and x.is_cuda:
        # Asked first, never tried: a refused capture can leave the process's CUDA RNG state unusable.
        if syncs := host_syncs(forward):
            mode = f"eager (host sync: {'; '.join(syncs)})"
        else:
            try:
                replay = captured(forward)
                mode = "cuda_graph"
            except Exception as err:  # noqa: BLE001 - any capture failure: time the eager forward instead
                torch.cuda.synchronize()
                mode = f"eager (capture failed: {type(err).__name__}: {str(err).splitlines()[0][:120]})"
    timer = Timer("forward()", globals={"forward": replay}, num_threads=torch.get_num_threads())
    tokens_per_s = x.numel() / timer.timeit(reps).mean
    del replay
    return tokens_per_s, mode


def captured(forward):
    """forward (no arguments) captured in a CUDA graph after 2 warm-up calls on a side stream
    (as torch.cuda.graphs documents); returns the graph's replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            forward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        forward()
    return graph.replay


def _windows(datamodule, n: int, device: torch.device) -> torch.Tensor:
    """The first n validation windows (cycled if the split has fewer), (n, seq_len) on device."""
    dataset = datamodule.val_dataloader().dataset
    return torch.stack([dataset[i % len(dataset)]["input_ids"] for i in range(n)]).to(device)


def _floats(metrics: dict, prefix: str) -> dict:
    return {k: float(v) for k, v in metrics.items() if k.startswith(prefix) and torch.as_tensor(v).numel() == 1}


def run_one(job: dict) -> list[dict] | None:
    """Fit one job through the CLI's objects and measure it, then each of its variants (settings
    changed on the trained model, measured again); None on a DDP rank other than 0."""
    cli = build(job["args"])
    trainer, module, datamodule = cli.trainer, cli.model, cli.datamodule
    throughput = next((c for c in trainer.callbacks if isinstance(c, Throughput)), None)  # a config may have one
    if throughput is None:
        trainer.callbacks.append(throughput := Throughput())
    throughput.warmup_steps = job["warmup_steps"]  # the spec's, also over a config's own
    trainer.callbacks.append(curve := ValCurve(throughput))
    start = time.perf_counter()
    trainer.fit(module, datamodule)
    wall_s = time.perf_counter() - start
    if trainer.global_rank != 0:
        return None
    t = throughput.summary()
    record = {k: job[k] for k in ("name", "label", "seed", "overrides", "meta", "command")}
    record["config"] = " ".join(job["config"])
    record.update(
        model=type(module.model).__name__,
        params=count_parameters(module.model),
        steps=trainer.global_step,
        tokens=t["tokens"],
        wall_s=wall_s,
        train_seconds=t["train_seconds"],
        curve=curve.points,
        **{k: t[k] for k in ("train_tokens_per_s", "step_ms", "peak_mem_gb", "gpu_busy")},
        train_metrics=_floats(trainer.callback_metrics, "train/"),
        val_metrics=_floats(trainer.callback_metrics, "val/"),
    )  # the last validation of fit, if any
    if trainer.world_size > 1:  # evaluation below is single-device; under DDP keep what fit logged
        return [record]
    # Evaluation: a single-device Trainer of the same precision, over the whole split (smoke: a few batches).
    evaluator = L.Trainer(
        accelerator="gpu" if trainer.strategy.root_device.type == "cuda" else "cpu",
        devices=1,
        logger=False,
        precision=trainer.precision_plugin.precision,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=job["eval_batches"],
        limit_test_batches=job["eval_batches"],
    )
    device = trainer.strategy.root_device  # fit's teardown has moved the module to the CPU
    record.update(evaluate(module, datamodule, evaluator, job, device))
    records = [record]
    for variant in job["variants"]:
        records.append(measure_variant(record, variant, module, datamodule, evaluator, job, device))
    return records


def evaluate(module: L.LightningModule, datamodule, evaluator: L.Trainer, job: dict, device: torch.device) -> dict:
    """What the job measures on the trained module: val/test ppl over the whole split, FLOPs per
    token, inference tokens/s at each batch size (on `device`, the one it trained on)."""
    measure, out = set(job["measure"]), {}
    if "val_ppl" in measure:
        metrics = evaluator.validate(module, datamodule, verbose=False)[0]
        out.update(val_ppl=metrics["val/ppl"], val_metrics=_floats(metrics, "val/"))
    if "test_ppl" in measure:
        metrics = evaluator.test(module, datamodule, verbose=False)[0]
        out.update(test_ppl=metrics["test/ppl"], test_metrics=_floats(metrics, "test/"))
    module.to(device).eval()
    if "flops_per_token" in measure:
        flops = flop_breakdown(module.model, _windows(datamodule, 2, device), exclude=("lm_head",))
        out.update(flops_per_token=flops["total"], flops_per_token_body=flops["kept"])
    if "infer_tokens_per_s" in measure:
        context = evaluator.precision_plugin.forward_context
        speeds, modes = {}, {}
        for b in job["infer_batch_sizes"]:
            x = _windows(datamodule, b, device)
            speeds[str(b)], modes[str(b)] = infer_tokens_per_s(
                module, x, context, job["infer_reps"], job["infer_graph"]
            )
            gc.collect()  # the captured graph's memory pool, before the next batch size
            torch.cuda.empty_cache()
        out.update(infer_tokens_per_s=speeds, infer_mode=modes, infer_device=str(x.device))
    return out


def measure_variant(base: dict, variant: dict, module, datamodule, evaluator, job: dict, device) -> dict:
    """The trained module measured again with variant["set"] applied (then undone): a record named
    "<run>@<variant>" that keeps the run's training figures. Its validation runs the eager loss (a
    changed setting would recompile the compiled one)."""
    record = {k: v for k, v in base.items() if k not in ("val_ppl", "test_ppl", "val_metrics", "test_metrics")}
    record = {k: v for k, v in record.items() if not k.startswith(("flops_per_token", "infer_"))}
    record.update(
        name=f"{base['name']}@{variant['name']}",
        label=f"{base['label']}@{variant['name']}",
        variant_of=base["name"],
        set=variant["set"],
        meta={**base["meta"], **variant.get("meta", {})},
        command=base["command"] + f"  # then, on the trained model: {json.dumps(variant['set'])}",
    )
    compiled = module._loss_terms_fn
    previous = apply_settings(module, variant["set"])
    module._loss_terms_fn = module._loss_terms
    try:
        record.update(evaluate(module, datamodule, evaluator, job, device))
    finally:
        module._loss_terms_fn = compiled
        for undo in previous:
            undo()
    return record


def apply_settings(module: torch.nn.Module, settings: dict) -> list:
    """Set each name to its value on every submodule that has it: through its set_<name> method
    where it has one (e.g. EarlyExitLM.set_exit_threshold), else as an attribute (e.g. capacity).
    Returns the calls that undo it; a name no submodule has is a ValueError."""
    undo = []
    for name, new in settings.items():
        hits = 0
        for m in module.modules():
            setter, getter = getattr(m, f"set_{name}", None), getattr(m, f"get_{name}", None)
            if callable(setter) and callable(getter):
                old = getter()
                setter(new)
                undo.append(lambda setter=setter, old=old: setter(old))
            elif name in vars(m):
                old = vars(m)[name]
                setattr(m, name, new)
                undo.append(lambda m=m, name=name, old=old: setattr(m, name, old))
            else:
                continue
            hits += 1
        if not hits:
            raise ValueError(f"no module of {type(module.model).__name__} has {name!r} to set; check the variant")
    return undo


def _start_worker(job: dict, folder: Path) -> tuple[subprocess.Popen, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{job['label']}.job.json"
    path.write_text(json.dumps(job))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-m", "benchmarks.run", "--worker", str(path)], cwd=ROOT, env=env), path


def _collect(proc: subprocess.Popen, path: Path, job: dict) -> list[dict]:
    if proc.wait() != 0:
        return [failed(job, f"exit {proc.returncode}; its output is in the runner's log")]
    return json.loads(path.with_suffix(".result.json").read_text())


def failed(job: dict, error: str) -> dict:
    """The record of a run that did not finish: the report keeps it (and the runs after it go on)."""
    return {**{k: job[k] for k in ("name", "label", "seed", "overrides", "meta", "command")}, "error": error}


# ------------------------------------------------------------------------------------- the spec
def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()


def environment(spec: dict, smoke: bool, commit: str | None = None) -> dict:
    """Where and from what the spec runs; `commit` (stated by the caller) overrides the checkout's git HEAD."""
    cuda = torch.cuda.is_available() and not smoke
    return {
        "spec": spec["name"],
        "description": spec.get("description", ""),
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "lightning": L.__version__,
        "git_commit": commit or _git("rev-parse", "HEAD") + ("-dirty" if _git("status", "--porcelain") else ""),
        "git_commit_from": "--commit" if commit else "git",
        "command": "python -m benchmarks.run " + " ".join(sys.argv[1:]),
        "smoke": smoke,
        "budget": spec.get("budget", {}),
        "parallel": spec.get("parallel", 1),
    }


def run_spec(path: str | Path, smoke: bool = False, out: str | Path | None = None, only=None, commit=None) -> dict:
    """Run every job of the spec (or those of the runs named in `only`) and write the report after each;
    `commit`: the git commit to record (default: the checkout's HEAD, "-dirty" with uncommitted changes)."""
    spec = load_spec(path)
    out = Path(out or (ROOT / "runs" / "bench_smoke" if smoke else ROOT / "benchmarks" / "results"))
    runs_root = (out / "runs" if smoke else ROOT / "runs" / "bench") / spec["name"]
    todo = [j for j in jobs(spec, smoke, runs_root) if not only or j["name"] in only]
    report = {**environment(spec, smoke, commit), "records": []}
    if "seconds" in spec.get("budget", {}):
        report["budget_s"] = float(spec["budget"]["seconds"])
    out.mkdir(parents=True, exist_ok=True)
    parallel = max(1, min(int(spec.get("parallel", 1)), 2 if smoke else 64))
    running: list[tuple[subprocess.Popen, Path, dict]] = []
    for job in todo:
        if parallel == 1 and not job["separate_process"]:
            try:
                report["records"] += run_one(job)
            except (Exception, SystemExit) as err:  # one broken run must not cost the runs after it
                traceback.print_exc()
                report["records"].append(failed(job, f"{type(err).__name__}: {err}".splitlines()[0]))
            torch._dynamo.reset()  # compiled graphs of every run share one code object's cache and its recompile limit
            gc.collect()  # the run's model, optimizer and loaders, before the next one is timed
            torch.cuda.empty_cache()
        else:
            running.append((*_start_worker(job, runs_root / "jobs"), job))
            if len(running) >= parallel or job["separate_process"]:
                report["records"] += _collect(*running.pop(0))
        write(report, spec, out)
    for proc, job_path, job in running:
        report["records"] += _collect(proc, job_path, job)
        write(report, spec, out)
    if spec.get("figures"):  # the figures beside the runs' logs: tensorboard --logdir runs/bench/<spec>
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(runs_root / "figures") as writer:
            for figure in spec["figures"]:
                plot(report, figure, out / figure["file"], writer)
    return report


def write(report: dict, spec: dict, out: Path) -> None:
    if spec.get("cumulative"):
        report["cumulative"] = cumulative(report, spec)
    (out / f"{spec['name']}.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    (out / f"{spec['name']}.md").write_text(markdown(report, spec))
    for figure in spec.get("figures", []):
        plot(report, figure, out / figure["file"])


# ------------------------------------------------------------------------------------- reports
def value(record: dict, key: str):
    """record[key], where key may be a dotted path into nested dicts (infer_tokens_per_s.8)."""
    if key in record:
        return record[key]
    head, _, rest = key.partition(".")
    return value(record[head], rest) if rest and isinstance(record.get(head), dict) else None


def _mean(records: list[dict], key: str, scale: float = 1.0) -> tuple[float | None, float | None]:
    xs = [v / scale for v in (value(r, key) for r in records) if isinstance(v, (int, float)) and math.isfinite(v)]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def _fmt(mean: float | None, sd: float | None) -> str:
    if mean is None:
        return "-"
    digits = 0 if abs(mean) >= 1000 or (mean == int(mean) and sd is None) else 2 if abs(mean) < 10 else 1
    text = f"{mean:,.{digits}f}"
    return text + (f" ± {sd:,.{digits}f}" if sd is not None else "")


def columns(report: dict, spec: dict) -> list[tuple[str, str, float]]:
    """(header, record key, divisor) of the table's columns that some record holds."""
    cols = [("params", "params"), ("steps", "steps"), ("tokens", "tokens"), ("fit s", "wall_s"), ("val ppl", "val_ppl")]
    cols += [("test ppl", "test_ppl"), ("train tok/s", "train_tokens_per_s"), ("step ms", "step_ms")]
    sizes = sorted({b for r in report["records"] for b in r.get("infer_tokens_per_s", {})}, key=int)
    cols += [(f"infer tok/s B={b}", f"infer_tokens_per_s.{b}") for b in sizes]
    cols += [("MFLOP/token (body)", "flops_per_token_body"), ("peak GB", "peak_mem_gb"), ("GPU busy", "gpu_busy")]
    cols += [(key.rpartition(".")[2], key) for key in spec.get("columns", [])]
    cols = [(h, k, 1e6 if k == "flops_per_token_body" else 1.0) for h, k in cols]
    return [c for c in cols if any(value(r, c[1]) is not None for r in report["records"])]


def markdown(report: dict, spec: dict) -> str:
    groups: dict[str, list[dict]] = {}
    for r in report["records"]:
        if "error" not in r:
            groups.setdefault(r["name"], []).append(r)
    cols = columns(report, spec)
    base = groups.get(spec.get("baseline"))
    lines = [
        f"# {spec.get('description') or spec['name']}",
        "",
        (
            "**SMOKE RUN: tiny sizes on a CPU; the numbers check the code and measure nothing.**\n\n"
            if report["smoke"]
            else ""
        )
        + f"Made by `python -m benchmarks.run benchmarks/specs/{spec['name']}.yaml{' --smoke' * report['smoke']}` "
        f"on {report['device']}, "
        f"torch {report['torch']}, commit {report['git_commit']} "
        f"({'stated by --commit' if report['git_commit_from'] == '--commit' else 'git HEAD of the checkout'}). "
        f"Budget: {report['budget'] or 'as configured'}. "
        "Val/test ppl: token-weighted over the whole split after training; tokens/s: wall-clock (CUDA events on a GPU), "
        "warm-up excluded; FLOPs: executed matrix products per token without the LM head "
        "(torch.utils.flop_counter). Several seeds: mean ± sd.",
        "",
    ]
    if any("infer_mode" in r for r in report["records"]):
        lines += [inference_note(report, spec), ""]
    if any("variant_of" in r for r in report["records"]):
        lines += [
            "A row named run@variant is the run's trained model measured again with the variant's settings "
            "(listed with the commands below): its training columns are the run's; its validation ran the eager "
            "loss.",
            "",
        ]
    if report.get("note"):  # what the person who ran it must add, e.g. runs that did not finish
        lines += [f"Note: {report['note']}", ""]
    if report["parallel"] > 1:
        lines += [
            f"Runs shared the device ({report['parallel']} at once): compare their tokens, not their timings.",
            "",
        ]
    ratio_cols = [(h, k) for h, k, _ in cols if k in ("val_ppl", "train_tokens_per_s") or k.startswith("infer_tokens")]
    header = (
        ["run", "seeds"]
        + [h for h, _, _ in cols]
        + ([f"{h} ÷ {spec['baseline']}" for h, _ in ratio_cols] if base else [])
    )
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * 2 + "---:|" * (len(header) - 2)]
    for name, recs in groups.items():
        row = [name, ",".join(str(r["seed"]) for r in recs)] + [_fmt(*_mean(recs, k, d)) for _, k, d in cols]
        if base:
            for _, k in ratio_cols:
                m, b = _mean(recs, k)[0], _mean(base, k)[0]
                row.append(f"{m / b:.2f}x" if m is not None and b else "-")
        lines.append("| " + " | ".join(row) + " |")
    if report.get("cumulative"):
        c = report["cumulative"]
        lines += [
            "",
            (
                f"Cumulative (best measured combination against {c['baseline']}, same run): {c['variant']}: "
                f"training {c['train_speedup']:.2f}x, inference {c['infer_speedup']:.2f}x (batch {c['infer_batch']}), "
                f"val ppl {c['ppl_ratio']:.2f}x."
            ),
        ]
    broken = [r for r in report["records"] if "error" in r]
    if broken:
        lines += ["", "Runs that did not finish (not in the table):", ""]
        lines += [f"- {r['label']}: {r['error']}" for r in broken]
    lines += ["", "Commands (each run is this `lightning fit`, measured by the runner):", ""]
    lines += [f"- {r['label']}: `{r['command']}`" for r in report["records"]]
    return "\n".join(lines) + "\n"


def inference_note(report: dict, spec: dict) -> str:
    """How the inference tokens/s were timed, and every measurement that ran otherwise."""
    how = (
        "the eval-mode forward captured once in a CUDA graph and replayed (the GPU's time for the eager "
        "kernels, without the host's launches)"
        if spec.get("infer_graph")
        else "the eval-mode forward, eager"
    )
    wanted = "cuda_graph" if spec.get("infer_graph") and not report["smoke"] else "eager"
    odd = []
    for r in report["records"]:
        modes = {b: mode for b, mode in r.get("infer_mode", {}).items() if mode != wanted}
        if modes and len(set(modes.values())) == 1 and len(modes) == len(r["infer_mode"]):
            odd.append(f"{r['label']} (every batch size): {next(iter(modes.values()))}")
        else:
            odd += [f"{r['label']} B={b}: {mode}" for b, mode in modes.items()]
    return f"Inference tokens/s: {how}." + (f" Ran otherwise: {'; '.join(odd)}." if odd else "")


def cumulative(report: dict, spec: dict) -> dict | None:
    """The combination (a run whose meta lists >= 2 techniques) with the best inference speed-up among
    those within max_ppl_ratio of the baseline's val ppl (else the best overall), against the baseline."""
    conf = spec["cumulative"]
    by = {r["name"]: r for r in report["records"]}
    base = by.get(spec.get("baseline"))
    if base is None or not base.get("infer_tokens_per_s"):
        return None
    batch = max(base["infer_tokens_per_s"], key=int)
    rows = []
    for r in report["records"]:
        if len(r["meta"].get(conf.get("techniques_key", "techniques"), [])) >= 2 and r.get("val_ppl"):
            rows.append(
                {
                    "variant": r["name"],
                    "train_speedup": r["train_tokens_per_s"] / base["train_tokens_per_s"],
                    "infer_speedup": r["infer_tokens_per_s"][batch] / base["infer_tokens_per_s"][batch],
                    "ppl_ratio": r["val_ppl"] / base["val_ppl"],
                }
            )
    if not rows:
        return None
    best = max(rows, key=lambda c: (c["ppl_ratio"] <= conf.get("max_ppl_ratio", 1.05), c["infer_speedup"]))
    return {**best, "baseline": base["name"], "infer_batch": int(batch), "combinations": rows}


def plot(report: dict, figure: dict, path: Path, writer=None) -> None:
    """A scatter of two record values per run, or curves of val ppl (or another curve key) per run;
    also into TensorBoard through `writer` (a SummaryWriter) when given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in report["records"] if not figure.get("runs") or r["name"] in figure["runs"]]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in records:
        if figure.get("kind", "scatter") == "curve":
            points = r.get("curve") or []
            ax.plot(
                [p[figure["x"]] for p in points], [p[figure["y"]] for p in points], marker="o", ms=3, label=r["label"]
            )
    if figure.get("kind", "scatter") == "scatter":  # one colour per run, its variants joined to it
        groups: dict[str, list] = {}
        for r in records:
            x, y = value(r, figure["x"]), value(r, figure["y"])
            if x is not None and y is not None:
                groups.setdefault(r.get("variant_of", r["name"]), []).append((x, y, r["label"].partition("@")[2]))
        for name, points in groups.items():
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=5, label=name)
            for x, y, variant in points:
                if variant:
                    ax.annotate(variant, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    if figure.get("logx"):
        ax.set_xscale("log")
    if figure.get("logy"):
        ax.set_yscale("log")
    ax.set_xlabel(figure["x"])
    ax.set_ylabel(figure["y"])
    ax.grid(alpha=0.3)
    if records:
        ax.legend(fontsize=7)
    ax.set_title(f"{report['spec']} on {report['device']}" + (" (SMOKE: measures nothing)" if report["smoke"] else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    if writer is not None:
        writer.add_figure(Path(figure["file"]).stem, fig, close=False)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("spec", nargs="?", help="a YAML spec, e.g. benchmarks/specs/lm_compare.yaml")
    p.add_argument("--smoke", action="store_true", help="tiny CPU runs that check the spec in about a minute")
    p.add_argument("--out", help="output folder (default benchmarks/results; --smoke: runs/bench_smoke)")
    p.add_argument("--only", nargs="+", help="run only these run names")
    p.add_argument("--commit", help="the git commit to record (SHA), e.g. where the checkout's .git is not the code's")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # a job file: run it, write <job>.result.json
    args = p.parse_args(argv)
    if args.worker:
        job_path = Path(args.worker)
        records = run_one(json.loads(job_path.read_text()))
        if records is not None:
            job_path.with_suffix(".result.json").write_text(json.dumps(records, default=float))
        return 0
    if not args.spec:
        p.error("give a spec, e.g. benchmarks/specs/lm_compare.yaml")
    if args.commit is not None and not re.fullmatch(r"[0-9a-f]{7,40}", args.commit):
        p.error(f"--commit {args.commit!r} is not a commit SHA; pass the hex of `git rev-parse HEAD`")
    try:
        report = run_spec(args.spec, smoke=args.smoke, out=args.out, only=args.only, commit=args.commit)
    except SpecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(markdown(report, load_spec(args.spec)))
    broken = [r["label"] for r in report["records"] if "error" in r]
    if broken:
        print(f"error: {len(broken)} run(s) did not finish: {', '.join(broken)}; the report lists why", file=sys.stderr)
    return 1 if broken else 0


if __name__ == "__main__":
    raise SystemExit(main())
