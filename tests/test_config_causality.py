"""Every config's network is causal (docs/design.md section 3): change token t and no logit at a
position < t moves, in eval mode and in train mode with dropout > 0.

In train mode the RNG is re-seeded before each forward pass, so the two passes draw the same noise
wherever the noise does not depend on the tokens; a dropout mask or Gumbel sample drawn only for
rows that a data-dependent gather kept would make an earlier position's noise depend on later
tokens, and this test fails."""

from pathlib import Path

import pytest
import torch
from fit_args import tiny_fit_args

from resnet_bk.cli import build

CONFIGS = sorted(p.name for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
N = 24
POSITIONS = (1, 12, 23)


def _perturb(x: torch.Tensor, t: int, vocab: int) -> torch.Tensor:
    y = x.clone()
    y[:, t] = (y[:, t] + 1 + torch.arange(len(y))) % vocab  # a different token at t in every row
    return y


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("runs"))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("config", CONFIGS)
def test_config_network_is_causal(config, train, root):
    args = tiny_fit_args(seq_len=N, d_model=16, dropout=0.1, max_seq_len=N)
    cli = build(["--config", str(Path("configs") / config), *args, "--trainer.default_root_dir", root])
    model = cli.model.model.double().train(train)
    with torch.no_grad():  # large random weights: data-dependent decisions (keep, halt, route) flip with a token
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    vocab = cli.datamodule.vocab_size
    x = torch.randint(0, vocab, (2, N), generator=torch.Generator().manual_seed(0))

    def logits(ids):
        torch.manual_seed(123)
        return model(ids).logits

    with torch.no_grad():
        base = logits(x)
        if train:  # dropout is on: a different seed moves the logits
            torch.manual_seed(124)
            assert (model(x).logits - base).abs().max() > 1e-6
        for t in POSITIONS:
            moved = logits(_perturb(x, t, vocab))
            torch.testing.assert_close(
                moved[:, :t], base[:, :t], atol=1e-12, rtol=0, msg=f"token {t} moved earlier logits"
            )
            assert (moved[:, t] - base[:, t]).abs().max() > 1e-9  # the change is visible where allowed
