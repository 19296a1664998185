"""``ddkit teacher import``: a torchvision / timm ResNet checkpoint file as a ddkit teacher.

Example (torchvision's ImageNet ResNet-18, downloaded beforehand with ``torchvision.models.resnet18(weights=
"IMAGENET1K_V1")`` or from the URL in torchvision's documentation)::

    ddkit teacher import resnet18-f37072fd.pth --net resnet18 --dataset imagenet \\
        --output outputs/imagenet/sre2l/teacher.safetensors
"""

from __future__ import annotations

from jsonargparse import ArgumentParser

from ddkit.datamodules.real import DATASETS, RealDataModule
from ddkit.errors import DDKitError
from ddkit.formats.teacher import IMPORTABLE_NETS, import_resnet_checkpoint


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="ddkit teacher import", exit_on_error=False, description=(
        "Convert a local torchvision or timm ResNet-18 / ResNet-50 checkpoint (read with torch.load(weights_only="
        "True)) into a ddkit teacher file whose logits equal the source model's."))
    parser.add_argument("checkpoint", type=str, help="the .pth / .pt / .bin file (a state dict, or one under "
                        "state_dict / model / state_dict_ema / net; a 'module.' prefix is removed)")
    parser.add_argument("--net", type=str, required=True, help=f"one of {', '.join(IMPORTABLE_NETS)}")
    parser.add_argument("--dataset", type=str, required=True, help=f"what it was trained on: {', '.join(DATASETS)}")
    parser.add_argument("--output", type=str, required=True, help="the teacher .safetensors file to write")
    parser.add_argument("--image_size", type=int | None, default=None,
                        help="input size if not the dataset's (e.g. 64 for a Tiny-ImageNet teacher at 64 px)")
    return parser


def teacher_cli(args: list[str]) -> None:
    if not args or args[0] != "import":
        raise DDKitError(f"teacher: the only subcommand is 'import', got {args[0] if args else None!r}")
    cfg = build_parser().parse_args(args[1:])
    if cfg.dataset not in DATASETS:
        raise DDKitError(f"dataset: unknown name (known: {', '.join(DATASETS)}), got {cfg.dataset!r}")
    spec = RealDataModule(dataset=cfg.dataset, image_size=cfg.image_size).spec
    meta = import_resnet_checkpoint(cfg.checkpoint, cfg.net, spec, cfg.output)
    print(f"wrote {cfg.output}: {meta.net} ({meta.net_kwargs['stem']} stem), {spec.num_classes} classes, "
          f"{spec.image_size} px, mean {list(spec.mean)} std {list(spec.std)}")
