"""The modules LightningCLI's subclass mode must import so that their classes can be selected by name."""

from __future__ import annotations

import importlib

STAGE_MODULES = (
    "ddkit.datamodules.real",
    "ddkit.datamodules.distilled",
    "ddkit.modules.classifier",
    "ddkit.modules.buffer",
    "ddkit.datamodules.experts",
    "ddkit.modules.matching",
    "ddkit.datamodules.recover",
    "ddkit.modules.recover",
    "ddkit.modules.kd",
    "ddkit.datamodules.ssl",
    "ddkit.modules.ssl",
    "ddkit.modules.probe",
)


def import_stage_modules() -> None:
    for name in STAGE_MODULES:
        importlib.import_module(name)
