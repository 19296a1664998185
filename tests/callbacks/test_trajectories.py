"""RecordTrajectory on a plain one-network fit (the Classifier), through a real Trainer on CPU."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from ddkit.callbacks.trajectories import RecordTrajectory
from ddkit.datamodules.spec import DataSpec
from ddkit.errors import DDKitError
from ddkit.formats.buffer import ExpertBuffer, flatten_params
from ddkit.modules.classifier import Classifier

SPEC = DataSpec("digits", 10, 1, 8, (0.3,), (0.4,), class_names=tuple(str(i) for i in range(10)))


def _classifier(width: int = 4) -> Classifier:
    torch.manual_seed(0)
    return Classifier(data_spec=SPEC, net="convnet", net_kwargs={"depth": 2, "width": width}, lr=0.1,
                      momentum=0.9, weight_decay=0.0, schedule="constant")


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(48, 1, 8, 8, generator=g), torch.randint(0, 10, (48,), generator=g))
    return DataLoader(data, batch_size=16, shuffle=False)


class _EpochSpy(pl.Callback):
    """Parameters at the end of every training epoch, taken independently of RecordTrajectory."""

    def __init__(self) -> None:
        self.rows: list[torch.Tensor] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.rows.append(flatten_params(list(pl_module.net.parameters())))


def _trainer(epochs: int, callbacks: list, root=None, **kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=callbacks, default_root_dir=root,
                      enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks), **kwargs)


def test_rows_are_init_then_every_epoch(tmp_path):
    module = _classifier()
    initial = flatten_params(list(module.net.parameters()))
    spy, record = _EpochSpy(), RecordTrajectory(str(tmp_path / "buf"), expert_index=3)
    _trainer(3, [record, spy]).fit(module, _loader())
    buf = ExpertBuffer(tmp_path / "buf")
    assert (buf.num_experts, buf.expert_indices, buf.epochs) == (1, [3], 3)
    traj = buf.trajectory(0)
    assert traj.shape == (4, sum(p.numel() for p in module.net.parameters()))
    assert torch.equal(traj[0], initial)  # epoch 0 = the parameters before the first update
    assert torch.equal(traj[-1], flatten_params(list(module.net.parameters())))  # last row = final parameters
    for e in range(3):
        assert torch.equal(traj[e + 1], spy.rows[e])  # one row per epoch
    assert not torch.equal(traj[1], traj[0]) and not torch.equal(traj[2], traj[1])
    meta = buf.meta
    assert meta.net == "convnet" and meta.net_kwargs == {"depth": 2, "width": 4} and meta.data_spec == SPEC
    assert meta.recipe["lr"] == 0.1 and meta.recipe["module"] == "Classifier"
    assert buf.expert_metadata(0)["rank"] == 0


def test_resume_continues_the_trajectory(tmp_path):
    full = RecordTrajectory(str(tmp_path / "full"))
    _trainer(4, [full]).fit(_classifier(), _loader())

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = RecordTrajectory(str(tmp_path / "resumed"))
    with pytest.warns(UserWarning, match="stopped after 2 of 4 epochs and was not written"):
        _trainer(4, [first, ckpt], max_steps=6).fit(_classifier(), _loader())  # 3 batches/epoch: stops after 2
    assert not list((tmp_path / "resumed").glob("expert_*"))
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["callbacks"][first.state_key]
    assert state["expert"] == 0 and state["rows"].shape[0] == 3

    second = RecordTrajectory(str(tmp_path / "resumed"))
    _trainer(4, [second, ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)]).fit(
        _classifier(), _loader(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    a, b = ExpertBuffer(tmp_path / "full").trajectory(0), ExpertBuffer(tmp_path / "resumed").trajectory(0)
    assert a.shape == (5, a.shape[1])
    assert torch.equal(a, b)


def test_an_existing_buffer_of_another_net_is_refused(tmp_path):
    _trainer(1, [RecordTrajectory(str(tmp_path / "buf"))]).fit(_classifier(width=4), _loader())
    with pytest.raises(DDKitError, match="already holds a buffer of another net"):
        _trainer(1, [RecordTrajectory(str(tmp_path / "buf"))]).fit(_classifier(width=8), _loader())
    _trainer(1, [RecordTrajectory(str(tmp_path / "buf"), expert_index=1)]).fit(_classifier(width=4), _loader())
    assert ExpertBuffer(tmp_path / "buf").num_experts == 2  # the same net adds an expert


def test_state_dict_round_trip():
    cb = RecordTrajectory("unused")
    cb.rows, cb.expert, cb.written = [torch.zeros(5), torch.ones(5)], 2, [0]
    other = RecordTrajectory("unused")
    other.load_state_dict(cb.state_dict())
    assert other.expert == 2 and other.written == [0] and torch.equal(torch.stack(other.rows), torch.stack(cb.rows))
    empty = RecordTrajectory("unused")
    empty.load_state_dict(RecordTrajectory("unused").state_dict())
    assert empty.rows == [] and empty.expert is None
