"""BN statistics loss (SRe2L) against values computed on paper."""

import pytest
import torch
from torch import nn

from ddkit.errors import DDKitError
from ddkit.ops.bn_loss import bn_layer_loss, total_bn_loss


def _tiny_activation() -> torch.Tensor:
    """[N=2, C=2, H=1, W=2]: channel 0 holds 1, 3, 5, 7 (mu 4, biased var 5); channel 1 all 2: mu 2, var 0"""
    return torch.tensor([[[[1.0, 3.0]], [[2.0, 2.0]]], [[[5.0, 7.0]], [[2.0, 2.0]]]])


def test_layer_loss_by_hand() -> None:
    # mean diff (1-4, 6-2) = (-3, 4) -> 5; var diff (11-5, 8-0) = (6, 8) -> 10.
    # (The unbiased variance 20/3 would not give 10.)
    loss = bn_layer_loss(_tiny_activation(), torch.tensor([1.0, 6.0]), torch.tensor([11.0, 8.0]))
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(15.0)


def test_layer_loss_zero_when_stats_match() -> None:
    assert bn_layer_loss(_tiny_activation(), torch.tensor([4.0, 2.0]), torch.tensor([5.0, 0.0])).item() == 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layer_loss_upcasts_half_precision(dtype: torch.dtype) -> None:
    loss = bn_layer_loss(_tiny_activation().to(dtype), torch.tensor([1.0, 6.0]), torch.tensor([11.0, 8.0]))
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(15.0)


def test_layer_loss_gradient() -> None:
    a = torch.randn(3, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    mean, var = torch.tensor([0.3, -0.2], dtype=torch.float64), torch.tensor([0.5, 2.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: bn_layer_loss(t, mean, var), (a,))


def test_layer_loss_rejects_channel_mismatch() -> None:
    with pytest.raises(DDKitError, match=r"^a: must have 3 channels, got \(2, 2, 1, 2\)$"):
        bn_layer_loss(_tiny_activation(), torch.zeros(3), torch.ones(3))


def test_total_weights_first_layer() -> None:
    layers = [torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0)]
    assert total_bn_loss(layers).item() == 15.0
    assert total_bn_loss(layers, first_bn_multiplier=1.0).item() == 6.0
    assert total_bn_loss(layers[:1], first_bn_multiplier=2.5).item() == 2.5


def test_total_rejects_empty() -> None:
    with pytest.raises(DDKitError, match=r"^layer_losses: must not be empty"):
        total_bn_loss([])


def _two_bn_net() -> nn.Sequential:
    """Conv(1->2, 1x1, w=(1,-1)) - BN - ReLU - Conv(2->1, 1x1, w=(2,7)) - BN; eval mode, preset stats."""
    net = nn.Sequential(
        nn.Conv2d(1, 2, 1, bias=False), nn.BatchNorm2d(2, eps=0.0), nn.ReLU(),
        nn.Conv2d(2, 1, 1, bias=False), nn.BatchNorm2d(1, eps=0.0),
    )
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
        net[1].running_mean.copy_(torch.tensor([2.0, 1.0]))
        net[1].running_var.copy_(torch.tensor([1.0, 5.0]))
        net[3].weight.copy_(torch.tensor([2.0, 7.0]).view(1, 2, 1, 1))
        net[4].running_mean.fill_(4.0)
        net[4].running_var.fill_(5.0)
    return net.eval()


def test_two_layer_net_by_hand() -> None:
    # x = (1, 3). BN1 input: ch0 (1, 3), ch1 (-1, -3): mu (2, -2), var (1, 1)
    #   r1 = ||(1, 5) - (1, 1)|| + ||(2, 1) - (2, -2)|| = 4 + 3 = 7
    # BN1 output ch0 (-1, 1); ch1 is negative, so ReLU keeps only ch0 -> (0, 1).
    # BN2 input 2 * (0, 1) = (0, 2):
    #   mu 1, var 1, r2 = |5 - 1| + |4 - 1| = 7. Total 10 * 7 + 7 = 77.
    net = _two_bn_net()
    inputs: list[torch.Tensor] = []
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    handles = [bn.register_forward_hook(lambda m, i, o: inputs.append(i[0])) for bn in bns]
    net(torch.tensor([1.0, 3.0]).view(2, 1, 1, 1))
    for h in handles:
        h.remove()
    layers = [bn_layer_loss(a, bn.running_mean, bn.running_var) for a, bn in zip(inputs, bns, strict=True)]
    assert [r.item() for r in layers] == pytest.approx([7.0, 7.0])
    assert total_bn_loss(layers).item() == pytest.approx(77.0)
