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
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from ddkit.datamodules.real import RealDataModule, stratified_subset
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


class LazyImages:
    """Images of a map-style ``(image, label)`` dataset, loaded when indexed: ``images[idx] -> [len(idx), C, H, W]``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        idx = torch.as_tensor(idx).reshape(-1)
        return torch.stack([self.dataset[int(i)][0] for i in idx])


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

    def setup(self, stage: str | None = None) -> None:
        fresh = self.train_set is None
        super().setup(stage)
        if fresh and not self.info.in_memory:
            self._split_folder()

    def _split_folder(self) -> None:
        """Folder datasets: carve the validation split out of ``train/`` (RealDataModule keeps none), and keep the
        training part with the evaluation transform (resize + centre crop) for initialising the synthetic set."""
        from torchvision.datasets import ImageFolder

        train = self.train_set
        targets = torch.as_tensor(train.targets, dtype=torch.long)
        plain = ImageFolder(train.root, transform=self.test_set.transform)
        keep = torch.ones(len(targets), dtype=torch.bool)
        n_val = self._num_val(len(targets))
        if n_val:
            val_idx = stratified_subset(targets, n_val, self.split_seed + 1)
            keep[val_idx] = False
            self.val_set = Subset(plain, val_idx.tolist())
            self.train_set = Subset(train, torch.nonzero(keep).flatten().tolist())
        train_idx = torch.nonzero(keep).flatten()
        self._init_images = LazyImages(Subset(plain, train_idx.tolist()))
        self._init_labels = targets[train_idx]

    def train_tensors(self) -> tuple[torch.Tensor | LazyImages, torch.Tensor]:
        """The training split (validation split excluded): ``[N, C, H, W]`` images and ``[N]`` labels.

        Folder datasets give a :class:`LazyImages` (indexed by a LongTensor, read on demand, evaluation transform)
        instead of a tensor, so the scan for correctly classified images never holds the whole set.
        """
        if self.train_set is None:
            self.setup("fit")
        ds = self.train_set
        if not self.info.in_memory:
            return self._init_images, self._init_labels
        if isinstance(ds, Subset) and isinstance(ds.dataset, TensorDataset):
            idx = torch.as_tensor(ds.indices, dtype=torch.long)
            x, y = ds.dataset.tensors
            return x[idx], y[idx]
        if isinstance(ds, TensorDataset):
            return ds.tensors[0], ds.tensors[1]
        xs, ys = zip(*DataLoader(ds, batch_size=1024, shuffle=False))
        return torch.cat(xs), torch.cat(ys)

    # No validation loop: matching has no validation_step, PeriodicEvaluation scores sets on ``val_set`` itself.
    # (None, not a method: Lightning then sees no val_dataloader and does not warn about the missing step.)
    val_dataloader = None

    def train_dataloader(self) -> StepTokens:
        trainer = getattr(self, "trainer", None)
        steps = trainer.max_steps if trainer is not None and trainer.max_steps and trainer.max_steps > 0 else None
        return StepTokens(steps)
