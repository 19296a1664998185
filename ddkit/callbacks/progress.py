"""Progress output that suits where stdout goes: tqdm bars on a terminal, a periodic one-line status otherwise.

A tqdm bar redirected to a file or a pipe writes a carriage-return redraw for every update (one classifier run left
a single 5,000-character line in its log); :class:`LineProgress` writes one short line every ``every_s`` seconds
instead, plus one when training ends.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar


class LineProgress(ProgressBar):
    """One status line (epoch, step, the progress-bar metrics) at most every ``every_s`` seconds, and at the end.

    Args:
        every_s: seconds between two status lines.
    """

    def __init__(self, every_s: float = 30.0) -> None:
        super().__init__()
        self.every_s = every_s
        self._enabled = True
        self._last = 0.0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last = time.monotonic()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if time.monotonic() - self._last >= self.every_s:
            self._print(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._print(trainer, pl_module)

    def status(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str:
        """``epoch 3/10 step 66/220 train/loss 0.4123 val/acc 0.912`` (totals only when they are set)."""
        epoch, epochs, steps = trainer.current_epoch + 1, "", ""
        if trainer.max_epochs is not None and trainer.max_epochs > 0:
            epoch, epochs = min(epoch, trainer.max_epochs), f"/{trainer.max_epochs}"  # after the last: the last
        if trainer.max_steps is not None and trainer.max_steps > 0:
            steps = f"/{trainer.max_steps}"
        parts = [f"epoch {epoch}{epochs}", f"step {trainer.global_step}{steps}"]
        for key, value in self.get_metrics(trainer, pl_module).items():
            if key == "v_num":
                continue
            parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
        return " ".join(parts)

    def _print(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last = time.monotonic()
        if self._enabled and trainer.is_global_zero:
            print(self.status(trainer, pl_module), flush=True)


def default_progress_bar() -> ProgressBar:
    """tqdm bars when stdout is a terminal, :class:`LineProgress` when it is a file or a pipe."""
    return TQDMProgressBar() if sys.stdout.isatty() else LineProgress()
