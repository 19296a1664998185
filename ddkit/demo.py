"""``make demo``: a real distillation run end to end on scikit-learn digits (embedded data), then the table.

Each step is an ordinary ``ddkit`` command (the same as a user would type), run with reduced epochs so the whole
demo takes a few minutes on 2 CPU cores. Outputs go to ``demo_out/``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ddkit.cli import main as ddkit

OUT = Path("demo_out")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def step(title: str, args: list[str]) -> None:
    print(f"\n=== {title}\n$ ddkit {' '.join(args)}", flush=True)
    start = time.perf_counter()
    ddkit(args)
    print(f"--- {time.perf_counter() - start:.0f} s", flush=True)


def run() -> None:
    OUT.mkdir(exist_ok=True)
    step("supervised ConvNet on digits (the full-data reference)", [
        "fit", "-c", "configs/digits/classifier.yaml", "--trainer.max_epochs", "15",
        "--trainer.default_root_dir", str(OUT), "--trainer.logger.init_args.save_dir", str(OUT / "runs"),
        "--model.init_args.export_teacher", str(OUT / "digits_teacher.safetensors"), *QUIET])
    step("random real subset at IPC 10 under the hard protocol", [
        "evaluate", "-c", "configs/digits/evaluate_random.yaml", "--ipc", "10", "--seeds", "3",
        "--output", str(OUT / "report"), "--progress", "false"])
    print(f"\nreport: {OUT / 'report' / 'report.md'}; TensorBoard: tensorboard --logdir {OUT}")


if __name__ == "__main__":
    sys.exit(run())
