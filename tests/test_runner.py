"""benchmarks/run.py: one tiny spec end to end on CPU (JSON schema, numbers finite and from the run,
table and figure written), and the checks every spec in benchmarks/specs/ passes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks import run as runner

ROOT = Path(__file__).resolve().parents[1]
SPEC = """
description: tiny runner check
runs:
  - name: tiny
    config: configs/quickstart.yaml
    meta: {techniques: []}
    # a config's own Throughput: the runner measures with it, under the spec's warm-up
    overrides: {"trainer.callbacks+": {class_path: callbacks.Throughput, init_args: {warmup_steps: 50}}}
budget: {steps: 100}
measure: [val_ppl, test_ppl, infer_tokens_per_s, flops_per_token]
infer_batch_sizes: [1, 2]
figures:
  - {file: tiny.png, kind: curve, x: tokens, y: val_ppl}
"""


def test_tiny_spec_end_to_end(tmp_path):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(SPEC)
    out = tmp_path / "out"
    commit = "0123456789abcdef0123456789abcdef01234567"
    assert runner.main([str(spec), "--smoke", "--out", str(out), "--commit", commit]) == 0
    report = json.loads((out / "tiny.json").read_text())
    for key in ("device", "torch", "lightning", "git_commit", "command", "budget", "records"):
        assert key in report, key
    assert report["smoke"] is True and report["git_commit"] == commit and report["git_commit_from"] == "--commit"
    (r,) = report["records"]
    smoke = runner.SMOKE
    batch_tokens = smoke["data.init_args.batch_size"] * smoke["data.init_args.seq_len"]
    # what the run did, not constants: the smoke budget of steps and the tokens they consumed
    assert r["steps"] == smoke["trainer.max_steps"] and r["tokens"] == r["steps"] * batch_tokens
    for key in ("val_ppl", "test_ppl", "train_tokens_per_s", "step_ms", "wall_s", "train_seconds", "flops_per_token"):
        assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, key
    assert math.isclose(r["val_ppl"], math.exp(r["val_metrics"]["val/loss"]), rel_tol=1e-5)
    # tokens/s and step time are two views of the same timers: one timed batch each
    assert math.isclose(r["train_tokens_per_s"] * r["step_ms"] / 1000, batch_tokens, rel_tol=1e-6)
    assert r["train_seconds"] < r["wall_s"]
    # the LM head is the only thing between the two FLOP counts: 2 * d_model * vocab per token
    vocab = 33_279
    assert r["flops_per_token"] - r["flops_per_token_body"] == pytest.approx(2 * 64 * vocab)
    assert set(r["infer_tokens_per_s"]) == {"1", "2"} and all(v > 0 for v in r["infer_tokens_per_s"].values())
    assert r["peak_mem_gb"] is None and r["gpu_busy"] is None  # CUDA-only measurements, not faked on a CPU
    assert [p["step"] for p in r["curve"]] == [r["steps"]] and r["curve"][0]["tokens"] == r["tokens"]
    assert r["command"].startswith("lightning fit --config configs/quickstart.yaml")
    table = (out / "tiny.md").read_text()
    assert "python -m benchmarks.run benchmarks/specs/tiny.yaml --smoke" in table and "| tiny |" in table
    assert f"commit {commit} (stated by --commit)" in table
    assert (out / "tiny.png").stat().st_size > 0
    assert (out / "runs" / "tiny" / "tiny").is_dir()  # TensorBoard logs of the run
    assert any((out / "runs" / "tiny" / "figures").glob("events.out.tfevents.*"))  # and its figure


def test_recorded_commit_is_git_head_unless_stated(capsys):
    env = runner.environment({"name": "x"}, smoke=True)
    assert env["git_commit_from"] == "git" and env["git_commit"].startswith(runner._git("rev-parse", "HEAD"))
    assert len(env["git_commit"].removesuffix("-dirty")) == 40
    with pytest.raises(SystemExit):
        runner.main([str(ROOT / "benchmarks" / "specs" / "lm_compare.yaml"), "--commit", "$(git rev-parse HEAD)"])
    assert "is not a commit SHA" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted((ROOT / "benchmarks" / "specs").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_spec_loads(path):
    spec = runner.load_spec(path)
    for smoke in (False, True):
        jobs = runner.jobs(spec, smoke, Path("/tmp/unused"))
        assert jobs and all(j["command"].startswith("lightning fit --config configs/") for j in jobs)


def test_spec_errors_are_one_line(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text("runs: [{name: a, config: configs/quickstart.yaml}]\nbudjet: {steps: 3}\n")
    with pytest.raises(runner.SpecError, match="unknown key.*budjet"):
        runner.load_spec(spec)
    spec.write_text("runs: [{name: a, config: configs/nope.yaml}]\n")
    with pytest.raises(runner.SpecError, match="configs/nope.yaml does not exist"):
        runner.load_spec(spec)
    spec.write_text("runs: [{name: a, config: configs/quickstart.yaml}]\nbudget: {seconds: 0}\n")
    with pytest.raises(runner.SpecError, match="budget.seconds must be a number > 0"):
        runner.load_spec(spec)


def test_cumulative_is_the_best_measured_combination():
    spec = {"baseline": "plain", "cumulative": {"techniques_key": "techniques", "max_ppl_ratio": 1.05}}

    def rec(name, techniques, train, infer, ppl):
        return {
            "name": name,
            "meta": {"techniques": techniques},
            "train_tokens_per_s": train,
            "infer_tokens_per_s": {"1": infer / 2, "64": infer},
            "val_ppl": ppl,
        }

    report = {
        "records": [
            rec("plain", [], 100.0, 200.0, 300.0),
            rec("a", ["act"], 300.0, 600.0, 300.0),
            rec("ab", ["act", "ms"], 150.0, 500.0, 310.0),
            rec("abc", ["act", "ms", "sp"], 90.0, 900.0, 400.0),
        ]
    }
    c = runner.cumulative(report, spec)
    # "abc" infers fastest but costs 33% ppl; a single technique ("a") is never the cumulative entry
    assert c["variant"] == "ab" and c["infer_batch"] == 64
    assert c["train_speedup"] == pytest.approx(1.5) and c["infer_speedup"] == pytest.approx(2.5)
    assert c["ppl_ratio"] == pytest.approx(310 / 300) and {x["variant"] for x in c["combinations"]} == {"ab", "abc"}


def test_step6_transformer_has_the_baselines_parameter_count():
    from resnet_bk.cli import build

    spec = runner.load_spec(ROOT / "benchmarks" / "specs" / "step6_all.yaml")
    by = {j["name"]: j for j in runner.jobs(spec, True, Path("/tmp/unused"))}
    base, tf = (runner.count_parameters(build(by[n]["args"]).model.model) for n in ("resnet_bk", "transformer"))
    assert abs(tf - base) / base < 0.001


def test_a_run_that_fails_is_recorded_and_the_next_runs_go_on(tmp_path):
    """A run that raises (here: windows longer than the network's positions) is kept in the report as
    an error, out of the table, and the spec's later runs still run: one broken config must not cost
    the rest of a device session."""
    spec = tmp_path / "two.yaml"
    spec.write_text(
        "runs:\n"
        "  - {name: broken, config: configs/quickstart.yaml,"
        " overrides: {model.init_args.network.init_args.config.max_seq_len: 8}}\n"
        "  - {name: fine, config: configs/quickstart.yaml}\n"
        "budget: {steps: 2}\n"
        "measure: [val_ppl]\n"
    )
    out = tmp_path / "out"
    assert runner.main([str(spec), "--smoke", "--out", str(out)]) == 1  # the report is written all the same
    broken, fine = json.loads((out / "two.json").read_text())["records"]
    assert broken["name"] == "broken" and "max_seq_len" in broken["error"] and "val_ppl" not in broken
    assert fine["name"] == "fine" and math.isfinite(fine["val_ppl"])
    table = (out / "two.md").read_text()
    assert "| fine |" in table and "| broken |" not in table
    assert "Runs that did not finish" in table and "- broken: ValueError: data seq_len 16 exceeds" in table


VARIANT_SPEC = """
description: variants check
runs:
  - name: act
    config: configs/act.yaml
    overrides: {model.init_args.network.init_args.capacity: 1.0}
    meta: {techniques: [act]}
    variants:
      - {name: half, set: {capacity: 0.5}}
      - {name: per_step, set: {capacity: [1.0, 0.25, 0.25]}}
measure: [val_ppl, infer_tokens_per_s]
infer_batch_sizes: [1]
infer_graph: true
"""


def test_variants_measure_the_trained_model_again(tmp_path):
    """Each variant is a record of its own (run@variant) with the run's training figures and its own
    validation and inference, measured with the setting applied to every module that has it."""
    spec = tmp_path / "variants.yaml"
    spec.write_text(VARIANT_SPEC)
    out = tmp_path / "out"
    assert runner.main([str(spec), "--smoke", "--out", str(out)]) == 0
    base, half, per_step = json.loads((out / "variants.json").read_text())["records"]
    assert [r["name"] for r in (base, half, per_step)] == ["act", "act@half", "act@per_step"]
    assert half["variant_of"] == "act" and half["set"] == {"capacity": 0.5} and half["meta"] == base["meta"]
    assert half["train_tokens_per_s"] == base["train_tokens_per_s"] and half["steps"] == base["steps"]
    overflow = "val/stats/capacity_overflow"
    assert base["val_metrics"][overflow] == 0.0 and half["val_metrics"][overflow] > 0.0
    assert half["val_ppl"] != base["val_ppl"] and math.isfinite(per_step["val_ppl"])
    assert base["infer_mode"] == {"1": "eager"} and base["infer_device"] == "cpu"  # no CUDA graphs on a CPU: said
    table = (out / "variants.md").read_text()
    assert "| act@half |" in table and '# then, on the trained model: {"capacity": 0.5}' in table
    assert "Inference tokens/s: the eval-mode forward captured once in a CUDA graph" in table


def test_apply_settings_uses_setters_and_undoes():
    from resnet_bk.models.config import BKConfig
    from resnet_bk.models.early_exit_lm import EarlyExitLM

    model = EarlyExitLM(50, BKConfig(d_model=16, n_layers=2, max_seq_len=8), capacity=1.0)
    holder = torch.nn.Module()
    holder.model = model
    undo = runner.apply_settings(holder, {"capacity": 0.25, "exit_threshold": 0.5})
    assert model.capacity == 0.25 and model.get_exit_threshold() == 0.5
    for call in undo:
        call()
    assert model.capacity == 1.0 and model.get_exit_threshold() is None
    with pytest.raises(ValueError, match="no module of EarlyExitLM has 'capcity'"):
        runner.apply_settings(holder, {"capcity": 0.5})
