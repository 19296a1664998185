"""``ddkit export``: a DistilledSet in another tool's input format.

    ddkit export ddranking distilled/cifar10/datm_ipc10/best --output exports/datm_ipc10
"""

from __future__ import annotations

from jsonargparse import ArgumentParser

from ddkit.errors import DDKitError

FORMATS = ("ddranking",)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="ddkit export", exit_on_error=False, description=(
        "Write a DistilledSet in another tool's input format. ddranking: images.pt (class-major), hard_labels.pt, "
        "soft_labels.pt (learned label logits, if any), syn_lr.pt (learned step size, if any), for DD-Ranking's "
        "compute_metrics(image_tensor=..., soft_labels=..., syn_lr=...)."))
    parser.add_argument("format", type=str, help=f"one of {', '.join(FORMATS)}")
    parser.add_argument("distilled", type=str, help="the DistilledSet directory")
    parser.add_argument("--output", type=str, required=True, help="the directory to write")
    return parser


def export_cli(args: list[str]) -> None:
    cfg = build_parser().parse_args(args)
    if cfg.format not in FORMATS:
        raise DDKitError(f"format: must be one of {', '.join(FORMATS)}, got {cfg.format!r}")
    from ddkit.formats.ddranking import export_ddranking
    from ddkit.formats.distilled import load_distilled

    path = export_ddranking(load_distilled(cfg.distilled), cfg.output)
    print(f"wrote {path}")
