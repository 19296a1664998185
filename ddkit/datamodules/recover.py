"""Recovery jobs as a datamodule: the real dataset's spec, and one job descriptor per training step.

SRe2L / SC-DD recovery (Yin, Xing, Shen, NeurIPS 2023; Zhou et al. 2024) loops ``for ipc_index in range(ipc):
for kk in range(0, C, B)``: each *job* optimizes ``B`` images of the distinct classes ``kk .. kk+B-1`` (one each)
from scratch for ``iterations`` steps. Here the jobs are numbered in that order (ipc-major) and sharded over the
DDP ranks (rank ``r`` takes jobs ``r, r+W, ...``); every rank runs the same number of steps, ``ceil(J / W) *
iterations``, so that ranks stay in step for checkpoints (a rank without a job for a slot gets *idle* steps).

No real image is loaded: the datamodule only exposes :attr:`RecoverJobs.spec` (linked to the module's
``data_spec``) and the step stream. The plan itself (ipc, classes per job, iterations) belongs to the module
(:class:`ddkit.modules.recover.Recover` exposes it as ``recover_plan``), so a config states it once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import lightning as L

from ddkit.datamodules.real import RealDataModule
from ddkit.datamodules.spec import DataSpec
from ddkit.errors import DDKitError


class RecoverJob(NamedTuple):
    """One recovery job: ``class_count`` images, of classes ``class_start .. class_start+class_count-1``."""

    index: int
    ipc_index: int
    class_start: int
    class_count: int


class JobStep(NamedTuple):
    """What one training step works on. ``job == -1`` marks an idle step (padding of a rank with fewer jobs).

    Attributes:
        step: this rank's step index, ``0 .. steps_per_rank - 1``.
        job: global job index, or -1.
        ipc_index: the job's IPC index (image ``id`` within each class).
        class_start: first class id of the job.
        class_count: number of classes (= images) of the job.
        t: iteration within the job, ``0 .. iterations - 1``.
    """

    step: int
    job: int
    ipc_index: int
    class_start: int
    class_count: int
    t: int


@dataclass(frozen=True)
class RecoverPlan:
    """The job list of a recovery run.

    Args:
        num_classes: classes of the dataset.
        ipc: images per class.
        batch_size: classes per job (the reference's ``B``); a job holds ``min(batch_size, num_classes)`` classes,
            the last chunk of an IPC index may hold fewer.
        iterations: optimization steps per job.
    """

    num_classes: int
    ipc: int
    batch_size: int
    iterations: int

    def __post_init__(self) -> None:
        for name in ("num_classes", "ipc", "batch_size", "iterations"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value > 0):
                raise DDKitError(f"{name}: must be an integer > 0, got {value!r}")

    @property
    def chunk(self) -> int:
        """Images per job (the last chunk of each IPC index may be smaller)."""
        return min(self.batch_size, self.num_classes)

    @property
    def chunks_per_ipc(self) -> int:
        return math.ceil(self.num_classes / self.chunk)

    @property
    def num_jobs(self) -> int:
        return self.ipc * self.chunks_per_ipc

    def job(self, index: int) -> RecoverJob:
        """Job ``index`` (ipc-major: ``index = ipc_index * chunks_per_ipc + chunk_index``)."""
        if not 0 <= index < self.num_jobs:
            raise IndexError(f"job index {index} outside [0, {self.num_jobs})")
        ipc_index, chunk_index = divmod(index, self.chunks_per_ipc)
        start = chunk_index * self.chunk
        return RecoverJob(index, ipc_index, start, min(self.chunk, self.num_classes - start))

    def jobs_of_rank(self, rank: int, world_size: int) -> list[int]:
        """The jobs rank ``rank`` of ``world_size`` owns: ``rank, rank + W, ...``."""
        return list(range(rank, self.num_jobs, world_size))

    def slots(self, world_size: int) -> int:
        """Job slots per rank (every rank runs this many, idle where it has no job)."""
        return math.ceil(self.num_jobs / world_size)

    def steps_per_rank(self, world_size: int) -> int:
        return self.slots(world_size) * self.iterations

    def step(self, step: int, rank: int, world_size: int) -> JobStep:
        """The descriptor of rank ``rank``'s step ``step``."""
        slot, t = divmod(step, self.iterations)
        index = rank + world_size * slot
        if index >= self.num_jobs:
            return JobStep(step, -1, -1, 0, 0, t)
        job = self.job(index)
        return JobStep(step, index, job.ipc_index, job.class_start, job.class_count, t)


class JobSteps:
    """The training "dataloader" of a recovery run: one :class:`JobStep` per step of this rank.

    Its length is the whole plan (``steps_per_rank``); iteration starts at ``start()`` (the number of steps the
    module has already done, restored from a checkpoint), so a resumed run continues where it stopped, mid-job
    included. It is a plain iterable (not a ``DataLoader``): Lightning does not shard it, the plan does.
    """

    def __init__(self, plan: RecoverPlan, rank: int, world_size: int, start: Callable[[], int] | int = 0) -> None:
        self.plan = plan
        self.rank = rank
        self.world_size = world_size
        self._start = start
        self._next = 0

    def __len__(self) -> int:
        return self.plan.steps_per_rank(self.world_size)

    def __iter__(self) -> Iterator[JobStep]:
        self._next = self._start() if callable(self._start) else self._start
        while self._next < len(self):
            step = self._next
            self._next += 1
            yield self.plan.step(step, self.rank, self.world_size)

    # Lightning's resumable-loader interface. The position that counts is the module's (restored with its
    # checkpointed state and read by ``__iter__``); this one is recorded for inspection only.
    def state_dict(self) -> dict[str, int]:
        return {"next_step": self._next}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._next = int(state.get("next_step", 0))


class RecoverJobs(L.LightningDataModule):
    """The job stream of a recovery run and the real dataset's :class:`DataSpec` (no image is loaded).

    The module it feeds must expose ``recover_plan`` (a :class:`RecoverPlan`) and ``recover_steps_done``
    (steps already done on this rank), as :class:`ddkit.modules.recover.Recover` does.

    Args:
        dataset: the real dataset whose classes, image shape and normalization the synthetic images take
            (``digits``, ``fashion_mnist``, ``mnist``, ``cifar10``, ``cifar100``, ``tiny_imagenet``, ``imagenet``).
        image_size: image height = width (default: the dataset's own).

    Raises:
        DDKitError: unknown dataset or a non-positive image size.
    """

    def __init__(self, dataset: str = "digits", image_size: int | None = None) -> None:
        super().__init__()
        # RealDataModule only describes the dataset here; its files are never opened.
        self._real = RealDataModule(dataset=dataset, image_size=image_size)
        self.dataset = dataset

    @property
    def spec(self) -> DataSpec:
        return self._real.spec

    def train_dataloader(self) -> JobSteps:
        module: Any = self.trainer.lightning_module if self.trainer is not None else None
        plan = getattr(module, "recover_plan", None)
        if not isinstance(plan, RecoverPlan):
            raise DDKitError(f"model: RecoverJobs feeds a module with a recover_plan (e.g. Recover), "
                             f"got {type(module).__name__}")
        return JobSteps(plan, self.trainer.global_rank, self.trainer.world_size,
                        start=lambda: int(module.recover_steps_done))
