import json

import pytest
import torch

from ddkit.datamodules.real import RealDataModule
from ddkit.errors import DDKitError
from ddkit.evaluation import get_protocol
from ddkit.evaluation.evaluator import run_evaluation
from ddkit.formats.distilled import DistilledSet, save_distilled


def test_protocols_are_named_frozen_records():
    hard = get_protocol("hard")
    assert hard.describe() == {"name": "hard", "epochs": 300, "batch_size": 256, "lr": 0.01, "momentum": 0.9,
                               "weight_decay": 5e-4, "augment": "dsa"}
    soft = get_protocol("soft", epochs=5)
    assert soft.epochs == 5 and soft.batch_size == 128
    with pytest.raises(DDKitError, match="protocol: unknown name"):
        get_protocol("magic")
    with pytest.raises(DDKitError, match="hard.epochs: must be > 0, got 0"):
        get_protocol("hard", epochs=0)


def test_soft_protocol_uses_the_learned_step_size_and_soft_targets():
    spec = RealDataModule("digits").spec
    ds = DistilledSet(torch.zeros(10, 1, 8, 8), torch.arange(10), spec, 1, "t",
                      label_logits=torch.eye(10) * 2, step_size=0.003)
    soft = get_protocol("soft")
    assert soft.learning_rate(ds) == 0.003
    assert torch.allclose(soft.targets(ds).sum(1), torch.ones(10))
    assert soft.make_module(spec, "convnet", {"width": 8}, ds).hparams.lr == 0.003


def handpicked_set(path, ipc: int) -> None:
    """The first ``ipc`` digits training images of each class, saved as a DistilledSet at ``path``."""
    data = RealDataModule("digits")
    data.setup("fit")
    x, y = data.train_set.tensors
    idx = torch.cat([torch.nonzero(y == c).flatten()[:ipc] for c in range(10)])
    save_distilled(DistilledSet(x[idx], y[idx], data.spec, ipc, "handpicked"), path)


def test_random_baseline_and_a_distilled_set_under_two_protocols(tmp_path):
    handpicked_set(tmp_path / "set", 5)
    report = run_evaluation(data=RealDataModule("digits"), distilled=[str(tmp_path / "set")], baselines=["random"],
                            protocols=["hard", "soft"], seeds=2, epochs=150, net_kwargs={"width": 16},
                            output=str(tmp_path / "out"), accelerator="cpu", progress=False)
    names = [(r["name"], r["protocol"]["name"]) for r in report["results"]]
    # a set is named by its method, not by its directory
    assert names == [("handpicked", "hard"), ("random", "hard"), ("handpicked", "soft"), ("random", "soft")]
    for r in report["results"]:
        assert len(r["accuracies"]) == 2 and r["mean"] > 0.5  # 50 images, 150 steps: well above chance (0.1)
        assert r["ipc"] == 5
    on_disk = json.loads((tmp_path / "out/report.json").read_text())
    assert on_disk["results"][0]["accuracies"] == report["results"][0]["accuracies"]
    md = (tmp_path / "out/report.md").read_text()
    assert "| handpicked | 5 |" in md and "| random | 5 |" in md and "name=hard" in md
    assert any((tmp_path / "out/tb").rglob("events.out.tfevents.*"))


def test_bad_requests(tmp_path):
    data = RealDataModule("digits")
    with pytest.raises(DDKitError, match="ipc: the random baseline needs ipc"):
        run_evaluation(data=data, baselines=["random"], output=str(tmp_path))
    with pytest.raises(DDKitError, match="seeds: must be > 0, got 0"):
        run_evaluation(data=data, baselines=["random"], ipc=1, seeds=0, output=str(tmp_path))
    with pytest.raises(DDKitError, match="baselines: must be random or full, got 'herding'"):
        run_evaluation(data=data, baselines=["herding"], ipc=1, output=str(tmp_path))


def test_sets_are_named_by_method_and_by_directory_only_where_ambiguous():
    from ddkit.evaluation.evaluator import set_names

    spec = RealDataModule("digits").spec
    sets = [DistilledSet(torch.zeros(10, 1, 8, 8), torch.arange(10), spec, 1, m) for m in ("sre2l", "mtt", "mtt",
                                                                                            "random")]
    paths = ["a/recover_ipc10", "m1/best", "m2/best", "r/subset"]
    assert set_names(sets, paths, ["random"]) == ["sre2l", "mtt_best_1", "mtt_best_2", "random_subset"]
    assert set_names(sets[:2], paths[:2], []) == ["sre2l", "mtt"]


def _result(name, kind, protocol, mean, augmented=True):
    return {"name": name, "kind": kind, "ipc": 5, "protocol": {"name": protocol}, "accuracies": [mean], "mean": mean,
            "std": 0.0, "wall_time_s": 1.0, "augmented": augmented}


def test_dd_ranking_scores_by_hand():
    """full 0.9; set: hard 0.6 (0.55 without aug.); random: hard 0.5 (0.4 without aug.):
    HLR 0.3, IOR 0.1, LRS = (e^-0.1 - e^-1) / (e - e^-1) = 22.85, ARS = (e^0.125 - e^-1) / (e - e^-1) = 32.56."""
    from ddkit.evaluation.report import markdown, robust_scores

    report = {"dataset": {"dataset": "digits"}, "net": "convnet", "net_kwargs": {}, "seeds": 1,
              "protocols": [{"name": "hard"}, {"name": "kd"}],
              "results": [_result("set", "distilled", "hard", 0.6), _result("random", "random", "hard", 0.5),
                          _result("set", "distilled", "kd", 0.7), _result("random", "random", "kd", 0.68),
                          _result("set", "distilled", "hard", 0.55, False),
                          _result("random", "random", "hard", 0.4, False)],
              "full_data": {"mean": 0.9, "protocol": {"name": "given"}}}
    hard, kd = robust_scores(report)
    assert hard["hlr"] == pytest.approx(0.3) and hard["ior"] == pytest.approx(0.1)
    assert hard["lrs"] == pytest.approx(22.845, abs=1e-3) and hard["ars"] == pytest.approx(32.559, abs=1e-3)
    assert kd["hlr"] == pytest.approx(0.3) and kd["ior"] == pytest.approx(0.02)
    e = 2.718281828459045
    assert kd["lrs"] == pytest.approx(100 * (e ** (0.5 * 0.02 - 0.5 * 0.3) - 1 / e) / (e - 1 / e))
    assert kd["ars"] is None and kd["missing"] == ["set under kd without augmentation",
                                                     "random under kd without augmentation"]
    report["robust_scores"] = [hard, kd]
    md = markdown(report)
    assert "| set | hard | 0.3000 | 0.1000 | 22.85 | 32.56 |" in md and "| set | kd | 0.3000 | 0.0200 |" in md
    assert "hard (no aug.)" in md
    del report["full_data"]
    assert [s["lrs"] for s in robust_scores(report)] == [None, None]


def test_no_augmentation_runs_feed_the_augmentation_robust_score(tmp_path):
    handpicked_set(tmp_path / "set", 2)
    report = run_evaluation(data=RealDataModule("digits"), distilled=[str(tmp_path / "set")], baselines=["random"],
                            protocols=["hard"], seeds=1, epochs=5, net_kwargs={"width": 8}, full_data_accuracy=0.95,
                            no_augmentation=True, output=str(tmp_path / "out"), accelerator="cpu", progress=False)
    runs = [(r["name"], r["protocol"]["augment"], r["augmented"]) for r in report["results"]]
    assert runs == [("handpicked", "dsa", True), ("random", "dsa", True), ("handpicked", "none", False),
                    ("random", "none", False)]
    (score,) = report["robust_scores"]
    syn, rdm, syn_n, rdm_n = (r["mean"] for r in report["results"])
    assert score["hlr"] == pytest.approx(0.95 - syn) and score["ior"] == pytest.approx(syn - rdm)
    b = 0.5 * (syn - rdm) + 0.5 * (syn_n - rdm_n)
    assert score["ars"] == pytest.approx(100 * (torch.tensor(b).exp().item() - 0.36787944) / (2.71828183 - 0.36787944),
                                         rel=1e-5)
    assert json.loads((tmp_path / "out/report.json").read_text())["robust_scores"][0]["ars"] == score["ars"]
