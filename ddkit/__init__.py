"""ddkit: dataset distillation (SC-DD / SRe2L and DATM / MTT) on PyTorch Lightning."""

__version__ = "0.1.0"
