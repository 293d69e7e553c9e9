"""The `lightning` command: train and evaluate any resnet_bk model from a YAML config.

    lightning fit --config configs/quickstart.yaml
    lightning fit --config configs/resnet_bk.yaml --trainer.max_steps 2000 --model.init_args.lr 3e-4
    lightning validate --config runs/quickstart/version_0/config.yaml --ckpt_path runs/quickstart/version_0/checkpoints/last.ckpt
    lightning fit --help / lightning fit --config C --print_config

The command line is the experiment and the saved config its record: every run writes the full
resolved config (all defaults included) to runs/<experiment>/version_<n>/config.yaml beside its
TensorBoard events and checkpoints, and that file alone reproduces the run.

A config names a LightningModule (lightning_modules.LanguageModel or a subclass) with a network
block, and a data module; data.vocab_size is passed to model.init_args.vocab_size when the classes
are instantiated, and LanguageModel calls network(vocab_size). So a network block never names the
vocabulary size.

Defaults (each overridable): model class_path lightning_modules.LanguageModel and data class_path
datamodules.WikiTextDataModule (a config may give their init_args only); trainer.default_root_dir
runs; a TensorBoardLogger under <default_root_dir>/<experiment>, where <experiment> is the first
--config file's name without .yaml (else "default"); ModelCheckpoint on val/loss with last.ckpt;
LearningRateMonitor; seed_everything 1234.

Known user errors print one line `error: ...` and exit 2 (a non-finite loss exits 1); pass --debug
(first argument or anywhere) or set RESNET_BK_DEBUG=1 for the full traceback. docs/errors.md lists them.

Resuming: `--ckpt_path last` resumes from the newest runs/<experiment>/version_*/checkpoints/last.ckpt
(the resumed run logs to a new version folder; nothing of the old one is rewritten). Checkpoints are
written atomically by lightning_modules.checkpoint_io.AtomicCheckpointIO, which the CLI installs.

`build(args)` makes the same CLI without running a subcommand, for notebooks and tests: `cli = build(["--config", "configs/quickstart.yaml"])`, then
`cli.trainer.fit(cli.model, cli.datamodule)`.
"""

from __future__ import annotations

import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Optional

from jsonargparse import Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lightning_modules import LanguageModel
from lightning_modules.checkpoint_io import AtomicCheckpointIO

DEBUG_ENV = "RESNET_BK_DEBUG"
DEFAULT_ROOT_DIR = "runs"
DEFAULT_SEED = 1234

# Recorded in every saved config (unlike LightningCLI's trainer_defaults callbacks, which are not).
DEFAULT_CALLBACKS = [
    {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {
            "monitor": "val/loss",
            "mode": "min",
            "save_last": True,
            # the metric names contain "/", which ModelCheckpoint would turn into a sub-directory
            "filename": "step{step}-val_loss{val/loss:.4f}",
            "auto_insert_metric_name": False,
        },
    },
    {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor", "init_args": {"logging_interval": "step"}},
]

# Where a ValueError / FileNotFoundError is a message for the user, not a bug report: this project's
# packages, and jsonargparse, which re-raises what a class's __init__ raised while instantiating.
_PROJECT = Path(__file__).resolve().parent.parent
_USER_ERROR_ORIGINS = tuple(
    f"{_PROJECT / package}{os.sep}" for package in ("resnet_bk", "lightning_modules", "datamodules", "callbacks")
) + (f"{os.sep}jsonargparse{os.sep}",)
# jsonargparse's explanations around the one line that says what is wrong.
_NOISE = (
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "- Expected a <class 'NoneType'>",
    "Given value type:",
    "Given value:",
)


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _one_line(message: str) -> str:
    """A (jsonargparse) error message without its explanations, on one line."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    kept = [line.removeprefix("- ") for line in lines if not line.startswith(_NOISE)]
    return " ".join(kept or lines)


class _Parser(LightningArgumentParser):
    """Parse errors as one line instead of the usage of every option (RESNET_BK_DEBUG=1: the full usage)."""

    def error(self, message: str, ex: Optional[Exception] = None):
        if not self.exit_on_error or _debug():
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"error: {_one_line(message)} (see: {prog} --help)\n")
        sys.exit(2)


class ResNetBKCLI(LightningCLI):
    """LightningCLI with this project's defaults; see the module docstring."""

    def __init__(self, args=None, run: bool = True, **kwargs):
        kwargs.setdefault("model_class", LanguageModel)
        kwargs.setdefault("parser_class", _Parser)
        kwargs.setdefault("parser_kwargs", {"description": "Train and evaluate resnet_bk language models."})
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("seed_everything_default", DEFAULT_SEED)
        kwargs.setdefault("trainer_defaults", {"default_root_dir": DEFAULT_ROOT_DIR})
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        # One way to set the optimizer: LanguageModel's own hyper-parameters.
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(args=args, run=run, **kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        # build(args) runs under pytest or Jupyter, whose sys.argv is theirs: LightningCLI's warning
        # about args given beside sys.argv would fire on every call.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        # LightningCLI would silently replace the configured model with the checkpoint's hparams (and
        # only for an explicit path, not for "last"). Here the config stays what was asked for, and a
        # checkpoint that does not fit it is a one-line error (LanguageModel.on_load_checkpoint).
        return

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.vocab_size", "model.init_args.vocab_size", apply_on="instantiate")
        # A config may leave out the class_path of the usual model and data module and give init_args only.
        parser.set_defaults(
            {
                "model": {"class_path": "lightning_modules.LanguageModel"},
                "data": {"class_path": "datamodules.WikiTextDataModule"},
                "trainer.callbacks": DEFAULT_CALLBACKS,
            }
        )

    def before_instantiate_classes(self) -> None:
        """Fill in the default logger, so that the saved config records where this run's logs went;
        resolve --ckpt_path last to a file (or a one-line error)."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.trainer
        if config.get("ckpt_path") is not None:
            root = Path(trainer.default_root_dir or DEFAULT_ROOT_DIR) / experiment_name(config.get("config"))
            config.ckpt_path = resolve_ckpt_path(str(config.ckpt_path), root)
        if trainer.logger in (None, True):
            trainer.logger = Namespace(
                class_path="lightning.pytorch.loggers.TensorBoardLogger",
                init_args=Namespace(
                    save_dir=trainer.default_root_dir or DEFAULT_ROOT_DIR,
                    name=experiment_name(config.get("config")),
                    default_hp_metric=False,  # LanguageModel registers val/ppl etc. for the HPARAMS tab
                ),
            )

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        strategy = self.trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:  # the default: make its writes atomic
            strategy.checkpoint_io = AtomicCheckpointIO()
        if callable(getattr(self.datamodule, "set_train_subset", None)):
            # WikiTextDataModule's sampler resumes mid-epoch itself (its state is in the checkpoint);
            # Lightning, which only sees a DataLoader without state_dict, would warn otherwise.
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")


def resolve_ckpt_path(ckpt_path: str, experiment_dir: Path) -> str:
    """"last": the newest <experiment_dir>/version_*/checkpoints/last*.ckpt; a path: itself, if it exists."""
    if ckpt_path in ("best", "hpc") or "://" in ckpt_path:
        return ckpt_path  # Lightning resolves these
    if ckpt_path == "last":
        found = [p for p in experiment_dir.glob("version_*/checkpoints/last*.ckpt") if p.is_file()]
        if not found:
            raise FileNotFoundError(
                f"--ckpt_path last: no last.ckpt under {str(experiment_dir)}/version_*/checkpoints; "
                "run without --ckpt_path to start fresh, or pass the checkpoint file"
            )
        return str(max(found, key=lambda p: p.stat().st_mtime))
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(
            f"checkpoint not found: {ckpt_path!r}; pass an existing .ckpt file, or --ckpt_path last for the newest "
            f"last.ckpt of this experiment"
        )
    return ckpt_path


def experiment_name(config_paths) -> str:
    """Name of the first --config file without its extension, else "default"."""
    for path in config_paths or []:
        return Path(str(path)).stem or "default"
    return "default"


def build(args: list[str]) -> ResNetBKCLI:
    """The CLI with model, data module and trainer instantiated from `args`, no subcommand run."""
    return ResNetBKCLI(args=list(args), run=False)


def main(args: Optional[list[str]] = None) -> int:
    """Entry point of the `lightning` / `resnet-bk` console scripts and `python -m resnet_bk`."""
    args = list(sys.argv[1:] if args is None else args)
    if "--debug" in args:  # full tracebacks and usage messages, as RESNET_BK_DEBUG=1
        args.remove("--debug")
        os.environ[DEBUG_ENV] = "1"
    try:
        ResNetBKCLI(args=args)
    except Exception as err:  # noqa: BLE001 - re-raised unless it is a known user error
        code = _user_error_exit_code(err)
        if code is None or _debug():
            raise
        print(f"error: {_one_line(str(err)) or type(err).__name__} (--debug for the traceback)", file=sys.stderr)
        return code
    return 0


def _user_error_exit_code(err: BaseException) -> Optional[int]:
    """2 for a user error (bad value, missing file, misconfigured trainer), 1 for a diverged run, else None."""
    if isinstance(err, FloatingPointError):
        return 1
    if isinstance(err, MisconfigurationException):
        return 2
    if isinstance(err, (ValueError, FileNotFoundError)):
        # Only errors raised by this project's code: one deep inside torch is a bug to read in full.
        frames = traceback.extract_tb(err.__traceback__)
        origin = str(Path(frames[-1].filename).resolve()) if frames else ""
        if any(where in origin for where in _USER_ERROR_ORIGINS):
            return 2
    return None
