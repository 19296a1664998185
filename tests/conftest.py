"""Shared fixtures: small data built in the test, and a ddkit runner in a clean working directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _few_threads():
    # Two cores are shared by the test process and any subprocesses it starts.
    torch.set_num_threads(1)
    yield


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Run the test with the working directory in a fresh temporary folder (runs/ lands there)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_ddkit(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``python -m ddkit.cli <args>`` as a subprocess (needed for DDP, which re-launches the command)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([sys.executable, "-m", "ddkit.cli", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout, check=False)
