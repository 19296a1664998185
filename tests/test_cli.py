"""The ddkit command: help, quiet output, print_config, a digits fit, precision, and one-line errors."""

import csv
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from ddkit.cli import main
from tests.conftest import REPO, run_ddkit

DIGITS = str(REPO / "configs/digits/classifier.yaml")


def last_metric(csv_path: Path, key: str) -> float:
    with open(csv_path) as f:
        rows = [r for r in csv.DictReader(f) if r.get(key)]
    return float(rows[-1][key])


COMMANDS = ("fit", "validate", "test", "predict", "evaluate", "chain", "show", "teacher", "export")


def test_help_lists_every_command_on_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    listed = [ln.split()[0] for ln in capsys.readouterr().out.splitlines() if ln.startswith("  ") and ln.strip()]
    assert [c for c in listed if c in COMMANDS] == list(COMMANDS)


def test_help_imports_neither_torch_nor_lightning(in_tmp):
    code = ("import sys\nfrom ddkit.cli import main\nsys.argv = ['ddkit', '--help']\ntry:\n    main()\n"
            "except SystemExit:\n    pass\nprint('heavy:', sorted(m for m in ('torch', 'lightning') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], cwd=in_tmp, capture_output=True, text=True, timeout=120,
                         check=False)
    assert res.returncode == 0, res.stderr
    assert "evaluate" in res.stdout and res.stdout.strip().splitlines()[-1] == "heavy: []"


def quiet_env() -> dict[str, str]:
    """The environment a user's shell gives: no PYTHONWARNINGS (Python's default warning filters)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    return {**env, "OMP_NUM_THREADS": "1"}


def run_fit(cwd: Path, *extra: str) -> list[str]:
    """``ddkit fit`` of the digits classifier for one epoch, stdout a pipe (not a terminal); stdout + stderr lines."""
    res = subprocess.run([sys.executable, "-m", "ddkit.cli", "fit", "-c", DIGITS, "--trainer.max_epochs", "1",
                          *extra], cwd=cwd, env=quiet_env(), capture_output=True, text=True, timeout=300,
                         check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    return (res.stdout + res.stderr).splitlines()


def test_a_fit_with_stdout_not_a_terminal_prints_no_chatter_and_a_status_line(in_tmp):
    lines = run_fit(in_tmp)
    text = "\n".join(lines)
    for chatter in ("GPU available", "TPU available", "Seed set"):
        assert chatter not in text
    assert not [ln for ln in lines if "Warning" in ln or "site-packages" in ln or "warnings.warn" in ln], text
    assert len(lines) < 30, text
    assert "\r" not in text  # no progress-bar redraws in a log file
    assert any(ln.startswith("epoch 1/1 step 22") and "val/acc" in ln for ln in lines), text  # the status line


def test_verbose_brings_the_chatter_back(in_tmp):
    text = "\n".join(run_fit(in_tmp, "--verbose", "--trainer.limit_train_batches", "2"))
    assert "Seed set to 0" in text and "GPU available" in text


def test_a_buffer_sets_its_epochs_without_lightnings_max_epochs_warning(in_tmp):
    buffer = str(REPO / "configs/digits/mtt/buffer.yaml")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(["fit", "-c", buffer, "--model.init_args.buffer", "buf", "--model.init_args.num_experts", "1",
              "--model.init_args.epochs", "2", "--trainer.limit_train_batches", "2", "--trainer.logger", "false",
              "--trainer.enable_progress_bar", "false", "--checkpoint.dirpath", "ckpt"])
    assert not [w for w in caught if "max_epochs" in str(w.message)]
    assert sorted(p.name for p in Path("buf").iterdir()) == ["expert_0000.safetensors", "meta.json"]


def test_print_config_documents_every_model_option(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "-c", DIGITS, "--print_config"])
    cfg = yaml.safe_load(capsys.readouterr().out)
    init = cfg["model"]["init_args"]
    for option in ("net", "net_kwargs", "optimizer", "lr", "schedule", "augment", "export_teacher"):
        assert option in init
    assert cfg["checkpoint"]["save_last"] is True
    assert cfg["trainer"]["logger"]["class_path"].endswith("TensorBoardLogger")


def test_digits_classifier_fit_through_the_cli(in_tmp):
    main(["fit", "-c", DIGITS, "--trainer.max_epochs", "8", "--trainer.enable_progress_bar", "false",
          "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", "logs",
          "--model.init_args.export_teacher", "teacher.safetensors"])
    metrics = next(Path("logs").rglob("metrics.csv"))
    assert last_metric(metrics, "val/acc") > 0.9  # val = the real test split here
    assert next(Path("logs").rglob("last.ckpt")).is_file()
    from ddkit.formats.teacher import load_teacher

    _, meta = load_teacher("teacher.safetensors")
    assert meta.net == "convnet" and meta.data_spec.dataset == "digits"


def test_bf16_mixed_fit_on_cpu(in_tmp):
    main(["fit", "-c", DIGITS, "--trainer.max_epochs", "1", "--trainer.precision", "bf16-mixed",
          "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"])
    assert next(Path(".").rglob("last.ckpt")).is_file()


@pytest.mark.parametrize("override, message", [
    (["--data.init_args.dataset", "svhn"], "error: dataset: unknown name"),
    (["--model.init_args.net", "nonet"], "error: net: unknown name"),
    (["--model.init_args.lr", "-1"], "error: lr: must be > 0, got -1.0"),
    (["--data.init_args.batch_size", "0"], "error: batch_size: must be > 0, got 0"),
    (["--model.init_args.augment", "magic"], "error: augment: must be one of"),
])
def test_bad_input_is_one_line_and_exit_2(in_tmp, capsys, override, message):
    with pytest.raises(SystemExit) as e:
        main(["fit", "-c", DIGITS, "--trainer.max_epochs", "1", *override])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.strip().splitlines()[-1].startswith(message) and "DDKitError" not in err
    assert not Path(in_tmp, "runs").exists()


def test_the_installed_command_exits_2_with_one_line(in_tmp):
    res = run_ddkit(["fit", "-c", DIGITS, "--model.init_args.lr", "0"], cwd=in_tmp, timeout=180)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1] == "error: lr: must be > 0, got 0.0"
    assert "Traceback" not in res.stderr and "Warning" not in res.stderr


def test_test_with_a_fits_checkpoint_logs_into_that_fits_run(in_tmp):
    """``ddkit test --ckpt_path runs/<name>/version_0/...`` logs beside the fit (no version_1, no dirpath warning),
    and the fit's config.yaml is kept."""
    quiet = ["--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false"]
    assert run_ddkit(["fit", "-c", DIGITS, *quiet], cwd=in_tmp).returncode == 0
    run = in_tmp / "runs" / "digits_classifier"
    config = (run / "version_0" / "config.yaml").read_text()
    res = run_ddkit(["test", "-c", DIGITS, "--ckpt_path", "runs/digits_classifier/version_0/checkpoints/last.ckpt"],
                    cwd=in_tmp)
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(p.name for p in run.iterdir()) == ["version_0"]
    assert "dirpath has changed" not in res.stderr
    assert (run / "version_0" / "config.yaml").read_text() == config
    assert len(list((run / "version_0").glob("events.out.tfevents.*"))) == 2  # the fit's and the test's
