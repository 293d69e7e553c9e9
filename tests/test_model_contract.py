"""The contract every language model in resnet_bk/models keeps, tested on each of them (tiny widths):

- shapes: input_ids (B, N) -> LMOutput with logits (B, N, V), finite; aux losses and stats scalars,
  stats detached; N > max_seq_len is a one-line error;
- causal (docs/design.md section 3): change token t and no logit before t moves, in eval mode and
  in train mode with dropout 0.1 (the RNG re-seeded before each pass: noise drawn per position does
  not move, noise drawn for data-dependently gathered rows would);
- generation through resnet_bk.generate.sample (greedy = argmax of the model's own next-token logits);
- one config: the same BKConfig builds every model, and its shared fields are what the model is;
- state_dict round trip: a fresh instance loaded from the state dict gives the same logits;
- gradient flow: a train-mode loss (CE + aux losses) gives every parameter a gradient, except those
  listed in NO_GRADIENT with the reason.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from dataclasses import replace
from functools import partial

import pytest
import torch
import torch.nn.functional as F

import resnet_bk.models as models_package
from resnet_bk.generate import sample
from resnet_bk.layers.bk_layer import ResNetBKBlock
from resnet_bk.layers.multiscale import MLPRefine
from resnet_bk.models.act_lm import ACTResNetBKLM
from resnet_bk.models.act_multiscale_lm import ACTMultiScaleLM
from resnet_bk.models.adaptive_length_lm import AdaptiveLengthLM
from resnet_bk.models.base import TiedEmbeddingLM
from resnet_bk.models.conditional_moe_lm import ConditionalMoELM
from resnet_bk.models.config import BKConfig, ModelConfig
from resnet_bk.models.early_exit_lm import EarlyExitLM
from resnet_bk.models.multiscale_lm import MultiScaleLM
from resnet_bk.models.output import LMOutput
from resnet_bk.models.resnet_bk_lm import ResNetBKLM
from resnet_bk.models.sparse_lm import MultiScaleSparseLM, SparseResNetBKLM
from resnet_bk.models.step6_all_lm import Step6AllLM
from resnet_bk.models.transformer_lm import Block as TransformerBlock
from resnet_bk.models.transformer_lm import TransformerLM

V, D, MAX_LEN, N = 40, 16, 32, 20


def tiny(n_layers: int, **fields) -> BKConfig:
    return BKConfig(**{"d_model": D, "n_layers": n_layers, "num_experts": 2, "max_seq_len": MAX_LEN, **fields})


#: name -> factory of a tiny instance (its config's dropout set by build); every model class of
#: resnet_bk/models appears here.
MODELS = {
    "resnet_bk": partial(ResNetBKLM, V, config=tiny(2)),
    "transformer": partial(TransformerLM, V, config=ModelConfig(d_model=D, n_layers=2, max_seq_len=MAX_LEN), n_heads=2),
    "act": partial(ACTResNetBKLM, V, config=tiny(3), halt_bias_init=0.0),
    "act_multiscale": partial(ACTMultiScaleLM, V, config=tiny(4), halt_bias_init=0.0),
    "adaptive_length": partial(AdaptiveLengthLM, V, config=tiny(3), n_pre=1, n_post=1, prior_rate=0.25),
    "conditional_moe": partial(ConditionalMoELM, V, config=tiny(2, num_experts=3), top_p=0.5, max_experts=2),
    "early_exit": partial(EarlyExitLM, V, config=tiny(3)),
    "multiscale": partial(MultiScaleLM, V, config=tiny(2)),
    "multiscale_hierarchical": partial(MultiScaleLM, V, config=tiny(4), hierarchical=True),
    "sparse": partial(SparseResNetBKLM, V, config=tiny(2)),
    "multiscale_sparse": partial(MultiScaleSparseLM, V, config=tiny(2)),
    # every technique but multi-scale (4 residual blocks: 1 pre, 1 inner, 2 steps); all: test_step6_all
    "step6_all": partial(Step6AllLM, V, config=tiny(4), multiscale=False, prior_rate=0.25, halt_bias_init=0.0),
}

#: Parameters that a single train-mode step may leave without a gradient, and why.
NO_GRADIENT = {
    # ACT: the last step always halts, and a position's remainder R reaches the halting units of the
    # steps before its halting step only; nothing is unused by design, so no exceptions.
}


def build(name: str, dropout: float = 0.0, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    factory = MODELS[name]
    return factory(config=replace(factory.keywords["config"], dropout=dropout)).double()


def _perturb(x: torch.Tensor, t: int) -> torch.Tensor:
    y = x.clone()
    y[:, t] = (y[:, t] + 1 + torch.arange(len(y))) % V  # a different token at t in every row
    return y


def _decisive(model: torch.nn.Module) -> torch.nn.Module:
    """Larger random weights, so that data-dependent decisions (keep, halt, exit, route, close a
    segment) differ between positions and flip when a token changes; an early-exit model gets a
    threshold at which some positions exit."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    if isinstance(model, EarlyExitLM):
        model.set_exit_threshold(0.2)
    return model


def test_every_model_class_is_covered():
    found = set()
    for info in pkgutil.iter_modules(models_package.__path__):
        module = importlib.import_module(f"resnet_bk.models.{info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, TiedEmbeddingLM) and cls is not TiedEmbeddingLM and cls.__module__ == module.__name__:
                found.add(cls)
    covered = {MODELS[name].func for name in MODELS}
    assert found == covered, f"add to MODELS: {sorted(c.__name__ for c in found - covered)}"


@pytest.mark.parametrize("name", MODELS)
def test_every_model_takes_the_same_config(name):
    """One BKConfig builds every model class (the Transformer reads its ModelConfig fields) and is
    what the model is: its width, length, dropout, feed-forward width and n_layers residual blocks."""
    shared = BKConfig(d_model=24, n_layers=4, d_ff=40, num_experts=2, max_seq_len=12, dropout=0.1)
    model = MODELS[name](config=shared)
    assert model.config is shared
    assert model.tok_emb.weight.shape == (V, 24) and model.pos_emb.num_embeddings == 12 and model.drop.p == 0.1
    hidden = [p.shape for n, p in model.named_parameters() if n.endswith("c_fc.weight")]
    assert hidden and all(40 in shape for shape in hidden), hidden
    residual = (ResNetBKBlock, MLPRefine, TransformerBlock)
    assert sum(isinstance(m, residual) for m in model.modules()) == 4
    assert model(torch.randint(0, V, (2, 12))).logits.shape == (2, 12, V)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("n", [1, 5, N])
def test_shapes(name, n):
    model = build(name).train()
    out = model(torch.randint(0, V, (2, n)))
    assert isinstance(out, LMOutput) and out.logits.shape == (2, n, V) and torch.isfinite(out.logits).all()
    for value in [*out.aux_losses.values(), *out.stats.values()]:
        assert torch.as_tensor(value).dim() == 0
    assert all(not torch.as_tensor(s).requires_grad for s in out.stats.values())
    assert model.lm_head.weight is model.tok_emb.weight
    with pytest.raises(ValueError, match=rf"{MAX_LEN + 1}.*{MAX_LEN}.*max_seq_len"):
        model(torch.randint(0, V, (1, MAX_LEN + 1)))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", MODELS)
def test_causal(name, train):
    model = _decisive(build(name, dropout=0.1)).train(train)
    x = torch.randint(0, V, (2, N), generator=torch.Generator().manual_seed(0))

    def logits(ids):
        torch.manual_seed(123)
        return model(ids).logits

    with torch.no_grad():
        base = logits(x)
        if train:  # dropout is on
            torch.manual_seed(124)
            assert (model(x).logits - base).abs().max() > 1e-6
        for t in (1, 9, N - 1):
            moved = logits(_perturb(x, t))
            torch.testing.assert_close(
                moved[:, :t], base[:, :t], atol=1e-12, rtol=0, msg=f"token {t} moved earlier logits"
            )
            assert (moved[:, t] - base[:, t]).abs().max() > 1e-9


@pytest.mark.parametrize("name", MODELS)
def test_greedy_generation_follows_the_models_own_logits(name):
    model = build(name)
    prompt = torch.randint(0, V, (2, 3), generator=torch.Generator().manual_seed(0))
    out = sample(model, prompt, 4, temperature=0)
    assert out.shape == (2, 7) and torch.equal(out[:, :3], prompt) and not model.training
    with torch.no_grad():
        assert torch.equal(out[:, -1], model(out[:, :-1]).logits[:, -1].argmax(-1))


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_round_trip(name):
    model, fresh = build(name, seed=0).eval(), build(name, seed=1).eval()
    x = torch.randint(0, V, (2, N))
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, model(x).logits, rtol=0, atol=0)


@pytest.mark.parametrize("name", MODELS)
def test_every_parameter_gets_a_gradient(name):
    model = _decisive(build(name, dropout=0.1)).train()
    x = torch.randint(0, V, (8, MAX_LEN + 1), generator=torch.Generator().manual_seed(0))
    out = model(x[:, :-1])
    loss = F.cross_entropy(out.logits.flatten(0, 1), x[:, 1:].flatten()) + sum(out.aux_losses.values())
    loss.backward()
    missing = [
        n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)
    ]
    assert sorted(missing) == sorted(NO_GRADIENT.get(name, [])), missing
