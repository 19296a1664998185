"""DistilledSet image storage (float32 / float16 / uint8 pixels) and the lazy readers."""

import json
import os
import pickle

import pytest
import torch

from ddkit.datamodules.spec import DataSpec
from ddkit.errors import DDKitError
from ddkit.formats.distilled import DistilledSet, load_distilled, save_distilled
from ddkit.formats.images import FolderImages, LazyImages

SPEC = DataSpec("cifar10", 3, 3, 8, (0.5, 0.4, 0.3), (0.25, 0.2, 0.3), False, ("a", "b", "c"))


def make_set(ipc: int = 4) -> DistilledSet:
    g = torch.Generator().manual_seed(0)
    return DistilledSet(images=torch.randn(3 * ipc, 3, 8, 8, generator=g), labels=torch.arange(3).repeat_interleave(ipc),
                        spec=SPEC, ipc=ipc, method="test")


def pixels(images: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(SPEC.mean).view(1, 3, 1, 1), torch.tensor(SPEC.std).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0, 1)


@pytest.mark.parametrize("storage, itemsize", [("float32", 4), ("float16", 2), ("uint8", 1)])
def test_each_storage_round_trips_to_its_rounding(tmp_path, storage, itemsize):
    ds = make_set()
    save_distilled(ds, tmp_path / "s", image_storage=storage)
    meta = json.loads((tmp_path / "s/meta.json").read_text())
    assert meta["image_storage"] == storage
    size = (tmp_path / "s/images.safetensors").stat().st_size
    assert ds.images.numel() * itemsize <= size < ds.images.numel() * itemsize + 200  # + the safetensors header
    back = load_distilled(tmp_path / "s").images
    assert back.dtype == torch.float32
    if storage == "float32":
        assert torch.equal(back, ds.images)
    elif storage == "float16":
        assert torch.equal(back, ds.images.half().float())
    else:  # pixels round(255 * p), p = clamp(x * std + mean, 0, 1); read back (q / 255 - mean) / std
        q = torch.round(pixels(ds.images) * 255)
        assert torch.allclose(pixels(back) * 255, q, atol=1e-4)
        assert (pixels(back) - pixels(ds.images)).abs().max() <= 0.5 / 255 + 1e-6
        save_distilled(DistilledSet(images=back, labels=ds.labels, spec=SPEC, ipc=4, method="t"), tmp_path / "again",
                       image_storage="uint8")  # stored pixels are a fixed point
        assert (tmp_path / "again/images.safetensors").read_bytes() == (tmp_path / "s/images.safetensors").read_bytes()


def test_a_set_written_before_image_storage_existed_loads_as_float32(tmp_path):
    ds = make_set()
    save_distilled(ds, tmp_path / "s")
    meta = json.loads((tmp_path / "s/meta.json").read_text())
    del meta["image_storage"]
    (tmp_path / "s/meta.json").write_text(json.dumps(meta))
    assert torch.equal(load_distilled(tmp_path / "s").images, ds.images)
    assert torch.equal(load_distilled(tmp_path / "s", lazy=True).images[:], ds.images)


def test_storage_mismatch_zca_and_unknown_storage_are_one_line_errors(tmp_path):
    ds = make_set()
    save_distilled(ds, tmp_path / "s")
    meta = json.loads((tmp_path / "s/meta.json").read_text())
    (tmp_path / "s/meta.json").write_text(json.dumps({**meta, "image_storage": "uint8"}))
    for lazy in (False, True):
        with pytest.raises(DDKitError, match=r"^distilled.images: meta.json says image_storage uint8, the file holds "
                                             r"float32, got '.*images.safetensors'$"):
            load_distilled(tmp_path / "s", lazy=lazy)
    with pytest.raises(DDKitError, match=r"^image_storage: must be one of float32, float16, uint8, got 'int4'$"):
        save_distilled(ds, tmp_path / "t", image_storage="int4")
    zca = DistilledSet(images=ds.images, labels=ds.labels, spec=DataSpec("cifar10", 3, 3, 8, (0.0,) * 3, (1.0,) * 3,
                                                                         True, ("a", "b", "c")), ipc=4, method="t")
    with pytest.raises(DDKitError, match=r"^image_storage: uint8 pixels need mean/std-normalized images"):
        save_distilled(zca, tmp_path / "t", image_storage="uint8")
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("storage", ["float32", "uint8"])
def test_lazy_images_read_only_the_requested_samples(tmp_path, monkeypatch, storage):
    ds = make_set()
    save_distilled(ds, tmp_path / "s", image_storage=storage)
    eager = load_distilled(tmp_path / "s").images
    lazy = load_distilled(tmp_path / "s", lazy=True).images
    assert isinstance(lazy, LazyImages) and lazy.shape == eager.shape and len(lazy) == 12
    reads = []
    real_pread = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, offset: reads.append(n) or real_pread(fd, n, offset))
    index = torch.tensor([7, 2, 3, 4, 11])
    assert torch.equal(lazy[index], eager[index]) and torch.equal(lazy[5], eager[5])
    sample = 3 * 8 * 8 * (4 if storage == "float32" else 1)
    assert reads == [sample, 3 * sample, sample, sample]  # runs of consecutive indices are one read each
    clone = pickle.loads(pickle.dumps(lazy))  # what a DataLoader worker gets: a path and offsets, no pixels
    assert len(pickle.dumps(lazy)) < 2000 and torch.equal(clone[index], eager[index])
    assert torch.equal(torch.cat(list(lazy.chunks(5))), eager)


def test_lazy_fingerprint_equals_the_in_memory_one(tmp_path):
    from ddkit.formats.soft_labels import images_fingerprint

    save_distilled(make_set(), tmp_path / "s", image_storage="float16")
    eager, lazy = load_distilled(tmp_path / "s").images, load_distilled(tmp_path / "s", lazy=True).images
    assert images_fingerprint(lazy) == images_fingerprint(eager)


def test_recover_image_folder_is_a_lazy_set(tmp_path):
    ds = make_set()
    save_distilled(ds, tmp_path / "s", export="png")
    with pytest.raises(DDKitError, match=r"^distilled.meta: file not found"):
        load_distilled(tmp_path / "s/images")  # without a spec, a folder is not a set
    folder = load_distilled(tmp_path / "s/images", folder_spec=SPEC)
    assert isinstance(folder.images, FolderImages) and folder.method == "image_folder" and folder.ipc == 4
    assert torch.equal(folder.labels, ds.labels)
    truncated = torch.floor(pixels(ds.images) * 255)  # recover's export truncates, like the reference
    assert torch.allclose(pixels(folder.images[:]) * 255, truncated, atol=1e-4)
    (tmp_path / "s/images/new001/class001_id000.png").unlink()
    with pytest.raises(DDKitError, match=r"every class must have ipc=4 images, got counts \[4, 3, 4\]"):
        load_distilled(tmp_path / "s/images", folder_spec=SPEC)


def test_kd_batches_from_a_lazy_set_equal_the_in_memory_ones(tmp_path):
    from ddkit.modules.kd import KDViewDataset, ViewPlan

    save_distilled(make_set(), tmp_path / "s", image_storage="uint8")
    eager, lazy = load_distilled(tmp_path / "s"), load_distilled(tmp_path / "s", lazy=True)
    plan = ViewPlan(augment="crop_flip", view_size=8, padding=2, mix="cutmix")
    a = KDViewDataset(eager.images, eager.labels, plan, batch_size=5, seed=3)
    b = KDViewDataset(lazy.images, lazy.labels, plan, batch_size=5, seed=3)
    for key in [(0, 0), (1, 2)]:
        assert torch.equal(a[key]["x"], b[key]["x"]) and torch.equal(a[key]["y"], b[key]["y"])


@pytest.mark.parametrize("storage", ["float32", "float16", "uint8"])
def test_a_lazy_set_is_saved_chunk_by_chunk_to_the_same_tensors(tmp_path, storage):
    from safetensors.torch import load_file

    ds = make_set(ipc=100)  # 300 images: more than one 256-image chunk
    save_distilled(ds, tmp_path / "src")
    lazy = load_distilled(tmp_path / "src", lazy=True)
    save_distilled(lazy, tmp_path / "streamed", image_storage=storage, export="png")
    save_distilled(ds, tmp_path / "direct", image_storage=storage)
    a = load_file(str(tmp_path / "streamed/images.safetensors"))["images"]
    b = load_file(str(tmp_path / "direct/images.safetensors"))["images"]
    assert a.dtype == b.dtype and torch.equal(a, b)
    assert json.loads((tmp_path / "streamed/meta.json").read_text())["image_storage"] == storage
    assert len(list((tmp_path / "streamed/images").rglob("*.png"))) == 300
    assert torch.equal(load_distilled(tmp_path / "streamed", lazy=True).images[[0, 299]],
                       load_distilled(tmp_path / "direct").images[[0, 299]])
