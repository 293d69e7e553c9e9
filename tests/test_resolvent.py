"""The multi-channel resolvent mixing (resnet_bk.layers.resolvent, BKLayer): the seeds' layer bit for
bit by default, features against a dense float64 reference, exact gradients (couplings and z too),
the |g| <= 1 / Im z bound, causality of every option in every model, and the ablation configs."""

from __future__ import annotations

import math
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from resnet_bk.bk_core import dense_green_diagonal, green_diagonal, laplacian_couplings
from resnet_bk.layers import BKLayer, ResolventConfig, resolvent_features
from resnet_bk.layers.sparsity import SparseBKLayer, sparse_layers
from resnet_bk.models import BKConfig, ResNetBKLM, count_parameters
from resnet_bk.models.act_lm import ACTResNetBKLM
from resnet_bk.models.act_multiscale_lm import ACTMultiScaleLM
from resnet_bk.models.adaptive_length_lm import AdaptiveLengthLM
from resnet_bk.models.conditional_moe_lm import ConditionalMoELM
from resnet_bk.models.early_exit_lm import EarlyExitLM
from resnet_bk.models.multiscale_lm import MultiScaleLM
from resnet_bk.models.sparse_lm import MultiScaleSparseLM, SparseResNetBKLM
from resnet_bk.models.step6_all_lm import Step6AllLM
from resnet_bk.reduced_chain import pack_kept, reduced_green_diagonal, reduced_green_diagonal_reference

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
V, D = 40, 16
RICH = ResolventConfig(channels=3, z_real=0.3, z_imag=0.5, z_imag_max=2.0, learn_z=True, couplings="input",
                       gate="sigmoid")  # fmt: skip


# ------------------------------------------------------------------------- the seeds' layer
def _seed_mix(layer: BKLayer, h: torch.Tensor) -> torch.Tensor:
    """The seeds' mix, written out: one potential per position, the Laplacian, z = i, [Re G, Im G]."""
    b, n, _ = h.shape
    v = layer.v_proj(h).squeeze(-1)
    h0, sub, sup = laplacian_couplings(b, n, torch.promote_types(v.dtype, torch.float32), h.device)
    g = green_diagonal(h0 + v, sub, sup, 1j, layer.causal, validate=False)
    return h + layer.bk_scale * layer.dropout(layer.g_proj(torch.view_as_real(g).to(h.dtype)))


@pytest.mark.parametrize("causal", [True, False])
def test_default_layer_is_the_seed_layer_bit_for_bit(causal):
    torch.manual_seed(0)
    layer = BKLayer(D, 2 * D, num_experts=2, causal=causal, dropout=0.3).train()
    names = {name for name, _ in layer.named_parameters()}
    assert {n.split(".")[0] for n in names} == {"moe", "v_proj", "g_proj"} and not list(layer.buffers())
    assert layer.v_proj.out_features == 1 and layer.g_proj.in_features == 2
    h = torch.randn(3, 19, D)
    torch.manual_seed(1)
    out, stats = layer.mix(h)
    torch.manual_seed(1)
    assert torch.equal(out, _seed_mix(layer, h))  # same dropout mask, same bits
    assert set(stats) == {"g_abs_mean"}


def test_seed_config_is_the_seed_model():
    """configs/resnet_bk_seed.yaml's network: the seeds' parameter count, every resolvent option at
    its default. configs/resnet_bk.yaml is the ablation's gated row."""
    model = _full_size_network(CONFIGS / "resnet_bk_seed.yaml")
    assert model.blocks[0].bk.resolvent == ResolventConfig()
    assert count_parameters(model) == 21_214_470
    default = _full_size_network(CONFIGS / "resnet_bk.yaml")
    gated = _full_size_network(CONFIGS / "quality" / "c64_learned_z_couplings_gate.yaml")
    assert default.blocks[0].bk.resolvent == gated.blocks[0].bk.resolvent
    assert count_parameters(default) == count_parameters(gated) == 21_211_008


# ----------------------------------------------------------------- features vs dense float64
def _dense_features(v, z, couplings, causal):
    """Each chain inverted densely in float64 (bk_core.dense_green_diagonal), laid out as [Re, Im] pairs."""
    b, n, c = v.shape
    cols = []
    for ch in range(c):
        h0, sub, sup = laplacian_couplings(b, n, torch.float64)
        if couplings is not None:
            sub = sup = couplings[..., ch].double()
        zc = z if not isinstance(z, torch.Tensor) else complex(z[ch])
        g = dense_green_diagonal(h0 + v[..., ch].double(), sub, sup, zc, causal)
        cols.append(torch.view_as_real(g))  # (B, N, 2)
    return torch.cat(cols, dim=-1)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("with_couplings", [False, True])
@pytest.mark.parametrize("per_channel_z", [False, True])
def test_features_match_dense_float64_reference(causal, with_couplings, per_channel_z):
    g = torch.Generator().manual_seed(0)
    b, n, c = 2, 9, 3
    v = 2 * torch.randn(b, n, c, dtype=torch.float64, generator=g)
    couplings = 2 * torch.rand(b, n - 1, c, dtype=torch.float64, generator=g) if with_couplings else None
    z = torch.tensor([0.3 + 0.1j, -0.5 + 1.0j, 0.0 + 3.0j], dtype=torch.complex128) if per_channel_z else 0.2 + 0.7j
    got = resolvent_features(v, z, couplings, causal)
    assert got.shape == (b, n, 2 * c) and got.dtype == torch.float64
    torch.testing.assert_close(got, _dense_features(v, z, couplings, causal), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("causal", [True, False])
def test_gradcheck_potentials_couplings_and_z(causal):
    g = torch.Generator().manual_seed(1)
    b, n, c = 2, 6, 2
    v = torch.randn(b, n, c, dtype=torch.float64, generator=g, requires_grad=True)
    couplings = (0.5 + torch.rand(b, n - 1, c, dtype=torch.float64, generator=g)).requires_grad_()
    z_re = torch.tensor([0.2, -0.4], dtype=torch.float64, requires_grad=True)
    z_im = torch.tensor([0.6, 1.5], dtype=torch.float64, requires_grad=True)

    def f(v, couplings, z_re, z_im):
        return resolvent_features(v, torch.complex(z_re, z_im), couplings, causal)

    assert torch.autograd.gradcheck(f, (v, couplings, z_re, z_im))


def test_bound_holds_per_channel_with_input_couplings():
    torch.manual_seed(0)
    layer = BKLayer(D, 2 * D, num_experts=1, resolvent=replace(RICH, channels=4, z_imag=0.2)).double()
    with torch.no_grad():
        layer.coupling_proj.weight.normal_(0, 3.0)  # couplings far from 1
        layer.v_proj.weight.normal_(0, 3.0)
        h = torch.randn(3, 40, D, dtype=torch.float64)
        f = layer.resolvent_features(layer.v_proj(h), layer.couplings(h))
        g_abs = torch.hypot(f[..., 0::2], f[..., 1::2])  # (B, N, C)
        bound = 1 / layer.shift().imag
    assert torch.isfinite(f).all()
    assert (g_abs <= bound * (1 + 1e-12)).all()
    assert (g_abs.amax((0, 1)) > 0.5 * bound).any()  # the bound is approached, not vacuous


# ------------------------------------------------------------------------------ the options
def test_learned_z_starts_log_spaced_stays_in_upper_half_plane_and_learns():
    torch.manual_seed(0)
    cfg = ResolventConfig(channels=5, z_imag=0.1, z_imag_max=3.0, learn_z=True)
    layer = BKLayer(D, 2 * D, num_experts=1, resolvent=cfg)
    z = layer.shift()
    torch.testing.assert_close(z.imag, torch.logspace(math.log10(0.1), math.log10(3.0), 5))
    assert torch.equal(z.real, torch.zeros(5))
    h = torch.randn(2, 12, D)
    out, stats = layer.mix(h)
    out.square().sum().backward()
    assert layer.z_real.grad.abs().min() > 0 and layer.z_imag_raw.grad.abs().min() > 0
    assert float(stats["z_imag_min"]) == pytest.approx(0.1) and float(stats["z_imag_max"]) == pytest.approx(3.0)
    assert all(not s.requires_grad and s.dim() == 0 for s in stats.values())
    with torch.no_grad():
        layer.z_imag_raw.fill_(-30.0)  # pushed far down: Im z is still > 0
    assert (layer.shift().imag > 0).all()


def test_fixed_spread_z_is_not_a_parameter():
    layer = BKLayer(D, 2 * D, num_experts=1, resolvent=ResolventConfig(channels=4, z_imag=0.1, z_imag_max=3.0))
    assert {n.split(".")[0] for n, _ in layer.named_parameters()} == {"moe", "v_proj", "g_proj"}
    assert "z_real" not in layer.state_dict()  # derived from the config, not saved
    torch.testing.assert_close(layer.shift().imag, torch.logspace(-1, math.log10(3.0), 4))


def test_couplings_read_the_later_position_and_start_at_the_laplacian():
    torch.manual_seed(0)
    layer = BKLayer(D, 2 * D, num_experts=1, resolvent=ResolventConfig(channels=2, couplings="input"))
    h = torch.randn(2, 7, D)
    b = layer.couplings(h)
    assert b.shape == (2, 6, 2) and ((b > 0) & (b < 2)).all()
    torch.testing.assert_close(b, 2 * torch.sigmoid(layer.coupling_proj(h[:, 1:])))
    with torch.no_grad():
        layer.coupling_proj.weight.zero_()
        layer.coupling_proj.bias.zero_()
    torch.testing.assert_close(layer.couplings(h), torch.ones(2, 6, 2))  # b = 1: the Laplacian
    # ... and then the features are those of the Laplacian chain
    v = layer.v_proj(h)
    torch.testing.assert_close(layer.resolvent_features(v, layer.couplings(h)), layer.resolvent_features(v))


@pytest.mark.parametrize("gate", ["sigmoid", "silu"])
def test_gate_multiplies_the_features(gate):
    torch.manual_seed(0)
    layer = BKLayer(D, 2 * D, num_experts=1, resolvent=ResolventConfig(channels=2, gate=gate))
    h = torch.randn(2, 5, D)
    f = layer.resolvent_features(layer.v_proj(h))
    act = torch.sigmoid if gate == "sigmoid" else torch.nn.functional.silu
    torch.testing.assert_close(layer.read_out(h, f), h + layer.g_proj(f * act(layer.gate_proj(h))))
    with torch.no_grad():
        layer.gate_proj.weight.zero_()
        layer.gate_proj.bias.fill_(-1e4 if gate == "sigmoid" else 0.0)  # a closed gate
    torch.testing.assert_close(layer.read_out(h, f), h + layer.g_proj.bias)


def test_bad_options_raise():
    for kwargs, match in (({"channels": 0}, "channels"), ({"couplings": "tokens"}, "couplings"),
                          ({"gate": "relu"}, "gate"), ({"z_real": float("inf")}, "z_real")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            ResolventConfig(**kwargs)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['chanels'\]"):
        ResolventConfig.of({"chanels": 4})
    assert ResolventConfig.of({"channels": 4}) == ResolventConfig(channels=4)  # a YAML block read without the CLI
    assert BKLayer(D, D, resolvent={"channels": 4, "gate": "silu"}).gate_proj.out_features == 8
    with pytest.raises(ValueError, match="couplings='laplacian'"):
        SparseBKLayer(D, D, resolvent=ResolventConfig(couplings="input"), target_sparsity=0.5)


@pytest.mark.parametrize("n", [1, 2])
def test_short_sequences_with_every_option(n):
    model = ResNetBKLM(V, BKConfig(d_model=D, n_layers=2, num_experts=2, max_seq_len=32, resolvent=RICH))
    out = model(torch.randint(0, V, (2, n)))
    out.logits.sum().backward()
    assert out.logits.shape == (2, n, V) and torch.isfinite(out.logits).all()
    assert model.blocks[0].bk.z_imag_raw.grad is not None


def test_bf16_autocast_runs_every_option():
    model = ResNetBKLM(V, BKConfig(d_model=D, n_layers=2, num_experts=2, max_seq_len=32, resolvent=RICH))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randint(0, V, (2, 10)))
    assert torch.isfinite(out.logits.float()).all()


# ------------------------------------------------------------------------ sparse, C chains
def test_reduced_core_with_one_z_per_row_equals_dense_reference():
    g = torch.Generator().manual_seed(0)
    keep = torch.rand(4, 13, generator=g) < 0.5
    keep[:, 0] = True
    _, valid, runs = pack_kept(keep)
    v = torch.randn(valid.shape, dtype=torch.float64, generator=g)
    z = torch.tensor([0.1 + 0.3j, -0.2 + 1.0j, 0.0 + 2.0j, 0.5 + 0.7j], dtype=torch.complex128)[:, None]
    got = reduced_green_diagonal(v, runs, 0.4, z)
    ref = reduced_green_diagonal_reference(v, keep, 0.4, z)
    torch.testing.assert_close(torch.where(valid, got, torch.zeros_like(got)), ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("core", ["reduced", "full"])
def test_sparse_layer_with_every_kept_position_is_the_dense_layer(core):
    cfg = replace(RICH, couplings="laplacian")
    torch.manual_seed(0)
    dense = BKLayer(D, 2 * D, num_experts=2, resolvent=cfg).double().eval()
    sparse = SparseBKLayer(D, 2 * D, num_experts=2, resolvent=cfg, target_sparsity=0.5, core=core).double().eval()
    sparse.load_state_dict(dense.state_dict(), strict=False)
    sparse.threshold.fill_(-float("inf"))  # every position kept, through the gathered path
    x = torch.randn(2, 11, D, dtype=torch.float64)
    with torch.no_grad():
        out, _, stats = sparse(x)
        ref, _, ref_stats = dense(x)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(stats["z_imag_mean"], ref_stats["z_imag_mean"])


# ---------------------------------------------------------------- causality, every model
def _sparse_mixed(model):
    """Sparse predictors with larger weights so that masks mix kept and skipped positions in eval."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in sparse_layers(model):
            layer.predictor.proj.weight.copy_(torch.randn(layer.predictor.proj.weight.shape, generator=g))
            layer.threshold.fill_(float(layer.predictor.proj.bias))
    return model


LAPLACIAN_RICH = replace(RICH, couplings="laplacian")  # the sparse layers take every option but input couplings


def _tiny(resolvent: ResolventConfig, n_layers: int = 2, **fields) -> BKConfig:
    """A tiny config with these resolvent options and dropout 0.2 (fields override)."""
    fields = {"d_model": D, "num_experts": 2, "max_seq_len": 64, "dropout": 0.2, **fields}
    return BKConfig(n_layers=n_layers, resolvent=resolvent, **fields)


VARIANTS = {
    "resnet_bk": lambda r: ResNetBKLM(V, _tiny(r)),
    "act": lambda r: ACTResNetBKLM(V, _tiny(r, 3)),
    "multiscale": lambda r: MultiScaleLM(V, _tiny(r, 4), hierarchical=True),
    "act_multiscale": lambda r: ACTMultiScaleLM(V, _tiny(r, 4)),
    "adaptive_length": lambda r: AdaptiveLengthLM(V, _tiny(r, 4)),
    "conditional_moe": lambda r: ConditionalMoELM(V, _tiny(r, num_experts=3)),
    "early_exit": lambda r: EarlyExitLM(V, _tiny(r)),
    # the sparse models with dropout: test_sparse_dropout_on_gathered_rows_is_causal_in_train_mode
    "sparse": lambda r: _sparse_mixed(SparseResNetBKLM(V, _tiny(replace(r, couplings="laplacian"), dropout=0.0))),
    "sparse_full": lambda r: _sparse_mixed(
        SparseResNetBKLM(V, _tiny(replace(r, couplings="laplacian"), dropout=0.0), core="full")
    ),
    "multiscale_sparse": lambda r: _sparse_mixed(
        MultiScaleSparseLM(V, _tiny(replace(r, couplings="laplacian"), dropout=0.0))
    ),
    "step6_all": lambda r: _sparse_mixed(Step6AllLM(V, _tiny(replace(r, couplings="laplacian"), 6), prior_rate=0.25)),
}
OPTIONS = {
    "channels": ResolventConfig(channels=3),
    "spread_z": ResolventConfig(channels=3, z_imag=0.2, z_imag_max=2.0),
    "learned_z": ResolventConfig(channels=3, z_real=0.3, z_imag=0.5, learn_z=True),
    "couplings": ResolventConfig(couplings="input"),
    "gate_sigmoid": ResolventConfig(gate="sigmoid"),
    "gate_silu": ResolventConfig(channels=2, gate="silu"),
    "all": RICH,
}


def _perturb(x, t):
    y = x.clone()
    y[:, t] = (y[:, t] + 1 + torch.arange(len(y))) % V
    return y


def _assert_causal(model, x, positions, train):
    """Change token t: no logit before t moves (dropout and sampling noise re-drawn with one seed:
    they are drawn for every position, so the noise at a position does not depend on the tokens)."""
    model.train(train)

    def run(inp):
        torch.manual_seed(123)
        return model(inp).logits

    with torch.no_grad():
        base = run(x)
        for t in positions:
            moved = run(_perturb(x, t))
            torch.testing.assert_close(moved[:, :t], base[:, :t], atol=1e-12, rtol=0)
            assert (moved[:, t] - base[:, t]).abs().max() > 1e-9


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("train", [True, False])
def test_every_option_is_causal(option, train):
    torch.manual_seed(0)
    model = VARIANTS["resnet_bk"](OPTIONS[option]).double()
    _assert_causal(model, torch.randint(0, V, (2, 17)), (0, 1, 8, 16), train)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("train", [True, False])
def test_every_variant_takes_the_options_and_stays_causal(variant, train):
    torch.manual_seed(0)
    model = VARIANTS[variant](RICH).double()
    layers = [m for m in model.modules() if isinstance(m, BKLayer)]
    assert layers and all(layer.v_proj.out_features == RICH.channels and layer.resolvent.learn_z for layer in layers)
    stats = model(torch.randint(0, V, (2, 8))).stats
    assert {"g_abs_mean", "z_imag_min", "z_imag_mean", "z_imag_max"} <= set(stats), sorted(stats)
    _assert_causal(model, torch.randint(0, V, (2, 16)), (0, 5, 15), train)


@pytest.mark.parametrize("model", ["sparse", "multiscale_sparse"])
def test_sparse_dropout_on_gathered_rows_is_causal_in_train_mode(model):
    """The sparse layer runs its feed-forward (and the MoE's dropout) on the gathered kept rows; the
    masks are drawn for every position and then gathered, so a row's mask does not depend on how
    many later positions were kept (docs/design.md section 3)."""
    torch.manual_seed(0)
    cls = SparseResNetBKLM if model == "sparse" else MultiScaleSparseLM
    net = _sparse_mixed(cls(V, BKConfig(d_model=D, n_layers=2, num_experts=2, max_seq_len=64, dropout=0.2))).double()
    _assert_causal(net, torch.randint(0, V, (2, 16)), (0, 5, 15), train=True)


def test_bidirectional_core_with_couplings_leaks_the_future():
    """causal=False must fail the test above, otherwise it proves nothing for these options."""
    torch.manual_seed(0)
    model = ResNetBKLM(V, _tiny(RICH, dropout=0.0, causal=False)).double()
    x = torch.randint(0, V, (2, 12))
    with torch.no_grad():
        moved = model(_perturb(x, 6)).logits[:, :6] - model(x).logits[:, :6]
    assert moved[:, -1].abs().max() > 1e-10


# ---------------------------------------------------------------------- the ablation configs
QUALITY = sorted(p.name for p in (CONFIGS / "quality").glob("*.yaml"))
TRANSFORMER_PARAMS = 21_203_712


def test_ablation_rows_exist():
    assert QUALITY == sorted(
        f"{name}.yaml" for name in ("c4", "c16", "c64", "c64_spread_z", "c64_learned_z", "c64_learned_z_couplings",
                                    "c64_learned_z_couplings_gate")
    )  # fmt: skip


def _full_size_network(path: Path) -> ResNetBKLM:
    """The config's network at full size on the meta device (no memory, no init cost)."""
    import yaml

    network = yaml.safe_load(path.read_text())["model"]["init_args"]["network"]
    assert network["class_path"] == "resnet_bk.models.ResNetBKLM"
    args = dict(network["init_args"])
    config = BKConfig.of(args.pop("config"))  # its resolvent block too
    with torch.device("meta"):
        return ResNetBKLM(33_279, config, **args)


@pytest.mark.parametrize("config", QUALITY)
def test_quality_config_equal_parameters_and_causal(config):
    """Each row has the Transformer's parameters (+-2%, the count quoted in its comment) at full size,
    and builds through the CLI; a small copy of it (same resolvent options) is causal."""
    from fit_args import tiny_fit_args

    from resnet_bk.cli import build

    path = CONFIGS / "quality" / config
    full = _full_size_network(path)
    n = count_parameters(full)
    assert abs(n - TRANSFORMER_PARAMS) / TRANSFORMER_PARAMS < 0.02, n
    assert f"{n:,} parameters" in path.read_text()
    with tempfile.TemporaryDirectory() as root:
        cli = build(["--config", str(path), *tiny_fit_args(d_model=D, n_layers=2, d_ff=2 * D, dropout=0.2),
                     "--trainer.default_root_dir", root])  # fmt: skip
    model = cli.model.model.double()
    assert model.blocks[0].bk.resolvent == full.blocks[0].bk.resolvent
    _assert_causal(model, torch.randint(0, V, (2, 16)), (0, 7, 15), train=True)
    _assert_causal(model, torch.randint(0, V, (2, 16)), (0, 7, 15), train=False)


# ------------------------------------------------------------------ fast paths (CPU here)
def _features_and_grads(v, couplings, z_re, z_im, method, weight):
    leaves = [t.detach().clone().requires_grad_() for t in (v, couplings, z_re, z_im)]
    from resnet_bk.bk_core import use_method

    with use_method(method):
        f = resolvent_features(leaves[0], torch.complex(leaves[2], leaves[3]), leaves[1], True)
    (f * weight.to(f.dtype)).sum().backward()
    return f, [t.grad for t in leaves]


def test_triton_core_gives_the_reference_features():
    """resolvent_features through the Triton kernels (interpreted on CPU) against the float64 scan:
    B*C rows with one z per row and input couplings, values and gradients."""
    pytest.importorskip("triton")
    g = torch.Generator().manual_seed(4)
    b, n, c = 2, 18, 3
    v = torch.randn(b, n, c, dtype=torch.float64, generator=g)
    couplings = 0.5 + torch.rand(b, n - 1, c, dtype=torch.float64, generator=g)
    z_re, z_im = torch.tensor([0.2, -0.1, 0.0], dtype=torch.float64), torch.tensor([0.3, 1.0, 2.5], dtype=torch.float64)
    weight = torch.randn(b, n, 2 * c, dtype=torch.float64, generator=g)
    ref, ref_grads = _features_and_grads(v, couplings, z_re, z_im, "scan", weight)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    out, grads = _features_and_grads(*(t.float().to(dev) for t in (v, couplings, z_re, z_im)), "triton", weight.to(dev))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.cpu().double(), ref, atol=1e-5, rtol=1e-4)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.cpu().double(), want, atol=1e-4, rtol=1e-3)


def test_mix_compiles_without_graph_breaks():
    """The whole mixing path (projections, couplings, learned z, core, gate) in one graph."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = BKLayer(D, 2 * D, num_experts=1, resolvent=RICH)
    h = torch.randn(2, 12, D)
    compiled = torch.compile(lambda h: layer.mix(h)[0], fullgraph=True, backend="aot_eager")
    out = compiled(h)
    out.square().sum().backward()
    grad = layer.z_imag_raw.grad.clone()
    layer.zero_grad()
    ref = layer.mix(h)[0]
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad, layer.z_imag_raw.grad, atol=1e-6, rtol=1e-4)


VARIANT_CONFIGS = ["quickstart.yaml", "act.yaml", "act_multiscale.yaml", "adaptive_length.yaml", "conditional_moe.yaml",
                   "early_exit.yaml", "multiscale.yaml", "multiscale_hierarchical.yaml", "sparse_bk.yaml",
                   "multiscale_sparse.yaml", "step6_all.yaml"]  # fmt: skip


@pytest.mark.parametrize("config", VARIANT_CONFIGS)
def test_every_variant_config_takes_the_options_by_name(config):
    """The same option names reach every BK layer of every variant through its config."""
    from fit_args import tiny_fit_args

    from resnet_bk.cli import build

    couplings = "laplacian" if "sparse" in config or config == "step6_all.yaml" else "input"
    options = {"resolvent.channels": 2, "resolvent.learn_z": "true", "resolvent.z_imag_max": 2.0,
               "resolvent.couplings": couplings, "resolvent.gate": "silu"}  # fmt: skip
    with tempfile.TemporaryDirectory() as root:
        cli = build(["--config", str(CONFIGS / config), *tiny_fit_args(d_model=D, **options),
                     "--trainer.default_root_dir", root])  # fmt: skip
    layers = [m for m in cli.model.model.modules() if isinstance(m, BKLayer)]
    want = ResolventConfig(channels=2, learn_z=True, z_imag_max=2.0, couplings=couplings, gate="silu")
    assert layers and all(layer.resolvent == want for layer in layers)
