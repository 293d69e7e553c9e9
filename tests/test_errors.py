"""Clear errors, each through `resnet_bk.cli.main`: one line naming the problem
and the fix, exit code 2, no traceback (unless --debug), nothing already written changed.
docs/errors.md is the table of these cases."""

import hashlib
import lzma
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from resnet_bk.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
SMALL = [
    "--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--data.init_args.num_workers", "0",
    "--model.init_args.network.init_args.config.d_model", "16", "--model.init_args.network.init_args.config.n_layers", "1",
    "--data.init_args.seq_len", "16", "--data.init_args.max_train_tokens", "400", "--trainer.max_steps", "2",
    "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "2", "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
]  # fmt: skip


def fails(capsys, *args, code=2) -> str:
    """Run the CLI, expect exit `code` and exactly one stderr line starting with "error:"; return it."""
    try:
        got = main(list(args))
    except SystemExit as e:  # argument parsing errors exit from inside the parser
        got = e.code
    err = capsys.readouterr().err.strip()
    assert got == code, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def tree_digest(folder: Path) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def write_corpus(folder: Path, train=b" the cat sat on the mat . \n the dog sat . \n" * 20) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "wiki.train.tokens").write_bytes(train)
    (folder / "wiki.valid.tokens").write_bytes(b" the cat sat . \n" * 8)
    (folder / "wiki.test.tokens").write_bytes(b" the dog sat . \n" * 8)
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 2-step run of the small quickstart model: its run folder and last.ckpt."""
    root = tmp_path_factory.mktemp("runs")
    assert main(["fit", "--config", QUICKSTART, *SMALL, "--trainer.default_root_dir", str(root)]) == 0
    run = root / "quickstart" / "version_0"
    return run, run / "checkpoints" / "last.ckpt"


def test_unknown_model_class(capsys):
    line = fails(
        capsys, "fit", "--config", QUICKSTART, "--model.init_args.network.class_path", "resnet_bk.models.NoSuchLM"
    )
    assert "NoSuchLM" in line


def test_missing_and_empty_data_directory(tmp_path, capsys):
    line = fails(capsys, "fit", "--config", QUICKSTART, "--data.init_args.source", str(tmp_path / "nowhere"))
    assert "data directory not found" in line and "source=bundled" in line
    (tmp_path / "empty").mkdir()
    line = fails(capsys, "fit", "--config", QUICKSTART, "--data.init_args.source", str(tmp_path / "empty"))
    assert "missing wiki.train.tokens" in line and "it needs" in line


def test_non_utf8_token_file(tmp_path, capsys):
    data = write_corpus(tmp_path / "latin1", train=" the caf\xe9 sat . \n".encode("latin-1") * 5)
    line = fails(capsys, "fit", "--config", QUICKSTART, "--data.init_args.source", str(data),
                 "--data.init_args.cache_dir", str(tmp_path / "cache"))  # fmt: skip
    assert "wiki.train.tokens' is not UTF-8" in line and "0xe9 at offset 8" in line and "iconv" in line


def test_unreadable_token_file(tmp_path, capsys):
    data = write_corpus(tmp_path / "bad_xz")
    (data / "wiki.valid.tokens").unlink()
    (data / "wiki.valid.tokens.xz").write_bytes(lzma.compress(b" the cat sat . \n" * 100)[:40])  # truncated
    line = fails(capsys, "fit", "--config", QUICKSTART, "--data.init_args.source", str(data))
    assert "cannot read" in line and "wiki.valid.tokens.xz" in line
    if os.geteuid() != 0:  # root reads files whatever their mode
        (data / "wiki.valid.tokens.xz").unlink()
        (data / "wiki.valid.tokens").write_bytes(b" the cat \n")
        (data / "wiki.valid.tokens").chmod(0)
        line = fails(capsys, "fit", "--config", QUICKSTART, "--data.init_args.source", str(data))
        assert "cannot read" in line and "Permission denied" in line


def test_checkpoint_of_another_architecture_or_vocabulary(trained, tmp_path, capsys):
    run, ckpt = trained
    before = tree_digest(run)
    root = ["--trainer.default_root_dir", str(tmp_path)]
    line = fails(capsys, "validate", "--config", QUICKSTART, *SMALL, *root, "--ckpt_path", str(ckpt),
                 "--model.init_args.network.init_args.config.d_model", "32")  # fmt: skip
    assert "architecture does not match" in line and "(16,) in the checkpoint, (32,) configured" in line
    assert "config.yaml beside its checkpoints" in line

    data = write_corpus(tmp_path / "other")  # the same network on a 9-word corpus
    line = fails(capsys, "fit", "--config", QUICKSTART, *SMALL, *root, "--ckpt_path", str(ckpt),
                 "--data.init_args.source", str(data), "--data.init_args.cache_dir", str(tmp_path / "cache"))  # fmt: skip
    assert "vocabulary of 33279 tokens" in line and "has 9" in line
    assert tree_digest(run) == before  # the checkpoint and its run are untouched


def test_missing_checkpoint_file(tmp_path, capsys):
    line = fails(capsys, "validate", "--config", QUICKSTART, "--ckpt_path", str(tmp_path / "gone.ckpt"))
    assert "checkpoint not found" in line and "--ckpt_path last" in line


def test_seq_len_above_the_models_maximum(tmp_path, capsys):
    line = fails(capsys, "fit", "--config", QUICKSTART, *SMALL, "--trainer.default_root_dir", str(tmp_path),
                 "--data.init_args.seq_len", "128")  # quickstart's max_seq_len is 64  # fmt: skip
    assert "seq_len 128 exceeds the network's max_seq_len 64" in line
    assert "network.init_args.config.max_seq_len to >= 128" in line


def test_im_z_not_positive(capsys):
    line = fails(
        capsys, "fit", "--config", QUICKSTART, "--model.init_args.network.init_args.config.resolvent.z_imag", "0.0"
    )
    assert "Im z must be > 0" in line


def test_tokenizer_that_cannot_be_loaded_offline(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = fails(capsys, "fit", "--config", QUICKSTART, "--data.init_args.tokenizer", "no-such-org/no-such-tokenizer")
    assert "could not be loaded offline" in line and "HF_HUB_OFFLINE=0" in line


def test_debug_switch_shows_the_traceback(tmp_path):
    """The console entry point: one line by default, the traceback with --debug; exit 2 both times."""
    command = [sys.executable, "-m", "resnet_bk", "fit", "--config", QUICKSTART, "--data.init_args.source",
               str(tmp_path / "nowhere")]  # fmt: skip
    plain = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.strip().splitlines()[-1].startswith("error: WikiText data directory not found")
    debug = subprocess.run([*command, "--debug"], capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "FileNotFoundError" in debug.stderr


# ---- checkpoint files --------------------------------------------------------------------------
def test_truncated_checkpoint(trained, tmp_path, capsys):
    _, ckpt = trained
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    line = fails(capsys, "fit", "--config", QUICKSTART, *SMALL, "--trainer.default_root_dir", str(tmp_path),
                 "--ckpt_path", str(cut))  # fmt: skip
    assert "is truncated or corrupt" in line and "cut.ckpt" in line and "drop --ckpt_path" in line


def test_empty_checkpoint(tmp_path, capsys):
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    line = fails(capsys, "fit", "--config", QUICKSTART, *SMALL, "--ckpt_path", str(empty))
    assert "is empty (0 bytes" in line


def test_file_that_is_not_a_checkpoint(tmp_path, capsys):
    line = fails(capsys, "validate", "--config", QUICKSTART, *SMALL, "--ckpt_path", QUICKSTART)  # a YAML file
    assert "is not a checkpoint (torch.load:" in line


def test_bare_state_dict_is_not_a_lightning_checkpoint(trained, tmp_path, capsys):
    _, ckpt = trained
    bare = tmp_path / "weights.pt"
    torch.save(torch.load(ckpt, weights_only=False)["state_dict"], bare)
    line = fails(capsys, "fit", "--config", QUICKSTART, *SMALL, "--ckpt_path", str(bare))
    assert "is not a Lightning checkpoint" in line and "no state_dict and global_step" in line


# ---- config files ------------------------------------------------------------------------------
def test_config_file_that_is_not_yaml(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  init_args: [lr: 1\n")
    line = fails(capsys, "fit", "--config", str(bad))
    assert "is not valid YAML (line 3, column 1: expected ',' or ']'" in line and "configs/quickstart.yaml" in line


def test_config_file_that_is_not_text(tmp_path, capsys):
    binary = tmp_path / "model.yaml"
    binary.write_bytes(b"model:\n\xff\xfe\x00")
    line = fails(capsys, "fit", "--config", str(binary))
    assert "is not YAML text (byte 0xff at offset 7" in line


def test_config_file_that_is_not_a_mapping(tmp_path, capsys):
    listed = tmp_path / "list.yaml"
    listed.write_text("- model\n- data\n")
    line = fails(capsys, "fit", "--config", str(listed))
    assert "holds a YAML list, not the sections model:, data:, trainer:" in line


def test_config_without_a_model_section(tmp_path, capsys):
    data_only = tmp_path / "data_only.yaml"
    data_only.write_text("data:\n  init_args:\n    seq_len: 16\n")
    line = fails(capsys, "fit", "--config", str(data_only))
    assert "no model: section in" in line and "resnet_bk.models.ResNetBKLM" in line


def test_config_file_that_does_not_exist(tmp_path, capsys):
    line = fails(capsys, "fit", "--config", str(tmp_path / "nowhere.yaml"))
    assert "File does not exist" in line and "nowhere.yaml" in line


# ---- hyper-parameters --------------------------------------------------------------------------
def test_nonfinite_learning_rate(capsys):
    line = fails(capsys, "fit", "--config", QUICKSTART, "--model.init_args.lr", "nan")
    assert line.startswith("error: lr must be a finite positive number, got nan")


def test_negative_learning_rate(capsys):
    line = fails(capsys, "fit", "--config", QUICKSTART, "--model.init_args.lr=-0.001")
    assert line.startswith("error: lr must be a finite positive number, got -0.001")


def test_nonfinite_hyperparameter_in_a_config_file(tmp_path, capsys):
    inf = tmp_path / "inf.yaml"
    inf.write_text("model:\n  init_args:\n    weight_decay: .inf\n")
    line = fails(capsys, "fit", "--config", QUICKSTART, "--config", str(inf))
    assert line.startswith("error: weight_decay must be a finite number >= 0, got inf")


# ---- typos in keys -----------------------------------------------------------------------------
def test_typo_in_a_model_key_names_the_nearest_key(capsys):
    line = fails(capsys, "fit", "--config", QUICKSTART, "--model.init_args.lrr", "0.1")
    assert "'lrr' is not accepted; did you mean lr?" in line


def test_typo_in_a_network_key_names_the_nearest_key(tmp_path, capsys):
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  init_args:\n    network:\n      init_args:\n        hierarchcal: true\n")
    line = fails(capsys, "fit", "--config", str(ROOT / "configs" / "multiscale.yaml"), "--config", str(typo))
    assert "'hierarchcal' is not accepted; did you mean hierarchical?" in line and "Namespace(" not in line


def test_typo_in_a_network_config_key_names_the_nearest_field(tmp_path, capsys):
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  init_args:\n    network:\n      init_args:\n        config:\n          d_modle: 64\n")
    line = fails(capsys, "fit", "--config", QUICKSTART, "--config", str(typo))
    assert "does not accept option 'd_modle'; did you mean config.d_model?" in line and "Namespace(" not in line
    line = fails(
        capsys, "fit", "--config", QUICKSTART, "--model.init_args.network.init_args.config.resolvent.chanels", "4"
    )
    assert "did you mean config.resolvent.channels?" in line


def test_a_shared_key_outside_the_network_config_names_its_place(capsys):
    line = fails(capsys, "fit", "--config", QUICKSTART, "--model.init_args.network.init_args.d_model", "32")
    assert "'d_model' is not accepted; did you mean config.d_model?" in line


def test_network_config_value_out_of_range(capsys):
    line = fails(capsys, "fit", "--config", QUICKSTART, "--model.init_args.network.init_args.config.top_k", "3")
    assert "BKConfig: top_k must be an integer in 1..num_experts=2, got 3" in line


def test_typo_in_a_trainer_flag_names_the_nearest_key(capsys):
    line = fails(capsys, "fit", "--config", QUICKSTART, "--trainer.max_stesp", "5")
    assert "--trainer.max_stesp" in line and "did you mean trainer.max_steps?" in line


# ---- a failed start leaves nothing behind --------------------------------------------------------
def test_failed_start_leaves_no_run_folder(tmp_path, capsys):
    fails(capsys, "fit", "--config", QUICKSTART, *SMALL, "--trainer.default_root_dir", str(tmp_path),
          "--data.init_args.seq_len", "128")  # fails in setup, after the run folder got its config.yaml  # fmt: skip
    assert not (tmp_path / "quickstart").exists() or not any((tmp_path / "quickstart").iterdir())


def test_failed_resume_leaves_the_run_as_it_was(trained, capsys):
    run, ckpt = trained
    before = tree_digest(run)
    fails(capsys, "fit", "--config", QUICKSTART, *SMALL, "--ckpt_path", str(ckpt),
          "--model.init_args.network.init_args.config.d_model", "32")  # fmt: skip
    assert tree_digest(run) == before  # no config.resumed_at_step2.yaml, no new event file
