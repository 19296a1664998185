"""Atomic artifacts under SIGKILL: a writer killed in the middle of replacing a DistilledSet or an expert file leaves
the previous artifact loadable and valid, and nothing partial under the final name.

The child process writes with the real ``save_distilled`` / ``save_expert``; its ``save_tensors`` is wrapped so that
after writing part of the new artifact it creates a marker file and sleeps; the test kills it then.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

from ddkit.datamodules.spec import DataSpec
from ddkit.formats.buffer import BufferMeta, ExpertBuffer, expert_file, save_expert, write_buffer_meta
from ddkit.formats.distilled import DistilledSet, load_distilled, save_distilled

SPEC = DataSpec("digits", 10, 1, 8, (0.5,), (0.25,))

# Runs in the child: wrap <module>.save_tensors so that the second call (the first file is written) stops mid-write.
CHILD = textwrap.dedent("""
    import sys, time, torch
    from pathlib import Path
    import {module} as target
    marker = Path(sys.argv[1])
    real = target.save_tensors
    def slow(path, tensors, metadata=None):
        real(path, tensors, metadata)
        marker.write_text(str(path))
        time.sleep(600)
    target.save_tensors = slow
    {write}
""")


def _kill_mid_write(tmp_path: Path, module: str, write: str) -> str:
    """Start the child, wait until it is inside the write, SIGKILL it; returns the file it was writing."""
    marker = tmp_path / "inside_write"
    code = CHILD.format(module=module, write=write)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    child = subprocess.Popen([sys.executable, "-c", code, str(marker)], cwd=tmp_path, env=env,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert child.poll() is None, child.stderr.read()
        assert time.monotonic() < deadline, "the child never reached the write"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    return marker.read_text()


def test_killed_distilled_set_writer_keeps_the_previous_set(tmp_path):
    old = DistilledSet(images=torch.randn(20, 1, 8, 8), labels=torch.arange(10).repeat(2), spec=SPEC, ipc=2,
                       method="random")
    path = save_distilled(old, tmp_path / "set")
    files = sorted(p.name for p in path.iterdir())
    write = ("from ddkit.formats.distilled import DistilledSet, save_distilled; "
             "from ddkit.datamodules.spec import DataSpec; "
             "spec = DataSpec('digits', 10, 1, 8, (0.5,), (0.25,)); "
             "save_distilled(DistilledSet(images=torch.zeros(30, 1, 8, 8), labels=torch.arange(10).repeat(3), "
             "spec=spec, ipc=3, method='new'), 'set')")
    partial = _kill_mid_write(tmp_path, "ddkit.formats.distilled", write)
    assert Path(partial).name == "images.safetensors" and Path(partial).parent.name.startswith(".set.tmp-")
    assert sorted(p.name for p in path.iterdir()) == files  # the final name holds the old set, unchanged
    ds = load_distilled(path)  # checksums verified, tensors validated
    assert ds.method == "random" and torch.equal(ds.images, old.images)
    visible = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert visible == ["inside_write", "set"]  # leftovers are only hidden .set.tmp-* siblings no loader reads


def test_killed_expert_writer_keeps_the_previous_expert(tmp_path):
    net = torch.nn.Linear(3, 2)
    buffer = tmp_path / "buffer"
    write_buffer_meta(buffer, BufferMeta.for_net("mlp", {}, SPEC, net, 2, {"optimizer": "sgd"}))
    old = torch.randn(3, 8)
    save_expert(buffer, 0, old)
    write = ("from ddkit.formats.buffer import save_expert; "
             "save_expert('buffer', 0, torch.zeros(3, 8)); save_expert('buffer', 1, torch.zeros(3, 8))")
    partial = _kill_mid_write(tmp_path, "ddkit.formats.buffer", write)
    assert Path(partial).name.startswith(f".{expert_file(0)}.tmp-")
    opened = ExpertBuffer(buffer)
    assert opened.num_experts == 1 and torch.equal(opened.trajectory(0), old)
    assert sorted(p.name for p in buffer.iterdir() if not p.name.startswith(".")) == [expert_file(0), "meta.json"]
