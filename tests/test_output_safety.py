"""What a run may write and resume, through the CLI as a user runs it (subprocesses):

- an output path holding the user's files, or the working directory, is refused before any work, nothing deleted;
- an earlier artifact of the same kind is replaced only with ``overwrite: true``;
- a second run on an output another run holds is refused at once (advisory lock), and the first run's set is its own;
- a reader of a set that another process keeps replacing gets the old or the new set, whole;
- ``--ckpt_path FILE`` of another stage, or with other options than the run's, is refused in one line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from ddkit.datamodules.real import RealDataModule
from ddkit.formats.common import sha256_file
from ddkit.formats.distilled import DistilledSet, load_distilled, save_distilled
from ddkit.formats.output import lock_path
from tests.conftest import run_ddkit
from tests.test_bad_inputs import _teacher

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--trainer.logger", "false"]


def _recover(teacher: Path, output: str, iterations: int = 2, seed: int = 0) -> list[str]:
    return ["fit", *QUIET, "--trainer.enable_checkpointing", "false", "--model", "ddkit.modules.recover.Recover",
            "--model.teacher", str(teacher), "--model.ipc", "1", "--model.batch_size", "10",
            "--model.iterations", str(iterations), "--model.export", "null", "--model.seed", str(seed),
            "--model.log_images_every_n_steps", "0", "--model.output", output,
            "--data", "ddkit.datamodules.recover.RecoverJobs", "--data.dataset", "digits"]


def _tree(root: Path) -> dict[str, str]:
    """Every file below ``root`` with its sha256 (what a run must leave as it was)."""
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def _one_line_exit_2(res: subprocess.CompletedProcess, start: str) -> None:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(f"error: {start}"), res.stderr[-3000:]


def test_recover_into_a_folder_of_user_files_is_refused_and_deletes_nothing(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    teacher = _teacher(models / "teacher.safetensors")
    (models / "notes.txt").write_text("mine\n")
    before = _tree(tmp_path)
    res = run_ddkit(_recover(teacher, "models"), cwd=tmp_path)
    _one_line_exit_2(res, "output: already holds files that are not a ddkit DistilledSet")
    assert _tree(tmp_path) == before


def test_the_working_directory_as_output_is_refused(tmp_path):
    teacher = _teacher(tmp_path / "teacher.safetensors")
    before = _tree(tmp_path)
    for output in (".", str(tmp_path.parent)):
        res = run_ddkit(_recover(teacher, output), cwd=tmp_path)
        _one_line_exit_2(res, "output: must not be the working directory or one of its parents")
    assert _tree(tmp_path) == before


def test_an_earlier_set_is_replaced_only_with_overwrite(tmp_path):
    teacher = _teacher(tmp_path / "teacher.safetensors")
    assert run_ddkit(_recover(teacher, "out", seed=1), cwd=tmp_path).returncode == 0
    first = _tree(tmp_path / "out")
    res = run_ddkit(_recover(teacher, "out", seed=2), cwd=tmp_path)
    _one_line_exit_2(res, "output: already holds a DistilledSet from an earlier run; set overwrite: true")
    assert _tree(tmp_path / "out") == first
    res = run_ddkit([*_recover(teacher, "out", seed=2), "--model.overwrite", "true"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert load_distilled(tmp_path / "out").extra["seed"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "teacher.safetensors"]  # no lock or work left


def test_a_second_run_on_a_held_output_is_refused_at_once(tmp_path):
    """The first run (long) holds the output; a second run with another seed stops with one line before any work;
    once the first has stopped (Ctrl-C), its lock is gone and the output is free again."""
    teacher = _teacher(tmp_path / "teacher.safetensors")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    first = subprocess.Popen([sys.executable, "-m", "ddkit.cli", *_recover(teacher, "out", iterations=10**7, seed=1)],
                             cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not lock_path(tmp_path / "out").exists():
            assert first.poll() is None, first.stderr.read()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        second = run_ddkit(_recover(teacher, "out", seed=2), cwd=tmp_path)
        _one_line_exit_2(second, "output: in use by another ddkit run")
        assert first.poll() is None  # still running, untouched by the second
    finally:
        first.send_signal(signal.SIGINT)
        first.wait(timeout=120)
    assert not lock_path(tmp_path / "out").exists() and not (tmp_path / "out").exists()
    again = run_ddkit(_recover(teacher, "out", seed=2), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert load_distilled(tmp_path / "out").extra["seed"] == 2


def test_a_reader_sees_the_old_or_the_new_set_whole_while_a_writer_replaces_it(tmp_path):
    spec = RealDataModule("digits").spec
    labels = torch.arange(10).repeat(2)
    sets = [DistilledSet(images=torch.full((20, 1, 8, 8), float(v)), labels=labels, spec=spec, ipc=2, method="random",
                         extra={"value": v}) for v in (1, 2)]
    save_distilled(sets[0], tmp_path / "set")
    stop, errors = threading.Event(), []

    def write() -> None:
        i = 0
        while not stop.is_set():
            try:
                save_distilled(sets[i % 2], tmp_path / "set")
            except Exception as e:  # noqa: BLE001 (reported by the test below)
                errors.append(e)
            i += 1

    writer = threading.Thread(target=write)
    writer.start()
    try:
        seen, loads, deadline = set(), 0, time.monotonic() + 120
        while (len(seen) < 2 or loads < 100) and time.monotonic() < deadline:
            loads += 1
            ds = load_distilled(tmp_path / "set")
            value = ds.extra["value"]
            assert torch.equal(ds.images, torch.full((20, 1, 8, 8), float(value)))  # tensors of the same version
            seen.add(value)
    finally:
        stop.set()
        writer.join()
    assert not errors
    assert seen == {1, 2}  # both versions were read while the writer ran


# ------------------------------------------------------------------------------------------ --ckpt_path FILE

CLASSIFIER = ["fit", *QUIET, "--trainer.max_epochs", "1", "--model", "ddkit.modules.classifier.Classifier",
              "--model.net", "convnet", "--model.net_kwargs", json.dumps({"depth": 1, "width": 8}),
              "--data", "ddkit.datamodules.real.RealDataModule", "--data.dataset", "digits",
              "--checkpoint.dirpath", "ckpt"]


def test_a_checkpoint_is_resumed_only_by_its_own_stage_with_its_own_options(tmp_path):
    res = run_ddkit(CLASSIFIER, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = str(tmp_path / "ckpt" / "last.ckpt")
    teacher = _teacher(tmp_path / "teacher.safetensors")
    distilled = tmp_path / "set"
    x, y, _, _ = RealDataModule("digits").load_tensors()
    idx = torch.cat([torch.nonzero(y == c).flatten()[:1] for c in range(10)])
    save_distilled(DistilledSet(images=x[idx], labels=y[idx], spec=RealDataModule("digits").spec, ipc=1,
                                method="random"), distilled)
    before = _tree(tmp_path)
    kd = ["fit", *QUIET, "--trainer.max_epochs", "2", "--model", "ddkit.modules.kd.KDStudent", "--model.net",
          "convnet", "--model.net_kwargs", json.dumps({"depth": 1, "width": 8}), "--model.teacher", str(teacher),
          "--data", "ddkit.datamodules.distilled.DistilledDataModule", "--data.distilled", str(distilled),
          "--data.dataset", "digits", "--data.batch_size", "10", "--checkpoint.dirpath", "ckpt2"]
    res = run_ddkit([*kd, "--ckpt_path", ckpt], cwd=tmp_path)
    _one_line_exit_2(res, "ckpt_path: written by a ddkit.modules.classifier.Classifier run; resume it with that stage")
    res = run_ddkit([*CLASSIFIER, "--trainer.max_epochs", "2", "--model.lr", "0.9", "--ckpt_path", ckpt],
                    cwd=tmp_path)
    _one_line_exit_2(res, "model.lr: the checkpoint was made with lr=0.01; resume with the same value")
    assert _tree(tmp_path) == before
    res = run_ddkit([*CLASSIFIER, "--trainer.max_epochs", "2", "--ckpt_path", ckpt], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
