"""Architectures and the one factory :func:`build_net`.

Every net exposes ``forward_features(x) -> [N, num_features]``, ``head`` (the linear classifier) and
``num_features``; ``forward(x) == head(forward_features(x))``.
"""

from ddkit.nets import convnet, resnet  # noqa: F401  (registers the families)
from ddkit.nets.registry import build_net, is_net, list_nets, register_net

__all__ = ["build_net", "is_net", "list_nets", "register_net"]
