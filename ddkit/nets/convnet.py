"""The ConvNet of DC / DSA / MTT / DATM: [conv3x3 -> norm -> ReLU -> avgpool] x depth -> linear.

"instance" norm is ``GroupNorm(C, C)`` (per-sample, per-channel, affine, no running statistics), as in the
reference ``networks.py``; a 1-channel input gets padding 3 in the first conv (28 px MNIST-like data is
treated as 32 px). Parameter order: conv.w, conv.b, norm.w, norm.b per block, then head.w, head.b.
"""

from __future__ import annotations

import torch
from torch import nn

from ddkit.errors import DDKitError, check_int
from ddkit.nets.registry import register_net

NORMS = ("instance", "batch", "layer", "none")
MAX_DEPTH = 64


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "instance":
        return nn.GroupNorm(channels, channels, affine=True)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels, affine=True)
    if kind == "none":
        return nn.Identity()
    raise DDKitError(f"norm: must be one of {', '.join(NORMS)}, got {kind!r}")


class ConvNet(nn.Module):
    """ConvNet-D{depth} of width ``width`` (Gidaris & Komodakis 2018, as used by DC/DSA/MTT/DATM)."""

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 3,
        image_size: int = 32,
        depth: int = 3,
        width: int = 128,
        norm: str = "instance",
        pooling: str = "avg",
    ) -> None:
        super().__init__()
        # Bounded so that a depth from a file or a config cannot keep the builder busy for hours (the references use
        # depth 3 to 6); the width is bounded by build_net's parameter count.
        check_int(depth, "depth", 1, MAX_DEPTH)
        check_int(width, "width", 1)
        if pooling not in ("avg", "max", "none"):
            raise DDKitError(f"pooling: must be one of avg, max, none, got {pooling!r}")
        layers: list[nn.Module] = []
        channels = in_chans
        for d in range(depth):
            layers += [
                nn.Conv2d(channels, width, kernel_size=3, padding=3 if (in_chans == 1 and d == 0) else 1),
                _norm(norm, width),
                nn.ReLU(inplace=True),
            ]
            if pooling == "avg":
                layers.append(nn.AvgPool2d(2, 2))
            elif pooling == "max":
                layers.append(nn.MaxPool2d(2, 2))
            channels = width
        self.features = nn.Sequential(*layers)
        with torch.no_grad():
            self.num_features = self.features(torch.zeros(1, in_chans, image_size, image_size)).numel()
        if self.num_features == 0:
            raise DDKitError(f"image_size: too small for a depth-{depth} ConvNet, got {image_size!r}")
        self.head = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


@register_net
def convnet(num_classes: int, in_chans: int = 3, image_size: int = 32, **kwargs) -> ConvNet:
    """ConvNet (default depth 3, width 128, instance norm, avg pooling)."""
    return ConvNet(num_classes, in_chans, image_size, **kwargs)


@register_net
def convnet_bn(num_classes: int, in_chans: int = 3, image_size: int = 32, **kwargs) -> ConvNet:
    """ConvNet with BatchNorm (a BN teacher for recover, the ``ConvNetBN`` ablation of the references)."""
    return ConvNet(num_classes, in_chans, image_size, norm="batch", **kwargs)
