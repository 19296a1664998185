"""A scale rehearsal on generated data: an ImageNet-shaped folder dataset (1000 classes, two 18 px training images
and one validation image per class, read at 16 px) goes through recover -> KD relabel -> evaluate, each stage with 2
DDP processes on the CPU, the distilled images stored as uint8 pixels and read lazily."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from tests.conftest import run_ddkit

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
CLASSES, SIZE = 1000, 16
DDP = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
       "--trainer.enable_progress_bar", "false"]


def make_folder(root, seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, per_class in (("train", 2), ("val", 1)):
        for c in range(CLASSES):
            folder = root / split / f"n{c:05d}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (18, 18, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_imagenet_shaped_recover_relabel_evaluate_with_two_processes(tmp_path):
    from ddkit.datamodules.real import RealDataModule
    from ddkit.formats.distilled import load_distilled
    from ddkit.formats.images import LazyImages
    from ddkit.formats.soft_labels import validate_soft_labels
    from ddkit.formats.teacher import TeacherMeta, save_teacher
    from ddkit.nets import build_net

    root, teacher, out = tmp_path / "imagenet", str(tmp_path / "teacher.safetensors"), str(tmp_path / "recover")
    make_folder(root)
    spec = RealDataModule("imagenet", image_size=SIZE).spec
    torch.manual_seed(0)
    save_teacher(teacher, build_net("convnet_bn", CLASSES, 3, SIZE, depth=2, width=8).eval(),
                 TeacherMeta("convnet_bn", {"depth": 2, "width": 8}, spec))

    r = run_ddkit(["fit", "--model", "ddkit.modules.recover.Recover", "--model.init_args.teacher", teacher,
                   "--model.init_args.ipc", "1", "--model.init_args.iterations", "2", "--model.init_args.jitter", "2",
                   "--model.init_args.image_storage", "uint8", "--model.init_args.output", out,
                   "--data", "ddkit.datamodules.recover.RecoverJobs", "--data.init_args.dataset", "imagenet",
                   "--data.init_args.image_size", str(SIZE), "--trainer.max_epochs", "-1", "--trainer.logger", "false",
                   *DDP], cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    meta = json.loads((tmp_path / "recover/meta.json").read_text())
    assert meta["image_storage"] == "uint8" and meta["num_images"] == CLASSES and meta["extra"]["world_size"] == 2
    assert sorted(meta["extra"]["written_by_rank"][0] + meta["extra"]["written_by_rank"][1]) == list(range(10))
    size = (tmp_path / "recover/images.safetensors").stat().st_size
    assert CLASSES * 3 * SIZE * SIZE <= size < CLASSES * 3 * SIZE * SIZE + 200  # one byte per value
    lazy = load_distilled(out, lazy=True)
    assert isinstance(lazy.images, LazyImages) and lazy.images.storage == "uint8"
    assert torch.equal(lazy.labels, torch.arange(CLASSES))

    store = str(tmp_path / "soft_labels")
    r = run_ddkit(["fit", "--model", "ddkit.modules.kd.KDStudent", "--model.init_args.net", "convnet",
                   "--model.init_args.net_kwargs", "{depth: 2, width: 8}", "--model.init_args.teacher", teacher,
                   "--model.init_args.labels", "stored", "--model.init_args.soft_labels", store,
                   "--model.init_args.soft_label_topk", "5",
                   "--data", "ddkit.datamodules.distilled.DistilledDataModule", "--data.init_args.distilled", out,
                   "--data.init_args.dataset", "imagenet", "--data.init_args.root", str(root),
                   "--data.init_args.image_size", str(SIZE), "--data.init_args.lazy", "true",
                   "--data.init_args.batch_size", "100", "--trainer.max_epochs", "2", "--trainer.limit_val_batches",
                   "2", "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir",
                   "logs", *DDP], cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    store_meta = validate_soft_labels(store, deep=True)
    assert store_meta["topk"] == 5 and store_meta["epochs"] == 2 and store_meta["num_images"] == CLASSES
    assert store_meta["bytes"]["logits_saved"] == 2 * CLASSES * (CLASSES * 2 - (5 * 4 + 4))
    with open(next((tmp_path / "logs").rglob("metrics.csv"))) as f:
        losses = [float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]
    assert len(losses) == 2 and all(math.isfinite(v) and v > 0 for v in losses)

    r = run_ddkit(["evaluate", "--data.dataset", "imagenet", "--data.root", str(root), "--data.image_size", str(SIZE),
                   "--distilled", f"[{out}]", "--lazy", "true", "--protocols", "[kd]",
                   "--protocol_options", f"{{kd: {{teacher: {teacher}, batch_size: 100}}}}", "--net", "convnet",
                   "--net_kwargs", "{depth: 2, width: 8}", "--epochs", "1", "--seeds", "1", "--accelerator", "cpu",
                   "--devices", "2", "--progress", "false", "--output", "report"], cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "report/report.json").read_text())
    (result,) = report["results"]
    assert result["ipc"] == 1 and result["protocol"]["name"] == "kd" and 0 <= result["mean"] <= 1
