"""The ``ddkit`` command: LightningCLI in subclass mode (``fit``, ``validate``, ``test``) plus ``evaluate``,
``teacher import`` and ``export``.

Every stage is ``ddkit fit -c configs/<dataset>/<method>/<stage>.yaml``; ``--print_config`` prints every option.
Bad input ends with one line ``error: <field>: <problem>, got <value>`` and exit code 2 (``--debug`` shows the
traceback instead).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import shutil
import sys
from argparse import ArgumentError
from collections.abc import Iterator
from pathlib import Path

# Quieter start-up: these are informational messages that every run would otherwise print.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from ddkit.errors import DDKitError


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

        def instantiate_trainer(self, **kwargs):
            """The configured Trainer, plus the global RNG states in its checkpoints (see GlobalRNGState).

            Without a configured progress bar, Lightning's default is Rich's, which redraws on every step: a few ms
            of CPU per step, 10-15 % of a small recovery step (benchmarks/recover_speed.py). tqdm redraws at most
            10 times a second, so it is the default here.
            """
            from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

            from ddkit.callbacks.rng_state import GlobalRNGState

            trainer = super().instantiate_trainer(**kwargs)
            trainer.callbacks.append(GlobalRNGState())
            configured = self._get(self.config_init, "trainer", default={}).get("callbacks") or []
            configured = configured if isinstance(configured, list) else [configured]
            bar = trainer.progress_bar_callback
            if isinstance(bar, RichProgressBar) and not any(c is bar for c in configured):
                trainer.callbacks[trainer.callbacks.index(bar)] = TQDMProgressBar()
            return trainer

        def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
            """Checkpoints (``--ckpt_path``) are read with ``torch.load(weights_only=True)`` only, whatever the
            torch default or the environment says: a crafted pickle is refused before any of it runs."""
            kwargs = super()._prepare_subcommand_kwargs(subcommand)
            if "weights_only" in self._subcommand_method_arguments[subcommand]:
                if kwargs.get("weights_only") is False:
                    raise DDKitError("weights_only: ddkit reads checkpoints with weights_only=True only, got False")
                kwargs["weights_only"] = True
            return kwargs

        def _parse_ckpt_path(self) -> None:
            """LightningCLI reads the checkpoint's hyperparameters here (with weights_only=True)."""
            with _refused_pickle(self.config):
                super()._parse_ckpt_path()

        def _run_subcommand(self, subcommand: str) -> None:
            """Run it; bad input found before the first step (in a stage's setup) leaves no log folder behind."""
            fresh = _fresh_log_roots(self.trainer)
            try:
                with _refused_pickle(self.config):
                    super()._run_subcommand(subcommand)
            except Exception as e:
                if _ddkit_cause(e) is not None and self.trainer.global_step == 0:
                    for root in fresh:
                        shutil.rmtree(root, ignore_errors=True)
                raise

    no_exit = {"exit_on_error": False}  # parse errors become exceptions: main() prints them as one line
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
        parser_kwargs={**no_exit, **{cmd: no_exit for cmd in ("fit", "validate", "test", "predict")}},
    )


@contextlib.contextmanager
def _refused_pickle(config) -> Iterator[None]:
    """A checkpoint that ``torch.load(weights_only=True)`` refuses (nothing in it has run) as one DDKitError."""
    from ddkit.formats.common import load_error_reason

    try:
        yield
    except pickle.UnpicklingError as e:
        subcommand = config.get("subcommand")
        ckpt = config[subcommand].get("ckpt_path") if subcommand else None
        raise DDKitError(f"ckpt_path: cannot be read with torch.load(weights_only=True) ({load_error_reason(e)}), "
                         f"got {ckpt!r}") from e


def _fresh_log_roots(trainer) -> list[Path]:
    """The topmost folders of the trainer's log dirs that do not exist yet (what this run would create)."""
    roots = []
    for logger in trainer.loggers:
        path = getattr(logger, "log_dir", None)
        if path is None:
            continue
        path = Path(path).absolute()
        if path.exists():
            continue
        while not path.parent.exists():
            path = path.parent
        roots.append(path)
    return roots


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
        elif argv and argv[0] == "export":
            from ddkit.export_cli import export_cli

            export_cli(argv[1:])
        elif argv and argv[0] == "teacher":
            from ddkit.teacher_cli import teacher_cli

            teacher_cli(argv[1:])
        else:
            # LightningCLI reads sys.argv itself; giving it both is reported as a likely mistake.
            _lightning_cli(None if from_command_line else argv)
    except Exception as e:
        cause = _ddkit_cause(e)
        if debug:
            raise
        if cause is not None:
            print(f"error: {cause}", file=sys.stderr)
        elif isinstance(e, ArgumentError):
            print(f"error: {_one_line(str(e))}", file=sys.stderr)
        else:
            raise
        sys.exit(2)


_NOISE = ("Does not validate", "Subtypes:", "Errors:", "Given value type:", "Given value:", "Problem with given",
          "Parser key", "Expected a path but", "Expected a <class 'NoneType'>")


def _one_line(message: str) -> str:
    """A jsonargparse error as ``<field>: <problem>, got <value>``.

    jsonargparse explains a bad value over many lines (every Union subtype it tried); the field is the chain of
    ``Parser key "..."`` lines, the problem the innermost line that is not bookkeeping.
    """
    lines = [ln.strip().removeprefix("- ") for ln in message.splitlines() if ln.strip()]
    keys = [m.group(1) for ln in lines if (m := re.match(r'Parser key "([^"]+)":', ln))]
    problems = [ln for ln in lines if not ln.startswith(_NOISE)]
    if not keys or not problems:
        return " ".join(lines)
    line = f"{'.'.join(keys)}: {problems[-1]}"
    given = next((ln for ln in lines if ln.startswith("Given value:")), None)
    if given and "Got value" not in line:
        value = given.removeprefix("Given value:").strip()
        nested = re.search(r"val='(.*)'\)$", value)
        line += f", got {nested.group(1) if nested else value!r}"
    return line


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
