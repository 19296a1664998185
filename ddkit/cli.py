"""The ``ddkit`` command: LightningCLI in subclass mode (``fit``, ``validate``, ``test``) plus ``evaluate``.

Every stage is ``ddkit fit -c configs/<dataset>/<method>/<stage>.yaml``; ``--print_config`` prints every option.
Bad input ends with one line ``error: <field>: <problem>, got <value>`` and exit code 2 (``--debug`` shows the
traceback instead).
"""

from __future__ import annotations

import os
import sys

# Quieter start-up: these are informational messages that every run would otherwise print.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from ddkit.errors import DDKitError  # noqa: E402


def _lightning_cli(args: list[str] | None) -> None:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.cli import LightningCLI

    from ddkit.registry import import_stage_modules

    import_stage_modules()  # subclass mode selects among the imported subclasses

    class DDKitCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
            parser.set_defaults({"checkpoint.save_last": True})
            parser.link_arguments("data.spec", "model.init_args.data_spec", apply_on="instantiate")

    DDKitCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": "runs"}},
            "log_every_n_steps": 10,
        },
        args=args,
    )


def quiet_lightning() -> None:
    """Drop Lightning's advertising tips and a deprecation warning of its own that users cannot act on."""
    import logging
    import warnings

    class _NoTips(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "Tip:" not in str(record.msg)

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_NoTips())
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def main(argv: list[str] | None = None) -> None:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_lightning()
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
        if from_command_line:
            sys.argv.remove("--debug")
    try:
        if argv and argv[0] == "evaluate":
            from ddkit.evaluation.cli import evaluate_cli

            evaluate_cli(argv[1:])
        else:
            # LightningCLI reads sys.argv itself; giving it both is reported as a likely mistake.
            _lightning_cli(None if from_command_line else argv)
    except Exception as e:
        cause = _ddkit_cause(e)
        if cause is None or debug:
            raise
        print(f"error: {cause}", file=sys.stderr)
        sys.exit(2)


def _ddkit_cause(e: BaseException | None) -> DDKitError | None:
    """The DDKitError behind ``e``: jsonargparse and Lightning wrap errors raised while building a stage."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, DDKitError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


if __name__ == "__main__":
    main()
