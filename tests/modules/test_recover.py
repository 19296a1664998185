"""Recover (SRe2L / SC-DD recovery) through the Trainer on CPU: artifacts, losses, clamp, frozen teacher, errors,
bit-exact resume, and a 2-process DDP run against a 1-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image

from ddkit.datamodules.real import RealDataModule
from ddkit.datamodules.recover import JobStep, JobSteps, RecoverJobs, RecoverPlan
from ddkit.datamodules.spec import DataSpec
from ddkit.errors import DDKitError
from ddkit.formats.common import load_tensors, sha256_file
from ddkit.formats.distilled import load_distilled
from ddkit.formats.teacher import TeacherMeta, save_teacher
from ddkit.modules.recover import CKPT_KEY, Recover, job_seed, read_shard
from ddkit.nets import build_net

REPO = Path(__file__).resolve().parents[2]
NET_KWARGS = {"depth": 2, "width": 16}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The CI machine is shared: one intra-op thread is faster and makes timings and results steadier."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def spec() -> DataSpec:
    return RecoverJobs("digits").spec


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory, spec) -> str:
    """A BN ConvNet-D2 (width 16) trained for 150 SGD steps on scikit-learn digits (8x8): ~90% test accuracy."""
    torch.manual_seed(0)
    xtr, ytr, _, _ = RealDataModule("digits").load_tensors()
    net = build_net("convnet_bn", 10, 1, 8, **NET_KWARGS)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        idx = torch.randint(0, len(ytr), (64,), generator=g)
        loss = F.cross_entropy(net(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_teacher(path, net.eval(), TeacherMeta("convnet_bn", NET_KWARGS, spec))
    return str(path)


def _recover(spec, teacher_path, output, cls=Recover, **kw) -> Recover:
    options = {"ipc": 2, "batch_size": 4, "iterations": 5, "lr": 0.1, "r_bn": 0.01, "jitter": 2, "crop": False,
               "flip": False, "seed": 7, "log_images_every_n_steps": 0}
    options.update(kw)
    return cls(spec, teacher=teacher_path, output=str(output), **options)


def _trainer(tmp_path, callbacks=(), **kw) -> L.Trainer:
    options = {"accelerator": "cpu", "devices": 1, "max_epochs": -1, "logger": False, "enable_checkpointing": False,
               "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(tmp_path)}
    if any(isinstance(c, ModelCheckpoint) for c in callbacks):
        options["enable_checkpointing"] = True
    options.update(kw)
    return L.Trainer(callbacks=list(callbacks), **options)


def _fit(module, tmp_path, callbacks=(), ckpt_path=None, **kw) -> L.Trainer:
    trainer = _trainer(tmp_path, callbacks, **kw)
    trainer.fit(module, datamodule=RecoverJobs("digits"), ckpt_path=ckpt_path)
    return trainer


# --- the plan ------------------------------------------------------------------------------------------------


def test_plan_jobs_and_sharding_by_hand() -> None:
    plan = RecoverPlan(num_classes=10, ipc=2, batch_size=4, iterations=3)
    assert (plan.chunk, plan.chunks_per_ipc, plan.num_jobs) == (4, 3, 6)
    assert [tuple(plan.job(j)) for j in range(6)] == [
        (0, 0, 0, 4), (1, 0, 4, 4), (2, 0, 8, 2), (3, 1, 0, 4), (4, 1, 4, 4), (5, 1, 8, 2)]
    assert plan.jobs_of_rank(1, 4) == [1, 5]
    assert plan.steps_per_rank(4) == 2 * 3  # ceil(6 / 4) slots of 3 steps
    assert plan.step(4, rank=1, world_size=4) == JobStep(4, 5, 1, 8, 2, 1)  # slot 1 -> job 1 + 4, t = 1
    assert plan.step(4, rank=2, world_size=4).job == -1  # rank 2 has one job: its second slot is idle
    assert RecoverPlan(10, 1, 100, 1).chunk == 10  # B > C: one chunk of every class


def test_job_steps_start_where_the_module_is() -> None:
    plan = RecoverPlan(num_classes=4, ipc=1, batch_size=2, iterations=3)
    steps = JobSteps(plan, rank=0, world_size=1, start=lambda: 4)
    assert len(steps) == 6
    assert [(s.step, s.job, s.t) for s in steps] == [(4, 1, 1), (5, 1, 2)]
    assert steps.state_dict() == {"next_step": 6}


def test_job_seed_depends_on_every_part() -> None:
    seeds = {job_seed(s, i, c) for s in (0, 1) for i in (0, 1) for c in (0, 4)}
    assert len(seeds) == 8 and all(0 <= s < 2**63 for s in seeds)


# --- a run ---------------------------------------------------------------------------------------------------


def test_writes_distilled_set_and_image_folder(tmp_path, spec, teacher_path) -> None:
    out = tmp_path / "out"
    module = _recover(spec, teacher_path, out, method="scdd")
    trainer = _fit(module, tmp_path)
    assert trainer.global_step == 6 * 5  # 2 ipc x 3 chunks, 5 steps each

    ds = load_distilled(out)
    assert ds.method == "scdd" and ds.ipc == 2 and ds.images.dtype == torch.float32
    assert ds.labels.tolist() == [c for c in range(10) for _ in range(2)]
    assert ds.teacher == {"path": str(Path(teacher_path).resolve()), "sha256": sha256_file(teacher_path)}
    meta = json.loads((out / "meta.json").read_text())
    assert meta["config"]["iterations"] == 5 and meta["config"]["data_spec"]["dataset"] == "digits"
    assert meta["extra"]["written_by_rank"] == [[0, 1, 2, 3, 4, 5]]
    assert not (out.parent / f".{out.name}.work").exists()

    # The SRe2L folder: new{c:03d}/class{c:03d}_id{i:03d}.png holding the truncated 8-bit pixels of image (c, i).
    files = sorted(p.relative_to(out / "images").as_posix() for p in (out / "images").rglob("*.png"))
    assert files == [f"new{c:03d}/class{c:03d}_id{i:03d}.png" for c in range(10) for i in range(2)]
    m, s = spec.mean[0], spec.std[0]
    k = 2 * 7 + 1  # class 7, ipc index 1
    expected = torch.floor((ds.images[k, 0] * s + m).clamp(0, 1) * 255).to(torch.uint8).numpy()
    png = np.asarray(Image.open(out / "images" / "new007" / "class007_id001.png"))
    assert np.array_equal(png, expected)

    # Clamp after every step: pixels in [0, 1] after denormalization (float32 rounding of the bounds aside).
    assert ds.images.min().item() >= -m / s - 1e-6
    assert ds.images.max().item() <= (1 - m) / s + 1e-6
    assert (ds.images <= -m / s + 1e-6).any() or (ds.images >= (1 - m) / s - 1e-6).any()  # the clamp was active


def test_first_iterate_is_the_seeded_noise(tmp_path, spec, teacher_path) -> None:
    """With one step of lr ~ 0 the result is the job's N(0, 1) draw (clamped): seeded per (seed, ipc, class)."""
    out = tmp_path / "out"
    _fit(_recover(spec, teacher_path, out, ipc=1, batch_size=10, iterations=1, lr=1e-12), tmp_path)
    noise = torch.randn((10, 1, 8, 8), generator=torch.Generator().manual_seed(job_seed(7, 0, 0)))
    m, s = spec.mean[0], spec.std[0]
    assert torch.allclose(load_distilled(out).images, noise.clamp(-m / s, (1 - m) / s), atol=1e-6)


class _Record(L.Callback):
    """R_BN and CE of every step, read back from the BN callback's per-layer terms."""

    def __init__(self) -> None:
        self.bn: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch.job >= 0:
            layers = pl_module.bn_matching.layer_losses()
            self.bn.append(10 * layers[0].item() + sum(r.item() for r in layers[1:]))


def test_bn_loss_decreases(tmp_path, spec, teacher_path) -> None:
    record = _Record()
    module = _recover(spec, teacher_path, tmp_path / "out", ipc=1, batch_size=10, iterations=40, lr=0.1, r_bn=1.0)
    _fit(module, tmp_path, callbacks=[record])
    assert len(record.bn) == 40
    assert np.mean(record.bn[-5:]) < 0.5 * np.mean(record.bn[:5])


def test_teacher_is_frozen_and_unchanged(tmp_path, spec, teacher_path) -> None:
    before = load_tensors(teacher_path, "teacher")
    module = _recover(spec, teacher_path, tmp_path / "out", crop=True, flip=True)
    assert not any(p.requires_grad for p in module.teacher.parameters())
    _fit(module, tmp_path)
    after = module.teacher.state_dict()
    assert sorted(after) == sorted(before)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name  # BN running stats and num_batches_tracked included
    assert not module.teacher.training


def test_bf16_mixed_keeps_fp32_images_and_adam_state(tmp_path, spec, teacher_path) -> None:
    module = _recover(spec, teacher_path, tmp_path / "out", ipc=1, batch_size=10, iterations=3)
    trainer = _fit(module, tmp_path, precision="bf16-mixed")
    assert module.images.dtype == torch.float32
    state = trainer.optimizers[0].state[module.images]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
    ds = load_distilled(tmp_path / "out")
    assert ds.images.dtype == torch.float32 and torch.isfinite(ds.images).all()


def test_crop_curriculum_and_per_image_augmentation_run(tmp_path, spec, teacher_path) -> None:
    module = _recover(spec, teacher_path, tmp_path / "out", ipc=1, batch_size=10, iterations=4, crop=True, flip=True,
                      per_image_augmentation=True, crop_curriculum="cosine", curriculum_milestone=0.5,
                      jitter_symmetric=True, method="cda")
    _fit(module, tmp_path)
    assert load_distilled(tmp_path / "out").method == "cda"


# --- errors --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("option", "value", "message"), [
    ("ipc", 0, r"^ipc: must be an integer > 0, got 0$"),
    ("iterations", 0, r"^iterations: must be an integer > 0, got 0$"),
    ("lr", 0.0, r"^lr: must be > 0, got 0.0$"),
    ("batch_size", -1, r"^batch_size: must be an integer > 0, got -1$"),
    ("crop_scale", (0.5, 0.1), r"^crop_scale: must be \(low, high\)"),
    ("export", "gif", r"^export: must be png, jpg or null, got 'gif'$"),
])
def test_bad_options(spec, teacher_path, tmp_path, option, value, message) -> None:
    with pytest.raises(DDKitError, match=message):
        _recover(spec, teacher_path, tmp_path, **{option: value})


def test_teacher_that_does_not_fit_the_data(spec, teacher_path, tmp_path) -> None:
    five = DataSpec(**{**spec.to_dict(), "num_classes": 5, "class_names": tuple("abcde")})
    with pytest.raises(DDKitError, match=r"^teacher: made for num_classes=10 but the data has num_classes=5, got "):
        _recover(five, teacher_path, tmp_path)
    fmnist = RecoverJobs("fashion_mnist").spec
    with pytest.raises(DDKitError, match=r"^teacher: made for image_size=8 but the data has image_size=28, got "):
        _recover(fmnist, teacher_path, tmp_path)


def test_teacher_without_bn(spec, tmp_path) -> None:
    path = tmp_path / "in.safetensors"
    save_teacher(path, build_net("convnet", 10, 1, 8, depth=1, width=4), TeacherMeta("convnet", {"depth": 1, "width": 4},
                                                                                   spec))
    with pytest.raises(DDKitError, match=r"^teacher: has no BatchNorm layers, got ConvNet$"):
        _recover(spec, str(path), tmp_path / "out")  # refused when built, before a run writes anything


def test_resume_with_other_plan_is_rejected(tmp_path, spec, teacher_path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_last=True)
    _fit(_recover(spec, teacher_path, tmp_path / "out"), tmp_path, callbacks=[ckpt], max_steps=4)
    other = _recover(spec, teacher_path, tmp_path / "out", iterations=6)
    with pytest.raises(DDKitError, match=r"^model.iterations: the checkpoint was made with iterations=5; resume with the "
                                         r"same value \(or start a new run to change it\), got 6$"):
        _fit(other, tmp_path, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))


# --- non-finite guard -----------------------------------------------------------------------------------------


class _NaNAt(Recover):
    """Recover whose teacher input is NaN at the given step numbers (so the step's loss is NaN)."""

    nan_steps: frozenset[int] = frozenset()

    def _augment(self, x, t):
        x = super()._augment(x, t)
        return x * float("nan") if self._steps_done in self.nan_steps else x


class _Images(L.Callback):
    """The images after every step."""

    def __init__(self) -> None:
        self.after: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.after.append(pl_module.images.detach().clone())


def test_nonfinite_step_is_skipped_and_counted(tmp_path, spec, teacher_path) -> None:
    module = _recover(spec, teacher_path, tmp_path / "out", cls=_NaNAt)
    module.nan_steps = frozenset({2})
    images = _Images()
    _fit(module, tmp_path, callbacks=[images])
    assert module.nonfinite_steps == 1 and module.nonfinite_streak == 0
    assert torch.equal(images.after[2], images.after[1])  # the skipped step left the images as they were
    assert not torch.equal(images.after[3], images.after[2])
    ds = load_distilled(tmp_path / "out")
    assert len(ds) == 20 and bool(torch.isfinite(ds.images).all())


def test_nonfinite_steps_in_a_row_stop_with_one_line(tmp_path, spec, teacher_path) -> None:
    module = _recover(spec, teacher_path, tmp_path / "out", cls=_NaNAt, max_nonfinite=3)
    module.nan_steps = frozenset(range(3, 100))
    with pytest.raises(DDKitError, match=r"^recover loss: non-finite for 3 steps in a row \(up to job 1 step 0\); "
                                         r"lower lr or r_bn; finished jobs kept in .*\.work, got nan$"):
        _fit(module, tmp_path)
    assert module.nonfinite_steps == 3
    x, y, _ = read_shard(tmp_path / ".out.work", 0)  # job 0 finished on its last good images
    assert bool(torch.isfinite(x).all()) and y.tolist() == [0, 1, 2, 3]
    assert not (tmp_path / "out" / "meta.json").exists()


# --- resume --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("resume_from", ["last.ckpt", "step=6.ckpt"])
def test_resume_mid_job_is_bit_exact(tmp_path, spec, teacher_path, resume_from) -> None:
    """Stop at step 8 (job 1, t = 3), resume from last.ckpt (written when max_steps stopped the epoch) or from the
    step-6 checkpoint (mid-epoch); the result equals an uninterrupted run's bit for bit."""
    options = {"crop": True, "flip": True, "jitter": 2, "per_image_augmentation": False}
    _fit(_recover(spec, teacher_path, tmp_path / "full", **options), tmp_path / "a")
    full = load_distilled(tmp_path / "full")

    ckpt_dir = tmp_path / "ckpt"
    ckpt = ModelCheckpoint(dirpath=ckpt_dir, filename="{step}", every_n_train_steps=3, save_last=True, save_top_k=-1)
    _fit(_recover(spec, teacher_path, tmp_path / "out", **options), tmp_path / "b", callbacks=[ckpt], max_steps=8)
    assert not (tmp_path / "out" / "meta.json").exists()
    assert sorted(p.name for p in (tmp_path / ".out.work").iterdir()) == ["job_000000.safetensors"]
    state = torch.load(ckpt_dir / resume_from, weights_only=True)[CKPT_KEY]
    assert state["ranks"][0]["job"] == 1

    resume = ModelCheckpoint(dirpath=ckpt_dir, filename="{step}", every_n_train_steps=3, save_last=True,
                             save_top_k=-1)
    trainer = _fit(_recover(spec, teacher_path, tmp_path / "out", **options), tmp_path / "b", callbacks=[resume],
                   ckpt_path=str(ckpt_dir / resume_from))
    assert trainer.global_step == 30
    out = load_distilled(tmp_path / "out")
    assert torch.equal(out.images, full.images)
    assert torch.equal(out.labels, full.labels)
    assert out.extra["written_by_rank"] == [[0, 1, 2, 3, 4, 5]]


# --- DDP -----------------------------------------------------------------------------------------------------


def _cli_config(path: Path, teacher: str, output: Path, root: Path) -> Path:
    """5 jobs (10 classes in chunks of 2, ipc 1): with 2 ranks, rank 1 has 2 jobs and one idle slot."""
    config = {
        "seed_everything": 3,
        "trainer": {"accelerator": "cpu", "max_epochs": -1, "logger": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "default_root_dir": str(root)},
        "model": {"class_path": "ddkit.modules.recover.Recover", "init_args": {
            "teacher": teacher, "ipc": 1, "batch_size": 2, "iterations": 4, "lr": 0.1, "r_bn": 0.01, "jitter": 2,
            "crop": True, "flip": True, "output": str(output), "log_images_every_n_steps": 0}},
        "data": {"class_path": "ddkit.datamodules.recover.RecoverJobs", "init_args": {"dataset": "digits"}},
    }
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


@pytest.mark.distributed
def test_ddp_two_processes_equal_one_process(tmp_path, teacher_path) -> None:
    from ddkit.cli import main

    main(["fit", "-c", str(_cli_config(tmp_path / "one.yaml", teacher_path, tmp_path / "one", tmp_path / "r1")),
          "--trainer.devices", "1"])
    one = load_distilled(tmp_path / "one")
    assert one.extra["seed"] == 3 and one.extra["written_by_rank"] == [[0, 1, 2, 3, 4]]

    config = _cli_config(tmp_path / "two.yaml", teacher_path, tmp_path / "two", tmp_path / "r2")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "ddkit.cli", "fit", "-c", str(config), "--trainer.accelerator", "cpu",
                           "--trainer.devices", "2", "--trainer.strategy", "ddp"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = load_distilled(tmp_path / "two")
    assert two.extra["world_size"] == 2
    assert two.extra["written_by_rank"] == [[0, 2, 4], [1, 3]]  # every job once, by its owner
    assert two.extra["writes"] == two.extra["unique_writes"] == 5
    assert torch.equal(two.labels, one.labels)
    assert torch.equal(two.images, one.images)  # no gradient averaging across ranks, per-job seeding
