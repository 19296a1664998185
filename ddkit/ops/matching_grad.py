"""Gradient engines for trajectory matching (MTT [1], DATM [2], TESLA [3]).

One matching step starts a functional student at an expert checkpoint ``theta_0``, runs ``N`` plain SGD steps
on (augmented) minibatches of the synthetic set,

    theta_{i+1} = theta_i - alpha * g_i,    g_i = grad_theta loss(f(aug(X[idx_i]); theta_i), Y[idx_i]),

and measures ``L = ||theta_N - theta*||^2 / ||theta_0 - theta*||^2`` against the expert's later checkpoint
``theta*``. ``matching_gradients`` returns ``L`` and its gradients w.r.t. the images ``X``, the label logits
``Y`` (soft labels, DATM) and the step size ``alpha``, computed by one of three engines:

- ``unroll``: autograd through the whole inner loop (``create_graph=True``), as MTT and DATM do. Exact;
  activation memory grows linearly with ``N``.
- ``tesla``: TESLA's constant-memory approximation [3]. Exact only for ``N = 1`` (biased otherwise).
- ``adjoint``: the reverse-mode adjoint recursion, recomputing one step at a time. Exact (equal to ``unroll``
  up to rounding) with TESLA's memory profile; ``graph_window`` > 0 keeps the last steps' graphs instead of
  recomputing them (memory of that many steps, whatever ``N``; less time).

``compile_trajectory`` runs the graph-free first pass of ``adjoint`` and ``tesla`` (one forward/backward per step,
its only cost beyond ``unroll``'s) through ``torch.compile``: that pass about 20% faster on the fmnist-cpu problem
(70 steps: 3.3 s against 4.0 s), after a compilation of about 20 s per process and batch shape. ``unroll`` cannot
use it: ``torch.compile`` does not trace a double backward.

The engines need each inner step to be recomputable: the same indices, the same augmentation draw (``augment``
is called with the step's seed and must be deterministic given it) and no stateful layers (instance/group norm
is fine; BatchNorm in train mode would update its running statistics on every recomputation).

References:
    [1] Cazenavette et al., "Dataset Distillation by Matching Training Trajectories", CVPR 2022.
    [2] Guo et al., "Towards Lossless Dataset Distillation via Difficulty-Aligned Trajectory Matching",
        ICLR 2024.
    [3] Cui et al., "Scaling Up Dataset Distillation to ImageNet-1K with Constant Memory", ICML 2023.

Example:
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).double()
    >>> forward, theta0 = functional_forward(net), flatten_params(net)
    >>> images, labels = torch.randn(6, 1, 4, 4, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    >>> loop = InnerLoop(batches=[torch.arange(3), torch.arange(3, 6)], aug_seeds=None)
    >>> result = matching_gradients("adjoint", forward, theta0, theta0 + 0.01, images, labels,
    ...                             torch.tensor(0.01, dtype=torch.float64), loop, augment=None)
    >>> result.grad_images.shape, result.grad_labels.shape
    (torch.Size([6, 1, 4, 4]), torch.Size([6, 3]))
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddkit.errors import check

Forward = Callable[[Tensor, Tensor], Tensor]
"""``forward(x, flat_params) -> logits``: the functional student."""

Augment = Callable[[Tensor, int], Tensor]
"""``augment(x_batch, seed) -> x_batch``: deterministic given ``seed``, differentiable w.r.t. ``x_batch``."""

ENGINES = ("unroll", "tesla", "adjoint")


@dataclass
class InnerLoop:
    """Everything needed to replay the inner SGD exactly.

    Args:
        batches: one LongTensor of synthetic-set indices per inner step (the caller draws them without
            replacement, e.g. MTT's ``randperm(N_syn).split(batch_syn)`` chunks).
        aug_seeds: one augmentation seed per inner step, or ``None`` for no augmentation.
    """

    batches: list[Tensor]
    aug_seeds: list[int] | None


@dataclass
class MatchingResult:
    """The matching loss and its gradients.

    Args:
        loss: 0-d, detached: ``||theta_N - theta*||^2 / ||theta_0 - theta*||^2``.
        grad_images: ``dL/dX``, same shape as the images.
        grad_labels: ``dL/dY``, same shape as the label logits; ``None`` for hard labels.
        grad_step_size: ``dL/dalpha``, 0-d.
    """

    loss: Tensor
    grad_images: Tensor
    grad_labels: Tensor | None
    grad_step_size: Tensor


def flatten_params(net: nn.Module) -> Tensor:
    """``[P]`` detached concatenation of ``net.parameters()`` in order (MTT's ``ReparamModule`` layout)."""
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def functional_forward(net: nn.Module) -> Forward:
    """The functional student ``forward(x, flat_params) -> net(x)`` with parameters taken from ``flat_params``.

    ``flat_params`` (``[P]``) is split in ``net.parameters()`` order, the layout of ``flatten_params`` and of
    expert buffers, and fed through ``torch.func.functional_call``; buffers are ``net``'s own.

    Args:
        net: the architecture; its own parameter values are not used by ``forward``.

    Returns:
        ``forward(x: [N, ...], flat_params: [P]) -> [N, num_classes]``, differentiable w.r.t. both.
    """
    named = list(net.named_parameters())
    names, shapes = [name for name, _ in named], [p.shape for _, p in named]
    sizes = [p.numel() for _, p in named]

    def forward(x: Tensor, flat_params: Tensor) -> Tensor:
        check(
            flat_params.numel() == sum(sizes),
            "flat_params",
            f"must have {sum(sizes)} elements",
            tuple(flat_params.shape),
        )
        chunks = flat_params.split(sizes)
        params = {name: chunk.view(shape) for name, chunk, shape in zip(names, chunks, shapes)}
        return torch.func.functional_call(net, params, (x,))

    return forward


def soft_cross_entropy(logits: Tensor, target_logits: Tensor) -> Tensor:
    """DATM's soft-target cross-entropy: ``mean_j sum_k -softmax(Y_j)_k * log_softmax(z_j)_k`` [2].

    Args:
        logits: ``[B, C]`` student logits ``z``.
        target_logits: ``[B, C]`` label logits ``Y`` (temperature 1); gradients reach them through the softmax.

    Returns:
        0-d loss.
    """
    return -(target_logits.softmax(dim=-1) * logits.log_softmax(dim=-1)).sum(dim=-1).mean()


def start_epoch_upper_bound(
    iteration: int,
    current_max_start_epoch: int,
    max_start_epoch: int,
    expansion_end_epoch: int,
    sequential: bool,
) -> int:
    """DATM's upper bound ``UB`` on the expert start epoch; the start epoch is drawn from ``[T-, UB)`` [2].

    ``UB = min(T + int((T+ - T) * it / expansion_end_epoch), T+)`` with ``T = current_max_start_epoch`` and
    ``T+ = max_start_epoch``, exactly as ``distill/DATM.py`` computes it; ``T+`` when not ``sequential``.

    Raises:
        DDKitError: if ``sequential`` and ``expansion_end_epoch <= 0``.
    """
    if not sequential:
        return max_start_epoch
    check(expansion_end_epoch > 0, "expansion_end_epoch", "must be > 0", expansion_end_epoch)
    grown = current_max_start_epoch + int(
        (max_start_epoch - current_max_start_epoch) * iteration / expansion_end_epoch
    )
    return min(grown, max_start_epoch)


def _inner_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy with hard (integer) labels, soft cross-entropy with label logits."""
    if labels.is_floating_point():
        return soft_cross_entropy(logits, labels)
    return F.cross_entropy(logits, labels)


_COMPILED_GRADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled_inner_grad(forward: Forward) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """``torch.compile``d ``(theta, x_augmented, labels) -> grad_theta loss`` for ``forward``, built once per
    ``forward`` (compilation happens at the first call, again for a new batch shape or dtype)."""
    fn = _COMPILED_GRADS.get(forward)
    if fn is None:
        fn = torch.compile(torch.func.grad(lambda theta, x, y: _inner_loss(forward(x, theta), y)))
        _COMPILED_GRADS[forward] = fn
    return fn


@dataclass(frozen=True)
class _Problem:
    """The detached inputs of one matching step (see ``matching_gradients``)."""

    forward: Forward
    theta0: Tensor
    target: Tensor
    images: Tensor
    labels: Tensor
    step_size: Tensor
    loop: InnerLoop
    augment: Augment | None
    graph_window: int = 0
    compile_trajectory: bool = False

    @property
    def soft(self) -> bool:
        return self.labels.is_floating_point()

    def inner_grad(self, step: int, theta: Tensor, x: Tensor, y: Tensor, create_graph: bool) -> Tensor:
        """``[P]`` gradient at ``theta`` (requiring grad) of inner step ``step``'s loss on batch ``x, y``.

        ``x`` is the un-augmented image batch; the step's augmentation seed is applied here.
        """
        loss = _inner_loss(self.forward(self.augmented(step, x), theta), y)
        return torch.autograd.grad(loss, theta, create_graph=create_graph)[0]

    def augmented(self, step: int, x: Tensor) -> Tensor:
        """The image batch ``x`` of inner step ``step`` with that step's augmentation draw (if any)."""
        if self.augment is None or self.loop.aug_seeds is None:
            return x
        return self.augment(x, self.loop.aug_seeds[step])

    def trajectory_grad(self, step: int, theta: Tensor) -> Tensor:
        """``[P]`` detached gradient of inner step ``step``'s loss at ``theta``, without a graph (first pass)."""
        idx = self.loop.batches[step]
        if not self.compile_trajectory:
            theta = theta.detach().requires_grad_()
            return self.inner_grad(step, theta, self.images[idx], self.labels[idx], create_graph=False)
        return compiled_inner_grad(self.forward)(theta, self.augmented(step, self.images[idx]), self.labels[idx])

    def loss(self, theta_n: Tensor) -> Tensor:
        """``||theta_N - theta*||^2 / ||theta_0 - theta*||^2``."""
        return (theta_n - self.target).square().sum() / (self.theta0 - self.target).square().sum()


def _unrolled_tail(p: _Problem, first: int, theta: Tensor) -> tuple[Tensor | None, MatchingResult]:
    """Steps ``first .. N-1`` from ``theta = theta_first`` with every graph kept, then one backward of ``L``.

    Returns:
        ``dL/dtheta_first`` (``None`` when ``first`` is 0: nothing is left to walk back) and ``L`` with the
        gradients these steps give.
    """
    images, step_size = p.images.clone().requires_grad_(), p.step_size.clone().requires_grad_()
    labels = p.labels.clone().requires_grad_(p.soft)
    start = theta = theta.detach().clone().requires_grad_()
    for step in range(first, len(p.loop.batches)):
        idx = p.loop.batches[step]
        theta = theta - step_size * p.inner_grad(step, theta, images[idx], labels[idx], create_graph=True)
    loss = p.loss(theta)
    wrt = [images, step_size, *([labels] if p.soft else []), *([start] if first > 0 else [])]
    # With no step left (first == N), L does not depend on the images: their gradient is zero here.
    grads = list(torch.autograd.grad(loss, wrt, allow_unused=True, materialize_grads=True))
    lam = grads.pop() if first > 0 else None
    result = MatchingResult(loss.detach(), grads[0], grads[2] if p.soft else None, grads[1])
    return lam, result


def _unroll(p: _Problem) -> MatchingResult:
    """Full unroll (MTT/DATM): keep every step's graph, one backward of ``L`` through all of them."""
    return _unrolled_tail(p, 0, p.theta0)[1]


def _trajectory(p: _Problem, steps: int) -> list[Tensor]:
    """Pass 1 of TESLA and the adjoint: ``[theta_0, ..., theta_steps]`` (detached), one step's graph at a time."""
    thetas = [p.theta0]
    for step in range(steps):
        thetas.append(thetas[-1] - p.step_size * p.trajectory_grad(step, thetas[-1]))
    return thetas


def _step_vjp(
    p: _Problem, step: int, theta: Tensor, lam: Tensor, with_theta: bool
) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    """Recompute inner step ``step`` at ``theta`` with a graph and differentiate ``s = <lam, g_step>``.

    Returns:
        ``s`` (0-d), ``ds/dtheta`` (``[P]``, only if ``with_theta``), ``ds/dX[idx]`` and ``ds/dY[idx]``
        (``None`` for hard labels), all detached.
    """
    idx = p.loop.batches[step]
    theta = theta.detach().requires_grad_()
    x, y = p.images[idx].requires_grad_(), p.labels[idx].requires_grad_(p.soft)
    s = torch.dot(lam, p.inner_grad(step, theta, x, y, create_graph=True))
    wrt = [*([theta] if with_theta else []), x, *([y] if p.soft else [])]
    grads = list(torch.autograd.grad(s, wrt))
    s_theta = grads.pop(0) if with_theta else None
    return s.detach(), s_theta, grads[0], grads[1] if p.soft else None


def _walk_back(p: _Problem, thetas: list[Tensor], lam: Tensor, into: MatchingResult, exact: bool) -> MatchingResult:
    """Steps ``len(thetas) - 2 .. 0``, recomputed one at a time, starting from ``lam = dL/dtheta_{len(thetas)-1}``.

    With ``s = <lam, g_i>``, step ``i`` adds ``-alpha * ds/dX`` to ``grad_X[idx_i]``, ``-alpha * ds/dY`` to
    ``grad_Y[idx_i]`` and ``-s`` to ``grad_alpha`` of ``into`` (in place). If ``exact``,
    ``lam <- lam - alpha * ds/dtheta = (I - alpha H_i) lam`` (the adjoint); otherwise ``lam`` stays (TESLA).
    """
    alpha = p.step_size
    for step in reversed(range(len(thetas) - 1)):
        idx = p.loop.batches[step]
        # lam is not needed below step 0: skip its Hessian-vector product there.
        s, s_theta, s_x, s_y = _step_vjp(p, step, thetas[step], lam, with_theta=exact and step > 0)
        into.grad_images.index_add_(0, idx, -alpha * s_x)
        if into.grad_labels is not None:
            into.grad_labels.index_add_(0, idx, -alpha * s_y)
        into.grad_step_size -= s
        if s_theta is not None:
            lam = lam - alpha * s_theta
    return into


def _tesla(p: _Problem) -> MatchingResult:
    """TESLA [3] (``distill.py``; DATM's ``DATM_tesla.py``): constant activation memory, **biased** gradient.

    Every step is back-propagated with the final ``lam_N = dL/dtheta_N`` instead of ``dL/dtheta_{i+1}``, i.e.
    the Hessian-vector coupling along the trajectory is dropped, and ``dL/dalpha = -<lam_N, G>`` holds
    ``G = sum_i g_i`` constant. The loss value is exact; the gradients are exact only for one inner step (or
    vanishing loss Hessians) and drift from ``unroll`` as ``N * alpha * ||H||`` grows.
    """
    thetas = _trajectory(p, len(p.loop.batches))
    lam, result = _unrolled_tail(p, len(p.loop.batches), thetas[-1])
    return _walk_back(p, thetas, lam, result, exact=False)


def _adjoint(p: _Problem) -> MatchingResult:
    """Exact reverse-mode adjoint: ``unroll``'s gradient with activation memory independent of ``N``.

    The last ``p.graph_window`` steps run as in ``unroll`` (graphs kept, one backward gives ``dL/dtheta`` at the
    window's start); the steps before it store only ``theta_0 .. theta_{N-W}`` (``P`` floats each) and are walked
    back one at a time, recomputing each step's graph and carrying ``lam`` back with one double-backward
    (a Hessian-vector product) per step. Memory: ``W`` steps' graphs, whatever ``N``; time: unroll's for
    ``N <= W``, plus one graph-free forward/backward per step before the window.
    """
    head = max(len(p.loop.batches) - p.graph_window, 0)
    thetas = _trajectory(p, head)
    lam, result = _unrolled_tail(p, head, thetas[-1])
    return result if lam is None else _walk_back(p, thetas, lam, result, exact=True)


_ENGINE_FNS: dict[str, Callable[[_Problem], MatchingResult]] = {
    "unroll": _unroll,
    "tesla": _tesla,
    "adjoint": _adjoint,
}


def _check_inputs(
    theta0: Tensor,
    target: Tensor,
    images: Tensor,
    labels: Tensor,
    step_size: Tensor,
    loop: InnerLoop,
    augment: Augment | None,
) -> None:
    """Raise ``DDKitError`` naming the first inconsistent argument of ``matching_gradients``."""
    check(
        theta0.dim() == 1 and theta0.shape == target.shape,
        "target",
        f"must have theta0's shape {tuple(theta0.shape)} (1-D)",
        tuple(target.shape),
    )
    check(step_size.dim() == 0, "step_size", "must be a 0-d tensor", tuple(step_size.shape))
    soft = labels.is_floating_point()
    check(
        labels.dim() == (2 if soft else 1) and labels.shape[0] == images.shape[0],
        "labels",
        f"must be [{images.shape[0]}] class indices or [{images.shape[0]}, C] logits",
        tuple(labels.shape),
    )
    check(len(loop.batches) > 0, "batches", "must hold at least one inner step", len(loop.batches))
    check(
        (augment is None) == (loop.aug_seeds is None),
        "augment",
        "must be given exactly when aug_seeds is",
        "None" if augment is None else "a callable",
    )
    if loop.aug_seeds is not None:
        check(
            len(loop.aug_seeds) == len(loop.batches),
            "aug_seeds",
            f"must hold one seed per inner step ({len(loop.batches)})",
            len(loop.aug_seeds),
        )


def matching_gradients(
    engine: str,
    forward: Forward,
    theta0: Tensor,
    target: Tensor,
    images: Tensor,
    labels: Tensor,
    step_size: Tensor,
    loop: InnerLoop,
    augment: Augment | None,
    graph_window: int = 0,
    compile_trajectory: bool = False,
) -> MatchingResult:
    """Trajectory-matching loss and its gradients w.r.t. images, label logits and step size.

    The inputs are not modified and need not require grad; the caller writes the returned gradients into
    ``.grad`` and steps its optimizers (MTT/DATM: SGD momentum 0.5 for images and step size, 0.9 for labels).

    Args:
        engine: one of ``ENGINES``: ``unroll`` (reference), ``tesla`` (approximate), ``adjoint`` (exact).
        forward: functional student, ``forward(x, flat_params) -> logits`` (see ``functional_forward``).
        theta0: ``[P]`` student start, the expert's parameters at the start epoch.
        target: ``[P]`` expert parameters ``M`` epochs later (``theta*``).
        images: ``[N_syn, C, H, W]`` synthetic images ``X``.
        labels: ``[N_syn]`` integer class labels (cross-entropy, MTT) or ``[N_syn, K]`` float label logits
            (soft cross-entropy with ``softmax(Y)`` targets, DATM).
        step_size: 0-d learnable inner learning rate ``alpha``.
        loop: per-step batch indices and augmentation seeds.
        augment: ``augment(x_batch, seed)``, deterministic given the seed (e.g. DSA with
            ``seeded_generator(seed)``), or ``None`` exactly when ``loop.aug_seeds`` is ``None``.
        graph_window: (``adjoint``) the last ``graph_window`` inner steps keep their graphs as in ``unroll``; only
            the steps before them are recomputed. More memory (that many steps' activations, whatever the number
            of steps), less time; 0: every step is recomputed.
        compile_trajectory: (``adjoint``, ``tesla``) run the graph-free first pass through ``torch.compile``
            (``compiled_inner_grad``); equal to the eager pass up to rounding.

    Returns:
        ``MatchingResult`` with the loss and gradients (``grad_labels`` is ``None`` for hard labels).

    Raises:
        DDKitError: for an unknown ``engine`` or inconsistent inputs.
    """
    check(engine in ENGINES, "engine", f"must be one of {', '.join(ENGINES)}", engine)
    check(graph_window >= 0, "graph_window", "must be >= 0", graph_window)
    check(not (compile_trajectory and engine == "unroll"), "compile_trajectory",
          "applies to the adjoint and tesla engines only (unroll has no graph-free pass)", compile_trajectory)
    _check_inputs(theta0, target, images, labels, step_size, loop, augment)
    device = images.device
    problem = _Problem(
        forward,
        *(t.detach() for t in (theta0, target, images, labels, step_size)),
        InnerLoop([idx.to(device) for idx in loop.batches], loop.aug_seeds),
        augment,
        graph_window,
        compile_trajectory,
    )
    with torch.enable_grad():
        return _ENGINE_FNS[engine](problem)
