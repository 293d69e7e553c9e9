"""The `lightning` CLI: every config instantiates, a short fit learns and leaves a config and checkpoints,
validate restores the checkpoint, and bad input gives one-line errors."""

import math
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from lightning_modules import LanguageModel
from resnet_bk.cli import build, main
from resnet_bk.models import BKConfig, ResNetBKLM, TransformerLM, count_parameters

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
QUICKSTART = str(CONFIGS / "quickstart.yaml")
# Whatever a config asks for, tests run on CPU in float32 without loader workers.
ON_CPU = ["--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--data.init_args.num_workers", "0"]


def events(log_dir: Path) -> EventAccumulator:
    (path,) = log_dir.glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(path))
    accumulator.Reload()
    return accumulator


def scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of one TensorBoard scalar in a run's log dir."""
    return [(e.step, e.value) for e in events(log_dir).Scalars(tag)]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("runs"))
    return {
        name: build(["--config", str(CONFIGS / f"{name}.yaml"), "--trainer.default_root_dir", root, *ON_CPU])
        for name in ("quickstart", "resnet_bk", "transformer")
    }


@pytest.mark.parametrize(
    "name, network", [("quickstart", ResNetBKLM), ("resnet_bk", ResNetBKLM), ("transformer", TransformerLM)]
)
def test_build_instantiates_each_config(built, name, network):
    cli = built[name]
    assert isinstance(cli.model, LanguageModel) and isinstance(cli.model.model, network)
    # vocab_size comes from the data module, never from the config
    vocab_size = cli.datamodule.vocab_size
    assert cli.model.hparams.vocab_size == vocab_size == cli.model.model.tok_emb.num_embeddings > 30_000
    # hparams hold the config's network block (what load_from_checkpoint re-instantiates)
    assert cli.model.hparams.network["class_path"] == f"resnet_bk.models.{network.__name__}"
    # the default logger is named after the config file
    assert Path(cli.trainer.logger.log_dir).parent.name == name


def test_build_applies_overrides(tmp_path):
    cli = build([
        "--config", QUICKSTART, "--trainer.default_root_dir", str(tmp_path), *ON_CPU,
        "--model.init_args.lr", "0.0123",
        "--model.init_args.network.init_args.config.n_layers", "1",
        "--data.init_args.seq_len", "32",
        "--trainer.max_steps", "7",
    ])  # fmt: skip
    assert cli.model.lr == 0.0123 and len(cli.model.model.blocks) == 1
    assert cli.datamodule.seq_len == 32 and cli.trainer.max_steps == 7
    assert cli.trainer.default_root_dir == str(tmp_path)


def test_config_may_give_init_args_only_for_the_default_classes(tmp_path):
    config = tmp_path / "short.yaml"
    config.write_text(
        "model:\n  init_args:\n    network:\n      class_path: resnet_bk.models.TransformerLM\n"
        "      init_args: {config: {d_model: 32, n_layers: 1}}\ndata:\n  init_args: {seq_len: 16}\n"
    )
    cli = build(["--config", str(config), "--trainer.default_root_dir", str(tmp_path), *ON_CPU])
    assert type(cli.model) is LanguageModel and isinstance(cli.model.model, TransformerLM)
    assert cli.datamodule.seq_len == 16
    assert Path(cli.trainer.logger.log_dir).parent.name == "short"


def test_transformer_config_matches_resnet_bk_parameter_count(built):
    n_bk = count_parameters(built["resnet_bk"].model.model)
    n_tf = count_parameters(built["transformer"].model.model)
    assert abs(n_tf - n_bk) / n_bk < 0.01, (n_bk, n_tf)
    # the counts quoted in the configs' comments
    assert (n_bk, n_tf) == (21_211_008, 21_203_712)
    assert "21,211,008" in (CONFIGS / "resnet_bk.yaml").read_text()
    assert "21,203,712" in (CONFIGS / "transformer.yaml").read_text()


def test_fit_learns_then_validate_restores_the_checkpoint(tmp_path):
    tiny = [
        "--model.init_args.network.init_args.config.d_model", "32",
        "--model.init_args.network.init_args.config.n_layers", "1",
        "--model.init_args.warmup_steps", "5",
        "--data.init_args.seq_len", "32",
        "--data.init_args.max_train_tokens", "20000",
        "--trainer.max_steps", "60",
        "--trainer.val_check_interval", "20",
        "--trainer.limit_val_batches", "2",
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    assert main(["fit", "--config", QUICKSTART, "--trainer.default_root_dir", str(tmp_path), *ON_CPU, *tiny]) == 0

    run = tmp_path / "quickstart" / "version_0"
    ppl = [value for _, value in scalars(run, "val/ppl")]
    assert len(ppl) == 3 and all(math.isfinite(p) for p in ppl)
    assert ppl[0] > ppl[1] > ppl[2], ppl
    assert scalars(run, "train/loss") and scalars(run, "lr-AdamW/decay")
    # TensorBoard's HPARAMS tab: the config's hyper-parameters against val/ppl
    summary = events(run).PluginTagToContent("hparams")["_hparams_/experiment"]
    experiment = plugin_data_pb2.HParamsPluginData.FromString(summary).experiment
    assert "val/ppl" in {m.name.tag for m in experiment.metric_infos}
    assert {"lr", "network/init_args/config/d_model", "data/seq_len"} <= {h.name for h in experiment.hparam_infos}
    config = run / "config.yaml"
    assert "d_model: 32" in config.read_text()
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_file() and len(list(last.parent.glob("step*-val_loss*.ckpt"))) == 1

    # a notebook loads the checkpoint without the CLI: hparams re-instantiate the network block
    restored = LanguageModel.load_from_checkpoint(last)
    assert restored.model.tok_emb.embedding_dim == 32 and restored.hparams.vocab_size > 30_000

    # the saved config alone reproduces the run; validating its last checkpoint gives the last val/ppl
    assert main(["validate", "--config", str(config), "--ckpt_path", str(last)]) == 0
    validated = [value for _, value in scalars(tmp_path / "quickstart" / "version_1", "val/ppl")]
    assert validated == pytest.approx([ppl[-1]], rel=1e-5)


def test_unknown_config_key_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", QUICKSTART, "--model.init_args.learning_rate", "1e-3"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "learning_rate" in err and len(err.splitlines()) == 1, err

    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  init_args:\n    network:\n      init_args:\n        d_modle: 64\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", QUICKSTART, "--config", str(bad)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "d_modle" in err and len(err.splitlines()) == 1, err


def test_bad_value_is_a_one_line_error(capsys):
    assert main(["fit", "--config", QUICKSTART, "--data.init_args.seq_len", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "seq_len must be >= 1" in err and len(err.splitlines()) == 1, err


def test_console_script_help():
    script = shutil.which("lightning", path=os.path.dirname(sys.executable))
    command = [script] if script else [sys.executable, "-m", "resnet_bk"]
    out = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert all(sub in out.stdout for sub in ("fit", "validate", "test", "predict")), out.stdout


def test_python_dash_m_resnet_bk_help(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["resnet_bk", "fit", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("resnet_bk", run_name="__main__")
    assert exit_info.value.code == 0
    assert "usage: python -m resnet_bk" in capsys.readouterr().out


@pytest.mark.parametrize("config", sorted(p.stem for p in CONFIGS.glob("*.yaml")))
def test_aux_loss_weights_of_the_config_are_the_ones_used(tmp_path, config):
    """One place decides an aux-loss weight: model.init_args.aux_loss_weights, never a module's own default."""
    args = ["--config", str(CONFIGS / f"{config}.yaml"), "--trainer.default_root_dir", str(tmp_path), *ON_CPU]
    weights = dict(build(args).model.aux_loss_weights)
    doubled = {name: 2 * w + 0.5 for name, w in weights.items()}
    flow = "{" + ", ".join(f"{k}: {v}" for k, v in doubled.items()) + "}"
    assert build([*args, "--model.init_args.aux_loss_weights", flow]).model.aux_loss_weights == doubled


def test_a_weight_outside_aux_loss_weights_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "act.yaml"), "--model.init_args.ponder_weight", "0.03"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "ponder_weight" in err and len(err.splitlines()) == 1, err
    with pytest.raises(ValueError, match=r"aux_loss_weights\['ponder'\] must be a finite number >= 0"):
        LanguageModel(
            network=lambda v: ResNetBKLM(v, BKConfig(d_model=8, n_layers=1)),
            vocab_size=10,
            aux_loss_weights={"ponder": -1.0},
        )


def help_page(capsys, *args) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_help_names_the_model_and_data_options_and_lists_only_the_projects_networks(capsys):
    fit_help = " ".join(help_page(capsys, "fit", "--help").split())
    assert "fit --model.help LanguageModel" in fit_help and "fit --data.help WikiTextDataModule" in fit_help
    model_help = help_page(capsys, "fit", "--model.help", "LanguageModel")
    assert "--model.lr" in model_help and "resnet_bk.models.ResNetBKLM" in model_help
    assert "torch.nn" not in model_help and len(model_help.splitlines()) < 100
    network_help = help_page(capsys, "fit", "--model.init_args.network.help", "ResNetBKLM")
    assert "--network.config.d_model" in network_help and "--network.config.num_experts" in network_help


def test_null_for_an_argument_of_a_nested_class_on_the_command_line(tmp_path):
    """jsonargparse refuses `null` given directly to an argument of a class nested in another's
    (prior_rate of the network inside the LightningModule: "Expected a <class 'float'>"); the CLI
    writes it as a merge into that class, which keeps every other argument of the config."""
    from resnet_bk.cli_input import null_of_nested_class_args

    key = "--model.init_args.network.init_args.config.resolvent.z_imag_max"
    merge = '{"init_args": {"config": {"resolvent": {"z_imag_max": null}}}}'
    assert null_of_nested_class_args([key, "null", "--trainer.max_steps", "2"]) == [
        "--model.init_args.network",
        merge,
        "--trainer.max_steps",
        "2",
    ]
    assert null_of_nested_class_args([f"{key}=None"]) == ["--model.init_args.network", merge]
    assert null_of_nested_class_args(["--model.init_args.lr", "null", key, "0.5"]) == [
        "--model.init_args.lr",
        "null",
        key,
        "0.5",
    ]
    where = ["--trainer.default_root_dir", str(tmp_path), *ON_CPU]
    prior_rate = "--model.init_args.network.init_args.prior_rate"
    cli = build(["--config", str(CONFIGS / "adaptive_length.yaml"), prior_rate, "null", *where])
    assert cli.model.model.prior_rate is None and cli.model.model.rate_target == 0.25
    cli = build(["--config", str(CONFIGS / "resnet_bk.yaml"), key, "null", *where])
    resolvent = cli.model.model.config.resolvent
    assert resolvent.z_imag_max is None and resolvent.channels == 64 and resolvent.gate == "sigmoid"
