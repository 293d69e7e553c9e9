"""benchmarks/step6_all.py: the variant registry builds every present variant, the Transformer
gets the baseline's parameter count, the report states what is measured and what is not, and
the README section is replaced between its markers and nowhere else."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is a folder of scripts, not installed

from benchmarks import step6_all as s6  # noqa: E402
from resnet_bk.models import count_parameters  # noqa: E402

V = 300


def _args(**kw):
    return argparse.Namespace(**{"d_model": 16, "seq_len": 32, **kw})


def test_every_present_variant_builds_and_runs():
    present, missing = s6.available()
    assert s6.BASELINE in present and s6.TRANSFORMER in present
    assert set(present) | set(missing) == set(s6.VARIANTS)
    _, base_net, _ = s6.spec(s6.BASELINE, _args(), V)
    base_params = count_parameters(base_net(V))
    for name in present:
        module_cls, network, kwargs = s6.spec(name, _args(), V, base_params)
        module = module_cls(network, V, lr=1e-3, warmup_steps=1, **kwargs)
        out = module.model(torch.randint(0, V, (2, 32)))
        assert out.logits.shape == (2, 32, V), name
        if name == s6.TRANSFORMER:  # equal size: within one d_ff step of the baseline
            assert abs(count_parameters(module.model) - base_params) / base_params < 0.01


def _row(name, techniques, ppl, train, infer, flops=1e6):
    return {"variant": name, "techniques": techniques, "params": 1e6, "val_ppl": ppl, "train_tokens_per_s": train,
            "infer_tokens_per_s": infer, "infer_flops_per_token_excl_head": flops,
            "train_flops_per_token_excl_head": 3 * flops, "val_stats": {}}


@pytest.fixture
def report():
    return {
        "meta": {"device": "test", "torch": "x", "bk_method": "scan", "amp": False, "command": "c", "vocab_size": V,
                 "val_tokens": 100, "smoke": False,
                 "args": {"steps": 10, "batch_size": 2, "seq_len": 8, "lr": 1e-3, "warmup": 1}},
        "variants": {}, "missing": ["sparse"], "skipped": [],
        "results": [_row("resnet_bk", [], 300.0, 100.0, 1000.0), _row("transformer", [], 280.0, 50.0, 800.0),
                    _row("act", ["act"], 310.0, 200.0, 1500.0), _row("multiscale", ["multiscale"], 400.0, 150.0, 1200.0),
                    _row("act_multiscale", ["act", "multiscale"], 450.0, 120.0, 900.0, 0.5e6)],
    }


def test_cumulative_is_the_measured_combination_not_a_product(report):
    c = s6.cumulative(report)
    assert c["headline"] == "act_multiscale"
    h = c["combinations"][0]
    assert h["train_speedup"] == pytest.approx(1.2) and h["infer_speedup"] == pytest.approx(0.9)
    assert h["product_of_single_train_speedups"] == pytest.approx(3.0)  # 2.0 x 1.5: shown, labelled, not the result
    text = s6.cumulative_sentence(report)
    assert "training 1.20x" in text and "450.0 vs 300.0" in text and "not a measurement" in text
    assert "projection is 10x" in text
    md = s6.markdown(report)
    assert "act_multiscale" in md and "sparse" in md  # the missing variant is named


def test_readme_section_replaced_between_markers_only(report, tmp_path):
    readme = tmp_path / "README.md"
    before = "# t\n\n## Results\n\nLEAD'S TEXT\n\n## Layout\n\nrest\n"
    readme.write_text(before)
    s6.update_readme(report, readme)
    once = readme.read_text()
    assert once.startswith("# t\n\n## Results\n\nLEAD'S TEXT\n\n" + s6.README_BEGIN)
    assert once.endswith(s6.README_END + "\n\n## Layout\n\nrest\n")
    report["results"][0]["val_ppl"] = 299.0
    s6.update_readme(report, readme)
    twice = readme.read_text()
    outside = lambda t: t.split(s6.README_BEGIN)[0] + t.split(s6.README_END)[1]  # noqa: E731
    assert outside(twice) == outside(once) and twice != once
