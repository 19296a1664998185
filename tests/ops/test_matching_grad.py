"""Trajectory-matching gradient engines (MTT, DATM, TESLA; DATM-MTT reference sections 2.3-2.5 and 6).

The tiny float64 ConvNet (conv, group norm, ReLU, avg pool, linear) has no stateful layers, so every inner step
can be recomputed exactly, as the adjoint and TESLA engines require.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from ddkit.errors import DDKitError
from ddkit.ops.dsa import dsa, seeded_generator
from ddkit.ops.matching_grad import (
    ENGINES,
    InnerLoop,
    MatchingResult,
    flatten_params,
    functional_forward,
    matching_gradients,
    soft_cross_entropy,
    start_epoch_upper_bound,
)

N_SYN, BATCH, CLASSES = 6, 3, 3


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.GroupNorm(4, 4),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, CLASSES),
    ).double()


def _batches(steps: int, seed: int = 0) -> list[Tensor]:
    """MTT's minibatches: pop the last chunk of randperm(N_syn).split(batch), refilled when empty."""
    g, chunks, out = torch.Generator().manual_seed(seed), [], []
    for _ in range(steps):
        if not chunks:
            chunks = list(torch.randperm(N_SYN, generator=g).split(BATCH))
        out.append(chunks.pop())
    return out


def _jitter(x: Tensor, seed: int) -> Tensor:
    """A simple deterministic seeded augmentation: per-pixel gain and a random roll."""
    g = seeded_generator(seed)
    gain = 1 + 0.2 * torch.randn(x.shape[1:], generator=g, dtype=x.dtype)
    return torch.roll(x * gain, shifts=int(torch.randint(-2, 3, (1,), generator=g)), dims=-1)


def _dsa(x: Tensor, seed: int) -> Tensor:
    return dsa(x, seeded_generator(seed))


AUGMENTS = {"none": None, "jitter": _jitter, "dsa": _dsa}


def _problem(soft: bool, seed: int = 0) -> dict:
    net = _net()
    g = torch.Generator().manual_seed(seed + 1)
    theta0 = flatten_params(net)
    labels = (
        torch.randn(N_SYN, CLASSES, generator=g, dtype=torch.float64)
        if soft
        else torch.arange(N_SYN) % CLASSES
    )
    return {
        "forward": functional_forward(net),
        "theta0": theta0,
        "target": theta0 + 0.05 * torch.randn(theta0.shape, generator=g, dtype=torch.float64),
        "images": torch.randn(N_SYN, 1, 8, 8, generator=g, dtype=torch.float64),
        "labels": labels,
        "step_size": torch.tensor(0.1, dtype=torch.float64),
    }


def _run(engine: str, problem: dict, steps: int, augment: str, graph_window: int = 0, **kwargs) -> MatchingResult:
    fn = AUGMENTS[augment]
    loop = InnerLoop(_batches(steps), None if fn is None else [1000 + i for i in range(steps)])
    return matching_gradients(engine, **problem, loop=loop, augment=fn, graph_window=graph_window, **kwargs)


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("graph_window", [0, 3], ids=["window0", "window3"])
@pytest.mark.parametrize("augment", sorted(AUGMENTS))
@pytest.mark.parametrize("soft", [True, False], ids=["soft", "hard"])
@pytest.mark.parametrize("steps", [1, 5, 20])
def test_adjoint_equals_unroll(steps: int, soft: bool, augment: str, graph_window: int) -> None:
    """Pure adjoint (every step recomputed) and with a 3-step graph window (all of 1 step, part of 5 and 20)."""
    problem = _problem(soft)
    ref = _run("unroll", problem, steps, augment)
    adj = _run("adjoint", problem, steps, augment, graph_window)
    assert _rel(adj.loss, ref.loss) <= 1e-12
    assert _rel(adj.grad_images, ref.grad_images) <= 1e-10
    assert _rel(adj.grad_step_size, ref.grad_step_size) <= 1e-10
    if soft:
        assert _rel(adj.grad_labels, ref.grad_labels) <= 1e-10
    else:
        assert adj.grad_labels is None and ref.grad_labels is None


@pytest.mark.parametrize("soft", [True, False], ids=["soft", "hard"])
def test_adjoint_with_compiled_trajectory_equals_unroll(soft: bool) -> None:
    """The torch.compile'd first pass (float64, so rounding stays far below the tolerance)."""
    problem = _problem(soft)
    ref = _run("unroll", problem, 5, "dsa")
    adj = _run("adjoint", problem, 5, "dsa", graph_window=2, compile_trajectory=True)
    assert _rel(adj.loss, ref.loss) <= 1e-12
    assert _rel(adj.grad_images, ref.grad_images) <= 1e-10
    assert _rel(adj.grad_step_size, ref.grad_step_size) <= 1e-10
    if soft:
        assert _rel(adj.grad_labels, ref.grad_labels) <= 1e-10


@pytest.mark.parametrize("soft", [True, False], ids=["soft", "hard"])
def test_tesla_equals_unroll_at_one_step_and_differs_at_five(soft: bool) -> None:
    problem = _problem(soft)
    ref, tesla = _run("unroll", problem, 1, "dsa"), _run("tesla", problem, 1, "dsa")
    for got, want in [(tesla.grad_images, ref.grad_images), (tesla.grad_step_size, ref.grad_step_size)]:
        assert _rel(got, want) <= 1e-10
    ref, tesla = _run("unroll", problem, 5, "dsa"), _run("tesla", problem, 5, "dsa")
    assert _rel(tesla.loss, ref.loss) <= 1e-12  # the loss value is exact, the gradient is not
    assert _rel(tesla.grad_images, ref.grad_images) > 1e-3
    assert _rel(tesla.grad_step_size, ref.grad_step_size) > 1e-3
    if soft:
        assert _rel(tesla.grad_labels, ref.grad_labels) > 1e-3


def test_loss_matches_plain_sgd_on_the_module() -> None:
    # The inner loop is plain SGD on the network: replay it with torch.optim and compare theta_N and L.
    problem, steps = _problem(soft=True), 5
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for step, idx in enumerate(_batches(steps)):
        opt.zero_grad()
        x = _jitter(problem["images"][idx], 1000 + step)
        soft_cross_entropy(net(x), problem["labels"][idx]).backward()
        opt.step()
    theta_n, theta0, target = flatten_params(net), problem["theta0"], problem["target"]
    expected = (theta_n - target).square().sum() / (theta0 - target).square().sum()
    for engine in ENGINES:
        assert _rel(_run(engine, problem, steps, "jitter").loss, expected) <= 1e-12


def test_unroll_matches_finite_differences() -> None:
    problem, steps, h = _problem(soft=True), 5, 1e-6
    result = _run("unroll", problem, steps, "jitter")

    def loss(**change: Tensor) -> float:
        return float(_run("unroll", {**problem, **change}, steps, "jitter").loss)

    alpha = problem["step_size"]
    fd_alpha = (loss(step_size=alpha + h) - loss(step_size=alpha - h)) / (2 * h)
    assert math.isclose(float(result.grad_step_size), fd_alpha, rel_tol=1e-6)
    for name, grad in [("images", result.grad_images), ("labels", result.grad_labels)]:
        direction = torch.randn(
            problem[name].shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64
        )
        value = problem[name]
        fd = (loss(**{name: value + h * direction}) - loss(**{name: value - h * direction})) / (2 * h)
        assert math.isclose(float((grad * direction).sum()), fd, rel_tol=1e-6)


def test_engines_leave_inputs_untouched() -> None:
    problem = _problem(soft=True)
    before = {k: v.clone() for k, v in problem.items() if isinstance(v, Tensor)}
    for engine in ENGINES:
        with torch.no_grad():
            result = _run(engine, problem, 3, "dsa")
        assert not result.loss.requires_grad and not result.grad_images.requires_grad
    for key, value in before.items():
        assert torch.equal(problem[key], value) and not problem[key].requires_grad


def test_functional_forward_matches_the_module() -> None:
    net = _net()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    theta = flatten_params(net)
    assert theta.shape == (sum(p.numel() for p in net.parameters()),)
    torch.testing.assert_close(functional_forward(net)(x, theta), net(x), rtol=0, atol=0)
    assert not torch.equal(functional_forward(net)(x, theta + 0.1), net(x))


def test_soft_cross_entropy_by_hand() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    targets = torch.tensor([[0.0, 0.0, math.log(2.0)], [2.0, -1.0, 0.5]], dtype=torch.float64)

    def hand(z: list[float], y: list[float]) -> float:
        log_norm = math.log(sum(math.exp(v) for v in z))
        p = [math.exp(v) / sum(math.exp(u) for u in y) for v in y]
        return -sum(pk * (zk - log_norm) for pk, zk in zip(p, z))

    expected = (hand([1, 2, 3], [0, 0, math.log(2)]) + hand([0, 0, 0], [2, -1, 0.5])) / 2
    assert math.isclose(float(soft_cross_entropy(logits, targets)), expected, rel_tol=1e-12)
    # Second row: uniform student, so the loss is log(3) whatever the targets.
    assert math.isclose(float(soft_cross_entropy(logits[1:], targets[1:])), math.log(3), rel_tol=1e-12)
    # Gradients reach the label logits.
    targets.requires_grad_()
    soft_cross_entropy(logits, targets).backward()
    assert targets.grad is not None and targets.grad[0].abs().sum() > 0


@pytest.mark.parametrize(
    ("iteration", "expected"), [(0, 10), (99, 10), (100, 11), (550, 15), (999, 19), (1000, 20), (5000, 20)]
)
def test_start_epoch_upper_bound(iteration: int, expected: int) -> None:
    assert start_epoch_upper_bound(iteration, 10, 20, 1000, sequential=True) == expected
    assert start_epoch_upper_bound(iteration, 10, 20, 1000, sequential=False) == 20


def test_start_epoch_upper_bound_other_values() -> None:
    # CIFAR-100-like: T = 20, T+ = 70, expansion over 2000 iterations: +1 every 40 iterations.
    assert [start_epoch_upper_bound(it, 20, 70, 2000, True) for it in (39, 40, 1999, 2000)] == [
        20,
        21,
        69,
        70,
    ]
    with pytest.raises(DDKitError, match="^expansion_end_epoch: must be > 0, got 0$"):
        start_epoch_upper_bound(5, 10, 20, 0, True)


def test_unknown_engine_and_bad_inputs() -> None:
    problem = _problem(soft=True)
    loop = InnerLoop(_batches(2), None)
    with pytest.raises(DDKitError, match="^engine: .*got 'exact'$"):
        matching_gradients("exact", **problem, loop=loop, augment=None)
    with pytest.raises(DDKitError, match="^augment: "):
        matching_gradients("adjoint", **problem, loop=loop, augment=_jitter)
    with pytest.raises(DDKitError, match="^aug_seeds: "):
        matching_gradients("adjoint", **problem, loop=InnerLoop(_batches(2), [1]), augment=_jitter)
    with pytest.raises(DDKitError, match="^batches: "):
        matching_gradients("adjoint", **problem, loop=InnerLoop([], None), augment=None)
    with pytest.raises(DDKitError, match="^labels: "):
        matching_gradients("adjoint", **{**problem, "labels": problem["labels"][:4]}, loop=loop, augment=None)
    with pytest.raises(DDKitError, match="^graph_window: must be >= 0, got -1$"):
        matching_gradients("adjoint", **problem, loop=loop, augment=None, graph_window=-1)
    with pytest.raises(DDKitError, match="^compile_trajectory: applies to the adjoint and tesla engines only"):
        matching_gradients("unroll", **problem, loop=loop, augment=None, compile_trajectory=True)
