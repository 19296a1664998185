"""Stored teacher soft labels (FKD-style, SRe2L's relabel): per epoch and batch, the views, the mix and the logits.

Directory layout::

    meta.json                   format, version, the plan (images fingerprint, batch size, epochs, seed, augment,
                                mix, ...), the teacher reference, ``complete``, and the bytes on disk
    epoch_{e:04d}.safetensors   one shard per epoch, with N = number of images, n_b = ceil(N / batch_size):
        order     int64   [N]      image indices in batch order: batch b is order[b * B:(b + 1) * B]
        boxes     int32   [N, 4]   per position: crop box (top, left, height, width), in the padded image for
                                   ``crop_flip`` (padding in the plan), in the image for ``rrc_flip``
        flips     uint8   [N]      per position: 1 = flipped horizontally (after the crop)
        mix_perm  int64   [N]      per position: the batch-local mix permutation (each batch's slice is a
                                   permutation of 0..n-1)
        mix_lam   float64 [n_b]    per batch: lambda (weight of the original image)
        mix_box   int32   [n_b, 4] per batch: cutmix box (y0, y1, x0, x1); zeros for mixup / none
        logits    float16 [N, K]   per position: the teacher's logits on the mixed view
    or, in a top-k store (``topk`` = k in meta.json; FKD's trick of keeping the k largest logits per view):
        logits       float16 [N, k]  per position: the k largest logits, in decreasing order
        logit_index  int16   [N, k]  their classes
        logit_rest   float32 [N]     the value that, put in each of the other K - k classes, gives them together the
                                     softmax mass at temperature ``topk_temperature`` that they have in the full logits:
                                     ``T * (logsumexp(rest / T) - log(K - k))``

A top-k view's target ``softmax(dense / T)``, with ``dense`` the k logits in their classes and ``logit_rest``
everywhere else, has exactly the full target's probabilities on the k classes and its total on the others, spread
evenly over them (FKD's marginal smoothing); the KD loss on it is the ordinary one (:func:`dense_logits`).

One shard per epoch (not SRe2L's one file per batch) keeps the file count low; a batch is a slice of it, read
lazily through safetensors' memory map. Shards are written atomically, so a crashed relabel pass resumes by
skipping the shards that exist; ``meta.json`` says ``complete: true`` only once every shard is there.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ddkit.datamodules.spec import MAX_CLASSES
from ddkit.errors import DDKitError, check_int
from ddkit.formats.common import atomic_file, read_json, save_tensors, write_json

FORMAT = "ddkit.soft_labels"
VERSION = 1
SHARD_KEYS = ("order", "boxes", "flips", "mix_perm", "mix_lam", "mix_box", "logits")
SHARD_DTYPES = {"order": torch.int64, "boxes": torch.int32, "flips": torch.uint8, "mix_perm": torch.int64,
                "mix_lam": torch.float64, "mix_box": torch.int32, "logits": torch.float16}
TOPK_DTYPES = {"logit_index": torch.int16, "logit_rest": torch.float32}
# Plan fields that must agree between a store and the run that replays it (epochs and teacher are checked apart).
MAX_EPOCHS = 1_000_000  # one shard file per epoch: far more than any relabel run
PLAN_FIELDS = ("num_images", "num_classes", "image_shape", "images_sha256", "batch_size", "seed", "augment",
               "view_size", "crop_scale", "padding", "mix", "mix_alpha")
# Plan fields of top-k stores; absent (None) in full-logit stores, including those written before top-k existed.
TOPK_FIELDS = ("topk", "topk_temperature")


def shard_name(epoch: int) -> str:
    return f"epoch_{epoch:04d}.safetensors"


def images_fingerprint(images: torch.Tensor) -> str:
    """sha256 of an image tensor's shape, dtype and raw bytes (which images a store belongs to). A lazy reader
    (:mod:`ddkit.formats.images`) is hashed chunk by chunk, to the digest of the same images in memory."""
    from ddkit.formats.images import is_lazy

    h = hashlib.sha256(f"{tuple(images.shape)}|{images.dtype}".encode())
    for t in (images.chunks(1024) if is_lazy(images) else [images.detach().cpu().contiguous()]):
        h.update(memoryview(t.contiguous().view(torch.uint8).numpy() if t.numel() else b""))
    return h.hexdigest()


def num_batches(num_images: int, batch_size: int) -> int:
    return -(-num_images // batch_size)


def check_topk(topk: int | None, num_classes: int, field: str = "soft_label_topk") -> None:
    """``topk`` must be None or an integer in [1, K]; top-k stores hold classes as int16, so K <= 32768."""
    if topk is None:
        return
    if num_classes > 32768:
        raise DDKitError(f"{field}: top-k stores hold classes as int16 (at most 32768 classes), got {topk!r} for "
                         f"{num_classes} classes")
    if not (isinstance(topk, int) and 1 <= topk <= num_classes):
        raise DDKitError(f"{field}: must be an integer in [1, {num_classes}] (the number of classes), got {topk!r}")


def topk_logits(logits: torch.Tensor, k: int, temperature: float) -> dict[str, torch.Tensor]:
    """The top-k form of ``[n, K]`` logits (see the module docstring): ``logits`` float16 ``[n, k]``,
    ``logit_index`` int16 ``[n, k]``, ``logit_rest`` float32 ``[n]``.

    The k values are rounded to float16 first (as a full store holds them) and ``logit_rest`` is computed in float64
    from the full logits, so the rest's mass at ``temperature`` matches the full fp16 store's to float32 precision.
    """
    x = logits.detach().float().cpu().to(torch.float16).double()
    values, index = x.topk(k, dim=1)
    n, classes = x.shape
    if k < classes:
        rest = x.scatter(1, index, float("-inf"))
        level = temperature * (torch.logsumexp(rest / temperature, dim=1) - math.log(classes - k))
    else:
        level = torch.zeros(n, dtype=torch.float64)
    return {"logits": values.to(torch.float16), "logit_index": index.to(torch.int16),
            "logit_rest": level.to(torch.float32)}


def dense_logits(values: torch.Tensor, index: torch.Tensor, rest: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[n, K]`` float32 logits: ``rest`` everywhere, the top-k ``values`` in their classes ``index``."""
    out = rest.float().view(-1, 1).expand(values.shape[0], num_classes).clone()
    return out.scatter(1, index.long(), values.float())


# ---------------------------------------------------------------------------------------------- checking


def _meta_path(path: Path) -> Path:
    return path / "meta.json"


def read_soft_label_meta(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``meta.json`` of a store (format, version, fields); one DDKitError on any problem."""
    path = Path(path)
    meta = read_json(_meta_path(path), "soft_labels.meta")
    if meta.get("format") != FORMAT:
        raise DDKitError(f"soft_labels.meta.format: must be {FORMAT!r}, got {meta.get('format')!r}")
    if meta.get("version") != VERSION:
        raise DDKitError(f"soft_labels.meta.version: unsupported version, got {meta.get('version')!r}")
    missing = [k for k in (*PLAN_FIELDS, "epochs", "complete") if k not in meta]
    if missing:
        raise DDKitError(f"soft_labels.meta: missing fields {missing}, got fields {sorted(meta)}")
    # Counts the readers loop over or compare: an edited value is one line, not a hang or a TypeError.
    check_int(meta["num_images"], "soft_labels.meta.num_images", 1)
    check_int(meta["num_classes"], "soft_labels.meta.num_classes", 1, MAX_CLASSES)
    check_int(meta["batch_size"], "soft_labels.meta.batch_size", 1)
    check_int(meta["epochs"], "soft_labels.meta.epochs", 0, MAX_EPOCHS)
    if not isinstance(meta["complete"], bool):
        raise DDKitError(f"soft_labels.meta.complete: must be true or false, got {meta['complete']!r}")
    return meta


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(a)))
    return a == b


def check_soft_labels(path: str | os.PathLike, plan: dict[str, Any], epochs: int,
                      teacher: dict[str, str] | None = None) -> str:
    """Compare a store with the run that wants it.

    Args:
        path: the store directory.
        plan: the run's values of :data:`PLAN_FIELDS` (``seed`` may be None: take the store's).
        epochs: epochs the run trains for; the store must hold at least as many.
        teacher: the run's teacher reference ({path, sha256}) or None (no teacher: use the store as it is).

    Returns:
        ``"absent"`` (no meta.json), ``"partial"`` (an unfinished relabel pass with the same plan) or ``"complete"``.

    Raises:
        DDKitError: the store was made for other images, another batch size, fewer epochs, another teacher, ...
    """
    path = Path(path)
    if not _meta_path(path).is_file():
        if path.is_dir() and any(path.iterdir()):
            raise DDKitError(f"soft_labels: directory exists but has no meta.json (not a soft-label store), "
                             f"got {str(path)!r}")
        return "absent"
    meta = read_soft_label_meta(path)
    for key in PLAN_FIELDS:
        want = plan.get(key)
        if key == "seed" and want is None:
            continue
        if not _same(meta[key], want):
            raise DDKitError(f"soft_labels.{key}: the stored labels were made with {key}={meta[key]!r}, this run has "
                             f"{key}={want!r} (use another soft_labels directory or match it), got {str(path)!r}")
    for key in TOPK_FIELDS:
        if not _same(meta.get(key), plan.get(key)):
            raise DDKitError(f"soft_labels.{key}: the stored labels were made with {key}={meta.get(key)!r}, this run "
                             f"has {key}={plan.get(key)!r} (use another soft_labels directory or match it), "
                             f"got {str(path)!r}")
    if meta["epochs"] < epochs:
        raise DDKitError(f"soft_labels.epochs: the stored labels hold {meta['epochs']} epochs, fewer than the "
                         f"{epochs} requested, got {str(path)!r}")
    stored_teacher = meta.get("teacher")
    if teacher is not None and stored_teacher is not None and stored_teacher.get("sha256") != teacher.get("sha256"):
        raise DDKitError(f"soft_labels.teacher: the stored labels were made with another teacher "
                         f"(sha256 {str(stored_teacher.get('sha256'))[:12]}...), got teacher {teacher.get('path')!r}")
    if not meta["complete"]:
        if meta["epochs"] != epochs:
            raise DDKitError(f"soft_labels.epochs: an unfinished relabel pass for {meta['epochs']} epochs is there, "
                             f"this run wants {epochs}, got {str(path)!r}")
        return "partial"
    return "complete"


# ---------------------------------------------------------------------------------------------- writing


def begin_soft_labels(path: str | os.PathLike, plan: dict[str, Any], epochs: int,
                      teacher: dict[str, str] | None, extra: dict[str, Any] | None = None) -> None:
    """Start a store: write ``meta.json`` with ``complete: false`` (one process only, e.g. rank 0)."""
    if epochs <= 0:
        raise DDKitError(f"soft_labels.epochs: must be > 0, got {epochs!r}")
    meta = {"format": FORMAT, "version": VERSION, **plan, "epochs": int(epochs), "teacher": teacher,
            "logits_dtype": "float16", "complete": False, "extra": extra or {},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json(_meta_path(Path(path)), meta)


def shard_exists(path: str | os.PathLike, epoch: int) -> bool:
    return (Path(path) / shard_name(epoch)).is_file()


def save_shard(path: str | os.PathLike, epoch: int, tensors: dict[str, torch.Tensor]) -> Path:
    """Check one epoch's tensors (names, dtypes, shapes) and write them atomically."""
    topk = "logit_index" in tensors
    dtypes = {**SHARD_DTYPES, **(TOPK_DTYPES if topk else {})}
    missing = [k for k in dtypes if k not in tensors]
    if missing:
        raise DDKitError(f"soft_labels.shard: missing tensors {missing}, got {sorted(tensors)}")
    t = {k: tensors[k].detach().cpu().to(dtype).contiguous() for k, dtype in dtypes.items()}
    n = t["order"].shape[0]
    nb = t["mix_lam"].shape[0]
    shapes = {"boxes": (n, 4), "flips": (n,), "mix_perm": (n,), "mix_box": (nb, 4)}
    for k, shape in shapes.items():
        if tuple(t[k].shape) != shape:
            raise DDKitError(f"soft_labels.shard.{k}: shape must be {list(shape)}, got {list(t[k].shape)}")
    if t["logits"].dim() != 2 or t["logits"].shape[0] != n:
        raise DDKitError(f"soft_labels.shard.logits: shape must be [{n}, K], got {list(t['logits'].shape)}")
    if topk and (t["logit_index"].shape != t["logits"].shape or tuple(t["logit_rest"].shape) != (n,)):
        raise DDKitError(f"soft_labels.shard: logit_index must be shaped like logits {list(t['logits'].shape)} and "
                         f"logit_rest [{n}], got {list(t['logit_index'].shape)} and {list(t['logit_rest'].shape)}")
    if not bool(torch.isfinite(t["logits"]).all()):
        raise DDKitError(f"soft_labels.shard.logits: contains non-finite values (fp16 overflow?), got epoch {epoch}")
    target = Path(path) / shard_name(epoch)
    with atomic_file(target, field="soft_labels") as tmp:
        save_tensors(tmp, t, metadata={"epoch": str(epoch)})
    return target


def finish_soft_labels(path: str | os.PathLike, images_bytes: dict[str, int] | None = None) -> dict[str, Any]:
    """Close a store once every shard is written: record the bytes on disk and set ``complete: true``.

    Args:
        images_bytes: sizes of the images the labels belong to, e.g. ``{"float32": ..., "uint8": ...}``; the meta gets
            ``bytes.images_<key>`` and the ratios ``bytes.labels_over_images_<key>``.

    Returns:
        The new meta.
    """
    path = Path(path)
    meta = read_soft_label_meta(path)
    missing = [e for e in range(meta["epochs"]) if not shard_exists(path, e)]
    if missing:
        raise DDKitError(f"soft_labels: {len(missing)} epoch shards missing (first {missing[0]}), got {str(path)!r}")
    shard_bytes = [(path / shard_name(e)).stat().st_size for e in range(meta["epochs"])]
    total = sum(shard_bytes)
    sizes: dict[str, Any] = {"labels": total, "per_epoch": shard_bytes[0] if shard_bytes else 0,
                             "shards": shard_bytes}
    if meta.get("topk"):
        sizes.update(logit_bytes(meta["num_images"], meta["num_classes"], meta["topk"], meta["epochs"]))
    for key, value in (images_bytes or {}).items():
        sizes[f"images_{key}"] = int(value)
        sizes[f"labels_over_images_{key}"] = total / value if value else None
    meta.update(complete=True, bytes=sizes, finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    write_json(_meta_path(path), meta)
    return meta


def logit_bytes(num_images: int, num_classes: int, topk: int | None, epochs: int) -> dict[str, int]:
    """Bytes of the teacher outputs of a store: ``logits_full`` (fp16 [N, K] per epoch) and, with ``topk``,
    ``logits_topk`` (k fp16 values + k int16 classes + one float32 rest per view) and ``logits_saved``."""
    full = epochs * num_images * num_classes * 2
    out = {"logits_full": full}
    if topk:
        out["logits_topk"] = epochs * num_images * (topk * 4 + 4)
        out["logits_saved"] = full - out["logits_topk"]
    return out


def remove_soft_labels(path: str | os.PathLike) -> None:
    """Delete a store (only a directory that holds a soft-label meta.json, or nothing at all)."""
    path = Path(path)
    if not path.exists():
        return
    if not _meta_path(path).is_file():
        raise DDKitError(f"soft_labels: refusing to delete a directory that is not a soft-label store, got {str(path)!r}")
    shutil.rmtree(path)


# ---------------------------------------------------------------------------------------------- reading


class SoftLabelReader:
    """Reads one batch of one epoch from a store, lazily (safetensors memory map, one open shard at a time).

    Picklable (the open handle is dropped), so it can live in a Dataset used by DataLoader workers.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.meta = read_soft_label_meta(self.path)
        self.batch_size = int(self.meta["batch_size"])
        self.topk = self.meta.get("topk")
        self.num_images = int(self.meta["num_images"])
        self._epoch: int | None = None
        self._handle = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_epoch": None, "_handle": None}

    def _open(self, epoch: int):
        if epoch != self._epoch:
            if not 0 <= epoch < self.meta["epochs"]:
                raise DDKitError(f"soft_labels: epoch out of range [0, {self.meta['epochs']}), got {epoch}")
            file = self.path / shard_name(epoch)
            if not file.is_file():
                raise DDKitError(f"soft_labels: shard file not found, got {str(file)!r}")
            try:
                self._handle = safe_open(str(file), framework="pt")
            except Exception as e:  # noqa: BLE001  (safetensors raises several types for corrupt files)
                raise DDKitError(f"soft_labels: not a valid safetensors file ({str(e).splitlines()[0]}), "
                                 f"got {str(file)!r}") from None
            wanted = [*SHARD_KEYS, *(TOPK_DTYPES if self.topk else ())]
            missing = [k for k in wanted if k not in self._handle.keys()]  # noqa: SIM118 (not a dict)
            if missing:
                raise DDKitError(f"soft_labels: shard lacks tensors {missing}, got {str(file)!r}")
            self._epoch = epoch
        return self._handle

    def batch(self, epoch: int, b: int) -> dict[str, torch.Tensor]:
        """Batch ``b`` of ``epoch``: ``index``, ``boxes``, ``flips``, ``mix_perm`` (length n), ``mix_lam`` (scalar,
        float64), ``mix_box`` [4] and ``logits`` [n, K] (float16; float32 from a top-k store, see
        :func:`dense_logits`)."""
        f = self._open(epoch)
        nb = num_batches(self.num_images, self.batch_size)
        if not 0 <= b < nb:
            raise DDKitError(f"soft_labels: batch out of range [0, {nb}), got {b}")
        lo, hi = b * self.batch_size, min((b + 1) * self.batch_size, self.num_images)
        return {
            "index": f.get_slice("order")[lo:hi],
            "boxes": f.get_slice("boxes")[lo:hi],
            "flips": f.get_slice("flips")[lo:hi],
            "mix_perm": f.get_slice("mix_perm")[lo:hi],
            "mix_lam": f.get_slice("mix_lam")[b:b + 1][0],
            "mix_box": f.get_slice("mix_box")[b:b + 1][0],
            "logits": f.get_slice("logits")[lo:hi] if not self.topk else dense_logits(
                f.get_slice("logits")[lo:hi], f.get_slice("logit_index")[lo:hi], f.get_slice("logit_rest")[lo:hi],
                int(self.meta["num_classes"])),
        }


def validate_soft_labels(path: str | os.PathLike, deep: bool = False) -> dict[str, Any]:
    """Check a store: meta, every shard present (and with its recorded size); with ``deep``, every shard's tensors
    (dtypes, shapes, finite logits, valid orders and permutations). Returns the meta."""
    path = Path(path)
    meta = read_soft_label_meta(path)
    if not meta["complete"]:
        raise DDKitError(f"soft_labels: the relabel pass did not finish (meta.json complete=false), got {str(path)!r}")
    sizes = (meta.get("bytes") or {}).get("shards") or []
    n, bs, k = meta["num_images"], meta["batch_size"], meta["num_classes"]
    nb = num_batches(n, bs)
    for e in range(meta["epochs"]):
        file = path / shard_name(e)
        if not file.is_file():
            raise DDKitError(f"soft_labels: shard file not found, got {str(file)!r}")
        if e < len(sizes) and file.stat().st_size != sizes[e]:
            raise DDKitError(f"soft_labels: shard size differs from meta.json (changed or truncated), got {str(file)!r}")
        if not deep:
            continue
        from ddkit.formats.common import load_tensors

        t = load_tensors(file, f"soft_labels[{e}]")
        for key, dtype in {**SHARD_DTYPES, **(TOPK_DTYPES if meta.get("topk") else {})}.items():
            if key not in t or t[key].dtype != dtype:
                raise DDKitError(f"soft_labels[{e}].{key}: must be {dtype}, got {t[key].dtype if key in t else None}")
        width = meta.get("topk") or k
        if tuple(t["logits"].shape) != (n, width) or tuple(t["mix_lam"].shape) != (nb,):
            raise DDKitError(f"soft_labels[{e}]: logits must be [{n}, {width}] and mix_lam [{nb}], got "
                             f"{list(t['logits'].shape)} and {list(t['mix_lam'].shape)}")
        if not torch.equal(torch.sort(t["order"]).values, torch.arange(n)):
            raise DDKitError(f"soft_labels[{e}].order: must be a permutation of 0..{n - 1}, got another tensor")
        for b in range(nb):
            lo, hi = b * bs, min((b + 1) * bs, n)
            if not torch.equal(torch.sort(t["mix_perm"][lo:hi]).values, torch.arange(hi - lo)):
                raise DDKitError(f"soft_labels[{e}].mix_perm: batch {b} is not a permutation, got another tensor")
        if not bool(torch.isfinite(t["logits"]).all()):
            raise DDKitError(f"soft_labels[{e}].logits: contains non-finite values, got epoch {e}")
    return meta
