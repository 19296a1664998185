"""Every shipped config parses: the stage configs through ``ddkit fit --print_config`` (class paths resolved, every
option known), the ``ddkit evaluate`` configs through its parser. The relabel configs are parsed in
tests/modules/test_kd.py (test_relabel_configs_parse)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ALL = sorted((REPO / "configs").rglob("*.yaml"))
EVALUATE = [p for p in ALL if p.name.startswith("evaluate")]
STAGES = [p for p in ALL if p not in EVALUATE and not p.name.startswith("relabel_")]


def _id(p: Path) -> str:
    return str(p.relative_to(REPO / "configs"))


def test_the_configs_the_papers_need_exist():
    names = {_id(p) for p in ALL}
    for dataset in ("cifar10", "cifar100"):
        for method in ("sre2l", "scdd"):
            assert {f"{dataset}/{method}/recover_ipc50.yaml", f"{dataset}/{method}/relabel_ipc50.yaml"} <= names
    for dataset in ("cifar10", "tiny_imagenet", "imagenet"):
        assert f"{dataset}/sre2l/squeeze.yaml" in names
        assert {f"{dataset}/scdd/pretrain_mocov2.yaml", f"{dataset}/scdd/probe.yaml"} <= names


@pytest.mark.parametrize("config", STAGES, ids=_id)
def test_stage_config_parses_and_names_its_source(config, capsys):
    from ddkit.cli import main

    header = [ln for ln in config.read_text().splitlines() if ln.startswith("#")]
    assert header, "every config starts with a comment saying what it is and where its values come from"
    with pytest.raises(SystemExit) as e:
        main(["fit", "-c", str(config), "--print_config"])
    assert e.value.code in (0, None)
    printed = capsys.readouterr().out
    model = re.search(r"^model:\n  class_path: (ddkit\.modules\.\S+)", printed, re.MULTILINE)
    data = re.search(r"^data:\n  class_path: (ddkit\.datamodules\.\S+)", printed, re.MULTILINE)
    assert model and data, printed[:2000]
    dataset = config.relative_to(REPO / "configs").parts[0]
    assert re.search(rf"\b{dataset}\b", printed), "the config's dataset (or its buffer/output paths) is its folder's"


@pytest.mark.parametrize("config", EVALUATE, ids=_id)
def test_evaluate_config_parses(config):
    from ddkit.evaluation.cli import build_parser

    cfg = build_parser().parse_args(["-c", str(config)])
    assert cfg.data.dataset == config.relative_to(REPO / "configs").parts[0]
