"""torchvision ResNets with a choice of stem; the CIFAR stem (3x3 stride-1 conv1, no max-pool) is SRe2L's.

State-dict keys stay torchvision's, so SRe2L/SC-DD checkpoints (after stripping ``module.``) load as they are.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from ddkit.errors import DDKitError
from ddkit.nets.registry import register_net


class StemResNet(ResNet):
    """A torchvision ResNet whose stem suits the image size.

    Args:
        stem: ``cifar`` (3x3 stride-1 conv1, no max-pool; for 32-64 px) or ``imagenet`` (torchvision's 7x7 stride-2
            conv1 + max-pool).
    """

    def __init__(self, block, layers, num_classes: int, in_chans: int = 3, stem: str = "cifar") -> None:
        super().__init__(block, layers, num_classes=num_classes)
        if stem == "cifar":
            self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        elif stem == "imagenet":
            if in_chans != 3:
                self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
        else:
            raise DDKitError(f"stem: must be cifar or imagenet, got {stem!r}")
        self.num_features = self.fc.in_features

    @property
    def head(self) -> nn.Linear:
        return self.fc

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


@register_net
def resnet18(num_classes: int, in_chans: int = 3, image_size: int = 32, stem: str = "cifar") -> StemResNet:
    """ResNet-18 (BasicBlock [2, 2, 2, 2]); CIFAR stem by default."""
    return StemResNet(BasicBlock, [2, 2, 2, 2], num_classes, in_chans, stem)


@register_net
def resnet50(num_classes: int, in_chans: int = 3, image_size: int = 32, stem: str = "cifar") -> StemResNet:
    """ResNet-50 (Bottleneck [3, 4, 6, 3]); CIFAR stem by default."""
    return StemResNet(Bottleneck, [3, 4, 6, 3], num_classes, in_chans, stem)
