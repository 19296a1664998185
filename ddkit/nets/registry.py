"""A name -> builder registry (timm's pattern) and the factory that falls back to any timm model."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import timm
import torch
from torch import nn

from ddkit.datamodules.spec import MAX_CLASSES, MAX_IMAGE_SIZE, MAX_IN_CHANS
from ddkit.errors import DDKitError, check_int, check_mapping

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


# timm would download weights (``pretrained``) or unpickle a file (``checkpoint_path``) while building the net:
# ddkit builds every net from scratch and loads weights itself, from safetensors.
REFUSED_KWARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir")

# The most parameters a net may have (4 GB as float32), checked on a shape-only copy before the real one is built:
# a width or depth from a file or a config cannot ask for more memory than that. ResNet-50 has 25 M.
MAX_PARAMS = 1_000_000_000


def check_net_kwargs(kwargs: Any, field: str = "net_kwargs") -> dict[str, Any]:
    """``kwargs`` as a dict if it is a mapping of option names that ddkit passes on, else one DDKitError."""
    kwargs = check_mapping(kwargs, field)
    for key in REFUSED_KWARGS:
        if key in kwargs:
            raise DDKitError(f"{field}.{key}: refused (ddkit builds nets from scratch, without pretrained weights "
                             f"or checkpoint files), got {kwargs[key]!r}")
    return kwargs


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
        DDKitError: unknown name, sizes out of range, options the family does not take, timm's ``pretrained`` or
            ``checkpoint_path``, or more than ``MAX_PARAMS`` parameters.
    """
    kwargs = check_net_kwargs({k: v for k, v in kwargs.items() if v is not None})
    check_int(num_classes, "num_classes", 1, MAX_CLASSES)
    check_int(in_chans, "in_chans", 1, MAX_IN_CHANS)
    check_int(image_size, "image_size", 1, MAX_IMAGE_SIZE)
    if name not in _BUILDERS and not timm.is_model(name):
        raise DDKitError(f"net: unknown name (known: {', '.join(list_nets())}, or any timm model name), got {name!r}")
    # The same net on the meta device first: shapes only, no memory, no random numbers drawn.
    try:
        with torch.device("meta"):
            shapes = _build(name, num_classes, in_chans, image_size, kwargs)
    except DDKitError:
        raise
    except Exception:  # noqa: BLE001  (a timm model that cannot be built without data: its real build decides)
        shapes = None
    count = sum(p.numel() for p in shapes.parameters()) if shapes is not None else 0
    if count > MAX_PARAMS:
        raise DDKitError(f"net_kwargs: net {name!r} for {num_classes} classes would have {count:,} parameters, more "
                         f"than the limit of {MAX_PARAMS:,}, got {kwargs!r}")
    return _build(name, num_classes, in_chans, image_size, kwargs)


def _build(name: str, num_classes: int, in_chans: int, image_size: int, kwargs: dict[str, Any]) -> nn.Module:
    if name in _BUILDERS:
        try:
            return _BUILDERS[name](num_classes=num_classes, in_chans=in_chans, image_size=image_size, **kwargs)
        except TypeError as e:
            raise DDKitError(f"net_kwargs: not accepted by net {name!r}: {e}, got {kwargs!r}") from None
        except (RuntimeError, ValueError) as e:  # the builders' only computation is a forward pass on one image
            raise DDKitError(f"image_size: net {name!r} {kwargs} cannot take {in_chans}-channel {image_size} px "
                             f"images ({str(e).splitlines()[0]}), got {image_size!r}") from None
    return TimmNet(timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs))


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
