"""The ``ddkit`` command: LightningCLI in subclass mode (``fit``, ``validate``, ``test``, ``predict``) plus
``evaluate``, ``chain``, ``show``, ``teacher import`` and ``export``.

Every stage is ``ddkit fit -c configs/<dataset>/<method>/<stage>.yaml``; ``--print_config`` prints every option's
value, ``--model.help <class>`` its documentation. Bad input ends with one line ``error: <field>: <problem>, got
<value>`` and exit code 2 (``--debug`` shows the traceback instead). Lightning's banners, seed lines and warnings about
the stages' deliberate design are kept off the console unless ``--verbose`` is given.

Nothing heavy is imported at module level: ``ddkit --help`` answers without loading torch or Lightning.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import pickle
import re
import shutil
import sys
import threading
from argparse import ArgumentError
from collections.abc import Iterator
from pathlib import Path

# Quieter start-up: these are informational messages that every run would otherwise print.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from ddkit.cli_checks import check_command_line, check_run_options
from ddkit.errors import DDKitError


def _lightning_cli(args: list[str] | None) -> None:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

    from ddkit.registry import import_stage_modules

    import_stage_modules()  # subclass mode selects among the imported subclasses

    class DDKitCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
            parser.set_defaults({"checkpoint.save_last": True})
            parser.link_arguments("data.spec", "model.init_args.data_spec", apply_on="instantiate")

        def parse_arguments(self, parser, args) -> None:
            """Parse, then check the run options while nothing is built or seeded yet."""
            super().parse_arguments(parser, args)
            subcommand = self.config.get("subcommand")
            check_run_options(self.config[subcommand] if subcommand else self.config)
            if subcommand not in (None, "fit"):
                _log_into_the_checkpoints_run(self.config[subcommand])

        def instantiate_trainer(self, **kwargs):
            """The configured Trainer, plus the global RNG states in its checkpoints (see GlobalRNGState).

            Without a configured progress bar, Lightning's default is Rich's, which redraws on every step: a few ms
            of CPU per step, 10-15 % of a small recovery step (benchmarks/recover_speed.py). tqdm redraws at most
            10 times a second, so it is the default here.

            When stdout is not a terminal (a log file, a pipe), the default is a periodic one-line status instead
            (:class:`ddkit.callbacks.progress.LineProgress`). A progress bar named in the config is kept as it is.
            """
            from ddkit.callbacks.progress import default_progress_bar
            from ddkit.callbacks.resume import ResumeCheck
            from ddkit.callbacks.rng_state import GlobalRNGState

            trainer = super().instantiate_trainer(**kwargs)
            trainer.callbacks += [GlobalRNGState(), ResumeCheck()]
            trainer.strategy.checkpoint_io = _atomic_checkpoint_io(trainer.strategy.checkpoint_io)
            configured = self._get(self.config_init, "trainer", default={}).get("callbacks") or []
            configured = configured if isinstance(configured, list) else [configured]
            bar = trainer.progress_bar_callback
            if bar is not None and not any(c is bar for c in configured):
                trainer.callbacks[trainer.callbacks.index(bar)] = default_progress_bar()
            return trainer

        def _instantiate_trainer(self, config: dict, callbacks: list) -> L.Trainer:
            """``--trainer.enable_checkpointing false`` drops the ``checkpoint`` group's ModelCheckpoint (Lightning
            refuses the two together)."""
            if config.get("enable_checkpointing") is False:
                callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
            return super()._instantiate_trainer(config, callbacks)

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
            """An explicit checkpoint file must exist, load, and come from this run's stage class.

            LightningCLI would parse the checkpoint's hyperparameters over the config here, replacing the stage class
            and the options the user gave without a word. ddkit keeps the user's config; ResumeCheck refuses a
            resume whose options differ from the checkpoint's.
            """
            subcommand = self.config.get("subcommand")
            ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
            if ckpt_path is None or str(ckpt_path) in _LIGHTNING_CKPT_NAMES:
                return
            path = Path(ckpt_path)
            if not path.is_file():
                raise DDKitError(f"ckpt_path: {'is a directory, not a file' if path.is_dir() else 'file not found'}, "
                                 f"got {str(ckpt_path)!r}")
            from ddkit.formats.common import load_weights_only

            checkpoint = load_weights_only(path, "ckpt_path", mmap=True)
            saved = (checkpoint.get("hyper_parameters") or {}).get("_class_path") if isinstance(checkpoint, dict) \
                else None
            configured = self.config[subcommand].get("model", {}).get("class_path")
            if saved and configured and saved != configured:
                raise DDKitError(f"ckpt_path: written by a {saved} run; resume it with that stage, got a {configured} "
                                 f"run and {str(ckpt_path)!r}")

        def _run_subcommand(self, subcommand: str) -> None:
            """Run it; bad input found before the first step (in a stage's setup) leaves no log folder behind."""
            fresh = _fresh_log_roots(self.trainer)
            try:
                with _refused_pickle(self.config, self.trainer):
                    super()._run_subcommand(subcommand)
            except Exception as e:
                if _ddkit_cause(e) is not None and self.trainer.global_step == 0:
                    for root in fresh:
                        shutil.rmtree(root, ignore_errors=True)
                raise

    class SaveConfigBesideLogs(SaveConfigCallback):
        """The run's config in its log folder. A run without a logger has no folder of its own (Lightning's default
        would write ``./config.yaml``, replacing a user's file of that name), so it writes none; a test or
        validation logged into a fit's folder keeps the fit's config."""

        def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
            if trainer.logger is None:
                return
            if stage != "fit" and (Path(trainer.log_dir) / self.config_filename).exists():
                return
            super().setup(trainer, pl_module, stage)

    no_exit = {"exit_on_error": False}  # parse errors become exceptions: main() prints them as one line
    DDKitCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_callback=SaveConfigBesideLogs,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": "runs"}},
            "log_every_n_steps": 10,
        },
        args=args,
        parser_kwargs={**no_exit, **{cmd: no_exit for cmd in ("fit", "validate", "test", "predict")}},
    )


def _log_into_the_checkpoints_run(config) -> None:
    """``ddkit test --ckpt_path runs/<name>/version_K/...``: log into that fit's ``version_K`` (its checkpoint folder
    too) instead of opening ``version_K+1`` beside it."""
    ckpt = config.get("ckpt_path")
    logger = config.get("trainer", {}).get("logger")
    init = getattr(logger, "init_args", None)
    if not ckpt or init is None or not str(getattr(logger, "class_path", "")).endswith("TensorBoardLogger"):
        return
    if init.get("version") is not None:
        return
    run = Path(init.get("save_dir") or ".") / str(init.get("name") or "lightning_logs")
    try:
        inside = Path(ckpt).absolute().relative_to(run.absolute())
    except ValueError:
        return
    match = re.fullmatch(r"version_(\d+)", inside.parts[0]) if inside.parts else None
    if match:
        init["version"] = int(match.group(1))


# ``--ckpt_path`` values Lightning resolves itself (to a file in the checkpoint directory).
_LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")


def _unreadable_checkpoint(e: BaseException) -> bool:
    """Whether ``e`` is torch.load refusing or failing to read a checkpoint (refused pickle, truncated file)."""
    return isinstance(e, (pickle.UnpicklingError, EOFError)) or (
        isinstance(e, RuntimeError) and "PytorchStreamReader" in str(e))


@contextlib.contextmanager
def _refused_pickle(config, trainer=None) -> Iterator[None]:
    """A checkpoint that ``torch.load(weights_only=True)`` refuses (nothing in it has run) or cannot read (a
    truncated file) as one DDKitError naming the file."""
    from ddkit.formats.common import load_error_reason

    try:
        yield
    except Exception as e:
        if not _unreadable_checkpoint(e):
            raise
        subcommand = config.get("subcommand")
        ckpt = config[subcommand].get("ckpt_path") if subcommand else None
        resolved = getattr(trainer, "ckpt_path", None) if trainer is not None else None
        raise DDKitError(f"ckpt_path: cannot be read with torch.load(weights_only=True) ({load_error_reason(e)}), "
                         f"got {str(resolved or ckpt)!r}") from e


def _atomic_checkpoint_io(io):
    """Lightning's checkpoint writer, made atomic: write ``.<name>.tmp``, then rename, so a full disk or a kill
    never leaves a half-written checkpoint under its final name (which ``--ckpt_path last`` would then pick)."""
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    if type(io) is not TorchCheckpointIO:  # a user's own CheckpointIO: theirs to make safe
        return io

    class AtomicCheckpointIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
            if "://" in str(path):  # a remote filesystem (fsspec): no rename there
                return super().save_checkpoint(checkpoint, path, storage_options)
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            try:
                super().save_checkpoint(checkpoint, tmp, storage_options)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)

    return AtomicCheckpointIO()


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


# Lightning's info lines that every run prints and no user acts on: accelerator banners, the seed line, tips, and
# notices of what the user asked for (the epoch / step limit reached, the --ckpt_path checkpoint restored).
_CHATTER = ("GPU available:", "TPU available:", "HPU available:", "LOCAL_RANK:", "Seed set to", "Tip:", "💡 Tip:",
            "Loading `train_dataloader` to estimate", "`Trainer.fit` stopped:", "Restoring states from the checkpoint",
            "Restored all states from the checkpoint", "Loaded model weights from the checkpoint")
_CHATTY_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                   "lightning.fabric.utilities.seed", "lightning.pytorch.accelerators.cuda")
# Lightning warnings about the stages' deliberate design (regular expressions matched at the message start).
_DESIGN_WARNINGS = (
    r"Found \d+ module\(s\) in eval mode",  # frozen teachers and probed backbones stay in eval mode on purpose
    r"The number of training batches \(\d+\) is smaller than the logging interval",  # small sets log per epoch
    r"You have overridden `transfer_batch_to_device` in `LightningModule`",  # recover places its job steps itself
    r"Using ModelCheckpoint with manual optimization",  # recover / matching checkpoint after the step on purpose
    r".*LeafSpec",  # a deprecation inside Lightning's own code
)


def _no_chatter(record: logging.LogRecord) -> bool:
    """A logging filter dropping the :data:`_CHATTER` lines (one function: adding it again is a no-op)."""
    return not str(record.msg).lstrip().startswith(_CHATTER)


def quiet_lightning(verbose: bool = False) -> None:
    """Keep Lightning's chatter and its warnings about the stages' deliberate design off the console (unless
    ``verbose``); what remains is the stage's own output, progress and results."""
    import warnings

    for name in _CHATTY_LOGGERS:
        logger = logging.getLogger(name)
        if verbose:
            logger.removeFilter(_no_chatter)
        else:
            logger.addFilter(_no_chatter)
    if not verbose:
        for pattern in _DESIGN_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)


def _quiet_full_disk_in_threads(args: threading.ExceptHookArgs) -> None:
    """A logger's writer thread that hits a full disk stays quiet: the main thread reports it in one line."""
    if not (isinstance(args.exc_value, OSError) and args.exc_value.errno == errno.ENOSPC):
        threading.__excepthook__(args)


def main(argv: list[str] | None = None) -> None:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(HELP)
        sys.exit(0)
    verbose = "--verbose" in argv or os.environ.get("DDKIT_VERBOSE") == "1"
    if "--verbose" in argv:
        argv.remove("--verbose")
        if from_command_line:
            sys.argv.remove("--verbose")
    quiet_lightning(verbose)
    threading.excepthook = _quiet_full_disk_in_threads
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
        if from_command_line:
            sys.argv.remove("--debug")
    try:
        check_command_line(argv)
        if argv and argv[0] == "evaluate":
            from ddkit.evaluation.cli import evaluate_cli

            evaluate_cli(argv[1:])
        elif argv[0] == "chain":
            from ddkit.chain import chain_cli

            chain_cli(argv[1:])
        elif argv[0] == "show":
            from ddkit.show import show_cli

            show_cli(argv[1:])
        elif argv[0] == "export":
            from ddkit.export_cli import export_cli

            export_cli(argv[1:])
        elif argv[0] == "teacher":
            from ddkit.teacher_cli import teacher_cli

            teacher_cli(argv[1:])
        else:
            # LightningCLI reads sys.argv itself; giving it both is reported as a likely mistake.
            _lightning_cli(None if from_command_line else argv)
    except Exception as e:
        cause = _ddkit_cause(e)
        if debug:
            raise
        full = _no_space(e)
        if cause is not None:
            print(f"error: {cause}", file=sys.stderr)
        elif full is not None:
            print(f"error: output: no space left on device (nothing half-written was kept), got {full!r}",
                  file=sys.stderr)
        elif isinstance(e, ArgumentError):
            print(f"error: {_one_line(str(e))}", file=sys.stderr)
        else:
            raise
        sys.exit(2)


HELP = """usage: ddkit <command> [options]      (ddkit <command> --help: the command's options)

Dataset distillation on PyTorch Lightning.

commands:
  fit        train one stage: ddkit fit -c configs/<dataset>/<method>/<stage>.yaml
  validate   one pass over the validation split: ddkit validate -c <config> --ckpt_path <checkpoint>
  test       one pass over the test split: ddkit test -c <config> --ckpt_path <checkpoint>
  predict    predictions of a trained stage: ddkit predict -c <config> --ckpt_path <checkpoint>
  evaluate   train fresh networks on distilled sets under a protocol, report test accuracy (mean ± std)
  chain      a method's whole chain in one command, cached stages skipped: ddkit chain sre2l --data digits
  show       write a PNG grid of a distilled set and print where: ddkit show <DistilledSet directory>
  teacher    import a torchvision / timm ResNet checkpoint as a teacher: ddkit teacher import <file> --net resnet18
  export     write a distilled set for other tools: ddkit export ddranking <DistilledSet directory> --output <dir>

options of every command:
  --verbose  keep Lightning's banners, seed lines and warnings about the stages' design on the console
  --debug    show the traceback of an error instead of one line

Stage options: ddkit fit -c <config> --print_config (values), --model.help <class> (documentation)."""


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


def _no_space(e: BaseException | None) -> str | None:
    """The file a full disk refused to take (or the writer's message), if a full disk is behind ``e``.

    Python raises OSError(ENOSPC); safetensors and torch report it in their own exception types, by message.
    """
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return str(e.filename or e)
        if "No space left on device" in str(e) or "os error 28" in str(e):
            return str(e).splitlines()[0][:200]
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


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
