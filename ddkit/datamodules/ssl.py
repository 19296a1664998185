"""Multi-view real data for self-supervised pretraining, built on lightly's transforms.

The training loader yields ``(views, label)`` where ``views`` is a list of ``[N, C, h, w]`` tensors (one per view,
global views first); validation yields two plain labelled loaders for the kNN monitor: index 0 is the *bank*
(a stratified subset of the training split, no augmentation), index 1 the *queries* (the held-out ``val_split``,
or the test split when ``val_split`` is 0).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ddkit.datamodules.real import EpochShuffle, RealDataModule, stratified_subset
from ddkit.errors import DDKitError

VIEWS = ("simclr", "mocov2", "byol", "swav", "dino")


def build_views(name: str, image_size: int, mean: tuple[float, ...], std: tuple[float, ...],
                kwargs: dict[str, Any] | None = None) -> Callable:
    """lightly's multi-view transform ``name`` for images of ``image_size`` px, normalizing with ``mean``/``std``.

    Sizes default to the dataset's: ``input_size`` (simclr, mocov2, byol), ``crop_sizes`` = (size, size // 2 + size
    // 4) (swav), ``global_crop_size`` = size and ``local_crop_size`` = size // 2 + size // 4 (dino). Every other
    lightly option can be set through ``kwargs`` (e.g. ``cj_strength``, ``min_scale``, ``n_local_views``).

    Raises:
        DDKitError: unknown name, or options the lightly transform does not take.
    """
    from lightly import transforms as LT

    kw = dict(kwargs or {})
    local = max(1, image_size // 2 + image_size // 4)
    if name in ("simclr", "mocov2", "byol"):
        kw.setdefault("input_size", image_size)
    elif name == "swav":
        kw.setdefault("crop_sizes", (image_size, local))
    elif name == "dino":
        kw.setdefault("global_crop_size", image_size)
        kw.setdefault("local_crop_size", local)
    else:
        raise DDKitError(f"views: must be one of {', '.join(VIEWS)}, got {name!r}")
    cls = {"simclr": LT.SimCLRTransform, "mocov2": LT.MoCoV2Transform, "byol": LT.BYOLTransform,
           "swav": LT.SwaVTransform, "dino": LT.DINOTransform}[name]
    kw["normalize"] = {"mean": list(mean), "std": list(std)}
    for key in ("crop_sizes", "crop_counts", "crop_min_scales", "crop_max_scales", "global_crop_scale",
                "local_crop_scale", "sigmas", "gaussian_blur"):
        if isinstance(kw.get(key), list):
            kw[key] = tuple(kw[key])
    if name == "byol":  # BYOLTransform takes one kwargs set per view
        view_kw = {k: v for k, v in kw.items()}
        try:
            return LT.BYOLTransform(view_1_transform=LT.BYOLView1Transform(**view_kw),
                                    view_2_transform=LT.BYOLView2Transform(**view_kw))
        except TypeError as e:
            raise DDKitError(f"view_kwargs: not accepted by lightly's BYOL transform ({e}), got {kwargs!r}") from None
    try:
        return cls(**kw)
    except (TypeError, ValueError) as e:
        raise DDKitError(f"view_kwargs: not accepted by lightly's {cls.__name__} ({e}), got {kwargs!r}") from None


class TensorViews(Dataset):
    """Turn a dataset of normalized image tensors back into PIL images and apply a multi-view transform.

    Args:
        base: dataset of ``(x [C, H, W] normalized float, label)``.
        transform: a lightly multi-view transform (PIL image -> list of tensors).
        mean, std: the normalization of ``base``, undone before converting to 8-bit PIL.
    """

    def __init__(self, base: Dataset, transform: Callable, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.base = base
        self.transform = transform
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        from PIL import Image

        x, y = self.base[i]
        px = (x * self.std + self.mean).clamp(0, 1).mul(255).round().to(torch.uint8)
        arr = px[0].numpy() if px.shape[0] == 1 else px.permute(1, 2, 0).numpy()
        return self.transform(Image.fromarray(arr)), y


class SSLDataModule(RealDataModule):
    """A real dataset (every :class:`~ddkit.datamodules.real.RealDataModule` option) fed as lightly multi-views.

    Args:
        views: lightly multi-view transform: ``simclr``, ``mocov2`` (2 views), ``byol`` (2 asymmetric views, also
            MoCo v3's), ``swav`` (multi-crop: ``crop_counts`` high- then low-resolution crops), ``dino`` (2 global +
            ``n_local_views`` local crops).
        view_kwargs: options of that lightly transform (``cj_strength``, ``min_scale``, ``crop_counts``, ...);
            sizes default to the dataset's image size (local crops to 3/4 of it).
        knn_bank_size: training images (stratified, seeded by ``split_seed``) in the kNN monitor's bank; 0 = all.
        knn_query_size: held-out images queried by the kNN monitor; 0 = all.
        **kwargs: :class:`~ddkit.datamodules.real.RealDataModule` options (``dataset``, ``root``, ``batch_size``,
            ``num_workers``, ``val_split``, ``train_subset``, ``image_size``, ...). ``zca`` is not supported.
    """

    def __init__(
        self,
        views: str = "mocov2",
        view_kwargs: dict[str, Any] | None = None,
        knn_bank_size: int = 10000,
        knn_query_size: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if views not in VIEWS:
            raise DDKitError(f"views: must be one of {', '.join(VIEWS)}, got {views!r}")
        if self.use_zca:
            raise DDKitError("zca: SSL views are made from pixels, ZCA-whitened inputs are not supported, got True")
        if knn_bank_size < 0:
            raise DDKitError(f"knn_bank_size: must be >= 0, got {knn_bank_size!r}")
        if knn_query_size < 0:
            raise DDKitError(f"knn_query_size: must be >= 0, got {knn_query_size!r}")
        self.views = views
        self.view_kwargs = dict(view_kwargs or {})
        self.knn_bank_size = knn_bank_size
        self.knn_query_size = knn_query_size
        self.transform = build_views(views, self.image_size, self.spec.mean, self.spec.std, self.view_kwargs)
        self.plain_train_set: Dataset | None = None
        self.bank_set: Dataset | None = None
        self.query_set: Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.plain_train_set is not None:
            return
        super().setup(stage)
        self.plain_train_set = self.train_set
        if self.info.in_memory:
            self.train_set = TensorViews(self.plain_train_set, self.transform, self.spec.mean, self.spec.std)
        else:  # ImageFolder: PIL in, lightly's views out; a second ImageFolder (test transform) for the bank
            from pathlib import Path

            from torchvision.datasets import ImageFolder

            self.plain_train_set = ImageFolder(str(Path(self.root) / "train"), transform=self.test_set.transform)
            self.train_set.transform = self.transform
        queries = self.val_set if self.val_set is not None else self.test_set
        self.bank_set = self._subset(self.plain_train_set, self.knn_bank_size, self.split_seed + 2)
        self.query_set = self._subset(queries, self.knn_query_size, self.split_seed + 3)

    @staticmethod
    def _labels(ds: Dataset) -> torch.Tensor:
        if isinstance(ds, Subset):
            return SSLDataModule._labels(ds.dataset)[torch.as_tensor(ds.indices)]
        if hasattr(ds, "tensors"):
            return ds.tensors[1]
        return torch.as_tensor(ds.targets)  # ImageFolder

    def _subset(self, ds: Dataset, k: int, seed: int) -> Dataset:
        if k == 0 or k >= len(ds):
            return ds
        return Subset(ds, stratified_subset(self._labels(ds), k, seed).tolist())

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches of views, the last incomplete batch dropped; with ``shuffle_seed`` the order of epoch
        ``e`` is the permutation of ``shuffle_seed + e`` (as for RealDataModule)."""
        order = {"shuffle": True} if self.shuffle_seed is None else \
            {"sampler": EpochShuffle(len(self.train_set), self.shuffle_seed)}
        return DataLoader(self.train_set, batch_size=self.batch_size, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, drop_last=True, **order)

    def val_dataloader(self) -> list[DataLoader]:
        return [self._loader(self.bank_set, shuffle=False), self._loader(self.query_set, shuffle=False)]

    def plain_train_dataloader(self) -> DataLoader:
        """The whole training split without augmentation (for offline kNN and probes)."""
        return self._loader(self.plain_train_set, shuffle=False)
