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
LearningRateMonitor; seed_everything 1234. A step-limited run logs training scalars at least every
max_steps // 20 steps (log_every_n_steps = min(configured, max(1, max_steps // 20))), so a short try
still draws curves. On a CUDA device float32 matrix products may use TF32
(torch.set_float32_matmul_precision("high"), unless set otherwise before).

The terminal: a progress bar over optimizer steps with real epoch counts and no v_num, and a model
summary without Lightning's (empty) FLOPs column (callbacks.first_screen); Lightning's advertising
tips and a torch-internal deprecation notice are filtered out.

Known user errors print one line `error: ...` and exit 2 (a non-finite loss exits 1): bad values,
unknown keys (with the nearest valid one: "did you mean lr?"), config files that are not YAML or
name no model, checkpoints that are empty, truncated, not checkpoints or of another model. A run
that fails before its first training step leaves no run folder behind (nor, when resuming, any new
file in the resumed one). Pass --debug (first argument or anywhere) or set RESNET_BK_DEBUG=1 for the
full traceback. docs/errors.md lists them.

Resuming: `fit --ckpt_path last` resumes from the newest runs/<experiment>/version_*/checkpoints/last.ckpt,
`--ckpt_path FILE` from FILE. A checkpoint inside a run folder (<run>/checkpoints/*.ckpt) continues
that run: the same folder and TensorBoard run (scalars the interrupted run logged after the
checkpoint's step are purged, since they are logged again), one line "resuming <run> at step N of M",
and the resumed invocation's config saved beside the original as config.resumed_at_step<N>.yaml.
The LR schedule keeps its original length (LanguageModel.configure_optimizers); every scalar is
logged under the step an uninterrupted run uses (callbacks.continued_run). Checkpoints are written
atomically by lightning_modules.checkpoint_io.AtomicCheckpointIO, which the CLI installs.

`build(args)` makes the same CLI without running a subcommand, for notebooks and tests: `cli = build(["--config", "configs/quickstart.yaml"])`, then
`cli.trainer.fit(cli.model, cli.datamodule)`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import traceback
import warnings
from pathlib import Path
from typing import Optional

import torch
from jsonargparse import Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelSummary, ProgressBar, RichModelSummary
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO

from callbacks.continued_run import ContinuedRun
from callbacks.first_screen import ModelSummaryWithoutFlops, step_progress_bar
from lightning_modules import LanguageModel
from lightning_modules.checkpoint_io import AtomicCheckpointIO, read_checkpoint
from resnet_bk.cli_input import (
    check_config_files,
    nearest_key_hint,
    null_of_nested_class_args,
    yaml_spelling_of_nonfinite,
)

DEBUG_ENV = "RESNET_BK_DEBUG"
DEFAULT_ROOT_DIR = "runs"
DEFAULT_SEED = 1234
DESCRIPTION = (
    "Train and evaluate resnet_bk language models. The options of the model, its network and the data: "
    "fit --model.help LanguageModel, fit --model.init_args.network.help ResNetBKLM (or another network), "
    "fit --data.help WikiTextDataModule; a config with every default filled in: fit --config C --print_config."
)
TENSORBOARD_LOGGERS = (
    "lightning.pytorch.loggers.TensorBoardLogger",
    "lightning.pytorch.loggers.tensorboard.TensorBoardLogger",
)
LIGHTNING_DEFAULT_LOG_EVERY_N_STEPS = 50

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
    line = " ".join(kept or lines)
    # a network block's key: what the factory type expects, and the whole block echoed back, say nothing
    line = re.sub(r"Type \S*Callable.*? expects a function or a callable class: ", "", line)
    return re.sub(r"\. Got value: Namespace\(.*\)$", "", line)


class _Parser(LightningArgumentParser):
    """Parse errors as one line instead of the usage of every option (RESNET_BK_DEBUG=1: the full usage)."""

    def error(self, message: str, ex: Optional[Exception] = None):
        if not self.exit_on_error or _debug():
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        hint = nearest_key_hint(str(message), list(getattr(parser, "_option_string_actions", {})))
        sys.stderr.write(f"error: {_one_line(message)}{hint} (see: {prog} --help)\n")
        sys.exit(2)


class _DropNotices(logging.Filter):
    """Lightning's advertising tips ("💡 Tip: ... try installing litlogger"): nothing to act on here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def quiet_third_party_notices() -> None:
    """Filter the notices a user of this project cannot act on (idempotent)."""
    # Lightning's own pytree helper calls a torch API that torch >= 2.9 deprecates.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    emitter = logging.getLogger("lightning.pytorch.utilities.rank_zero")  # rank_zero_info's logger
    if not any(isinstance(f, _DropNotices) for f in emitter.filters):
        emitter.addFilter(_DropNotices())


class ResNetBKCLI(LightningCLI):
    """LightningCLI with this project's defaults; see the module docstring."""

    def __init__(self, args=None, run: bool = True, **kwargs):
        kwargs.setdefault("model_class", LanguageModel)
        kwargs.setdefault("parser_class", _Parser)
        kwargs.setdefault("parser_kwargs", {"description": DESCRIPTION})
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("seed_everything_default", DEFAULT_SEED)
        kwargs.setdefault("trainer_defaults", {"default_root_dir": DEFAULT_ROOT_DIR})
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        # One way to set the optimizer: LanguageModel's own hyper-parameters.
        kwargs.setdefault("auto_configure_optimizers", False)
        quiet_third_party_notices()
        self._run_dir_before: Optional[tuple[Path, set[Path]]] = None  # the run folder, and its files before
        try:
            super().__init__(args=args, run=run, **kwargs)
        except BaseException:
            self._remove_what_a_failed_start_wrote()
            raise

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        if isinstance(args, (list, tuple)):
            args = null_of_nested_class_args(yaml_spelling_of_nonfinite(list(args)))
            check_config_files(args)
        # build(args) runs under pytest or Jupyter, whose sys.argv is theirs: LightningCLI's warning
        # about args given beside sys.argv would fire on every call.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            super().parse_arguments(parser, args)

    def _prepare_subcommand_parser(self, klass, subcommand: str, **kwargs) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        parser.description = DESCRIPTION  # `fit --help` says where the model's and the data's options are
        return parser

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
        resolve --ckpt_path (last: the newest last.ckpt) to a readable checkpoint, and point the
        logger of a resumed fit at the checkpoint's run; scale log_every_n_steps to the run."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.trainer
        if trainer.logger in (None, True):
            trainer.logger = Namespace(
                class_path="lightning.pytorch.loggers.TensorBoardLogger",
                init_args=Namespace(
                    save_dir=trainer.default_root_dir or DEFAULT_ROOT_DIR,
                    name=experiment_name(config.get("config")),
                    default_hp_metric=False,  # LanguageModel registers val/ppl etc. for the HPARAMS tab
                ),
            )
        if config.get("ckpt_path") is not None:
            root = Path(trainer.default_root_dir or DEFAULT_ROOT_DIR) / experiment_name(config.get("config"))
            config.ckpt_path = resolve_ckpt_path(str(config.ckpt_path), root)
            if Path(config.ckpt_path).is_file():  # not "best", "hpc" or a URL, which Lightning resolves
                step = int(read_checkpoint(config.ckpt_path)["global_step"])
                run = run_folder_of(Path(config.ckpt_path))
                if self.subcommand == "fit" and run is not None:
                    self._continue_run(trainer, run, step)
        if trainer.max_steps is not None and trainer.max_steps > 0 and trainer.log_every_n_steps != 0:
            configured = trainer.log_every_n_steps or LIGHTNING_DEFAULT_LOG_EVERY_N_STEPS
            trainer.log_every_n_steps = min(configured, max(1, trainer.max_steps // 20))
        if torch.cuda.is_available() and torch.get_float32_matmul_precision() == "highest":
            torch.set_float32_matmul_precision("high")

    def _continue_run(self, trainer: Namespace, run: Path, step: int) -> None:
        """Log a resumed fit into the checkpoint's run folder (a TensorBoard logger only), hiding what the
        interrupted run logged from `step` on, and save its config beside the original one."""
        logger = trainer.logger
        if not (isinstance(logger, Namespace) and logger.get("class_path") in TENSORBOARD_LOGGERS):
            return
        logger.init_args = logger.get("init_args") or Namespace()
        logger.init_args.save_dir = str(run.parent.parent)
        logger.init_args.name = run.parent.name
        logger.init_args.version = run.name
        logger.init_args.purge_step = step
        self.save_config_kwargs = {**self.save_config_kwargs, "config_filename": f"config.resumed_at_step{step}.yaml"}
        # Its checkpoints/ folder is this run's own: ModelCheckpoint's "exists and is not empty" is expected.
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        trainer = self.trainer
        strategy = trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:  # the default: make its writes atomic
            strategy.checkpoint_io = AtomicCheckpointIO()
        if callable(getattr(self.datamodule, "set_train_subset", None)):
            # WikiTextDataModule's sampler resumes mid-epoch itself (its state is in the checkpoint);
            # Lightning, which only sees a DataLoader without state_dict, would warn otherwise.
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
        # First, so that its step alignment precedes LearningRateMonitor's logging.
        trainer.callbacks.insert(0, ContinuedRun())
        for i, callback in enumerate(trainer.callbacks):
            if isinstance(callback, ProgressBar):
                trainer.callbacks[i] = step_progress_bar(callback)
            elif type(callback) in (ModelSummary, RichModelSummary):  # Lightning's default, not a configured one
                trainer.callbacks[i] = ModelSummaryWithoutFlops(max_depth=callback._max_depth)
        if trainer.loggers:
            run = Path(trainer.log_dir)
            self._run_dir_before = (run, set(run.rglob("*")) if run.exists() else set())

    def _remove_what_a_failed_start_wrote(self) -> None:
        """After an error before the first training batch of this invocation: delete the files it wrote
        into the run folder (config, event files) and the folder itself if it made it. A run that
        trained keeps everything: its logs show what happened."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or self._run_dir_before is None:
            return
        if any(getattr(cb, "batches_trained", 0) for cb in trainer.callbacks if isinstance(cb, ContinuedRun)):
            return
        run, before = self._run_dir_before
        if not run.exists():
            return
        if not before:
            shutil.rmtree(run, ignore_errors=True)
            return
        for path in sorted(set(run.rglob("*")) - before, key=lambda p: len(p.parts), reverse=True):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def resolve_ckpt_path(ckpt_path: str, experiment_dir: Path) -> str:
    """ "last": the newest <experiment_dir>/version_*/checkpoints/last*.ckpt; a path: itself, if it exists."""
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


def run_folder_of(ckpt_path: Path) -> Optional[Path]:
    """The TensorBoard run folder holding `ckpt_path` as <run>/checkpoints/<file>, else None."""
    folder = Path(os.path.abspath(ckpt_path)).parent
    if folder.name != "checkpoints" or not any(folder.parent.glob("events.out.tfevents.*")):
        return None
    run = folder.parent
    return run.relative_to(Path.cwd()) if run.is_relative_to(Path.cwd()) else run


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
