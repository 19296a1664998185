"""The buffer stage of MTT / DATM: train expert networks and record their trajectories into an ExpertBuffer.

Recipe of the references (``../shared/reference/datm-mtt.md`` section 1): a fresh ConvNet per expert (D3, width
128, instance norm; D4 at 64 px), plain SGD (lr 0.01, no momentum, no weight decay, constant lr), DSA on every real
batch, batch 256, MTT 50 epochs, DATM/FTD 100 epochs with GSAM (rho 0.01, alpha 0.3, adaptive). Parameters are
recorded before training and after every epoch by :class:`~ddkit.callbacks.trajectories.RecordTrajectory`.

One fit trains all experts: rank ``r`` of ``W`` trains experts ``first_expert + r``, ``+ r + W``, ... one after the
other, ``epochs`` epochs each, so the fit runs ``ceil(num_experts / W) * epochs`` epochs (the module sets
``trainer.max_epochs``). At the first epoch of each expert the network is re-initialised from the expert's seed,
the optimizer state is cleared and the DSA generator re-seeded. Experts never exchange gradients: the step runs
under manual optimization with DDP's gradient synchronisation blocked, and every rank reads the whole training set
(``trainer.use_distributed_sampler: false``, checked). With an epoch-seeded training order
(``RealDataModule(shuffle_seed=...)``) expert ``k``'s epoch ``e`` uses order ``k * epochs + e``: expert ``k`` is
the same whatever the number of processes, and a run resumed from an epoch-end checkpoint reproduces it.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DistributedSampler

from ddkit.callbacks.output import ClaimOutput
from ddkit.datamodules.spec import DataSpec, as_spec
from ddkit.errors import DDKitError
from ddkit.modules.common import AUGMENTS, BatchAugment, build_optimizer
from ddkit.nets import build_net


@contextlib.contextmanager
def frozen_bn_stats(net: nn.Module) -> Iterator[None]:
    """BN running statistics are not updated inside (momentum 0), as GSAM's second pass in the reference."""
    bns = [m for m in net.modules() if isinstance(m, _BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(bns, saved):
            m.momentum = momentum


def no_gradient_sync(strategy: Any) -> contextlib.AbstractContextManager:
    """DDP's ``no_sync`` for the strategy's model (a no-op for single-process strategies)."""
    block = getattr(strategy, "block_backward_sync", None)
    return block() if block is not None else contextlib.nullcontext()


class ExpertTraining(L.LightningModule):
    """Train ``num_experts`` expert networks in sequence and write their trajectories to ``buffer``.

    Args:
        data_spec: the dataset's shape and preprocessing (linked from the datamodule by the CLI).
        buffer: output directory of the ExpertBuffer (``meta.json`` + ``expert_{k:04d}.safetensors``).
        num_experts: experts to train in this run.
        epochs: training epochs per expert (MTT 50, DATM 100); trajectories have ``epochs + 1`` rows.
        first_expert: index of the first expert, e.g. to add experts to an existing buffer.
        net: architecture name for :func:`ddkit.nets.build_net`.
        net_kwargs: architecture options (default ConvNet: depth 3, width 128, instance norm).
        lr: SGD learning rate (constant).
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        augment: batch augmentation: ``dsa`` (the references), ``none``, ``flip``, ``crop_flip``.
        gsam: wrap SGD in GSAM (FTD / DATM experts), two forward/backward passes per step.
        gsam_rho: GSAM perturbation radius.
        gsam_alpha: GSAM weight of the removed ascent component.
        gsam_adaptive: GSAM's adaptive (``w**2``-scaled) perturbation.
        seed: base seed of the experts' initialisations and DSA draws (expert ``k`` uses seeds derived from
            ``(seed, k)``, so it does not depend on the number of processes); None: the run's seed
            (``seed_everything``).
        overwrite: rewrite experts this run trains that ``buffer`` already holds (False: refuse them at start;
            adding new experts to a buffer, or a resumed run finishing its own, needs no option).

    Raises:
        DDKitError: a bad value (``num_experts``, ``epochs``, ``first_expert``, ``lr``, ``augment``, ``gsam_rho``),
            a missing ``buffer``, or a sharded training set under DDP.
    """

    def __init__(
        self,
        data_spec: DataSpec | dict | None = None,
        buffer: str | None = None,
        num_experts: int = 1,
        epochs: int = 50,
        first_expert: int = 0,
        net: str = "convnet",
        net_kwargs: dict[str, Any] | None = None,
        lr: float = 0.01,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        augment: str = "dsa",
        gsam: bool = False,
        gsam_rho: float = 0.01,
        gsam_alpha: float = 0.3,
        gsam_adaptive: bool = True,
        seed: int | None = None,
        overwrite: bool = False,
    ) -> None:
        super().__init__()
        if not buffer:
            raise DDKitError(f"buffer: the output directory of the expert buffer is required, got {buffer!r}")
        if num_experts < 1:
            raise DDKitError(f"num_experts: must be >= 1, got {num_experts!r}")
        if epochs < 1:
            raise DDKitError(f"epochs: must be >= 1, got {epochs!r}")
        if first_expert < 0:
            raise DDKitError(f"first_expert: must be >= 0, got {first_expert!r}")
        if not lr > 0:
            raise DDKitError(f"lr: must be > 0, got {lr!r}")
        if augment not in AUGMENTS:
            raise DDKitError(f"augment: must be one of {', '.join(AUGMENTS)}, got {augment!r}")
        if gsam_rho < 0:
            raise DDKitError(f"gsam_rho: must be >= 0, got {gsam_rho!r}")
        self.spec = data_spec = as_spec(data_spec)
        self.save_hyperparameters(ignore=["data_spec"])
        self.hparams["data_spec"] = data_spec.to_dict()  # plain types: checkpoints load with weights_only=True
        self.automatic_optimization = False
        self.net = self._fresh_net()
        self.augment = BatchAugment(augment)
        self.base_seed: int | None = seed
        self._rank, self._world = 0, 1
        self._warned_order = False

    # -- which expert ----------------------------------------------------------------------------------------

    @property
    def buffer_path(self) -> str:
        return self.hparams.buffer

    @property
    def expert_epochs(self) -> int:
        """Epochs per expert (read by RecordTrajectory)."""
        return self.hparams.epochs

    @property
    def expert_slots(self) -> int:
        """Experts per rank: ``ceil(num_experts / world_size)``."""
        return math.ceil(self.hparams.num_experts / self._world)

    @property
    def expert_index(self) -> int | None:
        """Global index of the expert this rank trains in the current epoch; None when it has none (idle)."""
        if self._trainer is None:
            return None
        k = self._rank + (self.current_epoch // self.hparams.epochs) * self._world
        return self.hparams.first_expert + k if k < self.hparams.num_experts else None

    def expert_seed(self, expert: int) -> int:
        """The seed expert ``expert`` is initialised from (its DSA generator uses a sibling seed)."""
        return self._seeds(expert)[0]

    def _seeds(self, expert: int) -> tuple[int, int]:
        init, aug = np.random.SeedSequence([int(self.base_seed or 0), int(expert)]).generate_state(2, np.uint64)
        return int(init) & (2**63 - 1), int(aug) & (2**63 - 1)

    def expert_recipe(self) -> dict[str, Any]:
        """How the experts are trained, for the buffer's ``meta.json``."""
        hp = self.hparams
        dm = self.trainer.datamodule if self._trainer is not None else None
        return {
            "module": type(self).__name__,
            "optimizer": "gsam+sgd" if hp.gsam else "sgd",
            "lr": hp.lr, "momentum": hp.momentum, "weight_decay": hp.weight_decay, "schedule": "constant",
            "gsam": {"rho": hp.gsam_rho, "alpha": hp.gsam_alpha, "adaptive": hp.gsam_adaptive} if hp.gsam else None,
            "augment": hp.augment,
            "batch_size": getattr(dm, "batch_size", None),
            "train_subset": getattr(dm, "train_subset", None),
            "seed": self.base_seed,
            "first_expert": hp.first_expert,
            "world_size": self._world,
        }

    # -- setup -----------------------------------------------------------------------------------------------

    def _fresh_net(self, seed: int | None = None) -> nn.Module:
        s = self.spec
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            return build_net(self.hparams.net, s.num_classes, s.in_chans, s.image_size, **(self.hparams.net_kwargs or {}))

    def configure_callbacks(self):
        from ddkit.callbacks.trajectories import RecordTrajectory
        from ddkit.formats.buffer import expert_file

        hp = self.hparams
        experts = range(hp.first_expert, hp.first_expert + hp.num_experts)
        return [ClaimOutput(hp.buffer, "buffer", "buffer", hp.overwrite, writes=[expert_file(k) for k in experts]),
                RecordTrajectory(hp.buffer)]

    def setup(self, stage: str) -> None:
        self._rank, self._world = self.global_rank, self.trainer.world_size
        if self.base_seed is None:
            self.base_seed = int(torch.initial_seed())
        if stage == "fit":
            self.trainer.fit_loop.max_epochs = self.expert_slots * self.hparams.epochs
            if self._world > 1:  # the logged metrics are rank 0's experts' by design (each rank has its own)
                warnings.filterwarnings("ignore", message=".*when logging on epoch level in distributed setting.*")
            if self._rank >= self.hparams.num_experts:
                rank_zero_warn(f"ExpertTraining: {self._world} processes for {self.hparams.num_experts} experts; "
                               "some processes have no expert to train")

    def configure_optimizers(self):
        hp = self.hparams

        def sgd(params):
            return build_optimizer("sgd", params, hp.lr, hp.momentum, hp.weight_decay)

        if hp.gsam:
            from ddkit.ops.gsam import GSAM

            return GSAM(self.net.parameters(), sgd, rho=hp.gsam_rho, alpha=hp.gsam_alpha, adaptive=hp.gsam_adaptive)
        return sgd(self.net.parameters())

    def _check_unsharded(self) -> None:
        loader = self.trainer.train_dataloader
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, DistributedSampler) and sampler.num_replicas > 1:
            raise DDKitError("trainer.use_distributed_sampler: must be false for the buffer stage (every expert "
                             "trains on the whole training set), got True")

    def _start_expert(self, expert: int) -> None:
        init_seed, aug_seed = self._seeds(expert)
        fresh = self._fresh_net(init_seed)
        with torch.no_grad():
            for mine, new in zip(self.net.state_dict().values(), fresh.state_dict().values()):
                mine.copy_(new)
        opt = self.optimizers().optimizer
        opt.state.clear()  # GSAM shares its state with the base SGD
        self.augment.reseed(aug_seed)

    def on_train_epoch_start(self) -> None:
        self._check_unsharded()
        expert = self.expert_index
        if expert is None:
            return
        epoch = self.current_epoch % self.hparams.epochs
        if epoch == 0:
            self._start_expert(expert)
        sampler = getattr(self.trainer.train_dataloader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            # After Lightning's set_epoch(current_epoch): the order depends on (expert, epoch), not on the rank.
            sampler.set_epoch(expert * self.hparams.epochs + epoch)
        elif not self._warned_order:
            self._warned_order = True
            rank_zero_warn("ExpertTraining: the training loader's sampler has no set_epoch (set data.shuffle_seed); "
                           "the data order comes from the global RNG, so a resumed run will not reproduce the "
                           "trajectories of an uninterrupted one")

    # -- steps -----------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx: int) -> None:
        expert = self.expert_index
        opt = self.optimizers()
        if expert is None:
            # An empty step keeps the step count equal on every rank (checkpointing compares it and then waits at
            # a barrier): no gradients, so no parameter moves.
            opt.zero_grad(set_to_none=True)
            opt.step()
            return
        x, y = batch
        x = self.augment(x)  # one DSA draw per step; GSAM's two passes see the same batch
        passes = []

        def closure() -> torch.Tensor:
            opt.zero_grad()
            with frozen_bn_stats(self.net) if passes else contextlib.nullcontext():
                logits = self.net(x)
            loss = F.cross_entropy(logits.float(), y)
            with no_gradient_sync(self.trainer.strategy):  # experts never exchange gradients
                self.manual_backward(loss)
            passes.append(logits.detach())
            return loss

        loss = opt.step(closure=closure)
        acc = (passes[0].argmax(1) == y).float().mean()
        self.log("train/loss", loss.detach(), prog_bar=True, on_step=False, on_epoch=True, rank_zero_only=True)
        self.log("train/acc", acc, on_step=False, on_epoch=True, rank_zero_only=True)
        self.log("expert", float(expert), on_step=False, on_epoch=True, rank_zero_only=True)

    def validation_step(self, batch, batch_idx: int) -> None:
        if self.expert_index is None:
            return
        x, y = batch
        logits = self.net(x)
        self.log("val/loss", F.cross_entropy(logits.float(), y), rank_zero_only=True)
        self.log("val/acc", (logits.argmax(1) == y).float().mean(), prog_bar=True, rank_zero_only=True)

    # -- checkpoint ------------------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["augment_generator"] = self.augment.generator.get_state()
        checkpoint["expert_base_seed"] = self.base_seed
        checkpoint["expert_world_size"] = self._world

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("expert_world_size")
        if self._trainer is not None and saved is not None and saved != self._world:
            raise DDKitError(f"trainer.devices: resume with the {saved} processes the checkpoint was written with "
                             f"(experts are sharded by rank), got {self._world}")
        if "augment_generator" in checkpoint:
            self.augment.generator.set_state(checkpoint["augment_generator"])
        if checkpoint.get("expert_base_seed") is not None:
            self.base_seed = int(checkpoint["expert_base_seed"])
