"""SC-DD's core observation on real data: the BN running statistics of an SSL teacher vary more across channels than
those of a supervised teacher of the same architecture.

Fashion-MNIST, CPU, BN ConvNet-D3 (width 32). Teachers (both exported with ddkit's teacher format):
- supervised (SRe2L squeeze): ``ddkit fit -c configs/fashion_mnist/sre2l/squeeze.yaml`` (Classifier);
- SSL (SC-DD squeeze): the linear probe of an SSL checkpoint, ``ddkit fit -c configs/fashion_mnist/scdd/probe.yaml``
  (backbone frozen in eval mode, so its BN statistics are the SSL run's).
For every BN layer: the variance across channels (population) of ``running_mean`` and of ``running_var``, plus the
teacher's test accuracy. Writes benchmarks/results/ssl_bn_spread.json and ssl_bn_spread.png.

Usage:
    OMP_NUM_THREADS=1 python benchmarks/ssl_bn_spread.py --ssl runs/bench/ssl_mocov2/last.ckpt [--ssl ...]
        [--supervised-epochs 3] [--probe-epochs 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "runs" / "bench" / "bn_spread"


def ddkit_fit(args: list[str]) -> tuple[float, str]:
    cmd = [sys.executable, "-m", "ddkit.cli", "fit", *args, "--trainer.enable_progress_bar", "false"]
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.time() - t0, " ".join(["ddkit", *cmd[3:]])


def bn_spread(net: torch.nn.Module) -> list[dict]:
    rows = []
    for name, m in net.named_modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            rows.append({"layer": name, "channels": m.num_features,
                         "mean_spread": float(m.running_mean.var(unbiased=False)),
                         "var_spread": float(m.running_var.var(unbiased=False)),
                         "var_mean": float(m.running_var.mean())})
    return rows


@torch.no_grad()
def test_accuracy(net: torch.nn.Module) -> float:
    from ddkit.datamodules.real import RealDataModule

    _, _, xte, yte = RealDataModule(dataset="fashion_mnist").load_tensors()
    pred = torch.cat([net(xte[i : i + 1000]).argmax(1) for i in range(0, len(xte), 1000)])
    return round(float((pred == yte).float().mean()) * 100, 2)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["teachers"])
    layers = [r["layer"] for r in result["teachers"][names[0]]["bn"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    width = 0.8 / len(names)
    for ax, key, title in ((axes[0], "mean_spread", "Var over channels of BN running_mean"),
                           (axes[1], "var_spread", "Var over channels of BN running_var")):
        for i, name in enumerate(names):
            vals = [r[key] for r in result["teachers"][name]["bn"]]
            ax.bar([j + i * width for j in range(len(layers))], vals, width, label=name)
        ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(layers))])
        ax.set_xticklabels([f"BN{j + 1}" for j in range(len(layers))])
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=8)
    fig.suptitle("Fashion-MNIST, BN ConvNet-D3 (width 32): supervised vs SSL teacher", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ssl", action="append", required=True, help="SSL checkpoint(s) (benchmarks/ssl_fmnist.py runs)")
    p.add_argument("--supervised-epochs", type=int, default=3)
    p.add_argument("--probe-epochs", type=int, default=2)
    p.add_argument("--supervised-teacher", default=None, help="reuse an existing supervised teacher file")
    a = p.parse_args()
    from ddkit.formats.teacher import load_teacher
    from ddkit.modules.probe import load_ssl_backbone

    OUT.mkdir(parents=True, exist_ok=True)
    result: dict = {"benchmark": "ssl_bn_spread", "command": " ".join(["python"] + sys.argv), "teachers": {}}
    sup = Path(a.supervised_teacher) if a.supervised_teacher else OUT / "supervised.safetensors"
    runs = {}
    if not a.supervised_teacher:
        runs["supervised"] = ddkit_fit(["-c", "configs/fashion_mnist/sre2l/squeeze.yaml", "--trainer.max_epochs",
                                        str(a.supervised_epochs), "--model.init_args.export_teacher", str(sup),
                                        "--checkpoint.dirpath", str(OUT / "supervised_ckpt")])
    teachers = {"supervised (SRe2L squeeze)": (sup, "supervised")}
    for ckpt in a.ssl:
        method = load_ssl_backbone(ckpt)[0]["method"]
        path = OUT / f"scdd_{method}.safetensors"
        runs[method] = ddkit_fit(["-c", "configs/fashion_mnist/scdd/probe.yaml", "--model.init_args.ssl_checkpoint",
                                  str(ckpt), "--trainer.max_epochs", str(a.probe_epochs),
                                  "--model.init_args.export_teacher", str(path),
                                  "--checkpoint.dirpath", str(OUT / f"probe_{method}_ckpt")])
        teachers[f"SSL {method} + linear probe (SC-DD squeeze)"] = (path, method)
    for label, (path, key) in teachers.items():
        net, meta = load_teacher(path)
        rows = bn_spread(net)
        key = key if key in runs else None
        result["teachers"][label] = {
            "file": str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path),
            "net": meta.net, "net_kwargs": meta.net_kwargs, "test_acc": test_accuracy(net), "bn": rows,
            "mean_spread_avg": sum(r["mean_spread"] for r in rows) / len(rows),
            "var_spread_avg": sum(r["var_spread"] for r in rows) / len(rows),
            "fit_seconds": round(runs[key][0], 1) if key else None, "fit_command": runs[key][1] if key else None,
        }
    names = list(result["teachers"])
    lines = ["| teacher | test acc | " + " | ".join(f"BN{i + 1} var(mean) / var(var)"
                                                  for i in range(len(result["teachers"][names[0]]["bn"]))) + " |",
             "|---|---|" + "---|" * len(result["teachers"][names[0]]["bn"])]
    for name, t in result["teachers"].items():
        cells = " | ".join(f"{r['mean_spread']:.3g} / {r['var_spread']:.3g}" for r in t["bn"])
        lines.append(f"| {name} | {t['test_acc']:.2f} | {cells} |")
    result["table_markdown"] = "\n".join(lines)
    res = ROOT / "benchmarks" / "results"
    res.mkdir(parents=True, exist_ok=True)
    (res / "ssl_bn_spread.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    plot(result, res / "ssl_bn_spread.png")
    print(result["table_markdown"])


if __name__ == "__main__":
    main()
