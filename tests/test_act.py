"""ACT (resnet_bk.layers.act, resnet_bk.models.act_lm): causality with mixed halting, short and odd
lengths, halted work really skipped (calls and rows counted), the gathered fast path against a
dense masked reference, gradients to the halting units, the Lightning module and its FLOP log."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from resnet_bk.layers.act import AdaptiveDepth, run_bk_block
from resnet_bk.models.act_lm import ACTResNetBKLM
from resnet_bk.models.config import BKConfig

V, D, L = 40, 16, 4


def _model(**config) -> ACTResNetBKLM:
    config = {"d_model": D, "n_layers": L, "num_experts": 2, "max_seq_len": 64, **config}
    return ACTResNetBKLM(V, BKConfig(**config))


def _mixed_halting(model: ACTResNetBKLM, scale: float = 2.0) -> ACTResNetBKLM:
    """Halting units with large random weights, so positions halt at different layers."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for unit in model.act.halting:
            unit.proj.weight.copy_(torch.randn(unit.proj.weight.shape, generator=g) * scale)
            unit.proj.bias.fill_(0.0)
    return model


def _perturb(x: torch.Tensor, t: int) -> torch.Tensor:
    y = x.clone()
    y[:, t] = (y[:, t] + 1 + torch.arange(len(y))) % V
    return y


@pytest.mark.parametrize("train", [True, False])
def test_causality_with_mixed_halting(train):
    torch.manual_seed(0)
    model = _mixed_halting(_model().double()).train(train)
    x = torch.randint(0, V, (3, 21))
    with torch.no_grad():
        out = model(x)
        fracs = [float(out.stats[f"halt_frac/{l}"]) for l in range(1, L + 1)]
        assert sum(f > 0 for f in fracs) >= 2, fracs  # the gathered paths are exercised
        for t in (0, 1, 9, 20):
            moved = model(_perturb(x, t)).logits
            torch.testing.assert_close(moved[:, :t], out.logits[:, :t], atol=1e-12, rtol=0)
            assert (moved[:, t] - out.logits[:, t]).abs().max() > 1e-9


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_short_and_odd_lengths(n):
    torch.manual_seed(0)
    model = _mixed_halting(_model())
    out = model(torch.randint(0, V, (2, n)))
    assert out.logits.shape == (2, n, V) and torch.isfinite(out.logits).all()
    assert 1.0 <= float(out.stats["layers_executed"]) <= L
    assert sum(float(out.stats[f"halt_frac/{l}"]) for l in range(1, L + 1)) == pytest.approx(1.0)
    assert all(not torch.as_tensor(v).requires_grad for v in out.stats.values())


def _count_calls(model: ACTResNetBKLM):
    """Wrap every layer's feed_forward and mix: per layer, [feed_forward calls, rows, mix calls]."""
    counts = [[0, 0, 0] for _ in model.blocks]
    for i, block in enumerate(model.blocks):
        ff, mix = block.bk.feed_forward, block.bk.mix

        def counted_ff(x, gathered=None, i=i, ff=ff):
            counts[i][0] += 1
            counts[i][1] += x.reshape(-1, x.shape[-1]).shape[0]
            return ff(x, gathered)

        def counted_mix(h, gathered=None, i=i, mix=mix):
            counts[i][2] += 1
            return mix(h, gathered)

        block.bk.feed_forward, block.bk.mix = counted_ff, counted_mix
    return counts


def test_every_position_halting_at_layer_1_runs_one_layer():
    torch.manual_seed(0)
    model = _model()
    with torch.no_grad():
        model.act.halting[0].proj.bias.fill_(20.0)  # p_1 ~ 1 >= 0.99 everywhere
    counts = _count_calls(model)
    x = torch.randint(0, V, (3, 10))
    out = model(x)
    assert counts == [[1, 30, 1], [0, 0, 0], [0, 0, 0], [0, 0, 0]]
    assert float(out.stats["layers_executed"]) == 1.0 and out.stats["layers_run"] == 1.0
    assert out.stats["ffn_rows_frac"] == pytest.approx(1 / L)
    assert float(out.aux_losses["ponder"]) == pytest.approx(2.0)  # N + R = 1 + 1
    # The output is the state after layer 1 (weight R = 1), read by ln_f and the head.
    x1, *_ = run_bk_block(model.blocks[0], model.drop(model.tok_emb(x) + model.pos_emb(torch.arange(10))))
    torch.testing.assert_close(out.logits, model.lm_head(model.ln_f(x1)))


def test_halted_rows_skip_the_feed_forward():
    """Rows entering feed_forward = positions still running at each layer; the count is exact."""
    torch.manual_seed(0)
    model = _mixed_halting(_model())
    counts = _count_calls(model)
    x = torch.randint(0, V, (4, 15))
    with torch.no_grad():
        out = model(x)
    n = x.numel()
    halted = [float(out.stats[f"halt_frac/{l}"]) * n for l in range(1, L + 1)]
    running = [n - round(sum(halted[:l])) for l in range(L)]  # entering layer l+1
    assert [c[1] for c in counts] == running
    assert sum(c[1] for c in counts) == pytest.approx(float(out.stats["layers_executed"]) * n)
    assert running[-1] < n  # something was skipped


def _dense_reference(model: ACTResNetBKLM, input_ids: torch.Tensor) -> torch.Tensor:
    """ACT computed densely: every layer on every position, then masked. Halted positions feed
    LN(frozen state) to the mix and keep their state; output = sum_l w_l s_l (Graves)."""
    n = input_ids.shape[1]
    x = model.drop(model.tok_emb(input_ids) + model.pos_emb(torch.arange(n)))
    cum = torch.zeros(x.shape[:2], dtype=x.dtype)
    running = torch.ones(x.shape[:2], dtype=torch.bool)
    y = torch.zeros_like(x)
    for l, block in enumerate(model.blocks):
        xn = block.ln(x)
        h_all, _, _ = block.bk.feed_forward(xn)
        h = torch.where(running[..., None], h_all, xn)
        out, _ = block.bk.mix(h)
        x = torch.where(running[..., None], x + out, x)
        if l < L - 1:
            p = model.act.halting[l](x)
            halt = running & (cum + p >= model.act.threshold)
        else:
            p, halt = torch.zeros_like(cum), running
        cont = running & ~halt
        w = torch.where(halt, 1 - cum, torch.where(cont, p, torch.zeros_like(p)))
        y = y + w[..., None] * x
        cum = torch.where(cont, cum + p, cum)
        running = cont
    return model.lm_head(model.ln_f(y))


def test_gathered_path_matches_dense_reference():
    torch.manual_seed(0)
    model = _mixed_halting(_model(num_experts=3)).double().eval()
    x = torch.randint(0, V, (3, 17))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, _dense_reference(model, x), atol=1e-10, rtol=1e-10)


def test_gradient_reaches_every_used_halting_unit():
    torch.manual_seed(0)
    model = _model()  # default init: every position halts at layer 2 (p_1 ~ 0.73)
    x = torch.randint(0, V, (2, 12))
    out = model(x)
    loss = F.cross_entropy(out.logits.flatten(0, 1), torch.randint(0, V, (24,))) + 0.01 * out.aux_losses["ponder"]
    loss.backward()
    unit = model.act.halting[0].proj
    assert unit.weight.grad is not None and unit.weight.grad.abs().sum() > 0
    assert unit.bias.grad.abs() > 0
    # The ponder cost alone pushes halting earlier: its gradient w.r.t. the bias of unit 1 is < 0.
    model.zero_grad()
    model(x).aux_losses["ponder"].backward()
    assert model.act.halting[0].proj.bias.grad < 0


def test_adaptive_depth_rejects_bad_arguments():
    with pytest.raises(ValueError, match="threshold"):
        AdaptiveDepth(D, 3, threshold=0.0)
    with pytest.raises(ValueError, match="n_steps"):
        AdaptiveDepth(D, 0)


def test_lightning_module_adds_ponder_and_logs_flops():
    from functools import partial

    import lightning as L_

    from callbacks import FlopsPerToken
    from lightning_modules import LanguageModel

    torch.manual_seed(0)
    module = LanguageModel(
        network=partial(ACTResNetBKLM, config=BKConfig(d_model=D, n_layers=2, num_experts=2, max_seq_len=16)),
        vocab_size=V,
        aux_loss_weights={"load_balance": 0.01, "ponder": 0.5},
    )
    batch = {"input_ids": torch.randint(0, V, (2, 8)), "targets": torch.randint(0, V, (2, 8)), "index": torch.arange(2)}
    result = module.compute_loss(batch, "train")
    expected = result.logs["ce"] + 0.01 * result.logs["aux/load_balance"] + 0.5 * result.logs["aux/ponder"]
    assert result.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert "stats/layers_executed" in result.logs and "stats/halt_frac/1" in result.logs

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
    # 2 layers, both run at init (halting at layer 2): per token 2 * (16 D^2 + router + v/g proj) + head.
    body = metrics["val/flops_per_token_body"]
    assert body > 2 * 16 * D * D
    assert metrics["val/flops_per_token"] == pytest.approx(body + 2 * D * V)
