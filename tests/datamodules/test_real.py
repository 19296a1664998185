import pytest
import torch

from ddkit.datamodules.real import RealDataModule, random_real_subset
from ddkit.errors import DDKitError


def test_digits_splits_and_normalization():
    dm = RealDataModule("digits", val_split=0.1, batch_size=32)
    dm.setup("fit")
    n_train, n_val, n_test = len(dm.train_set), len(dm.val_set), len(dm.test_set)
    assert n_train + n_val == 1347 and n_test == 450 and n_val == 135
    x = torch.stack([dm.train_set[i][0] for i in range(n_train)])
    assert x.shape[1:] == (1, 8, 8)
    assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1) < 0.05  # normalized with the stored constants
    assert dm.spec.num_classes == 10 and dm.spec.image_size == 8


def test_random_subset_takes_exactly_ipc_per_class():
    labels = torch.arange(5).repeat(4)
    idx = random_real_subset(labels, 3, seed=0)
    assert torch.bincount(labels[idx]).tolist() == [3] * 5
    assert not torch.equal(idx, random_real_subset(labels, 3, seed=1))
    with pytest.raises(DDKitError, match="ipc: class 0 has only 4 images, got 5"):
        random_real_subset(labels, 5, seed=0)


def test_missing_dataset_files_say_where_they_looked(tmp_path):
    dm = RealDataModule("mnist", root=str(tmp_path))
    with pytest.raises(DDKitError, match="dataset: mnist IDX files not found in .*set data.root"):
        dm.setup("fit")


def test_idx_reader_on_files_built_here(tmp_path):
    import gzip
    import struct

    import numpy as np

    def write(name, arr, type_code=0x08):
        header = struct.pack(">HBB", 0, type_code, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
        with gzip.open(tmp_path / f"{name}.gz", "wb") as f:
            f.write(header + arr.astype(np.uint8).tobytes())

    rng = np.random.default_rng(0)
    write("train-images-idx3-ubyte", rng.integers(0, 255, (20, 28, 28)))
    write("train-labels-idx1-ubyte", np.arange(20) % 10)
    write("t10k-images-idx3-ubyte", rng.integers(0, 255, (10, 28, 28)))
    write("t10k-labels-idx1-ubyte", np.arange(10))
    dm = RealDataModule("mnist", root=str(tmp_path))
    dm.setup("fit")
    assert len(dm.train_set) == 20 and dm.test_set[3][1] == 3 and dm.train_set[0][0].shape == (1, 28, 28)

    # A file of another element type (0x0D: float32) is refused, not read as bytes.
    write("t10k-labels-idx1-ubyte", np.arange(10), type_code=0x0D)
    with pytest.raises(DDKitError, match=r"^root: cannot read IDX file \(element type 0x0d, expected 0x08"):
        RealDataModule("mnist", root=str(tmp_path)).setup("fit")


def test_zca_whitening_is_fitted_on_train_and_applied_to_test():
    dm = RealDataModule("digits", zca=True)
    dm.setup("fit")
    assert dm.zca is not None and dm.spec.zca and dm.spec.mean == (0.0,)
    x = dm.train_set.tensors[0].flatten(1)
    assert abs(float(x.mean())) < 1e-3  # whitening centers the data


def test_tiny_imagenet_val_is_rearranged_into_class_folders(tmp_path):
    from PIL import Image

    from ddkit.datamodules.real import prepare_tiny_imagenet_val

    (tmp_path / "val/images").mkdir(parents=True)
    lines = []
    for i, wnid in enumerate(["n01", "n02", "n01"]):
        Image.new("RGB", (64, 64)).save(tmp_path / f"val/images/val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
    (tmp_path / "val/val_annotations.txt").write_text("\n".join(lines))
    out = prepare_tiny_imagenet_val(tmp_path)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.JPEG")) == [
        "n01/val_0.JPEG", "n01/val_2.JPEG", "n02/val_1.JPEG"]
    assert prepare_tiny_imagenet_val(tmp_path) == out  # done once


@pytest.mark.parametrize("kwargs, message", [
    ({"dataset": "svhn"}, "dataset: unknown name"),
    ({"batch_size": 0}, "batch_size: must be > 0, got 0"),
    ({"val_split": -1}, "val_split: must be >= 0"),
])
def test_bad_options(kwargs, message):
    with pytest.raises(DDKitError, match=message):
        RealDataModule(**kwargs)
