"""DD-Ranking export: class-major tensors that load back identical."""

import json

import pytest
import torch

from ddkit.datamodules.spec import DataSpec
from ddkit.errors import DDKitError
from ddkit.formats.ddranking import export_ddranking, load_ddranking_export
from ddkit.formats.distilled import DistilledSet, save_distilled

SPEC = DataSpec("digits", 3, 1, 8, (0.5,), (0.25,), False, ("a", "b", "c"))


def test_export_is_class_major_and_loads_back_identical(tmp_path, capsys):
    from ddkit.cli import main

    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([2, 0, 1, 0, 2, 1])  # interleaved: the export sorts by class, stably
    ds = DistilledSet(torch.randn(6, 1, 8, 8, generator=g), labels, SPEC, 2, "datm",
                      label_logits=torch.randn(6, 3, generator=g), step_size=0.0125)
    save_distilled(ds, tmp_path / "set")
    main(["export", "ddranking", str(tmp_path / "set"), "--output", str(tmp_path / "out")])
    assert "wrote" in capsys.readouterr().out
    got = load_ddranking_export(tmp_path / "out")
    order = [1, 3, 2, 5, 0, 4]
    assert torch.equal(got["hard_labels.pt"], torch.tensor([0, 0, 1, 1, 2, 2]))
    assert torch.equal(got["images.pt"], ds.images[order]) and torch.equal(got["soft_labels.pt"], ds.label_logits[order])
    assert got["syn_lr.pt"].item() == pytest.approx(0.0125) and got["syn_lr.pt"].dim() == 0
    meta = json.loads((tmp_path / "out/meta.json").read_text())
    assert meta["files"] == ["hard_labels.pt", "images.pt", "soft_labels.pt", "syn_lr.pt"] and meta["ipc"] == 2


def test_hard_label_set_exports_without_soft_labels_and_bad_exports_are_refused(tmp_path):
    ds = DistilledSet(torch.zeros(3, 1, 8, 8), torch.arange(3), SPEC, 1, "random")
    export_ddranking(ds, tmp_path / "out")
    assert sorted(load_ddranking_export(tmp_path / "out")) == ["hard_labels.pt", "images.pt"]
    torch.save({"not": "a tensor"}, tmp_path / "out/images.pt")
    with pytest.raises(DDKitError, match=r"^ddranking.images.pt: must hold one tensor, got dict$"):
        load_ddranking_export(tmp_path / "out")


def test_unknown_export_format_is_one_line(tmp_path, capsys):
    from ddkit.cli import main

    with pytest.raises(SystemExit) as e:
        main(["export", "tfrecord", str(tmp_path), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err == ["error: format: must be one of ddranking, got 'tfrecord'"]
    assert not (tmp_path / "out").exists()
