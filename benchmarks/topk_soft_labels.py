"""Top-k stored soft labels against full logits: accuracy on Fashion-MNIST, bytes there and projected for ImageNet.

Fashion-MNIST: a random real subset (IPC 10 / 50, fixed subset seed 0) taught under the ``kd`` protocol with the
Fashion-MNIST relabel configs' recipe (T 30, Mixup, RandomCrop(pad 4) + flip, AdamW 5e-3 / wd 0.01, batch 32, 300
epochs; ConvNet-D3 width 32 student) from *stored* soft labels, full (K = 10 logits per view) or top-k, 3 seeds each.
The teacher is a BN ConvNet-D3 width 32 trained here for ``--teacher-epochs`` epochs (Adam 1e-3, batch 256).

ImageNet-1K: the bytes of the stores of configs/imagenet/sre2l/relabel_ipc{10,50}.yaml (300 epochs, K = 1000) with
full logits and top-k, from :func:`ddkit.formats.soft_labels.logit_bytes` plus the 33 B of view/mix parameters per
view and 24 B per batch of 256 that every store holds.

    OMP_NUM_THREADS=1 python benchmarks/topk_soft_labels.py                  # everything (cached per cell)
    OMP_NUM_THREADS=1 python benchmarks/topk_soft_labels.py --ipc 10 --k 0 3  # a subset; k 0 = full logits

Results: benchmarks/results/topk_soft_labels.json (each cell as it finishes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ddkit.datamodules.real import RealDataModule, random_real_subset
from ddkit.evaluation.evaluator import run_evaluation
from ddkit.formats.common import write_json
from ddkit.formats.distilled import DistilledSet, save_distilled
from ddkit.formats.soft_labels import logit_bytes, num_batches
from ddkit.formats.teacher import TeacherMeta, save_teacher
from ddkit.nets import build_net

RESULTS = Path(__file__).resolve().parent / "results" / "topk_soft_labels.json"
KD = {"temperature": 30.0, "mix": "mixup", "augment": "crop_flip", "lr": 0.005, "batch_size": 32, "labels": "stored"}
NET_KWARGS = {"depth": 3, "width": 32, "norm": "instance"}
IMAGENET = {"ipc10": 10_000, "ipc50": 50_000}


def train_teacher(dm: RealDataModule, path: Path, epochs: int) -> float:
    """A BN ConvNet-D3 width 32 (Adam 1e-3, batch 256, no augmentation); returns its test accuracy."""
    xtr, ytr, xte, yte = dm.load_tensors()
    torch.manual_seed(0)
    net = build_net("convnet_bn", 10, 1, 28, depth=3, width=32)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), 256):
            idx = perm[i:i + 256]
            loss = F.cross_entropy(net(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = sum((net(xte[i:i + 1000]).argmax(1) == yte[i:i + 1000]).sum().item() for i in range(0, len(xte), 1000))
    save_teacher(path, net, TeacherMeta("convnet_bn", {"depth": 3, "width": 32}, dm.spec,
                                        extra={"test_accuracy": acc / len(xte)}))
    return acc / len(xte)


def imagenet_projection(ks: list[int]) -> list[dict]:
    """Bytes of the ImageNet relabel stores (300 epochs, K 1000, batch 256) with full logits and top-k."""
    rows = []
    for name, n in IMAGENET.items():
        params = 300 * (n * 33 + num_batches(n, 256) * 24)
        for k in [0, *ks]:
            b = logit_bytes(n, 1000, k or None, 300)
            logits = b["logits_topk"] if k else b["logits_full"]
            rows.append({"set": f"imagenet {name}", "k": k or None, "logit_bytes": logits, "param_bytes": params,
                         "store_bytes": logits + params, "images_uint8_bytes": n * 3 * 224 * 224})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ipc", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--k", type=int, nargs="+", default=[0, 1, 2, 3, 5], help="0: full logits")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--teacher-epochs", type=int, default=2)
    parser.add_argument("--work", default="runs/topk_soft_labels")
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args()
    results = Path(args.results)
    torch.set_num_threads(1)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    doc = json.loads(results.read_text()) if results.is_file() else {"cells": {}}
    doc.update(machine=f"{platform.machine()}, {os.cpu_count()} CPUs (shared), torch threads 1",
               command="OMP_NUM_THREADS=1 python benchmarks/topk_soft_labels.py " + " ".join(
                   f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                   for k, v in vars(args).items() if k not in ("work", "results")),
               kd_options=KD, net_kwargs=NET_KWARGS, imagenet=imagenet_projection([1, 5, 10, 20, 100]))
    dm = RealDataModule("fashion_mnist")
    teacher = work / "teacher.safetensors"
    if not teacher.is_file():
        start = time.perf_counter()
        doc["teacher"] = {"test_accuracy": train_teacher(dm, teacher, args.teacher_epochs),
                          "epochs": args.teacher_epochs, "wall_s": time.perf_counter() - start}
        write_json(results, doc)
    xtr, ytr, _, _ = dm.load_tensors()
    for ipc in args.ipc:
        subset = work / f"random_ipc{ipc}"
        if not subset.is_dir():
            idx = random_real_subset(ytr, ipc, 0)
            save_distilled(DistilledSet(xtr[idx].clone(), ytr[idx].clone(), dm.spec, ipc, "random"), subset)
        for k in args.k:
            key = f"ipc{ipc}_k{k or 'full'}"
            if key in doc["cells"]:
                continue
            stores = work / f"stores_{key}"
            options = {**KD, "teacher": str(teacher), "soft_labels": str(stores), "soft_label_topk": k or None,
                       "epochs": args.epochs}
            start = time.perf_counter()
            report = run_evaluation(dm, distilled=[str(subset)], protocols=["kd"], protocol_options={"kd": options},
                                    seeds=args.seeds, net="convnet", net_kwargs=NET_KWARGS, epochs=args.epochs,
                                    output=str(work / f"eval_{key}"), accelerator="cpu", progress=False)
            r = report["results"][0]
            store_bytes = [sum(p.stat().st_size for p in s.glob("epoch_*.safetensors")) for s in stores.iterdir()]
            doc["cells"][key] = {"ipc": ipc, "k": k or None, "accuracies": r["accuracies"], "mean": r["mean"],
                                 "std": r["std"], "store_bytes_per_seed": store_bytes,
                                 "wall_s": time.perf_counter() - start}
            write_json(results, doc)
            print(f"{key}: {100 * r['mean']:.2f} ± {100 * r['std']:.2f} %, store {store_bytes[0]} B", flush=True)
    for row in doc["imagenet"]:
        print(f"{row['set']} k={row['k']}: store {row['store_bytes'] / 1e9:.2f} GB "
              f"(logits {row['logit_bytes'] / 1e9:.2f} GB)")


if __name__ == "__main__":
    main()
