"""Online kNN monitor for self-supervised pretraining.

Reference: Wu et al., "Unsupervised Feature Learning via Non-Parametric Instance Discrimination", CVPR 2018
(the weighted kNN vote, as in MoCo's and lightly's monitors).
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from ddkit.errors import DDKitError


@torch.no_grad()
def knn_predict_labels(query: Tensor, bank: Tensor, bank_labels: Tensor, num_classes: int, k: int = 20,
                       temperature: float | None = None, chunk: int = 1024) -> Tensor:
    """Cosine kNN classification.

    Args:
        query: ``[Q, D]`` features.
        bank: ``[B, D]`` features of labelled examples.
        bank_labels: ``[B]`` integer labels.
        num_classes: number of classes.
        k: neighbours (clipped to ``B``).
        temperature: each neighbour votes ``exp(cos / t)`` (InstDisc weighting, lightly's ``knn_predict``);
            ``None``: plain majority vote (ties go to the lowest class index).
        chunk: queries scored at once (bounds memory to ``chunk x B``).

    Returns:
        ``[Q]`` predicted labels.
    """
    if k < 1:
        raise DDKitError(f"k: must be >= 1, got {k!r}")
    query = F.normalize(query.float(), dim=1)
    bank = F.normalize(bank.float(), dim=1)
    k = min(k, bank.shape[0])
    out = []
    for start in range(0, query.shape[0], chunk):
        sim, idx = (query[start : start + chunk] @ bank.t()).topk(k, dim=1)
        weights = torch.ones_like(sim) if temperature is None else (sim / temperature).exp()
        scores = torch.zeros(sim.shape[0], num_classes, device=sim.device, dtype=sim.dtype)
        scores.scatter_add_(1, bank_labels[idx], weights)
        out.append(scores.argmax(dim=1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=query.device)


class KNNMonitor(pl.Callback):
    """kNN accuracy of the module's features, logged as ``val/knn_acc`` at the end of every validation epoch.

    The module's ``validation_step(batch, batch_idx, dataloader_idx)`` returns ``{"features", "labels"}``; loader 0
    is the bank, loader 1 the queries (as :class:`~ddkit.datamodules.ssl.SSLDataModule` provides). Validation runs
    under ``no_grad`` with the module in eval mode, so the monitor has no effect on the backbone (no gradient, no BN
    statistics update). Under DDP the bank is all-gathered and the correct counts are summed across ranks.

    Args:
        k: neighbours.
        temperature: vote weighting (see :func:`knn_predict_labels`); ``None`` = majority vote.
    """

    def __init__(self, k: int = 20, temperature: float | None = 0.1) -> None:
        super().__init__()
        if k < 1:
            raise DDKitError(f"knn_k: must be >= 1, got {k!r}")
        self.k = k
        self.temperature = temperature
        self._reset()

    def _reset(self) -> None:
        self._store: dict[int, tuple[list[Tensor], list[Tensor]]] = {0: ([], []), 1: ([], [])}

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        if isinstance(outputs, dict) and "features" in outputs and dataloader_idx in self._store:
            feats, labels = self._store[dataloader_idx]
            feats.append(F.normalize(outputs["features"].float(), dim=1))
            labels.append(outputs["labels"])

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        (bank_f, bank_y), (query_f, query_y) = self._store[0], self._store[1]
        if trainer.sanity_checking or not bank_f or not query_f:
            self._reset()
            return
        bank, labels = torch.cat(bank_f), torch.cat(bank_y)
        if trainer.world_size > 1:  # DistributedSampler pads every rank to the same length
            bank = pl_module.all_gather(bank).flatten(0, 1)
            labels = pl_module.all_gather(labels).flatten(0, 1)
        num_classes = int(getattr(getattr(pl_module, "spec", None), "num_classes", 0) or int(labels.max()) + 1)
        pred = knn_predict_labels(torch.cat(query_f), bank, labels, num_classes, self.k, self.temperature)
        counts = torch.stack([(pred == torch.cat(query_y)).sum(), torch.tensor(len(pred), device=pred.device)])
        counts = trainer.strategy.reduce(counts.float(), reduce_op="sum")
        pl_module.log("val/knn_acc", counts[0] / counts[1].clamp(min=1), prog_bar=True, sync_dist=False)
        self._reset()
