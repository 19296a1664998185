"""Callbacks around a module that learns a synthetic set: periodic evaluation, the best set, image grids.

The module provides ``distilled_set() -> DistilledSet`` (the current set), ``iteration`` (matching iterations done),
``hparams.output`` (its run directory) and optionally ``evaluation_net() -> (net, net_kwargs)``; the datamodule
provides a validation split carved from the training set (``val_set``). Files and logs are written by rank 0.
"""

from __future__ import annotations

import logging
import math
import os
import random
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader

from ddkit.errors import DDKitError
from ddkit.formats.distilled import DistilledSet, save_distilled, to_pixels

TB_CELL_PX = 32  # images smaller than this are enlarged (nearest) so a grid is readable at TensorBoard's size


def image_grid(ds: DistilledSet, images_per_class: int = 10) -> torch.Tensor:
    """``[C, H', W']`` grid in [0, 1] pixels (normalisation or ZCA undone) covering every class: each class's first
    ``images_per_class`` images side by side, classes in label order, several classes per grid row when there are
    many (so the grid stays about square), images enlarged to at least :data:`TB_CELL_PX` pixels."""
    from torchvision.utils import make_grid

    k = min(images_per_class, ds.ipc)
    classes_per_row = max(1, round(math.sqrt(ds.spec.num_classes / k)))
    rows = [torch.nonzero(ds.labels == c).flatten()[:k] for c in range(ds.spec.num_classes)]
    pixels = to_pixels(ds.images[torch.cat(rows)], ds.spec, ds.zca)
    scale = max(1, math.ceil(TB_CELL_PX / max(pixels.shape[2:])))
    pixels = pixels.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    return make_grid(pixels, nrow=k * classes_per_row, padding=1, pad_value=1.0)


def log_image_grid(trainer: pl.Trainer, ds: DistilledSet, step: int, tag: str,
                   images_per_class: int = 10) -> None:
    """Add the set's image grid to every TensorBoard logger of ``trainer`` under ``tag`` (``<stage>/set``, so that
    TensorBoard groups it with the stage's other cards)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    grid = None
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            grid = image_grid(ds, images_per_class) if grid is None else grid
            logger.experiment.add_image(tag, grid, global_step=step)


class _QuietEvaluation:
    """Keep an evaluation inside a fit from disturbing it: global RNG states, PL_GLOBAL_SEED, Lightning's info logs."""

    def __enter__(self) -> None:
        self.torch_state = torch.get_rng_state()
        self.numpy_state = np.random.get_state()
        self.python_state = random.getstate()
        self.env = os.environ.get("PL_GLOBAL_SEED")
        self.loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric")]
        self.levels = [lg.level for lg in self.loggers]
        for lg in self.loggers:
            lg.setLevel(logging.WARNING)
        self.warnings = warnings.catch_warnings()
        self.warnings.__enter__()
        warnings.simplefilter("ignore")  # the nested runs' PossibleUserWarnings are not the user's business

    def __exit__(self, *exc: object) -> None:
        self.warnings.__exit__(*exc)
        torch.set_rng_state(self.torch_state)
        np.random.set_state(self.numpy_state)
        random.setstate(self.python_state)
        if self.env is None:
            os.environ.pop("PL_GLOBAL_SEED", None)
        else:
            os.environ["PL_GLOBAL_SEED"] = self.env
        for lg, level in zip(self.loggers, self.levels):
            lg.setLevel(level)


class PeriodicEvaluation(pl.Callback):
    """Every ``eval_every`` iterations, train fresh networks on the current synthetic set under an evaluation
    protocol (fewer epochs than a final evaluation) and score them on the VALIDATION split of the training set
    (never the test split); keep the best set as its own DistilledSet; log the accuracy and an image grid.

    Metrics (TensorBoard, at step = iterations done): ``val/acc`` (mean over ``seeds``), ``val/best_acc``; images:
    ``matching/set`` (every class).

    Args:
        eval_every: iterations between evaluations (0: only at the end, if ``at_end``).
        epochs: training epochs of each evaluation network.
        protocol: ``soft`` or ``hard``; ``None``: ``soft`` for a set with learned label logits (DATM), else ``hard``.
        protocol_options: other protocol fields (e.g. ``{batch_size: 256, lr: 0.01}``).
        seeds: networks per evaluation.
        first_seed: seed of the first network.
        net: evaluation architecture; ``None``: the module's ``evaluation_net()`` (the experts' net for matching).
        net_kwargs: its options (used with ``net``).
        best_dir: where the best set goes; ``None``: ``<module.hparams.output>/best``.
        at_start: also evaluate the initial set (iteration 0) when a fresh run starts: the baseline the learned set
            must beat, and a candidate for the best set.
        at_end: also evaluate the final set when fit ends (unless it was just evaluated).
        snapshots: also write every evaluated set to ``<best_dir>/../snapshots/iter_<iteration>`` (six digits), e.g.
            to test each of them afterwards for a curve of test accuracy against iterations.
        log_images: log the image grid at every evaluation.
        images_per_class: images per class in the grid.
        precision: precision of the evaluation runs.

    Raises:
        DDKitError: at fit start, if the datamodule has no validation split.
    """

    def __init__(
        self,
        eval_every: int = 500,
        epochs: int = 300,
        protocol: str | None = None,
        protocol_options: dict[str, Any] | None = None,
        seeds: int = 1,
        first_seed: int = 0,
        net: str | None = None,
        net_kwargs: dict[str, Any] | None = None,
        best_dir: str | None = None,
        at_start: bool = False,
        at_end: bool = True,
        snapshots: bool = False,
        log_images: bool = True,
        images_per_class: int = 10,
        precision: str = "32-true",
    ) -> None:
        super().__init__()
        if eval_every < 0:
            raise DDKitError(f"eval_every: must be >= 0, got {eval_every!r}")
        if epochs <= 0:
            raise DDKitError(f"epochs: must be > 0, got {epochs!r}")
        if seeds <= 0:
            raise DDKitError(f"seeds: must be > 0, got {seeds!r}")
        if protocol is not None and protocol not in ("soft", "hard"):
            raise DDKitError(f"protocol: must be soft, hard or null, got {protocol!r}")
        self.eval_every = eval_every
        self.epochs = epochs
        self.protocol = protocol
        self.protocol_options = dict(protocol_options or {})
        from ddkit.evaluation.protocols import get_protocol

        # A misspelt option fails here, not hours into the run (soft's options are hard's and one more).
        get_protocol(protocol or "soft", **{**self.protocol_options, "epochs": epochs})
        self.seeds = seeds
        self.first_seed = first_seed
        self.net = net
        self.net_kwargs = dict(net_kwargs or {})
        self.best_dir = best_dir
        self.at_start = at_start
        self.at_end = at_end
        self.snapshots = snapshots
        self.log_images = log_images
        self.images_per_class = images_per_class
        self.precision = precision
        self.best_acc = -1.0
        self.best_iteration = -1
        self.last_evaluated = -1
        self.history: list[tuple[int, float]] = []

    # -- state -----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"best_acc": self.best_acc, "best_iteration": self.best_iteration,
                "last_evaluated": self.last_evaluated, "history": [list(h) for h in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_acc = float(state_dict["best_acc"])
        self.best_iteration = int(state_dict["best_iteration"])
        self.last_evaluated = int(state_dict["last_evaluated"])
        self.history = [(int(i), float(a)) for i, a in state_dict.get("history", [])]

    # -- hooks -----------------------------------------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        data = trainer.datamodule
        if getattr(data, "val_set", None) is None:
            raise DDKitError("data.val_split: PeriodicEvaluation scores sets on a validation split carved from the "
                             "training set (never the test split); set val_split > 0, got 0")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_start and int(pl_module.iteration) == 0 and self.last_evaluated != 0:
            self.evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        it = int(pl_module.iteration)
        if self.eval_every > 0 and it % self.eval_every == 0 and it != self.last_evaluated:
            self.evaluate(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Not on_train_end: a run resumed from its final checkpoint skips the train-end hooks.
        if self.at_end and int(pl_module.iteration) != self.last_evaluated:
            self.evaluate(trainer, pl_module)

    # -- work ------------------------------------------------------------------------------------------------

    def _net(self, pl_module: pl.LightningModule) -> tuple[str, dict[str, Any]]:
        if self.net is not None:
            return self.net, self.net_kwargs
        if hasattr(pl_module, "evaluation_net"):
            return pl_module.evaluation_net()
        raise DDKitError(f"net: the module does not name an evaluation net; set PeriodicEvaluation.net, "
                         f"got {type(pl_module).__name__}")

    def score(self, ds: DistilledSet, data: Any, net: str, net_kwargs: dict[str, Any],
              device: torch.device) -> float:
        """Mean validation accuracy in [0, 1] of ``seeds`` networks trained on ``ds``."""
        from ddkit.evaluation.evaluator import train_and_test
        from ddkit.evaluation.protocols import get_protocol

        name = self.protocol or ("soft" if ds.label_logits is not None else "hard")
        protocol = get_protocol(name, **{**self.protocol_options, "epochs": self.epochs})
        loader = DataLoader(data.val_set, batch_size=1024, shuffle=False)
        accelerator = "cpu" if device.type == "cpu" else "auto"
        devices: Any = 1 if device.type == "cpu" or device.index is None else [device.index]
        trainer_kwargs = {"accelerator": accelerator, "devices": devices, "precision": self.precision,
                          "enable_progress_bar": False}
        accs = []
        with _QuietEvaluation():
            for seed in range(self.first_seed, self.first_seed + self.seeds):
                accs.append(train_and_test(ds, protocol, net, net_kwargs, loader, seed, trainer_kwargs, None,
                                           "periodic"))
        return sum(accs) / len(accs)

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        """Score the module's current set; returns the validation accuracy.

        Under DDP every rank runs the same (identically seeded) evaluation in lockstep: the evaluation runs' metrics
        synchronise over the default process group, so one rank evaluating alone would block. The set is
        replicated, so the ranks agree on the result; rank 0 writes the best set and logs.
        """
        it = int(pl_module.iteration)
        self.last_evaluated = it
        ds = pl_module.distilled_set()
        net, net_kwargs = self._net(pl_module)
        acc = self.score(ds, trainer.datamodule, net, net_kwargs, pl_module.device)
        self.history.append((it, acc))
        improved = acc > self.best_acc
        if improved:
            self.best_acc, self.best_iteration = acc, it
        if not trainer.is_global_zero:
            return acc
        if improved:
            ds.extra = {**ds.extra, "val_acc": acc, "val_epochs": self.epochs}
            save_distilled(ds, self.best_path(pl_module))
        if self.snapshots:
            save_distilled(ds, self.snapshot_path(pl_module, it))
        for logger in trainer.loggers:
            logger.log_metrics({"val/acc": acc, "val/best_acc": self.best_acc}, step=it)
        if self.log_images:
            log_image_grid(trainer, ds, it, "matching/set", images_per_class=self.images_per_class)
        return acc

    def best_path(self, pl_module: pl.LightningModule) -> Path:
        if self.best_dir is not None:
            return Path(self.best_dir)
        output = getattr(pl_module.hparams, "output", None)
        if output is None:
            raise DDKitError(f"best_dir: the module has no output directory; set PeriodicEvaluation.best_dir, "
                             f"got {type(pl_module).__name__}")
        return Path(output) / "best"

    def snapshot_path(self, pl_module: pl.LightningModule, iteration: int) -> Path:
        return self.best_path(pl_module).parent / "snapshots" / f"iter_{iteration:06d}"
