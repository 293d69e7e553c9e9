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

from resnet_bk.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
SMALL = [
    "--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--data.init_args.num_workers", "0",
    "--model.init_args.network.init_args.d_model", "16", "--model.init_args.network.init_args.n_layers", "1",
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
    line = fails(capsys, "fit", "--config", QUICKSTART, "--model.init_args.network.class_path", "resnet_bk.models.NoSuchLM")
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
                 "--model.init_args.network.init_args.d_model", "32")  # fmt: skip
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
    assert "seq_len 128 exceeds the network's max_seq_len 64" in line and "max_seq_len to >= 128" in line


def test_im_z_not_positive(capsys):
    line = fails(capsys, "fit", "--config", QUICKSTART, "--model.init_args.network.init_args.resolvent.z_imag", "0.0")
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
