import json
import os

import pytest
import torch

from ddkit.datamodules.spec import DataSpec
from ddkit.errors import DDKitError
from ddkit.formats.distilled import DistilledSet, load_distilled, save_distilled

SPEC = DataSpec("digits", 3, 1, 8, (0.5,), (0.25,), False, ("a", "b", "c"))


def make_set(ipc=2, logits=True) -> DistilledSet:
    g = torch.Generator().manual_seed(0)
    n = 3 * ipc
    return DistilledSet(
        images=torch.randn(n, 1, 8, 8, generator=g),
        labels=torch.arange(3).repeat_interleave(ipc),
        spec=SPEC,
        ipc=ipc,
        method="test",
        label_logits=torch.randn(n, 3, generator=g) if logits else None,
        step_size=0.02 if logits else None,
        config={"lr": 1.0},
    )


def test_round_trip_is_exact_and_writes_the_image_folder(tmp_path):
    ds = make_set()
    save_distilled(ds, tmp_path / "set", export="png")
    back = load_distilled(tmp_path / "set")
    assert torch.equal(back.images, ds.images) and torch.equal(back.labels, ds.labels)
    assert torch.equal(back.label_logits, ds.label_logits)
    assert back.step_size == pytest.approx(0.02) and back.spec == SPEC and back.config == {"lr": 1.0}
    files = sorted(p.relative_to(tmp_path / "set/images").as_posix() for p in (tmp_path / "set/images").rglob("*.png"))
    assert files == [f"new{c:03d}/class{c:03d}_id{i:03d}.png" for c in range(3) for i in range(2)]
    meta = json.loads((tmp_path / "set/meta.json").read_text())
    assert meta["format"] == "ddkit.distilled" and set(meta["files"]) == {"images.safetensors", "labels.safetensors"}


def test_png_export_truncates_like_the_reference(tmp_path):
    from PIL import Image

    ds = make_set(ipc=1, logits=False)
    ds.images[0] = (0.999 - 0.5) / 0.25  # pixel 0.999 -> 254.745 -> truncated to 254
    save_distilled(ds, tmp_path / "s", export="png")
    img = Image.open(tmp_path / "s/images/new000/class000_id000.png")
    assert set(img.getdata()) == {254}


def test_overwrite_replaces_and_leaves_no_temporary_files(tmp_path):
    save_distilled(make_set(ipc=1), tmp_path / "set")
    save_distilled(make_set(ipc=2), tmp_path / "set")
    assert load_distilled(tmp_path / "set").ipc == 2
    assert sorted(os.listdir(tmp_path)) == ["set"]


def test_checksum_mismatch_is_reported(tmp_path):
    save_distilled(make_set(), tmp_path / "set")
    data = bytearray((tmp_path / "set/images.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "set/images.safetensors").write_bytes(bytes(data))
    with pytest.raises(DDKitError, match="images.safetensors: sha256 checksum mismatch"):
        load_distilled(tmp_path / "set")


def test_truncated_tensor_file_is_reported(tmp_path):
    save_distilled(make_set(), tmp_path / "set")
    path = tmp_path / "set/labels.safetensors"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(DDKitError, match="labels: not a valid safetensors file"):
        load_distilled(tmp_path / "set", verify_checksums=False)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: setattr(d, "images", d.images[:, :, :4]), r"images: shape must be \[N, 1, 8, 8\]"),
        (lambda d: setattr(d, "images", d.images.double()), "images: dtype must be float32"),
        (lambda d: d.images.view(-1).__setitem__(0, float("nan")), "images: contains 1 non-finite"),
        (lambda d: d.label_logits.view(-1).__setitem__(3, float("inf")), "label_logits: contains 1 non-finite"),
        (lambda d: d.labels.__setitem__(0, 7), r"labels: must lie in \[0, 3\)"),
        (lambda d: d.labels.__setitem__(0, 1), "every class must have ipc=2"),
        (lambda d: setattr(d, "ipc", 0), "ipc: must be > 0, got 0"),
        (lambda d: setattr(d, "step_size", -0.1), "step_size: must be a finite positive number, got -0.1"),
    ],
)
def test_validation_errors_name_the_field(tmp_path, mutate, message):
    ds = make_set()
    mutate(ds)
    with pytest.raises(DDKitError, match=message):
        save_distilled(ds, tmp_path / "set")
    assert not (tmp_path / "set").exists()


def test_missing_directory_and_bad_meta(tmp_path):
    with pytest.raises(DDKitError, match="distilled: directory not found"):
        load_distilled(tmp_path / "nope")
    save_distilled(make_set(), tmp_path / "set")
    (tmp_path / "set/meta.json").write_text("{not json")
    with pytest.raises(DDKitError, match="distilled.meta: not valid JSON"):
        load_distilled(tmp_path / "set")
