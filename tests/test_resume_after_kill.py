"""Resume after SIGKILL, every stage through the CLI: a tiny CPU fit checkpoints at every epoch (or step), is killed
with SIGKILL at a drawn time after its k-th checkpoint file appears (mid-epoch or mid-step, not only at a checkpoint),
resumes with ``--ckpt_path last``, and its final artifact must equal an uninterrupted run's, bit for bit
(``torch.equal``; every stage is deterministic on CPU).

Kill points (k = the k-th checkpoint file, then a delay; one per stage runs in ``make test``, the others are
``slow``), drawn once from ``random.Random(5)`` over each stage's checkpoints except the last (delays from
``random.Random(6)``) and listed in ``KILL_POINTS``. The buffer stage is also killed at a drawn time while it runs
from its shipped config (``configs/digits/mtt/buffer.yaml``), which must checkpoint mid-run by itself.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from ddkit.datamodules.real import RealDataModule
from ddkit.formats.common import load_tensors
from ddkit.formats.distilled import DistilledSet, save_distilled
from ddkit.formats.teacher import TeacherMeta, save_teacher
from ddkit.nets import build_net
from tests.test_bad_inputs import _buffer

TINY = json.dumps({"depth": 1, "width": 8})
COMMON = ["fit", "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.logger", "false",
          "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
          "--trainer.num_sanity_val_steps", "0", "--trainer.limit_val_batches", "0",
          "--checkpoint.dirpath", "ckpt", "--checkpoint.save_top_k", "-1", "--checkpoint.filename", "{epoch}-{step}"]
EVERY_EPOCH = ["--checkpoint.every_n_epochs", "1"]
EVERY_STEP = ["--checkpoint.every_n_train_steps", "1"]
REAL = ["--data", "ddkit.datamodules.real.RealDataModule", "--data.dataset", "digits", "--data.batch_size", "512",
        "--data.shuffle_seed", "0"]

# stage: (arguments, number of checkpoint files an uninterrupted run writes, artifact)
STAGES = {
    "classifier": ([*EVERY_EPOCH, "--trainer.max_epochs", "4", "--model", "ddkit.modules.classifier.Classifier",
                    "--model.net", "convnet", "--model.net_kwargs", TINY, "--model.export_teacher", "out.safetensors",
                    *REAL], 4, "out.safetensors"),
    "ssl": ([*EVERY_EPOCH, "--trainer.max_epochs", "4", "--model", "ddkit.modules.ssl.MoCoV2", "--model.net",
             "convnet_bn", "--model.net_kwargs", TINY, "--model.proj_hidden_dim", "16", "--model.proj_output_dim", "8",
             "--model.queue_size", "64", "--data", "ddkit.datamodules.ssl.SSLDataModule", "--data.dataset", "digits",
             "--data.views", "mocov2", "--data.batch_size", "512", "--data.knn_bank_size", "0"], 4, "ckpt/last.ckpt"),
    "probe": ([*EVERY_EPOCH, "--trainer.max_epochs", "4", "--model", "ddkit.modules.probe.LinearProbe",
               "--model.ssl_checkpoint", "{ssl_checkpoint}", "--model.lr", "1.0",
               "--model.export_teacher", "out.safetensors", *REAL], 4, "out.safetensors"),
    "recover": ([*EVERY_STEP, "--model", "ddkit.modules.recover.Recover", "--model.teacher", "{teacher}",
                 "--model.ipc", "2", "--model.batch_size", "5", "--model.iterations", "3", "--model.jitter", "1",
                 "--model.crop", "false", "--model.flip", "false", "--model.log_images_every_n_steps", "0",
                 "--model.export", "null", "--model.output", "out", "--data", "ddkit.datamodules.recover.RecoverJobs",
                 "--data.dataset", "digits"], 12, "out/images.safetensors"),
    "matching": ([*EVERY_STEP, "--trainer.max_steps", "6", "--model", "ddkit.modules.matching.TrajectoryMatching",
                  "--model.mode", "mtt", "--model.pix_init", "real", "--model.ipc", "1", "--model.syn_steps", "3",
                  "--model.expert_epochs", "1", "--model.max_start_epoch", "2",
                  "--model.output", "out", "--data", "ddkit.datamodules.experts.ExpertSegments",
                  "--data.buffer", "{buffer}"], 6, "out/last/images.safetensors"),
    "buffer": ([*EVERY_EPOCH, "--model", "ddkit.modules.buffer.ExpertTraining", "--model.buffer", "out",
                "--model.num_experts", "2", "--model.epochs", "2", "--model.net_kwargs", TINY, "--model.augment", "dsa",
                "--trainer.use_distributed_sampler", "false", *REAL], 4, "out"),
    "kd": ([*EVERY_EPOCH, "--trainer.max_epochs", "4", "--model", "ddkit.modules.kd.KDStudent", "--model.net",
            "convnet", "--model.net_kwargs", TINY, "--model.teacher", "{teacher}", "--model.augment", "none",
            "--model.mix", "none", "--data", "ddkit.datamodules.distilled.DistilledDataModule",
            "--data.distilled", "{distilled}", "--data.dataset", "digits", "--data.batch_size", "10"],
           4, "ckpt/last.ckpt"),
}


def _kill_points(seed: int = 5, per_stage: int = 3, max_delay: float = 0.2) -> list:
    """``per_stage`` distinct k per stage in [1, checkpoints - 1], each with a delay in [0, ``max_delay``) seconds;
    the first of each stage runs in ``make test``."""
    rng, delays = random.Random(seed), random.Random(seed + 1)
    points = []
    for stage, (_, n, _) in STAGES.items():
        ks = rng.sample(range(1, n), min(per_stage, n - 1))
        for i, k in enumerate(ks):
            delay = round(delays.uniform(0, max_delay), 3)
            points.append(pytest.param(stage, k, delay, id=f"{stage}-k{k}-{delay}s",
                                       marks=() if i == 0 else pytest.mark.slow))
    return points


KILL_POINTS = _kill_points()


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _command(stage: str, inputs: dict[str, str]) -> list[str]:
    args = [*COMMON, *STAGES[stage][0]]
    for name, path in inputs.items():
        args = [a.replace("{" + name + "}", path) for a in args]
    return [sys.executable, "-m", "ddkit.cli", *args]


def _run(cmd: list[str], cwd: Path) -> None:
    res = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-3000:]


def _checkpoints(cwd: Path) -> list[Path]:
    return [p for p in (cwd / "ckpt").glob("*.ckpt") if not p.name.startswith("last")] if (cwd / "ckpt").is_dir() \
        else []


def _run_and_kill(cmd: list[str], cwd: Path, ready: Callable[[], bool], delay: float, what: str) -> None:
    """Start ``cmd`` and SIGKILL it ``delay`` seconds after ``ready()`` first holds."""
    child = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not ready():
        assert child.poll() is None, f"finished before {what}: {child.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(delay)
    assert child.poll() is None, f"finished within {delay} s after {what}: pick a shorter delay"
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL


def _artifact(path: Path) -> dict[str, torch.Tensor]:
    """The tensors to compare: a safetensors file, every safetensors file of a directory, or a Lightning
    checkpoint's state_dict."""
    if path.is_dir():
        return {f"{f.name}/{k}": v for f in sorted(path.glob("*.safetensors")) for k, v in _artifact(f).items()}
    if path.suffix == ".ckpt":
        return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return load_tensors(path, "artifact")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    """A BN teacher, a distilled set and an expert buffer (written with the APIs), and the SSL stage's checkpoint
    (an uninterrupted SSL run, also the reference of the SSL kill tests)."""
    root = tmp_path_factory.mktemp("resume_inputs")
    spec = RealDataModule("digits").spec
    torch.manual_seed(0)
    save_teacher(root / "teacher.safetensors", build_net("convnet_bn", 10, 1, 8, depth=1, width=8).eval(),
                 TeacherMeta("convnet_bn", {"depth": 1, "width": 8}, spec))
    x, y, _, _ = RealDataModule("digits").load_tensors()
    idx = torch.cat([torch.nonzero(y == c).flatten()[:2] for c in range(10)])
    save_distilled(DistilledSet(images=x[idx], labels=y[idx], spec=spec, ipc=2, method="random"), root / "distilled")
    _buffer(root / "buffer")
    paths = {"teacher": str(root / "teacher.safetensors"), "distilled": str(root / "distilled"),
             "buffer": str(root / "buffer"), "root": str(root)}
    (root / "ssl").mkdir()
    _run(_command("ssl", paths), root / "ssl")
    paths["ssl_checkpoint"] = str(root / "ssl" / "ckpt" / "last.ckpt")
    return paths


@pytest.fixture(scope="module")
def uninterrupted(inputs, tmp_path_factory):
    """The artifact of an uninterrupted run per stage (made once, on first use)."""
    done: dict[str, dict[str, torch.Tensor]] = {}

    def get(stage: str) -> dict[str, torch.Tensor]:
        if stage not in done:
            cwd = Path(inputs["root"]) / "ssl" if stage == "ssl" else tmp_path_factory.mktemp(f"whole_{stage}")
            if stage != "ssl":
                _run(_command(stage, inputs), cwd)
            assert len(_checkpoints(cwd)) == STAGES[stage][1]
            done[stage] = _artifact(cwd / STAGES[stage][2])
        return done[stage]

    return get


@pytest.mark.parametrize("stage, k, delay", KILL_POINTS)
def test_killed_run_resumes_to_the_uninterrupted_result(inputs, uninterrupted, tmp_path, stage, k, delay):
    cmd = _command(stage, inputs)
    _run_and_kill(cmd, tmp_path, lambda: len(_checkpoints(tmp_path)) >= k, delay, f"its checkpoint {k}")
    _run([*cmd, "--ckpt_path", "last"], tmp_path)
    resumed, whole = _artifact(tmp_path / STAGES[stage][2]), uninterrupted(stage)
    assert resumed.keys() == whole.keys()
    different = [name for name in whole if not torch.equal(resumed[name], whole[name])]
    assert not different, f"{stage}: resumed != uninterrupted in {different}"


SHIPPED_BUFFER = [sys.executable, "-m", "ddkit.cli", "fit", "-c", str(Path(__file__).resolve().parents[1] /
                  "configs/digits/mtt/buffer.yaml"), "--model.num_experts", "2", "--model.epochs", "3",
                  "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
                  "--trainer.enable_model_summary", "false"]


def test_buffer_from_its_shipped_config_resumes_mid_run(tmp_path):
    """Killed at a drawn time inside the second expert (``--ckpt_path last`` from the config's own checkpoints),
    the buffer equals an uninterrupted run's, and the finished first expert is not trained again."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    whole.mkdir()
    cut.mkdir()
    _run(SHIPPED_BUFFER, whole)
    buffer = Path("buffers/digits/mtt")
    first = cut / buffer / "expert_0000.safetensors"
    delay = round(random.Random(7).uniform(0.2, 1.0), 3)
    _run_and_kill(SHIPPED_BUFFER, cut, first.exists, delay, "its first expert")
    finished = first.stat().st_mtime_ns
    assert not (cut / buffer / "expert_0001.safetensors").exists()
    _run([*SHIPPED_BUFFER, "--ckpt_path", "last"], cut)
    assert first.stat().st_mtime_ns == finished
    resumed, uninterrupted = _artifact(cut / buffer), _artifact(whole / buffer)
    assert resumed.keys() == uninterrupted.keys() and len(resumed) == 2
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


@pytest.mark.parametrize("stage", ["classifier", "matching"])
def test_a_run_killed_after_its_final_checkpoint_still_writes_its_artifact(inputs, uninterrupted, tmp_path, stage):
    """The window a drawn kill time can hit: every epoch/step done and checkpointed, the artifact not yet written.
    The resumed run has no training left (Lightning skips the train-end hooks) and must still write it, equal."""
    cmd = _command(stage, inputs)
    _run(cmd, tmp_path)
    artifact = tmp_path / STAGES[stage][2]
    if stage == "matching":
        shutil.rmtree(artifact.parent)
    else:
        artifact.unlink()
    _run([*cmd, "--ckpt_path", "last"], tmp_path)
    resumed, whole = _artifact(artifact), uninterrupted(stage)
    assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole)
