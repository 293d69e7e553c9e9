"""Step6AllLM (resnet_bk.models.step6_all_lm): every Step-6 technique in one model.

Causality in train and eval mode (and with exits) for the full model and with each technique
switched off in turn; shapes; a gradient for every parameter; the depth rule of ACT + early exit;
each switch-off reducing to the single-technique model of the same weights; the static-shape path
(capacity: 1.0 equals the exact path, causality with overflow, one compiled graph, the refusals);
configs/step6_all.yaml fitting through the CLI."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fit_args import tiny_fit_args

from resnet_bk.layers.early_exit import confidence
from resnet_bk.models.act_multiscale_lm import ACTMultiScaleLM
from resnet_bk.models.adaptive_length_lm import AdaptiveLengthLM
from resnet_bk.models.conditional_moe_lm import ConditionalMoELM
from resnet_bk.models.config import BKConfig
from resnet_bk.models.early_exit_lm import EarlyExitLM
from resnet_bk.models.multiscale_lm import MultiScaleLM
from resnet_bk.models.resnet_bk_lm import ResNetBKLM
from resnet_bk.models.sparse_lm import MultiScaleSparseLM
from resnet_bk.models.step6_all_lm import Step6AllLM

V, D, N = 40, 16, 20
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "step6_all.yaml"
SWITCHES = ("multiscale", "act", "sparsity", "adaptive_length", "early_exit", "conditional_moe")
LENGTH = {"prior_rate": 0.25, "rate_target": 0.25}  # as the config


def tiny(n_layers: int = 6, dropout: float = 0.0, num_experts: int = 2) -> BKConfig:
    return BKConfig(d_model=D, n_layers=n_layers, num_experts=num_experts, max_seq_len=32, dropout=dropout)


def full(dropout: float = 0.0, off: str | None = None, **kw) -> Step6AllLM:
    """Every technique on (n_layers 6: 1 pre, 1 inner, 2 multi-scale blocks), or all but `off`."""
    switches = {name: name != off for name in SWITCHES}
    n_layers = 4 if off == "adaptive_length" else 6
    return Step6AllLM(V, tiny(n_layers, dropout), **switches, **LENGTH, halt_bias_init=0.0, **kw).double()


def only(*on: str, n_layers: int = 4, dropout: float = 0.0, num_experts: int = 2, **kw) -> Step6AllLM:
    switches = {name: name in on for name in SWITCHES}
    return Step6AllLM(V, tiny(n_layers, dropout, num_experts), **switches, **kw).double()


def _perturb(x: torch.Tensor, t: int) -> torch.Tensor:
    y = x.clone()
    y[:, t] = (y[:, t] + 1 + torch.arange(len(y))) % V  # a different token at t in every row
    return y


def _decisive(model: Step6AllLM) -> Step6AllLM:
    """Larger random weights: keep, halt, exit, route and boundary decisions flip with a token."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return model


def _median_exit_threshold(model: Step6AllLM, x: torch.Tensor, q: float = 0.5) -> float:
    """A threshold at which about a fraction 1 - q of the positions exit after the first step."""
    with torch.no_grad():
        e_1 = model(x, exits=False).layer_hidden[0]
        return float(confidence(model.head(e_1)).quantile(q))


def _logits(model, ids, **kw):
    torch.manual_seed(123)
    return model(ids, **kw).logits


def _assert_causal(model, x, **kw):
    with torch.no_grad():
        base = _logits(model, x, **kw)
        for t in (1, 9, N - 1):
            moved = _logits(model, _perturb(x, t), **kw)
            torch.testing.assert_close(moved[:, :t], base[:, :t], atol=1e-12, rtol=0, msg=f"token {t} moved earlier")
            assert (moved[:, t] - base[:, t]).abs().max() > 1e-9


# ------------------------------------------------------------------------------------ causality
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("off", [None, *SWITCHES], ids=lambda o: "all_on" if o is None else f"no_{o}")
def test_causal(off, train):
    torch.manual_seed(0)
    model = _decisive(full(dropout=0.1, off=off)).train(train)
    x = torch.randint(0, V, (2, N), generator=torch.Generator().manual_seed(0))
    if train:  # dropout is on: another seed moves the logits
        with torch.no_grad():
            torch.manual_seed(124)
            assert (model(x).logits - _logits(model, x)).abs().max() > 1e-6
    _assert_causal(model, x)


@pytest.mark.parametrize("off", [None, "act", "sparsity", "multiscale"], ids=lambda o: f"no_{o}" if o else "all_on")
def test_causal_with_exits(off):
    torch.manual_seed(0)
    model = _decisive(full(off=off)).eval()
    x = torch.randint(0, V, (2, N), generator=torch.Generator().manual_seed(0))
    model.set_exit_threshold(_median_exit_threshold(model, x))
    with torch.no_grad():
        assert 0 < float(model(x).stats["exit_frac"]) < 1  # some positions exit by confidence, some run on
    _assert_causal(model, x)


# ------------------------------------------------------------------------------ shapes, gradients
@pytest.mark.parametrize("n", [1, 5, N])
def test_shapes_and_stats(n):
    model = full().train()
    out = model(torch.randint(0, V, (2, n)))
    assert out.logits.shape == (2, n, V) and torch.isfinite(out.logits).all()
    want_aux = {"load_balance", "ponder", "sparsity", "boundary_prior", "rate_constraint", "compute"}
    assert set(out.aux_losses) == want_aux
    for key in ("layers_executed", "sparsity", "exit_layer_mean", "compression_ratio", "experts_per_token",
                "ffn_rows_fraction", "ffn_rows/res2", "thresholded_rate"):  # fmt: skip
        assert key in out.stats, key
    assert len(out.layer_hidden) == len(model.blocks) - 1
    assert all(h.shape == (2, n, D) for h in out.layer_hidden)


def test_every_parameter_gets_a_gradient():
    model = _decisive(full(dropout=0.1)).train()
    x = torch.randint(0, V, (8, 33), generator=torch.Generator().manual_seed(0))
    out = model(x[:, :-1])
    exit_ce = sum(F.cross_entropy(model.head(h).flatten(0, 1), x[:, 1:].flatten()) for h in out.layer_hidden)
    loss = F.cross_entropy(out.logits.flatten(0, 1), x[:, 1:].flatten()) + exit_ce + sum(out.aux_losses.values())
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


# ------------------------------------------------------------------------------------ depth rule
def test_exits_halt_as_act_with_the_remainder_on_the_current_state():
    """With exits, a position that leaves at step l outputs head(e_l), e_l = ACT's output with the
    remainder on s_l; at threshold 0 everyone leaves after step 1, at a threshold no one reaches the
    output is the ACT model's."""
    torch.manual_seed(0)
    model = _decisive(full()).eval()
    x = torch.randint(0, V, (2, N))
    with torch.no_grad():
        ref = model(x, exits=False)
        model.set_exit_threshold(0.0)
        first = model(x)
        torch.testing.assert_close(first.logits, model.head(ref.layer_hidden[0]), atol=1e-12, rtol=0)
        assert float(first.stats["exit_layer_mean"]) == 1.0 and first.layer_hidden == []
        model.set_exit_threshold(1.5)  # confidence <= 1: no exit
        torch.testing.assert_close(model(x).logits, ref.logits, atol=1e-12, rtol=0)
        assert float(model(x).stats["exit_frac"]) == 0.0


def test_exits_skip_feed_forward_rows():
    model = full(off="sparsity").eval()  # without sparsity, a halted position's rows are not run
    x = torch.randint(0, V, (2, N))
    with torch.no_grad():
        all_rows = float(model(x, exits=False).stats["ffn_rows_fraction"])
        model.set_exit_threshold(0.0)
        exit_rows = float(model(x).stats["ffn_rows_fraction"])
    assert exit_rows < all_rows <= 1.0


# ------------------------------------------------------------------------------------ reductions
def _same(ours: torch.nn.Module, theirs: torch.nn.Module, rename: dict[str, str] | None = None, **kw):
    """Load `theirs`' weights (made decisive) into `ours` and compare logits (and aux losses) in train
    and eval mode."""
    state = _decisive(theirs).state_dict()
    for old, new in (rename or {}).items():
        state = {k.replace(old, new, 1) if k.startswith(old) else k: v for k, v in state.items()}
    ours.load_state_dict(state)
    x = torch.randint(0, V, (2, N), generator=torch.Generator().manual_seed(0))
    for train in (True, False):
        ours.train(train), theirs.train(train)
        with torch.no_grad():
            torch.manual_seed(5)
            a = ours(x, **kw)
            torch.manual_seed(5)
            b = theirs(x, **kw)
        torch.testing.assert_close(a.logits, b.logits, atol=1e-12, rtol=0)
        assert set(a.aux_losses) == set(b.aux_losses)
        for k in b.aux_losses:
            torch.testing.assert_close(a.aux_losses[k], b.aux_losses[k], atol=1e-12, rtol=0)
    return a, b


def _theirs(cls, n_layers=4, dropout=0.1, num_experts=2, **kw):
    torch.manual_seed(1)
    return cls(V, tiny(n_layers, dropout, num_experts), **kw).double()


def test_multiscale_only_is_multiscale_lm():
    _same(only("multiscale", dropout=0.1), _theirs(MultiScaleLM))


def test_everything_off_is_resnet_bk_lm():
    _same(only(dropout=0.1), _theirs(ResNetBKLM))


def test_act_and_multiscale_is_act_multiscale_lm():
    ours = only("multiscale", "act", n_layers=6, dropout=0.1)
    a, b = _same(ours, _theirs(ACTMultiScaleLM, n_layers=6))
    assert a.stats["layers_executed"] == b.stats["layers_executed"]
    assert 1 < float(a.stats["layers_executed"]) < 3  # halting differs between positions


def test_sparsity_and_multiscale_is_multiscale_sparse_lm():
    a, b = _same(only("multiscale", "sparsity", dropout=0.1), _theirs(MultiScaleSparseLM))
    assert a.stats["sparsity"] == b.stats["sparsity"] and 0 < float(a.stats["sparsity"]) < 1


def test_conditional_moe_only_is_conditional_moe_lm():
    kw = dict(num_experts=3, top_p=0.5, max_experts=2)
    a, b = _same(only("conditional_moe", dropout=0.1, **kw), _theirs(ConditionalMoELM, **kw))
    assert a.stats["experts_per_token"] == b.stats["experts_per_token"]
    assert 1 < float(a.stats["experts_per_token"]) < 2


def test_learned_length_only_is_adaptive_length_lm():
    """AdaptiveLengthLM's post blocks are the stack here."""
    kw = dict(n_pre=1, length_multiple=2, **LENGTH)
    ours = only("adaptive_length", dropout=0.1, n_inner=2, **kw)
    a, b = _same(ours, _theirs(AdaptiveLengthLM, n_post=1, **kw), rename={"post_blocks.": "blocks."})
    assert a.stats["compression_ratio"] == b.stats["compression_ratio"] and float(a.stats["compression_ratio"]) > 1


def test_early_exit_only_without_exits_is_early_exit_lm():
    """All layers (no threshold): the same logits and intermediate states. With exits the two differ
    in what an exited position feeds the later chains (docs/step6_all_model.md)."""
    a, b = _same(only("early_exit", n_layers=3, dropout=0.1), _theirs(EarlyExitLM, n_layers=3))
    assert len(a.layer_hidden) == len(b.layer_hidden) == 2
    for h, g in zip(a.layer_hidden, b.layer_hidden):
        torch.testing.assert_close(h, g, atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_pre": 3, "n_inner": 3}, r"Step6AllLM: learned length needs .* at least one residual block left"),
        ({"n_pre": 1, "n_inner": 2}, r"Step6AllLM: the stack's residual blocks .* = 3\) must be a multiple of 2"),
        ({"hierarchical": True}, r"Step6AllLM: sparse multi-scale blocks are simple"),
        ({"min_exit_layer": 2}, r"Step6AllLM: min_exit_layer must be in 1..1"),
    ],
)
def test_bad_arguments_are_one_line_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Step6AllLM(V, tiny(6), **kwargs)


def test_threshold_needs_early_exit():
    model = only("multiscale")
    assert model.get_exit_threshold() is None
    with pytest.raises(ValueError, match="early exit is off"):
        model.set_exit_threshold(0.5)


# ------------------------------------------------------------------------------------------- fit
def test_config_fits_through_the_cli():
    from lightning_modules.early_exit import EarlyExitLanguageModel
    from resnet_bk.cli import build

    with tempfile.TemporaryDirectory() as root:
        cli = build(["--config", str(CONFIG), *tiny_fit_args(seq_len=16, d_model=D), "--trainer.default_root_dir",
                     root, "--trainer.callbacks+=callbacks.SparsityTemperature"])  # fmt: skip
        assert isinstance(cli.model, EarlyExitLanguageModel) and isinstance(cli.model.model, Step6AllLM)
        cli.trainer.fit(cli.model, cli.datamodule)
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == 2 and torch.isfinite(metrics["val/ppl"])
    for key in ("train/aux/ponder", "train/aux/sparsity", "train/aux/rate_constraint", "train/aux/compute",
                "train/aux/exit_ce", "train/tau", "val/stats/layers_executed", "val/stats/exit_layer_mean",
                "val/stats/sparsity", "val/stats/compression_ratio", "val/stats/experts_per_token",
                "val/ppl_all_layers", "val/exit/threshold"):  # fmt: skip
        assert key in metrics, key


def test_config_fits_with_early_exit_off():
    """The config's switches work from the command line: early exit off (the training module then
    adds no exit loss and no second full-depth evaluation), learned length and conditional MoE on."""
    from resnet_bk.cli import build

    off = [f"--model.init_args.network.init_args.{s}=false" for s in ("multiscale", "act", "sparsity", "early_exit")]
    with tempfile.TemporaryDirectory() as root:
        cli = build(["--config", str(CONFIG), *tiny_fit_args(seq_len=16, d_model=D), "--trainer.default_root_dir",
                     root, *off, "--model.init_args.network.init_args.capacity=0.5"])  # fmt: skip
        cli.trainer.fit(cli.model, cli.datamodule)
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == 2 and torch.isfinite(metrics["val/ppl"])
    assert "val/stats/compression_ratio" in metrics and "val/stats/experts_per_token" in metrics
    assert "train/aux/exit_ce" not in metrics and "val/ppl_all_layers" not in metrics


# ------------------------------------------------------------------ static shapes (capacity)
STATIC = {  # switch combinations allowed with a capacity, and their config.n_layers (3 steps each)
    "multiscale_act": (("multiscale", "act"), 6),
    "act_early_exit": (("act", "early_exit"), 3),
    "multiscale_act_sparsity_early_exit": (("multiscale", "act", "sparsity", "early_exit"), 6),
    "all_but_length": (tuple(s for s in SWITCHES if s != "adaptive_length"), 6),
}


def _static_pair(name: str, capacity: float, dropout: float = 0.0, halt_bias_init: float = 0.0):
    """(exact model, the same weights with `capacity`), decisive weights, float64."""
    on, n_layers = STATIC[name]
    models = []
    for cap in (None, capacity):
        torch.manual_seed(1)
        models.append(only(*on, n_layers=n_layers, dropout=dropout, halt_bias_init=halt_bias_init, capacity=cap))
    exact, static = models
    static.load_state_dict(_decisive(exact).state_dict())
    return exact, static


def _pass(model, x, seed=5):
    """Forward + backward (logits and aux losses); (output, {parameter: gradient})."""
    model.zero_grad()
    torch.manual_seed(seed)
    out = model(x)
    (out.logits.square().mean() + sum(out.aux_losses.values())).backward()
    return out, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["train", "eval_exits"])
@pytest.mark.parametrize("name", list(STATIC))
def test_full_capacity_equals_the_exact_path(name, mode):
    """capacity 1.0: the logits, aux losses and gradients of capacity None (train mode; eval with exits)."""
    exact, static = _static_pair(name, 1.0)
    x = torch.randint(0, V, (2, N), generator=torch.Generator().manual_seed(0))
    exits = mode == "eval_exits" and exact.early_exit
    for model in (exact, static):
        model.train(mode == "train")
        if exits:
            model.set_exit_threshold(_median_exit_threshold(exact, x))
    (a, ga), (b, gb) = _pass(exact, x), _pass(static, x)
    torch.testing.assert_close(b.logits, a.logits, atol=1e-10, rtol=0)
    assert set(b.aux_losses) == set(a.aux_losses)
    for k in a.aux_losses:  # conditional MoE: float32 router statistics, summed over other row counts
        atol = 1e-10 if a.aux_losses[k].dtype == torch.float64 else 1e-6
        torch.testing.assert_close(b.aux_losses[k].to(a.aux_losses[k].dtype), a.aux_losses[k], atol=atol, rtol=0, msg=k)
    assert set(gb) == set(ga)
    for k in ga:
        atol = 1e-6 if exact.conditional_moe else 1e-10  # the float32 router statistics' gradients
        torch.testing.assert_close(gb[k], ga[k], atol=atol, rtol=1e-8 if atol < 1e-6 else 1e-5, msg=k)
    assert float(b.stats["capacity_overflow"]) == 0.0
    for k in ("layers_executed", "exit_layer_mean", "exit_frac", "experts_per_token", "sparsity"):
        if k in a.stats:
            torch.testing.assert_close(torch.as_tensor(b.stats[k]).double(), torch.as_tensor(a.stats[k]).double())
    if exits:
        assert 0 < float(a.stats["exit_frac"]) < 1
    if "act" in STATIC[name][0]:
        assert 1 < float(a.stats["layers_executed"]) < len(exact.blocks)  # positions halt at different steps


@pytest.mark.parametrize("mode", ["train", "eval_exits"])
@pytest.mark.parametrize("name", list(STATIC))
def test_causal_with_capacity_overflow(name, mode):
    """capacity 0.5 with overflowing rows: causal in train mode (dropout) and in eval mode with exits."""
    _, model = _static_pair(name, 0.5, dropout=0.1 if mode == "train" else 0.0, halt_bias_init=-2.0)
    x = torch.randint(0, V, (2, N), generator=torch.Generator().manual_seed(0))
    model.train(mode == "train")
    if mode == "eval_exits" and model.early_exit:
        model.set_exit_threshold(_median_exit_threshold(model, x, q=0.8))  # most run on: overflow
    with torch.no_grad():
        torch.manual_seed(123)
        stats = model(x).stats
    assert float(stats["capacity_overflow"]) > 0
    if "sparsity" in STATIC[name][0]:
        assert "sparse_capacity_overflow" in stats
    _assert_causal(model, x)


def test_capacity_gradient_reaches_the_halting_units():
    _, model = _static_pair("all_but_length", 0.5, halt_bias_init=-2.0)
    model.train()
    x = torch.randint(0, V, (2, N), generator=torch.Generator().manual_seed(0))
    out = model(x[:, :-1])
    assert float(out.stats["capacity_overflow"]) > 0
    exit_ce = sum(F.cross_entropy(model.head(h).flatten(0, 1), x[:, 1:].flatten()) for h in out.layer_hidden)
    loss = F.cross_entropy(out.logits.flatten(0, 1), x[:, 1:].flatten()) + exit_ce + sum(out.aux_losses.values())
    loss.backward()
    assert all(unit.proj.weight.grad.abs().sum() > 0 for unit in model.act.halting)


@pytest.mark.slow  # about 40 s on CPU
def test_capacity_compiles_in_one_graph():
    """fullgraph=True, dynamic=False: a training step (forward + backward) and an evaluation with exits,
    bf16 autocast as on the GPU (the MoE's grouped product is compile-able in bf16)."""
    torch.manual_seed(0)
    on, n_layers = STATIC["all_but_length"]
    model = Step6AllLM(V, tiny(n_layers), **{s: s in on for s in SWITCHES}, halt_bias_init=-1.0, capacity=0.5)
    x = torch.randint(0, V, (2, 16))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=False, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.train()
        out = compiled(x)
        (out.logits.float().square().mean() + sum(out.aux_losses.values())).backward()
        assert "capacity_overflow" in out.stats
        model.eval()
        model.set_exit_threshold(0.5)
        with torch.no_grad():
            out = compiled(x)
    assert out.logits.shape == (2, 16, V) and torch.isfinite(out.logits.float()).all()


def test_capacity_is_checked():
    with pytest.raises(ValueError, match=r"Step6AllLM: capacity must be None .* in \(0, 1\]"):
        Step6AllLM(V, tiny(6), adaptive_length=False, capacity=1.5)


@pytest.mark.parametrize("mode", ["train", "eval_exits"])
def test_every_technique_with_capacity(mode):
    """Learned length on too (8 layers: 1 pre, 1 inner, 3 multi-scale blocks): capacity 1.0 gives the
    exact path's logits (the inner blocks' MoE statistics count more padding segments, so the aux
    losses may differ); capacity 0.25 overflows the segment slots and the step loop, and stays causal."""
    x = torch.randint(0, V, (2, N), generator=torch.Generator().manual_seed(0))
    models = []
    for cap in (None, 1.0, 0.25):
        torch.manual_seed(1)
        models.append(
            Step6AllLM(
                V, tiny(8, 0.1 if mode == "train" else 0.0), **LENGTH, halt_bias_init=-2.0, capacity=cap
            ).double()
        )
    exact, static, small = models
    _decisive(exact)
    for model in (static, small):
        model.load_state_dict(exact.state_dict())
    for model in models:
        model.train(mode == "train")
        model.boundary.mlp[-1].bias.data.fill_(3.0)  # most positions close a segment: more than 5 a row
        if mode == "eval_exits":
            model.set_exit_threshold(_median_exit_threshold(exact, x, q=0.8))
    outs = []
    with torch.no_grad():
        for model in models:
            torch.manual_seed(123)
            outs.append(model(x))
    torch.testing.assert_close(outs[1].logits, outs[0].logits, atol=1e-10, rtol=0)
    assert float(outs[1].stats["length_capacity_overflow"]) == 0.0
    assert float(outs[2].stats["length_capacity_overflow"]) > 0 and float(outs[2].stats["capacity_overflow"]) > 0
    _assert_causal(small, x)
