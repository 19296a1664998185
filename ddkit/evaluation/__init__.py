"""Protocol-controlled evaluation: N seeds, random-subset baseline, full-data reference, JSON + Markdown report."""

from ddkit.evaluation.protocols import (
    PROTOCOLS,
    HardProtocol,
    KDProtocol,
    Protocol,
    SoftProtocol,
    get_protocol,
)

__all__ = ["PROTOCOLS", "HardProtocol", "KDProtocol", "Protocol", "SoftProtocol", "get_protocol"]
