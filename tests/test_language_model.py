"""LanguageModel: token-weighted perplexity, aux-loss weights, LR schedule, optimizer groups, NaN guard."""

import math
from functools import partial

import lightning as L
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lightning_modules import LanguageModel
from lightning_modules.language_model import warmup_cosine
from resnet_bk.models import BKConfig, LMOutput, ResNetBKLM

V = 11


class TinyLM(nn.Module):
    """Bigram model (embedding -> LayerNorm -> linear head), optionally returning given aux losses."""

    def __init__(self, vocab_size: int, d: int = 8, aux: tuple[str, ...] = (), nan: bool = False):
        super().__init__()
        self.emb, self.norm, self.head = nn.Embedding(vocab_size, d), nn.LayerNorm(d), nn.Linear(d, vocab_size)
        self.aux, self.nan = aux, nan

    def forward(self, input_ids):
        logits = self.head(self.norm(self.emb(input_ids)))
        if self.nan:
            logits = logits * float("nan")
        aux = {name: logits.square().mean() for name in self.aux}
        return LMOutput(logits, aux, {"logit_mean": logits.detach().mean()})


def make_batch(input_ids, targets):
    return {"input_ids": input_ids, "targets": targets, "index": torch.arange(len(input_ids))}


def uneven_batches():
    """Two batches of 5 and 2 sequences with 34 and 3 scored tokens: a per-batch mean would be wrong."""
    g = torch.Generator().manual_seed(0)
    first = make_batch(torch.randint(0, V, (5, 7), generator=g), torch.randint(0, V, (5, 7), generator=g))
    first["targets"][0, 6] = -100
    second = make_batch(torch.randint(0, V, (2, 7), generator=g), torch.full((2, 7), -100))
    second["targets"][0, :3] = torch.tensor([1, 2, 3])
    return [first, second]


def loader(batches):
    """A DataLoader that yields the given batches as they are."""
    return DataLoader(batches, batch_size=None)


def trainer(**kwargs):
    defaults = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(**{**defaults, **kwargs})


def test_val_ppl_is_token_weighted_over_the_split():
    torch.manual_seed(0)
    model = LanguageModel(network=TinyLM, vocab_size=V)
    batches = uneven_batches()
    metrics = trainer().validate(model, dataloaders=loader(batches), verbose=False)[0]

    nll, count, batch_means = 0.0, 0, []
    with torch.no_grad():
        for batch in batches:
            logp = F.log_softmax(model.model(batch["input_ids"]).logits.double(), dim=-1)
            mask = batch["targets"] != -100
            token_nll = -logp[mask].gather(1, batch["targets"][mask][:, None]).squeeze(1)
            nll, count = nll + token_nll.sum().item(), count + int(mask.sum())
            batch_means.append(token_nll.mean().item())
    assert count == 34 + 3
    assert metrics["val/loss"] == pytest.approx(nll / count, rel=1e-5)
    assert metrics["val/ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    # a mean of per-batch means weights the 3-token batch like the 34-token one, and differs
    assert abs(sum(batch_means) / 2 - nll / count) > 1e-3

    # test/ is the same computation, and the accumulators start fresh each run
    metrics = trainer().test(model, dataloaders=loader(batches), verbose=False)[0]
    assert metrics["test/ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    metrics = trainer().validate(model, dataloaders=loader(batches), verbose=False)[0]
    assert metrics["val/ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_loss_adds_weighted_aux_losses_and_logs_them():
    model = LanguageModel(
        network=partial(TinyLM, aux=("load_balance", "ponder")),
        vocab_size=V,
        aux_loss_weights={"load_balance": 0.5, "ponder": 2.0},
    )
    batch = uneven_batches()[0]
    loss, nll_sum, n_tokens, logs = model.compute_loss(batch, "train")
    aux = logs["aux/load_balance"]
    assert n_tokens == 34
    assert logs["ce"] == pytest.approx((nll_sum / 34).item())
    assert loss.item() == pytest.approx((logs["ce"] + 0.5 * aux + 2.0 * logs["aux/ponder"]).item(), rel=1e-6)
    assert set(logs) == {"ce", "aux/load_balance", "aux/ponder", "stats/logit_mean"}


def test_compiled_loss_serves_one_shape_per_mode_and_other_shapes_run_eagerly():
    model = LanguageModel(network=TinyLM, vocab_size=V)
    calls = []

    def compiled(input_ids, targets):  # stands in for torch.compile's function (compile is CUDA-only)
        calls.append(tuple(input_ids.shape))
        return model._loss_terms(input_ids, targets)

    model._loss_terms_fn = compiled
    full, partial_batch = uneven_batches()
    model.compute_loss(full, "train")
    model.compute_loss(partial_batch, "train")  # an epoch's last, smaller batch: eager, no new graph
    model.compute_loss(full, "train")
    model.eval()
    with torch.no_grad():
        model.compute_loss(partial_batch, "val")  # the first eval shape gets the compiled function
        model.compute_loss(full, "val")
    assert calls == [(5, 7), (5, 7), (2, 7)]


def test_step_scalars_are_handed_to_the_logger_only_at_logging_steps(tmp_path):
    model = LanguageModel(network=TinyLM, vocab_size=V)
    handed = []
    log_dict = model.log_dict
    model.log_dict = lambda logs, **kw: (handed.append(model.global_step), log_dict(logs, **kw))
    g = torch.Generator().manual_seed(0)
    batches = [make_batch(torch.randint(0, V, (2, 5), generator=g), torch.randint(0, V, (2, 5), generator=g))] * 6
    csv = L.pytorch.loggers.CSVLogger(tmp_path)
    trainer(max_steps=6, log_every_n_steps=3, logger=csv, limit_val_batches=0).fit(model, loader(batches))
    assert handed == [2, 5]  # the steps whose metrics the trainer writes (global_step counts from 0 here)
    text = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "train/ce" in text.splitlines()[0] and "train/stats/logit_mean" in text.splitlines()[0]


def test_aux_loss_without_weight_is_an_error_naming_it():
    model = LanguageModel(network=partial(TinyLM, aux=("ponder",)), vocab_size=V)  # default weights: load_balance
    with pytest.raises(ValueError, match="'ponder'.*no weight"):
        model.compute_loss(uneven_batches()[0], "train")
    # a weight whose loss the network never returns is fine (a dense model under the MoE default)
    LanguageModel(network=TinyLM, vocab_size=V).compute_loss(uneven_batches()[0], "train")


def test_subclass_adds_an_aux_weight_as_an_init_arg():
    class PonderLanguageModel(LanguageModel):
        def __init__(self, *args, ponder_weight: float = 0.1, **kwargs):
            super().__init__(*args, **kwargs)
            self.aux_loss_weights["ponder"] = ponder_weight

    model = PonderLanguageModel(network=partial(TinyLM, aux=("ponder",)), vocab_size=V, ponder_weight=3.0)
    loss, _, _, logs = model.compute_loss(uneven_batches()[0], "train")
    assert loss.item() == pytest.approx((logs["ce"] + 3.0 * logs["aux/ponder"]).item(), rel=1e-6)
    assert model.hparams.ponder_weight == 3.0


def test_warmup_cosine_values():
    f = partial(warmup_cosine, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]  # warmup: the first step is not wasted at 0
    assert f(4) == 1.0  # cosine starts at the peak
    assert f(9) == pytest.approx(0.55)  # halfway: min + (1 - min) / 2
    assert f(14) == pytest.approx(0.1)
    assert f(100) == pytest.approx(0.1)  # past the end it stays at the floor
    assert warmup_cosine(0, warmup_steps=0, total_steps=10, min_lr_ratio=0.0) == 1.0


def test_lr_follows_the_schedule_per_step_during_fit():
    lrs = []

    class RecordLR(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    model = LanguageModel(network=TinyLM, vocab_size=V, lr=0.01, warmup_steps=2, min_lr_ratio=0.2)
    batches = [uneven_batches()[0]] * 6
    trainer(max_steps=6, callbacks=[RecordLR()], limit_val_batches=0).fit(model, train_dataloaders=loader(batches))
    expected = [0.01 * warmup_cosine(s, 2, 6, 0.2) for s in range(6)]
    assert lrs == pytest.approx(expected)
    assert lrs[:3] == pytest.approx([0.005, 0.01, 0.01])


def test_no_weight_decay_on_biases_norms_and_tied_embeddings():
    model = LanguageModel(
        network=partial(ResNetBKLM, config=BKConfig(d_model=16, n_layers=1)), vocab_size=V, weight_decay=0.3
    )
    model.trainer = trainer(max_steps=10)
    optimizer = model.configure_optimizers()["optimizer"]
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.3 and no_decay["weight_decay"] == 0.0
    ids = lambda params: {id(p) for p in params}  # noqa: E731
    net = model.model
    assert ids([net.tok_emb.weight, net.pos_emb.weight, net.ln_f.weight, net.ln_f.bias]) <= ids(no_decay["params"])
    assert net.lm_head.weight is net.tok_emb.weight  # tied: one tensor, in one group only
    assert all(p.ndim >= 2 for p in decay["params"])
    names = {id(p): n for n, p in model.named_parameters()}
    assert not any(names[id(p)].endswith("bias") for p in decay["params"])  # grouped experts' (E, out) too
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_non_finite_loss_stops_before_the_step_is_logged():
    model = LanguageModel(network=partial(TinyLM, nan=True), vocab_size=V)
    t = trainer(max_steps=3, limit_val_batches=0)
    with pytest.raises(FloatingPointError, match="non-finite train loss .* global step 0, batch 0"):
        t.fit(model, train_dataloaders=loader([uneven_batches()[0]] * 3))
    assert not t.callback_metrics  # nothing was logged
