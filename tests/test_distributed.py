"""DDP on CPU: 2 processes on one machine, and 2 simulated nodes of one process each."""

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, run_ddkit

DIGITS = str(REPO / "configs/digits/classifier.yaml")
pytestmark = pytest.mark.distributed


def final_metrics(root: Path) -> dict[str, float]:
    with open(next(root.rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    out = {}
    for r in rows:
        out.update({k: float(v) for k, v in r.items() if v not in ("", None)})
    return out


def fit_args(logdir: str, batch_size: int, extra: list[str]) -> list[str]:
    return ["fit", "-c", DIGITS, "--trainer.max_epochs", "4", "--trainer.accelerator", "cpu",
            "--trainer.enable_progress_bar", "false", "--data.init_args.batch_size", str(batch_size),
            "--model.init_args.net_kwargs", "{width: 32}",
            "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", logdir, *extra]


def test_two_process_ddp_agrees_with_one_process(tmp_path):
    one = run_ddkit(fit_args("one", 64, ["--trainer.devices", "1"]), cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    # Same global batch: 2 processes x 32.
    two = run_ddkit(fit_args("two", 32, ["--trainer.devices", "2", "--trainer.strategy", "ddp"]), cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = final_metrics(tmp_path / "one"), final_metrics(tmp_path / "two")
    assert a["val/acc"] > 0.85 and b["val/acc"] > 0.85
    assert abs(a["val/acc"] - b["val/acc"]) < 0.05
    assert abs(a["train/loss"] - b["train/loss"]) < 0.15


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_simulated_with_one_process_each(tmp_path):
    port = str(free_port())
    procs = []
    for node in (0, 1):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port, "NODE_RANK": str(node)}
        args = fit_args(f"node{node}", 32, ["--trainer.devices", "1", "--trainer.num_nodes", "2",
                                              "--trainer.strategy", "ddp", "--trainer.max_epochs", "2"])
        procs.append(subprocess.Popen([sys.executable, "-m", "ddkit.cli", *args], cwd=tmp_path, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "world_size: 2" in outs[0][1] or "distributed_backend=gloo" in outs[0][1]
    assert final_metrics(tmp_path / "node0")["val/acc"] > 0.5
