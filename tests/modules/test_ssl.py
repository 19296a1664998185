"""SSL pretraining: every method runs and learns on digits, the parts behave as the papers say, DDP finishes."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from ddkit.callbacks.knn import KNNMonitor, knn_predict_labels
from ddkit.datamodules.real import DATASETS
from ddkit.datamodules.spec import DataSpec
from ddkit.datamodules.ssl import SSLDataModule, build_views
from ddkit.errors import DDKitError
from ddkit.modules import ssl
from ddkit.modules.ssl import DINO, MoCoV2, SwAV, backbone_features, contrastive_loss, head_keys, strip_head
from ddkit.nets import build_net
from tests.conftest import REPO, run_ddkit

DIGITS = DataSpec("digits", 10, 1, 8, DATASETS["digits"].mean, DATASETS["digits"].std)
SMALL = {"net": "convnet_bn", "net_kwargs": {"width": 16}, "proj_hidden_dim": 64, "knn_k": 0}
METHOD_KWARGS = {
    # the queue must stay shorter than the 256-image subset, or it holds keys of the query's own image
    "mocov2": {"proj_output_dim": 32, "queue_size": 64, "base_momentum": 0.99, "lr": 0.1},
    "mocov3": {"proj_output_dim": 32, "pred_hidden_dim": 64, "temperature": 0.2},
    "simclr": {"proj_output_dim": 32},
    "byol": {"proj_output_dim": 32, "pred_hidden_dim": 64},
    "swav": {"proj_output_dim": 32, "n_prototypes": 20, "freeze_prototypes_steps": 3, "queue_length": 128,
                 "start_queue_at_epoch": 1},
    # DINO on 8x8 digits is unstable once the lr has decayed (the centering flattens the teacher): a constant
    # momentum 0.95 and BN in the head keep the 32-step fit in its learning phase.
    "dino": {"bottleneck_dim": 32, "output_dim": 256, "head_batch_norm": True, "base_momentum": 0.95, "final_momentum": 0.95,
                 "center_momentum": 0.95, "lr": 0.1},
}
VIEWS = {"mocov2": ("mocov2", None), "mocov3": ("byol", None), "simclr": ("simclr", None), "byol": ("byol", None),
         "swav": ("swav", {"crop_counts": [2, 2]}), "dino": ("dino", {"n_local_views": 2})}


def digits_views(method: str, **kwargs) -> SSLDataModule:
    views, vk = VIEWS[method]
    opts = {"dataset": "digits", "batch_size": 64, "train_subset": 256, "knn_bank_size": 200, "knn_query_size": 100}
    return SSLDataModule(views=views, view_kwargs=vk, **{**opts, **kwargs})


class LossLog(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def quiet_trainer(**kwargs) -> L.Trainer:
    opts = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                "enable_model_summary": False, "num_sanity_val_steps": 0}
    return L.Trainer(**{**opts, **kwargs})


# ---------------------------------------------------------------------------------------------- every method


@pytest.mark.parametrize("method", sorted(ssl.METHODS))
def test_method_runs_and_its_loss_decreases_on_digits(method):
    L.seed_everything(0)
    dm = digits_views(method)
    model = ssl.METHODS[method](data_spec=dm.spec, **SMALL, **{"lr": 0.05, **METHOD_KWARGS[method]})
    log = LossLog()
    quiet_trainer(max_epochs=8, callbacks=[log], limit_val_batches=0).fit(model, dm)
    assert len(log.losses) == 8 * 4 and all(math.isfinite(v) for v in log.losses)
    first, last = sum(log.losses[2:6]) / 4, sum(log.losses[-4:]) / 4  # from step 2: MoCo's queue is then full
    assert last < first, (method, log.losses)


# ---------------------------------------------------------------------------------------------- parts


@pytest.mark.parametrize("name,kwargs", [("convnet_bn", {"width": 8}), ("resnet18", {}), ("resnet10t", {})])
def test_strip_head_removes_exactly_the_classifier(name, kwargs):
    full = build_net(name, 10, 3, 32, **kwargs)
    headless = strip_head(build_net(name, 10, 3, 32, **kwargs))
    assert set(full.state_dict()) - set(headless.state_dict()) == head_keys(full)
    assert set(headless.state_dict()) <= set(full.state_dict())
    assert backbone_features(headless, torch.zeros(2, 3, 32, 32), pool=True).shape == (2, full.num_features) \
        or name == "convnet_bn"


def test_pooled_convnet_features_are_the_spatial_mean_of_the_map():
    net = strip_head(build_net("convnet_bn", 10, 1, 28, width=8)).eval()
    x = torch.randn(3, 1, 28, 28)
    flat, pooled = backbone_features(net, x, pool=False), backbone_features(net, x, pool=True)
    assert flat.shape == (3, 8 * 4 * 4) and pooled.shape == (3, 8)
    torch.testing.assert_close(pooled, flat.view(3, 8, 16).mean(-1))
    assert backbone_features(net, torch.randn(3, 1, 16, 16), pool=True).shape == (3, 8)  # any crop size


def test_contrastive_loss_matches_hand_computation():
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    k = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    t = 0.5
    s = 1 / math.sqrt(2)
    logits = torch.tensor([[1.0, s], [0.0, s]]) / t  # cos(q_i, k_j)
    expected = (-(logits[0, 0] - torch.logsumexp(logits[0], 0)) - (logits[1, 1] - torch.logsumexp(logits[1], 0))) / 2
    torch.testing.assert_close(contrastive_loss(q, k, t), expected * 2 * t)


def test_momentum_update_is_ema_once_per_step_with_cosine_schedule():
    L.seed_everything(0)
    dm = digits_views("mocov2")
    model = MoCoV2(data_spec=dm.spec, lr=0.05, **SMALL, proj_output_dim=32, queue_size=256, base_momentum=0.9,
                   final_momentum=1.0)
    seen = []

    class Check(L.Callback):
        before = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            # the previous step's EMA update used the momentum of the current global_step
            if self.before is not None:
                m = pl_module.current_momentum()
                online = [p.detach() for p in pl_module.backbone.parameters()]
                for old, new, o in zip(self.before, pl_module.momentum_backbone.parameters(), online):
                    torch.testing.assert_close(new.detach(), m * old + (1 - m) * o)
                seen.append(m)
            self.before = [p.detach().clone() for p in pl_module.momentum_backbone.parameters()]

    quiet_trainer(max_steps=5, callbacks=[Check()], limit_val_batches=0).fit(model, dm)
    assert all(not p.requires_grad for p in model.momentum_backbone.parameters())
    assert len(seen) == 4 and seen[0] == pytest.approx(1 - 0.1 * (math.cos(math.pi / 4) + 1) / 2)
    assert seen[-1] == pytest.approx(1.0) and seen == sorted(seen)  # cosine 0.9 -> 1 over the run


def test_mocov2_queue_takes_gathered_keys_and_is_checkpointed(tmp_path):
    L.seed_everything(0)
    dm = digits_views("mocov2")
    model = MoCoV2(data_spec=dm.spec, lr=0.05, **SMALL, proj_output_dim=32, queue_size=1024, symmetric=True)
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(model, dm)
    bank = model.criterion.memory_bank
    assert int(bank.bank_ptr) == 2 * 2 * 64  # symmetric: both key sets of both steps
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    ckpt = torch.load(tmp_path / "m.ckpt", weights_only=True)
    torch.testing.assert_close(ckpt["ssl_memory_banks"]["criterion.memory_bank"]["bank"], bank.bank)
    assert ckpt["ddkit_ssl"]["method"] == "mocov2" and isinstance(ckpt["hyper_parameters"]["data_spec"], dict)
    restored = MoCoV2.load_from_checkpoint(tmp_path / "m.ckpt", weights_only=True)
    torch.testing.assert_close(restored.criterion.memory_bank.bank, bank.bank)


def test_swav_normalizes_prototypes_and_freezes_them_first():
    L.seed_everything(0)
    dm = digits_views("swav")
    model = SwAV(data_spec=dm.spec, lr=0.05, **SMALL, proj_output_dim=32, n_prototypes=20,
                 freeze_prototypes_steps=2)
    start = model.prototypes.heads[0].weight.detach().clone()
    quiet_trainer(max_steps=2, limit_val_batches=0).fit(model, dm)
    w = model.prototypes.heads[0].weight.detach()
    torch.testing.assert_close(w, F.normalize(start, dim=1))  # normalized, but no gradient step while frozen
    quiet_trainer(max_steps=6, limit_val_batches=0).fit(model, dm)  # a new Trainer: steps 0-1 frozen again
    assert not torch.allclose(model.prototypes.heads[0].weight, F.normalize(start, dim=1))


def test_dino_teacher_temperature_follows_dino_linspace():
    model = DINO(data_spec=DIGITS, **SMALL, bottleneck_dim=16, output_dim=32, warmup_teacher_temp=0.04,
                 teacher_temp=0.07, warmup_teacher_temp_epochs=4)
    ref = torch.linspace(0.04, 0.07, 4).tolist()
    assert [model.teacher_temperature(e) for e in range(6)] == pytest.approx(ref + [0.07, 0.07])
    assert model.EVAL_ENCODER == "momentum" and model.eval_backbone is model.momentum_backbone


def test_flat_convnet_features_reject_smaller_local_crops():
    spec = DataSpec("fashion_mnist", 10, 1, 28, (0.5,), (0.5,))
    flat = DINO(data_spec=spec, **{**SMALL, "pool_features": False}, bottleneck_dim=16, output_dim=32)
    with pytest.raises(DDKitError, match="^data.view_kwargs: backbone .convnet_bn. gives 64-d features at 16 px but 256-d at 28 px"):
        flat.check_crop_size(16, "data.view_kwargs")
    pooled = DINO(data_spec=spec, **SMALL, bottleneck_dim=16, output_dim=32)
    pooled.check_crop_size(16, "data.view_kwargs")  # pooled features: any crop size


def test_wrong_number_of_views_is_one_clear_error():
    dm = digits_views("dino")  # 4 views for a 2-view method
    model = MoCoV2(data_spec=dm.spec, **SMALL, proj_output_dim=32, queue_size=64)
    with pytest.raises(DDKitError, match="data.views: mocov2 needs 2-2 views per image, got 4"):
        quiet_trainer(max_steps=1, limit_val_batches=0).fit(model, dm)


@pytest.mark.parametrize("kwargs,field", [({"optimizer": "rmsprop"}, "optimizer"), ({"lr": 0.0}, "lr"),
                                          ({"knn_k": -1}, "knn_k")])
def test_bad_options_name_the_field(kwargs, field):
    with pytest.raises(DDKitError, match=f"^{field}:"):
        MoCoV2(data_spec=DIGITS, **{**SMALL, **kwargs})


# ---------------------------------------------------------------------------------------------- data and kNN


def test_datamodule_views_and_plain_knn_loaders():
    dm = digits_views("swav", val_split=0.2, train_subset=None, knn_bank_size=100, knn_query_size=50)
    dm.setup("fit")
    views, y = dm.train_set[0]
    assert [tuple(v.shape) for v in views] == [(1, 8, 8)] * 2 + [(1, 6, 6)] * 2 and isinstance(y, torch.Tensor)
    bank, queries = dm.val_dataloader()
    xb, _yb = next(iter(bank))
    assert xb.shape[1:] == (1, 8, 8) and len(bank.dataset) == 100 and len(queries.dataset) == 50
    assert torch.bincount(dm._labels(bank.dataset), minlength=10).min() == 10  # stratified
    with pytest.raises(DDKitError, match="^views:"):
        SSLDataModule(views="mae", dataset="digits")
    with pytest.raises(DDKitError, match="^zca:"):
        SSLDataModule(views="mocov2", dataset="digits", zca=True)
    with pytest.raises(DDKitError, match="^view_kwargs:"):
        build_views("mocov2", 8, (0.5,), (0.5,), {"not_an_option": 1})


def test_knn_vote_and_weighting_by_hand():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 0.8]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    q = torch.tensor([[1.0, 0.05], [0.05, 1.0]])
    assert knn_predict_labels(q, bank, labels, 2, k=2).tolist() == [0, 1]
    # k=5 majority vote says class 1 for both; the InstDisc weighting with a small t gives the close class 0 back.
    assert knn_predict_labels(q, bank, labels, 2, k=5).tolist() == [1, 1]
    assert knn_predict_labels(q, bank, labels, 2, k=5, temperature=0.05).tolist() == [0, 1]


def test_knn_monitor_logs_and_leaves_the_backbone_alone():
    L.seed_everything(0)
    dm = digits_views("mocov2")
    model = MoCoV2(data_spec=dm.spec, **{**SMALL, "knn_k": 5}, proj_output_dim=32, queue_size=64)
    assert any(isinstance(c, KNNMonitor) for c in model.configure_callbacks())
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    trainer = quiet_trainer()
    trainer.validate(model, dm)
    assert 0.3 < float(trainer.callback_metrics["val/knn_acc"]) <= 1.0  # random features already beat chance
    for k, v in model.backbone.state_dict().items():  # no BN statistics update, no gradient step
        assert torch.equal(v, before[k]), k


# ---------------------------------------------------------------------------------------------- CLI and DDP


@pytest.mark.slow
def test_digits_config_through_the_cli(in_tmp):
    r = run_ddkit(["fit", "-c", str(REPO / "configs/digits/scdd/pretrain_swav.yaml"), "--trainer.max_epochs", "1",
                   "--trainer.limit_train_batches", "3", "--trainer.enable_progress_bar", "false"], cwd=in_tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = torch.load(in_tmp / "outputs/digits/scdd/pretrain_swav/last.ckpt", weights_only=True)
    assert ckpt["ddkit_ssl"]["method"] == "swav"


@pytest.mark.distributed
def test_two_process_ddp_ssl_fit_finishes(in_tmp):
    r = run_ddkit(["fit", "-c", str(REPO / "configs/digits/scdd/pretrain_mocov2.yaml"), "--trainer.max_epochs", "1",
                   "--trainer.limit_train_batches", "4", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
                   "--trainer.strategy", "ddp", "--trainer.enable_progress_bar", "false",
                   "--data.init_args.batch_size", "32"], cwd=in_tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = torch.load(in_tmp / "outputs/digits/scdd/pretrain_mocov2/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4
    # the keys of both ranks went into the queue: 4 steps x 2 ranks x 2 directions x 32
    assert int(ckpt["ssl_memory_banks"]["criterion.memory_bank"]["ptr"]) == 4 * 2 * 2 * 32


def test_shuffle_seed_fixes_the_view_order_per_epoch():
    """``shuffle_seed`` orders epoch e by the permutation of seed + e: equal for equal seeds, new every epoch."""
    def order(seed: int, epoch: int) -> list[int]:
        dm = SSLDataModule(views="mocov2", dataset="digits", batch_size=64, shuffle_seed=seed)
        dm.setup("fit")
        sampler = dm.train_dataloader().sampler
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(3, 0) == order(3, 0)
    assert order(3, 0) != order(3, 1) and order(3, 0) != order(4, 0)
    assert sorted(order(3, 1)) == list(range(len(order(3, 1))))
