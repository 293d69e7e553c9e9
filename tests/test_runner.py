"""benchmarks/run.py: one tiny spec end to end on CPU (JSON schema, numbers finite and from the run,
table and figure written), and the checks every spec in benchmarks/specs/ passes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks import run as runner

ROOT = Path(__file__).resolve().parents[1]
SPEC = """
description: tiny runner check
runs:
  - {name: tiny, config: configs/quickstart.yaml, meta: {techniques: []}}
budget: {steps: 100}
measure: [val_ppl, test_ppl, train_tokens_per_s, infer_tokens_per_s, flops_per_token, peak_mem, gpu_busy, curve]
infer_batch_sizes: [1, 2]
figures:
  - {file: tiny.png, kind: curve, x: tokens, y: val_ppl}
"""


def test_tiny_spec_end_to_end(tmp_path):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(SPEC)
    out = tmp_path / "out"
    assert runner.main([str(spec), "--smoke", "--out", str(out)]) == 0
    report = json.loads((out / "tiny.json").read_text())
    for key in ("device", "torch", "lightning", "git_commit", "command", "budget", "records"):
        assert key in report, key
    assert report["smoke"] is True and len(report["git_commit"]) >= 40
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
    assert (out / "tiny.png").stat().st_size > 0
    assert (out / "runs" / "tiny" / "tiny").is_dir()  # TensorBoard logs of the run


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
    spec.write_text("runs: [{name: a, config: configs/quickstart.yaml}]\nbudget: {seconds: 60}\n")
    with pytest.raises(runner.SpecError, match="max_steps"):
        runner.load_spec(spec)
