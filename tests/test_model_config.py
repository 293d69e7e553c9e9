"""The models' shared config (resnet_bk.models.config): validation as one-line errors, .of from the
dataclass, a mapping (nested resolvent block included) or None, unknown keys named with the valid
ones, and the variant arguments that must agree with it. That every model takes the same config:
tests/test_model_contract.py."""

from dataclasses import FrozenInstanceError, fields

import pytest

from resnet_bk.layers import ResolventConfig
from resnet_bk.models import BKConfig, ModelConfig, ResNetBKLM, TransformerLM
from resnet_bk.models.adaptive_length_lm import AdaptiveLengthLM
from resnet_bk.models.conditional_moe_lm import ConditionalMoELM
from resnet_bk.models.sparse_lm import MultiScaleSparseLM, SparseResNetBKLM

TINY = {"d_model": 8, "n_layers": 2, "num_experts": 2, "max_seq_len": 8}


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"d_model": 0}, "BKConfig: d_model must be an integer >= 1, got 0."),
        ({"n_layers": 0}, "BKConfig: n_layers must be an integer >= 1, got 0."),
        ({"max_seq_len": 2.5}, "BKConfig: max_seq_len must be an integer >= 1, got 2.5."),
        ({"d_ff": 0}, "BKConfig: d_ff must be an integer >= 1 or None (4 * d_model), got 0."),
        ({"dropout": 1.0}, "BKConfig: dropout must be in [0, 1), got 1.0."),
        ({"dropout": -0.1}, "BKConfig: dropout must be in [0, 1), got -0.1."),
        ({"dropout": float("nan")}, "BKConfig: dropout must be in [0, 1), got nan."),
        ({"num_experts": 0}, "BKConfig: num_experts must be an integer >= 1, got 0."),
        ({"num_experts": 2, "top_k": 3}, "BKConfig: top_k must be an integer in 1..num_experts=2, got 3."),
        ({"top_k": 0}, "BKConfig: top_k must be an integer in 1..num_experts=4, got 0."),
        ({"causal": "yes"}, "BKConfig: causal must be true or false, got 'yes'."),
        ({"resolvent": {"z_imag": 0.0}}, "ResolventConfig: Im z must be > 0"),
    ],
)
def test_bad_values_are_one_line_errors(bad, message):
    with pytest.raises(ValueError) as info:
        BKConfig(**bad)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_model_config_checks_its_own_fields_under_its_own_name():
    with pytest.raises(ValueError, match=r"^ModelConfig: d_model must be an integer >= 1, got True\.$"):
        ModelConfig(d_model=True)
    assert ModelConfig(d_model=8).ffn_width == 32 and ModelConfig(d_model=8, d_ff=5).ffn_width == 5


def test_of_takes_the_dataclass_a_mapping_or_none():
    config = BKConfig(d_model=64, resolvent=ResolventConfig(channels=4))
    assert BKConfig.of(config) is config
    assert BKConfig.of(None) == BKConfig()
    # a YAML block read without the CLI: the nested resolvent block becomes a ResolventConfig
    built = BKConfig.of({"d_model": 64, "resolvent": {"channels": 4}})
    assert built == config and isinstance(built.resolvent, ResolventConfig)
    assert ModelConfig.of(config) is config  # a BKConfig is a ModelConfig (the Transformer reads its fields)


def test_of_names_unknown_keys_and_the_valid_ones():
    with pytest.raises(ValueError) as info:
        BKConfig.of({"d_modle": 64, "n_layers": 2})
    names = [f.name for f in fields(BKConfig)]
    assert str(info.value) == f"BKConfig: unknown option(s) ['d_modle']; the options are {names}."
    with pytest.raises(ValueError, match=r"^ModelConfig: unknown option\(s\) \['num_experts'\]"):
        ModelConfig.of({"num_experts": 4})
    with pytest.raises(ValueError, match=r"^BKConfig: expected a BKConfig or a mapping, got ModelConfig\.$"):
        BKConfig.of(ModelConfig())


def test_configs_are_frozen_and_models_keep_theirs():
    config = BKConfig(**TINY)
    with pytest.raises(FrozenInstanceError):
        config.d_model = 16
    assert ResNetBKLM(10, config).config is config
    # a mapping is read with .of: the Transformer's config has no experts
    assert TransformerLM(10, {"d_model": 8, "n_layers": 1}, n_heads=2).config == ModelConfig(d_model=8, n_layers=1)


def test_variant_arguments_that_contradict_the_config_are_errors():
    with pytest.raises(ValueError, match=r"^ConditionalMoELM: .*leave config.top_k at 1, got 2\.$"):
        ConditionalMoELM(10, BKConfig(**TINY, top_k=2))
    for cls in (SparseResNetBKLM, MultiScaleSparseLM):
        with pytest.raises(ValueError, match=rf"^{cls.__name__}: the sparse layers are causal only"):
            cls(10, BKConfig(**TINY, causal=False))
    with pytest.raises(ValueError, match=r"^AdaptiveLengthLM: need n_pre >= 1, n_post >= 0 and n_pre \+ n_post <= "):
        AdaptiveLengthLM(10, BKConfig(**TINY), n_pre=2, n_post=1)
    model = AdaptiveLengthLM(10, BKConfig(**{**TINY, "n_layers": 5}), n_pre=2, n_post=1)
    assert [len(b) for b in (model.pre_blocks, model.inner_blocks, model.post_blocks)] == [2, 2, 1]
