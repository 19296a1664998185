"""The stage cache of ddkit.pipelines (trivial stages, no training) and the results writers on a fake document."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest

from ddkit.errors import DDKitError
from ddkit.pipelines import (
    PROTOCOLS,
    Plan,
    Stage,
    StageFailed,
    build_plan,
    collect,
    config_hash,
    hash_path,
    replace_section,
    results_table,
    run_stages,
)

REPO = Path(__file__).resolve().parents[1]


class CopyRunner:
    """A trivial 'ddkit': ``fit -c cfg`` writes the config's first line (plus the upstream file, if any) to the
    stage's output. Records which configs it ran."""

    def __init__(self, stages: dict[str, Stage]) -> None:
        self.by_config = {s.config_files()[0]: s for s in stages.values()}
        self.ran: list[str] = []
        self.fail: set[str] = set()

    def __call__(self, argv: list[str]) -> None:
        stage = self.by_config[argv[2]]
        self.ran.append(stage.name)
        if stage.name in self.fail:
            raise StageFailed("exit code 2")
        text = Path(argv[2]).read_text().splitlines()[0]
        for i in stage.inputs:
            text += "|" + Path(i).read_text()
        Path(stage.outputs[0]).write_text(text)


@pytest.fixture
def chain(tmp_path):
    """Two stages: ``a`` (config a.yaml) -> a.txt -> ``b`` (config b.yaml) -> b.txt."""
    root = tmp_path / "out"
    root.mkdir()
    (tmp_path / "a.yaml").write_text("alpha\n")
    (tmp_path / "b.yaml").write_text("beta\n")
    a = Stage("a", ("fit", "-c", str(tmp_path / "a.yaml")), (str(root / "a.txt"),))
    b = Stage("b", ("fit", "-c", str(tmp_path / "b.yaml")), (str(root / "b.txt"),), inputs=(str(root / "a.txt"),))
    stages = {"a": a, "b": b}
    return tmp_path, root, stages, CopyRunner(stages)


def statuses(results):
    return {r.name: r.status for r in results}


def test_second_run_is_cached_and_outputs_are_kept(chain):
    _, root, stages, runner = chain
    first = run_stages(stages.values(), root, runner, log=lambda s: None)
    assert statuses(first) == {"a": "ran", "b": "ran"}
    assert (root / "b.txt").read_text() == "beta|alpha"
    assert (root / "a.txt.stamp.json").is_file()
    second = run_stages(stages.values(), root, runner, log=lambda s: None)
    assert statuses(second) == {"a": "cached", "b": "cached"}
    assert runner.ran == ["a", "b"]
    assert second[0].made_in_s == pytest.approx(first[0].seconds, abs=0.01)


def test_editing_a_config_reruns_that_stage_and_what_reads_its_changed_output(chain):
    tmp, root, stages, runner = chain
    run_stages(stages.values(), root, runner, log=lambda s: None)
    (tmp / "b.yaml").write_text("beta2\n")
    assert statuses(run_stages(stages.values(), root, runner, log=lambda s: None)) == {"a": "cached", "b": "ran"}
    (tmp / "a.yaml").write_text("alpha2\n")
    assert statuses(run_stages(stages.values(), root, runner, log=lambda s: None)) == {"a": "ran", "b": "ran"}
    assert (root / "b.txt").read_text() == "beta2|alpha2"
    # A comment is not content: nothing reruns.
    (tmp / "a.yaml").write_text("# a comment\nalpha2  # another\n")
    assert statuses(run_stages(stages.values(), root, runner, log=lambda s: None)) == {"a": "cached", "b": "cached"}
    # A content edit that leaves a's output byte-identical reruns a only: b's input hash is unchanged.
    (tmp / "a.yaml").write_text("alpha2\n  continued\n")  # the scalar "alpha2 continued"; first line unchanged
    assert statuses(run_stages(stages.values(), root, runner, log=lambda s: None)) == {"a": "ran", "b": "cached"}


def test_config_hash_is_of_content_and_falls_back_to_bytes(tmp_path):
    a, b, bad = tmp_path / "a.yaml", tmp_path / "b.yaml", tmp_path / "bad.yaml"
    a.write_text("model:\n  lr: 0.1  # why\n  ipc: 10\n")
    b.write_text("# reordered\nmodel: {ipc: 10, lr: 0.1}\n")
    assert config_hash(a) == config_hash(b)
    b.write_text("model: {ipc: 10, lr: 0.2}\n")
    assert config_hash(a) != config_hash(b)
    bad.write_text("model: [unclosed\n")
    assert config_hash(bad) == hashlib.sha256(bad.read_bytes()).hexdigest()


def test_a_changed_input_or_command_line_reruns_and_force_reruns(chain):
    _, root, stages, runner = chain
    run_stages(stages.values(), root, runner, log=lambda s: None)
    (root / "a.txt").write_text("edited by hand")  # a's stamp still matches a; b's input hash does not
    assert statuses(run_stages(stages.values(), root, runner, log=lambda s: None)) == {"a": "cached", "b": "ran"}
    b2 = Stage("b", (*stages["b"].argv, "--extra", "1"), stages["b"].outputs, stages["b"].inputs)
    assert statuses(run_stages([stages["a"], b2], root, runner, log=lambda s: None))["b"] == "ran"
    forced = run_stages([stages["a"], b2], root, runner, force=["a*"], log=lambda s: None)
    assert statuses(forced) == {"a": "ran", "b": "ran"}  # a remade a.txt with other bytes, so b reran too


def test_a_failed_stage_blocks_its_consumers_and_leaves_no_stamp(chain):
    _, root, stages, runner = chain
    runner.fail = {"a"}
    lines: list[str] = []
    results = run_stages(stages.values(), root, runner, log=lines.append)
    assert statuses(results) == {"a": "failed", "b": "blocked"}
    assert not (root / "a.txt.stamp.json").exists()
    assert any("FAILED" in line for line in lines) and lines[-1].startswith("total wall time")
    runner.fail = set()
    assert statuses(run_stages(stages.values(), root, runner, log=lambda s: None)) == {"a": "ran", "b": "ran"}


def test_missing_config_fails_the_stage_with_its_name(chain):
    tmp, root, stages, runner = chain
    (tmp / "a.yaml").unlink()
    results = run_stages(stages.values(), root, runner, log=lambda s: None)
    assert results[0].status == "failed" and "a.config: file not found" in results[0].error
    assert runner.ran == []


def test_outputs_outside_the_root_and_duplicate_names_are_refused(tmp_path):
    bad = Stage("x", ("fit",), (str(tmp_path / "elsewhere.txt"),))
    with pytest.raises(DDKitError, match="x.outputs: must lie inside"):
        run_stages([bad], tmp_path / "root", lambda argv: None, log=lambda s: None)
    ok = Stage("x", ("fit",), (str(tmp_path / "o.txt"),))
    with pytest.raises(DDKitError, match="stages: duplicate stage names"):
        run_stages([ok, ok], tmp_path, lambda argv: None, log=lambda s: None)


def test_directory_hash_ignores_stamps_and_hidden_work_files(tmp_path):
    d = tmp_path / "set"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "x.bin").write_bytes(b"123")
    h = hash_path(d)
    (d / "sub" / "x.bin.stamp.json").write_text("{}")
    (d / ".work").mkdir()
    (d / ".work" / "shard").write_text("tmp")
    assert hash_path(d) == h
    (d / "sub" / "x.bin").write_bytes(b"124")
    assert hash_path(d) != h
    with pytest.raises(DDKitError, match="inputs: artifact not found"):
        hash_path(tmp_path / "nope")


def test_fmnist_plan_is_ordered_and_every_input_has_a_producer(tmp_path):
    plan = Plan(dataset="fashion_mnist", root=str(tmp_path), ipcs=(1, 10, 50), kd_options={"temperature": 30.0})
    built = build_plan(plan)
    produced: list[str] = []
    for s in built.stages:
        for i in s.inputs:
            assert any(i == o or i.startswith(o + "/") for o in produced), (s.name, i)
        produced += s.outputs
    assert len(built.cells) == 5 * 3 * 3
    kd = built.cells[("datm", 10, "kd")]
    assert "--data.zca" in kd.argv and built.teachers["datm"] in kd.inputs
    assert built.cells[("random", 1, "hard")].argv[:5] == ("evaluate", "--data.dataset", "fashion_mnist",
                                                           "--baselines", "[random]")
    with pytest.raises(DDKitError, match="methods: unknown method"):
        build_plan(Plan(dataset="digits", root=str(tmp_path), methods=("dc",)))


def fake_doc() -> dict:
    """A results document as :func:`ddkit.pipelines.collect` makes it, for a 2-method, 2-IPC grid."""
    cells = []
    for m in ("random", "datm"):
        for k in (1, 10):
            for p in PROTOCOLS:
                cells.append({"method": m, "ipc": k, "protocol": p, "status": "not run"})
    cells[0].update(status="done", mean=0.5, std=0.01, accuracies=[0.49, 0.5, 0.51], seeds=3, eval_wall_time_s=3.0)
    cells[-2].update(status="done", mean=0.8512, std=0.004, accuracies=[0.85, 0.85, 0.855], seeds=3,
                     eval_wall_time_s=9.0)  # datm, IPC 10, soft
    return {"dataset": "fashion_mnist", "ipcs": [1, 10], "methods": ["random", "datm"], "protocols": list(PROTOCOLS),
            "own_protocol": {"random": "hard", "datm": "soft"}, "seeds": 3,
            "eval_net": {"net": "convnet", "net_kwargs": {"width": 32}}, "eval_epochs": 300,
            "kd_options": {"temperature": 30.0}, "full_data": {"status": "not run", "command": "ddkit fit ..."},
            "teachers": {}, "cells": cells,
            "method_records": {"random": {"distill_wall_time_s": {"1": 0.0, "10": 0.0}, "shared_stages": {},
                                          "relabel": {}},
                               "datm": {"distill_wall_time_s": {"1": None, "10": 1234.0},
                                        "distill_cpu_s": {"1": None, "10": 2000.4},
                                        "shared_stages": {"datm_buffer": {"wall_time_s": 2700.0, "command": "x"}},
                                        "relabel": {}}},
            "session": [], "stages_wall_time_s": 3946.0}


def test_results_table_marks_unmeasured_cells_and_bolds_the_own_protocol():
    table = results_table(fake_doc(), anchors={"DSA (paper)": {1: 70.6, 10: 84.6}})
    rows = table.strip().splitlines()
    assert rows[0].startswith("| method | IPC 1 hard | IPC 1 soft | IPC 1 kd | IPC 10 hard")
    assert rows[2] == ("| random real subset | **50.0 ± 1.0** | not run | not run | not run | not run | not run "
                       "| 0 / 0 |")
    assert "**85.1 ± 0.4**" in rows[3] and rows[3].endswith("| — / 1234 (2000) |")
    assert rows[4] == "| DSA (paper) | 70.6 | — | — | 84.6 | — | — | — |"


def test_replace_section_keeps_the_markers_and_the_rest():
    text = "a\n<!-- t:begin -->\nold\n<!-- t:end -->\nz\n"
    assert replace_section(text, "t", "new") == "a\n<!-- t:begin -->\nnew\n<!-- t:end -->\nz\n"
    with pytest.raises(DDKitError, match="markers"):
        replace_section("no markers", "t", "x")


def test_collect_reports_not_run_for_an_empty_cache(tmp_path):
    plan = Plan(dataset="digits", root=str(tmp_path), methods=("random", "mtt"), protocols=("hard",))
    doc = collect(build_plan(plan), plan)
    assert {c["status"] for c in doc["cells"]} == {"not run"}
    assert doc["full_data"]["status"] == "not run"
    assert doc["method_records"]["mtt"]["distill_wall_time_s"] == {"10": None}
    json.dumps(doc)  # plain types only


def test_benchmark_writers_on_a_fake_document(tmp_path):
    spec = importlib.util.spec_from_file_location("quality_fmnist", REPO / "benchmarks" / "quality_fmnist.py")
    q = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(q)
    doc = fake_doc()
    doc.update(setting="fmnist-cpu", command="python benchmarks/quality_fmnist.py --ipc 1 10",
               session_wall_time_s=12.0)
    doc["goals"] = q.goals(doc)
    assert doc["goals"][0]["status"] == "met" and doc["goals"][0]["value"] == 85.12
    assert doc["goals"][1]["status"] == "not run"
    readme = tmp_path / "README.md"
    readme.write_text("# x\n## Results\n<!-- headline:begin -->\n<!-- headline:end -->\n## Next\n")
    results = tmp_path / "results"
    q.write_outputs(doc, results=results, benchmarks_md=tmp_path / "BENCHMARKS.md", readme=readme)
    assert json.loads((results / "quality_fmnist.json").read_text())["cells"][0]["mean"] == 0.5
    assert (results / "quality_fmnist.png").read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "BENCHMARKS.md").read_text()
    assert "| random real subset | **50.0 ± 1.0** |" in md and "DATM at IPC 10 (soft, its protocol)" in md
    assert "No committed results yet (`benchmarks/results/recover_speed.json`)" in md
    text = readme.read_text()
    assert "| DATM (ddkit) | `soft` | not run | **85.1 ± 0.4** |" not in text  # headline cells are not bold
    assert "| DATM (ddkit) | `soft` | not run | 85.1 ± 0.4 |" in text and text.endswith("## Next\n")


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_matching_benchmark_tests_a_snapshot_exactly_as_the_best_set(tmp_path):
    d = load_benchmark("datm_fmnist")
    cell = Stage("eval_datm_ipc10_soft", ("evaluate", "--distilled", '["r/datm/distill_ipc10/best"]', "--protocols",
                                          "[soft]", "--seeds", "3", "--output", "r/eval/datm_ipc10_soft"),
                 ("r/eval/datm_ipc10_soft",), ("r/datm/distill_ipc10/best",), (), "evaluate", "datm", 10)
    s = d.snapshot_stage(cell, Path("r/datm/distill_ipc10/snapshots/iter_000200"))
    assert s.name == "eval_datm_ipc10_soft_iter_000200" and s.outputs == ("r/eval/datm_ipc10_soft_snapshots/iter_000200",)
    assert s.argv == ("evaluate", "--distilled", '["r/datm/distill_ipc10/snapshots/iter_000200"]', "--protocols",
                      "[soft]", "--seeds", "3", "--output", "r/eval/datm_ipc10_soft_snapshots/iter_000200")
    assert s.inputs == ("r/datm/distill_ipc10/snapshots/iter_000200",) and s.method == "datm" and s.ipc == 10


def test_recover_speed_summary_is_the_median_of_per_repeat_ratios():
    r = load_benchmark("recover_speed")
    runs = {"ddkit": [{"cpu": 0.011, "wall": 0.03}, {"cpu": 0.024, "wall": 0.02}, {"cpu": 0.013, "wall": 0.02}],
            "plain": [{"cpu": 0.010, "wall": 0.02}, {"cpu": 0.020, "wall": 0.02}, {"cpu": 0.010, "wall": 0.01}],
            "ddkit_quiet": [{"cpu": 0.010, "wall": 0.02}, {"cpu": 0.020, "wall": 0.02}, {"cpu": 0.010, "wall": 0.01}]}
    s = r.summarise(runs)
    assert s["ratios"] == [1.1, 1.2, 1.3] and s["median_ratio"] == 1.2  # not 0.048 / 0.040 of the sums
    assert s["median_quiet_ratio"] == 1.0 and s["median_wall_ratio"] == 1.5
    assert s["median_ddkit_ms"] == 13.0 and s["median_plain_ms"] == 10.0
    assert s["plain_cpu_ms_per_step"] == [10.0, 20.0, 10.0]


def test_a_signal_during_a_stage_stops_the_session_without_a_stamp(chain):
    """Lightning swallows a KeyboardInterrupt inside fit and returns normally; the driver must still notice."""
    import os
    import signal

    _, root, stages, runner = chain

    def swallowing_runner(argv):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        except KeyboardInterrupt:
            pass  # as Lightning's graceful shutdown: the command returns with its outputs half made
        Path(stages["a"].outputs[0]).write_text("partial")

    with pytest.raises(KeyboardInterrupt):
        run_stages(stages.values(), root, swallowing_runner, log=lambda s: None)
    assert (root / "a.txt").read_text() == "partial" and not (root / "a.txt.stamp.json").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are restored
    assert statuses(run_stages(stages.values(), root, runner, log=lambda s: None)) == {"a": "ran", "b": "ran"}


def test_the_demo_plan_logs_every_run_under_its_one_log_dir():
    from ddkit.demo import demo_plan

    built = build_plan(demo_plan(root="d"))
    for s in built.stages:
        argv = list(s.argv)
        if s.kind == "evaluate":
            assert argv[argv.index("--log_dir") + 1] == f"d/runs/evaluate/{s.name.removeprefix('eval_')}"
        else:
            assert argv[argv.index("--trainer.logger.init_args.save_dir") + 1] == "d/runs"
    # without a log_dir (the benchmark's plans) the evaluation command lines, and so their cache, are unchanged
    plain = build_plan(Plan(dataset="digits", root="r"))
    assert not [s for s in plain.stages if "--log_dir" in s.argv]
