"""Export a DistilledSet to the tensors DD-Ranking's evaluators take.

DD-Ranking (Li, Zhong et al., arXiv 2505.13300; the ``ddranking`` package) scores a distilled set with
``LabelRobustScoreHard / LabelRobustScoreSoft / AugmentationRobustScore(...).compute_metrics(image_tensor=...,
hard_labels=... or soft_labels=..., syn_lr=...)``; it builds its hard labels as ``[0] * ipc + [1] * ipc + ...``, so
the images must be in class-major order. The export directory holds, written with ``torch.save`` (the format
DD-Ranking's examples load; these files hold plain tensors only, so ``torch.load(weights_only=True)`` reads them)::

    images.pt        float32 [N, C, H, W]  the images in the set's training input space, sorted by class (stable)
    hard_labels.pt   int64 [N]             the hard labels, in the same order (= i // ipc)
    soft_labels.pt   float32 [N, K]        the learned label logits (DATM), when the set has them
    syn_lr.pt        float32 []            the learned step size (MTT / DATM), when the set has it
    meta.json        the data spec (normalization or ZCA the images live in), ipc, method, which files exist
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ddkit.errors import DDKitError
from ddkit.formats.common import atomic_dir, load_weights_only, read_json, write_json
from ddkit.formats.distilled import DistilledSet
from ddkit.formats.images import is_lazy

FORMAT = "ddkit.ddranking_export"
FILES = ("images.pt", "hard_labels.pt", "soft_labels.pt", "syn_lr.pt")


def export_ddranking(ds: DistilledSet, path: str | os.PathLike) -> Path:
    """Write ``ds`` as DD-Ranking's inputs to the directory ``path`` (atomically); returns ``path``."""
    ds.validate()
    order = torch.argsort(ds.labels, stable=True)
    images = (ds.images.load() if is_lazy(ds.images) else ds.images).detach().cpu().float()
    tensors = {"images.pt": images[order].contiguous(), "hard_labels.pt": ds.labels[order].clone()}
    if ds.label_logits is not None:
        tensors["soft_labels.pt"] = ds.label_logits[order].detach().cpu().float().contiguous()
    if ds.step_size is not None:
        tensors["syn_lr.pt"] = torch.tensor(float(ds.step_size), dtype=torch.float32)
    path = Path(path)
    with atomic_dir(path, field="output") as tmp:
        for name, t in tensors.items():
            torch.save(t, tmp / name)
        write_json(tmp / "meta.json", {"format": FORMAT, "data_spec": ds.spec.to_dict(), "ipc": ds.ipc,
                                       "method": ds.method, "zca": ds.zca is not None, "files": sorted(tensors)})
    return path


def load_ddranking_export(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of an export, by file name (``torch.load(weights_only=True)``)."""
    path = Path(path)
    meta = read_json(path / "meta.json", "ddranking.meta")
    if meta.get("format") != FORMAT:
        raise DDKitError(f"ddranking.meta.format: must be {FORMAT!r}, got {meta.get('format')!r}")
    out = {}
    for name in meta.get("files", []):
        if name not in FILES:
            raise DDKitError(f"ddranking.meta.files: unknown file, got {name!r}")
        t = load_weights_only(path / name, f"ddranking.{name}")
        if not isinstance(t, torch.Tensor):
            raise DDKitError(f"ddranking.{name}: must hold one tensor, got {type(t).__name__}")
        out[name] = t
    return out
