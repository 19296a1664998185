import pytest
import torch

from ddkit.errors import DDKitError
from ddkit.nets import build_net, list_nets


@pytest.mark.parametrize("name", list_nets())
def test_every_registered_net_has_features_and_head(name):
    net = build_net(name, num_classes=7, in_chans=1, image_size=28)
    x = torch.randn(2, 1, 28, 28)
    feats = net.forward_features(x)
    assert feats.shape == (2, net.num_features)
    assert torch.allclose(net.head(feats), net(x))
    assert net(x).shape == (2, 7)


def test_convnet_matches_the_reference_parameter_count():
    # datm-mtt.md 1.1: ConvNet-D3 width 128 on CIFAR-10 has 320,010 parameters, CIFAR-100 504,420.
    assert sum(p.numel() for p in build_net("convnet", 10, 3, 32).parameters()) == 320_010
    assert sum(p.numel() for p in build_net("convnet", 100, 3, 32).parameters()) == 504_420


def test_convnet_instance_norm_is_groupnorm_per_channel_and_treats_28px_as_32():
    net = build_net("convnet", 10, 1, 28, width=16)
    norms = [m for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == 3 and all(m.num_groups == m.num_channels == 16 for m in norms)
    assert net.features[0].padding == (3, 3)  # 28 + 2*3 - 2 = 32
    assert net.num_features == 16 * 4 * 4


def test_cifar_stem_resnet_keeps_resolution_in_the_stem():
    net = build_net("resnet18", 10, 3, 32)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, torch.nn.Identity)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == 20


def test_timm_fallback_and_unknown_names():
    net = build_net("resnet10t", 5, 1, 32)
    assert net(torch.randn(2, 1, 32, 32)).shape == (2, 5)
    with pytest.raises(DDKitError, match="net: unknown name .*convnet.*got 'nope'"):
        build_net("nope", 10)
    with pytest.raises(DDKitError, match="norm"):
        build_net("convnet", 10, norm="weird")
