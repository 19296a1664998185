"""GSAM on a quadratic, where one step can be worked out by hand."""

import copy
import math

import pytest
import torch

from ddkit.errors import DDKitError
from ddkit.ops.gsam import GSAM

# L(w) = 0.5 * (2 * w1^2 + 1 * w2^2), so grad L(w) = (2 w1, w2). Start at w = (1, -2).
A = torch.tensor([2.0, 1.0], dtype=torch.float64)


def _setup(rho: float, alpha: float, adaptive: bool, lr: float = 0.1, momentum: float = 0.0):
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = GSAM([w], lambda groups: torch.optim.SGD(groups, lr=lr, momentum=momentum), rho=rho, alpha=alpha,
               adaptive=adaptive)
    seen = []

    def closure():
        opt.zero_grad()
        seen.append(w.detach().clone())
        loss = 0.5 * (A * w * w).sum()
        loss.backward()
        return loss

    return w, opt, closure, seen


def test_adaptive_step_by_hand():
    w, opt, closure, seen = _setup(rho=0.1, alpha=0.3, adaptive=True, lr=0.1)
    loss = opt.step(closure)
    # 1. g = (2, -2); L(w) = 0.5 * (2 + 4) = 3.
    assert loss.item() == pytest.approx(3.0)
    # 2. ||w * g|| = ||(2, -4)|| = sqrt(20); e = 0.1 * g / sqrt(20) * w^2 = (0.2, -0.8) / sqrt(20)
    s20 = math.sqrt(20.0)
    e = (0.2 / s20, -0.8 / s20)
    assert len(seen) == 2
    assert torch.allclose(seen[1], torch.tensor([1 + e[0], -2 + e[1]], dtype=torch.float64))
    # 3. g' = (2 (1 + e1), (-2 + e2))
    g2 = (2 * (1 + e[0]), -2 + e[1])
    # 4. cos = <g, g'> / (||g|| ||g'||); d = g' - 0.3 (g - cos ||g|| g' / ||g'||)
    ng, ng2 = math.sqrt(8.0), math.hypot(*g2)
    cos = (2 * g2[0] - 2 * g2[1]) / (ng * ng2)
    d = [g2[i] - 0.3 * ((2.0, -2.0)[i] - cos * ng * g2[i] / ng2) for i in range(2)]
    # 5. w <- w - lr * d (from the unperturbed w)
    expected = torch.tensor([1 - 0.1 * d[0], -2 - 0.1 * d[1]], dtype=torch.float64)
    assert torch.allclose(w.detach(), expected, atol=1e-12)
    # The same numbers written out: e = (0.0447214, -0.1788854), g' = (2.0894427, -2.1788854),
    # cos = 0.9997805, d = (2.0766119, -2.1911896), w = (0.7923388, -1.7808810).
    assert torch.allclose(w.detach(), torch.tensor([0.7923388, -1.7808810], dtype=torch.float64), atol=1e-6)


def test_non_adaptive_perturbation_is_rho_along_the_gradient():
    w, opt, closure, seen = _setup(rho=0.5, alpha=0.0, adaptive=False, lr=0.1)
    opt.step(closure)
    g = torch.tensor([2.0, -2.0], dtype=torch.float64)
    perturbed = torch.tensor([1.0, -2.0], dtype=torch.float64) + 0.5 * g / g.norm()
    assert torch.allclose(seen[1], perturbed)
    # alpha = 0: SAM, the update uses the gradient at the perturbed point.
    assert torch.allclose(w.detach(), torch.tensor([1.0, -2.0], dtype=torch.float64) - 0.1 * A * perturbed)


def test_rho_zero_alpha_any_is_plain_sgd():
    w, opt, closure, _ = _setup(rho=0.0, alpha=0.3, adaptive=True, lr=0.1)
    opt.step(closure)
    # g' = g, so cos = 1 and the vertical component vanishes.
    assert torch.allclose(w.detach(), torch.tensor([1.0 - 0.1 * 2.0, -2.0 + 0.1 * 2.0], dtype=torch.float64))


def test_base_state_is_shared_and_checkpointed():
    w, opt, closure, _ = _setup(rho=0.01, alpha=0.3, adaptive=True, momentum=0.9)
    opt.step(closure)
    assert "momentum_buffer" in opt.state[w]
    sd = copy.deepcopy(opt.state_dict())  # as a checkpoint round trip would
    assert torch.equal(sd["state"][0]["momentum_buffer"], opt.base_optimizer.state[w]["momentum_buffer"])
    w2, opt2, closure2, _ = _setup(rho=0.01, alpha=0.3, adaptive=True, momentum=0.9)
    with torch.no_grad():
        w2.copy_(w)
    opt2.load_state_dict(sd)
    assert opt2.param_groups is opt2.base_optimizer.param_groups and opt2.state is opt2.base_optimizer.state
    opt.step(closure)
    opt2.step(closure2)
    assert torch.equal(w.detach(), w2.detach())
    for group in opt.param_groups:  # a scheduler changes the base optimizer's lr
        group["lr"] = 0.5
    assert opt.base_optimizer.param_groups[0]["lr"] == 0.5


def test_needs_a_closure_and_valid_rho():
    w, opt, _, _ = _setup(rho=0.01, alpha=0.3, adaptive=True)
    with pytest.raises(DDKitError, match="closure"):
        opt.step()
    with pytest.raises(DDKitError, match="gsam_rho: must be >= 0"):
        GSAM([w], rho=-1.0)
