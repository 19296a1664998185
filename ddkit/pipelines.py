"""Each method's chain of ``ddkit`` commands, run in order with an artifact cache (``make demo``, benchmarks/).

A :class:`Stage` is one ``ddkit fit -c <config> <overrides>`` or ``ddkit evaluate ...`` invocation together with the
artifact paths it reads (``inputs``) and writes (``outputs``). :func:`run_stages` runs a list of stages in order and
skips a stage when all its outputs exist and the stamp beside its first output (``<output>.stamp.json``) records

- the same command line,
- the same sha256 of the parsed content of every config file the command names with ``-c`` / ``--config``
  (comments and layout do not count),
- the same sha256 of every input artifact (a directory hashes its files' paths and contents).

So editing a config, or remaking an upstream artifact with different bytes, reruns exactly the stages that depend on
it; everything else is reused. A stage whose input is missing (its producer failed) is ``blocked``, not run. Source
code changes are not tracked: ``force`` names stages to rerun anyway.

:func:`build_plan` writes out the chains of the README's pipelines section for one dataset as such a table::

    full:   classifier.fit                                   -> full/metrics.json (the full-data reference)
    sre2l:  sre2l/squeeze.fit -> recover.fit (IPC K) -> relabel.fit (KD student, 1 run)
    scdd:   scdd/pretrain_mocov2.fit -> probe.fit -> recover.fit (IPC K) -> relabel.fit
    mtt:    mtt/buffer.fit -> mtt/distill_ipcK.fit
    datm:   datm/buffer.fit -> datm/distill_ipcK.fit
    every set (and the random real subset) -> ddkit evaluate, one (set, IPC, protocol) per call, N seeds

and :func:`collect` turns the cache into one results document (every cell with its protocol record, seeds, wall
times and commands) that :func:`results_table` prints as Markdown.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import yaml

from ddkit.errors import DDKitError
from ddkit.formats.common import sha256_file, write_json

STAMP_SUFFIX = ".stamp.json"
STAMP_FORMAT = "ddkit.stamp v2"  # v2: configs hashed by parsed content, v1 by bytes

# ---------------------------------------------------------------------------------------------------------------
# Stages and the cache
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """One ``ddkit`` invocation and the artifacts it reads and writes.

    Args:
        name: unique name, e.g. ``sre2l_recover_ipc10`` (used by ``force`` and in the progress lines).
        argv: the arguments after ``ddkit``, e.g. ``("fit", "-c", "configs/digits/classifier.yaml", ...)``.
        outputs: the artifact paths (files or directories) the stage writes; the stamp sits beside the first.
        inputs: the artifact paths it reads (hashed into the stamp; config files named by ``-c`` are hashed too).
        clean: other paths the stage writes (checkpoint folders, soft-label stores) removed before it runs, so a
            rerun never resumes or appends to the previous run's files.
        kind: what sort of stage it is (``reference``, ``teacher``, ``recover``, ``evaluate``, ...), for reports.
        method: the method whose chain it belongs to (``shared`` for stages several methods use).
        ipc: images per class, for IPC-specific stages.
    """

    name: str
    argv: tuple[str, ...]
    outputs: tuple[str, ...]
    inputs: tuple[str, ...] = ()
    clean: tuple[str, ...] = ()
    kind: str = ""
    method: str = ""
    ipc: int | None = None

    def command(self) -> str:
        """The command line as a user would type it."""
        return "ddkit " + shlex.join(self.argv)

    def config_files(self) -> list[str]:
        """Config files named with ``-c`` / ``--config`` (``--config=path`` too)."""
        out, args = [], list(self.argv)
        for i, a in enumerate(args):
            if a in ("-c", "--config") and i + 1 < len(args):
                out.append(args[i + 1])
            elif a.startswith("--config="):
                out.append(a.split("=", 1)[1])
        return out

    def stamp_path(self) -> Path:
        """``<first output>.stamp.json``."""
        first = Path(self.outputs[0])
        return first.with_name(first.name + STAMP_SUFFIX)


def hash_path(path: str | Path) -> str:
    """sha256 of a file, or of a directory tree (sorted relative paths and file hashes; hidden entries and stamps
    skipped, so a work folder or a temporary file inside does not count).

    Raises:
        DDKitError: if ``path`` does not exist.
    """
    p = Path(path)
    if p.is_file():
        return sha256_file(p)
    if not p.is_dir():
        raise DDKitError(f"inputs: artifact not found, got {str(p)!r}")
    h = hashlib.sha256()
    for f in sorted(p.rglob("*")):
        rel = f.relative_to(p)
        if not f.is_file() or any(part.startswith(".") for part in rel.parts) or f.name.endswith(STAMP_SUFFIX):
            continue
        h.update(rel.as_posix().encode() + b"\0" + sha256_file(f).encode() + b"\n")
    return h.hexdigest()


def config_hash(path: str | Path) -> str:
    """sha256 of a YAML config's parsed content, so an edited comment does not rerun a stage; of its bytes when it
    does not parse as YAML."""
    try:
        content = yaml.safe_load(Path(path).read_text())
    except (yaml.YAMLError, UnicodeDecodeError):
        return sha256_file(path)
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def stage_key(stage: Stage) -> dict[str, Any]:
    """What the stamp must match: the command line, config content hashes and input artifact hashes.

    Raises:
        DDKitError: if a config file or an input artifact is missing.
    """
    configs = {}
    for c in stage.config_files():
        if not Path(c).is_file():
            raise DDKitError(f"{stage.name}.config: file not found, got {c!r}")
        configs[c] = config_hash(c)
    return {"argv": list(stage.argv), "configs": configs, "inputs": {i: hash_path(i) for i in stage.inputs}}


def read_stamp(stage: Stage) -> dict[str, Any] | None:
    """The stage's stamp, or None when there is none (or it is unreadable)."""
    path = stage.stamp_path()
    try:
        stamp = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) and stamp.get("format") == STAMP_FORMAT else None


def is_cached(stage: Stage, key: dict[str, Any] | None = None) -> bool:
    """True when every output exists and the stamp records ``key`` (default: the stage's current key)."""
    if not all(Path(o).exists() for o in stage.outputs):
        return False
    stamp = read_stamp(stage)
    if stamp is None:
        return False
    if key is None:
        try:
            key = stage_key(stage)
        except DDKitError:
            return False
    return stamp.get("key") == key


def check_stage(stage: Stage, root: str | Path) -> None:
    """A stage may only write and remove paths inside ``root`` (the cache removes them before a rerun).

    Raises:
        DDKitError: naming the stage and the offending path.
    """
    base = Path(root).resolve()
    if not stage.outputs:
        raise DDKitError(f"{stage.name}.outputs: a stage needs at least one output, got []")
    for p in (*stage.outputs, *stage.clean):
        if not Path(p).resolve().is_relative_to(base):
            raise DDKitError(f"{stage.name}.outputs: must lie inside the pipeline root {str(base)!r}, got {p!r}")


def _remove(path: str | Path) -> None:
    p = Path(path)
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


class StageFailed(Exception):
    """A stage's command ended with an error (the message is its last line)."""


Runner = Callable[[list[str]], None]


def run_in_process(argv: list[str]) -> None:
    """Run ``ddkit <argv>`` in this process through :func:`ddkit.cli.main`.

    Raises:
        StageFailed: on a non-zero exit or an exception (the traceback of an unexpected one is printed).
    """
    from ddkit.cli import main

    # LightningCLI reads sys.argv too: this process's own arguments are not the stage's.
    own_argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        main(list(argv))
    except SystemExit as e:
        if type(e).__name__ == "SIGTERMException":  # Lightning's own SIGTERM handling
            raise KeyboardInterrupt from None
        if e.code not in (0, None):
            raise StageFailed(f"exit code {e.code}") from None
    except Exception as e:  # noqa: BLE001 - any failure of one stage is reported, the others go on
        traceback.print_exc()
        raise StageFailed(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    finally:
        sys.argv = own_argv


def set_threads(n: int) -> None:
    """Use ``n`` intra-op CPU threads in this process and in the child processes it starts.

    On a 2-core machine shared with other jobs, or for digits-sized tensors, one thread is often several times
    faster than two: OpenMP threads spin while waiting for a core the other jobs hold.

    Raises:
        DDKitError: if ``n`` < 1.
    """
    if n < 1:
        raise DDKitError(f"threads: must be >= 1, got {n!r}")
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(n)
    import torch

    torch.set_num_threads(n)


def run_subprocess(argv: list[str]) -> None:
    """Run ``python -m ddkit.cli <argv>`` in a child process (isolates crashes and memory).

    Raises:
        StageFailed: on a non-zero exit code.
    """
    code = subprocess.run([sys.executable, "-m", "ddkit.cli", *argv], check=False).returncode
    if code != 0:
        raise StageFailed(f"exit code {code}")


@dataclass
class StageResult:
    """What happened to one stage in one session."""

    name: str
    status: str  # ran | cached | failed | blocked
    command: str
    seconds: float = 0.0  # wall time in this session (0 when cached)
    made_in_s: float | None = None  # wall time of the run that made the artifact (from the stamp)
    error: str | None = None
    cpu_s: float | None = None  # user + sys CPU time of the run that made the artifact (all threads, children)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "command": self.command, "seconds": round(self.seconds, 2),
                "made_in_s": None if self.made_in_s is None else round(self.made_in_s, 2),
                "cpu_s": None if self.cpu_s is None else round(self.cpu_s, 2), "error": self.error}


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads) and of its finished children, in seconds. On a shared
    machine this, not the wall time, says what a stage costs."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


@contextlib.contextmanager
def _stop_on_signals(flag: dict[str, int]):
    """SIGINT / SIGTERM set ``flag['signal']`` and raise KeyboardInterrupt in the main thread. Lightning catches a
    KeyboardInterrupt inside ``fit`` and returns as if the run had ended, so the flag is what tells the driver that
    the stage did not finish (no stamp is written and the session stops)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        flag["signal"] = signum
        raise KeyboardInterrupt

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def run_stages(stages: Iterable[Stage], root: str | Path, runner: Runner = run_in_process,
               force: Iterable[str] = (), log: Callable[[str], None] = print) -> list[StageResult]:
    """Run ``stages`` in order, skipping those whose stamp matches; print each stage, its status and wall time.

    Args:
        stages: the table of stages, producers before consumers.
        root: every output and clean path must lie inside it (see :func:`check_stage`).
        runner: runs one ``ddkit`` argument list and raises :class:`StageFailed` on failure.
        force: fnmatch patterns of stage names to rerun even when cached (e.g. ``sre2l_*``).
        log: where progress lines go.

    Returns:
        One :class:`StageResult` per stage, in order. A failed stage does not stop the others; stages whose
        inputs are missing are ``blocked``.

    Raises:
        DDKitError: for a malformed table (duplicate names, outputs outside ``root``).
    """
    stages = list(stages)
    names = [s.name for s in stages]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DDKitError(f"stages: duplicate stage names, got {dup!r}")
    for s in stages:
        check_stage(s, root)
    force = list(force)
    results: list[StageResult] = []
    start_all, cpu_all = time.perf_counter(), cpu_seconds()
    width = len(str(len(stages)))
    for i, stage in enumerate(stages, 1):
        head = f"[{i:>{width}}/{len(stages)}] {stage.name}"
        missing = [p for p in stage.inputs if not Path(p).exists()]
        if missing:
            results.append(StageResult(stage.name, "blocked", stage.command(), error=f"missing input {missing[0]}"))
            log(f"{head}: blocked (missing input {missing[0]})")
            continue
        try:
            key = stage_key(stage)
        except DDKitError as e:
            results.append(StageResult(stage.name, "failed", stage.command(), error=str(e)))
            log(f"{head}: failed ({e})")
            continue
        forced = any(fnmatch.fnmatchcase(stage.name, pat) for pat in force)
        if not forced and is_cached(stage, key):
            stamp = read_stamp(stage) or {}
            made = stamp.get("wall_time_s")
            results.append(StageResult(stage.name, "cached", stage.command(), made_in_s=made, cpu_s=stamp.get("cpu_s")))
            log(f"{head}: cached (made in {_secs(made)})\n    $ {stage.command()}")
            continue
        log(f"{head}: running{' (forced)' if forced else ''}\n    $ {stage.command()}")
        for p in (stage.stamp_path(), *stage.outputs, *stage.clean):
            _remove(p)
        t0, c0 = time.perf_counter(), cpu_seconds()
        flag: dict[str, int] = {}
        try:
            with _stop_on_signals(flag):
                try:
                    runner(list(stage.argv))
                except KeyboardInterrupt:
                    flag.setdefault("signal", int(signal.SIGINT))
            if flag:
                log(f"{head}: interrupted by signal {flag['signal']} after {_secs(time.perf_counter() - t0)}; "
                    "no stamp written, stopping")
                raise KeyboardInterrupt
            absent = [o for o in stage.outputs if not Path(o).exists()]
            if absent:
                raise StageFailed(f"the command did not write {absent[0]}")
        except StageFailed as e:
            dt = time.perf_counter() - t0
            results.append(StageResult(stage.name, "failed", stage.command(), seconds=dt, error=str(e)))
            log(f"{head}: FAILED after {_secs(dt)}: {e}")
            continue
        dt, cpu = time.perf_counter() - t0, cpu_seconds() - c0
        write_json(stage.stamp_path(), {"format": STAMP_FORMAT, "stage": stage.name, "key": key,
                                        "wall_time_s": round(dt, 2), "cpu_s": round(cpu, 2),
                                        "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
        results.append(StageResult(stage.name, "ran", stage.command(), seconds=dt, made_in_s=dt, cpu_s=cpu))
        log(f"{head}: done in {_secs(dt)} (CPU {_secs(cpu)})")
    total, total_cpu = time.perf_counter() - start_all, cpu_seconds() - cpu_all
    counts = {k: sum(r.status == k for r in results) for k in ("ran", "cached", "failed", "blocked")}
    log(f"total wall time {_secs(total)} (CPU {_secs(total_cpu)}): " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return results


def dry_run(stages: Iterable[Stage], log: Callable[[str], None] = print) -> None:
    """Print every stage, whether it would be reused from the cache, and its command, without running anything."""
    stages = list(stages)
    for i, stage in enumerate(stages, 1):
        state = "cached" if is_cached(stage) else "would run"
        log(f"[{i}/{len(stages)}] {stage.name}: {state}\n    $ {stage.command()}")


def _secs(s: float | None) -> str:
    if s is None:
        return "? s"
    return f"{s:.1f} s" if s < 600 else f"{s / 60:.1f} min"


# ---------------------------------------------------------------------------------------------------------------
# A callback that leaves a fit stage's final metrics on disk
# ---------------------------------------------------------------------------------------------------------------


class FinalMetrics(pl.Callback):
    """At the end of fit, write the trainer's last logged metrics (e.g. ``val/acc``) to a JSON file (rank 0).

    With ``val_split: 0`` a ddkit datamodule validates on the test split, so ``val/acc`` is then the final network's
    test accuracy; the file records ``val_split`` so a reader can tell.

    Args:
        path: the JSON file to write (atomically).
    """

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
        dm = trainer.datamodule
        write_json(self.path, {"metrics": metrics, "epochs": trainer.current_epoch, "steps": trainer.global_step,
                               "val_split": getattr(dm, "val_split", None)})


def metrics_args(path: str) -> list[str]:
    """``ddkit fit`` overrides appending :class:`FinalMetrics` (put them after overrides of other callbacks)."""
    return ["--trainer.callbacks+=ddkit.pipelines.FinalMetrics", "--trainer.callbacks.init_args.path", path]


# ---------------------------------------------------------------------------------------------------------------
# The method chains
# ---------------------------------------------------------------------------------------------------------------

METHODS = ("random", "sre2l", "scdd", "mtt", "datm")
PROTOCOLS = ("hard", "soft", "kd")
OWN_PROTOCOL = {"random": "hard", "sre2l": "kd", "scdd": "kd", "mtt": "hard", "datm": "soft"}
ZCA_METHODS = ("datm",)  # sets made from a ZCA-whitened buffer: evaluated (and kd-taught) in that space
QUIET = ("--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false")
# The kd protocol takes each dataset's relabel-config recipe (configs/<dataset>/{sre2l,scdd}/relabel_ipc10.yaml):
# T 30, Mixup, AdamW lr 5e-3, batch 32; no crop / flip on digits (a flipped digit is another digit).
KD_RECIPES: dict[str, dict[str, Any]] = {
    "digits": {"temperature": 30.0, "mix": "mixup", "augment": "none", "lr": 0.005, "batch_size": 32},
    "fashion_mnist": {"temperature": 30.0, "mix": "mixup", "augment": "crop_flip", "lr": 0.005, "batch_size": 32},
}


@dataclass(frozen=True)
class Plan:
    """What to run for one dataset.

    Args:
        dataset: ``digits`` or ``fashion_mnist`` (configs are read from ``configs/<dataset>/``).
        root: where every artifact, stamp, log and report goes.
        methods: distilled-set methods (and ``random``) to run.
        ipcs: images per class.
        protocols: evaluation protocols (``hard``, ``soft``, ``kd``).
        own_protocol_only: evaluate each set only under its own method's protocol (:data:`OWN_PROTOCOL`).
        full: run the full-data reference (the classifier config with the evaluation net).
        seeds: networks per evaluation cell.
        eval_net_kwargs: the evaluation ConvNet's options.
        eval_epochs: epochs of every protocol (None: each protocol's default).
        kd_options: ``kd`` protocol fields besides the teacher (e.g. the relabel config's recipe).
        extra: stage kind -> overrides appended to that kind's commands (e.g. reduced steps for the demo). Kinds:
            reference, teacher, pretrain, probe, recover, relabel, buffer, distill, evaluate.
        config_dir: the configs folder.
        eval_dir: folder (under ``root``) of the evaluation reports; one per evaluation setting, so that switching
            settings does not overwrite the other setting's cells.
        progress_bars: keep Lightning's progress bars and model summaries.
        log_dir: where every TensorBoard run goes, the evaluations' curves included
            (``<log_dir>/evaluate/<method>_ipc<K>_<protocol>``); ``None``: the stages' runs to ``<root>/runs``, the
            evaluations' curves beside their reports.
    """

    dataset: str
    root: str
    methods: tuple[str, ...] = METHODS
    ipcs: tuple[int, ...] = (10,)
    protocols: tuple[str, ...] = PROTOCOLS
    own_protocol_only: bool = False
    full: bool = True
    seeds: int = 3
    eval_net_kwargs: dict[str, Any] = field(default_factory=lambda: {"depth": 3, "width": 32, "norm": "instance"})
    eval_epochs: int | None = None
    kd_options: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, tuple[str, ...]] = field(default_factory=dict)
    config_dir: str = "configs"
    eval_dir: str = "eval"
    progress_bars: bool = False
    log_dir: str | None = None

    def validate(self) -> None:
        for m in self.methods:
            if m not in METHODS:
                raise DDKitError(f"methods: unknown method (known: {', '.join(METHODS)}), got {m!r}")
        for p in self.protocols:
            if p not in PROTOCOLS:
                raise DDKitError(f"protocols: unknown protocol (known: {', '.join(PROTOCOLS)}), got {p!r}")
        for k in self.ipcs:
            if k <= 0:
                raise DDKitError(f"ipcs: must be > 0, got {k!r}")
        if self.seeds <= 0:
            raise DDKitError(f"seeds: must be > 0, got {self.seeds!r}")

    def protocols_for(self, method: str) -> tuple[str, ...]:
        """The protocols a method's sets are evaluated under."""
        if self.own_protocol_only:
            return (OWN_PROTOCOL[method],) if OWN_PROTOCOL[method] in self.protocols else ()
        return self.protocols


def pick_config(*candidates: str) -> str:
    """The first existing config file among ``candidates`` (the last one if none exists: the stage then fails with
    'file not found' and its cells are reported as such)."""
    for c in candidates:
        if Path(c).is_file():
            return c
    return candidates[-1]


@dataclass
class Built:
    """The stage table of a plan and where to find each evaluation cell and each set."""

    stages: list[Stage]
    cells: dict[tuple[str, int, str], Stage]  # (method, ipc, protocol) -> its evaluate stage
    sets: dict[tuple[str, int], str]  # (method, ipc) -> DistilledSet path
    teachers: dict[str, str]  # kd teacher per method


def build_plan(plan: Plan) -> Built:
    """Write out the stage table of ``plan`` (see the module docstring for the chains).

    Raises:
        DDKitError: for unknown methods or protocols, or IPC / seeds <= 0.
    """
    plan.validate()
    R, C = plan.root, f"{plan.config_dir}/{plan.dataset}"
    logs = plan.log_dir or f"{R}/runs"
    fit_common = ["--trainer.logger.init_args.save_dir", logs] + ([] if plan.progress_bars else list(QUIET))
    stages: dict[str, Stage] = {}

    def fit(name: str, kind: str, method: str, config: str, overrides: list[str], outputs: list[str],
            inputs: list[str] = (), clean: list[str] = (), ipc: int | None = None,
            metrics: str | None = None) -> Stage:
        argv = ["fit", "-c", config, *overrides, *fit_common, *plan.extra.get(kind, ())]
        if metrics:
            argv += metrics_args(metrics)
        s = Stage(name, tuple(argv), tuple(outputs), tuple(inputs), tuple(clean), kind, method, ipc)
        stages[name] = s
        return s

    methods = set(plan.methods)
    kd_methods = {m for m in methods if "kd" in plan.protocols_for(m)}
    teachers = {"sre2l": f"{R}/sre2l/teacher.safetensors", "scdd": f"{R}/scdd/teacher.safetensors",
                "random": f"{R}/sre2l/teacher.safetensors", "mtt": f"{R}/sre2l/teacher.safetensors",
                "datm": f"{R}/sre2l/teacher_zca.safetensors"}

    # SRe2L squeeze: the supervised teacher (also the kd teacher of random / MTT sets; on ZCA data for DATM sets).
    if methods & {"sre2l"} or kd_methods & {"random", "mtt"}:
        fit("sre2l_teacher", "teacher", "sre2l" if "sre2l" in methods else "shared", f"{C}/sre2l/squeeze.yaml",
            ["--model.init_args.export_teacher", teachers["sre2l"], "--checkpoint.dirpath", f"{R}/sre2l/ckpt_squeeze"],
            [teachers["sre2l"], f"{R}/sre2l/teacher_metrics.json"], clean=[f"{R}/sre2l/ckpt_squeeze"],
            metrics=f"{R}/sre2l/teacher_metrics.json")
    if "datm" in kd_methods:
        fit("sre2l_teacher_zca", "teacher", "shared", f"{C}/sre2l/squeeze.yaml",
            ["--data.init_args.zca", "true", "--model.init_args.export_teacher", teachers["datm"],
             "--checkpoint.dirpath", f"{R}/sre2l/ckpt_squeeze_zca"],
            [teachers["datm"], f"{R}/sre2l/teacher_zca_metrics.json"], clean=[f"{R}/sre2l/ckpt_squeeze_zca"],
            metrics=f"{R}/sre2l/teacher_zca_metrics.json")
    # SC-DD squeeze: MoCo v2 pretraining, then a linear probe on the frozen backbone.
    if "scdd" in methods:
        ssl_dir = f"{R}/scdd/pretrain_mocov2"
        fit("scdd_pretrain", "pretrain", "scdd", f"{C}/scdd/pretrain_mocov2.yaml", ["--checkpoint.dirpath", ssl_dir],
            [f"{ssl_dir}/last.ckpt"], clean=[ssl_dir])
        fit("scdd_probe", "probe", "scdd", f"{C}/scdd/probe.yaml",
            ["--model.init_args.ssl_checkpoint", f"{ssl_dir}/last.ckpt", "--model.init_args.export_teacher",
             teachers["scdd"], "--checkpoint.dirpath", f"{R}/scdd/ckpt_probe"],
            [teachers["scdd"], f"{R}/scdd/teacher_metrics.json"], [f"{ssl_dir}/last.ckpt"],
            clean=[f"{R}/scdd/ckpt_probe"], metrics=f"{R}/scdd/teacher_metrics.json")
    for m in ("mtt", "datm"):
        if m in methods:
            fit(f"{m}_buffer", "buffer", m, f"{C}/{m}/buffer.yaml",
                ["--model.init_args.buffer", f"{R}/{m}/buffer", "--checkpoint.dirpath", f"{R}/{m}/ckpt_buffer"],
                [f"{R}/{m}/buffer"], clean=[f"{R}/{m}/ckpt_buffer"])

    sets: dict[tuple[str, int], str] = {}
    cells: dict[tuple[str, int, str], Stage] = {}
    net_kwargs = json.dumps(plan.eval_net_kwargs)
    for k in plan.ipcs:
        for m in ("sre2l", "scdd"):
            if m not in methods:
                continue
            out = f"{R}/{m}/recover_ipc{k}"
            # SC-DD's recovery is SRe2L's from the SSL teacher: its own config when there is one, else SRe2L's.
            config = pick_config(f"{C}/{m}/recover_ipc{k}.yaml", f"{C}/{m}/recover_ipc10.yaml",
                                 f"{C}/sre2l/recover_ipc{k}.yaml", f"{C}/sre2l/recover_ipc10.yaml")
            fit(f"{m}_recover_ipc{k}", "recover", m, config,
                ["--model.init_args.ipc", str(k), "--model.init_args.teacher", teachers[m], "--model.init_args.method",
                 m, "--model.init_args.output", out, "--checkpoint.dirpath", f"{R}/{m}/ckpt_recover_ipc{k}"],
                [out], [teachers[m]], clean=[f"{R}/{m}/ckpt_recover_ipc{k}"], ipc=k)
            sets[(m, k)] = out
            fit(f"{m}_relabel_ipc{k}", "relabel", m,
                pick_config(f"{C}/{m}/relabel_ipc{k}.yaml", f"{C}/{m}/relabel_ipc10.yaml"),
                ["--data.init_args.distilled", out, "--model.init_args.teacher", teachers[m],
                 "--model.init_args.soft_labels", f"{R}/{m}/soft_labels_ipc{k}",
                 "--checkpoint.dirpath", f"{R}/{m}/ckpt_relabel_ipc{k}"],
                [f"{R}/{m}/relabel_ipc{k}.json"], [out, teachers[m]],
                clean=[f"{R}/{m}/soft_labels_ipc{k}", f"{R}/{m}/ckpt_relabel_ipc{k}"], ipc=k,
                metrics=f"{R}/{m}/relabel_ipc{k}.json")
        for m in ("mtt", "datm"):
            if m not in methods:
                continue
            out = f"{R}/{m}/distill_ipc{k}"
            own = f"{C}/{m}/distill_ipc{k}.yaml"
            config = pick_config(own, f"{C}/{m}/distill_ipc10.yaml")
            fit(f"{m}_distill_ipc{k}", "distill", m, config,
                (["--model.init_args.ipc", str(k)] if config != own else [])
                + ["--data.init_args.buffer", f"{R}/{m}/buffer", "--model.init_args.output", out,
                   "--checkpoint.dirpath", f"{R}/{m}/ckpt_distill_ipc{k}"],
                [out], [f"{R}/{m}/buffer"], clean=[f"{R}/{m}/ckpt_distill_ipc{k}"], ipc=k)
            sets[(m, k)] = f"{out}/best"

        # This IPC's evaluations right after its sets (own protocols first), so a partial run gives whole rows.
        todo = [(m, p) for m in plan.methods for p in plan.protocols_for(m)]
        for m, p in sorted(todo, key=lambda mp: mp[1] != OWN_PROTOCOL[mp[0]]):
            source = ["--baselines", "[random]", "--ipc", str(k)] if m == "random" else \
                ["--distilled", json.dumps([sets[(m, k)]])]
            inputs = [] if m == "random" else [sets[(m, k)]]
            opts = []
            if p == "kd":
                opts = ["--protocol_options", json.dumps({"kd": {**plan.kd_options, "teacher": teachers[m]}})]
                inputs.append(teachers[m])
            out = f"{R}/{plan.eval_dir}/{m}_ipc{k}_{p}"
            argv = ["evaluate", "--data.dataset", plan.dataset,
                    *(["--data.zca", "true"] if m in ZCA_METHODS else []), *source, "--protocols", f"[{p}]",
                    *opts, "--seeds", str(plan.seeds), "--net", "convnet", "--net_kwargs", net_kwargs,
                    *(["--epochs", str(plan.eval_epochs)] if plan.eval_epochs else []),
                    "--output", out, "--progress", "true" if plan.progress_bars else "false",
                    *(["--log_dir", f"{logs}/evaluate/{m}_ipc{k}_{p}"] if plan.log_dir else []),
                    *plan.extra.get("evaluate", ())]
            s = Stage(f"eval_{m}_ipc{k}_{p}", tuple(argv), (out,), tuple(inputs), (), "evaluate", m, k)
            stages[s.name] = s
            cells[(m, k, p)] = s
    if plan.full:  # independent of everything else; last, as it is the longest single stage on Fashion-MNIST
        # The evaluation's net, so that the reference is the ceiling of the same student.
        fit("full", "reference", "full", f"{C}/classifier.yaml",
            ["--model.init_args.net_kwargs", net_kwargs, "--checkpoint.dirpath", f"{R}/full/checkpoints"],
            [f"{R}/full/metrics.json"], clean=[f"{R}/full/checkpoints"], metrics=f"{R}/full/metrics.json")
    return Built(list(stages.values()), cells, sets, teachers)


# ---------------------------------------------------------------------------------------------------------------
# From the cache to one results document, and a Markdown table
# ---------------------------------------------------------------------------------------------------------------


def made_in(stage: Stage, what: str = "wall_time_s") -> float | None:
    """The stamp's wall time (or ``cpu_s``: user + sys CPU time) of a valid cached artifact, else None."""
    if not is_cached(stage):
        return None
    return (read_stamp(stage) or {}).get(what)


def collect(built: Built, plan: Plan, results: list[StageResult] | None = None) -> dict[str, Any]:
    """Gather every cell of the plan's grid from the cache: a cell is ``done`` when its evaluation's report exists
    and its stamp matches the current command, configs and inputs; otherwise ``not run`` (or ``failed`` /
    ``blocked`` with the reason, when this session tried it). Never fills a number that no run produced.
    """
    by_name = {r.name: r for r in results or []}
    stage_by_name = {s.name: s for s in built.stages}

    def total(stages: list[Stage], what: str) -> float | None:
        times = [made_in(s, what) for s in stages]
        return sum(times) if all(t is not None for t in times) else None

    cells = []
    for k in plan.ipcs:
        for m in plan.methods:
            for p in PROTOCOLS:
                cell: dict[str, Any] = {"method": m, "ipc": k, "protocol": p, "status": "not run"}
                s = built.cells.get((m, k, p))
                if s is None:
                    cell["note"] = "not in this plan"
                    cells.append(cell)
                    continue
                cell["command"] = s.command()
                report = Path(s.outputs[0]) / "report.json"
                if is_cached(s) and report.is_file():
                    rep = json.loads(report.read_text())
                    r = rep["results"][0]
                    cell.update(status="done", mean=r["mean"], std=r["std"], accuracies=r["accuracies"],
                                seeds=rep["seeds"], protocol_record=r["protocol"], net=rep["net"],
                                net_kwargs=rep["net_kwargs"], eval_wall_time_s=r["wall_time_s"],
                                eval_cpu_s=made_in(s, "cpu_s"),
                                kd_teacher=built.teachers[m] if p == "kd" else None)
                elif s.name in by_name and by_name[s.name].status in ("failed", "blocked"):
                    cell.update(status=by_name[s.name].status, note=by_name[s.name].error)
                cells.append(cell)

    methods: dict[str, Any] = {}
    for m in plan.methods:
        own = [s for s in built.stages if s.method == m and s.kind != "evaluate"]
        distill, distill_cpu, distill_cmd = {}, {}, {}
        for k in plan.ipcs:  # the IPC-specific distillation stages (none for the random subset: 0 s)
            ks = [s for s in own if s.ipc == k and s.kind in ("recover", "distill")]
            distill[str(k)], distill_cpu[str(k)] = total(ks, "wall_time_s"), total(ks, "cpu_s")
            distill_cmd[str(k)] = [s.command() for s in ks]
        shared = [s for s in own if s.ipc is None]
        relabel = {}
        for k in plan.ipcs:
            s = stage_by_name.get(f"{m}_relabel_ipc{k}")
            if s is not None and is_cached(s):
                rec = json.loads(Path(s.outputs[0]).read_text())
                relabel[str(k)] = {"val_acc": rec["metrics"].get("val/acc"), "epochs": rec["epochs"],
                                   "val_split": rec["val_split"], "wall_time_s": made_in(s), "command": s.command()}
        methods[m] = {
            "distill_wall_time_s": distill,
            "distill_cpu_s": distill_cpu,
            "distill_commands": distill_cmd,
            "shared_stages": {s.name: {"wall_time_s": made_in(s), "cpu_s": made_in(s, "cpu_s"),
                                       "command": s.command()} for s in shared},
            "relabel": relabel,
            "kd_teacher": built.teachers[m],
        }

    shared_stages = {s.name: {"wall_time_s": made_in(s), "cpu_s": made_in(s, "cpu_s"), "command": s.command()}
                     for s in built.stages if s.method == "shared"}
    full = None
    s = stage_by_name.get("full")
    if s is not None:
        full = {"status": "not run", "command": s.command()}
        if is_cached(s):
            rec = json.loads(Path(s.outputs[0]).read_text())
            full.update(status="done", accuracy=rec["metrics"].get("val/acc"), epochs=rec["epochs"],
                        val_split=rec["val_split"], wall_time_s=made_in(s), cpu_s=made_in(s, "cpu_s"))
    teacher_acc = {}
    for name in ("sre2l_teacher", "sre2l_teacher_zca", "scdd_probe"):
        s = stage_by_name.get(name)
        if s is not None and is_cached(s):
            rec = json.loads(Path(s.outputs[1]).read_text())
            teacher_acc[name] = {"val_acc": rec["metrics"].get("val/acc"), "val_split": rec["val_split"],
                                 "command": s.command()}
    return {
        "dataset": plan.dataset,
        "ipcs": list(plan.ipcs),
        "methods": list(plan.methods),
        "protocols": list(PROTOCOLS),
        "own_protocol": {m: OWN_PROTOCOL[m] for m in plan.methods},
        "seeds": plan.seeds,
        "eval_net": {"net": "convnet", "net_kwargs": plan.eval_net_kwargs},
        "eval_epochs": plan.eval_epochs,
        "kd_options": plan.kd_options,
        "full_data": full,
        "shared_stages": shared_stages,
        "teachers": teacher_acc,
        "cells": cells,
        "method_records": methods,
        "session": [r.to_dict() for r in results or []],
        "stages_wall_time_s": round(sum(t for t in (made_in(s) for s in built.stages) if t is not None), 1),
        "stages_cpu_s": round(sum(t for t in (made_in(s, "cpu_s") for s in built.stages) if t is not None), 1),
    }


LABELS = {"random": "random real subset", "sre2l": "SRe2L", "scdd": "SC-DD", "mtt": "MTT", "datm": "DATM",
          "full": "full data"}


def fmt_cell(cell: dict[str, Any] | None, own: bool = False) -> str:
    """``mean ± std`` in %, bold for the method's own protocol; otherwise the status (``not run``, ...)."""
    if cell is None:
        return "—"
    if cell["status"] != "done":
        return cell["status"]
    text = f"{100 * cell['mean']:.1f} ± {100 * cell['std']:.1f}"
    return f"**{text}**" if own else text


def results_table(doc: dict[str, Any], anchors: dict[str, dict[int, float]] | None = None,
                  protocols: Iterable[str] | None = None) -> str:
    """The Markdown results table: one row per method, one column per (IPC, protocol), and the distillation wall
    time per IPC. Published ``anchors`` (name -> {ipc: accuracy %}, ``hard`` protocol) become extra rows.
    """
    protocols = list(protocols or doc["protocols"])
    ipcs = doc["ipcs"]
    index = {(c["method"], c["ipc"], c["protocol"]): c for c in doc["cells"]}
    head = ["method"] + [f"IPC {k} {p}" for k in ipcs for p in protocols] + [
        "distill wall (CPU) s, IPC " + " / ".join(map(str, ipcs))]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in doc["methods"]:
        own = doc["own_protocol"].get(m)
        cells = [fmt_cell(index.get((m, k, p)), own=p == own) for k in ipcs for p in protocols]
        rec = doc["method_records"].get(m, {})
        wall, cpu = rec.get("distill_wall_time_s", {}), rec.get("distill_cpu_s", {})
        t = " / ".join(_wall_cpu(wall.get(str(k)), cpu.get(str(k))) for k in ipcs)
        lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + f" | {t} |")
    for name, values in (anchors or {}).items():
        cells = [(f"{values[k]:.1f}" if k in values else "—") if p == "hard" else "—" for k in ipcs for p in protocols]
        lines.append(f"| {name} | " + " | ".join(cells) + " | — |")
    return "\n".join(lines) + "\n"


def _wall_cpu(wall: float | None, cpu: float | None) -> str:
    if wall is None:
        return "—"
    return f"{wall:.0f}" + ("" if cpu is None or wall == 0 else f" ({cpu:.0f})")


def replace_section(text: str, name: str, body: str) -> str:
    """Replace what lies between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in ``text`` with ``body``.

    Raises:
        DDKitError: if the markers are missing or out of order.
    """
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    i, j = text.find(begin), text.find(end)
    if i < 0 or j < i:
        raise DDKitError(f"markers: {begin} ... {end} not found in order, got {name!r}")
    return text[: i + len(begin)] + "\n" + body.rstrip("\n") + "\n" + text[j:]
