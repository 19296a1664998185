"""A name -> builder registry (timm's pattern) and the factory that falls back to any timm model."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import timm
import torch
from torch import nn

from ddkit.errors import DDKitError

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_net(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """File ``fn(num_classes, in_chans, image_size, **kwargs)`` under its function name."""
    if fn.__name__ in _BUILDERS:
        warnings.warn(f"overwriting net builder {fn.__name__!r}", stacklevel=2)
    _BUILDERS[fn.__name__] = fn
    return fn


def list_nets() -> list[str]:
    """Names registered by ddkit (any timm model name is accepted on top of these)."""
    return sorted(_BUILDERS)


def is_net(name: str) -> bool:
    return name in _BUILDERS or timm.is_model(name)


def build_net(name: str, num_classes: int, in_chans: int = 3, image_size: int = 32, **kwargs: Any) -> nn.Module:
    """Build a freshly initialised network.

    Args:
        name: a ddkit name (``convnet``, ``convnet_bn``, ``resnet18``, ``resnet50``) or any timm model name.
        num_classes: size of the linear head.
        in_chans: input channels.
        image_size: input height = width.
        **kwargs: family options (e.g. ``depth``, ``width``, ``norm`` for ``convnet``); ``None`` values are dropped
            so a config can leave an option unset.

    Raises:
        DDKitError: unknown name, or options the family does not take.
    """
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if num_classes < 1:
        raise DDKitError(f"num_classes: must be >= 1, got {num_classes!r}")
    if name in _BUILDERS:
        try:
            return _BUILDERS[name](num_classes=num_classes, in_chans=in_chans, image_size=image_size, **kwargs)
        except TypeError as e:
            raise DDKitError(f"net_kwargs: not accepted by net {name!r}: {e}, got {kwargs!r}") from None
    if timm.is_model(name):
        return TimmNet(timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs))
    raise DDKitError(f"net: unknown name (known: {', '.join(list_nets())}, or any timm model name), got {name!r}")


class TimmNet(nn.Module):
    """Gives a timm model the ddkit interface (pooled ``forward_features``, ``head``, ``num_features``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.num_features = model.num_features

    @property
    def head(self) -> nn.Module:
        return self.model.get_classifier()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)
