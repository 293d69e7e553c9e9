"""Learned sparsity (resnet_bk.reduced_chain, resnet_bk.layers.sparsity, resnet_bk.models.sparse_lm,
callbacks.sparsity_temperature): the reduced-chain core against the dense float64 reference (values and
gradients), sparsity 0 and an all-kept mask reproducing the dense layer, causality in train and eval
mode (thresholded inference) for both networks and both configs, skipped rows really absent from
the gathered matmuls, achieved sparsity tracking the target after a short training run."""

from __future__ import annotations

import math
import tempfile
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fit_args import tiny_fit_args

from resnet_bk.bk_core import green_diagonal, laplacian_couplings
from resnet_bk.layers.bk_layer import BKLayer
from resnet_bk.layers.sparsity import SparseBKLayer, gumbel_sigmoid, last_kept_before, sparse_layers
from resnet_bk.models.config import BKConfig
from resnet_bk.models.sparse_lm import MultiScaleSparseLM, SparseResNetBKLM
from resnet_bk.reduced_chain import (
    kept_green_diagonal_full,
    pack_kept,
    reduced_green_diagonal,
    reduced_green_diagonal_reference,
    run_table,
)

V, D = 40, 16
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


# ------------------------------------------------------------------------------ reduced core
def _keep(b, n, p, seed):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(b, n, generator=g) >= p
    keep[0] = True  # one row fully kept
    if b > 1:
        keep[1] = False
        keep[1, -1] = True  # one row with a single kept position, at the end (a run of N-1)
    return keep


@pytest.mark.parametrize("n", [1, 2, 5, 33])
@pytest.mark.parametrize("p", [0.0, 0.4, 0.8])
def test_reduced_core_equals_dense_reference(n, p):
    keep = _keep(4, n, p, seed=n)
    pos, valid, runs = pack_kept(keep)
    v = torch.randn(valid.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    v_skip = 0.37
    ref = reduced_green_diagonal_reference(v, keep, v_skip)
    got = reduced_green_diagonal(v, runs, torch.tensor(v_skip, dtype=torch.float64))
    full = kept_green_diagonal_full(v, pos, valid, n, v_skip, method="scan")
    for out in (got, full):
        torch.testing.assert_close(torch.where(valid, out, 0), ref, atol=1e-12, rtol=1e-12)
    # the sequential path of the length-K sweep agrees as well
    seq = reduced_green_diagonal(v, runs, v_skip, method="sequential")
    torch.testing.assert_close(torch.where(valid, seq, 0), ref, atol=1e-12, rtol=1e-12)


def test_reduced_core_gradients_equal_full_chain():
    keep = _keep(3, 24, 0.5, seed=3)
    pos, valid, runs = pack_kept(keep)
    v = torch.randn(valid.shape, dtype=torch.float64, requires_grad=True)
    v_skip = torch.tensor(-0.2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(valid.shape, dtype=torch.complex128)
    grads = []
    for fn in (
        lambda: reduced_green_diagonal(v, runs, v_skip),
        lambda: kept_green_diagonal_full(v, pos, valid, 24, v_skip, method="scan"),
    ):
        loss = (torch.where(valid, fn(), 0) * w).real.sum()
        grads.append(torch.autograd.grad(loss, (v, v_skip)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    assert grads[0][1].abs() > 0  # the skipped sites' potential is learned


def test_long_runs_decouple_and_stay_finite():
    alpha_s = torch.tensor(-2.0 - 1.0j, dtype=torch.complex128)
    rho, inv_u = run_table(alpha_s, 5000)
    assert torch.isfinite(torch.view_as_real(rho)).all() and torch.isfinite(torch.view_as_real(inv_u)).all()
    assert abs(inv_u[0] - 1) < 1e-15 and rho[0].abs() < 1e-15 and inv_u[-1].abs() < 1e-100
    # the recurrence U_L = alpha_s U_{L-1} - U_{L-2} for small L
    u = [torch.tensor(0j, dtype=torch.complex128), torch.tensor(1 + 0j, dtype=torch.complex128)]
    for _ in range(6):
        u.append(alpha_s * u[-1] - u[-2])
    for ell in range(6):
        torch.testing.assert_close(rho[ell], u[ell] / u[ell + 1])
        torch.testing.assert_close(inv_u[ell], 1 / u[ell + 1])
    # float32 chain of length 4096 with one kept position at each end
    keep = torch.zeros(1, 4096, dtype=torch.bool)
    keep[0, 0] = keep[0, -1] = True
    pos, valid, runs = pack_kept(keep)
    g = reduced_green_diagonal(torch.zeros(1, 2), runs, 0.0)
    h0, sub, sup = laplacian_couplings(1, 4096)
    torch.testing.assert_close(g, green_diagonal(h0, sub, sup, 1j, method="scan")[:, [0, -1]], atol=1e-5, rtol=1e-5)


def test_pack_kept_and_last_kept():
    keep = torch.tensor([[False, True, False, False, True], [True, False, False, False, False]])
    pos, valid, runs = pack_kept(keep)
    assert pos.tolist() == [[1, 4], [0, 0]] and valid.tolist() == [[True, True], [True, False]]
    assert runs.tolist() == [[1, 2], [0, 0]]
    assert last_kept_before(keep).tolist() == [[-1, 1, 1, 1, 4], [0, 0, 0, 0, 0]]


def test_gumbel_sigmoid_straight_through():
    logits = torch.full((20000,), 1.0, requires_grad=True)
    hard, soft = gumbel_sigmoid(logits, tau=0.5, generator=torch.Generator().manual_seed(0))
    assert set(hard.detach().unique().tolist()) <= {0.0, 1.0}
    assert abs(hard.detach().mean().item() - torch.sigmoid(torch.tensor(1.0)).item()) < 0.02  # P(keep) = sigmoid(l)
    hard.sum().backward()
    assert logits.grad.abs().sum() > 0


# -------------------------------------------------------------------------- dense equivalence
def _dense_and_sparse(target, core="reduced"):
    torch.manual_seed(0)
    dense = BKLayer(D, 2 * D, num_experts=3).double()
    sparse = SparseBKLayer(D, 2 * D, num_experts=3, target_sparsity=target, core=core).double()
    missing, unexpected = sparse.load_state_dict(dense.state_dict(), strict=False)
    assert not unexpected and all(
        k.startswith(("predictor", "interp", "v_skip", "threshold", "calibrated")) for k in missing
    )
    return dense.eval(), sparse.eval()


def test_sparsity_zero_is_the_dense_layer():
    dense, sparse = _dense_and_sparse(0.0)
    assert sparse.predictor is None and sum(p.numel() for p in sparse.parameters()) == sum(
        p.numel() for p in dense.parameters()
    )
    x = torch.randn(2, 11, D, dtype=torch.float64)
    torch.testing.assert_close(sparse(x)[0], dense(x)[0], atol=0, rtol=0)


@pytest.mark.parametrize("core", ["reduced", "full"])
def test_all_kept_gathered_path_equals_dense_layer(core):
    dense, sparse = _dense_and_sparse(0.5, core)
    sparse.threshold.fill_(-float("inf"))  # every position kept, through the gathered path
    x = torch.randn(3, 13, D, dtype=torch.float64)
    with torch.no_grad():
        out, _, stats = sparse(x)
        torch.testing.assert_close(out, dense(x)[0], atol=1e-12, rtol=1e-12)
    assert float(stats["sparsity"]) == 0.0 and sparse.last_rows == 39


# -------------------------------------------------------------------------------- causality
def _mixed(model):
    """Predictors with larger random weights so that masks mix kept and skipped positions in eval."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in sparse_layers(model):
            layer.predictor.proj.weight.copy_(torch.randn(layer.predictor.proj.weight.shape, generator=g))
            layer.threshold.fill_(float(layer.predictor.proj.bias))
    return model


TINY = BKConfig(d_model=D, n_layers=2, num_experts=2, max_seq_len=64)
MODELS = {
    "sparse_reduced": lambda: SparseResNetBKLM(V, TINY),
    "sparse_full": lambda: SparseResNetBKLM(V, TINY, core="full", target_sparsity=0.75),
    "multiscale_sparse": lambda: MultiScaleSparseLM(V, TINY),
}


def _perturb(x, t):
    y = x.clone()
    y[:, t] = (y[:, t] + 1 + torch.arange(len(y))) % V
    return y


def _assert_causal(model, x, positions, train):
    """Change token t: no logit before t moves. In train mode the Gumbel noise is re-drawn with the
    same seed for every forward pass (the noise at a position does not depend on the tokens)."""

    def run(inp):
        torch.manual_seed(123)
        return model(inp)

    with torch.no_grad():
        base = run(x)
        sparsity = float(base.stats["sparsity"])
        assert 0.1 < sparsity < 0.9, sparsity  # the gathered and interpolated paths both run
        for t in positions:
            moved = run(_perturb(x, t)).logits
            torch.testing.assert_close(moved[:, :t], base.logits[:, :t], atol=1e-12, rtol=0)
            assert (moved[:, t] - base.logits[:, t]).abs().max() > 1e-9
    return sparsity


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("train", [True, False])
def test_causality(name, train):
    torch.manual_seed(0)
    model = _mixed(MODELS[name]()).double().train(train)
    _assert_causal(model, torch.randint(0, V, (2, 15)), (0, 7, 14), train)


def test_causality_test_catches_a_top_k_mask(monkeypatch):
    """The seeds' inference rule (keep the top-k logits of the whole sequence) must fail the test."""
    from resnet_bk.layers.sparsity import ImportancePredictor

    real = ImportancePredictor.forward

    def top_k(self, x):  # keep iff the logit is among the sequence's k largest (threshold set to 0)
        logits = real(self, x)
        return logits - logits.topk(max(1, x.shape[1] // 2), dim=1).values[:, -1:] + 1e-9

    torch.manual_seed(0)
    model = _mixed(MODELS["sparse_reduced"]()).double().eval()
    for layer in sparse_layers(model):
        layer.threshold.fill_(0.0)
    monkeypatch.setattr(ImportancePredictor, "forward", top_k)
    with pytest.raises(AssertionError):
        # every position perturbed: whether one change moves the sequence's top-k set depends on the weights
        _assert_causal(model, torch.randint(0, V, (2, 16)), range(15, 0, -1), False)


# ------------------------------------------------------------------------------ work skipped
def test_skipped_rows_never_enter_the_gathered_matmuls():
    torch.manual_seed(0)
    model = _mixed(MODELS["sparse_reduced"]()).eval()
    rows = {"ffn": 0, "v_proj": 0, "g_proj": 0}

    def counter(key):
        return lambda _m, inp, _out: rows.__setitem__(key, rows[key] + inp[0].reshape(-1, inp[0].shape[-1]).shape[0])

    for layer in sparse_layers(model):
        layer.moe.experts.register_forward_hook(counter("ffn"))
        layer.v_proj.register_forward_hook(counter("v_proj"))
        layer.g_proj.register_forward_hook(counter("g_proj"))
    x = torch.randint(0, V, (4, 25))
    with torch.no_grad():
        out = model(x)
    kept = sum(int(layer.last_keep.sum()) for layer in sparse_layers(model))
    assert rows == {"ffn": kept, "v_proj": kept, "g_proj": kept}  # top_k = 1: one expert row per kept position
    assert kept < 0.9 * 2 * x.numel()
    assert out.stats["ffn_rows_frac"] == pytest.approx(kept / (2 * x.numel()))
    assert float(out.stats["sparsity"]) == pytest.approx(1 - kept / (2 * x.numel()))


# ------------------------------------------------------------------------ static capacity
def _capacity_layer(capacity, num_experts=2):
    torch.manual_seed(0)
    layer = SparseBKLayer(D, 2 * D, num_experts=num_experts, target_sparsity=0.5, capacity=capacity)
    with torch.no_grad():
        layer.predictor.proj.weight.normal_()  # masks that mix kept and skipped positions
    return layer


@pytest.mark.parametrize("train", [False, True])
def test_full_capacity_equals_the_exact_gather(train):
    """capacity=1.0 (static shapes, padding rows) gives the values and gradients of capacity=None."""
    exact, static = _capacity_layer(None).train(train), _capacity_layer(1.0).train(train)
    x = torch.randn(3, 14, D)
    results = []
    for layer in (exact, static):
        xx = x.clone().requires_grad_()
        torch.manual_seed(5)
        out, aux, stats = layer(xx)
        (out.square().sum() + aux["sparsity"]).backward()
        results.append((out, xx.grad, layer.v_skip.grad, stats))
    (o1, g1, s1, st1), (o2, g2, s2, st2) = results
    assert 0.1 < float(st1["sparsity"]) < 0.9
    torch.testing.assert_close(o2, o1, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(g2, g1, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(s2, s1, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(st2["g_abs_mean"], st1["g_abs_mean"])  # padding slots left out
    assert float(st2["capacity_overflow"]) == 0.0 and static.last_rows == 3 * 14


def test_capacity_keeps_each_rows_first_kept_positions():
    layer = _capacity_layer(0.25).eval()
    free = _capacity_layer(None).eval()
    x = torch.randn(4, 20, D)
    with torch.no_grad():
        _, _, stats = layer(x)
        free(x)
    k_cap = 5
    wanted = free.last_keep & (free.last_keep.long().cumsum(1) <= k_cap)
    assert torch.equal(layer.last_keep, wanted) and layer.last_rows == 4 * k_cap
    dropped = int(free.last_keep.sum() - wanted.sum())
    assert dropped > 0
    assert float(stats["capacity_overflow"]) == pytest.approx(dropped / int(free.last_keep.sum()))


@pytest.mark.parametrize("core", ["reduced", "full"])
@pytest.mark.parametrize("train", [True, False])
def test_causality_with_capacity(core, train):
    torch.manual_seed(0)
    extra = {} if core == "reduced" else {"core": "full", "target_sparsity": 0.75}
    model = _mixed(SparseResNetBKLM(V, TINY, capacity=0.4, **extra))  # overflowing rows drop later kept positions
    model = model.double().train(train)
    _assert_causal(model, torch.randint(0, V, (2, 15)), (0, 7, 14), train)
    assert any(float(layer.last_keep.sum(1).max()) == 6 for layer in sparse_layers(model))  # at capacity


@pytest.mark.parametrize("train", [False, True])
def test_static_capacity_never_syncs(train):
    """On the meta device every value read (.item(), .tolist(), nonzero) raises: forward and backward
    run there only if the layer never syncs and all shapes are static."""
    torch.manual_seed(0)
    layer = SparseBKLayer(D, 2 * D, num_experts=2, target_sparsity=0.5, capacity=0.6)
    layer = layer.to("meta", torch.bfloat16).train(train)
    x = torch.randn(2, 9, D, device="meta", dtype=torch.bfloat16, requires_grad=True)
    out, aux, _ = layer(x)
    (out.float().sum() + sum(aux.values())).backward()
    assert x.grad.shape == x.shape
    layer.capacity = None
    with pytest.raises(NotImplementedError):  # the exact gather reads the kept count back
        layer(x)


def test_triton_dispatch_and_compiled_layer(monkeypatch):
    """With the BK-core method resolved to "triton" the layer runs the fused reduced sweep (Triton's
    interpreter on CPU): the reference's values and gradients, also compiled (fullgraph, no sync)."""
    pytest.importorskip("triton")
    from resnet_bk.bk_core import use_method
    from resnet_bk.kernels import reduced_op

    calls = []
    kernels = reduced_op._kernels()
    monkeypatch.setattr(reduced_op, "_kernels", lambda: calls.append(1) or kernels)
    layer = _capacity_layer(0.75, num_experts=1).train()  # the MoE's float32 CPU path is not compile-able
    x = torch.randn(2, 12, D)
    results = []
    for method, compiled in (("scan", False), ("triton", False), ("triton", True)):
        fn = torch.compile(layer, fullgraph=True, backend="aot_eager") if compiled else layer
        xx = x.clone().requires_grad_()
        with use_method(method):
            torch.manual_seed(3)
            out, _, stats = fn(xx)
            out.square().sum().backward()
        results.append((out.detach(), xx.grad))
        assert bool(calls) == (method == "triton")
    assert 0.1 < float(stats["sparsity"]) < 0.9
    for out, grad in results[1:]:
        torch.testing.assert_close(out, results[0][0], atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(grad, results[0][1], atol=2e-5, rtol=2e-5)


# ----------------------------------------------------------------------------- short training
@pytest.mark.parametrize("target", [0.25, 0.8])
def test_achieved_sparsity_tracks_target(target):
    torch.manual_seed(0)
    model = SparseResNetBKLM(V, BKConfig(d_model=D, n_layers=2, num_experts=1, max_seq_len=32), target_sparsity=target)
    for layer in sparse_layers(model):  # start far from the target: P(keep) = 0.5
        torch.nn.init.zeros_(layer.predictor.proj.bias)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    base = torch.arange(32) % 7
    train_sparsity = []
    for step in range(100):
        x = (base[None] + torch.randint(0, V, (8, 1))) % V
        model.set_temperature(1.0 * (0.2 / 1.0) ** (step / 100))
        out = model(x[:, :-1])
        loss = F.cross_entropy(out.logits.flatten(0, 1), x[:, 1:].flatten()) + 10.0 * out.aux_losses["sparsity"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        train_sparsity.append(float(out.stats["sparsity"]))
    assert abs(sum(train_sparsity[-20:]) / 20 - target) < 0.05, train_sparsity[-20:]
    model.eval()
    with torch.no_grad():
        x = (base[None] + torch.randint(0, V, (16, 1))) % V
        eval_sparsity = float(model(x[:, :-1]).stats["sparsity"])
    assert abs(eval_sparsity - target) < 0.05, eval_sparsity


# ---------------------------------------------------------------------------- lightning + configs
_TINY = [
    *tiny_fit_args(seq_len=17, d_model=16, dropout=0.0),
    "--trainer.callbacks+=callbacks.FlopsPerToken",
    "--trainer.callbacks+=callbacks.SparsityTemperature",
    "--trainer.callbacks+=callbacks.Throughput",
]
SPARSE_CONFIGS = {"sparse_bk.yaml": "SparseResNetBKLM", "multiscale_sparse.yaml": "MultiScaleSparseLM"}


@pytest.mark.parametrize("config", SPARSE_CONFIGS)
def test_config_causal_in_train_and_eval_and_fits(config):
    from resnet_bk.cli import build

    with tempfile.TemporaryDirectory() as root:
        cli = build(["--config", str(CONFIGS / config), *_TINY, "--trainer.default_root_dir", root])
        assert type(cli.model.model).__name__ == SPARSE_CONFIGS[config]
        assert cli.model.aux_loss_weights["sparsity"] == 10.0
        cli.trainer.fit(cli.model, cli.datamodule)
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == 2 and torch.isfinite(metrics["val/ppl"])
    for key in (
        "train/aux/sparsity",
        "train/stats/sparsity",
        "val/stats/sparsity",
        "train/tau",
        "val/flops_per_token",
        "val/stats/ffn_rows_frac",
    ):
        assert key in metrics, key
    (throughput,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "Throughput"]
    assert throughput.summary()["val_tokens_per_s"] > 0  # tokens/s go to the logger, not to callback_metrics
    model = _mixed(cli.model.model).double()
    x = torch.randint(0, V, (2, 17))
    for train in (True, False):
        _assert_causal(model.train(train), x, (0, 5, 16), train)


def test_lightning_module_weights_and_temperature():
    import lightning as L_

    from callbacks import FlopsPerToken, SparsityTemperature
    from callbacks.sparsity_temperature import annealed_tau
    from lightning_modules import LanguageModel
    from resnet_bk.models import ResNetBKLM

    torch.manual_seed(0)
    module = LanguageModel(
        network=partial(SparseResNetBKLM, config=BKConfig(d_model=D, n_layers=2, num_experts=2, max_seq_len=16)),
        vocab_size=V,
        aux_loss_weights={"load_balance": 0.01, "sparsity": 3.0},
    )
    batch = {"input_ids": torch.randint(0, V, (2, 8)), "targets": torch.randint(0, V, (2, 8)), "index": torch.arange(2)}
    result = module.compute_loss(batch, "train")
    expected = result.logs["ce"] + 0.01 * result.logs["aux/load_balance"] + 3.0 * result.logs["aux/sparsity"]
    assert result.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert annealed_tau(0, 2.0, 0.5, 10) == 2.0 and annealed_tau(5, 2.0, 0.5, 10) == pytest.approx(1.0)
    assert annealed_tau(50, 2.0, 0.5, 10) == pytest.approx(0.5)
    trainer = L_.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[FlopsPerToken()],
    )
    metrics = trainer.validate(
        module, dataloaders=torch.utils.data.DataLoader([batch], batch_size=None), verbose=False
    )[0]
    assert 0.0 <= metrics["val/stats/sparsity"] <= 1.0 and metrics["val/flops_per_token_body"] > 0

    schedule = SparsityTemperature(start=2.0, end=0.5, anneal_steps=10)
    trainer = L_.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_steps=5,
        callbacks=[schedule],
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([batch] * 5, batch_size=None))
    assert all(layer.tau == pytest.approx(annealed_tau(4, 2.0, 0.5, 10)) for layer in sparse_layers(module.model))
    whole_run = SparsityTemperature(start=2.0, end=0.5)  # anneal_steps None: over trainer.max_steps
    trainer = L_.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_steps=5,
        callbacks=[whole_run],
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([batch] * 5, batch_size=None))
    assert whole_run.anneal_steps == 5
    assert all(layer.tau == pytest.approx(annealed_tau(4, 2.0, 0.5, 5)) for layer in sparse_layers(module.model))
    dense = LanguageModel(
        network=partial(ResNetBKLM, config=BKConfig(d_model=D, n_layers=1, max_seq_len=16)), vocab_size=V
    )
    with pytest.raises(ValueError, match="no learned-sparsity layer"):
        L_.Trainer(
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            max_steps=1,
            callbacks=[schedule],
        ).fit(dense, torch.utils.data.DataLoader([batch], batch_size=None))


def test_bad_arguments():
    with pytest.raises(ValueError, match="target_sparsity"):
        SparseBKLayer(D, D, target_sparsity=1.0)
    with pytest.raises(ValueError, match="core"):
        SparseBKLayer(D, D, core="dense")
    with pytest.raises(ValueError, match="causal"):
        SparseBKLayer(D, D, causal=False)
    with pytest.raises(ValueError, match="capacity"):
        SparseBKLayer(D, D, capacity=1.5)


@pytest.mark.parametrize("model_class", [SparseResNetBKLM, MultiScaleSparseLM])
def test_models_pass_capacity_to_every_sparse_layer(model_class):
    model = model_class(V, TINY, capacity=0.5)
    assert sparse_layers(model) and all(layer.capacity == 0.5 for layer in sparse_layers(model))
    out = model(torch.randint(0, V, (2, 12)))
    assert out.logits.shape == (2, 12, V)
    for layer in sparse_layers(model):  # static: B * ceil(capacity * N) rows at the layer's own resolution
        assert layer.last_rows == 2 * math.ceil(0.5 * layer.last_keep.shape[1])
