"""Global RNG states in every checkpoint, so that a resumed run draws what an uninterrupted one would."""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch


class GlobalRNGState(L.Callback):
    """Saves the torch (CPU), numpy and Python global RNG states with each checkpoint and puts them back on resume.

    Lightning restores models, optimizers and loops but not the global generators, and a stage may draw from them
    (torchvision view transforms in SSL, a ``RandomSampler`` without a seed). Added to every ``ddkit`` run by the
    CLI. Stored as tensors and plain types only, so checkpoints still load with ``torch.load(weights_only=True)``.
    Exact for checkpoints at epoch boundaries; mid-epoch, draws already made in the unfinished epoch are not replayed.
    """

    def state_dict(self) -> dict[str, Any]:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        version, internal, gauss_next = random.getstate()
        return {
            "torch": torch.get_rng_state(),
            "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": {"version": int(version), "internal": list(internal), "gauss_next": gauss_next},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
        p = state["python"]
        random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
