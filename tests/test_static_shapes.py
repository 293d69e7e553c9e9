"""Static-shape skipping (`capacity`) for ACT (resnet_bk.layers.act), ACT over multi-scale and early
exit (resnet_bk.models.early_exit_lm): capacity 1.0 equals the exact gather (values and gradients,
train and eval); the capacity path compiles with fullgraph=True (network and the configs' whole loss
computation) where the exact path breaks the graph; causality with overflowing rows in train
(dropout) and eval mode; the overflow rule and its count; the MoE's padding rows; the executed-depth
histogram in the validation logs."""

from __future__ import annotations

import math
import tempfile
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fit_args import tiny_fit_args

from resnet_bk.layers.act import capacity_rows, scatter_rows
from resnet_bk.layers.conditional_moe import ConditionalMoEFeedForward
from resnet_bk.layers.early_exit import confidence
from resnet_bk.layers.moe import MoEFeedForward
from resnet_bk.models.act_lm import ACTResNetBKLM
from resnet_bk.models.act_multiscale_lm import ACTMultiScaleLM
from resnet_bk.models.config import BKConfig
from resnet_bk.models.early_exit_lm import EarlyExitLM

V, D = 40, 16
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _config(n_layers: int, num_experts: int = 2, dropout: float = 0.0) -> BKConfig:
    return BKConfig(d_model=D, n_layers=n_layers, num_experts=num_experts, max_seq_len=64, dropout=dropout)


def _mixed_halting(model, scale: float = 2.0):
    """Halting units with large random weights, so positions halt at different steps."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for unit in model.act.halting:
            unit.proj.weight.copy_(torch.randn(unit.proj.weight.shape, generator=g) * scale)
            unit.proj.bias.fill_(0.0)
    return model


def _never_halting(model):
    with torch.no_grad():
        for unit in model.act.halting:
            unit.proj.bias.fill_(-30.0)  # p ~ 1e-13: every position wants every step
    return model


def _sharp_exits(model):
    """A larger embedding scale spreads the confidences, so that positions exit after different layers."""
    with torch.no_grad():
        model.tok_emb.weight.mul_(50)
    return model


ACT_MODELS = {
    "act": lambda cap, **kw: ACTResNetBKLM(V, _config(4, **kw), capacity=cap),
    "act_multiscale": lambda cap, **kw: ACTMultiScaleLM(V, _config(6, **kw), capacity=cap),
    "act_hierarchical_mlp": lambda cap, **kw: ACTMultiScaleLM(
        V, _config(8, **kw), hierarchical=True, refine="mlp", capacity=cap
    ),
}


def _exit_model(capacity, min_exit_layer: int = 1, **kw) -> EarlyExitLM:
    return EarlyExitLM(V, _config(3, **kw), min_exit_layer=min_exit_layer, capacity=capacity)


def _run(model, x, seed: int = 7, **kw):
    """Forward + backward of logits and aux losses; (output, {parameter: gradient})."""
    model.zero_grad()
    torch.manual_seed(seed)
    out = model(x, **kw)
    (out.logits.square().mean() + sum(out.aux_losses.values())).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _assert_same(exact, static, grads_exact, grads_static, keys):
    torch.testing.assert_close(static.logits, exact.logits, atol=1e-12, rtol=1e-10)
    assert set(static.aux_losses) == set(exact.aux_losses)
    for k in exact.aux_losses:
        torch.testing.assert_close(static.aux_losses[k], exact.aux_losses[k], atol=1e-12, rtol=1e-10)
    for k in keys:
        torch.testing.assert_close(torch.as_tensor(static.stats[k]).double(), torch.as_tensor(exact.stats[k]).double())
    assert set(grads_static) == set(grads_exact)
    for k in grads_exact:
        torch.testing.assert_close(grads_static[k], grads_exact[k], atol=1e-12, rtol=1e-9, msg=k)


# ------------------------------------------------------------------------------ building blocks
def test_capacity_rows_take_each_rows_first_slots():
    mask = torch.tensor([[True, False, True, True, True], [False, False, False, False, True], [False] * 5])
    index, valid, within = capacity_rows(mask, 2)
    assert index.tolist() == [0, 2, 9, 5, 10, 10]  # padding: its row's position 0 (row 1 has one, row 2 none)
    assert valid.tolist() == [True, True, True, False, False, False]
    assert within.tolist() == [[True, False, True, False, False], [False, False, False, False, True], [False] * 5]
    rows = torch.arange(6.0)[:, None] + 1  # slot s of the flat layout holds s + 1
    out = scatter_rows(rows, within, torch.zeros(3, 5, 1))[..., 0]
    assert out.tolist() == [[1, 0, 2, 0, 0], [0, 0, 0, 0, 3], [0] * 5]


MOES = {
    "top1": lambda: MoEFeedForward(D, 2 * D, num_experts=3, top_k=1),
    "top2": lambda: MoEFeedForward(D, 2 * D, num_experts=3, top_k=2),
    "conditional": lambda: ConditionalMoEFeedForward(D, 2 * D, num_experts=3, top_p=0.6),
}


@pytest.mark.parametrize("kind", list(MOES))
def test_moe_leaves_padding_rows_out(kind):
    """Padding rows (valid False) give 0 and change neither the real rows' outputs nor the aux losses
    (load balance; conditional: compute), the stats or any gradient: those of the real rows alone."""
    torch.manual_seed(0)
    moe = MOES[kind]().double()
    x = torch.randn(10, D, dtype=torch.float64)
    valid = torch.tensor([True, False, True, True, False, False, True, True, False, True])
    results = []
    for rows, mask in ((x[valid], None), (x, valid)):
        moe.zero_grad()
        out, aux, stats = moe(rows, None, mask) if mask is not None else moe(rows)
        real = out if mask is None else out[valid]
        (real.square().sum() + sum(aux.values())).backward()
        results.append((out, aux, stats, [p.grad.clone() for p in moe.parameters()], moe.last_rows_per_expert))
    (o1, a1, s1, g1, r1), (o2, a2, s2, g2, r2) = results
    torch.testing.assert_close(o2[valid], o1)
    assert (o2[~valid] == 0).all()
    assert set(a2) == set(a1) and set(s2) == set(s1)
    for k in a1:
        torch.testing.assert_close(a2[k], a1[k])
    for k in s1:
        torch.testing.assert_close(s2[k], s1[k])
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b)
    assert torch.equal(r2, r1)
    if kind != "conditional":
        assert int(r2.sum()) == int(valid.sum()) * moe.top_k


# ----------------------------------------------------------- (a) capacity 1.0 = the exact path
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", list(ACT_MODELS))
def test_act_full_capacity_equals_the_exact_gather(name, train):
    torch.manual_seed(0)
    model = _mixed_halting(ACT_MODELS[name](None, dropout=0.1)).double().train(train)
    x = torch.randint(0, V, (3, 18))
    exact, g_exact = _run(model, x)
    model.act.capacity = 1.0
    static, g_static = _run(model, x)
    n_steps = model.act.n_steps
    depth = [f"halt_frac/{l}" for l in range(1, n_steps + 1)]
    assert sum(float(exact.stats[k]) > 0 for k in depth) >= 2  # mixed halting: the gathers are exercised
    _assert_same(exact, static, g_exact, g_static, ["layers_executed", "g_abs_mean", "expert_load_max", *depth])
    assert float(static.stats["capacity_overflow"]) == 0.0 and static.stats["layers_run"] == n_steps


@pytest.mark.parametrize("min_exit_layer", [1, 2])
def test_early_exit_full_capacity_equals_the_exact_gather(min_exit_layer):
    """The exit path (eval, with gradients too) at capacity 1.0: the exact path's logits, exit layers,
    aux losses, expert loads and gradients."""
    torch.manual_seed(0)
    model = _sharp_exits(_exit_model(None, min_exit_layer)).double().eval()
    x = torch.randint(0, V, (3, 20))
    with torch.no_grad():
        hidden = model(x, exits=False).layer_hidden[min_exit_layer - 1]
        model.set_exit_threshold(float(confidence(model.head(hidden)).median()))
    exact, g_exact = _run(model, x)
    model.capacity = 1.0
    static, g_static = _run(model, x)
    assert 1.0 < float(exact.stats["exit_layer_mean"]) < 3.0  # some positions exit, some run on
    _assert_same(exact, static, g_exact, g_static, ["exit_layer_mean", "expert_load_max"])
    assert float(static.stats["capacity_overflow"]) == 0.0
    assert model.last_ffn_rows == [60] * 3  # static: every layer runs B * N slots at capacity 1.0


def test_early_exit_training_ignores_capacity():
    """Training runs every layer on every position (no exits): capacity changes nothing there."""
    torch.manual_seed(0)
    model = _exit_model(None, dropout=0.1).double().train()
    x = torch.randint(0, V, (2, 11))
    exact, g_exact = _run(model, x)
    model.capacity = 0.3
    static, g_static = _run(model, x)
    _assert_same(exact, static, g_exact, g_static, ["exit_layer_mean"])


# --------------------------------------------------------------- (b) one graph, no host sync
def _compile_loss(lm):
    """The LanguageModel's loss computation compiled as compile: true does on CUDA (fullgraph, static
    shapes), with the eager-backend stand-in for inductor (whose CPU code generation needs a compiler)."""
    lm._loss_terms_fn = torch.compile(lm._loss_terms, fullgraph=True, dynamic=False, backend="aot_eager")


@pytest.mark.parametrize("config", ["act.yaml", "act_multiscale.yaml", "early_exit.yaml"])
def test_config_loss_compiles_in_one_graph_with_capacity(config):
    """Each config's whole loss computation (network, cross-entropy, aux losses, stats) compiles with
    fullgraph=True at a capacity that overflows: a training step (forward + backward) and an
    evaluation (early exit: with exits). bf16 autocast, as on the GPU (the MoE's grouped product is
    compile-able in bf16). With capacity None the same compilation fails (host reads, data-dependent
    shapes)."""
    from resnet_bk.cli import build

    layers = {"act.yaml": 2, "act_multiscale.yaml": 4, "early_exit.yaml": 2}[config]
    args = tiny_fit_args(seq_len=12, d_model=16, n_layers=layers)
    with tempfile.TemporaryDirectory() as root:
        cli = build(
            ["--config", str(CONFIGS / config), *args, "--trainer.default_root_dir", root]
            + ["--model.init_args.network.init_args.capacity", "0.5", "--model.init_args.compile", "true"]
        )
    lm, vocab = cli.model, cli.datamodule.vocab_size
    assert lm.compile_mode == "default"  # compile: true (applied on CUDA)
    holder = lm.model.act if hasattr(lm.model, "act") else lm.model  # where the capacity lives
    if hasattr(lm.model, "act"):
        _mixed_halting(lm.model)
    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(0, vocab, (2, 12)), "targets": torch.randint(0, vocab, (2, 12))}
    results = {}
    for capacity in (0.5, None):
        holder.capacity = capacity
        torch._dynamo.reset()
        _compile_loss(lm)
        if config == "early_exit.yaml":
            lm.model.set_exit_threshold(0.0)  # the first exit test lets everyone go ...
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                lm.train()
                lm.compute_loss(batch, "train").loss.backward()
                lm.eval()
                with torch.no_grad():
                    results[capacity] = lm.compute_loss(batch, "val").logs
                    if config == "early_exit.yaml":
                        lm.model.set_exit_threshold(0.5)  # ... another: a tensor input, the same graph
                        with torch._dynamo.config.patch(error_on_recompile=True):
                            lm.compute_loss(batch, "val")
        except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError):  # a data-dependent shape or value read
            results[capacity] = None
    assert results[0.5] is not None, "the capacity path must compile in one graph"
    assert results[None] is None, "the exact gather was expected to break the graph"
    assert "stats/capacity_overflow" in results[0.5]


# ------------------------------------------------------------------------- (c) causality
def _assert_causal(model, x, positions, **kw):
    """Change token t: no logit before t moves (float64, atol 1e-12); the RNG is re-seeded before
    each pass, so dropout draws the same masks wherever they do not depend on the tokens."""

    def logits(ids):
        torch.manual_seed(123)
        return model(ids, **kw).logits

    with torch.no_grad():
        base = logits(x)
        for t in positions:
            y = x.clone()
            y[:, t] = (y[:, t] + 1 + torch.arange(len(y))) % V
            moved = logits(y)
            torch.testing.assert_close(moved[:, :t], base[:, :t], atol=1e-12, rtol=0)
            assert (moved[:, t] - base[:, t]).abs().max() > 1e-9


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(ACT_MODELS))
def test_act_causality_with_overflow(name, train):
    torch.manual_seed(0)
    model = _mixed_halting(ACT_MODELS[name](0.3, dropout=0.1), scale=0.5).double().train(train)
    x = torch.randint(0, V, (3, 20))
    with torch.no_grad():
        torch.manual_seed(123)
        stats = model(x).stats
    assert float(stats["capacity_overflow"]) > 0  # rows beyond capacity halt early
    _assert_causal(model, x, (0, 5, 11, 19))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_early_exit_causality_with_overflow(train):
    """The exit path with capacity 0.3 (train mode: exits=True with dropout)."""
    torch.manual_seed(0)
    model = _sharp_exits(_exit_model(0.3, dropout=0.1)).double().train(train)
    x = torch.randint(0, V, (3, 20))
    with torch.no_grad():
        model.eval()
        hidden = model(x, exits=False).layer_hidden[0]
        model.set_exit_threshold(float(confidence(model.head(hidden)).quantile(0.3)))
        model.train(train)
        torch.manual_seed(123)
        stats = model(x, exits=True).stats
    assert float(stats["capacity_overflow"]) > 0 and 1.0 < float(stats["exit_layer_mean"]) < 3.0
    _assert_causal(model, x, (0, 5, 11, 19), exits=True)


# --------------------------------------------------------------------- (d) the overflow rule
@pytest.mark.parametrize("name", ["act", "act_multiscale"])
def test_act_overflow_halts_after_the_first_step_and_is_counted(name):
    """No position halts by itself; with capacity c each row's first K = ceil(c N) positions take every
    step and the others halt after step 1 (counted), with the output of the 1-step model."""
    torch.manual_seed(0)
    n, capacity = 10, 0.3
    k = math.ceil(capacity * n)
    model = _never_halting(ACT_MODELS[name](None)).double().eval()
    x = torch.randint(0, V, (2, n))
    rows = []
    for module in model.modules():
        if type(module).__name__ == "MoEFeedForward":
            module.register_forward_hook(lambda m, inp, out: rows.append(inp[0].reshape(-1, D).shape[0]))
    with torch.no_grad():
        full = model(x)  # exact: every position takes every step
        model.act.capacity = capacity
        rows.clear()
        out = model(x)
        static_rows = list(rows)
        model.act.capacity = None
        model.act.halting[0].proj.bias.fill_(30.0)  # the same network, every position halting at step 1
        first = model(x)
    steps = model.act.n_steps
    assert float(out.stats["halt_frac/1"]) == pytest.approx((n - k) / n)
    assert float(out.stats[f"halt_frac/{steps}"]) == pytest.approx(k / n)
    assert float(out.stats["layers_executed"]) == pytest.approx(((n - k) + steps * k) / n)
    wanted = 2 * n + (steps - 2) * 2 * k  # step 2 asks for every position, later steps for the K kept
    assert float(out.stats["capacity_overflow"]) == pytest.approx(2 * (n - k) / wanted)
    torch.testing.assert_close(out.logits[:, :k], full.logits[:, :k], atol=1e-12, rtol=0)
    torch.testing.assert_close(out.logits[:, k:], first.logits[:, k:], atol=1e-12, rtol=0)
    if name == "act":  # B * N rows in step 1, B * K slots in every later step
        assert static_rows == [2 * n] + [2 * k] * (steps - 1)
        assert out.stats["ffn_rows_frac"] == pytest.approx((n + (steps - 1) * k) / (n * steps))


def test_early_exit_overflow_exits_with_its_last_logits_and_is_counted():
    """Nobody exits by confidence; with capacity c each row's first K positions run every layer and
    the others leave after layer 1 with layer 1's logits (counted)."""
    torch.manual_seed(0)
    n, capacity = 10, 0.3
    k = math.ceil(capacity * n)
    model = _exit_model(capacity).double().eval()
    model.set_exit_threshold(2.0)  # above any confidence
    x = torch.randint(0, V, (2, n))
    with torch.no_grad():
        full = model(x, exits=False)
        out = model(x)
    layer1 = model.head(full.layer_hidden[0])
    torch.testing.assert_close(out.logits[:, :k], full.logits[:, :k], atol=1e-12, rtol=0)
    torch.testing.assert_close(out.logits[:, k:], layer1[:, k:], atol=1e-12, rtol=0)
    assert float(out.stats["exit_layer_mean"]) == pytest.approx(((n - k) + 3 * k) / n)
    assert float(out.stats["capacity_overflow"]) == pytest.approx((n - k) / (n + k))  # layer 2: N asked, layer 3: K
    assert model.last_ffn_rows == [2 * n, 2 * k, 2 * k]


# ----------------------------------------------------------------------- depth histogram
def test_validation_logs_the_executed_depth_histogram_with_capacity():
    """val/stats/halt_frac/<l> is the distribution of executed depth over the validation tokens
    (overflow included): it sums to 1 and its mean is val/stats/layers_executed."""
    import lightning as L_

    from lightning_modules import LanguageModel

    torch.manual_seed(0)
    module = LanguageModel(
        network=partial(ACTResNetBKLM, config=_config(3), capacity=0.4),
        vocab_size=V,
        aux_loss_weights={"load_balance": 0.01, "ponder": 0.01},
    )
    _mixed_halting(module.model, scale=0.5)
    batches = [{"input_ids": torch.randint(0, V, (2, 10)), "targets": torch.randint(0, V, (2, 10))} for _ in range(2)]
    trainer = L_.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    metrics = trainer.validate(
        module, dataloaders=torch.utils.data.DataLoader(batches, batch_size=None), verbose=False
    )[0]
    hist = [metrics[f"val/stats/halt_frac/{l}"] for l in (1, 2, 3)]
    assert sum(hist) == pytest.approx(1.0, abs=1e-6)
    assert sum((l + 1) * f for l, f in enumerate(hist)) == pytest.approx(metrics["val/stats/layers_executed"], abs=1e-5)
    assert sum(f > 0 for f in hist) >= 2 and metrics["val/stats/capacity_overflow"] > 0


# ------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5])
def test_bad_capacity_is_a_one_line_error(bad):
    for make in (
        lambda: ACTResNetBKLM(V, _config(2), capacity=bad),
        lambda: ACTMultiScaleLM(V, _config(2), capacity=bad),
        lambda: _exit_model(bad),
    ):
        with pytest.raises(ValueError, match=r"capacity must be None .* in \(0, 1\]"):
            make()


def test_loss_of_capacity_model_reaches_every_halting_unit():
    """Gradients flow to the halting units through the remainder of overflowing positions too."""
    torch.manual_seed(0)
    model = _mixed_halting(ACT_MODELS["act"](0.3), scale=0.5)
    x = torch.randint(0, V, (2, 12))
    out = model(x)
    assert float(out.stats["capacity_overflow"]) > 0
    loss = F.cross_entropy(out.logits.flatten(0, 1), torch.randint(0, V, (24,))) + out.aux_losses["ponder"]
    loss.backward()
    assert all(unit.proj.weight.grad.abs().sum() > 0 for unit in model.act.halting)


def test_act_capacity_list_gives_each_step_its_slots():
    """A capacity list sets each gathered step's slots: [1.0, k/n] runs step 2 on every position and
    step 3 on each row's first k running positions; the others halt after step 2 with its output.
    A wrong length or a value outside (0, 1] is refused in one line."""
    torch.manual_seed(0)
    n, k = 10, 3
    model = _never_halting(ACTResNetBKLM(V, _config(3))).double().eval()
    x = torch.randint(0, V, (2, n))
    rows = []
    for module in model.modules():
        if type(module).__name__ == "MoEFeedForward":
            module.register_forward_hook(lambda m, inp, out: rows.append(inp[0].reshape(-1, D).shape[0]))
    with torch.no_grad():
        full = model(x)
        model.act.capacity = [1.0, k / n]
        rows.clear()
        out = model(x)
    assert rows == [2 * n, 2 * n, 2 * k]
    assert float(out.stats["halt_frac/2"]) == pytest.approx((n - k) / n)
    assert float(out.stats["layers_executed"]) == pytest.approx((2 * (n - k) + 3 * k) / n)
    torch.testing.assert_close(out.logits[:, :k], full.logits[:, :k], atol=1e-12, rtol=0)
    assert not torch.allclose(out.logits[:, k:], full.logits[:, k:])  # the overflowing positions took 2 steps
    _assert_causal(model, x, (0, 4, 9))
    for bad in ([1.0], [1.0, 0.0], [1.0, 1.5]):
        with pytest.raises(ValueError, match="capacity list needs 2 fractions"):
            type(model.act)(D, 3, capacity=bad)
