"""resnet_bk.host_sync: the check the benchmark runner makes before capturing a forward in a CUDA
graph. The detector flags value reads, data-dependent shapes and tensors built from Python data, and
nothing else; every config's evaluation forward on its static path (capacity where the config has
one) makes none, so each can be captured; the exact paths that do read back are named."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from fit_args import tiny_fit_args

from resnet_bk.host_sync import host_syncs

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize(
    "op, expected",
    [
        (lambda x: x.sum().item(), "_local_scalar_dense"),
        (lambda x: int(x.argmax()), "_local_scalar_dense"),
        (lambda x: x.nonzero(), "nonzero"),
        (lambda x: x[x > 0], "index"),
        (lambda x: torch.tensor(2.0, device=x.device) * x, "torch.tensor"),
        (lambda x: x.repeat_interleave(torch.ones(3, dtype=torch.long)), "repeat_interleave"),
    ],
)
def test_each_kind_of_host_sync_is_named(op, expected):
    x = torch.randn(3)
    found = host_syncs(lambda: op(x))
    assert len(found) == 1 and found[0].startswith(expected), found


def test_device_side_work_is_not_flagged():
    x = torch.randn(4, 5)
    idx = torch.tensor([0, 2])  # built outside the forward

    def forward():
        y = torch.where(x > 0, x, torch.zeros_like(x)).cumsum(1)
        y = y.index_select(0, idx) + x[idx] + torch.full((), 3.0) + 5 / x.abs().sum().clamp_min(1)
        return y.topk(2).values, x.masked_fill(x < 0, 0), x.nonzero_static(size=20)

    assert host_syncs(forward) == []


def _network(config: str, capacity: str | None):
    from resnet_bk.cli import build

    extra = ["--model.init_args.network.init_args.capacity", capacity] if capacity else []
    with tempfile.TemporaryDirectory() as root:
        cli = build(
            ["--config", str(CONFIGS / config), *tiny_fit_args(seq_len=16, d_model=16)]
            + ["--trainer.default_root_dir", root, *extra]
        )
    return cli.model.eval(), cli.datamodule.vocab_size


STATIC = [
    ("resnet_bk.yaml", None),
    ("resnet_bk_seed.yaml", None),
    ("transformer.yaml", None),
    ("multiscale.yaml", None),
    ("multiscale_hierarchical.yaml", None),
    ("conditional_moe.yaml", None),
    ("act.yaml", "1.0"),
    ("act_multiscale.yaml", "0.5"),
    ("early_exit.yaml", "0.5"),
    ("early_exit.yaml", None),  # exact early exit trains and evaluates without reading back (masked)
    ("sparse_bk.yaml", "0.6"),
    ("multiscale_sparse.yaml", "0.6"),
    ("adaptive_length.yaml", "0.35"),
    ("step6_all.yaml", "1.0"),
]


@pytest.mark.parametrize("config, capacity", STATIC, ids=[f"{c}@{k}" for c, k in STATIC])
def test_static_path_evaluates_without_host_syncs(config, capacity):
    """The evaluation forward (what the runner captures) reads nothing back: with a capacity, the
    Step-6 models' shapes are fixed, and no stat is a tensor built from Python data."""
    lm, vocab = _network(config, capacity)
    x = torch.randint(0, vocab, (2, 16))
    with torch.no_grad():
        assert host_syncs(lambda: lm(x)) == []


@pytest.mark.parametrize(
    "config", ["act.yaml", "sparse_bk.yaml", "adaptive_length.yaml", "step6_all.yaml"], ids=lambda c: c
)
def test_exact_paths_are_named_as_host_syncs(config):
    """Without a capacity these gather exactly what runs (a count read back, a data-dependent
    shape): the runner times them eagerly and says so, instead of trying a capture."""
    lm, vocab = _network(config, None)
    x = torch.randint(0, vocab, (2, 16))
    with torch.no_grad():
        found = host_syncs(lambda: lm(x))
    assert found and all("reads a value back" in f for f in found), found
