"""Real datasets as one LightningDataModule.

Small datasets (digits, Fashion-MNIST, MNIST, CIFAR-10/100) are held in memory as normalized (or ZCA-whitened)
float tensors; augmentation happens on the batch inside the module, on the device. Folder datasets
(Tiny-ImageNet, ImageNet) are read lazily with torchvision's ImageFolder.
"""

from __future__ import annotations

import gzip
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, TensorDataset

from ddkit.datamodules.spec import DataSpec
from ddkit.errors import DDKitError

FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")


@dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    in_chans: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    in_memory: bool
    class_names: tuple[str, ...] = ()


DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo(10, 1, 8, (0.3053,), (0.3760,), True, tuple(str(i) for i in range(10))),
    "fashion_mnist": DatasetInfo(10, 1, 28, (0.2860,), (0.3530,), True, FASHION_CLASSES),
    "mnist": DatasetInfo(10, 1, 28, (0.1307,), (0.3081,), True, tuple(str(i) for i in range(10))),
    "cifar10": DatasetInfo(10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), True),
    "cifar100": DatasetInfo(100, 3, 32, (0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762), True),
    "tiny_imagenet": DatasetInfo(200, 3, 64, (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262), False),
    "imagenet": DatasetInfo(1000, 3, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), False),
}


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise DDKitError(f"dataset: unknown name (known: {', '.join(DATASETS)}), got {name!r}")
    return DATASETS[name]


# ---------------------------------------------------------------------------------------------- raw loaders
# Each returns (train_x uint8 [N,H,W] or [N,H,W,C], train_y, test_x, test_y, class_names) as numpy arrays.


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        _, dtype, ndim = struct.unpack(">HBB", data[:4])
        if dtype != 0x08:  # every MNIST-family file stores unsigned bytes
            raise ValueError(f"element type 0x{dtype:02x}, expected 0x08 (unsigned byte)")
        shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
        arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        return arr.reshape(shape)
    except (OSError, EOFError, struct.error, ValueError) as e:
        raise DDKitError(f"root: cannot read IDX file ({e}), got {str(path)!r}") from None


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem, f"raw/{stem}.gz", f"raw/{stem}"):
        if (folder / name).is_file():
            return folder / name
    return None


def _load_mnist_like(name: str, root: str | None, download: bool) -> tuple:
    stems = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    candidates = [Path(root)] if root else []
    if name == "fashion_mnist":
        candidates.append(Path(FASHION_MNIST_SYSTEM_DIR))
    tv_dir = "FashionMNIST" if name == "fashion_mnist" else "MNIST"
    if root:
        candidates.append(Path(root) / tv_dir)
    for folder in candidates:
        paths = [_find_idx(folder, s) for s in stems]
        if all(paths):
            return tuple(_read_idx(p) for p in paths)
    if download:
        import torchvision

        cls = torchvision.datasets.FashionMNIST if name == "fashion_mnist" else torchvision.datasets.MNIST
        target = root or "data"
        try:
            tr, te = cls(target, train=True, download=True), cls(target, train=False, download=True)
        except Exception as e:  # noqa: BLE001 -- network errors come in many types
            raise DDKitError(f"dataset: {name} not found in {[str(c) for c in candidates]} and download failed "
                             f"({type(e).__name__}), got root={root!r}") from None
        return tr.data.numpy(), tr.targets.numpy(), te.data.numpy(), te.targets.numpy()
    hint = " (apt-get install dataset-fashion-mnist)" if name == "fashion_mnist" else ""
    raise DDKitError(f"dataset: {name} IDX files not found in {[str(c) for c in candidates]}; set data.root, "
                     f"install it{hint}, or set data.download=true, got root={root!r}")


def _load_digits() -> tuple:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    xtr, xte, ytr, yte = train_test_split(x, d.target, test_size=0.25, random_state=0, stratify=d.target)
    return xtr, ytr, xte, yte


def _load_cifar(name: str, root: str | None, download: bool) -> tuple:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    target = root or "data"
    try:
        tr = cls(target, train=True, download=download)
        te = cls(target, train=False, download=download)
    except RuntimeError:
        raise DDKitError(f"dataset: {name} not found under {target!r} (torchvision layout "
                         f"{cls.base_folder!r}); set data.root or data.download=true, got root={root!r}") from None
    except Exception as e:  # noqa: BLE001 -- network errors come in many types
        raise DDKitError(f"dataset: {name} download failed ({type(e).__name__}), got root={root!r}") from None
    return tr.data, np.array(tr.targets), te.data, np.array(te.targets), tuple(tr.classes)


def _to_float(x: np.ndarray) -> torch.Tensor:
    # One copy, straight to float32: the source may be a read-only memory map.
    t = torch.from_numpy(np.array(x, dtype=np.float32)).div_(255.0)
    return t.unsqueeze(1) if t.dim() == 3 else t.permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------------------------------------- folder datasets


def prepare_tiny_imagenet_val(root: Path) -> Path:
    """Re-arrange the stock Tiny-ImageNet ``val/`` (flat images + val_annotations.txt) into class folders, once.

    The result is ``val_by_class/<wnid>/<file>.JPEG`` (hard links or copies); returns that folder.
    """
    out = root / "val_by_class"
    if out.is_dir():
        return out
    ann = root / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise DDKitError(f"root: Tiny-ImageNet val annotations not found, got {str(ann)!r}")
    tmp = root / ".val_by_class.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for line in ann.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) < 2:
            continue
        src = root / "val" / "images" / parts[0]
        dst = tmp / parts[1] / parts[0]
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
    os.replace(tmp, out)
    return out


def _image_folder(path: Path, transform: Callable, field: str):
    from torchvision.datasets import ImageFolder

    if not path.is_dir():
        raise DDKitError(f"{field}: image folder not found, got {str(path)!r}")
    return ImageFolder(str(path), transform=transform)


# ---------------------------------------------------------------------------------------------- datamodule


class RealDataModule(L.LightningDataModule):
    """A real labelled image dataset with a train / (optional) val / test split.

    Args:
        dataset: ``digits`` (scikit-learn, embedded), ``fashion_mnist``, ``mnist``, ``cifar10``, ``cifar100``,
            ``tiny_imagenet`` (folder with ``train/`` and the stock ``val/``), ``imagenet`` (folder with ``train/``
            and ``val/`` in class sub-folders).
        root: where the files are. Fashion-MNIST also looks in /usr/share/datasets/fashion-mnist.
        download: allow torchvision to download the dataset when it is not found.
        batch_size: batch size of every loader (per process under DDP).
        num_workers: data-loader workers.
        val_split: fraction (0-1) or count (> 1) of training images held out as a validation split (stratified,
            seeded). With 0, validation uses the test split (for monitoring only; nothing is selected on it).
        split_seed: seed of the validation split and of ``train_subset``.
        train_subset: keep only this many training images (stratified), e.g. for quick runs.
        zca: ZCA-whiten inputs (kornia, eps ``zca_eps``, fitted on the whole training set) instead of mean/std
            normalization; in-memory datasets only.
        zca_eps: ZCA regularization.
        image_size: resize in-memory images to this size (bilinear); folder datasets are cropped to it.
        shuffle_seed: seed of the training order: epoch ``e`` visits the training set in the permutation drawn with
            seed ``shuffle_seed + e`` (Lightning calls ``set_epoch``), so a fit resumed from ``--ckpt_path last``
            sees the same order as an uninterrupted one. None: torch's global RNG (``shuffle=True``).
    """

    def __init__(
        self,
        dataset: str = "digits",
        root: str | None = None,
        download: bool = False,
        batch_size: int = 256,
        num_workers: int = 0,
        val_split: float = 0.0,
        split_seed: int = 0,
        train_subset: int | None = None,
        zca: bool = False,
        zca_eps: float = 0.1,
        image_size: int | None = None,
        shuffle_seed: int | None = None,
    ) -> None:
        super().__init__()
        self.info = dataset_info(dataset)
        if batch_size <= 0:
            raise DDKitError(f"batch_size: must be > 0, got {batch_size!r}")
        if num_workers < 0:
            raise DDKitError(f"num_workers: must be >= 0, got {num_workers!r}")
        if val_split < 0:
            raise DDKitError(f"val_split: must be >= 0, got {val_split!r}")
        if train_subset is not None and train_subset <= 0:
            raise DDKitError(f"train_subset: must be > 0, got {train_subset!r}")
        if image_size is not None and image_size <= 0:
            raise DDKitError(f"image_size: must be > 0, got {image_size!r}")
        if zca and not self.info.in_memory:
            raise DDKitError(f"zca: only supported for in-memory datasets, got dataset={dataset!r}")
        self.dataset = dataset
        self.root = root
        self.download = download
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_split = val_split
        self.split_seed = split_seed
        self.train_subset = train_subset
        self.use_zca = zca
        self.zca_eps = zca_eps
        self.image_size = image_size or self.info.image_size
        self.shuffle_seed = shuffle_seed
        self.zca = None
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    @property
    def spec(self) -> DataSpec:
        c = self.info.in_chans
        return DataSpec(
            dataset=self.dataset,
            num_classes=self.info.num_classes,
            in_chans=c,
            image_size=self.image_size,
            mean=(0.0,) * c if self.use_zca else self.info.mean,
            std=(1.0,) * c if self.use_zca else self.info.std,
            zca=self.use_zca,
            class_names=self.info.class_names or tuple(str(i) for i in range(self.info.num_classes)),
        )

    # -- loading ---------------------------------------------------------------------------------------------

    def _raw(self) -> tuple:
        if self.dataset == "digits":
            return _load_digits()
        if self.dataset in ("fashion_mnist", "mnist"):
            return _load_mnist_like(self.dataset, self.root, self.download)
        return _load_cifar(self.dataset, self.root, self.download)[:4]

    def _preprocess(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.image_size:
            x = torch.nn.functional.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False)
        if self.use_zca:
            return x
        mean = torch.tensor(self.info.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.info.std).view(1, -1, 1, 1)
        return (x - mean) / std

    def load_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Whole train and test splits as preprocessed tensors (in-memory datasets only)."""
        if not self.info.in_memory:
            raise DDKitError(f"dataset: {self.dataset} is a folder dataset, not held in memory, got {self.dataset!r}")
        xtr, ytr, xte, yte = self._raw()
        xtr, xte = self._preprocess(_to_float(xtr)), self._preprocess(_to_float(xte))
        # np.array copies (see _to_float).
        ytr, yte = (torch.from_numpy(np.array(y, dtype=np.int64)) for y in (ytr, yte))
        if self.use_zca:
            from ddkit.ops.zca import apply_zca, fit_zca

            if self.zca is None:  # a stored transform (e.g. a DistilledSet's) takes precedence over refitting
                self.zca = fit_zca(xtr, eps=self.zca_eps)
            xtr, xte = apply_zca(xtr, self.zca), apply_zca(xte, self.zca)
        return xtr, ytr, xte, yte

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if not self.info.in_memory:
            self._setup_folders()
            return
        xtr, ytr, xte, yte = self.load_tensors()
        train = TensorDataset(xtr, ytr)
        idx = torch.arange(len(ytr))
        if self.train_subset is not None:
            idx = stratified_subset(ytr, self.train_subset, self.split_seed)
        n_val = self._num_val(len(idx))
        keep = torch.ones(len(idx), dtype=torch.bool)
        if n_val:
            val_local = stratified_subset(ytr[idx], n_val, self.split_seed + 1)
            keep[val_local] = False
            self.val_set = Subset(train, idx[val_local].tolist())
        train_idx = idx[keep]
        self.train_set = train if len(train_idx) == len(ytr) else Subset(train, train_idx.tolist())
        self.test_set = TensorDataset(xte, yte)

    def _num_val(self, n: int) -> int:
        if self.val_split == 0:
            return 0
        k = round(self.val_split * n) if self.val_split < 1 else int(self.val_split)
        if not 0 < k < n:
            raise DDKitError(f"val_split: leaves no training or no validation images, got {self.val_split!r}")
        return k

    def _setup_folders(self) -> None:
        from torchvision import transforms as T

        if self.root is None:
            raise DDKitError(f"root: {self.dataset} needs a folder with train/ and val/, got None")
        root = Path(self.root)
        norm = T.Normalize(self.info.mean, self.info.std)
        size = self.image_size
        train_tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
        if self.dataset == "tiny_imagenet":
            test_tf = T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(), norm])
            val_dir = prepare_tiny_imagenet_val(root) if (root / "val").is_dir() else root / "val_by_class"
        else:
            test_tf = T.Compose([T.Resize(int(size * 256 / 224)), T.CenterCrop(size), T.ToTensor(), norm])
            val_dir = root / "val"
        self.train_set = _image_folder(root / "train", train_tf, "root")
        self.test_set = _image_folder(val_dir, test_tf, "root")
        if len(self.train_set.classes) != self.info.num_classes:
            raise DDKitError(f"root: {self.dataset} must have {self.info.num_classes} class folders, "
                             f"got {len(self.train_set.classes)} in {str(root / 'train')!r}")

    # -- loaders ---------------------------------------------------------------------------------------------

    def _loader(self, ds: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(ds, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, drop_last=False)

    def train_dataloader(self) -> DataLoader:
        if self.shuffle_seed is None:
            return self._loader(self.train_set, shuffle=True)
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=EpochShuffle(len(self.train_set),
                          self.shuffle_seed), num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set if self.val_set is not None else self.test_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)


class EpochShuffle(Sampler[int]):
    """A permutation of ``range(n)`` drawn with seed ``seed + epoch``; Lightning calls ``set_epoch`` every epoch."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def stratified_subset(labels: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Indices of ``k`` items with classes as balanced as possible, drawn with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    classes = torch.unique(labels)
    per_class = [torch.nonzero(labels == c).flatten() for c in classes]
    per_class = [p[torch.randperm(len(p), generator=g)] for p in per_class]
    base, extra = divmod(k, len(classes))
    chosen = [p[: base + (1 if i < extra else 0)] for i, p in enumerate(per_class)]
    return torch.sort(torch.cat(chosen)).values


def random_real_subset(labels: torch.Tensor, ipc: int, seed: int) -> torch.Tensor:
    """Indices of exactly ``ipc`` random images of every class (the random-subset baseline)."""
    if ipc <= 0:
        raise DDKitError(f"ipc: must be > 0, got {ipc!r}")
    g = torch.Generator().manual_seed(seed)
    out = []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        if len(idx) < ipc:
            raise DDKitError(f"ipc: class {c} has only {len(idx)} images, got {ipc!r}")
        out.append(idx[torch.randperm(len(idx), generator=g)[:ipc]])
    return torch.cat(out)
