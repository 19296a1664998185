"""Peak memory of a KD epoch over a DistilledSet several times larger than the memory the run may use.

An ImageNet-shaped set (1000 classes, 3x224x224, generated Gaussian images, float32 storage: ``--gb`` GB on disk) is
written once, chunk by chunk (``save_distilled`` of a lazy source: it is never in memory). Then a fresh process
loads it with ``load_distilled(lazy=True)`` (checksums verified), builds a ``KDStudent`` (ConvNet-D3 width 8
student, BN ConvNet-D3 width 8 online teacher: small on purpose, the subject is the data path) and trains one epoch
(RandomResizedCrop 224 + flip, CutMix, batch 64, ``--workers`` DataLoader workers) with the Trainer. Memory is the
resident set size, ``ru_maxrss`` of the process (the larger of it and the workers' ``RUSAGE_CHILDREN`` peak when
there are workers). The model's baseline is the peak of the very same run stopped after ``--baseline-batches``
batches (interpreter, torch, Lightning, the two nets, a step's activations and the allocator's caches); the data
path's cost is the full epoch's peak minus that baseline. The budget is met when it is at most ``--budget-gb`` while
the set is at least 4x that budget.

    OMP_NUM_THREADS=1 python benchmarks/kd_memory.py                    # 4 GB set, 1 GB budget
    OMP_NUM_THREADS=1 python benchmarks/kd_memory.py --gb 0.2 --budget-gb 0.05   # quick look

Results: benchmarks/results/kd_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "kd_memory.json"
SIZE, CLASSES = 224, 1000


def spec():
    from ddkit.datamodules.real import RealDataModule

    return RealDataModule("imagenet").spec


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_set(path: Path, gb: float) -> dict:
    """Write the generated set (and a small teacher beside it) unless it is there; return its size."""
    from ddkit.formats.distilled import DistilledSet, save_distilled
    from ddkit.formats.images import _Images
    from ddkit.formats.teacher import TeacherMeta, save_teacher
    from ddkit.nets import build_net

    s = spec()
    per_image = 3 * SIZE * SIZE * 4
    ipc = max(1, round(gb * 1e9 / per_image / CLASSES))
    n = ipc * CLASSES

    class Generated(_Images):
        """Image i is N(0, 1) drawn from a generator seeded with i: nothing is held in memory."""

        storage = "float32"
        shape = torch.Size((n, 3, SIZE, SIZE))

        def read(self, positions: list[int]) -> torch.Tensor:
            return torch.stack([torch.randn(3, SIZE, SIZE, generator=torch.Generator().manual_seed(i))
                                for i in positions]) if positions else torch.empty(0, 3, SIZE, SIZE)

    if not (path / "set" / "meta.json").is_file():
        labels = torch.arange(CLASSES).repeat_interleave(ipc)
        save_distilled(DistilledSet(images=Generated(), labels=labels, spec=s, ipc=ipc, method="generated"),
                       path / "set")
    if not (path / "teacher.safetensors").is_file():
        torch.manual_seed(0)
        net = build_net("convnet_bn", CLASSES, 3, SIZE, depth=3, width=8).eval()
        save_teacher(path / "teacher.safetensors", net, TeacherMeta("convnet_bn", {"depth": 3, "width": 8}, s))
    return {"num_images": n, "ipc": ipc, "set_bytes": (path / "set" / "images.safetensors").stat().st_size}


def child(path: Path, workers: int, batch_size: int, limit_batches: int | None) -> dict:
    """One KD epoch (or its first ``limit_batches`` batches) over the lazily read set, in this fresh process."""
    import lightning as L

    from ddkit.formats.distilled import load_distilled
    from ddkit.modules.kd import KDStudent

    torch.set_num_threads(1)
    start_rss = rss_bytes()
    t0 = time.perf_counter()
    ds = load_distilled(path / "set", lazy=True)
    load_s = time.perf_counter() - t0
    module = KDStudent(ds.spec, net="convnet", net_kwargs={"depth": 3, "width": 8}, teacher=str(path / "teacher.safetensors"),
                       temperature=20.0, mix="cutmix", augment="rrc_flip", labels="online")
    module.attach_train_set(ds.images, ds.labels, batch_size=batch_size, num_workers=workers)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, limit_train_batches=limit_batches)
    base = rss_bytes()
    t0 = time.perf_counter()
    trainer.fit(module)
    epoch_s = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 if workers else 0
    return {"start_rss_bytes": start_rss, "base_rss_bytes": base, "peak_rss_bytes": peak,
            "worker_peak_rss_bytes": children, "load_s": load_s, "epoch_s": epoch_s,
            "steps": int(trainer.global_step), "train_loss": float(trainer.callback_metrics["train/loss"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=4.0, help="size of the float32 set on disk")
    parser.add_argument("--budget-gb", type=float, default=1.0, help="allowed peak RSS above the base")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--work", default="/tmp/ddkit_kd_memory")
    parser.add_argument("--output", default=str(RESULTS))
    parser.add_argument("--baseline-batches", type=int, default=3)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)  # batches to train, 0: the whole epoch
    args = parser.parse_args()
    work = Path(args.work)
    if args.child is not None:
        print(json.dumps(child(work, args.workers, args.batch_size, args.child or None)))
        return
    torch.set_num_threads(1)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    made = make_set(work, args.gb)
    write_s = time.perf_counter() - t0
    def run(batches: int) -> dict:
        cmd = [sys.executable, __file__, "--child", str(batches), "--work", str(work), "--workers", str(args.workers),
               "--batch-size", str(args.batch_size)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO)}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        out["peak_bytes"] = max(out["peak_rss_bytes"], out["worker_peak_rss_bytes"])
        return out

    baseline, r = run(args.baseline_batches), run(0)
    above = r["peak_bytes"] - baseline["peak_bytes"]
    budget = args.budget_gb * 1e9
    doc = {**made, "epoch": r, "baseline": baseline, "write_s": write_s, "budget_bytes": budget,
           "peak_above_baseline_bytes": above,
           "set_over_budget": made["set_bytes"] / budget, "met": bool(above <= budget and made["set_bytes"] >= 4 * budget),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared), torch threads 1",
           "command": "OMP_NUM_THREADS=1 python benchmarks/kd_memory.py " + " ".join(sys.argv[1:])}
    from ddkit.formats.common import write_json

    write_json(args.output, doc)
    print(f"set {made['set_bytes'] / 1e9:.2f} GB ({made['num_images']} images) = {doc['set_over_budget']:.1f}x the "
          f"{args.budget_gb} GB budget; KD epoch ({r['steps']} steps, {r['epoch_s']:.0f} s): peak RSS "
          f"{r['peak_bytes'] / 1e9:.3f} GB; the first {baseline['steps']} steps' peak {baseline['peak_bytes'] / 1e9:.3f} GB;"
          f" the epoch's peak above it {above / 1e9:.3f} GB -> {'met' if doc['met'] else 'NOT met'}")


if __name__ == "__main__":
    main()
