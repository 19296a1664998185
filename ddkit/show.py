"""``ddkit show DIR``: draw a DistilledSet as a PNG grid (one row per class) and print where it went."""

from __future__ import annotations

from pathlib import Path

from jsonargparse import ArgumentParser

from ddkit.errors import DDKitError


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="ddkit show", exit_on_error=False, description=(
        "Write a PNG grid of a distilled set: one row per class, images in pixel space (normalisation or ZCA "
        "undone), the top class of each learned label under its image. Example: ddkit show "
        "demo_out/sre2l/recover_ipc10"))
    parser.add_argument("distilled", type=str, help="DistilledSet directory")
    parser.add_argument("--output", type=str | None, default=None,
                        help="PNG file to write (default: <distilled>/grid.png, the file every stage writes)")
    parser.add_argument("--images_per_class", type=int, default=10, help="images per class row")
    parser.add_argument("--max_classes", type=int, default=100, help="class rows shown (the first ones)")
    return parser


def show_cli(args: list[str]) -> Path:
    """Parse ``args``, write the grid, print its path and return it."""
    from ddkit.formats.common import atomic_file
    from ddkit.formats.distilled import load_distilled
    from ddkit.formats.grid import GRID_FILE, grid_png

    cfg = build_parser().parse_args(args)
    for name in ("images_per_class", "max_classes"):
        if cfg[name] <= 0:
            raise DDKitError(f"{name}: must be > 0, got {cfg[name]!r}")
    ds = load_distilled(cfg.distilled)
    output = Path(cfg.output or Path(cfg.distilled) / GRID_FILE)
    png = grid_png(ds, cfg.images_per_class, cfg.max_classes)
    with atomic_file(output) as tmp:
        tmp.write_bytes(png)
    print(output)
    return output
