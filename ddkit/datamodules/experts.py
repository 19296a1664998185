"""Expert segments for trajectory matching: the ExpertBuffer, the real data behind it, and one token per iteration.

The matching module draws each iteration's expert, start epoch, minibatches and DSA seeds from its own
(checkpointed, rank-dependent) generator, so the training loader only paces the loop: it yields the step indices
``0, 1, ..., trainer.max_steps - 1``. The real training split (without the validation split) is what the
synthetic images are initialised from; the validation split is what PeriodicEvaluation scores sets on. With ZCA
the buffer's stored transform is applied (never refitted), so images live in the experts' input space.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

from ddkit.datamodules.real import RealDataModule
from ddkit.errors import DDKitError
from ddkit.formats.buffer import ExpertBuffer


class StepTokens:
    """An iterable of step indices ``tensor(i)``, ``i = 0 .. length - 1`` (endless when ``length`` is None).

    It is "stateful" for Lightning (``state_dict`` / ``load_state_dict``) only so that a resumed run does not warn
    about a non-resumable loader: the tokens carry no information, the module's checkpointed iteration is the
    position.
    """

    def __init__(self, length: int | None) -> None:
        self.length = length

    def __iter__(self) -> Iterator[torch.Tensor]:
        steps = range(self.length) if self.length is not None else itertools.count()
        return (torch.tensor(i) for i in steps)

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("StepTokens without a length has no len()")
        return self.length

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class ExpertSegments(RealDataModule):
    """The ExpertBuffer and its real dataset, for :class:`ddkit.modules.matching.TrajectoryMatching`.

    Args:
        buffer: path of the ExpertBuffer directory (``meta.json`` + ``expert_{k:04d}.safetensors``).
        dataset: the real dataset; ``None``: the buffer's. Must match the buffer's.
        zca: ``None``: as the buffer's data (its stored ZCA transform is applied, not refitted; a reference buffer
            imported without its transform gets a refit, with a warning); an explicit value must agree.
        image_size: ``None``: the buffer's image size.
        val_split: fraction (0-1) or count (> 1) of training images held out for PeriodicEvaluation (never the
            test split); they are excluded from the images that initialise the synthetic set.
        **kwargs: the other RealDataModule options (root, download, batch_size of the val/test loaders, ...).
    """

    def __init__(
        self,
        buffer: str,
        dataset: str | None = None,
        zca: bool | None = None,
        image_size: int | None = None,
        val_split: float = 0.1,
        **kwargs: Any,
    ) -> None:
        expert_buffer = ExpertBuffer(buffer)
        spec = expert_buffer.meta.data_spec
        if dataset is not None and dataset != spec.dataset:
            raise DDKitError(f"dataset: the buffer was made on {spec.dataset!r}, got {dataset!r}")
        buffer_zca = bool(spec.zca)
        if zca is not None and zca != buffer_zca:
            raise DDKitError(f"zca: the buffer's experts were trained with zca={buffer_zca}, got {zca!r}")
        if image_size is not None and image_size != spec.image_size:
            raise DDKitError(f"image_size: the buffer's experts saw {spec.image_size} px images, got {image_size!r}")
        super().__init__(dataset=spec.dataset, zca=buffer_zca, image_size=spec.image_size, val_split=val_split,
                         **kwargs)
        self.buffer_path = buffer
        self.buffer = expert_buffer
        for name in ("num_classes", "in_chans"):
            if getattr(self.spec, name) != getattr(spec, name):
                raise DDKitError(f"buffer.data_spec.{name}: the dataset has {getattr(self.spec, name)!r}, "
                                 f"got {getattr(spec, name)!r}")
        if expert_buffer.zca is not None:
            from ddkit.ops.zca import ZCA

            self.zca = ZCA.from_state_dict(expert_buffer.zca)  # applied by load_tensors instead of a refit
        elif buffer_zca:  # an imported reference buffer: whitened data, transform not stored
            warnings.warn(f"buffer {buffer!r} stores no ZCA transform; refitting it on the training set",
                          stacklevel=2)

    def train_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The training split (validation split excluded) as ``[N, C, H, W]`` images and ``[N]`` labels."""
        if self.train_set is None:
            self.setup("fit")
        ds = self.train_set
        if isinstance(ds, Subset) and isinstance(ds.dataset, TensorDataset):
            idx = torch.as_tensor(ds.indices, dtype=torch.long)
            x, y = ds.dataset.tensors
            return x[idx], y[idx]
        if isinstance(ds, TensorDataset):
            return ds.tensors[0], ds.tensors[1]
        xs, ys = zip(*DataLoader(ds, batch_size=1024, shuffle=False))
        return torch.cat(xs), torch.cat(ys)

    def train_dataloader(self) -> StepTokens:
        trainer = getattr(self, "trainer", None)
        steps = trainer.max_steps if trainer is not None and trainer.max_steps and trainer.max_steps > 0 else None
        return StepTokens(steps)
