"""Does SSL pretraining work? kNN and linear-probe accuracy of an SSL backbone vs the same backbone at random init.

Fashion-MNIST, CPU. Steps:
1. pretrain with ``ddkit fit -c configs/fashion_mnist/scdd/pretrain_<method>.yaml`` (a subprocess; wall time recorded);
2. features of the whole train (60k) and test (10k) splits, backbone in eval mode, for the SSL checkpoint's
   evaluation encoder and for the same backbone at its random initialisation (rebuilt with the run's seed);
3. kNN (k=20, cosine; majority vote, and the InstDisc-weighted vote with t=0.1) on the SSL representation
   (``pooled``: spatial average of the ConvNet map) and on the classifier's features (``flat``);
4. a frozen linear probe on ``flat`` features with the probe module's recipe (SGD, momentum 0.9, wd 0, lr x0.1 at
   60% and 80% of the epochs, head N(0, 0.01)); with a frozen eval-mode backbone and no augmentation this equals
   ``LinearProbe`` trained on images, computed once on cached features.

Usage:
    OMP_NUM_THREADS=1 python benchmarks/ssl_fmnist.py --method mocov2 [--epochs N] [--max-minutes 18]
Writes benchmarks/results/ssl_fmnist_<method>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def pretrain(method: str, epochs: int | None, max_minutes: float, out_dir: Path, extra: list[str]) -> tuple[Path, float, list[str]]:
    cfg = ROOT / "configs" / "fashion_mnist" / "scdd" / f"pretrain_{method}.yaml"
    cmd = [sys.executable, "-m", "ddkit.cli", "fit", "-c", str(cfg.relative_to(ROOT)),
           "--checkpoint.dirpath", str(out_dir), "--trainer.enable_progress_bar", "false",
           "--trainer.max_time", f"00:00:{int(max_minutes):02d}:00"]
    if epochs is not None:
        cmd += ["--trainer.max_epochs", str(epochs)]
    cmd += extra
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return out_dir / "last.ckpt", time.time() - t0, cmd


@torch.no_grad()
def features(net, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    """Flattened ConvNet maps ``[N, C*H*W]`` (eval mode)."""
    net.eval()
    return torch.cat([net.forward_features(x[i : i + batch]) for i in range(0, len(x), batch)])


def pooled(flat: torch.Tensor, channels: int) -> torch.Tensor:
    return flat.view(flat.shape[0], channels, -1).mean(-1)


def linear_probe(ftr, ytr, fte, yte, num_classes: int, lr: float, epochs: int, batch: int = 256, seed: int = 0) -> float:
    """The LinearProbe recipe on cached features; returns test accuracy."""
    from ddkit.modules.common import epoch_lr_factor

    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(ftr.shape[1], num_classes)
    torch.nn.init.normal_(head.weight, std=0.01, generator=g)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    for epoch in range(epochs):
        for group in opt.param_groups:
            group["lr"] = lr * epoch_lr_factor("step", epoch, epochs, (0.6, 0.8), 0.1)
        perm = torch.randperm(len(ftr), generator=g)
        for i in range(0, len(ftr), batch):
            idx = perm[i : i + batch]
            loss = torch.nn.functional.cross_entropy(head(ftr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return float((head(fte).argmax(1) == yte).float().mean())


def evaluate(ckpt: Path, probe_lrs: list[float], probe_epochs: int) -> dict:
    import lightning as L

    from ddkit.callbacks.knn import knn_predict_labels
    from ddkit.datamodules.real import RealDataModule
    from ddkit.modules.probe import load_ssl_backbone
    from ddkit.modules.ssl import METHODS
    from ddkit.nets import build_net

    hp, state = load_ssl_backbone(ckpt)
    dm = RealDataModule(dataset="fashion_mnist")
    xtr, ytr, xte, yte = dm.load_tensors()
    # the random initialisation of the same run: same seed, same construction order as the SSL module
    L.seed_everything(int(hp.get("seed", 0)), verbose=False)
    init_kwargs = {k: v for k, v in hp.items()
                   if not k.startswith("_") and k not in ("method", "eval_encoder", "feature_dim")}
    random_module = METHODS[hp["method"]](**init_kwargs)
    spec = random_module.spec
    nets = {}
    for name in ("ssl", "random"):
        net = build_net(hp["net"], spec.num_classes, spec.in_chans, spec.image_size, **(hp.get("net_kwargs") or {}))
        src = state if name == "ssl" else random_module.eval_backbone.state_dict()
        missing = net.load_state_dict(src, strict=False).missing_keys
        assert all(k.startswith("head.") for k in missing), missing
        nets[name] = net
    channels = (hp.get("net_kwargs") or {}).get("width", 128)
    out: dict = {}
    for name, net in nets.items():
        t0 = time.time()
        ftr, fte = features(net, xtr), features(net, xte)
        res: dict = {"feature_seconds": round(time.time() - t0, 1)}
        for kind, (a, b) in {"pooled": (pooled(ftr, channels), pooled(fte, channels)), "flat": (ftr, fte)}.items():
            for vote, t in (("vote", None), ("weighted_t0.1", 0.1)):
                pred = knn_predict_labels(b, a, ytr, 10, k=20, temperature=t)
                res[f"knn20_{kind}_{vote}"] = round(float((pred == yte).float().mean()) * 100, 2)
        for lr in probe_lrs:
            t0 = time.time()
            res[f"probe_flat_lr{lr:g}"] = round(linear_probe(ftr, ytr, fte, yte, 10, lr, probe_epochs) * 100, 2)
            res[f"probe_flat_lr{lr:g}_seconds"] = round(time.time() - t0, 1)
        out[name] = res
        print(name, res, flush=True)
    out["gain_points"] = {k: round(out["ssl"][k] - out["random"][k], 2) for k in out["ssl"]
                          if k.startswith(("knn", "probe")) and not k.endswith("seconds")}
    out["ssl_hparams"] = {k: v for k, v in hp.items() if k != "data_spec"}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", required=True)
    p.add_argument("--epochs", type=int, default=None, help="override the config's max_epochs")
    p.add_argument("--max-minutes", type=float, default=18.0, help="hard cap on pretraining (Trainer.max_time)")
    p.add_argument("--ckpt", default=None, help="skip pretraining and evaluate this SSL checkpoint")
    p.add_argument("--pretrain-seconds", type=float, default=None, help="with --ckpt: the run's recorded wall time")
    p.add_argument("--probe-lrs", default="30,1", help="comma-separated probe learning rates (30 = MoCo's)")
    p.add_argument("--probe-epochs", type=int, default=20)
    p.add_argument("--out", default=None)
    p.add_argument("extra", nargs="*", help="extra ddkit fit arguments")
    a = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    result: dict = {"benchmark": "ssl_fmnist", "method": a.method, "machine": platform.processor() or platform.machine(),
                    "torch_threads": torch.get_num_threads(), "command": " ".join(["python"] + sys.argv)}
    if a.ckpt:
        ckpt = Path(a.ckpt)
        result["pretrain_seconds"] = a.pretrain_seconds
    else:
        ckpt, seconds, cmd = pretrain(a.method, a.epochs, a.max_minutes, ROOT / "runs" / "bench" / f"ssl_{a.method}",
                                      a.extra)
        result["pretrain_seconds"] = round(seconds, 1)
        result["pretrain_command"] = " ".join(["ddkit"] + cmd[3:])
    ck = torch.load(ckpt, map_location="cpu", weights_only=True)
    result["pretrain_epochs_done"] = int(ck.get("epoch", -1)) + 1
    result["pretrain_steps_done"] = int(ck.get("global_step", -1))
    t0 = time.time()
    result.update(evaluate(ckpt, [float(x) for x in a.probe_lrs.split(",")], a.probe_epochs))
    result["eval_seconds"] = round(time.time() - t0, 1)
    out = Path(a.out or ROOT / "benchmarks" / "results" / f"ssl_fmnist_{a.method}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")
    print(json.dumps(result["gain_points"], indent=2))


if __name__ == "__main__":
    main()
