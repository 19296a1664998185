"""A CLI error is exactly one line on stderr, checked on a real ``ddkit`` process (in-process tests capture
``sys.stderr`` but not the stream of Lightning's logging handler, where ``Seed set to 0`` used to appear first)."""

from __future__ import annotations

import pytest

from tests.conftest import REPO, run_ddkit

RECOVER = ["fit", "-c", str(REPO / "configs/digits/sre2l/recover_ipc10.yaml")]
CLASSIFIER = ["fit", "--model", "ddkit.modules.classifier.Classifier", "--model.net", "convnet",
              "--data", "ddkit.datamodules.real.RealDataModule", "--data.dataset", "digits"]


@pytest.mark.parametrize("args, line", [
    # found while building the module, after Lightning has seeded the run
    pytest.param([*CLASSIFIER, "--model.lr", "0"], "error: lr: must be > 0, got 0.0", id="module-option"),
    pytest.param([*RECOVER, "--model.teacher", "nope.safetensors"],
                 "error: teacher: file not found, got 'nope.safetensors'", id="shipped-config-missing-teacher"),
    # found before anything is built
    pytest.param([*RECOVER, "--trainer.devices", "0"],
                 "error: trainer.devices: must be a number of CPU processes >= 1 or auto, got '0'", id="trainer-option"),
])
def test_cli_error_is_exactly_one_line_on_stderr(tmp_path, args, line):
    # PYTHONWARNINGS as a user has it (unset), not the test runner's "ignore"
    result = run_ddkit(args, tmp_path, env={"PYTHONWARNINGS": ""}, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.splitlines() == [line]
    assert list(tmp_path.iterdir()) == []
