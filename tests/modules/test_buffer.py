"""ExpertTraining: experts in sequence, GSAM, the digits buffer through the CLI, resume, and DDP sharding."""

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from ddkit.datamodules.real import RealDataModule
from ddkit.errors import DDKitError
from ddkit.formats.buffer import ExpertBuffer, flatten_params
from ddkit.modules.buffer import ExpertTraining
from tests.conftest import REPO, run_ddkit

CONFIG = str(REPO / "configs/digits/mtt/buffer.yaml")
# 3 experts x 2 epochs on 256 digits (4 batches of 64 per epoch).
SMALL = ["--model.num_experts", "3", "--model.epochs", "2", "--data.train_subset", "256",
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def _fit_in_process(tmp_path: Path, **kwargs) -> tuple[ExpertTraining, pl.Trainer]:
    data = RealDataModule("digits", batch_size=32, train_subset=64, shuffle_seed=0)
    module = ExpertTraining(data_spec=data.spec, buffer=str(tmp_path / "buf"),
                            net_kwargs={"depth": 2, "width": 8}, seed=5, **kwargs)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, data)
    return module, trainer


def test_experts_run_in_sequence_from_their_own_seeds(tmp_path):
    module, trainer = _fit_in_process(tmp_path, num_experts=2, epochs=2)
    assert trainer.current_epoch == 4  # the module sets max_epochs = experts x epochs
    buf = ExpertBuffer(tmp_path / "buf")
    assert (buf.num_experts, buf.epochs) == (2, 2)
    for k in range(2):
        init = flatten_params(list(module._fresh_net(module.expert_seed(k)).parameters()))
        assert torch.equal(buf.params(k, 0), init)  # each expert starts from its own fresh initialisation
        assert buf.expert_metadata(k)["seed"] == module.expert_seed(k)
    assert not torch.equal(buf.params(0, 0), buf.params(1, 0))
    assert torch.equal(buf.params(1, 2), flatten_params(list(module.net.parameters())))
    recipe = buf.meta.recipe
    assert recipe["optimizer"] == "sgd" and recipe["lr"] == 0.01 and recipe["momentum"] == 0.0
    assert recipe["augment"] == "dsa" and recipe["batch_size"] == 32 and recipe["gsam"] is None


def test_gsam_experts_on_zca_data_take_two_passes_per_step(tmp_path):
    calls = []

    class Counting(ExpertTraining):
        def on_fit_start(self) -> None:
            self.net.register_forward_hook(lambda *args: calls.append(self.training))

    data = RealDataModule("digits", batch_size=32, train_subset=64, shuffle_seed=0, zca=True)
    module = Counting(data_spec=data.spec, buffer=str(tmp_path / "buf"), net_kwargs={"depth": 2, "width": 8},
                      num_experts=1, epochs=1, gsam=True)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, data)
    assert trainer.global_step == 2 and calls == [True] * 4  # 2 steps x 2 forward/backward passes
    buf = ExpertBuffer(tmp_path / "buf")
    assert buf.meta.recipe["optimizer"] == "gsam+sgd"
    assert buf.meta.recipe["gsam"] == {"rho": 0.01, "alpha": 0.3, "adaptive": True}
    assert buf.meta.data_spec.zca and buf.meta.zca  # the experts' whitening is stored with them
    assert all(torch.equal(buf.zca[k], v) for k, v in data.zca.state_dict().items())


def test_bad_options():
    spec = RealDataModule("digits").spec
    with pytest.raises(DDKitError, match="buffer: the output directory"):
        ExpertTraining(data_spec=spec)
    with pytest.raises(DDKitError, match="num_experts: must be >= 1, got 0"):
        ExpertTraining(data_spec=spec, buffer="b", num_experts=0)
    with pytest.raises(DDKitError, match="augment: must be one of"):
        ExpertTraining(data_spec=spec, buffer="b", augment="mixup")


# ------------------------------------------------------------------------------------------------ CLI runs


def _ok(res) -> None:
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.fixture(scope="module")
def cli_buffer(tmp_path_factory) -> Path:
    """The digits MTT buffer config with small overrides, one uninterrupted single-process run."""
    cwd = tmp_path_factory.mktemp("cli")
    _ok(run_ddkit(["fit", "-c", CONFIG, *SMALL], cwd=cwd))
    return cwd / "buffers/digits/mtt"


def test_cli_writes_a_valid_buffer(cli_buffer):
    buf = ExpertBuffer(cli_buffer)
    assert (buf.num_experts, buf.epochs) == (3, 2)
    assert buf.meta.net_kwargs == {"depth": 3, "width": 32, "norm": "instance"}
    assert buf.meta.data_spec.dataset == "digits" and buf.zca is None
    net = buf.build_net()
    assert sum(p.numel() for p in net.parameters()) == buf.num_params
    for k in range(3):
        t = buf.trajectory(k)
        assert not torch.equal(t[0], t[1]) and not torch.equal(t[1], t[2])  # it trained
    assert buf.meta.recipe["batch_size"] == 64 and buf.meta.recipe["train_subset"] == 256
    assert sorted(p.name for p in cli_buffer.iterdir()) == [f"expert_{k:04d}.safetensors" for k in range(3)] + [
        "meta.json"]


def test_cli_resume_reproduces_the_trajectories(cli_buffer, in_tmp):
    # Stop after 3 of 6 epochs (4 steps each): expert 0 is written, expert 1 has 1 of 2 epochs.
    _ok(run_ddkit(["fit", "-c", CONFIG, *SMALL, "--trainer.max_steps", "12"], cwd=in_tmp))
    out = in_tmp / "buffers/digits/mtt"
    assert sorted(p.name for p in out.glob("expert_*")) == ["expert_0000.safetensors"]
    assert (in_tmp / "runs/digits_mtt_buffer/checkpoints/last.ckpt").is_file()
    _ok(run_ddkit(["fit", "-c", CONFIG, *SMALL, "--ckpt_path", "last"], cwd=in_tmp))
    resumed, full = ExpertBuffer(out), ExpertBuffer(cli_buffer)
    assert resumed.num_experts == 3
    for k in range(3):
        assert torch.equal(resumed.trajectory(k), full.trajectory(k))


@pytest.mark.distributed
def test_ddp_shards_experts(cli_buffer, in_tmp):
    res = run_ddkit(["fit", "-c", CONFIG, *SMALL, "--trainer.accelerator", "cpu", "--trainer.devices", "2",
                     "--trainer.strategy", "ddp"], cwd=in_tmp, timeout=600)
    _ok(res)
    buf, full = ExpertBuffer(in_tmp / "buffers/digits/mtt"), ExpertBuffer(cli_buffer)
    assert buf.expert_indices == [0, 1, 2]
    # Rank r trains experts r, r + 2, ...: each file has one writer, and rank 1 idles while rank 0 trains expert 2.
    assert [buf.expert_metadata(k)["rank"] for k in range(3)] == [0, 1, 0]
    assert all(buf.expert_metadata(k)["world_size"] == 2 for k in range(3))
    # No gradient exchange: every expert is exactly the one the single-process run trained.
    for k in range(3):
        assert torch.equal(buf.trajectory(k), full.trajectory(k))
    assert not list((in_tmp / "buffers/digits/mtt").glob(".*"))  # no temporary files left
