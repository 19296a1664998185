"""``grid.png``: a picture of a DistilledSet, one row per class, written beside its tensors.

Each row starts with the class name and shows up to ``images_per_class`` of that class's images in pixel space
(mean/std normalisation or ZCA undone, so they look like the data). When the set has learned labels (DATM), the top
class of each image's learned label is printed under it, in red where it differs from the image's own class.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch

from ddkit.formats.distilled import DistilledSet, to_pixels

GRID_FILE = "grid.png"
CELL_PX = 48  # small images (8x8 digits, 28x28 Fashion-MNIST) are enlarged to at least this many pixels
MAX_CELL_PX = 64
PAD_PX = 2
NAME_PX = 110  # left band for the class names
LABEL_PX = 14  # band under each image for its learned label
TITLE_LINE_PX = 16
MIN_WIDTH_PX = 560  # room for the title above a narrow (IPC 1) grid
DPI = 100


def grid_selection(ds: DistilledSet, images_per_class: int, max_classes: int) -> list[torch.Tensor]:
    """Indices into ``ds`` of the images shown, one tensor per class row (the first ``images_per_class`` of each
    of the first ``max_classes`` classes)."""
    classes = range(min(ds.spec.num_classes, max_classes))
    return [torch.nonzero(ds.labels == c).flatten()[:images_per_class] for c in classes]


def class_name(ds: DistilledSet, c: int) -> str:
    names = ds.spec.class_names
    return str(names[c]) if c < len(names) else str(c)


def grid_png(ds: DistilledSet, images_per_class: int = 10, max_classes: int = 100) -> bytes:
    """The grid of ``ds`` as PNG bytes (drawn in memory, so that a caller's atomic write stays short).

    Args:
        ds: the set.
        images_per_class: images shown per class row.
        max_classes: class rows shown (the first ones), so that a 1000-class set still gives a viewable picture.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = grid_selection(ds, images_per_class, max_classes)
    cols = max(len(r) for r in rows)
    pixels = to_pixels(ds.images[torch.cat(rows)], ds.spec, ds.zca)  # [shown, C, h, w] in [0, 1]
    stride = math.ceil(max(pixels.shape[2:]) / MAX_CELL_PX)  # large images (ImageNet) shown at most this size
    pixels = pixels[:, :, ::stride, ::stride]
    h, w = pixels.shape[2:]
    scale = max(1, math.ceil(CELL_PX / max(h, w)))
    cell_h, cell_w = h * scale + PAD_PX, w * scale + PAD_PX
    learned = ds.label_logits is not None
    row_h = cell_h + (LABEL_PX if learned else 0)
    space = "ZCA inverted" if ds.zca is not None else "normalisation undone"
    subset = f", first {len(rows)} of {ds.spec.num_classes} classes" if len(rows) < ds.spec.num_classes else ""
    title = [f"{ds.method} · {ds.spec.dataset} · IPC {ds.ipc}{subset} · pixels, {space}"]
    if learned:
        title.append("under each image: the top class of its learned label (red: not the row's class)")
    title_px = TITLE_LINE_PX * len(title) + 6
    height = title_px + len(rows) * row_h + PAD_PX
    width = max(MIN_WIDTH_PX, NAME_PX + cols * cell_w + PAD_PX)
    canvas = np.ones((height, width, 3), dtype=np.float32)  # white
    first = 0  # position in ``pixels`` of the row's first image
    for r, idx in enumerate(rows):
        for col in range(len(idx)):
            img = pixels[first + col].repeat_interleave(scale, 1).repeat_interleave(scale, 2)
            img = img.expand(3, -1, -1) if img.shape[0] == 1 else img[:3]
            y, x = title_px + r * row_h + PAD_PX, NAME_PX + col * cell_w + PAD_PX
            canvas[y:y + h * scale, x:x + w * scale] = img.permute(1, 2, 0).numpy()
        first += len(idx)

    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()
    for line, text in enumerate(title):
        ax.text(PAD_PX, 4 + TITLE_LINE_PX * (line + 0.5), text, va="center", ha="left", fontsize=9)
    top = ds.label_logits.argmax(1).tolist() if learned else None
    for r, idx in enumerate(rows):
        y = title_px + r * row_h + PAD_PX
        ax.text(NAME_PX - 6, y + h * scale / 2, class_name(ds, r)[:16], va="center", ha="right", fontsize=8)
        if top is None:
            continue
        for col, i in enumerate(idx.tolist()):
            x = NAME_PX + col * cell_w + PAD_PX + w * scale / 2
            ax.text(x, y + h * scale + LABEL_PX / 2, class_name(ds, top[i])[:8], va="center", ha="center",
                    fontsize=7, color="black" if top[i] == r else "red")
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=DPI)
    return png.getvalue()
