"""KD post-training: the loss by hand, a frozen eval teacher, exact stored-label replay, online == stored, a short fit
on digits, the ``kd`` protocol through the evaluator, and bad inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ddkit.datamodules.distilled import DistilledDataModule
from ddkit.datamodules.real import RealDataModule, random_real_subset
from ddkit.errors import DDKitError
from ddkit.evaluation.evaluator import run_evaluation
from ddkit.evaluation.protocols import KDProtocol, get_protocol
from ddkit.formats.common import load_tensors
from ddkit.formats.distilled import DistilledSet, save_distilled
from ddkit.formats.soft_labels import (
    begin_soft_labels,
    finish_soft_labels,
    read_soft_label_meta,
    validate_soft_labels,
)
from ddkit.formats.teacher import TeacherMeta, save_teacher
from ddkit.modules.kd import (
    KDBatchSampler,
    KDStudent,
    KDViewDataset,
    ViewPlan,
    kd_loss,
    relabel_epochs,
    render_views,
)
from ddkit.nets import build_net

REPO = Path(__file__).resolve().parents[2]
STUDENT = {"net": "convnet", "net_kwargs": {"depth": 2, "width": 32}}


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def digits() -> tuple[RealDataModule, torch.Tensor, torch.Tensor]:
    dm = RealDataModule("digits")
    xtr, ytr, _, _ = dm.load_tensors()
    return dm, xtr, ytr


@pytest.fixture(scope="module")
def teacher(digits, tmp_path_factory) -> str:
    """A BN ConvNet-D2 trained on digits for 60 Adam steps (98 % test accuracy), saved as a teacher file."""
    dm, xtr, ytr = digits
    torch.manual_seed(0)
    net = build_net("convnet_bn", 10, 1, 8, depth=2, width=16)
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        idx = torch.randint(0, len(xtr), (128,), generator=g)
        loss = F.cross_entropy(net(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_teacher(path, net.eval(), TeacherMeta("convnet_bn", {"depth": 2, "width": 16}, dm.spec))
    return str(path)


@pytest.fixture(scope="module")
def distilled(digits, tmp_path_factory) -> str:
    """A random digits subset (IPC 10) saved as a DistilledSet."""
    dm, xtr, ytr = digits
    idx = random_real_subset(ytr, 10, 0)
    path = tmp_path_factory.mktemp("distilled") / "digits_ipc10"
    save_distilled(DistilledSet(xtr[idx].clone(), ytr[idx].clone(), dm.spec, 10, "random"), path)
    return str(path)


def _fit(distilled: str, teacher: str | None, tmp_path: Path, epochs: int = 1, batch_size: int = 32,
         logger=False, callbacks=None, val: bool = False, **options) -> tuple[L.Trainer, KDStudent]:
    L.seed_everything(0, verbose=False)
    data = DistilledDataModule(distilled, dataset="digits", batch_size=batch_size)
    kw = {"temperature": 4.0, "mix": "mixup", "augment": "crop_flip", "crop_padding": 1, **STUDENT, **options}
    module = KDStudent(data.spec, teacher=teacher, **kw)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=logger, callbacks=callbacks,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        log_every_n_steps=1, num_sanity_val_steps=0, limit_val_batches=1.0 if val else 0,
                        check_val_every_n_epoch=max(1, epochs // 2))
    trainer.fit(module, data)
    return trainer, module


# ---------------------------------------------------------------------------------------------- the loss


def test_kd_loss_by_hand() -> None:
    s = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]])
    t = torch.tensor([[2.0, 0.0, 1.0], [0.0, 0.0, 4.0]])
    T = 2.0
    expected = 0.0
    for i in range(2):
        p = [math.exp(v / T) for v in t[i].tolist()]
        p = [v / sum(p) for v in p]
        q = [math.exp(v / T) for v in s[i].tolist()]
        q = [v / sum(q) for v in q]
        expected += sum(pk * (math.log(pk) - math.log(qk)) for pk, qk in zip(p, q))
    expected /= 2  # batchmean
    assert kd_loss(s, t, T).item() == pytest.approx(expected, rel=1e-6)
    assert kd_loss(s, t, T, t2_scale=True).item() == pytest.approx(expected * T * T, rel=1e-6)
    assert kd_loss(t, t, T).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("t2_scale, ce_weight", [(False, 0.0), (True, 0.0), (False, 0.5)])
def test_training_step_loss_by_hand(digits, teacher, t2_scale, ce_weight) -> None:
    dm, xtr, ytr = digits
    module = KDStudent(dm.spec, teacher=teacher, temperature=3.0, t2_scale=t2_scale, ce_weight=ce_weight, **STUDENT)
    x, y = xtr[:4], ytr[:4]
    perm, lam = torch.tensor([2, 3, 0, 1]), torch.tensor(0.3)
    batch = {"x": x, "y": y, "perm": perm, "lam": lam, "index": torch.arange(4)}
    loss = module.training_step(batch, 0)
    with torch.no_grad():
        s, t = module.net(x), module.teacher(x)
    p = torch.softmax(t / 3.0, 1)
    kl = (p * (p.log() - torch.log_softmax(s / 3.0, 1))).sum() / 4
    if t2_scale:
        kl = kl * 9.0
    logp = torch.log_softmax(s, 1)
    ce = 0.3 * -logp[torch.arange(4), y].mean() + 0.7 * -logp[torch.arange(4), y[perm]].mean()
    assert loss.item() == pytest.approx((kl + ce_weight * ce).item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------- the teacher


class _Spy(L.Callback):
    def __init__(self) -> None:
        self.modes: list[tuple[bool, bool]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.modes.append((pl_module.net.training, pl_module.teacher.training))


def test_teacher_stays_in_eval_and_unchanged(distilled, teacher, tmp_path) -> None:
    spy = _Spy()
    _, module = _fit(distilled, teacher, tmp_path, epochs=2, callbacks=[spy])
    assert spy.modes and all(mode == (True, False) for mode in spy.modes)
    assert all(not p.requires_grad for p in module.teacher.parameters())
    stored = load_tensors(teacher, "teacher")
    state = module.teacher.state_dict()
    assert set(state) == set(stored)
    assert all(torch.equal(state[k], stored[k]) for k in stored)


def test_teacher_mode_train_reproduces_the_cifar_quirk(distilled, teacher, tmp_path) -> None:
    spy = _Spy()
    _, module = _fit(distilled, teacher, tmp_path, epochs=1, callbacks=[spy], teacher_mode="train")
    assert spy.modes and all(mode == (True, True) for mode in spy.modes)
    stored = load_tensors(teacher, "teacher")
    running = [k for k in stored if k.endswith("running_mean")]
    assert running and any(not torch.equal(module.teacher.state_dict()[k], stored[k]) for k in running)
    assert all(torch.equal(module.teacher.state_dict()[k], stored[k]) for k in stored if k.endswith("weight"))


# ---------------------------------------------------------------------------------------------- stored labels


class _Recorder(nn.Module):
    """Wraps a teacher and records every input and output."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        self.calls.append((x.clone(), out.clone()))
        return out


@pytest.mark.parametrize("augment, mix", [("crop_flip", "mixup"), ("rrc_flip", "cutmix"), ("none", "none")])
def test_stored_replay_reproduces_views_and_logits_exactly(digits, teacher, tmp_path, augment, mix) -> None:
    _, xtr, ytr = digits
    images, labels = xtr[:11], ytr[:11]  # 11 images, batch 4: batches of 4, 4, 3
    plan = ViewPlan(augment=augment, view_size=8, padding=2, mix=mix, pad_value=(-0.8,))
    from ddkit.formats.teacher import load_teacher

    recorder = _Recorder(load_teacher(teacher)[0])
    online = KDViewDataset(images, labels, plan, batch_size=4, seed=5)
    store = tmp_path / "store"
    plan_meta = {"num_images": 11, "num_classes": 10, "image_shape": [1, 8, 8], "images_sha256": "x",
                 "batch_size": 4, "seed": 5, "augment": augment, "view_size": 8, "crop_scale": [0.08, 1.0],
                 "padding": 2, "mix": mix, "mix_alpha": plan.alpha()}
    begin_soft_labels(store, plan_meta, 2, None)
    assert relabel_epochs(recorder, online, store, range(2)) == [0, 1]
    finish_soft_labels(store)
    validate_soft_labels(store, deep=True)
    recorded = recorder.calls  # epoch-major, batch order
    assert len(recorded) == 6

    replay = KDViewDataset(images, labels, plan, batch_size=4, seed=12345, soft_labels=str(store))  # seed unused
    sampler = KDBatchSampler(11, 4)
    loader = DataLoader(replay, sampler=sampler, batch_size=None)
    seen = 0
    for epoch in range(2):
        sampler.set_epoch(epoch)
        for b, item in enumerate(loader):
            x, logits = recorded[3 * epoch + b]
            assert torch.equal(item["x"], x)
            assert torch.equal(item["logits"], logits.half())
            assert torch.equal(item["x"], online[(epoch, b)]["x"])  # online draws the same views for the same seed
            assert torch.equal(item["y"], labels[item["index"]])
            seen += 1
    assert seen == 6
    if augment != "none":  # the two epochs differ
        assert not torch.equal(recorded[0][0], recorded[3][0])
    if augment == "crop_flip":  # rendering in DataLoader workers writes the same shards
        begin_soft_labels(tmp_path / "workers", plan_meta, 2, None)
        relabel_epochs(recorder, online, tmp_path / "workers", range(2), num_workers=2)
        for e in range(2):
            name = f"epoch_{e:04d}.safetensors"
            assert (tmp_path / "workers" / name).read_bytes() == (store / name).read_bytes()


def test_views_by_hand() -> None:
    """crop_flip: pad with the fill, crop at the recorded offset, then flip."""
    img = torch.arange(4.0).view(1, 1, 2, 2)  # [[0, 1], [2, 3]]
    plan = ViewPlan(augment="crop_flip", view_size=2, padding=1, mix="none", pad_value=(-9.0,))
    cfg = {"index": torch.tensor([0, 0]), "boxes": torch.tensor([[0, 0, 2, 2], [1, 2, 2, 2]], dtype=torch.int32),
           "flips": torch.tensor([0, 1], dtype=torch.uint8)}
    v = render_views(img, cfg, plan)
    assert v[0, 0].tolist() == [[-9.0, -9.0], [-9.0, 0.0]]
    assert v[1, 0].tolist() == [[-9.0, 1.0], [-9.0, 3.0]]  # crop [[1, -9], [3, -9]], flipped


def test_sampler_splits_batches_across_ranks() -> None:
    keys = [list(KDBatchSampler(11, 4, num_replicas=2, rank=r)) for r in range(2)]
    assert keys == [[(0, 0), (0, 2)], [(0, 1), (0, 0)]]  # 3 batches padded to 4 by wrapping
    s = KDBatchSampler(11, 4)
    s.set_epoch(3)
    assert list(s) == [(3, 0), (3, 1), (3, 2)] and len(s) == 3


def test_stored_and_online_give_the_same_first_epoch_loss(distilled, teacher, tmp_path) -> None:
    online, _ = _fit(distilled, teacher, tmp_path, epochs=1)
    store = tmp_path / "store"
    stored, module = _fit(distilled, teacher, tmp_path, epochs=1, labels="stored", soft_labels=str(store))
    a, b = online.callback_metrics["train/loss"].item(), stored.callback_metrics["train/loss"].item()
    assert a > 0 and b == pytest.approx(a, rel=2e-3)  # the stored logits are fp16
    meta = read_soft_label_meta(store)
    assert meta["complete"] and meta["epochs"] == 1 and meta["batch_size"] == 32 and meta["seed"] == 0
    assert meta["teacher"]["sha256"] == module.teacher_ref["sha256"]
    b = meta["bytes"]
    assert b["labels"] == sum(p.stat().st_size for p in store.glob("epoch_*.safetensors"))
    assert b["images_float32"] == 100 * 64 * 4 and b["labels_over_images_uint8"] == b["labels"] / 6400


def test_complete_store_replays_without_teacher_and_resumes_partial(distilled, teacher, tmp_path) -> None:
    store = tmp_path / "store"
    _fit(distilled, teacher, tmp_path, epochs=2, labels="stored", soft_labels=str(store))
    first = (store / "epoch_0001.safetensors").read_bytes()
    trainer, module = _fit(distilled, None, tmp_path, epochs=2, labels="stored", soft_labels=str(store))
    assert module.teacher is None and trainer.callback_metrics["train/loss"].item() > 0
    # an interrupted pass: drop a shard and the completion flag; the next run writes the shard again, identically
    (store / "epoch_0001.safetensors").unlink()
    meta = json.loads((store / "meta.json").read_text())
    (store / "meta.json").write_text(json.dumps({**meta, "complete": False}))
    _fit(distilled, teacher, tmp_path, epochs=2, labels="stored", soft_labels=str(store))
    assert (store / "epoch_0001.safetensors").read_bytes() == first
    assert read_soft_label_meta(store)["complete"]


def test_stored_labels_must_match_the_run(distilled, teacher, tmp_path) -> None:
    store = tmp_path / "store"
    _fit(distilled, teacher, tmp_path, epochs=2, batch_size=32, labels="stored", soft_labels=str(store))
    with pytest.raises(DDKitError, match=r"^soft_labels.batch_size: .*batch_size=32.*batch_size=16") as e:
        _fit(distilled, teacher, tmp_path, epochs=2, batch_size=16, labels="stored", soft_labels=str(store))
    assert "\n" not in str(e.value)
    with pytest.raises(DDKitError, match=r"^soft_labels.epochs: the stored labels hold 2 epochs, fewer than the 3"):
        _fit(distilled, teacher, tmp_path, epochs=3, labels="stored", soft_labels=str(store))
    with pytest.raises(DDKitError, match=r"^soft_labels.mix: "):
        _fit(distilled, teacher, tmp_path, epochs=2, labels="stored", soft_labels=str(store), mix="cutmix")
    with pytest.raises(DDKitError, match=r"^teacher: required to write stored labels"):
        _fit(distilled, None, tmp_path, epochs=1, labels="stored", soft_labels=str(tmp_path / "new"))


# ---------------------------------------------------------------------------------------------- end to end


def test_short_kd_fit_on_digits_beats_chance_and_logs(distilled, teacher, tmp_path) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(str(tmp_path / "tb"), name="kd")
    trainer, _ = _fit(distilled, teacher, tmp_path, epochs=20, batch_size=16, logger=logger, val=True,
                      augment="none", lr=1e-2)
    acc = trainer.callback_metrics["val/acc"].item()
    assert acc > 0.6, acc  # chance is 0.1 (measured: ~0.85)
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/kl", "train/lr", "val/acc"} <= tags
    lrs = [e.value for e in events.Scalars("train/lr")]
    assert lrs[0] == pytest.approx(1e-2) and lrs[-1] == pytest.approx(1e-2 * 0.5 * (1 + math.cos(math.pi * 19 / 20)))


def test_kd_protocol_through_run_evaluation(distilled, teacher, tmp_path) -> None:
    stores = tmp_path / "stores"
    options = {"kd": {"teacher": teacher, "batch_size": 10, "mix": "mixup", "labels": "stored",
                      "soft_labels": str(stores)}}
    report = run_evaluation(RealDataModule("digits"), distilled=[distilled], baselines=["random"], ipc=2,
                            protocols=["kd"], protocol_options=options, seeds=1, epochs=2, output=str(tmp_path / "r"),
                            net="convnet", net_kwargs={"depth": 2, "width": 16}, progress=False)
    on_disk = json.loads((tmp_path / "r" / "report.json").read_text())
    assert on_disk["protocols"][0]["name"] == "kd" and on_disk["protocols"][0]["augment"] == "auto"
    # a set made by `random` beside the random baseline: named by method and directory
    assert [(r["name"], r["protocol"]["name"]) for r in report["results"]] == [("random_digits_ipc10", "kd"),
                                                                               ("random", "kd")]
    assert all(0 <= r["mean"] <= 1 for r in on_disk["results"])
    assert "| set | IPC | kd |" in (tmp_path / "r" / "report.md").read_text()
    made = sorted(p for p in stores.iterdir())  # one store per training set and seed
    assert len(made) == 2 and all(read_soft_label_meta(p)["complete"] for p in made)


def test_kd_protocol_cli_with_random_baseline(teacher, tmp_path, monkeypatch) -> None:
    from ddkit.cli import main

    monkeypatch.chdir(tmp_path)
    main(["evaluate", "--data.dataset", "digits", "--baselines", "[random]", "--ipc", "2", "--protocols", "[kd]",
          "--protocol_options", f"{{kd: {{teacher: {teacher}, batch_size: 10}}}}", "--seeds", "1", "--epochs", "1",
          "--net_kwargs", "{depth: 2, width: 16}", "--output", "out", "--progress", "false"])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["results"][0]["protocol"]["name"] == "kd" and report["results"][0]["kind"] == "random"
    assert report["protocols"][0]["teacher"] == teacher


def test_kd_protocol_temporary_store_is_removed(digits, teacher) -> None:
    dm, xtr, ytr = digits
    idx = random_real_subset(ytr, 2, 0)
    ds = DistilledSet(xtr[idx].clone(), ytr[idx].clone(), dm.spec, 2, "random")
    protocol = get_protocol("kd", teacher=teacher, labels="stored", epochs=1, batch_size=8)
    module = protocol.make_module(dm.spec, "convnet", {"depth": 2, "width": 16}, ds)
    assert protocol.train_loader(ds) is None and module.hparams.augment == "crop_flip"
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module)
    assert module.soft_label_meta["complete"] and not Path(module.hparams.soft_labels).exists()


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("digits/*/relabel_ipc10.yaml")),
                         ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_digits_configs_run_through_the_cli(config, distilled, teacher, tmp_path, monkeypatch) -> None:
    from ddkit.cli import main

    monkeypatch.chdir(tmp_path)
    main(["fit", "-c", str(config), "--data.init_args.distilled", distilled, "--model.init_args.teacher", teacher,
          "--model.init_args.soft_labels", str(tmp_path / "store"), "--trainer.max_epochs", "2",
          "--trainer.enable_progress_bar", "false"])
    assert list((tmp_path / "runs").rglob("events.out.tfevents.*"))


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("options, message", [
    ({"temperature": 0.0}, "^temperature: must be a finite number > 0, got 0.0$"),
    ({"temperature": -2.0}, "^temperature: "),
    ({"mix": "cutout"}, "^mix: must be one of cutmix, mixup, none, got 'cutout'$"),
    ({"labels": "cached"}, "^labels: must be one of online, stored, got 'cached'$"),
    ({"augment": "dsa"}, "^augment: "),
    ({"teacher_mode": "frozen"}, "^teacher_mode: "),
    ({"ce_weight": -1.0}, "^ce_weight: "),
    ({"crop_scale": (0.5, 0.1)}, "^crop_scale: "),
])
def test_bad_options_are_one_line_errors(digits, teacher, options, message) -> None:
    dm = digits[0]
    with pytest.raises(DDKitError, match=message) as e:
        KDStudent(dm.spec, teacher=teacher, **{**STUDENT, **options})
    assert "\n" not in str(e.value)


def test_bad_protocol_options_and_teachers(digits, teacher) -> None:
    dm = digits[0]
    with pytest.raises(DDKitError, match=r"^kd.temperature: must be a finite number > 0, got 0$"):
        get_protocol("kd", teacher=teacher, temperature=0)
    with pytest.raises(DDKitError, match=r"^kd.mix: "):
        get_protocol("kd", teacher=teacher, mix="cutout")
    with pytest.raises(DDKitError, match=r"^kd.labels: "):
        get_protocol("kd", teacher=teacher, labels="cached")
    with pytest.raises(DDKitError, match=r"^kd.teacher: required"):
        get_protocol("kd")
    assert isinstance(get_protocol("kd", teacher=teacher), KDProtocol)
    with pytest.raises(DDKitError, match=r"^teacher: required for labels=online"):
        KDStudent(dm.spec, **STUDENT)
    other = dm.spec.__class__(**{**dm.spec.to_dict(), "image_size": 16})
    with pytest.raises(DDKitError, match=r"^teacher: made for image_size=8 but the data has image_size=16"):
        KDStudent(other, teacher=teacher, **STUDENT)


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("*/*/relabel_ipc*.yaml")),
                         ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_relabel_configs_parse(config, capsys) -> None:
    from ddkit.cli import main

    with pytest.raises(SystemExit) as e:
        main(["fit", "-c", str(config), "--print_config"])
    assert e.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path: ddkit.modules.kd.KDStudent" in printed
    assert "class_path: ddkit.datamodules.distilled.DistilledDataModule" in printed


@pytest.mark.distributed
def test_ddp_relabel_pass_equals_one_process(distilled, teacher, tmp_path, monkeypatch) -> None:
    """2 processes write epochs 0, 2 and 1 of the store; it equals the 1-process store; training replays it."""
    import os
    import subprocess
    import sys

    from ddkit.cli import main
    from ddkit.formats.common import load_tensors

    config = str(REPO / "configs/digits/sre2l/relabel_ipc10.yaml")
    common = ["--data.init_args.distilled", distilled, "--model.init_args.teacher", teacher, "--trainer.max_epochs",
              "3", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
              "--trainer.logger", "false"]
    monkeypatch.chdir(tmp_path)
    main(["fit", "-c", config, *common, "--model.init_args.soft_labels", str(tmp_path / "one"),
          "--trainer.devices", "1"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "ddkit.cli", "fit", "-c", config, *common,
                           "--model.init_args.soft_labels", str(tmp_path / "two"), "--trainer.devices", "2",
                           "--trainer.strategy", "ddp"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = read_soft_label_meta(tmp_path / "one"), read_soft_label_meta(tmp_path / "two")
    assert one["complete"] and two["complete"] and one["epochs"] == two["epochs"] == 3
    assert one["bytes"]["labels"] == two["bytes"]["labels"]
    for e in range(3):
        a = load_tensors(tmp_path / "one" / f"epoch_{e:04d}.safetensors", "one")
        b = load_tensors(tmp_path / "two" / f"epoch_{e:04d}.safetensors", "two")
        for k in ("order", "boxes", "flips", "mix_perm", "mix_lam", "mix_box"):
            assert torch.equal(a[k], b[k]), k
        torch.testing.assert_close(a["logits"].float(), b["logits"].float(), atol=2e-3, rtol=1e-3)


def test_resume_continues_the_same_run(distilled, teacher, tmp_path) -> None:
    """2 epochs + resume to 4 (from a checkpoint, under another global seed) == 4 epochs in one go."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(epochs: int, seed: int, ckpt: str | None = None) -> KDStudent:
        L.seed_everything(seed, verbose=False)
        data = DistilledDataModule(distilled, dataset="digits", batch_size=32)
        module = KDStudent(data.spec, teacher=teacher, temperature=4.0, mix="cutmix", augment="crop_flip",
                           crop_padding=1, seed=None if ckpt else 0, **STUDENT)
        trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, default_root_dir=str(tmp_path),
                            callbacks=[ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)])
        trainer.fit(module, data, ckpt_path=ckpt)
        return module

    straight = run(4, 0)
    run(2, 0)
    resumed = run(4, 123, ckpt=str(tmp_path / "ckpt" / "last.ckpt"))
    for (name, a), b in zip(straight.net.state_dict().items(), resumed.net.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_topk_stored_labels_keep_k_logits_and_record_the_bytes(distilled, teacher, tmp_path) -> None:
    full, _ = _fit(distilled, teacher, tmp_path, epochs=1, labels="stored", soft_labels=str(tmp_path / "full"))
    same, _ = _fit(distilled, teacher, tmp_path, epochs=1, labels="stored", soft_labels=str(tmp_path / "k10"),
                   soft_label_topk=10)  # k = K: the same targets as full logits
    a, b = full.callback_metrics["train/loss"].item(), same.callback_metrics["train/loss"].item()
    assert b == pytest.approx(a, rel=1e-5)
    _fit(distilled, teacher, tmp_path, epochs=1, labels="stored", soft_labels=str(tmp_path / "k3"), soft_label_topk=3)
    meta = read_soft_label_meta(tmp_path / "k3")
    assert meta["topk"] == 3 and meta["topk_temperature"] == 4.0
    assert meta["bytes"]["logits_saved"] == 100 * 10 * 2 - 100 * (3 * 4 + 4)
    shard = load_tensors(tmp_path / "k3/epoch_0000.safetensors", "shard")
    assert shard["logits"].shape == (100, 3) and shard["logit_index"].dtype == torch.int16
    with pytest.raises(DDKitError, match=r"^soft_label_topk: must be an integer in \[1, 10\]"):
        KDStudent(DistilledDataModule(distilled, dataset="digits").spec, teacher=teacher, soft_label_topk=11)
