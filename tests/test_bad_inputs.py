"""Bad input, end to end: every case goes through ``ddkit.cli.main`` in-process (or the public API where the CLI
cannot reach it) and must end with a non-zero exit, exactly one line ``error: <field>: ...`` on stderr naming the
field and the bad value, no traceback, and nothing written to the working directory (logs, checkpoints, artifacts).

Cases (id: what is wrong):

- dataset-unknown: ``data.dataset: svhn`` (no such dataset)
- net-unknown: ``model.net: nonet`` (no such architecture)
- ssl-views-unknown: ``data.views: mocov9`` (no such SSL view recipe)
- ssl-method-unknown: ``model.class_path: ddkit.modules.ssl.MoCoV9`` (no such SSL method)
- batch-size-zero: ``data.batch_size: 0``
- batch-size-negative-recover: ``model.batch_size: -1`` (recover's classes per job)
- lr-zero: ``model.lr: 0`` (classifier)
- lr-nan: ``model.lr: nan`` (classifier; refused by the parser, reported as one line too)
- lr-negative-probe: ``model.lr: -1`` (linear probe)
- lr-img-zero: ``model.lr_img: 0`` (matching)
- lr-teacher-negative: ``model.lr_teacher: -0.5`` (matching's initial step size)
- ipc-zero-recover: ``model.ipc: 0``
- ipc-negative-matching: ``model.ipc: -2``
- ipc-too-large-real-init: ``model.ipc: 1000`` with ``pix_init: real`` (a digits class has ~145 training images)
- dataset-files-missing: ``data.dataset: mnist`` with ``data.root`` an empty folder
- teacher-missing: ``model.teacher`` a path that does not exist
- teacher-truncated: the teacher's safetensors file cut in half
- teacher-not-safetensors: the teacher file is random bytes
- teacher-without-bn: an instance-norm teacher for recover
- teacher-class-mismatch: a 5-class teacher on 10-class digits
- teacher-image-size-mismatch: a 16-px teacher on 8-px digits (wrong image shape for the net)
- teacher-nan: NaN in a teacher weight
- ssl-checkpoint-missing: probe ``model.ssl_checkpoint`` does not exist
- ssl-checkpoint-corrupt: probe ``model.ssl_checkpoint`` is random bytes
- buffer-missing: matching ``data.buffer`` does not exist
- buffer-param-count: the buffer's parameter count (a width-16 net's) does not match its net (width 8)
- buffer-too-few-epochs: ``max_start_epoch + expert_epochs`` > the buffer's epochs
- buffer-expert-truncated: an expert's safetensors file cut short
- distilled-missing: KD ``data.distilled`` does not exist
- distilled-checksum: ``images.safetensors`` changed after it was written (sha256 in meta.json differs)
- distilled-truncated: ``labels.safetensors`` cut short
- distilled-nan: NaN in the distilled images (checksums rewritten, so only the finiteness check can catch it)
- distilled-meta-corrupt: ``meta.json`` is not JSON
- kd-temperature-zero: ``model.temperature: 0``
- output-unwritable: recover ``model.output`` below a regular file (the directory cannot be created)
- export-teacher-unwritable: classifier ``model.export_teacher`` below a regular file
- evaluate-ipc-zero: ``ddkit evaluate --ipc 0``
- teacher-import-missing: ``ddkit teacher import`` of a checkpoint file that does not exist
- teacher-import-not-torch: ``ddkit teacher import`` of random bytes
- option-wrong-type: ``data.batch_size: many`` (not an int; a parser error, reported as one line)

Run-time cases (the run starts, then stops with one line and exit 2; the last good set is kept):

- buffer-nan: NaN in expert trajectories (rows are read lazily, when a segment needs them)
- step-size-negative: matching with a huge ``lr_lr`` turns the step size negative -> stop, ``<output>/last`` kept
- importer-nan, importer-layout: a reference ``replay_buffer_0.pt`` with NaN / a missing parameter tensor
  (public API ``import_reference_buffer``; nothing written)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ddkit.cli import main
from ddkit.datamodules.real import RealDataModule
from ddkit.errors import DDKitError
from ddkit.formats.buffer import BufferMeta, expert_file, save_expert, write_buffer_meta
from ddkit.formats.common import save_tensors, sha256_file
from ddkit.formats.distilled import DistilledSet, save_distilled
from ddkit.formats.teacher import TeacherMeta, save_teacher
from ddkit.nets import build_net
from ddkit.ops.matching_grad import flatten_params

TINY = {"depth": 1, "width": 8}
QUIET = ["--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false"]


# --------------------------------------------------------------------------------------------------- fixtures


def _teacher(path: Path, net: str = "convnet_bn", num_classes: int = 10, image_size: int = 8,
             nan: bool = False) -> Path:
    """An untrained width-8 ConvNet-D1 teacher file for a digits-like spec."""
    spec = RealDataModule("digits").spec
    spec = type(spec).from_dict({**spec.to_dict(), "num_classes": num_classes, "image_size": image_size,
                                 "class_names": [str(c) for c in range(num_classes)]})
    torch.manual_seed(0)
    model = build_net(net, num_classes, 1, image_size, **TINY)
    if nan:
        with torch.no_grad():
            model.head.weight[0, 0] = float("nan")
    save_teacher(path, model, TeacherMeta(net, TINY, spec))
    return path


def _buffer(path: Path, epochs: int = 3, meta_width: int = 8, nan: bool = False) -> Path:
    """Two random-walk experts of a width-8 ConvNet-D1 (instance norm) on digits; ``meta_width`` other than 8 records
    the parameter shapes of a net of that width under the name of the width-8 one; ``nan`` puts a NaN in every row
    but the first (written around ``save_expert``, which refuses non-finite values)."""
    spec = RealDataModule("digits").spec
    torch.manual_seed(0)
    net = build_net("convnet", 10, 1, 8, **{**TINY, "width": meta_width})
    write_buffer_meta(path, BufferMeta.for_net("convnet", TINY, spec, net, epochs, {"optimizer": "sgd", "lr": 0.01}))
    start = flatten_params(net)
    for k in range(2):
        rows = start + 0.01 * torch.randn(epochs + 1, start.numel()).cumsum(0)
        file = save_expert(path, k, rows)
        if nan:
            with safe_open(str(file), framework="pt") as f:
                header = f.metadata()
            rows[1:, 0] = float("nan")
            save_tensors(file, {"trajectory": rows}, metadata=header)
    return path


def _distilled(path: Path) -> Path:
    spec = RealDataModule("digits").spec
    g = torch.Generator().manual_seed(0)
    ds = DistilledSet(images=torch.randn(20, 1, 8, 8, generator=g), labels=torch.arange(10).repeat(2), spec=spec,
                      ipc=2, method="random")
    save_distilled(ds, path)
    return path


def _rewrite_checksums(path: Path) -> None:
    meta = json.loads((path / "meta.json").read_text())
    for name in meta["files"]:
        meta["files"][name] = sha256_file(path / name)
    (path / "meta.json").write_text(json.dumps(meta))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    """Every input file a case names, good and bad, in one folder outside the working directory."""
    root = tmp_path_factory.mktemp("inputs")
    paths = {"root": root}
    paths["teacher"] = _teacher(root / "teacher.safetensors")
    paths["teacher_truncated"] = _teacher(root / "teacher_truncated.safetensors")
    _truncate(paths["teacher_truncated"])
    paths["teacher_random"] = root / "teacher_random.safetensors"
    paths["teacher_random"].write_bytes(os.urandom(2000))
    paths["teacher_no_bn"] = _teacher(root / "teacher_no_bn.safetensors", net="convnet")
    paths["teacher_5_classes"] = _teacher(root / "teacher_5.safetensors", num_classes=5)
    paths["teacher_16px"] = _teacher(root / "teacher_16px.safetensors", image_size=16)
    paths["teacher_nan"] = _teacher(root / "teacher_nan.safetensors", nan=True)
    paths["buffer"] = _buffer(root / "buffer")
    paths["buffer_params"] = _buffer(root / "buffer_params", meta_width=16)
    paths["buffer_truncated"] = _buffer(root / "buffer_truncated")
    _truncate(paths["buffer_truncated"] / expert_file(1))
    paths["buffer_nan"] = _buffer(root / "buffer_nan", nan=True)
    paths["distilled"] = _distilled(root / "distilled")
    paths["distilled_checksum"] = _distilled(root / "distilled_checksum")
    save_tensors(paths["distilled_checksum"] / "images.safetensors", {"images": torch.zeros(20, 1, 8, 8)})
    paths["distilled_truncated"] = _distilled(root / "distilled_truncated")
    _truncate(paths["distilled_truncated"] / "labels.safetensors")
    _rewrite_checksums(paths["distilled_truncated"])  # so that the truncation itself is what is caught
    paths["distilled_nan"] = _distilled(root / "distilled_nan")
    images = torch.randn(20, 1, 8, 8)
    images[3, 0, 1, 1] = float("inf")
    save_tensors(paths["distilled_nan"] / "images.safetensors", {"images": images})
    _rewrite_checksums(paths["distilled_nan"])
    paths["distilled_meta"] = _distilled(root / "distilled_meta")
    (paths["distilled_meta"] / "meta.json").write_text("{not json")
    paths["random_bytes"] = root / "random.ckpt"
    paths["random_bytes"].write_bytes(os.urandom(3000))
    paths["empty_dir"] = root / "empty"
    paths["empty_dir"].mkdir()
    paths["a_file"] = root / "a_file"
    paths["a_file"].write_text("not a directory\n")
    return {k: str(v) for k, v in paths.items()}


# ------------------------------------------------------------------------------------------------ the cases

CLASSIFIER = ["fit", *QUIET, "--model", "ddkit.modules.classifier.Classifier", "--model.net", "convnet",
              "--model.net_kwargs", json.dumps(TINY), "--data", "ddkit.datamodules.real.RealDataModule",
              "--data.dataset", "digits", "--data.batch_size", "64"]
SSL = ["fit", *QUIET, "--model", "ddkit.modules.ssl.MoCoV2", "--model.net", "convnet_bn", "--model.net_kwargs", json.dumps(TINY),
       "--data", "ddkit.datamodules.ssl.SSLDataModule", "--data.dataset", "digits", "--data.views", "mocov2"]
PROBE = ["fit", *QUIET, "--model", "ddkit.modules.probe.LinearProbe", "--model.ssl_checkpoint", "{random_bytes}",
         "--data", "ddkit.datamodules.real.RealDataModule", "--data.dataset", "digits"]
RECOVER = ["fit", *QUIET, "--model", "ddkit.modules.recover.Recover", "--model.teacher", "{teacher}", "--model.ipc", "1",
           "--model.batch_size", "10", "--model.iterations", "2", "--model.output", "out",
           "--data", "ddkit.datamodules.recover.RecoverJobs", "--data.dataset", "digits"]
MATCHING = ["fit", *QUIET, "--model", "ddkit.modules.matching.TrajectoryMatching", "--model.mode", "mtt", "--model.ipc", "1",
            "--model.syn_steps", "2", "--model.expert_epochs", "1", "--model.max_start_epoch", "2",
            "--model.pix_init", "real", "--model.output", "out", "--trainer.max_steps", "2",
            "--data", "ddkit.datamodules.experts.ExpertSegments", "--data.buffer", "{buffer}"]
KD = ["fit", *QUIET, "--model", "ddkit.modules.kd.KDStudent", "--model.net", "convnet", "--model.net_kwargs", json.dumps(TINY),
      "--model.teacher", "{teacher}", "--model.augment", "none", "--model.mix", "none",
      "--data", "ddkit.datamodules.distilled.DistilledDataModule", "--data.distilled", "{distilled}",
      "--data.dataset", "digits", "--data.batch_size", "10"]


def _with(base: list[str], **overrides: str) -> list[str]:
    """``base`` with ``--<key> value`` replaced or appended (keys use ``__`` for ``.``)."""
    args = list(base)
    for key, value in overrides.items():
        flag = "--" + key.replace("__", ".")
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    return args


# (id, argv, expected start of the error line after "error: ")
CASES = [
    ("dataset-unknown", _with(CLASSIFIER, data__dataset="svhn"), "dataset: unknown name"),
    ("net-unknown", _with(CLASSIFIER, model__net="nonet"), "net: unknown name"),
    ("ssl-views-unknown", _with(SSL, data__views="mocov9"), "views: must be one of"),
    ("ssl-method-unknown", _with(SSL, model="ddkit.modules.ssl.MoCoV9"),
     "model: module 'ddkit.modules.ssl' has no attribute 'MoCoV9', got 'ddkit.modules.ssl.MoCoV9'"),
    ("batch-size-zero", _with(CLASSIFIER, data__batch_size="0"), "batch_size: must be > 0, got 0"),
    ("batch-size-negative-recover", _with(RECOVER, model__batch_size="-1"), "batch_size: must be an integer > 0"),
    ("lr-zero", _with(CLASSIFIER, model__lr="0"), "lr: must be > 0, got 0.0"),
    ("lr-nan", _with(CLASSIFIER, model__lr="nan"), "model.lr: Expected a <class 'float'>. Got value: nan"),
    ("lr-negative-probe", _with(PROBE, model__lr="-1"), "lr: must be > 0, got -1.0"),
    ("lr-img-zero", _with(MATCHING, model__lr_img="0"), "lr_img: must be a finite number > 0, got 0.0"),
    ("lr-teacher-negative", _with(MATCHING, model__lr_teacher="-0.5"),
     "lr_teacher: must be a finite number > 0, got -0.5"),
    ("ipc-zero-recover", _with(RECOVER, model__ipc="0"), "ipc: must be an integer > 0, got 0"),
    ("ipc-negative-matching", _with(MATCHING, model__ipc="-2"), "ipc: must be > 0, got -2"),
    ("ipc-too-large-real-init", _with(MATCHING, model__ipc="1000"), "ipc: class 0 has only"),
    ("dataset-files-missing", _with(CLASSIFIER, data__dataset="mnist", data__root="{empty_dir}"),
     "dataset: mnist IDX files not found"),
    ("teacher-missing", _with(RECOVER, model__teacher="{root}/nope.safetensors"), "teacher: file not found"),
    ("teacher-truncated", _with(RECOVER, model__teacher="{teacher_truncated}"), "teacher: not a valid safetensors"),
    ("teacher-not-safetensors", _with(RECOVER, model__teacher="{teacher_random}"),
     "teacher: not a valid safetensors"),
    ("teacher-without-bn", _with(RECOVER, model__teacher="{teacher_no_bn}"), "teacher: has no BatchNorm layers"),
    ("teacher-class-mismatch", _with(RECOVER, model__teacher="{teacher_5_classes}"),
     "teacher: made for num_classes=5 but the data has num_classes=10"),
    ("teacher-image-size-mismatch", _with(KD, model__teacher="{teacher_16px}"),
     "teacher: made for image_size=16 but the data has image_size=8"),
    ("teacher-nan", _with(RECOVER, model__teacher="{teacher_nan}"), "teacher[head.weight]: contains 1 non-finite"),
    ("ssl-checkpoint-missing", _with(PROBE, model__ssl_checkpoint="{root}/nope.ckpt"),
     "ssl_checkpoint: file not found"),
    ("ssl-checkpoint-corrupt", PROBE, "ssl_checkpoint: cannot be read with torch.load(weights_only=True)"),
    ("buffer-missing", _with(MATCHING, data__buffer="{root}/nope"), "buffer: directory not found"),
    ("buffer-param-count", _with(MATCHING, data__buffer="{buffer_params}"),
     "buffer: parameter count 5962 does not match net convnet (2986)"),
    ("buffer-too-few-epochs", _with(MATCHING, model__max_start_epoch="3"),
     "buffer.epochs: must be >= max_start_epoch + expert_epochs = 4, got 3"),
    ("buffer-expert-truncated", _with(MATCHING, data__buffer="{buffer_truncated}"),
     "buffer.expert_0001.safetensors: not a valid safetensors file"),
    ("distilled-missing", _with(KD, data__distilled="{root}/nope"), "distilled: directory not found"),
    ("distilled-checksum", _with(KD, data__distilled="{distilled_checksum}"),
     "distilled.images.safetensors: sha256 checksum mismatch"),
    ("distilled-truncated", _with(KD, data__distilled="{distilled_truncated}"),
     "distilled.labels: not a valid safetensors file"),
    ("distilled-nan", _with(KD, data__distilled="{distilled_nan}"),
     "distilled[distilled_nan].images: contains 1 non-finite values"),
    ("distilled-meta-corrupt", _with(KD, data__distilled="{distilled_meta}"), "distilled.meta: not valid JSON"),
    ("kd-temperature-zero", _with(KD, model__temperature="0"), "temperature: must be a finite number > 0, got 0.0"),
    ("output-unwritable", _with(RECOVER, model__output="{a_file}/out"), "output: '{a_file}' is not a directory"),
    ("export-teacher-unwritable", _with(CLASSIFIER, model__export_teacher="{a_file}/teacher.safetensors"),
     "export_teacher: '{a_file}' is not a directory"),
    ("evaluate-ipc-zero", ["evaluate", "--data.dataset", "digits", "--baselines", "[random]", "--ipc", "0"],
     "ipc: must be > 0, got 0"),
    ("teacher-import-missing", ["teacher", "import", "missing.pth", "--net", "resnet18", "--dataset", "imagenet",
                                "--output", "t.safetensors"], "checkpoint: file not found, got 'missing.pth'"),
    ("teacher-import-not-torch", ["teacher", "import", "{teacher_random}", "--net", "resnet18", "--dataset",
                                  "imagenet", "--output", "t.safetensors"],
     "checkpoint: cannot be read with torch.load(weights_only=True)"),
    ("option-wrong-type", _with(CLASSIFIER, data__batch_size="many"),
     "data.batch_size: Expected a <class 'int'>. Got value: many"),
]


def _fill(arg: str, inputs: dict[str, str]) -> str:
    """``arg`` with every ``{name}`` of ``inputs`` replaced by its path."""
    for name, path in inputs.items():
        arg = arg.replace("{" + name + "}", path)
    return arg


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("argv, expected", [pytest.param(a, e, id=i) for i, a, e in CASES])
def test_bad_input_is_one_line_exit_2_nothing_written(inputs, tmp_path, monkeypatch, capsys, argv, expected):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    argv = [_fill(a, inputs) for a in argv]
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert e.value.code not in (0, None), err
    assert len(lines) == 1 and lines[0].startswith(f"error: {_fill(expected, inputs)}"), err[-3000:]
    assert "got" in lines[0] or "Got value" in lines[0]  # the bad value (or file) is named
    assert "Traceback" not in err
    assert _listing(work) == []


# Found only while running (a buffer is read lazily, a step size goes bad after an update): the run stops with one
# line and exit 2, keeping what it wrote so far (logs, and the last good set where there is one).
RUNTIME_CASES = [
    ("buffer-nan", _with(MATCHING, data__buffer="{buffer_nan}", trainer__max_steps="4"),
     "buffer.expert_000"),
    ("step-size-negative", _with(MATCHING, model__lr_lr="1e6", trainer__max_steps="4"),
     "step_size: the update at iteration 0 made it"),
]


@pytest.mark.parametrize("argv, expected", [pytest.param(a, e, id=i) for i, a, e in RUNTIME_CASES])
def test_bad_value_found_while_running_stops_with_one_line(inputs, tmp_path, monkeypatch, capsys, argv, expected):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main([_fill(a, inputs) for a in argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {expected}"), err[-3000:]
    assert "Traceback" not in err
    if "step_size" in expected:  # stop: the last good set (the initial one here) is written and valid
        from ddkit.formats.distilled import load_distilled

        assert load_distilled(tmp_path / "out" / "last").step_size == pytest.approx(0.01)


def test_reference_buffer_with_nan_or_wrong_shapes_is_refused(tmp_path):
    """The ``replay_buffer_{n}.pt`` importer (public API): NaN and a wrong parameter count, nothing written."""
    from ddkit.formats.buffer import import_reference_buffer

    spec = RealDataModule("digits").spec
    net = build_net("convnet", 10, 1, 8, **TINY)
    params = [p.detach().clone() for p in net.parameters()]
    nan = [[t.clone() for t in params] for _ in range(3)]
    nan[2][0][0] = float("nan")
    short = [params[:-1], params[:-1]]
    for name, expert, message in (("nan", nan, r"contains \d+ non-finite"),
                                  ("short", short, r"must be a list of \d+ parameter tensors")):
        file = tmp_path / f"replay_buffer_{name}.pt"
        torch.save([expert], file)
        with pytest.raises(DDKitError, match=message):
            import_reference_buffer([str(file)], str(tmp_path / name), "convnet", TINY, spec)
        assert not (tmp_path / name).exists()


# ----------------------------------------------------------------- checkpoint paths and evaluate's output (in-process)

CHECKPOINT_AND_OUTPUT_CASES = [
    ("ckpt-missing", [*CLASSIFIER, "--ckpt_path", "{root}/nope.ckpt"], "ckpt_path: file not found, got '{root}/nope.ckpt'"),
    ("ckpt-directory", [*CLASSIFIER, "--ckpt_path", "{empty_dir}"], "ckpt_path: is a directory, not a file"),
    ("ckpt-truncated", [*CLASSIFIER, "--ckpt_path", "{ckpt_truncated}"],
     "ckpt_path: cannot be read with torch.load(weights_only=True)"),
    ("ckpt-last-truncated", [*CLASSIFIER, "--checkpoint.dirpath", "{ckpt_dir}", "--ckpt_path", "last"],
     "ckpt_path: cannot be read with torch.load(weights_only=True)"),
    ("evaluate-output-a-file", ["evaluate", "--data.dataset", "digits", "--baselines", "[random]", "--ipc", "1",
                                "--output", "{a_file}"], "output: must be a directory ddkit writes"),
    ("evaluate-output-under-a-file", ["evaluate", "--data.dataset", "digits", "--baselines", "[random]", "--ipc", "1",
                                      "--output", "{a_file}/report"], "output: '{a_file}' is not a directory"),
    ("evaluate-output-user-files", ["evaluate", "--data.dataset", "digits", "--baselines", "[random]", "--ipc", "1",
                                    "--output", "{distilled}"],
     "output: already holds files that are not a ddkit evaluation report"),
]


@pytest.fixture(scope="module")
def checkpoint_inputs(inputs) -> dict[str, str]:
    """A truncated checkpoint file, and a checkpoint folder whose last.ckpt is truncated."""
    root = Path(inputs["root"]) / "checkpoints"
    (root / "dir").mkdir(parents=True)
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "epoch": 1}, root / "whole.ckpt")
    data = (root / "whole.ckpt").read_bytes()
    (root / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (root / "dir" / "last.ckpt").write_bytes(data[: len(data) // 2])
    return {**inputs, "ckpt_truncated": str(root / "truncated.ckpt"), "ckpt_dir": str(root / "dir")}


@pytest.mark.parametrize("argv, expected", [pytest.param(a, e, id=i) for i, a, e in CHECKPOINT_AND_OUTPUT_CASES])
def test_bad_checkpoint_or_output_is_one_line_nothing_written_or_removed(checkpoint_inputs, tmp_path, monkeypatch,
                                                                          capsys, argv, expected):
    inputs = checkpoint_inputs
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    before = _listing(Path(inputs["root"]))
    with pytest.raises(SystemExit) as e:
        main([_fill(a, inputs) for a in argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {_fill(expected, inputs)}"), err
    assert "got" in lines[0]
    assert _listing(work) == [] and _listing(Path(inputs["root"])) == before


# --------------------------------------------------- full and read-only disks (a tmpfs in a private mount namespace)

_IN_NAMESPACE = r"""
import json, subprocess, sys
mnt, mode, work = sys.argv[1], sys.argv[2], sys.argv[3]
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "ddkit-test", mnt], check=True)
subprocess.run(["mkdir", "-p", mnt + "/sub"], check=True)
if mode == "full":  # every block taken: the next write gets ENOSPC
    subprocess.run(["dd", "if=/dev/zero", "of=" + mnt + "/filler", "bs=4096"], capture_output=True)
else:
    subprocess.run(["mount", "-o", "remount,ro", mnt], check=True)
res = subprocess.run([sys.executable, "-m", "ddkit.cli", *sys.argv[4:]], cwd=work, capture_output=True, text=True)
files = sorted(subprocess.run(["find", mnt, "-mindepth", "1"], capture_output=True, text=True).stdout.split())
print(json.dumps({"code": res.returncode, "stderr": res.stderr, "files": files}))
"""


def _on_small_disk(tmp_path: Path, mode: str, argv: list[str]) -> dict:
    """Run ``ddkit <argv>`` with a 512 KiB tmpfs at ``<tmp_path>/disk`` (``mode``: ``full`` or ``ro``), in a user
    and mount namespace of its own (``unshare -rm``: no privileges needed, nothing stays mounted)."""
    disk, work = tmp_path / "disk", tmp_path / "work"
    disk.mkdir()
    work.mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    res = subprocess.run(["unshare", "-rm", sys.executable, "-c", _IN_NAMESPACE, str(disk), mode, str(work),
                          *[a.replace("{disk}", str(disk)) for a in argv]],
                         capture_output=True, text=True, env=env, timeout=600, check=False)
    assert res.returncode == 0, f"could not set up the test filesystem: {res.stderr[-2000:]}"
    return json.loads(res.stdout.strip().splitlines()[-1])


FAST = ["--trainer.logger", "false", "--trainer.enable_checkpointing", "false"]
DISK_CASES = [
    ("teacher-export", [*CLASSIFIER, *FAST, "--model.export_teacher", "{disk}/sub/teacher.safetensors"]),
    ("recover", _with([*RECOVER, *FAST], model__output="{disk}/sub/out", model__export="png")),
    ("matching", _with([*MATCHING, *FAST], model__output="{disk}/sub/out")),
    ("evaluate", ["evaluate", "--data.dataset", "digits", "--baselines", "[random]", "--ipc", "1", "--seeds", "1",
                  "--epochs", "1", "--progress", "false", "--output", "{disk}/sub/report"]),
]


@pytest.mark.parametrize("argv", [pytest.param(a, id=i) for i, a in DISK_CASES])
def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(inputs, tmp_path, argv):
    out = _on_small_disk(tmp_path, "full", [_fill(a, inputs) for a in argv])
    disk = str(tmp_path / "disk")
    assert out["files"] == [f"{disk}/filler", f"{disk}/sub"], out["files"]  # no temp, partial or lock file
    lines = out["stderr"].strip().splitlines()
    assert out["code"] == 2 and len(lines) == 1, out["stderr"][-3000:]
    assert lines[0].startswith("error: output: no space left on device"), lines


def test_a_read_only_output_is_one_line_before_any_work(inputs, tmp_path):
    argv = ["evaluate", "--data.dataset", "digits", "--baselines", "[random]", "--ipc", "1", "--output",
            "{disk}/sub/report"]
    out = _on_small_disk(tmp_path, "ro", argv)
    lines = out["stderr"].strip().splitlines()
    assert out["code"] == 2 and len(lines) == 1, out["stderr"][-3000:]
    assert lines[0].startswith(f"error: output: directory '{tmp_path / 'disk' / 'sub'}' is not writable"), lines
    assert out["files"] == [str(tmp_path / "disk" / "sub")]
