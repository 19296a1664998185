"""ClaimOutput: a stage's output path checked and locked at fit start, released at the end (see ddkit.formats.output)."""

from __future__ import annotations

import lightning as L

from ddkit.errors import DDKitError
from ddkit.formats.output import OutputLock, claim_output


class ClaimOutput(L.Callback):
    """Refuse an output this run must not write, and hold its lock while the fit runs.

    Runs at fit start, before the first step and before the other callbacks of the module that returns it.
    Rank 0 checks and locks (one lock per run, on a filesystem all ranks share); every rank raises the same one-line
    error, so a refused run stops on all of them before the first step. A module that writes an artifact returns
    this callback from ``configure_callbacks``.

    Args:
        path: the output file or directory.
        field: the option naming it, for messages.
        kind: what the stage writes (a key of ``ddkit.formats.output.KINDS``).
        overwrite: replacing an earlier artifact of the same kind is allowed.
        writes: the names the run adds to an existing directory (see ``claim_output``).
    """

    def __init__(self, path: str, field: str, kind: str, overwrite: bool = False,
                 writes: list[str] | None = None) -> None:
        self.path, self.field, self.kind, self.overwrite, self.writes = path, field, kind, overwrite, writes
        self._lock: OutputLock | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Not in setup: whether the run resumes (trainer.ckpt_path) is known only once the checkpoint is restored.
        error = None
        if trainer.is_global_zero:
            try:
                self._lock = OutputLock(self.path, self.field).acquire()  # first: another run may be writing there
                claim_output(self.path, self.field, self.kind, self.overwrite,
                             resuming=trainer.ckpt_path is not None, writes=self.writes)
            except DDKitError as e:
                self._release()
                error = str(e)
        error = trainer.strategy.broadcast(error, src=0)
        if error is not None:
            raise DDKitError(error)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._release()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

