"""ddkit chain: one method's whole chain in one command, cached stages skipped on a second call."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from ddkit.cli import main


def chain(capsys, *extra: str) -> tuple[list[str], float]:
    start = time.perf_counter()
    main(["chain", "sre2l", "--data", "digits", "--budget", "smoke", "--seeds", "1", *extra])
    return capsys.readouterr().out.splitlines(), time.perf_counter() - start


def test_the_digits_sre2l_chain_runs_end_to_end_then_is_cached(in_tmp, capsys):
    out, _ = chain(capsys)
    names = ["sre2l_teacher", "sre2l_recover_ipc10", "sre2l_relabel_ipc10", "eval_sre2l_ipc10_kd"]
    assert [ln for ln in out if ln.endswith(": running")] == [f"[{i}/4] {n}: running" for i, n in enumerate(names, 1)]
    root = Path("runs/chains/digits")
    the_set = root / "sre2l/recover_ipc10"
    assert (the_set / "meta.json").is_file() and (the_set / "grid.png").is_file()
    report = json.loads((root / "eval/sre2l_ipc10_kd/report.json").read_text())
    assert report["results"][0]["name"] == "sre2l" and len(report["results"][0]["accuracies"]) == 1
    assert out[-3].startswith(f"set:    {the_set}") and out[-2].startswith(f"report: {root}/eval/sre2l_ipc10_kd")
    assert out[-1] == "logs:   tensorboard --logdir runs"
    # every TensorBoard run under the one log dir, the evaluation's included
    assert list(Path("runs/evaluate/sre2l_ipc10_kd").rglob("events.out.tfevents*"))
    assert list(Path("runs/digits_sre2l_squeeze").rglob("events.out.tfevents*"))

    out, seconds = chain(capsys)
    assert "total wall time" in out[-5] and out[-5].endswith("0 ran, 4 cached, 0 failed, 0 blocked")
    assert seconds < 10


def test_an_unknown_method_is_one_line_and_exit_2(in_tmp, capsys):
    with pytest.raises(SystemExit) as e:
        main(["chain", "dc", "--data", "digits"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == "error: method: must be one of sre2l, scdd, mtt, datm, random, got 'dc'"
    assert not Path("runs").exists()
