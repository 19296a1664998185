"""A resumed run is the run that wrote the checkpoint: same stage class, same options (see ResumeCheck)."""

from __future__ import annotations

import json
from typing import Any

import lightning as L

from ddkit.errors import DDKitError

# Options any stage may change when it resumes: they decide where and how loudly it writes, not what it computes.
MAY_CHANGE = ("overwrite",)


def _plain(value: Any) -> Any:
    """Comparable plain form of an option (tuples as lists, odd objects as strings)."""
    return json.loads(json.dumps(value, default=str))


def check_resumed_options(saved: dict[str, Any], current: dict[str, Any], may_change: tuple[str, ...] = ()) -> None:
    """Refuse a resume whose stage class or options differ from the checkpoint's.

    Lightning puts back the optimizer and scheduler states of the checkpoint, so a changed ``lr`` (say) would be
    silently dropped; ddkit refuses it instead. Options named in ``may_change`` (and :data:`MAY_CHANGE`) may differ.

    Args:
        saved: the checkpoint's ``hyper_parameters``.
        current: the running module's ``hparams``.
        may_change: the stage's options that do not change what it computes.

    Raises:
        DDKitError: naming the first differing class or option, with both values.
    """
    old_class, new_class = saved.get("_class_path"), current.get("_class_path")
    if old_class and new_class and old_class != new_class:
        raise DDKitError(f"ckpt_path: written by a {old_class} run; resume it with that stage, got a {new_class} run")
    for key in sorted(set(saved) | set(current)):
        if key.startswith("_") or key in may_change or key in MAY_CHANGE:
            continue
        if key not in saved or key not in current:
            continue  # an option added or removed by a ddkit update: its default applies
        old, new = _plain(saved[key]), _plain(current[key])
        if old != new:
            raise DDKitError(f"model.{key}: the checkpoint was made with {key}={old!r}; resume with the same value "
                             f"(or start a new run to change it), got {new!r}")


class ResumeCheck(L.Callback):
    """Checks, when a checkpoint is restored, that it was written by this stage with these options.

    Added to every ``ddkit`` run by the CLI. A stage lists the options it may change on resume in a class attribute
    ``resume_may_change``.
    """

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("hyper_parameters") or {}
        check_resumed_options(saved, dict(pl_module.hparams), tuple(getattr(pl_module, "resume_may_change", ())))
