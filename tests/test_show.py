"""grid.png beside every DistilledSet, and ddkit show."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ddkit.cli import main
from ddkit.datamodules.spec import DataSpec
from ddkit.formats.distilled import DistilledSet, save_distilled
from ddkit.formats.grid import CELL_PX, LABEL_PX, NAME_PX, PAD_PX


def grey_set(label_logits: torch.Tensor | None = None) -> DistilledSet:
    """3 classes x 2 images of 8x8 pixels, class c a uniform grey (c + 1) / 4, stored normalized (mean 0.5, std 0.25)."""
    spec = DataSpec("toy", 3, 1, 8, (0.5,), (0.25,), class_names=("zero", "one", "two"))
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    pixels = ((labels.float() + 1) / 4).view(-1, 1, 1, 1).expand(-1, 1, 8, 8)
    return DistilledSet(images=((pixels - 0.5) / 0.25).contiguous(), labels=labels, spec=spec, ipc=2, method="toy",
                        label_logits=label_logits)


def cell_centre(grid: np.ndarray, title_px: int, row: int, col: int, row_h: int) -> float:
    """The grey level (0-1) at the centre of the image in ``row``, ``col`` of the grid."""
    scale = CELL_PX // 8
    y = title_px + row * row_h + PAD_PX + 4 * scale
    x = NAME_PX + col * (8 * scale + PAD_PX) + PAD_PX + 4 * scale
    return grid[y, x, 0] / 255


def test_save_writes_a_grid_with_one_row_per_class_in_pixel_space(tmp_path):
    save_distilled(grey_set(), tmp_path / "set")
    grid = np.asarray(Image.open(tmp_path / "set" / "grid.png").convert("RGB"))
    row_h = 8 * (CELL_PX // 8) + PAD_PX
    title_px = grid.shape[0] - 3 * row_h - PAD_PX  # three class rows under the title
    assert title_px > 0
    for row in range(3):
        for col in range(2):  # normalisation undone: class c is grey (c + 1) / 4 again
            assert cell_centre(grid, title_px, row, col, row_h) == pytest.approx((row + 1) / 4, abs=2 / 255)


def test_learned_labels_get_a_line_under_each_image_and_show_prints_the_path(tmp_path, capsys):
    save_distilled(grey_set(), tmp_path / "hard")
    logits = torch.eye(3)[torch.tensor([0, 0, 1, 1, 2, 0])] * 5  # the last image's label says "zero"
    save_distilled(grey_set(logits), tmp_path / "learned")
    main(["show", str(tmp_path / "learned"), "--output", str(tmp_path / "out.png")])
    assert capsys.readouterr().out.strip() == str(tmp_path / "out.png")
    hard = Image.open(tmp_path / "hard" / "grid.png")
    learned = Image.open(tmp_path / "out.png")
    assert learned.size == Image.open(tmp_path / "learned" / "grid.png").size
    # three label bands, and a second title line explaining them
    assert learned.size[1] - hard.size[1] == 3 * LABEL_PX + 16
    grid = np.asarray(learned.convert("RGB")).astype(int)
    reddish = (grid[..., 0] > 150) & (grid[..., 1] < 100) & (grid[..., 2] < 100)
    assert reddish.any()  # the mislabelled image's label is drawn in red


def test_show_of_a_missing_set_is_one_line_and_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["show", str(tmp_path / "nope")])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: distilled: directory not found, got '{tmp_path / 'nope'}'"
