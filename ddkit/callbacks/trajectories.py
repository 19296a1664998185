"""Record expert trajectories into an ExpertBuffer (MTT [1] ``buffer.py``, FTD/DATM [2] ``buffer_FTD.py``).

The reference keeps ``[copy(p) for p in net.parameters()]`` before training and after every epoch; here each
snapshot is one flat float32 CPU row, and an expert's rows become ``expert_{k:04d}.safetensors`` through
:mod:`ddkit.formats.buffer` as soon as the expert has its ``epochs + 1`` rows.

References:
    [1] Cazenavette et al., "Dataset Distillation by Matching Training Trajectories", CVPR 2022.
    [2] Guo et al., "Towards Lossless Dataset Distillation via Difficulty-Aligned Trajectory Matching",
        ICLR 2024.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from ddkit.datamodules.spec import as_spec
from ddkit.errors import DDKitError
from ddkit.formats.buffer import (
    META,
    BufferMeta,
    flatten_params,
    read_buffer_meta,
    save_expert,
    write_buffer_meta,
)


class RecordTrajectory(pl.Callback):
    """Snapshot ``pl_module.net``'s parameters before training and after every epoch; write each finished expert.

    Row 0 is taken at the start of the expert's first training batch (after any re-initialisation in
    ``on_train_epoch_start``, before the first update), row ``e`` after the last batch of its ``e``-th epoch
    (before that epoch's validation). Rows are flat
    float32 CPU copies in ``net.parameters()`` order. The rows of an unfinished expert are part of the callback's
    checkpoint state, so a fit resumed from an epoch-end checkpoint (``--ckpt_path last``) continues the same
    trajectory.

    Two kinds of module are supported:

    - a plain one-network fit (e.g. :class:`~ddkit.modules.classifier.Classifier`): the whole fit is expert
      ``expert_index`` with ``trainer.max_epochs`` epochs; under DDP the ranks hold the same network and only
      rank 0 writes;
    - a module that trains experts in sequence (:class:`~ddkit.modules.buffer.ExpertTraining`): it defines
      ``expert_index`` (the global index of the expert this rank trains in the current epoch, or None when the rank
      has none), ``expert_epochs`` and optionally ``expert_recipe()``; each rank writes its own experts.

    The module must have ``net`` and ``hparams`` ``net`` / ``net_kwargs`` and a data spec (``spec`` or
    ``hparams.data_spec``). Rank 0 writes ``meta.json`` at fit start (and again at fit end), with the
    datamodule's ZCA transform (``datamodule.zca``) when the data is whitened.

    Args:
        path: the buffer directory. An existing buffer there must have the same architecture, data and epochs.
        expert_index: the expert a plain one-network fit records.

    Raises:
        DDKitError: at fit start, if the module lacks what is listed above, ``max_epochs`` is not set for a plain
            fit, or ``path`` holds a different buffer.
    """

    def __init__(self, path: str, expert_index: int = 0) -> None:
        super().__init__()
        if expert_index < 0:
            raise DDKitError(f"expert_index: must be >= 0, got {expert_index!r}")
        self.path = Path(path)
        self.expert_index = expert_index
        self.rows: list[Tensor] = []
        self.expert: int | None = None
        self.written: list[int] = []
        self._meta: BufferMeta | None = None
        self._zca: dict[str, Tensor] | None = None
        self._recorded_epoch: int | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(path=str(self.path))

    # -- what the module says --------------------------------------------------------------------------------

    @staticmethod
    def _sharded(pl_module: pl.LightningModule) -> bool:
        return hasattr(pl_module, "expert_index")

    def _current(self, pl_module: pl.LightningModule) -> int | None:
        return pl_module.expert_index if self._sharded(pl_module) else self.expert_index

    def _epochs(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> int:
        epochs = getattr(pl_module, "expert_epochs", None) or trainer.max_epochs
        if not isinstance(epochs, int) or epochs < 1:
            raise DDKitError(f"trainer.max_epochs: RecordTrajectory needs a fixed number of epochs, got {epochs!r}")
        return epochs

    def _build_meta(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> BufferMeta:
        net = getattr(pl_module, "net", None)
        hp = getattr(pl_module, "hparams", {})
        if not isinstance(net, torch.nn.Module) or "net" not in hp:
            raise DDKitError(f"model: RecordTrajectory needs a module with `net` and hparams `net`, "
                             f"got {type(pl_module).__name__}")
        spec = getattr(pl_module, "spec", None) or as_spec(hp.get("data_spec"))
        if hasattr(pl_module, "expert_recipe"):
            recipe = pl_module.expert_recipe()
        else:
            recipe = {k: v for k, v in hp.items() if k not in ("data_spec", "net", "net_kwargs")}
            batch_size = getattr(trainer.datamodule, "batch_size", None) if trainer.datamodule else None
            recipe = {**recipe, "batch_size": batch_size, "module": type(pl_module).__name__}
        self._zca = None
        zca = getattr(trainer.datamodule, "zca", None) if trainer.datamodule is not None else None
        if spec.zca and zca is not None:
            self._zca = zca.state_dict() if hasattr(zca, "state_dict") else dict(zca)
        elif spec.zca:
            warnings.warn("RecordTrajectory: the data is ZCA-whitened but the datamodule exposes no `zca`; the "
                          "buffer will not store the transform", stacklevel=2)
        return BufferMeta.for_net(hp["net"], dict(hp.get("net_kwargs") or {}), spec, net,
                                  self._epochs(trainer, pl_module), recipe, zca=self._zca is not None)

    def _snapshot(self, pl_module: pl.LightningModule) -> Tensor:
        return flatten_params(list(pl_module.net.parameters()))

    def _writes(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        return self._sharded(pl_module) or trainer.is_global_zero

    # -- hooks -----------------------------------------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._meta = self._build_meta(trainer, pl_module)
        if (self.path / META).is_file():
            old = read_buffer_meta(self.path)
            if not old.compatible(self._meta):
                raise DDKitError(f"buffer: {str(self.path)!r} already holds a buffer of another net, data or epochs "
                                 f"(net {old.net} {old.net_kwargs}, P {old.num_params}, epochs {old.epochs}); use "
                                 f"another path or remove it, got net {self._meta.net} {self._meta.net_kwargs}, "
                                 f"P {self._meta.num_params}, epochs {self._meta.epochs}")
        if trainer.is_global_zero:
            write_buffer_meta(self.path, self._meta, self._zca)
        trainer.strategy.barrier("RecordTrajectory.meta")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        current = self._current(pl_module)
        if self.rows:
            if current != self.expert:
                raise RuntimeError(f"RecordTrajectory: expert {self.expert} has {len(self.rows)} of "
                                   f"{self._meta.epochs + 1} rows but the module is on expert {current}")
            return
        if current is not None:
            self.expert = current
            self.rows.append(self._snapshot(pl_module))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # The epoch's row is taken after its last batch, before validation, so a checkpoint saved at validation
        # end holds the same state as one saved at train epoch end.
        if batch_idx + 1 == trainer.num_training_batches:
            self._end_epoch(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_epoch(trainer, pl_module)  # no-op when the last batch already recorded the epoch

    def _end_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.rows or self._recorded_epoch == trainer.current_epoch:
            return
        self._recorded_epoch = trainer.current_epoch
        self.rows.append(self._snapshot(pl_module))
        if len(self.rows) == self._meta.epochs + 1:
            if self._writes(trainer, pl_module):
                metadata = {"rank": trainer.global_rank, "world_size": trainer.world_size}
                if hasattr(pl_module, "expert_seed"):
                    metadata["seed"] = pl_module.expert_seed(self.expert)
                save_expert(self.path, self.expert, torch.stack(self.rows), metadata)
                self.written.append(self.expert)
            self.rows, self.expert = [], None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and self._meta is not None:
            write_buffer_meta(self.path, self._meta, self._zca)
        if self.rows:
            warnings.warn(f"RecordTrajectory: expert {self.expert} stopped after {len(self.rows) - 1} of "
                          f"{self._meta.epochs} epochs and was not written", stacklevel=2)

    # -- checkpoint ------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"expert": self.expert, "rows": torch.stack(self.rows) if self.rows else None,
                "written": list(self.written)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        rows = state_dict.get("rows")
        self.rows = list(rows.unbind(0)) if rows is not None else []
        self.expert = state_dict.get("expert")
        self.written = list(state_dict.get("written", []))
