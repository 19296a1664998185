"""Trajectory matching (MTT [1], DATM [2]): the synthetic images, the inner step size and (DATM) the label logits
are ``nn.Parameter``s updated so that a student trained on them for ``syn_steps`` SGD steps lands where an expert
landed after ``expert_epochs`` epochs on the real data.

One training step (one matching iteration, datm-mtt reference sections 2.2-2.6 and 7.2):

1. Draw an expert and a start epoch ``s`` from the module's generator (rank-dependent under DDP): MTT uniform in
   ``[0, max_start_epoch)``; DATM uniform in ``[min_start_epoch, UB(it))`` with the growing upper bound of
   :func:`ddkit.ops.matching_grad.start_epoch_upper_bound`.
2. ``theta_0 = params(expert, s)``, ``theta* = params(expert, s + expert_epochs)`` from the ExpertBuffer.
3. ``syn_steps`` inner SGD steps on minibatches of ``batch_syn`` drawn without replacement (``randperm`` chunks, the
   last chunk popped first), DSA with one seed per step, through the chosen gradient engine (``unroll`` | ``tesla``
   | ``adjoint``) of :func:`ddkit.ops.matching_grad.matching_gradients`.
4. ``L = ||theta_N - theta*||^2 / ||theta_0 - theta*||^2``; under DDP the gradients of the ranks' accepted segments
   are averaged (W ranks = W trajectories per update).
5. DATM skips the update when ``L > threshold``; otherwise SGD on the images (momentum 0.5), the step size
   (momentum 0.5) and the label logits (momentum 0.9).

References:
    [1] Cazenavette et al., "Dataset Distillation by Matching Training Trajectories", CVPR 2022.
    [2] Guo et al., "Towards Lossless Dataset Distillation via Difficulty-Aligned Trajectory Matching", ICLR 2024.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ddkit.callbacks.output import ClaimOutput
from ddkit.datamodules.spec import DataSpec, as_spec
from ddkit.errors import DDKitError
from ddkit.formats.common import check_writable
from ddkit.formats.distilled import DistilledSet, save_distilled
from ddkit.modules.common import check_nonfinite_streak
from ddkit.ops.dsa import dsa, seeded_generator
from ddkit.ops.matching_grad import (
    ENGINES,
    InnerLoop,
    MatchingResult,
    functional_forward,
    matching_gradients,
    start_epoch_upper_bound,
)

MODES = ("datm", "mtt")
PIX_INITS = ("samples_predicted_correctly", "real", "noise")
ON_BAD_STEP_SIZE = ("stop", "skip")
PRECISIONS = ("32-true", "32", "64-true", "64", "bf16-mixed")

Logits = Callable[[int, Tensor], Tensor]
"""``logits(expert, x) -> [N, K]``: an expert's prediction (at its last epoch) on a batch of real images."""


def segment_generator(seed: int, rank: int) -> torch.Generator:
    """The CPU generator rank ``rank`` draws its segments (expert, start epoch, minibatches, DSA seeds) from."""
    return seeded_generator(seed + 1_000_003 * (rank + 1))


# ------------------------------------------------------------------------------------------------ initialisation


def select_correct_samples(
    labels: Tensor,
    num_classes: int,
    ipc: int,
    logits: Logits,
    num_experts: int,
    images: Tensor,
    generator: torch.Generator,
    batch_size: int = 256,
) -> tuple[Tensor, Tensor]:
    """DATM's ``samples_predicted_correctly`` selection (reference section 2.6).

    For each class ``c``: the real images of class ``c`` in a random order (``generator``), scanned in batches of
    ``batch_size`` with expert 0; an image is kept when the expert's argmax is ``c``, until ``ipc`` are kept. When the
    class runs out, the scan restarts with the next expert and adds the images that expert classifies correctly
    (images already kept stay kept), as DATM's ``distill/DATM.py`` does.

    Args:
        labels: ``[N]`` class of every real image.
        num_classes: ``K``.
        ipc: images to keep per class.
        logits: ``logits(expert, x)`` of an expert (at its last epoch) on a batch ``x``.
        num_experts: experts that may be tried, in order 0, 1, ...
        images: ``[N, C, H, W]`` real images (indexed by the returned indices).
        generator: CPU generator of the per-class scan order.
        batch_size: scan batch size.

    Returns:
        ``indices`` ``[K * ipc]`` into ``images`` (class-major: class 0 first) and ``selector`` ``[K * ipc]``, the
        expert that accepted each image.

    Raises:
        DDKitError: if a class has fewer than ``ipc`` images that some expert classifies correctly.
    """
    chosen, selectors = [], []
    for c in range(num_classes):
        members = torch.nonzero(labels == c).flatten()
        order = members[torch.randperm(len(members), generator=generator)]
        kept: list[int] = []
        by: list[int] = []
        seen: set[int] = set()
        for expert in range(num_experts):
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                pred = logits(expert, images[idx]).argmax(dim=1).cpu()
                for i in idx[pred == c].tolist():
                    if i not in seen and len(kept) < ipc:
                        seen.add(i)
                        kept.append(i)
                        by.append(expert)
                if len(kept) == ipc:
                    break
            if len(kept) == ipc:
                break
        if len(kept) < ipc:
            raise DDKitError(f"ipc: class {c} has only {len(kept)} real images that the {num_experts} experts "
                             f"classify correctly, got {ipc!r}")
        chosen.append(torch.tensor(kept, dtype=torch.long))
        selectors.append(torch.tensor(by, dtype=torch.long))
    return torch.cat(chosen), torch.cat(selectors)


def mean_correct_logits(expert_logits: Iterable[Tensor], labels: Tensor) -> tuple[Tensor, Tensor]:
    """DATM's initial label logits: per image, the mean logits of the experts that classify it correctly.

    ``Y0[j] = sum_e 1[argmax Z_e[j] = c_j] Z_e[j] / sum_e 1[argmax Z_e[j] = c_j]`` (raw logits, no softmax;
    reference section 2.6). Accumulated expert by expert, so the ``[E, N, K]`` stack is never held.

    Args:
        expert_logits: one ``[N, K]`` tensor per expert.
        labels: ``[N]`` classes ``c_j``.

    Returns:
        ``Y0`` ``[N, K]`` (0 where no expert is correct) and ``count`` ``[N]``, the number of correct experts.
    """
    total: Tensor | None = None
    count = torch.zeros(labels.shape[0], dtype=torch.long)
    for z in expert_logits:
        z = z.detach().float().cpu()
        correct = z.argmax(dim=1) == labels
        contribution = z * correct[:, None]
        total = contribution if total is None else total + contribution
        count += correct.long()
    if total is None:
        raise DDKitError("label_experts: at least one expert is needed for the label logits, got 0")
    return total / count.clamp_min(1)[:, None].float(), count


def smoothed_one_hot_logits(labels: Tensor, num_classes: int, on: float = 0.9) -> Tensor:
    """Logits whose softmax puts ``on`` on the class and spreads the rest evenly (noise init in DATM mode)."""
    off = (1.0 - on) / max(1, num_classes - 1)
    probs = torch.full((labels.shape[0], num_classes), off)
    probs[torch.arange(labels.shape[0]), labels] = on
    return probs.log()


# ------------------------------------------------------------------------------------------------ one segment


@dataclass
class Segment:
    """What one rank matches in one iteration.

    Args:
        expert: index into the buffer.
        start_epoch: ``s``; the target is epoch ``s + expert_epochs``.
        upper_bound: the start-epoch window's (exclusive) upper bound at this iteration.
        loop: per-step minibatch indices and DSA seeds.
    """

    expert: int
    start_epoch: int
    upper_bound: int
    loop: InnerLoop


def _randint(low: int, high: int, generator: torch.Generator) -> int:
    return int(torch.randint(low, high, (1,), generator=generator))


def _dsa_augment(x: Tensor, seed: int) -> Tensor:
    return dsa(x, seeded_generator(seed))


class TrajectoryMatching(L.LightningModule):
    """Distil a dataset by matching expert training trajectories (MTT / DATM).

    Needs :class:`ddkit.datamodules.experts.ExpertSegments` as the datamodule (it owns the ExpertBuffer, the real
    training images for initialisation and the validation split) and ``trainer.max_steps`` = the number of matching
    iterations. ``trainer.global_step`` counts iterations, skipped ones included.

    Args:
        data_spec: the dataset's shape and preprocessing (linked from the datamodule by the CLI).
        mode: ``datm`` (learned label logits initialised from the experts, soft cross-entropy, loss threshold,
            growing start-epoch window) or ``mtt`` (hard labels, cross-entropy, no threshold, start epoch uniform in
            ``[0, max_start_epoch)``).
        ipc: synthetic images per class.
        syn_steps: inner SGD steps ``N`` per iteration.
        expert_epochs: ``M``: the target is the expert ``M`` epochs after the start epoch.
        max_start_epoch: ``T+``: start epochs lie below it.
        min_start_epoch: ``T-`` (DATM): start epochs lie at or above it.
        current_max_start_epoch: ``T`` (DATM): the initial upper bound of the start-epoch window.
        expansion_end_epoch: (DATM) iterations over which the upper bound grows linearly from ``T`` to ``T+``.
        sequential_generation: (DATM) grow the window; when false the upper bound is ``T+`` from the start.
        batch_syn: synthetic minibatch per inner step; ``None``: the whole set (``ipc * num_classes``).
        lr_img: learning rate of the images (SGD).
        lr_lr: learning rate of the step size (SGD).
        lr_y: learning rate of the label logits (SGD, DATM).
        lr_teacher: initial step size ``alpha`` (the experts' learning rate).
        momentum_img: SGD momentum of the images.
        momentum_lr: SGD momentum of the step size.
        momentum_y: SGD momentum of the label logits.
        threshold: (DATM) skip the update when the matching loss exceeds it; ``None``: never skip.
        engine: gradient engine: ``adjoint`` (exact, memory independent of ``syn_steps``), ``unroll`` (exact, the
            references' full unroll) or ``tesla`` (approximate, constant memory).
        graph_window: (``adjoint``) the last ``graph_window`` inner steps keep their graphs, as ``unroll`` does, and
            only the steps before them are recomputed: memory of that many steps' activations (not ``syn_steps``),
            time close to ``unroll``'s (benchmarks/results/matching_memory.md). 0: every step is recomputed, the
            least memory.
        compile_trajectory: (``adjoint``, ``tesla``) ``torch.compile`` the graph-free first pass, the adjoint's only
            cost beyond ``unroll``'s: about 20% less time for that pass, after about 20 s of compilation per process
            (needs a C++ compiler on CPU, Triton on GPU).
        pix_init: ``samples_predicted_correctly`` (real images the last-epoch experts classify correctly; DATM's
            default), ``real`` (random real images) or ``noise`` (standard Gaussian in the input space).
        label_experts: (DATM) experts whose correct predictions are averaged into the initial label logits;
            ``None``: all of them.
        dsa: DSA on every inner step (the references always use it).
        on_bad_step_size: when an update leaves the step size non-positive or non-finite: ``stop`` (write the last
            good set, then raise) or ``skip`` (undo that update and go on).
        max_nonfinite: stop after this many consecutive iterations without a finite matching loss.
        output: directory of the run's DistilledSets: ``<output>/last`` (written every ``save_every`` iterations
            and at the end); PeriodicEvaluation adds ``<output>/best``.
        save_every: write ``<output>/last`` every this many iterations (0: only at the end).
        overwrite: replace the sets of an earlier run already in ``output`` (False: refuse them at start; a resumed
            run may always go on writing its own).
        seed: base seed of initialisation and segment sampling; ``None``: the run's ``seed_everything`` seed.
    """

    def __init__(
        self,
        data_spec: DataSpec | dict | None = None,
        mode: str = "datm",
        ipc: int = 10,
        syn_steps: int = 80,
        expert_epochs: int = 2,
        max_start_epoch: int = 20,
        min_start_epoch: int = 0,
        current_max_start_epoch: int = 20,
        expansion_end_epoch: int = 3000,
        sequential_generation: bool = True,
        batch_syn: int | None = None,
        lr_img: float = 100.0,
        lr_lr: float = 1e-5,
        lr_y: float = 2.0,
        lr_teacher: float = 0.01,
        momentum_img: float = 0.5,
        momentum_lr: float = 0.5,
        momentum_y: float = 0.9,
        threshold: float | None = 1.0,
        engine: str = "adjoint",
        graph_window: int = 10,
        compile_trajectory: bool = False,
        pix_init: str = "samples_predicted_correctly",
        label_experts: int | None = None,
        dsa: bool = True,
        on_bad_step_size: str = "stop",
        max_nonfinite: int = 5,
        output: str = "distilled/matching",
        save_every: int = 0,
        seed: int | None = None,
        overwrite: bool = False,
    ) -> None:
        super().__init__()
        self.spec = data_spec = as_spec(data_spec)
        _check_choice("mode", mode, MODES)
        _check_choice("engine", engine, ENGINES)
        _check_choice("pix_init", pix_init, PIX_INITS)
        _check_choice("on_bad_step_size", on_bad_step_size, ON_BAD_STEP_SIZE)
        for name, value in (("ipc", ipc), ("syn_steps", syn_steps), ("expert_epochs", expert_epochs),
                            ("max_start_epoch", max_start_epoch), ("max_nonfinite", max_nonfinite)):
            if value <= 0:
                raise DDKitError(f"{name}: must be > 0, got {value!r}")
        if batch_syn is not None and batch_syn <= 0:
            raise DDKitError(f"batch_syn: must be > 0 (or null for the whole set), got {batch_syn!r}")
        if graph_window < 0:
            raise DDKitError(f"graph_window: must be >= 0, got {graph_window!r}")
        if compile_trajectory and engine == "unroll":
            raise DDKitError("compile_trajectory: applies to the adjoint and tesla engines only, got True with "
                             "engine 'unroll'")
        for name, value in (("lr_img", lr_img), ("lr_lr", lr_lr), ("lr_y", lr_y), ("lr_teacher", lr_teacher)):
            if not (value > 0 and math.isfinite(value)):
                raise DDKitError(f"{name}: must be a finite number > 0, got {value!r}")
        for name, value in (("momentum_img", momentum_img), ("momentum_lr", momentum_lr),
                            ("momentum_y", momentum_y)):
            if not 0 <= value < 1:
                raise DDKitError(f"{name}: must lie in [0, 1), got {value!r}")
        check_writable(output, "output")
        if save_every < 0:
            raise DDKitError(f"save_every: must be >= 0, got {save_every!r}")
        if label_experts is not None and label_experts <= 0:
            raise DDKitError(f"label_experts: must be > 0 (or null for all experts), got {label_experts!r}")
        if threshold is not None and not threshold > 0:
            raise DDKitError(f"threshold: must be > 0 (or null to never skip), got {threshold!r}")
        if mode == "datm":
            if not 0 <= min_start_epoch < max_start_epoch:
                raise DDKitError(f"min_start_epoch: must lie in [0, max_start_epoch={max_start_epoch}), "
                                 f"got {min_start_epoch!r}")
            if sequential_generation:
                if expansion_end_epoch <= 0:
                    raise DDKitError(f"expansion_end_epoch: must be > 0, got {expansion_end_epoch!r}")
                if not min_start_epoch < min(current_max_start_epoch, max_start_epoch):
                    raise DDKitError(f"current_max_start_epoch: must be > min_start_epoch={min_start_epoch}, "
                                     f"got {current_max_start_epoch!r}")
        self.save_hyperparameters(ignore=["data_spec"])
        self.hparams["data_spec"] = data_spec.to_dict()  # plain types: checkpoints load with weights_only=True
        self.automatic_optimization = False

        k, n = data_spec.num_classes, ipc * data_spec.num_classes
        shape = (n, data_spec.in_chans, data_spec.image_size, data_spec.image_size)
        self.images = nn.Parameter(torch.randn(shape, generator=seeded_generator(0)))
        self.step_size = nn.Parameter(torch.tensor(float(lr_teacher)))
        self.register_buffer("labels", torch.arange(k).repeat_interleave(ipc))
        self.label_logits = nn.Parameter(torch.zeros(n, k)) if mode == "datm" else None

        self.buffer = None  # the ExpertBuffer, set by attach()
        self.zca: dict[str, Tensor] | None = None
        self._forward: Callable[[Tensor, Tensor], Tensor] | None = None
        self._shell: list[nn.Module] = []  # the student's architecture, kept out of the module's parameters
        self.generator = torch.Generator()
        self.base_seed = 0
        # Progress and counters (checkpointed).
        self.iteration = 0
        self.threshold_skips = 0
        self.nonfinite_segments = 0
        self.nonfinite_streak = 0
        self.bad_step_sizes = 0

    # -------------------------------------------------------------------------------------------- set-up

    @property
    def datm(self) -> bool:
        return self.hparams.mode == "datm"

    @property
    def num_synthetic(self) -> int:
        return self.images.shape[0]

    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        from ddkit.datamodules.experts import ExpertSegments

        trainer = self.trainer
        data = trainer.datamodule
        if not isinstance(data, ExpertSegments):
            raise DDKitError(f"data: TrajectoryMatching needs ddkit.datamodules.experts.ExpertSegments, "
                             f"got {type(data).__name__}")
        precision = str(trainer.precision)
        if precision not in PRECISIONS:
            raise DDKitError(f"trainer.precision: matching keeps fp32 master parameters and sets gradients itself; "
                             f"use one of {', '.join(PRECISIONS)}, got {precision!r}")
        if trainer.max_steps is None or trainer.max_steps <= 0:
            raise DDKitError(f"trainer.max_steps: must be the number of matching iterations (> 0), "
                             f"got {trainer.max_steps!r}")
        self.attach(data, trainer.strategy.root_device, initialize=trainer.ckpt_path is None,
                    rank=trainer.global_rank)

    def attach(self, data: Any, device: torch.device | str = "cpu", initialize: bool = True, rank: int = 0) -> None:
        """Take the buffer from ``data`` (an ExpertSegments), check it, build the student and, if ``initialize``,
        set the images and labels from the real training split (``pix_init``).

        Raises:
            DDKitError: the buffer's net or epochs do not fit, or a class lacks correctly classified images.
        """
        hp = self.hparams
        buffer = data.buffer
        net = buffer.build_net()
        buffer.check_net(net)
        if any(isinstance(m, _BatchNorm) for m in net.modules()):
            raise DDKitError(f"buffer.net: nets with BatchNorm are not supported (the buffer stores parameters "
                             f"only), got {buffer.meta.net!r}")
        needed = hp.max_start_epoch + hp.expert_epochs
        if buffer.epochs < needed:
            raise DDKitError(f"buffer.epochs: must be >= max_start_epoch + expert_epochs = {needed}, "
                             f"got {buffer.epochs!r}")
        if hp.label_experts is not None and hp.label_experts > buffer.num_experts:
            raise DDKitError(f"label_experts: the buffer has {buffer.num_experts} experts, got {hp.label_experts!r}")
        spec = buffer.meta.data_spec
        for name in ("num_classes", "in_chans", "image_size"):
            if getattr(spec, name) != getattr(self.spec, name):
                raise DDKitError(f"buffer.data_spec.{name}: must match the data ({getattr(self.spec, name)!r}), "
                                 f"got {getattr(spec, name)!r}")
        self.buffer = buffer
        self.zca = buffer.zca
        device = torch.device(device)
        self._shell = [net.to(device).train()]
        self._forward = functional_forward(net)
        self.base_seed = int(torch.initial_seed() if hp.seed is None else hp.seed)
        self.generator = segment_generator(self.base_seed, rank)
        if initialize:
            x, y = data.train_tensors() if hp.pix_init != "noise" else (None, None)
            images, logits = self.initial_set(x, y, device)
            with torch.no_grad():
                self.images.copy_(images)
                if self.label_logits is not None:
                    self.label_logits.copy_(logits)

    def _expert_logits(self, device: torch.device) -> Logits:
        """``logits(expert, x)`` of expert ``expert`` at its last epoch, in eval mode, without gradients."""
        net, forward, buffer = self._shell[0], self._forward, self.buffer
        cache: dict[int, Tensor] = {}

        def logits(expert: int, x: Tensor) -> Tensor:
            if expert not in cache:
                cache.clear()
                cache[expert] = buffer.params(expert, buffer.epochs).to(device, torch.float32)
            net.eval()
            try:
                with torch.no_grad():
                    out = torch.cat([forward(xb.to(device, torch.float32), cache[expert]) for xb in x.split(256)])
            finally:
                net.train()
            return out.float().cpu()

        return logits

    def initial_set(self, x: Any, y: Tensor | None, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor | None]:
        """Initial images ``[K * ipc, C, H, W]`` (class-major) and, in DATM mode, label logits ``[K * ipc, K]``.

        Args:
            x: ``[N, C, H, W]`` real training images (the training split, without the validation split), or a
                :class:`~ddkit.datamodules.experts.LazyImages`; unused (may be None) for ``noise``.
            y: ``[N]`` their classes.
        """
        hp, k = self.hparams, self.spec.num_classes
        generator = seeded_generator(self.base_seed)
        labels = self.labels.cpu()
        logits_fn = self._expert_logits(torch.device(device))
        num_label_experts = hp.label_experts or self.buffer.num_experts
        if hp.pix_init == "noise":
            images = torch.randn(self.images.shape, generator=generator)
            logits = smoothed_one_hot_logits(labels, k) if self.datm else None
            return images, logits
        if hp.pix_init == "real":
            from ddkit.datamodules.real import random_real_subset

            idx = random_real_subset(y, hp.ipc, self.base_seed)
            images = x[idx].clone()
            logits = logits_fn(0, images) if self.datm else None
            return images, logits
        idx, selector = select_correct_samples(y, k, hp.ipc, logits_fn, self.buffer.num_experts, x, generator)
        images = x[idx].clone()
        if not self.datm:
            return images, None
        mean, count = mean_correct_logits((logits_fn(e, images) for e in range(num_label_experts)), labels)
        if bool((count == 0).any()):  # accepted by an expert outside label_experts: use that expert's logits
            for j in torch.nonzero(count == 0).flatten().tolist():
                mean[j] = logits_fn(int(selector[j]), images[j : j + 1])[0]
        return images, mean

    # -------------------------------------------------------------------------------------------- one iteration

    def sample_segment(self, generator: torch.Generator, iteration: int) -> Segment:
        """Draw the expert, the start epoch, the minibatches and the DSA seeds of one iteration from ``generator``."""
        hp = self.hparams
        expert = _randint(0, self.buffer.num_experts, generator)
        if self.datm:
            upper = start_epoch_upper_bound(iteration, hp.current_max_start_epoch, hp.max_start_epoch,
                                            hp.expansion_end_epoch, hp.sequential_generation)
            low = hp.min_start_epoch
        else:
            upper, low = hp.max_start_epoch, 0
        start = _randint(low, upper, generator)
        n, batch = self.num_synthetic, hp.batch_syn or self.num_synthetic
        chunks: list[Tensor] = []
        batches = []
        for _ in range(hp.syn_steps):
            if not chunks:
                chunks = list(torch.randperm(n, generator=generator).split(batch))
            batches.append(chunks.pop())
        seeds = [_randint(0, 2**62, generator) for _ in range(hp.syn_steps)] if hp.dsa else None
        return Segment(expert, start, upper, InnerLoop(batches, seeds))

    def segment_gradients(self, segment: Segment) -> MatchingResult:
        """The matching loss of ``segment`` and its gradients w.r.t. images, step size and label logits."""
        if self.buffer is None:
            raise DDKitError("buffer: the module is not attached to an ExpertSegments datamodule, got None")
        device, dtype = self.images.device, self.images.dtype
        if self._shell and next(self._shell[0].parameters()).device != device:
            self._shell[0].to(device)
        theta0 = self.buffer.params(segment.expert, segment.start_epoch).to(device, dtype)
        target = self.buffer.params(segment.expert, segment.start_epoch + self.hparams.expert_epochs).to(device, dtype)
        labels = self.label_logits if self.datm else self.labels
        return matching_gradients(self.hparams.engine, self._forward, theta0, target, self.images, labels,
                                  self.step_size, segment.loop, _dsa_augment if self.hparams.dsa else None,
                                  self.hparams.graph_window, self.hparams.compile_trajectory)

    def _world_size(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    def combine(self, result: MatchingResult) -> dict[str, Any]:
        """Average the accepted segments' gradients over the ranks (one all-reduce).

        A segment is accepted when its loss and gradients are finite and (DATM) its loss is at most ``threshold``.

        Returns:
            ``grads`` (images, step size, labels; ``None`` when no rank's segment was accepted), ``accepted``,
            ``finite`` and ``nonfinite`` segment counts, and ``loss`` (mean over the finite segments, NaN if none).
        """
        grads = [result.grad_images, result.grad_step_size, *([result.grad_labels] if self.datm else [])]
        loss = result.loss.float()
        finite = bool(torch.isfinite(loss)) and all(bool(torch.isfinite(g).all()) for g in grads)
        threshold = self.hparams.threshold if self.datm else None
        accepted = finite and (threshold is None or float(loss) <= threshold)
        flat = torch.cat([g.detach().float().reshape(-1) for g in grads])
        if not accepted:
            flat = torch.zeros_like(flat)
        stats = torch.tensor([float(accepted), float(finite), float(loss) if finite else 0.0], device=flat.device)
        packed = torch.cat([flat, stats])
        if self._world_size() > 1:
            packed = self.trainer.strategy.reduce(packed, reduce_op="sum")
        flat, stats = packed[:-3], packed[-3:]
        n_accepted, n_finite, loss_sum = round(float(stats[0])), round(float(stats[1])), float(stats[2])
        out_grads = None
        if n_accepted > 0:
            flat = flat / n_accepted
            sizes = [g.numel() for g in grads]
            out_grads = [part.view_as(g) for part, g in zip(flat.split(sizes), grads)]
        world = self._world_size()
        return {"grads": out_grads, "accepted": n_accepted, "finite": n_finite, "nonfinite": world - n_finite,
                "loss": loss_sum / n_finite if n_finite else float("nan")}

    def training_step(self, batch: Any, batch_idx: int) -> None:
        hp = self.hparams
        iteration = self.iteration
        segment = self.sample_segment(self.generator, iteration)
        combined = self.combine(self.segment_gradients(segment))

        self.nonfinite_segments += combined["nonfinite"]
        self.nonfinite_streak = self.nonfinite_streak + 1 if combined["finite"] == 0 else 0
        if combined["finite"] > 0 and combined["accepted"] == 0:
            self.threshold_skips += 1
        check_nonfinite_streak(self.nonfinite_streak, hp.max_nonfinite, "matching loss",
                               f"iterations in a row (up to iteration {iteration})",
                               "lower lr_img / lr_y / lr_lr or syn_steps",
                               lambda: f"last good set in {self.save_last()}", combined["loss"])
        self.apply_update(combined["grads"], iteration)
        self.iteration = iteration + 1

        self.log("matching/loss", combined["loss"], prog_bar=True)
        self.log("matching/step_size", float(self.step_size.detach()), prog_bar=True)
        self.log("matching/start_epoch", float(segment.start_epoch))
        self.log("matching/start_epoch_upper_bound", float(segment.upper_bound))
        self.log("matching/threshold_skips", float(self.threshold_skips))
        self.log("matching/nonfinite", float(self.nonfinite_segments))
        self.log("matching/bad_step_size", float(self.bad_step_sizes))
        if hp.save_every and self.iteration % hp.save_every == 0:
            self.save_last()

    def apply_update(self, grads: list[Tensor] | None, iteration: int) -> None:
        """One SGD step of the three optimizers with ``grads`` (``None``: skip, momenta untouched).

        The step size is updated first; if it becomes non-positive or non-finite the whole update is undone
        (``on_bad_step_size: skip``) or the last good set is written and a DDKitError raised (``stop``). The images'
        optimizer is stepped through Lightning on every iteration (with no gradient when skipping), so
        ``trainer.global_step`` counts iterations.
        """
        params = [self.images, self.step_size, *([self.label_logits] if self.datm else [])]
        optimizers = self.optimizers() if self._trainer is not None else self._optimizers
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        opt_img = optimizers[0]
        raw = [getattr(o, "optimizer", o) for o in optimizers]
        for p in params:
            p.grad = None
        if grads is not None:
            for p, g in zip(params, grads):
                p.grad = g.to(p.dtype)
            old_value = self.step_size.detach().clone()
            old_state = {k: v.clone() if torch.is_tensor(v) else v
                         for k, v in raw[1].state.get(self.step_size, {}).items()}
            raw[1].step()
            value = float(self.step_size.detach())
            if not (math.isfinite(value) and value > 0):
                with torch.no_grad():
                    self.step_size.copy_(old_value)
                if old_state:
                    raw[1].state[self.step_size] = old_state
                else:
                    raw[1].state.pop(self.step_size, None)
                self.bad_step_sizes += 1
                if self.hparams.on_bad_step_size == "stop":
                    where = self.save_last()
                    raise DDKitError(f"step_size: the update at iteration {iteration} made it {value!r}; lower "
                                     f"lr_lr or set on_bad_step_size: skip; last good set in {where}, "
                                     f"got lr_lr={self.hparams.lr_lr!r}")
                for p in params:
                    p.grad = None
        opt_img.step()  # counted by Lightning (no-op without a gradient)
        for o in raw[2:]:
            o.step()
        for p in params:
            p.grad = None

    def configure_callbacks(self) -> list[L.Callback]:
        return [ClaimOutput(self.hparams.output, "output", "matching", self.hparams.overwrite)]

    def configure_optimizers(self):
        hp = self.hparams
        optimizers = [
            torch.optim.SGD([self.images], lr=hp.lr_img, momentum=hp.momentum_img),
            torch.optim.SGD([self.step_size], lr=hp.lr_lr, momentum=hp.momentum_lr),
        ]
        if self.datm:
            optimizers.append(torch.optim.SGD([self.label_logits], lr=hp.lr_y, momentum=hp.momentum_y))
        self._optimizers = optimizers
        return optimizers

    # -------------------------------------------------------------------------------------------- output

    def distilled_set(self) -> DistilledSet:
        """The current synthetic set as a DistilledSet (CPU float32 copies)."""
        hp = self.hparams
        extra = {"iteration": self.iteration, "threshold_skips": self.threshold_skips,
                 "nonfinite_segments": self.nonfinite_segments, "bad_step_sizes": self.bad_step_sizes}
        if self.buffer is not None:
            extra["buffer"] = str(Path(self.buffer.path).resolve()) if hasattr(self.buffer, "path") else None
        return DistilledSet(
            images=self.images.detach().float().cpu().clone(),
            labels=self.labels.detach().cpu().clone(),
            spec=self.spec,
            ipc=hp.ipc,
            method=hp.mode,
            label_logits=self.label_logits.detach().float().cpu().clone() if self.datm else None,
            step_size=float(self.step_size.detach()),
            zca=self.zca,
            config=_plain(dict(hp)),
            extra=extra,
        )

    def evaluation_net(self) -> tuple[str, dict[str, Any]]:
        """The experts' architecture (name, options): what PeriodicEvaluation trains by default."""
        if self.buffer is None:
            raise DDKitError("buffer: the module is not attached to an ExpertSegments datamodule, got None")
        return self.buffer.meta.net, dict(self.buffer.meta.net_kwargs)

    def save_last(self) -> str:
        """Write ``<output>/last`` (rank 0 only); returns its path."""
        path = Path(self.hparams.output) / "last"
        if self._trainer is None or self.trainer.is_global_zero:
            save_distilled(self.distilled_set(), path)
        return str(path)

    def on_train_end(self) -> None:
        self.save_last()

    # -------------------------------------------------------------------------------------------- checkpoints

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = self.generator.get_state()
        if self._trainer is not None and self.trainer.world_size > 1:
            states = self.all_gather(state.to(self.device)).cpu()  # [W, S]: every rank's generator
        else:
            states = state[None]
        checkpoint["matching"] = {
            "generators": states,
            "iteration": self.iteration,
            "threshold_skips": self.threshold_skips,
            "nonfinite_segments": self.nonfinite_segments,
            "nonfinite_streak": self.nonfinite_streak,
            "bad_step_sizes": self.bad_step_sizes,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("matching")
        if state is None:
            return
        for key in ("iteration", "threshold_skips", "nonfinite_segments", "nonfinite_streak", "bad_step_sizes"):
            setattr(self, key, int(state[key]))
        rank = self.global_rank if self._trainer is not None else 0
        states = state["generators"]
        if rank < states.shape[0]:
            self.generator.set_state(states[rank].to(torch.uint8).cpu())
        else:  # more ranks than when saved: a fresh, still rank-dependent and deterministic stream
            self.generator = segment_generator(self.base_seed + self.iteration, rank)


def _check_choice(field: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise DDKitError(f"{field}: must be one of {', '.join(choices)}, got {value!r}")


def _plain(obj: Any) -> Any:
    """JSON-friendly copy of a config (tuples to lists, anything else odd to str)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)
