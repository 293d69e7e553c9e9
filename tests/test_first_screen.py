"""What a new user sees: the quickstart command, run for a few steps as a user runs it (a separate
process, its whole stdout and stderr captured), prints no warning, no negative count, no v_num and
no FLOPs column; the progress bar counts the run's real steps and epochs."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WARNING_LOCATION = re.compile(r"\.py:\d+: ")  # how Python (and Lightning) print a warning's origin
NEGATIVE_COUNT = re.compile(r"(?<![\w.])-\d")  # e.g. "Epoch 0/-2"


def test_quickstart_first_screen_is_clean(tmp_path):
    command = [sys.executable, "-m", "resnet_bk", "fit", "--config", "configs/quickstart.yaml",
               "--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
               "--trainer.default_root_dir", str(tmp_path)]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    screen = run.stdout + run.stderr
    assert run.returncode == 0, screen
    lines = screen.splitlines()
    assert not [line for line in lines if "Warning" in line or WARNING_LOCATION.search(line)], screen
    assert not [line for line in lines if NEGATIVE_COUNT.search(line)], screen
    assert "v_num" not in screen and "FLOPs" not in screen and "Tip:" not in screen, screen
    assert "Epoch 1/1" in screen and "4/4" in screen, screen  # 4 of 4 steps, in the first of 1 epoch
    assert "ResNetBKLM" in screen and "Trainable params" in screen  # the model summary is still there


def test_tqdm_bar_counts_steps_across_epochs(tmp_path, capsys):
    """Where Rich is not installed Lightning's default bar is tqdm's: its stand-in counts the same way.
    6 steps over epochs of 4 batches (64 training tokens = 4 windows of 16, batch 1)."""
    import lightning as L

    from callbacks import TQDMStepProgressBar
    from resnet_bk.cli import build

    cli = build(["--config", str(ROOT / "configs" / "quickstart.yaml"), "--trainer.accelerator", "cpu",
                 "--data.init_args.num_workers", "0", "--model.init_args.network.init_args.config.d_model", "16",
                 "--model.init_args.network.init_args.config.n_layers", "1", "--data.init_args.seq_len", "16",
                 "--data.init_args.batch_size", "1", "--data.init_args.max_train_tokens", "65",
                 "--trainer.default_root_dir", str(tmp_path)])  # fmt: skip
    trainer = L.Trainer(accelerator="cpu", max_steps=6, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, callbacks=[TQDMStepProgressBar()])  # fmt: skip
    trainer.fit(cli.model, cli.datamodule)
    out = capsys.readouterr().out  # tqdm's bars write to stdout
    assert "Epoch 2/2" in out and "6/6" in out and "v_num" not in out, out
    assert not NEGATIVE_COUNT.search(out), out
