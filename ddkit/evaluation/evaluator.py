"""Train N fresh networks per (training set, protocol), test each on the real test split, and report."""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from ddkit.callbacks.progress import default_progress_bar
from ddkit.datamodules.distilled import check_compatible
from ddkit.datamodules.real import RealDataModule, random_real_subset
from ddkit.errors import DDKitError
from ddkit.evaluation.protocols import PROTOCOLS, Protocol, get_protocol
from ddkit.evaluation.report import robust_scores, write_report
from ddkit.formats.distilled import DistilledSet, load_distilled
from ddkit.formats.output import OutputLock, claim_output


@dataclass
class Result:
    """All runs of one training set under one protocol."""

    name: str
    kind: str  # distilled | random | full
    ipc: int | None
    protocol: dict[str, Any]
    accuracies: list[float] = field(default_factory=list)
    wall_time_s: float = 0.0
    source: str | None = None
    augmented: bool = True  # False: the protocol's augmentation was off (``no_augmentation`` runs)

    @property
    def mean(self) -> float:
        return sum(self.accuracies) / len(self.accuracies)

    @property
    def std(self) -> float:
        m = self.mean
        return math.sqrt(sum((a - m) ** 2 for a in self.accuracies) / len(self.accuracies))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "ipc": self.ipc, "protocol": self.protocol,
                "accuracies": self.accuracies, "mean": self.mean, "std": self.std,
                "wall_time_s": round(self.wall_time_s, 2), "source": self.source, "augmented": self.augmented}


def train_and_test(ds: DistilledSet, protocol: Protocol, net: str, net_kwargs: dict, test_loader: DataLoader,
                   seed: int, trainer_kwargs: dict, log_dir: str | None, run_name: str, eval_every: int = 0) -> float:
    """Train one fresh network on ``ds`` under ``protocol`` (seeded) and return its test accuracy in [0, 1]."""
    L.seed_everything(seed, workers=True, verbose=False)
    module = protocol.make_module(ds.spec, net, net_kwargs, ds)
    loader = protocol.train_loader(ds)  # None: the module samples ds itself (kd)
    logger = TensorBoardLogger(log_dir, name=run_name, version=f"seed{seed}") if log_dir else False
    progress = trainer_kwargs.get("enable_progress_bar", True)
    trainer = L.Trainer(
        max_epochs=protocol.epochs,
        logger=logger,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        check_val_every_n_epoch=eval_every if eval_every > 0 else protocol.epochs + 1,
        limit_val_batches=1.0 if eval_every > 0 else 0,  # the test split as validation: curves only
        callbacks=[default_progress_bar()] if progress else None,
        **trainer_kwargs,
    )
    trainer.fit(module, loader, val_dataloaders=test_loader)
    metrics = trainer.test(module, test_loader, verbose=False)
    return float(metrics[0]["test/acc"])


def random_subset_set(x: torch.Tensor, y: torch.Tensor, data: RealDataModule, ipc: int, seed: int) -> DistilledSet:
    """The random-real-subset baseline: ``ipc`` random training images per class."""
    idx = random_real_subset(y, ipc, seed)
    zca = data.zca.state_dict() if data.zca is not None else None
    return DistilledSet(images=x[idx].clone(), labels=y[idx].clone(), spec=data.spec, ipc=ipc, method="random", zca=zca)


def run_evaluation(
    data: RealDataModule,
    distilled: list[str] | None = None,
    baselines: list[str] | None = None,
    ipc: int | None = None,
    protocols: list[str] | None = None,
    protocol_options: dict[str, dict[str, Any]] | None = None,
    seeds: int = 3,
    first_seed: int = 0,
    net: str = "convnet",
    net_kwargs: dict[str, Any] | None = None,
    epochs: int | None = None,
    full_epochs: int = 20,
    full_data_accuracy: float | None = None,
    output: str = "reports/evaluation",
    overwrite: bool = False,
    log_dir: str | None = None,
    eval_every: int = 0,
    accelerator: str = "auto",
    devices: int = 1,
    precision: str = "32-true",
    progress: bool = True,
    lazy: bool = False,
    no_augmentation: bool = False,
) -> dict[str, Any]:
    """Evaluate distilled sets and baselines under named protocols; write ``report.json`` and ``report.md``.

    Args:
        data: the real dataset (its test split is the test set; its training split feeds the baselines).
        distilled: DistilledSet directories to evaluate (or image folders with one sub-folder per class, such as
            recover's SRe2L export, read lazily).
        baselines: ``random`` (``ipc`` random real images per class, a new subset per seed) and/or ``full`` (the whole
            training split, one run of ``full_epochs`` epochs with the protocol's optimizer: the full-data reference).
        ipc: images per class of the random baseline (default: the IPC of the first distilled set).
        protocols: protocol names (``hard``, ``soft``, ``kd``); default ``[hard]``.
        protocol_options: per-protocol overrides, e.g. ``{hard: {lr: 0.01}, kd: {teacher: t.safetensors}}``.
        seeds: networks trained per (set, protocol); the report gives mean and std over them.
        first_seed: seed of the first network (then +1, +2, ...).
        net: evaluation architecture (a :func:`ddkit.nets.build_net` name).
        net_kwargs: architecture options.
        epochs: override every protocol's number of epochs (e.g. for quick runs).
        full_epochs: epochs of the ``full`` baseline.
        full_data_accuracy: a known full-data accuracy (in [0, 1]) to print as the reference instead of training one.
        output: directory of report.json and report.md.
        overwrite: replace an earlier report in ``output`` (False: refuse it before any training).
        log_dir: directory of the TensorBoard curves (``<protocol>/<set>/seed<k>``); ``None``: ``<output>/tb``.
        eval_every: also test every this many epochs to draw test-accuracy curves in TensorBoard (0: only at the end).
        accelerator: Lightning accelerator.
        devices: devices per evaluation run.
        precision: Lightning precision (``32-true``, ``bf16-mixed``, ``16-mixed``).
        progress: show progress bars.
        lazy: read the distilled sets' images per sample from disk instead of loading them (sets larger than memory).
        no_augmentation: also train every set and the random baseline under each protocol with its data augmentation
            off, which DD-Ranking's augmentation-robust score needs (see :func:`ddkit.evaluation.report.robust_scores`).
    """
    distilled = list(distilled or [])
    baselines = list(baselines or [])
    protocols = list(protocols or ["hard"])
    options = protocol_options or {}
    if seeds <= 0:
        raise DDKitError(f"seeds: must be > 0, got {seeds!r}")
    for b in baselines:
        if b not in ("random", "full"):
            raise DDKitError(f"baselines: must be random or full, got {b!r}")
    if not distilled and not baselines:
        raise DDKitError("distilled: nothing to evaluate (give distilled paths and/or baselines), got []")
    if full_data_accuracy is not None and not 0 <= full_data_accuracy <= 1:
        raise DDKitError(f"full_data_accuracy: must lie in [0, 1], got {full_data_accuracy!r}")
    for name in options:
        if name not in PROTOCOLS:
            raise DDKitError(f"protocol_options.{name}: not a protocol (known: {', '.join(PROTOCOLS)}), "
                             f"got {options[name]!r}")
    resolved = [get_protocol(p, **{**options.get(p, {}), "epochs": epochs}) for p in protocols]
    loaded = [load_distilled(p, lazy=lazy, folder_spec=data.spec) for p in distilled]
    sets = list(zip(set_names(loaded, distilled, baselines), distilled, loaded))
    for _, path, ds in sets:
        check_compatible(ds, data, where=f"distilled[{Path(path).name}]")
        if ds.zca is not None and data.zca is None:
            from ddkit.ops.zca import ZCA

            data.zca = ZCA.from_state_dict(ds.zca)
    if "random" in baselines and ipc is None:
        if not sets:
            raise DDKitError("ipc: the random baseline needs ipc (or a distilled set to take it from), got None")
        ipc = sets[0][2].ipc
    if ipc is not None and ipc <= 0:
        raise DDKitError(f"ipc: must be > 0, got {ipc!r}")
    with OutputLock(output, "output"), _removed_on_failure(Path(output)):
        claim_output(output, "output", "report", overwrite, resuming=False)
        Path(output).mkdir(parents=True, exist_ok=True)

        data.setup("fit")
        x_train, y_train = _train_tensors(data)
        test_loader = DataLoader(data.test_set, batch_size=1024, shuffle=False)
        trainer_kwargs = {"accelerator": accelerator, "devices": devices, "precision": precision,
                          "enable_progress_bar": progress}
        log_dir = log_dir or str(Path(output) / "tb")
        net_kwargs = dict(net_kwargs or {})
        results: list[Result] = []
        variants = [(p, True) for p in resolved]
        variants += [(p.without_augmentation(), False) for p in resolved if no_augmentation]
        for protocol, augmented in variants:
            for name, path, ds in sets:
                results.append(_runs(name, "distilled", ds.ipc, path, lambda s, ds=ds: ds, protocol, seeds, first_seed,
                                     net, net_kwargs, test_loader, trainer_kwargs, log_dir, eval_every, augmented))
            if "random" in baselines:
                results.append(_runs("random", "random", ipc, None,
                                     lambda s: random_subset_set(x_train, y_train, data, ipc, s),
                                     protocol, seeds, first_seed, net, net_kwargs, test_loader, trainer_kwargs, log_dir,
                                     eval_every, augmented))
        full = None
        if "full" in baselines:
            whole = DistilledSet(images=x_train, labels=y_train, spec=data.spec, ipc=1, method="full")
            protocol = get_protocol("hard", **{**options.get("hard", {}), "epochs": full_epochs})
            full = _runs("full", "full", None, None, lambda s: whole, protocol, 1, first_seed, net, net_kwargs,
                         test_loader, trainer_kwargs, log_dir, eval_every).to_dict()
        elif full_data_accuracy is not None:
            full = {"name": "full", "kind": "full", "mean": full_data_accuracy, "std": 0.0, "accuracies": [],
                    "protocol": {"name": "given"}}
        report = {
            "dataset": data.spec.to_dict(),
            "net": net,
            "net_kwargs": net_kwargs,
            "seeds": seeds,
            "protocols": [p.describe() for p in resolved],
            "results": [r.to_dict() for r in results],
            "full_data": full,
        }
        report["robust_scores"] = robust_scores(report)
        write_report(report, Path(output))
    return report


@contextlib.contextmanager
def _removed_on_failure(output: Path) -> Iterator[None]:
    """An evaluation that fails takes away the output directory it created (its partial curves, no report)."""
    created = not output.exists()
    try:
        yield
    except BaseException:
        if created:
            shutil.rmtree(output, ignore_errors=True)
        raise


def set_names(sets: list[DistilledSet], paths: list[str], baselines: list[str]) -> list[str]:
    """Each set's name in the report: its method (``sre2l``, ``datm``, ...), or ``<method>_<directory>`` where that
    would be ambiguous (two sets of one method, a set made by ``random`` beside the random baseline), numbered
    ``_1``, ``_2``, ... if still ambiguous."""
    methods = [ds.method for ds in sets]
    names = [m if methods.count(m) == 1 and m not in baselines else f"{m}_{Path(p).name}"
             for m, p in zip(methods, paths)]
    seen: dict[str, int] = {}
    numbered = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        numbered.append(n if names.count(n) == 1 else f"{n}_{seen[n]}")
    return numbered


def _train_tensors(data: RealDataModule) -> tuple[torch.Tensor, torch.Tensor]:
    """The training split as two tensors (in-memory datasets)."""
    ds = data.train_set
    loader = DataLoader(ds, batch_size=4096, shuffle=False)
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def _runs(name, kind, ipc, source, make_set, protocol, seeds, first_seed, net, net_kwargs, test_loader,
          trainer_kwargs, log_dir, eval_every, augmented: bool = True) -> Result:
    result = Result(name=name, kind=kind, ipc=ipc, protocol=protocol.describe(), source=source, augmented=augmented)
    start = time.perf_counter()
    for seed in range(first_seed, first_seed + seeds):
        ds = make_set(seed)
        acc = train_and_test(ds, protocol, net, net_kwargs, test_loader, seed, trainer_kwargs, log_dir,
                             f"{protocol.name}{'' if augmented else '-naug'}/{name}", eval_every)
        result.accuracies.append(acc)
    result.wall_time_s = time.perf_counter() - start
    return result
