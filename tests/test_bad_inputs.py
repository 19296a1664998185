"""Bad input, end to end: every case goes through ``ddkit.cli.main`` in-process (or the public API where the CLI
cannot reach it) and must end with exit code 2, exactly one line ``error: <field>: ...`` on stderr naming the
field and the bad value, no traceback, nothing written to the working directory (logs, checkpoints, artifacts) and
the inputs folder unchanged. (``tests/test_one_line_errors.py`` checks the one line on a real process's stderr.)

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

Values inside artifacts (one value of a written artifact edited; ``DISTILLED_EDITS``, ``TEACHER_EDITS``,
``BUFFER_EDITS``):

- distilled-ipc-string, -ipc-fraction, -ipc-bool, -ipc-absurd: meta.json ``ipc`` is ``"2"``, 2.5, true, 10**15
- distilled-num-classes-string, -num-classes-huge: ``data_spec.num_classes`` is ``"10"`` or 1e15
- distilled-image-size-float, -in-chans-zero, -mean-length, -std-zero, -zca-string, -class-names-short,
  -data-spec-list: other ``data_spec`` fields of the wrong type or size
- distilled-files-list: ``files`` is not a mapping
- teacher-header-not-json, -header-no-net, -net-kwargs-list: the teacher's ddkit header is not JSON, lacks
  ``net``, or its ``net_kwargs`` is a list
- teacher-pretrained, teacher-checkpoint-path: the teacher asks timm for ``pretrained`` weights or a
  ``checkpoint_path`` (refused: ddkit builds nets from scratch)
- teacher-num-classes-huge, teacher-image-size-string: the teacher's ``data_spec`` says 10**15 classes, ``"8"`` px
- buffer-epochs-string, -net-kwargs-list, -num-classes-huge, -checkpoint-path: the same in a buffer's meta.json

Trainer, seed and checkpoint options (checked before anything is built or seeded):

- devices-zero, devices-negative: ``trainer.devices`` 0 or -2
- max-epochs-negative, max-steps-negative: ``trainer.max_epochs: -5``, ``trainer.max_steps: -3``
- accelerator-gpu, accelerator-tpu, accelerator-unknown: an accelerator this machine does not have (gpu: only
  on a machine without one), or no such accelerator
- seed-negative: ``seed_everything: -1``
- checkpoint-every-n-epochs-negative, checkpoint-every-n-train-steps-negative: negative checkpoint intervals

Config files:

- config-empty, config-only-comments: an empty config, one with only comments
- config-binary, config-latin1: random bytes, a Latin-1 (not UTF-8) file
- config-not-mapping, config-broken-yaml, config-missing: a YAML list, a YAML syntax error, no such file
- evaluate-config-empty: ``ddkit evaluate -c`` an empty file

Resource bombs and sizes (bounded before anything is allocated):

- config-alias-bomb: a config whose YAML aliases expand to 12 billion nodes
- net-kwargs-alias-bomb, net-kwargs-recursive-alias: the same in a command-line value (``model.net_kwargs``)
- net-width-huge, teacher-width-huge, buffer-width-huge: a ``width`` that makes a net of billions of parameters
  (the net is first built on the meta device and its parameter count bounded)
- net-depth-huge, teacher-depth-huge: a ConvNet ``depth`` of a million layers
- image-size-huge: ``data.image_size: 100000``
- net-pretrained: ``model.net_kwargs: {pretrained: true}`` for a timm net

Integrity of a distilled set's ``files`` (meta.json):

- distilled-files-empty: tampered images with ``files: {}`` (no checksum would run)
- distilled-files-escape, distilled-files-absolute: ``../../etc/hostname``, ``/etc/hostname`` listed
- distilled-files-no-labels, distilled-files-zca-unlisted: a tensor file of the format is not listed
- distilled-files-digest: a checksum that is not a sha256 hex digest

Messages that name the right field:

- net-kwargs-image-size: ``model.net_kwargs: {image_size: 3}`` (the size comes from the data)
- image-size-too-small-for-net: a depth-4 ConvNet on 8 px images is an ``image_size`` error, not ``net_kwargs``
- teacher-is-lightning-checkpoint: recover's ``teacher`` is a Lightning ``.ckpt`` (not a "got Classifier" error)
- ssl-checkpoint-is-classifier: the probe's ``ssl_checkpoint`` is a classifier's checkpoint
- ssl-checkpoint-pretrained: the SSL checkpoint's ``net_kwargs`` ask timm for ``pretrained`` weights (named as the
  checkpoint's, not as the user's ``net_kwargs``)

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


def _edit_meta(path: Path, edit) -> Path:
    """``edit(meta)`` applied to ``path/meta.json`` (checksums left as they are)."""
    meta = json.loads((path / "meta.json").read_text())
    edit(meta)
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def _edit_header(path: Path, edit) -> Path:
    """A teacher file whose ``ddkit`` header is rewritten: ``edit(header)`` returns the new dict (or a raw string)."""
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["ddkit"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    new = edit(header)
    save_tensors(path, tensors, metadata={"ddkit": new if isinstance(new, str) else json.dumps(new)})
    return path


def _set(obj: dict, keys: tuple[str, ...], value) -> dict:
    """``obj`` with ``obj[keys[0]][keys[1]]... = value``; ``value`` DROP deletes the key."""
    *parents, last = keys
    for key in parents:
        obj = obj[key]
    if value is DROP:
        del obj[last]
    else:
        obj[last] = value
    return obj


DROP = object()
SHA_ZERO = "0" * 64

# name -> (meta.json keys, new value) of a distilled set with one value changed
DISTILLED_EDITS = {
    "ipc_string": (("ipc",), "2"),
    "ipc_fraction": (("ipc",), 2.5),
    "ipc_bool": (("ipc",), True),
    "ipc_absurd": (("ipc",), 10**15),
    "num_classes_string": (("data_spec", "num_classes"), "10"),
    "num_classes_huge": (("data_spec", "num_classes"), 1e15),
    "image_size_float": (("data_spec", "image_size"), 8.0),
    "in_chans_zero": (("data_spec", "in_chans"), 0),
    "mean_length": (("data_spec", "mean"), [0.1, 0.2, 0.3]),
    "std_zero": (("data_spec", "std"), [0]),
    "zca_string": (("data_spec", "zca"), "yes"),
    "class_names_short": (("data_spec", "class_names"), ["0", "1"]),
    "data_spec_list": (("data_spec",), [10, 1, 8]),
    "files_list": (("files",), ["images.safetensors", "labels.safetensors"]),
    "files_escape": (("files", "../../etc/hostname"), SHA_ZERO),
    "files_absolute": (("files", "/etc/hostname"), SHA_ZERO),
    "files_no_labels": (("files", "labels.safetensors"), DROP),
    "files_zca_unlisted": (("zca",), "zca.safetensors"),
    "files_digest": (("files", "images.safetensors"), "abc"),
}

# name -> function of the teacher's ddkit header (a dict) returning the new header
TEACHER_EDITS = {
    "header_not_json": lambda h: "{not json",
    "header_no_net": lambda h: {k: v for k, v in h.items() if k != "net"},
    "net_kwargs_list": lambda h: {**h, "net_kwargs": [1, 2]},
    "pretrained": lambda h: {**h, "net_kwargs": {**h["net_kwargs"], "pretrained": True}},
    "checkpoint_path": lambda h: {**h, "net_kwargs": {**h["net_kwargs"], "checkpoint_path": "/etc/hostname"}},
    "num_classes_huge": lambda h: {**h, "data_spec": {**h["data_spec"], "num_classes": 10**15}},
    "image_size_string": lambda h: {**h, "data_spec": {**h["data_spec"], "image_size": "8"}},
    "width_huge": lambda h: {**h, "net_kwargs": {**h["net_kwargs"], "width": 10**7}},
    "depth_huge": lambda h: {**h, "net_kwargs": {**h["net_kwargs"], "depth": 10**6}},
}

# name -> (buffer meta.json keys, new value)
BUFFER_EDITS = {
    "epochs_string": (("epochs",), "3"),
    "net_kwargs_list": (("net_kwargs",), [1]),
    "num_classes_huge": (("data_spec", "num_classes"), 10**15),
    "checkpoint_path": (("net_kwargs", "checkpoint_path"), "/etc/hostname"),
    "width_huge": (("net_kwargs", "width"), 10**7),
}


def _alias_bomb(levels: int = 9) -> str:
    """YAML of a few hundred bytes whose aliases expand to about 1.2 * 10 ** (levels + 1) nodes."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


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
    for name, (key, value) in DISTILLED_EDITS.items():
        paths[f"distilled_{name}"] = _edit_meta(_distilled(root / f"distilled_{name}"),
                                                lambda meta, k=key, v=value: _set(meta, k, v))
    paths["distilled_files_empty"] = _distilled(root / "distilled_files_empty")  # tampered, with no checksums
    save_tensors(paths["distilled_files_empty"] / "images.safetensors", {"images": torch.zeros(20, 1, 8, 8)})
    _edit_meta(paths["distilled_files_empty"], lambda meta: meta.update(files={}))
    for name, edit in TEACHER_EDITS.items():
        paths[f"teacher_{name}"] = _edit_header(_teacher(root / f"teacher_{name}.safetensors"), edit)
    paths["ssl_pretrained"] = root / "ssl_pretrained.ckpt"  # an SSL checkpoint whose net asks timm for weights
    torch.save({"ddkit_ssl": {"method": "mocov2"}, "state_dict": {"backbone.w": torch.zeros(1)},
                "hyper_parameters": {"net": "resnet18", "net_kwargs": {"pretrained": True}}}, paths["ssl_pretrained"])
    paths["classifier_ckpt"] = root / "classifier.ckpt"  # what Lightning writes: a torch.save zip
    torch.save({"state_dict": {"net.head.bias": torch.zeros(10)}, "hyper_parameters": {"net": "convnet"}},
               paths["classifier_ckpt"])
    for name, (key, value) in BUFFER_EDITS.items():
        paths[f"buffer_{name}"] = _edit_meta(_buffer(root / f"buffer_{name}"),
                                             lambda meta, k=key, v=value: _set(meta, k, v))
    configs = {"empty": b"", "comments": b"# nothing set here\n", "binary": os.urandom(512) + b"\xff",
               "latin1": "trainer:\n  max_epochs: 1  # caf\u00e9\n".encode("latin-1"), "list": b"- fit\n- test\n",
               "broken": b"trainer: [1, 2\n", "bomb": _alias_bomb().encode()}
    for name, data in configs.items():
        paths[f"config_{name}"] = root / f"config_{name}.yaml"
        paths[f"config_{name}"].write_bytes(data)
    paths["random_bytes"] = root / "random.ckpt"
    paths["random_bytes"].write_bytes(os.urandom(3000))
    paths["empty_dir"] = root / "empty"
    paths["empty_dir"].mkdir()
    paths["a_file"] = root / "a_file"
    paths["a_file"].write_text("not a directory\n")
    checkpoints = root / "checkpoints"  # a truncated checkpoint, and a folder whose last.ckpt is truncated
    (checkpoints / "dir").mkdir(parents=True)
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "epoch": 1}, checkpoints / "whole.ckpt")
    data = (checkpoints / "whole.ckpt").read_bytes()
    paths["ckpt_truncated"] = checkpoints / "truncated.ckpt"
    paths["ckpt_truncated"].write_bytes(data[: len(data) // 2])
    paths["ckpt_dir"] = checkpoints / "dir"
    (checkpoints / "dir" / "last.ckpt").write_bytes(data[: len(data) // 2])
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
    # checkpoint paths and evaluate's output
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
    # misspelt keys of free-form option dicts
    ("protocol-option-misspelt", ["evaluate", "--data.dataset", "digits", "--baselines", "[random]", "--ipc", "1",
                                  "--protocol_options", "{hard: {lrr: 5}}"],
     ("protocol_options.hard.lrr: unknown option of the hard protocol (known: augment, batch_size, epochs, lr, "
     "momentum, weight_decay), got 5")),
    ("protocol-name-misspelt", ["evaluate", "--data.dataset", "digits", "--baselines", "[random]", "--ipc", "1",
                                "--protocol_options", "{hardd: {lr: 0.1}}"],
     "protocol_options.hardd: not a protocol (known: hard, soft, kd)"),
    ("periodic-evaluation-option-misspelt", [*MATCHING, "--trainer.callbacks+",
                                             "ddkit.callbacks.synthetic.PeriodicEvaluation",
                                             "--trainer.callbacks.protocol_options", "{epoch: 3}"],
     "protocol_options.soft.epoch: unknown option of the soft protocol"),
]


NO_GPU = pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available(),
                            reason="the case needs a machine without a GPU")
DISTILLED_EXPECTED = {
    "ipc_string": "distilled.meta.ipc: must be an integer >= 1, got '2'",
    "ipc_fraction": "distilled.meta.ipc: must be an integer >= 1, got 2.5",
    "ipc_bool": "distilled.meta.ipc: must be an integer >= 1, got True",
    "ipc_absurd": "distilled.meta.ipc: must be num_images / num_classes = 20 / 10, got 1000000000000000",
    "num_classes_string": "distilled.meta.data_spec.num_classes: must be an integer in [1, 100000], got '10'",
    "num_classes_huge": "distilled.meta.data_spec.num_classes: must be an integer in [1, 100000], got 1000000000000000.0",
    "image_size_float": "distilled.meta.data_spec.image_size: must be an integer in [1, 4096], got 8.0",
    "in_chans_zero": "distilled.meta.data_spec.in_chans: must be an integer in [1, 1024], got 0",
    "mean_length": "distilled.meta.data_spec.mean: must be a list of 1 finite numbers, got [0.1, 0.2, 0.3]",
    "std_zero": "distilled.meta.data_spec.std: must be a list of 1 positive finite numbers, got [0]",
    "zca_string": "distilled.meta.data_spec.zca: must be true or false, got 'yes'",
    "class_names_short": "distilled.meta.data_spec.class_names: must be a list of 10 names, got ['0', '1']",
    "data_spec_list": "distilled.meta.data_spec: must be a mapping, got [10, 1, 8]",
    "files_list": "distilled.meta.files: must be a mapping of file names to sha256 digests",
    "files_escape": "distilled.meta.files: names must be plain file names inside the set's directory, "
                    "got '../../etc/hostname'",
    "files_absolute": "distilled.meta.files: names must be plain file names inside the set's directory, "
                      "got '/etc/hostname'",
    "files_no_labels": "distilled.meta.files: must list exactly ['images.safetensors', 'labels.safetensors'], "
                       "got ['images.safetensors']",
    "files_zca_unlisted": "distilled.meta.files: must list exactly ['images.safetensors', 'labels.safetensors', "
                          "'zca.safetensors']",
    "files_digest": "distilled.meta.files['images.safetensors']: must be a sha256 hex digest, got 'abc'",
    "files_empty": "distilled.meta.files: must list exactly ['images.safetensors', 'labels.safetensors'], got []",
}
TEACHER_EXPECTED = {
    "header_not_json": "teacher: the ddkit header is not valid JSON",
    "header_no_net": "teacher: the ddkit header lacks ['net']",
    "net_kwargs_list": "teacher.net_kwargs: must be a mapping of names to values, got [1, 2]",
    "pretrained": "teacher.net_kwargs.pretrained: refused (ddkit builds nets from scratch",
    "checkpoint_path": "teacher.net_kwargs.checkpoint_path: refused (ddkit builds nets from scratch",
    "num_classes_huge": "teacher.data_spec.num_classes: must be an integer in [1, 100000], got 1000000000000000",
    "image_size_string": "teacher.data_spec.image_size: must be an integer in [1, 4096], got '8'",
    "width_huge": "teacher.net_kwargs: net 'convnet_bn' for 10 classes would have",
    "depth_huge": "teacher.depth: must be an integer in [1, 64], got 1000000",
}
BUFFER_EXPECTED = {
    "epochs_string": "buffer.meta.epochs: must be an integer >= 1, got '3'",
    "net_kwargs_list": "buffer.meta.net_kwargs: must be a mapping of names to values, got [1]",
    "num_classes_huge": "buffer.meta.data_spec.num_classes: must be an integer in [1, 100000]",
    "checkpoint_path": "buffer.meta.net_kwargs.checkpoint_path: refused",
    "width_huge": "buffer.meta.net_kwargs: net 'convnet' for 10 classes would have",
}
BIG_YAML = "{a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1], b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a], " \
           "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b], d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c], " \
           "e: [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]}"

CASES += [(f"distilled-{name.replace('_', '-')}", _with(KD, data__distilled=f"{{distilled_{name}}}"), expected)
          for name, expected in DISTILLED_EXPECTED.items()]
CASES += [(f"teacher-{name.replace('_', '-')}", _with(RECOVER, model__teacher=f"{{teacher_{name}}}"), expected)
          for name, expected in TEACHER_EXPECTED.items()]
CASES += [(f"buffer-{name.replace('_', '-')}", _with(MATCHING, data__buffer=f"{{buffer_{name}}}"), expected)
          for name, expected in BUFFER_EXPECTED.items()]
CASES += [
    # Trainer, seed and checkpoint options
    ("devices-zero", _with(CLASSIFIER, trainer__devices="0"), "trainer.devices: must be a number of CPU processes"),
    ("devices-negative", _with(CLASSIFIER, trainer__devices="-2"), "trainer.devices: must be a number of CPU"),
    ("max-epochs-negative", _with(CLASSIFIER, trainer__max_epochs="-5"),
     "trainer.max_epochs: must be an integer >= -1, got -5"),
    ("max-steps-negative", _with(MATCHING, trainer__max_steps="-3"),
     "trainer.max_steps: must be an integer >= -1, got -3"),
    ("accelerator-gpu", _with(CLASSIFIER, trainer__accelerator="gpu"),
     "trainer.accelerator: not available on this machine (use auto or cpu), got 'gpu'"),
    ("accelerator-tpu", _with(CLASSIFIER, trainer__accelerator="tpu"),
     "trainer.accelerator: not available on this machine (use auto or cpu), got 'tpu'"),
    ("accelerator-unknown", _with(CLASSIFIER, trainer__accelerator="abacus"), "trainer.accelerator: must be auto"),
    ("seed-negative", _with(CLASSIFIER, seed_everything="-1"),
     "seed_everything: must be an integer in [0, 4294967295], got -1"),
    ("checkpoint-every-n-epochs-negative", _with(CLASSIFIER, checkpoint__every_n_epochs="-1"),
     "checkpoint.every_n_epochs: must be an integer >= 0, got -1"),
    ("checkpoint-every-n-train-steps-negative", _with(RECOVER, checkpoint__every_n_train_steps="-3"),
     "checkpoint.every_n_train_steps: must be an integer >= 0, got -3"),
    # config files
    ("config-empty", ["fit", "-c", "{config_empty}"], "config: empty (no options in it), got '{config_empty}'"),
    ("config-only-comments", ["fit", "--config", "{config_comments}"], "config: empty (no options in it)"),
    ("config-binary", ["fit", "-c", "{config_binary}"], "config: not UTF-8 text"),
    ("config-latin1", ["fit", "-c", "{config_latin1}"], "config: not UTF-8 text (byte 0xe9 at offset 31)"),
    ("config-not-mapping", ["fit", "-c", "{config_list}"], "config: must be a mapping of options"),
    ("config-broken-yaml", ["fit", "--config={config_broken}"], "config: not valid YAML"),
    ("config-missing", ["fit", "-c", "{root}/nope.yaml"], "config: file not found, got '{root}/nope.yaml'"),
    ("evaluate-config-empty", ["evaluate", "-c", "{config_empty}"], "config: empty (no options in it)"),
    # resource bombs and sizes from options
    # a_i holds 10 copies of a_(i-1): a0 = 11 nodes ... a9 = 11,111,111,111; + 10 keys + the root
    ("config-alias-bomb", ["fit", "-c", "{config_bomb}"], "config: YAML aliases expand to 12,345,679,021 nodes"),
    ("net-kwargs-alias-bomb", _with(CLASSIFIER, model__net_kwargs=BIG_YAML),  # 11 + 111 + ... + 111,111 + 5 keys + 1
     "model.net_kwargs: YAML aliases expand to 123,461 nodes, more than the limit of 100,000"),
    ("net-kwargs-recursive-alias", _with(CLASSIFIER, model__net_kwargs="&a [*a]"),
     "model.net_kwargs: YAML alias refers to itself"),
    ("net-width-huge", _with(CLASSIFIER, model__net_kwargs='{"depth": 1, "width": 10000000}'),
     "net_kwargs: net 'convnet' for 10 classes would have 3,720,000,010 parameters, more than the limit"),
    ("net-depth-huge", _with(CLASSIFIER, model__net_kwargs='{"depth": 1000000}'),
     "depth: must be an integer in [1, 64], got 1000000"),
    ("image-size-huge", _with(CLASSIFIER, data__image_size="100000"),
     "image_size: must be an integer in [1, 4096], got 100000"),
    ("net-pretrained", _with(CLASSIFIER, model__net="resnet18", model__net_kwargs='{"pretrained": true}'),
     "net_kwargs.pretrained: refused"),
    # messages naming the right field
    ("net-kwargs-image-size", _with(CLASSIFIER, model__net_kwargs='{"image_size": 3}'),
     "model.net_kwargs.image_size: set by the data"),
    ("image-size-too-small-for-net", _with(CLASSIFIER, model__net_kwargs='{"depth": 4, "width": 8}'),
     "image_size: net 'convnet' {'depth': 4, 'width': 8} cannot take 1-channel 8 px images"),
    ("teacher-is-lightning-checkpoint", _with(RECOVER, model__teacher="{classifier_ckpt}"),
     "teacher: a torch/Lightning checkpoint, not a teacher safetensors file"),
    ("ssl-checkpoint-is-classifier", _with(PROBE, model__ssl_checkpoint="{classifier_ckpt}"),
     "ssl_checkpoint: not a ddkit SSL checkpoint"),
    ("ssl-checkpoint-pretrained", _with(PROBE, model__ssl_checkpoint="{ssl_pretrained}"),
     "ssl_checkpoint.net_kwargs.pretrained: refused"),
]


def _fill(arg: str, inputs: dict[str, str]) -> str:
    """``arg`` with every ``{name}`` of ``inputs`` replaced by its path."""
    for name, path in inputs.items():
        arg = arg.replace("{" + name + "}", path)
    return arg


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("argv, expected", [pytest.param(a, e, id=i, marks=NO_GPU if i == "accelerator-gpu" else ())
                                            for i, a, e in CASES])
def test_bad_input_is_one_line_exit_2_nothing_written(inputs, tmp_path, monkeypatch, capsys, argv, expected):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    argv = [_fill(a, inputs) for a in argv]
    before = _listing(Path(inputs["root"]))
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert e.value.code == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"error: {_fill(expected, inputs)}"), err[-3000:]
    assert "got" in lines[0] or "Got value" in lines[0]  # the bad value (or file) is named
    assert "Traceback" not in err
    assert _listing(work) == []
    assert _listing(Path(inputs["root"])) == before


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
