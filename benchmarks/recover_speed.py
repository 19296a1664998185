"""Recover step time: ddkit's Recover through the Lightning Trainer against a plain PyTorch loop doing the same work.

Both sides run one recovery job in the same process with the same teacher, batch, augmentation (crop / flip / shift
from ddkit.ops.recover_aug with the same generator), BN hooks and loss (ddkit.ops.bn_loss), Adam(0.5, 0.9), per-step
cosine lr and clamp. The plain loop is the reference's inner loop without Lightning: no logging, no progress bar, no
checkpoints. The ddkit side runs as a user gets it from ``ddkit fit``: TensorBoard logger (losses every
``log_every_n_steps``), the CLI's default (tqdm) progress bar, image grids every 200 steps; a second, "quiet" ddkit
run has no logger and no progress bar. Timings are interleaved (ddkit, plain, ddkit quiet, ddkit, ...) because the
machine is shared; the per-step time of a run is measured after ``warmup`` steps, as CPU time of the process (all
its threads, so a progress bar's thread counts; other jobs on the machine do not) and as wall time. The reported
ratio is the median over repeats of (ddkit / plain) CPU time of adjacent runs; the wall-time ratio is beside it.
Running a subset of the settings keeps the other settings' results already in the output file.

    python benchmarks/recover_speed.py                      # both settings, writes benchmarks/results/recover_speed.json
    python benchmarks/recover_speed.py --settings fmnist --repeats 3 --steps 100   # quick look

Settings:
    fmnist: configs/fashion_mnist/sre2l/recover_ipc10.yaml's work: BN ConvNet-D3 width 32, 10 images of 1x28x28
            (one per class), shift by up to 2 px, no crop / flip.
    cifar:  a CIFAR-100-shaped job: BN ConvNet-D3 width 128, 100 images of 3x32x32, crop (shared box) + flip + shift
            by up to 4 px.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ddkit.datamodules.recover import RecoverJobs
from ddkit.formats.common import write_json
from ddkit.formats.teacher import TeacherMeta, load_teacher, save_teacher
from ddkit.nets import build_net
from ddkit.ops.bn_loss import bn_layer_loss, total_bn_loss
from ddkit.ops.recover_aug import (
    clamp_to_pixel_range_,
    cosine_lr,
    random_flip,
    random_resized_crop,
    random_shift,
)

SETTINGS = {
    "fmnist": {"dataset": "fashion_mnist", "net_kwargs": {"depth": 3, "width": 32}, "jitter": 2, "crop": False,
               "flip": False, "lr": 0.1, "r_bn": 0.01},
    "cifar": {"dataset": "cifar100", "net_kwargs": {"depth": 3, "width": 128}, "jitter": 4, "crop": True,
              "flip": True, "lr": 0.25, "r_bn": 0.01},
}


def make_teacher(setting: dict, folder: Path) -> str:
    """A BN ConvNet with random weights and non-trivial running statistics (speed does not depend on the values)."""
    spec = RecoverJobs(setting["dataset"]).spec
    torch.manual_seed(0)
    net = build_net("convnet_bn", spec.num_classes, spec.in_chans, spec.image_size, **setting["net_kwargs"])
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    path = folder / f"teacher_{setting['dataset']}.safetensors"
    save_teacher(path, net.eval(), TeacherMeta("convnet_bn", setting["net_kwargs"], spec))
    return str(path)


class Clock:
    """Wall time and CPU time of this process (all its threads, e.g. a progress bar's), in seconds.

    CPU time is what the step costs; other jobs on a shared machine inflate the wall time but not the CPU time.
    """

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def since(self, start: Clock, steps: int) -> dict[str, float]:
        """Per-step wall and CPU seconds from ``start`` to this clock."""
        return {"wall": (self.wall - start.wall) / steps, "cpu": (self.cpu - start.cpu) / steps}


class _StepTimer:
    """Wall and CPU time from the start of step ``warmup`` to the end of step ``last``.

    The clocks are read at those two steps only: reading the process CPU clock costs about 1 ms on some VMs, which
    would be charged to every ddkit step and to none of the plain loop's.
    """

    def __init__(self, warmup: int, last: int) -> None:
        import lightning as L

        class Timer(L.Callback):
            def __init__(self) -> None:
                self.start = self.end = None
                self.steps = 0

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
                if batch.step == warmup:
                    self.start = Clock()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
                if batch.step == last:
                    self.end = Clock()
                    self.steps = last + 1 - warmup

        self.callback = Timer()

    @property
    def per_step(self) -> dict[str, float]:
        return self.callback.end.since(self.callback.start, self.callback.steps)


def time_ddkit(setting: dict, teacher: str, steps: int, warmup: int, folder: Path,
               quiet: bool = False) -> dict[str, float]:
    """``quiet``: no logger, no progress bar, no image grids (the Trainer's loop and hooks alone)."""
    import lightning as L
    from lightning.pytorch.callbacks import TQDMProgressBar
    from lightning.pytorch.loggers import TensorBoardLogger

    from ddkit.modules.recover import Recover

    data = RecoverJobs(setting["dataset"])
    module = Recover(data.spec, teacher=teacher, ipc=1, batch_size=data.spec.num_classes, iterations=warmup + steps,
                     lr=setting["lr"], r_bn=setting["r_bn"], jitter=setting["jitter"], crop=setting["crop"],
                     flip=setting["flip"], seed=0, output=str(folder / "out"), export=None,
                     log_images_every_n_steps=0 if quiet else 200)
    timer = _StepTimer(warmup, warmup + steps - 1)
    logger = False if quiet else TensorBoardLogger(str(folder / "runs"), name="bench")
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=-1, log_every_n_steps=10, logger=logger,
                        enable_checkpointing=False, enable_progress_bar=not quiet, enable_model_summary=False,
                        callbacks=[timer.callback, *([] if quiet else [TQDMProgressBar()])])
    trainer.fit(module, datamodule=data)
    return timer.per_step


def time_plain(setting: dict, teacher: str, steps: int, warmup: int) -> dict[str, float]:
    """The reference's inner loop in plain PyTorch (hooks as SRe2L's BNFeatureHook, ops from ddkit.ops)."""
    net, meta = load_teacher(teacher)
    net = net.eval().requires_grad_(False)
    spec = meta.data_spec
    terms: list[torch.Tensor] = []
    bns = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    hooks = [bn.register_forward_hook(
        lambda m, inp, out, i=i: terms.__setitem__(i, bn_layer_loss(inp[0], m.running_mean, m.running_var)))
        for i, bn in enumerate(bns)]
    terms.extend([torch.zeros(())] * len(bns))
    n, total = spec.num_classes, warmup + steps
    g = torch.Generator().manual_seed(0)
    x = torch.randn((n, spec.in_chans, spec.image_size, spec.image_size), generator=g).requires_grad_()
    y = torch.arange(n)
    opt = torch.optim.Adam([x], lr=setting["lr"], betas=(0.5, 0.9), eps=1e-8)
    start = None
    for t in range(total):
        if t == warmup:
            start = Clock()
        opt.param_groups[0]["lr"] = cosine_lr(setting["lr"], t, total)
        v = x
        if setting["crop"]:
            v = random_resized_crop(v, g, spec.image_size)
        if setting["flip"]:
            v = random_flip(v, g)
        v = random_shift(v, g, setting["jitter"])
        logits = net(v)
        loss = F.cross_entropy(logits.float(), y) + setting["r_bn"] * total_bn_loss(terms, 10.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        clamp_to_pixel_range_(x, spec.mean, spec.std)
    per_step = Clock().since(start, steps)
    for h in hooks:
        h.remove()
    return per_step


def summarise(runs: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    """Per-run ms/step (CPU and wall) of each side and the medians of the per-repeat ratios to the plain loop."""
    out: dict[str, Any] = {}
    for side, times in runs.items():
        for clock in ("cpu", "wall"):
            out[f"{side}_{clock}_ms_per_step"] = [round(t[clock] * 1e3, 3) for t in times]
    for side, prefix in (("ddkit", ""), ("ddkit_quiet", "quiet_")):
        for clock, tag in (("cpu", ""), ("wall", "wall_")):
            ratios = [a[clock] / b[clock] for a, b in zip(runs[side], runs["plain"])]
            out[f"{prefix}{tag}ratios"] = [round(r, 4) for r in ratios]
            out[f"median_{prefix}{tag}ratio"] = round(statistics.median(ratios), 4)
    out["median_ddkit_ms"] = round(statistics.median(t["cpu"] for t in runs["ddkit"]) * 1e3, 3)
    out["median_plain_ms"] = round(statistics.median(t["cpu"] for t in runs["plain"]) * 1e3, 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=["fmnist", "cifar"], choices=sorted(SETTINGS))
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default: fmnist 400, cifar 40)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (both sides)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "recover_speed.json"))
    args = parser.parse_args()

    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    previous = json.loads(Path(args.out).read_text()).get("results", {}) if Path(args.out).is_file() else {}
    previous = {k: v for k, v in previous.items() if "median_wall_ratio" in v}  # results of this version only
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in args.settings:
            setting = SETTINGS[name]
            steps = args.steps or (400 if name == "fmnist" else 40)
            teacher = make_teacher(setting, folder)
            time_plain(setting, teacher, 5, 2)  # first-call costs out of the way
            runs: dict[str, list[dict[str, float]]] = {"ddkit": [], "plain": [], "ddkit_quiet": []}
            load_start = os.getloadavg()
            for r in range(args.repeats):
                runs["ddkit"].append(time_ddkit(setting, teacher, steps, args.warmup, folder / f"{name}{r}"))
                runs["plain"].append(time_plain(setting, teacher, steps, args.warmup))
                runs["ddkit_quiet"].append(time_ddkit(setting, teacher, steps, args.warmup, folder / f"{name}{r}q",
                                                      quiet=True))
                d, p, q = (runs[k][-1] for k in ("ddkit", "plain", "ddkit_quiet"))
                print(f"{name} repeat {r}: CPU ms/step ddkit {d['cpu'] * 1e3:.2f}, plain {p['cpu'] * 1e3:.2f}, "
                      f"ddkit quiet {q['cpu'] * 1e3:.2f}; ratio {d['cpu'] / p['cpu']:.3f} (wall "
                      f"{d['wall'] / p['wall']:.3f}), quiet {q['cpu'] / p['cpu']:.3f}", flush=True)
            results[name] = {"setting": setting, "steps_per_run": steps, "warmup": args.warmup,
                             "repeats": args.repeats, **summarise(runs),
                             "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
                             "loadavg_start": load_start, "loadavg_end": os.getloadavg()}
            print(f"{name}: median CPU-time ratio {results[name]['median_ratio']} (quiet "
                  f"{results[name]['median_quiet_ratio']}), median wall-time ratio {results[name]['median_wall_ratio']}",
                  flush=True)
    report = {
        "benchmark": "recover step time, ddkit Recover through the Trainer / plain PyTorch loop (same work)",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "target": "ddkit <= 1.10x the plain loop",
        "threads": args.threads,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "note": "runs interleaved (ddkit, plain, ddkit quiet); ratios are medians over repeats of adjacent runs' "
                "per-step CPU time of the process (all threads; wall-time ratios beside them); loadavg_start / "
                "loadavg_end show how busy the machine was",
        "results": {**previous, **results},
    }
    write_json(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
