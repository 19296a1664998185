"""Linear probe: the backbone (weights and BN buffers) is bit-for-bit untouched, the head learns, the teacher loads."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from ddkit.datamodules.real import RealDataModule
from ddkit.datamodules.ssl import SSLDataModule
from ddkit.errors import DDKitError
from ddkit.formats.teacher import load_teacher
from ddkit.modules.classifier import Classifier
from ddkit.modules.probe import LinearProbe, load_ssl_backbone
from ddkit.modules.ssl import DINO, MoCoV2

NET = {"net": "convnet_bn", "net_kwargs": {"width": 16, "depth": 2}, "proj_hidden_dim": 64, "knn_k": 0}


def quiet_trainer(**kwargs) -> L.Trainer:
    opts = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                "enable_model_summary": False, "num_sanity_val_steps": 0}
    return L.Trainer(**{**opts, **kwargs})


def ssl_checkpoint(path, cls=MoCoV2, views="mocov2", view_kwargs=None, **kwargs):
    """A few SSL steps on digits, saved as a Lightning checkpoint (BN statistics moved away from their init)."""
    L.seed_everything(0)
    dm = SSLDataModule(views=views, view_kwargs=view_kwargs, dataset="digits", batch_size=64, train_subset=256)
    model = cls(data_spec=dm.spec, lr=0.05, **NET, **kwargs)
    trainer = quiet_trainer(max_steps=3, limit_val_batches=0)
    trainer.fit(model, dm)
    trainer.save_checkpoint(path)
    return path, model


@pytest.fixture(scope="module")
def mocov2_ckpt(tmp_path_factory):
    return ssl_checkpoint(tmp_path_factory.mktemp("ssl") / "mocov2.ckpt", proj_output_dim=32, queue_size=64)


def test_probe_keeps_backbone_and_bn_buffers_bit_for_bit_while_the_head_learns(mocov2_ckpt, tmp_path):
    ckpt, ssl_model = mocov2_ckpt
    dm = RealDataModule(dataset="digits", batch_size=64, val_split=0.2)
    probe = LinearProbe(data_spec=dm.spec, ssl_checkpoint=str(ckpt), augment="flip",  # MoCo lr 30
                        export_teacher=str(tmp_path / "teacher.safetensors"))
    # the probed backbone is the SSL backbone, BN running statistics included
    ssl_state = ssl_model.backbone.state_dict()
    head = {k for k in probe.net.state_dict() if k.startswith("head.")}
    before = {k: v.clone() for k, v in probe.net.state_dict().items()}
    for k, v in before.items():
        if k not in head:
            assert torch.equal(v, ssl_state[k]), k
    assert any(k.endswith("running_var") and not torch.equal(v, torch.ones_like(v)) for k, v in before.items())

    class Modes(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            assert not any(m.training for m in pl_module.net.modules()), "the probed net must stay in eval mode"

    trainer = quiet_trainer(max_epochs=6, callbacks=[Modes()])
    trainer.fit(probe, dm)
    after = probe.net.state_dict()
    for k, v in before.items():  # weights, BN running mean/var and num_batches_tracked
        if k not in head:
            assert torch.equal(after[k], v), k
    assert all(not torch.equal(after[k], before[k]) for k in head)
    assert [n for n, p in probe.named_parameters() if p.requires_grad] == ["net.head.weight", "net.head.bias"]
    assert float(trainer.callback_metrics["val/acc"]) > 0.5  # chance is 0.1

    teacher, meta = load_teacher(tmp_path / "teacher.safetensors")
    assert meta.net == "convnet_bn" and meta.net_kwargs == {"width": 16, "depth": 2}
    assert meta.extra["stage"] == "probe" and meta.extra["method"] == "mocov2"
    x, y = next(iter(dm.test_dataloader()))
    with torch.no_grad():
        logits = teacher(x)
        torch.testing.assert_close(logits, probe.net(x))
    assert logits.shape == (len(x), 10) and (logits.argmax(1) == y).float().mean() > 0.5
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, after[k]), k


def test_probe_defaults_are_mocos_recipe(mocov2_ckpt):
    probe = LinearProbe(data_spec=RealDataModule(dataset="digits").spec, ssl_checkpoint=str(mocov2_ckpt[0]))
    hp = probe.hparams
    assert (hp.optimizer, hp.lr, hp.momentum, hp.weight_decay, hp.schedule) == ("sgd", 30.0, 0.9, 0.0, "step")
    trainer = quiet_trainer(max_epochs=10)
    trainer.strategy.connect(probe)
    probe.trainer = trainer
    cfg = probe.configure_optimizers()
    sched = cfg["lr_scheduler"]["scheduler"]
    lrs = [30.0 * f(e) for e in range(10) for f in sched.lr_lambdas]
    assert lrs == pytest.approx([30.0] * 6 + [3.0] * 2 + [0.3] * 2)
    assert float(probe.net.head.bias.abs().sum()) == 0.0 and 0.005 < float(probe.net.head.weight.std()) < 0.015


def test_dino_probe_uses_the_teacher_encoder_by_default(tmp_path):
    ckpt, model = ssl_checkpoint(tmp_path / "dino.ckpt", cls=DINO, views="dino", view_kwargs={"n_local_views": 2},
                                 bottleneck_dim=16, output_dim=32)
    hp, state = load_ssl_backbone(ckpt)
    assert hp["method"] == "dino" and hp["eval_encoder"] == "momentum"
    for k, v in model.momentum_backbone.state_dict().items():
        assert torch.equal(state[k], v)
    _, online = load_ssl_backbone(ckpt, encoder="online")
    assert any(not torch.equal(online[k], state[k]) for k in state)


def test_random_init_baseline_needs_only_a_net():
    spec = RealDataModule(dataset="digits").spec
    probe = LinearProbe(data_spec=spec, net="convnet_bn", net_kwargs={"width": 8})
    assert probe.method == "random" and not probe.net.training


def test_bad_checkpoints_are_one_clear_error(tmp_path, mocov2_ckpt):
    spec = RealDataModule(dataset="digits").spec
    with pytest.raises(DDKitError, match="^ssl_checkpoint: file not found"):
        LinearProbe(data_spec=spec, ssl_checkpoint=str(tmp_path / "missing.ckpt"))
    with pytest.raises(DDKitError, match="^ssl_checkpoint: required unless net is given"):
        LinearProbe(data_spec=spec)
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(DDKitError, match=r"^ssl_checkpoint: cannot be read with torch.load\(weights_only=True\)"):
        LinearProbe(data_spec=spec, ssl_checkpoint=str(tmp_path / "junk.ckpt"))
    sup = Classifier(data_spec=spec, net="convnet_bn")
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(sup, RealDataModule(dataset="digits", batch_size=64))
    trainer.save_checkpoint(tmp_path / "sup.ckpt")
    with pytest.raises(DDKitError, match="^ssl_checkpoint: not a ddkit SSL checkpoint"):
        LinearProbe(data_spec=spec, ssl_checkpoint=str(tmp_path / "sup.ckpt"))
    with pytest.raises(DDKitError, match="^encoder: the mocov2 checkpoint has no"):
        load_ssl_backbone(_without_momentum(mocov2_ckpt[0], tmp_path), encoder="momentum")
    rgb = RealDataModule(dataset="cifar10").spec
    with pytest.raises(DDKitError, match="^data_spec.in_chans: the SSL backbone takes 1 channels, got 3"):
        LinearProbe(data_spec=rgb, ssl_checkpoint=str(mocov2_ckpt[0]))


def _without_momentum(path, tmp_path):
    ckpt = torch.load(path, weights_only=True)
    ckpt["state_dict"] = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("momentum_backbone.")}
    torch.save(ckpt, tmp_path / "online_only.ckpt")
    return tmp_path / "online_only.ckpt"
