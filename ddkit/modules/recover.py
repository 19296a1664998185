"""SRe2L / SC-DD recovery: synthesize images whose BN statistics and class scores match a frozen teacher's.

References:
    [1] Yin, Xing, Shen, "Squeeze, Recover and Relabel: Dataset Condensation at ImageNet Scale From A New
        Perspective", NeurIPS 2023 (SRe2L), recover stage.
    [2] Zhou, Yin, Shao, Shen, "Self-supervised Dataset Distillation: A Good Compression Is All You Need", 2024
        (SC-DD): the same recovery from a self-supervised teacher with a linear probe.
    [3] Yin & Shen, "Dataset Distillation via Curriculum Data Synthesis in Large Data Era", TMLR 2024 (CDA): the
        crop-scale curriculum.

Per job (one IPC index, ``batch_size`` distinct classes, one image each; see ddkit/datamodules/recover.py) and per
step ``t = 0 .. T-1``::

    x ~ N(0, 1) in the normalized space at t = 0 (a generator seeded from (seed, ipc index, first class)), Adam fresh
    lr_t = 0.5 * (1 + cos(pi t / T)) * lr                                      (no warm-up)
    v = shift(flip(crop(x)))                                                   (ops/recover_aug.py)
    loss = CE(teacher(v), y) + r_bn * (first_bn_multiplier * r_1 + sum_l r_l)  (callbacks/bn_matching.py)
    Adam(betas 0.5, 0.9, eps 1e-8) step; clamp every channel to the valid pixel range
    the last iterate is the job's result (the reference's "best" tracking is dead code)

The images are one ``nn.Parameter`` (fp32, also under mixed precision) re-initialised at every job. DDP: every rank
optimizes its own jobs; gradients are never all-reduced (backward runs under ``DistributedDataParallel.no_sync``),
each rank writes its jobs' shards, and rank 0 assembles the DistributedSet at the end.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from ddkit.callbacks.bn_matching import BNStatisticsMatching, batchnorm_layers
from ddkit.callbacks.output import ClaimOutput
from ddkit.callbacks.resume import check_resumed_options
from ddkit.datamodules.recover import JobStep, RecoverPlan
from ddkit.datamodules.spec import DataSpec, as_spec
from ddkit.errors import DDKitError
from ddkit.formats.common import check_writable
from ddkit.modules.common import check_nonfinite_streak
from ddkit.ops.recover_aug import (
    CURRICULUM_MODES,
    clamp_to_pixel_range_,
    cosine_lr,
    crop_scale_curriculum,
    random_flip,
    random_resized_crop,
    random_shift,
)

log = logging.getLogger(__name__)

METHODS = ("sre2l", "scdd", "cda")
EXPORTS = ("png", "jpg")
CKPT_KEY = "ddkit_recover"

class Recover(L.LightningModule):
    """Recover synthetic images from a frozen BN teacher (SRe2L / SC-DD / CDA), one job at a time.

    Fed by :class:`ddkit.datamodules.recover.RecoverJobs`. Writes a DistilledSet (``images.safetensors`` in the
    normalized space, hard labels, ``meta.json`` with the config and the teacher's sha256) and the SRe2L image
    folder ``images/new{c:03d}/class{c:03d}_id{i:03d}.{png,jpg}`` to ``output``.

    Args:
        data_spec: the dataset's shape and normalization (linked from the datamodule by the CLI).
        teacher: path of a teacher checkpoint (``ddkit.formats.teacher``) with BatchNorm layers; frozen, eval mode.
        ipc: images per class.
        batch_size: classes per job (the reference's batch: ``B`` distinct classes, one image each, so BN statistics
            are matched over a class-diverse batch); capped at the number of classes.
        iterations: optimization steps per job (each job starts from fresh noise and a fresh Adam).
        lr: base learning rate of the per-step cosine schedule (no warm-up).
        betas: Adam betas (reference: 0.5, 0.9).
        eps: Adam epsilon.
        r_bn: weight of the BN statistics loss.
        first_bn_multiplier: weight of the first BN layer's term inside the BN loss (10 in every reference script).
        jitter: largest circular shift in pixels (``torch.roll``); 0 turns the shift off.
        jitter_symmetric: shifts in ``[-jitter, jitter]`` (SRe2L's Tiny-ImageNet script) instead of ``[0, jitter]``.
        crop: RandomResizedCrop to the image size each step (ImageNet / Tiny-ImageNet: on; CIFAR: off).
        crop_scale: crop area range as a fraction of the image (``(0.08, 1.0)`` as torchvision's default).
        flip: random horizontal flip each step (the reference pairs it with ``crop``).
        per_image_augmentation: one crop box and one flip decision per image instead of one for the whole batch
            (the reference applies the transform to the batch tensor, so the box and flip are shared).
        crop_curriculum: CDA's easy-to-hard crop scale: ``step``, ``linear`` or ``cosine`` move the lower scale
            bound from 1.0 to ``crop_scale[0]`` over ``curriculum_milestone * iterations`` steps; ``None`` keeps it.
        curriculum_milestone: fraction of the iterations the curriculum spans.
        seed: seed of the per-job generators (noise and augmentation); ``None`` takes the run's seed
            (``seed_everything``). Job ``(ipc index, first class)`` draws from its own generator, so a job's images do
            not depend on the number of processes.
        method: recorded in the DistilledSet: ``sre2l``, ``scdd`` or ``cda``.
        output: directory of the DistilledSet; the per-job shards live in ``.<name>.work`` beside it until the end.
        export: also write the SRe2L image folder as ``png`` (default) or ``jpg`` (the reference's lossy format);
            ``None`` writes none. Pixels are truncated to 8 bits as in the reference.
        image_storage: how ``images.safetensors`` holds the images: ``float32`` (exact), ``float16`` or ``uint8``
            pixels (rounded; a quarter of the bytes, what the image folder holds). See ddkit/formats/images.py.
        log_images_every_n_steps: log a grid of the current job's images to TensorBoard this often (0: never).
        max_nonfinite: a step whose loss is NaN or inf is skipped (images and Adam state unchanged) and counted
            (``recover/nonfinite``); after this many such steps in a row the run stops with one line, keeping the
            finished jobs in the work directory (resume with ``--ckpt_path last``). As in TrajectoryMatching.
        overwrite: replace a DistilledSet already at ``output`` (False: refuse it at start; a resumed run may
            always finish its own).

    Raises:
        DDKitError: a bad option, a teacher that does not fit ``data_spec``; at fit start, a teacher without BN.
    """

    # Options a resumed run may change: where and how it writes, not the images it computes.
    resume_may_change = ("teacher", "output", "export", "image_storage", "method", "log_images_every_n_steps",
                         "max_nonfinite")

    def __init__(
        self,
        data_spec: DataSpec | dict | None = None,
        teacher: str | None = None,
        ipc: int = 50,
        batch_size: int = 100,
        iterations: int = 1000,
        lr: float = 0.1,
        betas: tuple[float, float] = (0.5, 0.9),
        eps: float = 1e-8,
        r_bn: float = 0.05,
        first_bn_multiplier: float = 10.0,
        jitter: int = 32,
        jitter_symmetric: bool = False,
        crop: bool = True,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        flip: bool = True,
        per_image_augmentation: bool = False,
        crop_curriculum: str | None = None,
        curriculum_milestone: float = 1.0,
        seed: int | None = None,
        method: str = "sre2l",
        output: str = "outputs/recover",
        export: str | None = "png",
        image_storage: str = "float32",
        log_images_every_n_steps: int = 200,
        max_nonfinite: int = 5,
        overwrite: bool = False,
    ) -> None:
        super().__init__()
        spec = as_spec(data_spec)
        _check_options(ipc=ipc, batch_size=batch_size, iterations=iterations, lr=lr, betas=betas, eps=eps,
                       r_bn=r_bn, first_bn_multiplier=first_bn_multiplier, jitter=jitter, crop_scale=crop_scale,
                       crop_curriculum=crop_curriculum, curriculum_milestone=curriculum_milestone, method=method,
                       export=export, log_images_every_n_steps=log_images_every_n_steps, max_nonfinite=max_nonfinite)
        if spec.zca:
            raise DDKitError("data_spec.zca: recovery works in the mean/std-normalized space, got True")
        from ddkit.formats.images import check_storage

        check_storage(image_storage)
        if teacher is None:
            raise DDKitError("teacher: required (path of a teacher checkpoint with BatchNorm layers), got None")
        check_writable(output, "output")
        self.spec = spec
        self.save_hyperparameters(ignore=["data_spec"])
        self.hparams["data_spec"] = spec.to_dict()  # plain types: checkpoints load with weights_only=True
        self.hparams["betas"] = tuple(float(b) for b in betas)
        self.hparams["crop_scale"] = tuple(float(s) for s in crop_scale)

        from ddkit.formats.teacher import load_teacher

        net, meta = load_teacher(teacher)
        _check_teacher_fits(meta.data_spec, spec, teacher)
        batchnorm_layers(net)  # no BN layers: nothing to match; stop before the run writes anything
        self.teacher = net.eval().requires_grad_(False)

        self.automatic_optimization = False
        self.plan = RecoverPlan(spec.num_classes, ipc, batch_size, iterations)
        self._step_options = _StepOptions(
            lr=lr, r_bn=r_bn, crop=crop, crop_scale=self.hparams.crop_scale, flip=flip,
            shared=not per_image_augmentation, jitter=jitter, jitter_symmetric=jitter_symmetric,
            crop_curriculum=crop_curriculum, curriculum_milestone=curriculum_milestone,
            log_images_every_n_steps=log_images_every_n_steps)
        self.images = nn.Parameter(torch.zeros(self.plan.chunk, spec.in_chans, spec.image_size, spec.image_size))

        # Run state (checkpointed per rank; see on_save_checkpoint).
        self._seed: int | None = None
        self._steps_done = 0
        self._job = -1
        self._generator: torch.Generator | None = None
        self._targets: torch.Tensor | None = None
        self._written: list[int] = []
        self._resume: dict[str, Any] | None = None
        self.nonfinite_steps = 0  # steps skipped for a non-finite loss (this rank)
        self.nonfinite_streak = 0  # of them, the current run in a row

    # -- the plan, as the datamodule sees it -------------------------------------------------------------------

    @property
    def recover_plan(self) -> RecoverPlan:
        return self.plan

    @property
    def recover_steps_done(self) -> int:
        """Steps this rank has done (restored on resume), where its job stream continues."""
        return self._steps_done

    @property
    def work_dir(self) -> Path:
        """``.<name>.work`` beside ``output``: outside the set's directory, which is replaced as a whole."""
        output = Path(self.hparams.output).absolute()
        return output.with_name(f".{output.name}.work")

    # -- Lightning hooks ---------------------------------------------------------------------------------------

    def configure_callbacks(self) -> list[L.Callback]:
        hp = self.hparams
        return [ClaimOutput(hp.output, "output", "distilled", hp.overwrite),
                BNStatisticsMatching(first_bn_multiplier=hp.first_bn_multiplier)]

    def transfer_batch_to_device(self, batch: JobStep, device: torch.device, dataloader_idx: int) -> JobStep:
        """A step's batch is a few Python ints: nothing to move (skips Lightning's per-step collection walk)."""
        return batch

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        return torch.optim.Adam([self.images], lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps)

    def train(self, mode: bool = True) -> Recover:
        """Trainer.fit calls ``train()``; the teacher stays in eval mode (running BN statistics, no updates)."""
        super().train(mode)
        self.teacher.eval()
        return self

    def setup(self, stage: str) -> None:
        # The teacher is in eval mode on purpose, and a checkpoint after the optimizer step is exactly what resuming
        # needs; Lightning would warn about both at every fit.
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
        warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
        hp = self.hparams
        seed = hp.seed if hp.seed is not None else torch.initial_seed()
        self._seed = int(self.trainer.strategy.broadcast(int(seed), src=0))  # one seed for every rank

    def on_train_start(self) -> None:
        if self._resume is not None:
            self._restore_rank_state(self._resume)
            self._resume = None
        else:
            # A fresh run: shards of an earlier, unrelated run must not leak into this one.
            if self.trainer.is_global_zero and self.work_dir.exists():
                shutil.rmtree(self.work_dir)
            self.trainer.strategy.barrier("recover.clean_work_dir")
        self.teacher.eval()
        self._maybe_stop()

    def on_train_epoch_start(self) -> None:
        self._maybe_stop()  # e.g. resumed from a checkpoint written after the last step: nothing left to do

    def training_step(self, batch: JobStep, batch_idx: int) -> None:
        opt = self.optimizers()
        if batch.job < 0:
            self._idle_step(opt)
            return
        if batch.t == 0:
            self._start_job(batch, opt.optimizer)
        elif batch.job != self._job:
            raise RuntimeError(f"recover: the step stream is at job {batch.job} step {batch.t}, "
                               f"but the restored state is at job {self._job}")
        n = batch.class_count
        x = self.images if n == self.images.shape[0] else self.images[:n]
        o = self._step_options
        lr = cosine_lr(o.lr, batch.t, self.plan.iterations)
        for group in opt.param_groups:
            group["lr"] = lr
        logits = self.teacher(self._augment(x, batch.t))
        ce = F.cross_entropy(logits.float(), self._targets)
        bn = self.bn_matching.loss()
        loss = ce + o.r_bn * bn
        if bool(torch.isfinite(loss)):
            self.nonfinite_streak = 0
            opt.zero_grad()
            with self._no_grad_sync():
                self.manual_backward(loss)
            opt.step()
            clamp_to_pixel_range_(self.images, self.spec.mean, self.spec.std)
        else:
            self._skip_step(opt, batch, float(loss))
        self._after_step(batch, {"ce": ce.detach(), "bn": bn.detach(), "loss": loss.detach(), "lr": lr,
                                 "nonfinite": self.nonfinite_steps})
        return

    def _skip_step(self, opt, batch: JobStep, loss: float) -> None:
        """A non-finite loss: count it, stop after ``max_nonfinite`` in a row, else leave images and Adam as they
        were. The optimizer still steps (on a zero gradient, then both are put back) so that Lightning's step count,
        and with it checkpointing, goes on as for any other step."""
        self.nonfinite_steps += 1
        self.nonfinite_streak += 1
        check_nonfinite_streak(self.nonfinite_streak, self.hparams.max_nonfinite, "recover loss",
                               f"steps in a row (up to job {batch.job} step {batch.t})", "lower lr or r_bn",
                               lambda: f"finished jobs kept in {self.work_dir}", loss)
        images = self.images.detach().clone()
        state = copy.deepcopy(opt.optimizer.state_dict())
        self.images.grad = torch.zeros_like(self.images)
        opt.step()
        with torch.no_grad():
            self.images.copy_(images)
        opt.optimizer.load_state_dict(state)
        self.images.grad = None

    def on_fit_end(self) -> None:
        # Not on_train_end: a run resumed from its final checkpoint (killed before this) skips the training loop and
        # its train-end hooks, and must still write its artifact.
        strategy = self.trainer.strategy
        written = self._gather(list(self._written))
        strategy.barrier("recover.assemble")
        if self.trainer.is_global_zero:
            self._assemble(written)
        strategy.barrier("recover.assembled")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Every rank reaches this hook together (Trainer.save_checkpoint runs on all ranks; only rank 0 writes),
        # so each rank's own images, Adam state and generator are gathered into the one checkpoint file.
        local = {
            "job": self._job,
            "images": self.images.detach().cpu().clone(),
            "optimizer": self.optimizers().optimizer.state_dict() if self._trainer is not None else None,
            "generator": self._generator.get_state() if self._generator is not None else None,
            "written": list(self._written),
            "nonfinite_steps": self.nonfinite_steps,
            "nonfinite_streak": self.nonfinite_streak,
        }
        checkpoint[CKPT_KEY] = {
            "version": 1,
            "world_size": self.trainer.world_size,
            "seed": self._seed,
            "steps_done": self._steps_done,
            "ranks": self._gather(local),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(CKPT_KEY)
        if state is None:
            raise DDKitError("ckpt_path: not a Recover checkpoint (no recovery state in it), got a checkpoint "
                             f"with keys {sorted(checkpoint)}")
        check_resumed_options(checkpoint.get("hyper_parameters", {}), dict(self.hparams), self.resume_may_change)
        if self.hparams.seed is None and state["seed"] is None:
            raise DDKitError("seed: the checkpoint has no seed, got None")
        self._seed = int(state["seed"])
        self._steps_done = int(state["steps_done"])
        self._resume = state

    # -- one step ----------------------------------------------------------------------------------------------

    def _start_job(self, batch: JobStep, optimizer: torch.optim.Optimizer) -> None:
        """Fresh N(0, 1) noise from the job's own generator, fresh Adam state."""
        n = batch.class_count
        generator = torch.Generator().manual_seed(job_seed(self._seed, batch.ipc_index, batch.class_start))
        noise = torch.randn((n, *self.images.shape[1:]), generator=generator)
        with torch.no_grad():
            self.images.zero_()
            self.images[:n].copy_(noise)
        optimizer.state.clear()
        self._generator = generator
        self._job = batch.job
        self._targets = torch.arange(batch.class_start, batch.class_start + n, device=self.device)

    def _augment(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """The step's view: crop (shared box, or per image) -> flip -> circular shift, all from the job's generator."""
        o = self._step_options
        g = self._generator
        if o.crop:
            low, high = o.crop_scale
            if o.crop_curriculum is not None:
                low = crop_scale_curriculum(t, self.plan.iterations, o.curriculum_milestone, o.crop_curriculum,
                                            start=1.0, end=low)
            x = random_resized_crop(x, g, self.spec.image_size, scale=(low, high), shared=o.shared)
        if o.flip:
            x = random_flip(x, g, shared=o.shared)
        if o.jitter > 0:
            x = random_shift(x, g, o.jitter, o.jitter_symmetric)
        return x

    def _idle_step(self, opt) -> None:
        """A padding step of a rank with fewer jobs: the optimizer steps on zero gradients (the images do not change),
        so that every rank's step count, and with it checkpointing, stays in step."""
        opt.optimizer.state.clear()  # no moments left from the last job: a zero gradient gives a zero update
        self.images.grad = torch.zeros_like(self.images)
        opt.step()
        self.images.grad = None
        self._steps_done += 1
        self._maybe_stop()

    def _after_step(self, batch: JobStep, terms: dict[str, Any]) -> None:
        self._steps_done += 1
        every = self.trainer.log_every_n_steps
        if every > 0 and self._steps_done % every == 0:
            self._log_terms(terms, batch)
        every = self._step_options.log_images_every_n_steps
        if every > 0 and (self._steps_done % every == 0) and self.trainer.is_global_zero:
            self._log_images(batch)
        if batch.t == self.plan.iterations - 1:
            self._finish_job(batch)
        self._maybe_stop()

    def _maybe_stop(self) -> None:
        if self._steps_done >= self.plan.steps_per_rank(self.trainer.world_size):
            self.trainer.should_stop = True

    def _no_grad_sync(self) -> contextlib.AbstractContextManager:
        """Each rank's images are its own: no gradient all-reduce under DDP.

        The DDP wrapper is looked up, not stored: as an attribute it would become a submodule of the module it wraps.
        """
        model = self.trainer.strategy.model
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            return model.no_sync()
        return contextlib.nullcontext()

    # -- jobs, shards, result ----------------------------------------------------------------------------------

    def _finish_job(self, batch: JobStep) -> None:
        n = batch.class_count
        images = self.images[:n].detach().float().cpu().clone()
        labels = torch.arange(batch.class_start, batch.class_start + n, dtype=torch.int64)
        write_shard(self.work_dir, batch.job, batch.ipc_index, images, labels, self.global_rank)
        self._written.append(batch.job)
        self._job = -1
        self._generator = None

    def _assemble(self, written: list[list[int]]) -> None:
        """Rank 0, after every rank has finished: shards -> DistilledSet + image folder; shards removed."""
        plan = self.plan
        done = sorted(j for j in range(plan.num_jobs) if shard_path(self.work_dir, j).is_file())
        finished = self._steps_done >= plan.steps_per_rank(self.trainer.world_size)
        if not done and finished and (Path(self.hparams.output) / "meta.json").is_file():
            log.info("recover: every job was already done and assembled in %s", self.hparams.output)
            return
        if len(done) < plan.num_jobs:
            log.warning("recover: %d of %d jobs finished; resume with --ckpt_path last to finish the others",
                        len(done), plan.num_jobs)
            return
        from ddkit.formats.distilled import DistilledSet, save_distilled
        from ddkit.formats.teacher import teacher_reference

        images, labels, ipc_ids = [], [], []
        for j in done:
            x, y, ipc_index = read_shard(self.work_dir, j)
            images.append(x)
            labels.append(y)
            ipc_ids.append(torch.full_like(y, ipc_index))
        x, y, ipc_id = torch.cat(images), torch.cat(labels), torch.cat(ipc_ids)
        order = torch.argsort(y * plan.ipc + ipc_id)  # class-major, IPC index within a class (= file id)
        writes = [j for per_rank in written for j in per_rank]
        ds = DistilledSet(
            images=x[order].contiguous(),
            labels=y[order].contiguous(),
            spec=self.spec,
            ipc=plan.ipc,
            method=self.hparams.method,
            config=_plain(dict(self.hparams)),
            teacher=teacher_reference(self.hparams.teacher),
            extra={
                "seed": self._seed,
                "jobs": plan.num_jobs,
                "world_size": self.trainer.world_size,
                "written_by_rank": written,
                "writes": len(writes),
                "unique_writes": len(set(writes)),
                "pixel_rounding": "truncate",
            },
        )
        save_distilled(ds, self.hparams.output, export=self.hparams.export, image_storage=self.hparams.image_storage)
        if self._step_options.log_images_every_n_steps > 0:
            from ddkit.callbacks.synthetic import log_image_grid

            log_image_grid(self.trainer, ds, self._steps_done, "recover/set")
        shutil.rmtree(self.work_dir, ignore_errors=True)

    def _restore_rank_state(self, state: dict[str, Any]) -> None:
        """Put back this rank's images, Adam state and generator (after DDP has wrapped the model)."""
        world = self.trainer.world_size
        if state["world_size"] != world:
            raise DDKitError(f"trainer.devices: the checkpoint was written by {state['world_size']} processes; resume "
                             f"with as many, got {world}")
        mine = state["ranks"][self.global_rank]
        with torch.no_grad():
            self.images.copy_(mine["images"].to(self.images))
        if mine["optimizer"] is not None:
            self.optimizers().optimizer.load_state_dict(mine["optimizer"])
        self._job = int(mine["job"])
        self._generator = None
        if mine["generator"] is not None:
            self._generator = torch.Generator()
            self._generator.set_state(mine["generator"])
        self._written = [int(j) for j in mine["written"]]
        self.nonfinite_steps = int(mine.get("nonfinite_steps", 0))
        self.nonfinite_streak = int(mine.get("nonfinite_streak", 0))
        if self._job >= 0:
            job = self.plan.job(self._job)
            self._targets = torch.arange(job.class_start, job.class_start + job.class_count, device=self.device)

    def _gather(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order (``[obj]`` without a process group)."""
        if self.trainer.world_size == 1 or not torch.distributed.is_initialized():
            return [obj]
        out: list[Any] = [None] * self.trainer.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    # -- logging -----------------------------------------------------------------------------------------------

    def _log_terms(self, terms: dict[str, Any], batch: JobStep) -> None:
        metrics = {f"recover/{k}": float(v) for k, v in terms.items()}
        metrics["recover/job"] = float(batch.job)
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self._steps_done)
        self.log_dict({"ce": metrics["recover/ce"], "bn": metrics["recover/bn"]}, prog_bar=True, logger=False,
                      on_step=True, on_epoch=False, batch_size=1)

    def _log_images(self, batch: JobStep) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger
        from torchvision.utils import make_grid

        from ddkit.formats.distilled import to_pixels

        loggers = [lg for lg in self.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers:
            return
        pixels = to_pixels(self.images[: batch.class_count], self.spec)
        grid = make_grid(pixels, nrow=max(1, math.ceil(math.sqrt(batch.class_count))), padding=1)
        for logger in loggers:
            logger.experiment.add_image("recover/job", grid, global_step=self._steps_done)


# ---------------------------------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class _StepOptions:
    """The options the per-step code reads (plain attributes: no hparams lookups on the hot path)."""

    lr: float
    r_bn: float
    crop: bool
    crop_scale: tuple[float, float]
    flip: bool
    shared: bool
    jitter: int
    jitter_symmetric: bool
    crop_curriculum: str | None
    curriculum_milestone: float
    log_images_every_n_steps: int


def job_seed(seed: int, ipc_index: int, class_start: int) -> int:
    """The seed of job (ipc index, first class) under run seed ``seed``: 63 bits of a SHA-256."""
    digest = hashlib.sha256(f"ddkit.recover:{seed}:{ipc_index}:{class_start}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def shard_path(work_dir: Path, job: int) -> Path:
    return Path(work_dir) / f"job_{job:06d}.safetensors"


def write_shard(work_dir: Path, job: int, ipc_index: int, images: torch.Tensor, labels: torch.Tensor,
                rank: int) -> Path:
    """Write one finished job's images (float32, normalized space) and labels, atomically."""
    from ddkit.formats.common import atomic_file, save_tensors

    path = shard_path(work_dir, job)
    with atomic_file(path, field="output") as tmp:
        save_tensors(tmp, {"images": images.float(), "labels": labels.long()},
                     metadata={"job": str(job), "ipc_index": str(ipc_index), "rank": str(rank)})
    return path


def read_shard(work_dir: Path, job: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(images, labels, ipc_index)`` of a finished job."""
    from safetensors import safe_open

    from ddkit.formats.common import load_tensors

    path = shard_path(work_dir, job)
    tensors = load_tensors(path, f"output.shard[{job}]")
    with safe_open(str(path), framework="pt") as f:
        ipc_index = int((f.metadata() or {})["ipc_index"])
    return tensors["images"], tensors["labels"], ipc_index


def _plain(value: Any) -> Any:
    """JSON-plain form (tuples -> lists) for comparing and recording hyperparameters."""
    return json.loads(json.dumps(value, default=str))


def _check_teacher_fits(teacher_spec: DataSpec, spec: DataSpec, path: str) -> None:
    for name in ("num_classes", "in_chans", "image_size"):
        a, b = getattr(teacher_spec, name), getattr(spec, name)
        if a != b:
            raise DDKitError(f"teacher: made for {name}={a!r} but the data has {name}={b!r}, got {path!r}")
    if tuple(teacher_spec.mean) != tuple(spec.mean) or tuple(teacher_spec.std) != tuple(spec.std):
        warnings.warn(f"teacher: trained with mean/std {teacher_spec.mean}/{teacher_spec.std} but the data uses "
                      f"{spec.mean}/{spec.std}; the images are clamped to the data's pixel range", stacklevel=3)


def _check_options(**o: Any) -> None:
    for name in ("ipc", "batch_size", "iterations", "max_nonfinite"):
        if not (isinstance(o[name], int) and o[name] > 0):
            raise DDKitError(f"{name}: must be an integer > 0, got {o[name]!r}")
    for name in ("lr", "eps"):
        if not o[name] > 0:
            raise DDKitError(f"{name}: must be > 0, got {o[name]!r}")
    if len(o["betas"]) != 2 or not all(0 <= b < 1 for b in o["betas"]):
        raise DDKitError(f"betas: must be two numbers in [0, 1), got {o['betas']!r}")
    for name in ("r_bn", "first_bn_multiplier"):
        if not o[name] >= 0:
            raise DDKitError(f"{name}: must be >= 0, got {o[name]!r}")
    if not (isinstance(o["jitter"], int) and o["jitter"] >= 0):
        raise DDKitError(f"jitter: must be an integer >= 0, got {o['jitter']!r}")
    scale = o["crop_scale"]
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise DDKitError(f"crop_scale: must be (low, high) with 0 < low <= high <= 1, got {scale!r}")
    if o["crop_curriculum"] is not None and o["crop_curriculum"] not in CURRICULUM_MODES:
        raise DDKitError(f"crop_curriculum: must be one of {', '.join(CURRICULUM_MODES)} or null, "
                         f"got {o['crop_curriculum']!r}")
    if not 0 <= o["curriculum_milestone"] <= 1:
        raise DDKitError(f"curriculum_milestone: must be in [0, 1], got {o['curriculum_milestone']!r}")
    if o["method"] not in METHODS:
        raise DDKitError(f"method: must be one of {', '.join(METHODS)}, got {o['method']!r}")
    if o["export"] is not None and o["export"] not in EXPORTS:
        raise DDKitError(f"export: must be png, jpg or null, got {o['export']!r}")
    if not (isinstance(o["log_images_every_n_steps"], int) and o["log_images_every_n_steps"] >= 0):
        raise DDKitError(f"log_images_every_n_steps: must be an integer >= 0, got {o['log_images_every_n_steps']!r}")
