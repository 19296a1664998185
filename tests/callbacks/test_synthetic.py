"""PeriodicEvaluation: validation-split scoring during matching, the best set, image grids in TensorBoard."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from ddkit.callbacks.synthetic import PeriodicEvaluation, image_grid
from ddkit.datamodules.experts import ExpertSegments
from ddkit.datamodules.spec import DataSpec
from ddkit.errors import DDKitError
from ddkit.formats.distilled import DistilledSet, load_distilled, to_pixels
from ddkit.modules.matching import TrajectoryMatching
from tests.modules.test_matching import SMALL, make_buffer


@pytest.fixture(scope="module")
def buffer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("buffers") / "digits"
    make_buffer(path, experts=2, epochs=3)
    return path


def fit(buffer_dir: Path, tmp: Path, callback: PeriodicEvaluation, steps: int, val_split: float = 0.2,
        **kwargs) -> tuple[TrajectoryMatching, L.Trainer, ExpertSegments]:
    data = ExpertSegments(str(buffer_dir), val_split=val_split)
    m = TrajectoryMatching(data.spec, **{**SMALL, "max_start_epoch": 2, "current_max_start_epoch": 1,
                                         "output": str(tmp / "out"), "seed": 0, **kwargs})
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=TensorBoardLogger(str(tmp / "tb"), name="run"),
                        callbacks=[callback], enable_checkpointing=False, enable_progress_bar=False, log_every_n_steps=1,
                        enable_model_summary=False)
    trainer.fit(m, datamodule=data)
    return m, trainer, data


def test_evaluates_on_the_validation_split_and_keeps_the_best_set(buffer_dir, tmp_path):
    callback = PeriodicEvaluation(eval_every=2, epochs=3)
    seen = {}
    original = callback.score

    def spy(ds, data, net, net_kwargs, device):
        seen.setdefault("sizes", []).append(len(data.val_set))
        data.test_set = None  # scoring must not touch the test split
        return original(ds, data, net, net_kwargs, device)

    callback.score = spy
    _, _, data = fit(buffer_dir, tmp_path, callback, steps=5)
    assert [it for it, _ in callback.history] == [2, 4, 5]  # every 2 iterations, and the final set
    assert seen["sizes"] == [len(data.val_set)] * 3 and len(data.val_set) == round(0.2 * 1347)
    best_it, best_acc = max(callback.history, key=lambda h: h[1])
    assert callback.best_iteration == best_it and callback.best_acc == best_acc
    best = load_distilled(tmp_path / "out" / "best")
    assert best.extra["iteration"] == best_it and best.extra["val_acc"] == pytest.approx(best_acc)
    assert best.label_logits is not None and best.step_size > 0
    assert 0.0 <= best_acc <= 1.0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((tmp_path / "tb").rglob("events.out.tfevents*")).parent))
    events.Reload()
    assert "matching/set" in events.Tags()["images"]
    assert [e.step for e in events.Scalars("val/acc")] == [2, 4, 5]
    assert {"matching/loss", "matching/step_size", "matching/start_epoch_upper_bound",
            "matching/threshold_skips"} <= set(events.Tags()["scalars"])


def test_at_start_evaluates_the_initial_set_and_snapshots_keep_every_evaluated_set(buffer_dir, tmp_path):
    callback = PeriodicEvaluation(eval_every=2, epochs=2, at_start=True, snapshots=True)
    m, _, _ = fit(buffer_dir, tmp_path, callback, steps=3)
    assert [it for it, _ in callback.history] == [0, 2, 3]
    snapshots = sorted(p.name for p in (tmp_path / "out" / "snapshots").iterdir())
    assert snapshots == ["iter_000000", "iter_000002", "iter_000003"]
    initial = load_distilled(tmp_path / "out" / "snapshots" / "iter_000000")
    final = load_distilled(tmp_path / "out" / "snapshots" / "iter_000003")
    assert initial.extra["iteration"] == 0 and final.extra["iteration"] == 3
    assert not torch.equal(initial.images, final.images)  # the initial set, before any update
    torch.testing.assert_close(final.images, m.images.detach().float().cpu())


def test_needs_a_validation_split(buffer_dir, tmp_path):
    with pytest.raises(DDKitError, match="data.val_split: PeriodicEvaluation scores sets on a validation split"):
        fit(buffer_dir, tmp_path, PeriodicEvaluation(eval_every=1, epochs=1), steps=1, val_split=0)


def test_mtt_sets_use_the_hard_protocol(buffer_dir, tmp_path):
    callback = PeriodicEvaluation(eval_every=0, epochs=2)
    protocols = []
    from ddkit.evaluation import evaluator

    original = evaluator.train_and_test

    def spy(ds, protocol, *args, **kwargs):
        protocols.append(protocol.name)
        return original(ds, protocol, *args, **kwargs)

    evaluator.train_and_test = spy
    try:
        fit(buffer_dir, tmp_path, callback, steps=1, mode="mtt", pix_init="real")
    finally:
        evaluator.train_and_test = original
    assert protocols == ["hard"] and [it for it, _ in callback.history] == [1]


def test_image_grid_undoes_normalisation():
    spec = DataSpec("digits", 3, 1, 4, (0.5,), (0.25,))
    images = torch.randn(6, 1, 4, 4)
    ds = DistilledSet(images=images, labels=torch.tensor([0, 0, 1, 1, 2, 2]), spec=spec, ipc=2, method="mtt")
    grid = image_grid(ds)
    # one row per class, ipc columns, 4-px images enlarged 8x to 32 px, 1-px padding
    assert grid.shape == (3, 3 * 33 + 1, 2 * 33 + 1)
    pixels = to_pixels(images, spec).repeat_interleave(8, 2).repeat_interleave(8, 3)
    torch.testing.assert_close(grid[0, 1:33, 1:33], pixels[0, 0])  # class 0, first image
    torch.testing.assert_close(grid[0, 67:99, 34:66], pixels[5, 0])  # class 2, second image


def test_image_grid_of_many_classes_stays_about_square_and_shows_every_class():
    spec = DataSpec("many", 100, 1, 32, (0.0,), (1.0,))
    labels = torch.arange(100).repeat_interleave(10)
    images = labels.float().view(-1, 1, 1, 1).expand(-1, 1, 32, 32) / 100  # each class its own grey level
    grid = image_grid(DistilledSet(images=images.contiguous(), labels=labels, spec=spec, ipc=10, method="t"))
    assert grid.shape == (3, 34 * 33 + 1, 30 * 33 + 1)  # 3 classes of 10 images per row, 34 rows
    levels = {round(float(grid[0, 1 + 33 * r, 1 + 33 * c]) * 100) for r in range(34) for c in range(0, 30, 10)
              if 3 * r + c // 10 < 100}
    assert levels == set(range(100))


def test_bad_options():
    with pytest.raises(DDKitError, match="eval_every: must be >= 0, got -1"):
        PeriodicEvaluation(eval_every=-1)
    with pytest.raises(DDKitError, match="protocol: must be soft, hard or null, got 'kd'"):
        PeriodicEvaluation(protocol="kd")
    with pytest.raises(DDKitError, match="epochs: must be > 0"):
        PeriodicEvaluation(epochs=0)
