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


def test_the_shape_only_build_draws_no_random_numbers():
    """build_net builds each net twice (on the meta device first, to bound its size): the weights, and the random
    numbers drawn after it, must be those of one plain build from the same seed."""
    from ddkit.nets.registry import _build

    torch.manual_seed(0)
    plain = _build("convnet_bn", 10, 1, 8, {"depth": 2, "width": 8}).state_dict()
    plain_next = torch.rand(3)
    torch.manual_seed(0)
    checked = build_net("convnet_bn", 10, 1, 8, depth=2, width=8).state_dict()
    assert all(torch.equal(plain[k], checked[k]) for k in plain)
    assert torch.equal(torch.rand(3), plain_next)


@pytest.mark.parametrize("args, kwargs, message", [
    ((10, 1, 8), {"width": 10**7}, r"^net_kwargs: net 'convnet' for 10 classes would have 3,720,000,010 parameters"),
    ((10**6, 1, 8), {}, r"^num_classes: must be an integer in \[1, 100000\], got 1000000"),
    ((10, 0, 8), {}, r"^in_chans: must be an integer in \[1, 1024\], got 0"),
    ((10, 1, 8.0), {}, r"^image_size: must be an integer in \[1, 4096\], got 8.0"),
    ((10, 1, 8), {"depth": 4}, r"^image_size: net 'convnet' \{'depth': 4, 'width': 8\} cannot take 1-channel 8 px"),
    ((10, 1, 8), {"pretrained": True}, r"^net_kwargs.pretrained: refused"),
    ((10, 1, 8), {"checkpoint_path": "/etc/hostname"}, r"^net_kwargs.checkpoint_path: refused"),
])
def test_sizes_and_options_are_bounded_before_anything_is_allocated(args, kwargs, message):
    with pytest.raises(DDKitError, match=message):
        build_net("convnet", *args, **{"depth": 1, "width": 8, **kwargs})


@pytest.mark.parametrize("kwargs, message", [
    ({"depth": 10**6}, r"^depth: must be an integer in \[1, 64\], got 1000000$"),
    ({"depth": 2.5}, r"^depth: must be an integer in \[1, 64\], got 2.5$"),
    ({"width": "8"}, r"^width: must be an integer >= 1, got '8'$"),
])
def test_convnet_depth_and_width_are_integers_in_range(kwargs, message):
    with pytest.raises(DDKitError, match=message):
        build_net("convnet", 10, 3, 32, **kwargs)
