"""Command-line overrides that turn any config into a seconds-long CPU fit, for the config tests."""


def tiny_fit_args(seq_len: int = 16, **config: object) -> list[str]:
    """2 optimizer steps and 1 validation batch on CPU, no logger, checkpoints or progress bar,
    windows of `seq_len` tokens from the first 2,000 training tokens; `config` overrides
    model.init_args.network.init_args.config, the network's shared hyperparameters (e.g. d_model=16,
    **{"resolvent.channels": 2})."""
    args = [
        "--trainer.max_steps",
        "2",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.val_check_interval",
        "2",
        "--trainer.num_sanity_val_steps",
        "0",
        "--trainer.accelerator",
        "cpu",
        "--trainer.precision",
        "32-true",
        "--trainer.logger",
        "false",
        "--trainer.enable_checkpointing",
        "false",
        "--trainer.callbacks",
        "[]",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--data.init_args.seq_len",
        str(seq_len),
        "--data.init_args.batch_size",
        "2",
        "--data.init_args.max_train_tokens",
        "2000",
    ]
    for key, value in config.items():
        args += [f"--model.init_args.network.init_args.config.{key}", str(value)]
    return args
