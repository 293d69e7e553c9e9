"""Learned sequence length: pooling/upsampling by hand, causality (train with fixed noise, eval), the
rate constraint holding the evaluated boundary rate, per-position noise, inner rows counted, aux-loss
gradients to the boundary predictor, config."""

import tempfile

import pytest
import torch
import torch.nn.functional as F
from fit_args import tiny_fit_args

from resnet_bk.layers.adaptive_length import (
    BoundaryPredictor,
    boundary_prior_nll,
    boundary_rate_constraint,
    causal_upsample,
    gumbel_sigmoid,
    segment_pool,
)
from resnet_bk.models.adaptive_length_lm import AdaptiveLengthLM
from resnet_bk.models.config import BKConfig

V, D = 40, 16


def _model(dropout: float = 0.0, **kw):
    config = BKConfig(d_model=D, n_layers=4, num_experts=2, max_seq_len=64, dropout=dropout)  # 1 pre, 2 inner, 1 post
    return AdaptiveLengthLM(V, config, **{"n_pre": 1, "n_post": 1, "init_boundary_rate": 0.5, **kw})


def _perturb(x: torch.Tensor, t: int) -> torch.Tensor:
    y = x.clone()
    y[:, t] = (y[:, t] + 1 + torch.arange(len(y))) % V
    return y


def test_pool_and_upsample_by_hand():
    x = torch.arange(2 * 6 * 1, dtype=torch.float64).view(2, 6, 1)
    b = torch.tensor([[0, 1, 0, 0, 1, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.float64)
    z, closed, k_pad = segment_pool(x, b, length_multiple=4)
    assert closed.tolist() == [2, 2] and k_pad == 4
    # Row 0: segments {0,1} and {2,3,4}; the open tail {5} pools nowhere. Row 1: {6} and {7}.
    assert z[..., 0].tolist() == [[0.5, 3.0, 0.0, 0.0], [6.0, 7.0, 0.0, 0.0]]
    y = z * 10
    u = causal_upsample(y, b, null=torch.tensor([-1.0], dtype=torch.float64))
    # A segment reaches its closing position and after; before the first close: null.
    assert u[..., 0].tolist() == [[-1, 5, 5, 5, 30, 30], [60, 70, 70, 70, 70, 70]]


def test_no_boundary_at_all_runs_no_inner_layer():
    x = torch.randn(2, 5, D)
    z, closed, k_pad = segment_pool(x, torch.zeros(2, 5), length_multiple=8)
    assert z.shape == (2, 0, D) and k_pad == 0 and closed.tolist() == [0, 0]
    model = _model(init_boundary_rate=1e-4).eval()  # no position reaches p > 0.5
    out = model(torch.randint(0, V, (2, 5)))
    assert out.logits.shape == (2, 5, V) and out.stats["inner_length_fraction"].item() == 0.0


@pytest.mark.parametrize("n", [9, 24])
def test_causality_eval(n):
    torch.manual_seed(0)
    model = _model().double().eval()
    x = torch.randint(0, V, (3, n))
    with torch.no_grad():
        base = model(x)
        rate = base.stats["boundary_rate"].item()
        assert 0.1 < rate < 0.9, "the test needs both boundaries and non-boundaries"
        for t in sorted({0, 1, n // 2, n - 1}):
            moved = model(_perturb(x, t)).logits
            torch.testing.assert_close(moved[:, :t], base.logits[:, :t], atol=1e-12, rtol=0)
            assert (moved[:, t] - base.logits[:, t]).abs().max() > 1e-6


@pytest.mark.parametrize("n", [9, 24])
def test_causality_train_with_the_same_noise(n):
    torch.manual_seed(0)
    model = _model().double().train()
    x = torch.randint(0, V, (3, n))

    def run(ids):
        torch.manual_seed(123)  # both runs draw the same boundary noise
        return model(ids)

    with torch.no_grad():
        base = run(x)
        assert 0.1 < base.stats["boundary_rate"].item() < 0.9
        for t in sorted({0, 1, n // 2, n - 1}):
            moved = run(_perturb(x, t)).logits
            torch.testing.assert_close(moved[:, :t], base.logits[:, :t], atol=1e-12, rtol=0)


def test_gumbel_noise_is_drawn_per_position():
    torch.manual_seed(0)
    logits = torch.zeros(4, 256)
    b, soft = gumbel_sigmoid(logits, temperature=1.0, noise=True)
    assert 0.4 < b.mean().item() < 0.6  # P(b = 1) = sigmoid(0)
    assert len(soft.unique()) == soft.numel()  # one independent draw per (row, position)
    assert set(b.unique().tolist()) == {0.0, 1.0}
    b0, _ = gumbel_sigmoid(logits, temperature=1.0, noise=False)
    assert b0.sum() == 0  # without noise: the threshold at p = 0.5
    predictor = BoundaryPredictor(D, init_rate=0.3).train()
    with torch.no_grad():
        p = predictor(torch.zeros(1, 4000, D))[0].mean().item()
    assert 0.26 < p < 0.34  # identical states, yet the boundaries vary by position


def test_inner_blocks_run_on_the_shortened_sequence():
    torch.manual_seed(0)
    model = _model(length_multiple=1).eval()
    rows = {"pre": [], "inner": [], "post": []}
    for name in rows:
        for block in getattr(model, f"{name}_blocks"):
            block.bk.moe.register_forward_hook(
                lambda m, i, o, name=name: rows[name].append(i[0].reshape(-1, D).shape[0])
            )
    x = torch.randint(0, V, (3, 20))
    with torch.no_grad():
        out = model(x)
        ran = {name: list(r) for name, r in rows.items()}  # before the hooks fire again below
        b, _ = model.boundary(model.pre_blocks[0](model.tok_emb(x) + model.pos_emb(torch.arange(20)))[0])
    k_max = int(b.sum(1).max())
    assert ran["pre"] == [60] and ran["post"] == [60]
    assert ran["inner"] == [3 * k_max] * 2 and k_max < 20
    assert out.stats["inner_length_fraction"].item() == pytest.approx(k_max / 20)
    assert out.stats["compression_ratio"].item() == pytest.approx(60 / b.sum().item())


@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("train", [True, False])
def test_short_and_odd_lengths_score_every_position(n, train):
    torch.manual_seed(0)
    model = _model(length_multiple=4).train(train)
    out = model(torch.randint(0, V, (2, n)))
    assert out.logits.shape == (2, n, V) and torch.isfinite(out.logits).all()
    assert torch.isfinite(out.aux_losses["length"])


@pytest.mark.parametrize("loss_name", ["length", "boundary_prior", "rate_constraint", "ce"])
def test_each_loss_reaches_the_boundary_predictor(loss_name):
    torch.manual_seed(0)
    model = _model(
        prior_rate=0.25 if loss_name == "boundary_prior" else None,
        rate_target=0.25 if loss_name == "rate_constraint" else None,
    ).train()
    x = torch.randint(0, V, (2, 16))
    out = model(x)
    assert out.stats["boundary_rate"] > 0
    if loss_name == "ce":
        loss = F.cross_entropy(out.logits.flatten(0, 1), x.flatten())
    else:
        loss = out.aux_losses[loss_name]
    loss.backward()
    for p in model.boundary.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, loss_name


def test_boundary_prior_is_lowest_near_the_prior_rate():
    n = 100
    values = [boundary_prior_nll(torch.tensor([[1.0] * k + [0.0] * (n - k)]), 0.25).item() for k in (5, 25, 60)]
    assert values[1] < values[0] and values[1] < values[2]


def test_config_trains_two_steps_and_logs_compression():
    from resnet_bk.cli import build

    with tempfile.TemporaryDirectory() as root:
        cli = build(
            [
                "--config",
                "configs/adaptive_length.yaml",
                *_TINY,
                "--trainer.default_root_dir",
                root,
                "--model.init_args.network.init_args.config.d_model",
                "16",
            ]
        )
        cli.trainer.fit(cli.model, cli.datamodule)
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == 2
    for key in (
        "val/ppl",
        "train/aux/boundary_prior",
        "train/stats/compression_ratio",
        "val/stats/inner_length_fraction",
    ):
        assert torch.isfinite(metrics[key]), key
    assert metrics["train/stats/compression_ratio"] > 1


_TINY = tiny_fit_args(seq_len=16)


def _short_training(rate_target, steps=25):
    """Thresholded boundary rate (fraction of p_t > 0.5, what evaluation runs at) on held-out
    batches after `steps` AdamW steps of CE + boundary_prior (+ rate_constraint) on random tokens."""
    torch.manual_seed(0)
    model = _model(init_boundary_rate=0.25, prior_rate=0.25, rate_target=rate_target).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        x = torch.randint(0, V, (8, 32))
        out = model(x)
        loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()) + sum(out.aux_losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        return model(torch.randint(0, V, (16, 32))).stats["boundary_rate"].item()


def test_rate_constraint_holds_the_evaluated_boundary_rate():
    # Without the constraint the prior holds only the sampled rate: every p_t stays near 0.25, so
    # thresholding at 0.5 closes no segment at all (the measured collapse). With it: within 0.05.
    assert _short_training(rate_target=None) == 0.0
    assert abs(_short_training(rate_target=0.25) - 0.25) <= 0.05


def test_rate_constraint_pushes_both_ways():
    for rate in (0.05, 0.9):  # every p_t below or above 0.5: the loss lifts or lowers them
        p = torch.full((4, 50), rate).requires_grad_()
        p_vals = p + torch.linspace(0, 1e-3, 200).view(4, 50)  # distinct values, so the top fraction is defined
        loss, thresholded = boundary_rate_constraint(p_vals, 0.25)
        loss.backward()
        pushed_up = (p.grad < 0).float().mean().item()  # gradient descent raises p where grad < 0
        assert pushed_up == pytest.approx(0.25)
        assert thresholded.item() == (0.0 if rate < 0.5 else 1.0)


# ----------------------------------------------------------------- static shapes (capacity)
def test_pool_with_slots_by_hand():
    """slots=1: each row pools only its first closed segment; later positions keep reading it."""
    x = torch.arange(2 * 6 * 1, dtype=torch.float64).view(2, 6, 1)
    b = torch.tensor([[0, 1, 0, 0, 1, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.float64)
    z, closed, k_pad = segment_pool(x, b, slots=1)
    assert closed.tolist() == [1, 1] and k_pad == 1 and z[..., 0].tolist() == [[0.5], [6.0]]
    u = causal_upsample(z * 10, b, null=torch.tensor([-1.0], dtype=torch.float64))
    assert u[..., 0].tolist() == [[-1, 5, 5, 5, 5, 5], [60, 60, 60, 60, 60, 60]]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_full_capacity_gives_the_exact_logits_and_gradients(train):
    """capacity 1.0 pools into N slots instead of the batch's most closed segments: the padding is
    causal-invisible, so logits and their gradients (boundary predictor included) are the exact
    path's. The inner blocks' MoE statistics count more padding rows, so those may differ."""
    torch.manual_seed(0)
    model = _model(dropout=0.1).double().train(train)
    x = torch.randint(0, V, (3, 20))
    results = []
    for capacity in (None, 1.0):
        model.capacity = capacity
        model.zero_grad()
        torch.manual_seed(123)
        out = model(x)
        out.logits.square().mean().backward()
        results.append((out, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}))
    (exact, g_exact), (static, g_static) = results
    assert 0.1 < exact.stats["boundary_rate"].item() < 0.9
    torch.testing.assert_close(static.logits, exact.logits, atol=1e-12, rtol=0)
    assert g_static.keys() == g_exact.keys() and any("boundary" in k for k in g_exact)
    for k in g_exact:
        torch.testing.assert_close(g_static[k], g_exact[k], atol=1e-12, rtol=0, msg=k)
    assert float(static.stats["capacity_overflow"]) == 0.0
    assert static.stats["inner_length_fraction"].item() == 1.0  # N slots, whatever closed


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_capacity_overflow_is_counted_and_stays_causal(train):
    torch.manual_seed(0)
    n = 20
    model = _model(dropout=0.1, init_boundary_rate=0.6, capacity=0.2).double().train(train)  # 4 slots
    x = torch.randint(0, V, (3, n))

    def run(ids):
        torch.manual_seed(123)  # the same boundary noise and dropout in both runs
        return model(ids)

    with torch.no_grad():
        base = run(x)
        assert float(base.stats["capacity_overflow"]) > 0.2  # about 12 segments close, 4 are pooled
        assert base.stats["inner_length_fraction"].item() == pytest.approx(4 / n)
        for t in (0, 3, 11, n - 1):
            moved = run(_perturb(x, t)).logits
            torch.testing.assert_close(moved[:, :t], base.logits[:, :t], atol=1e-12, rtol=0)


def test_capacity_compiles_in_one_graph_without_host_reads():
    """With a capacity nothing is read back: the forward compiles with fullgraph=True (train, with
    backward, and eval); without one, the inner length is a value read back and the graph breaks.
    bf16 autocast, as on the GPU (the MoE's grouped product is compile-able in bf16)."""
    torch.manual_seed(0)
    model = _model(init_boundary_rate=0.5)
    x = torch.randint(0, V, (2, 16))
    for capacity, compiles in ((0.25, True), (None, False)):
        model.capacity = capacity
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, dynamic=False, backend="eager")
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                model.train()
                out = compiled(x)
                (out.logits.float().square().mean() + sum(out.aux_losses.values())).backward()
                model.eval()
                with torch.no_grad():
                    compiled(x)
            ok = True
        except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError):
            ok = False
        assert ok == compiles, capacity
