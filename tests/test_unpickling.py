"""No unsafe unpickling: a crafted pickle whose ``__reduce__`` would run ``os.system`` is refused, as a reference
expert buffer (``replay_buffer_0.pt``) and as a Lightning checkpoint given to ``--ckpt_path``, and never runs; ddkit's
own checkpoints still load with ``weights_only=True``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from ddkit.cli import main
from ddkit.datamodules.real import RealDataModule
from ddkit.errors import DDKitError
from ddkit.formats.buffer import import_reference_buffer

TINY = {"depth": 1, "width": 8}
CLASSIFIER = ["fit", "--model", "ddkit.modules.classifier.Classifier", "--model.net", "convnet",
              "--model.net_kwargs", json.dumps(TINY), "--data", "ddkit.datamodules.real.RealDataModule",
              "--data.dataset", "digits", "--data.batch_size", "256", "--trainer.max_epochs", "1",
              "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
              "--trainer.logger", "false", "--checkpoint.dirpath", "ckpt"]


class _Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _live(marker: Path, tmp_path: Path) -> None:
    """The payload is real: an unsafe load does run it."""
    torch.save(_Payload(marker), tmp_path / "live.pt")
    torch.load(tmp_path / "live.pt", weights_only=False)
    assert marker.exists()
    marker.unlink()


def test_crafted_expert_buffer_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "ran"
    _live(marker, tmp_path)
    torch.save([[_Payload(marker)]], tmp_path / "replay_buffer_0.pt")
    with pytest.raises(DDKitError, match=r"^files: cannot be read with torch.load\(weights_only=True\) "
                                         r"\(UnpicklingError: .*posix.system"):
        import_reference_buffer([str(tmp_path / "replay_buffer_0.pt")], str(tmp_path / "out"), "convnet", TINY,
                                RealDataModule("digits").spec)
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_crafted_checkpoint_is_refused_and_does_not_run(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "ran"
    _live(marker, tmp_path)
    monkeypatch.chdir(tmp_path)
    main(CLASSIFIER)  # a real checkpoint, then the same dict with a payload in it
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)  # ddkit's own: plain types only
    ckpt["hyper_parameters"]["payload"] = _Payload(marker)
    torch.save(ckpt, tmp_path / "crafted.ckpt")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # not even this makes ddkit load unsafely
    for ckpt_path in ("crafted.ckpt", "last"):
        if ckpt_path == "last":
            os.replace(tmp_path / "crafted.ckpt", tmp_path / "ckpt" / "last.ckpt")
        with pytest.raises(SystemExit) as e:
            main([*CLASSIFIER, "--trainer.max_epochs", "2", "--ckpt_path", ckpt_path])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1, err
        assert err[0].startswith("error: ckpt_path: cannot be read with torch.load(weights_only=True) "
                                 "(UnpicklingError: ") and "posix.system" in err[0] and ckpt_path in err[0]
        assert not marker.exists()
    with pytest.raises(SystemExit) as e:
        main([*CLASSIFIER, "--ckpt_path", "last", "--weights_only", "false"])
    assert e.value.code == 2 and not marker.exists()
    assert capsys.readouterr().err.strip() == "error: weights_only: ddkit reads checkpoints with weights_only=True " \
                                              "only, got False"
