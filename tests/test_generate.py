"""resnet_bk.generate.sample: shapes, greedy = argmax, reproducible draws, context cropping."""

import pytest
import torch

from resnet_bk.generate import sample
from resnet_bk.models import BKConfig, ResNetBKLM


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ResNetBKLM(50, BKConfig(d_model=16, n_layers=1, num_experts=2, max_seq_len=8))


def test_greedy_is_argmax(model):
    prompt = torch.tensor([1, 2, 3])
    out = sample(model, prompt, 3, temperature=0)
    assert out.shape == (6,) and torch.equal(out[:3], prompt)
    with torch.no_grad():
        assert out[3] == model(prompt[None]).logits[0, -1].argmax()


def test_draws_are_reproducible_and_cropped_to_context(model):
    prompt = torch.tensor([[1, 2], [3, 4]])
    a = sample(model, prompt, 10, top_k=5, generator=torch.Generator().manual_seed(1))  # 12 > max_seq_len 8
    b = sample(model, prompt, 10, top_k=5, generator=torch.Generator().manual_seed(1))
    assert a.shape == (2, 12) and torch.equal(a, b) and int(a.max()) < 50
    with pytest.raises(ValueError):
        sample(model, prompt, 1, temperature=-1)
