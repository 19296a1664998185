"""The ddkit command: help, print_config, a digits fit, precision, and one-line errors."""

import csv
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


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(cmd in out for cmd in ("fit", "validate", "test"))


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
