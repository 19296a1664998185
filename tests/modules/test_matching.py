"""TrajectoryMatching (MTT / DATM distillation stage) on a tiny digits ExpertBuffer built in the test.

Checks: DATM label initialisation against a stub expert, the start-epoch window, the threshold skip, a short fit
writing a DistilledSet, the matching loss falling, resume == uninterrupted, the step-size and non-finite guards,
bad inputs, bf16-mixed, and a 2-process DDP step equal to the 1-process step over both ranks' segments.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint

from ddkit.datamodules.experts import ExpertSegments, StepTokens
from ddkit.datamodules.real import RealDataModule
from ddkit.errors import DDKitError
from ddkit.formats.buffer import BufferMeta, ExpertBuffer, expert_file, save_expert, write_buffer_meta
from ddkit.formats.distilled import load_distilled
from ddkit.modules.matching import (
    TrajectoryMatching,
    mean_correct_logits,
    segment_generator,
    select_correct_samples,
)
from ddkit.nets import build_net
from ddkit.ops.matching_grad import MatchingResult, flatten_params, start_epoch_upper_bound

REPO = Path(__file__).resolve().parents[2]
NET_KWARGS = {"depth": 2, "width": 8, "norm": "instance"}


def make_buffer(out: Path, experts: int = 3, epochs: int = 5, zca: bool = False, lr: float = 0.1) -> ExpertBuffer:
    """A few plain-SGD experts of a width-8 ConvNet-D2 on digits (8 px), written with the buffer API."""
    torch.set_num_threads(1)
    data = RealDataModule("digits", zca=zca)
    data.setup("fit")
    x, y = data.train_set.tensors
    for k in range(experts):
        torch.manual_seed(100 + k)
        net = build_net("convnet", 10, 1, 8, **NET_KWARGS)
        if k == 0:
            meta = BufferMeta.for_net("convnet", NET_KWARGS, data.spec, net, epochs, {"optimizer": "sgd", "lr": lr},
                                      zca=zca)
            write_buffer_meta(out, meta, data.zca.state_dict() if zca else None)
        opt = torch.optim.SGD(net.parameters(), lr=lr)
        rows = [flatten_params(net)]
        g = torch.Generator().manual_seed(k)
        for _ in range(epochs):
            for idx in torch.randperm(len(y), generator=g).split(128):
                opt.zero_grad()
                F.cross_entropy(net(x[idx]), y[idx]).backward()
                opt.step()
            rows.append(flatten_params(net))
        save_expert(out, k, torch.stack(rows))
    return ExpertBuffer(out)


@pytest.fixture(scope="session")
def buffer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("buffers") / "digits"
    make_buffer(path)
    return path


@pytest.fixture(scope="session")
def zca_buffer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("buffers") / "digits_zca"
    make_buffer(path, experts=2, epochs=3, zca=True)
    return path


@pytest.fixture(scope="session")
def one_expert_dir(buffer_dir, tmp_path_factory) -> Path:
    """The first expert alone (a fixed trajectory: the loss test has no sampling noise from the expert)."""
    path = tmp_path_factory.mktemp("buffers") / "one"
    path.mkdir()
    shutil.copy(buffer_dir / "meta.json", path / "meta.json")
    shutil.copy(buffer_dir / expert_file(0), path / expert_file(0))
    return path


SMALL = {"ipc": 2, "syn_steps": 4, "expert_epochs": 1, "max_start_epoch": 3, "current_max_start_epoch": 2,
         "expansion_end_epoch": 10, "lr_img": 10.0, "lr_lr": 1e-4, "lr_y": 2.0}


def make_module(data: ExpertSegments, tmp: Path, **kwargs) -> TrajectoryMatching:
    return TrajectoryMatching(data.spec, **{**SMALL, "output": str(tmp / "out"), "seed": 0, **kwargs})


def trainer(steps: int, **kwargs) -> L.Trainer:
    defaults = {"max_steps": steps, "accelerator": "cpu", "devices": 1, "logger": False,
                "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False}
    return L.Trainer(**{**defaults, **kwargs})


def snapshot(m: TrajectoryMatching) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


# ------------------------------------------------------------------------------------------------ label init


def test_mean_correct_logits_hand_example():
    labels = torch.tensor([0, 1])
    z1 = torch.tensor([[3.0, 1.0, 0.0], [2.0, 1.0, 0.0]])  # right on image 0, wrong on 1
    z2 = torch.tensor([[1.0, 2.0, 0.0], [0.0, 4.0, 1.0]])  # wrong on 0, right on 1
    z3 = torch.tensor([[5.0, 0.0, 1.0], [1.0, 2.0, 0.0]])  # right on both
    mean, count = mean_correct_logits([z1, z2, z3], labels)
    assert count.tolist() == [2, 2]
    torch.testing.assert_close(mean[0], torch.tensor([4.0, 0.5, 0.5]))  # (z1 + z3) / 2, raw logits
    torch.testing.assert_close(mean[1], torch.tensor([0.5, 3.0, 0.5]))  # (z2 + z3) / 2
    mean, count = mean_correct_logits([z2], labels)
    assert count.tolist() == [0, 1] and mean[0].abs().sum() == 0


def _stub_problem():
    """12 real images (value = index) of 2 classes; expert e's prediction on image j is in a table."""
    images = torch.arange(12.0).view(12, 1, 1, 1).expand(12, 1, 2, 2).clone()
    labels = torch.tensor([0] * 6 + [1] * 6)
    # Expert 0 is right only on images 0, 1 (class 0) and 6 (class 1); expert 1 is right on everything but 2, 9.
    right = {0: {0, 1, 6}, 1: set(range(12)) - {2, 9}}
    table = {}
    for e in (0, 1):
        z = torch.zeros(12, 2)
        for j in range(12):
            c = int(labels[j])
            z[j, c if j in right[e] else 1 - c] = 2.0 + e + 0.1 * j  # distinct values per expert and image
        table[e] = z

    def logits(expert: int, x: torch.Tensor) -> torch.Tensor:
        return table[expert][x[:, 0, 0, 0].long()]

    return images, labels, logits, table, right


def test_select_correct_samples_moves_to_the_next_expert_when_a_class_runs_out():
    images, labels, logits, _, right = _stub_problem()
    idx, selector = select_correct_samples(labels, 2, 3, logits, 2, images, torch.Generator().manual_seed(0),
                                           batch_size=4)
    g = torch.Generator().manual_seed(0)
    expected, by = [], []
    for c in (0, 1):
        order = torch.nonzero(labels == c).flatten()[torch.randperm(6, generator=g)].tolist()
        kept = [j for j in order if j in right[0]][:3]
        by += [0] * len(kept)
        extra = [j for j in order if j in right[1] and j not in kept][: 3 - len(kept)]
        expected += kept + extra
        by += [1] * len(extra)
    assert idx.tolist() == expected and selector.tolist() == by
    assert all(int(labels[j]) == c for c, j in zip([0, 0, 0, 1, 1, 1], idx.tolist()))
    with pytest.raises(DDKitError, match="ipc: class 0 has only 5"):
        select_correct_samples(labels, 2, 6, logits, 2, images, torch.Generator().manual_seed(0))


def test_datm_initialisation_with_a_stub_expert(buffer_dir, tmp_path):
    """initial_set: correctly classified real images, labels = mean raw logits of the correct experts."""
    images, labels, logits, table, right = _stub_problem()
    data = ExpertSegments(str(buffer_dir))
    m = TrajectoryMatching(data.spec, ipc=3, output=str(tmp_path), seed=0)
    m.buffer = SimpleNamespace(num_experts=2)
    m.labels = torch.tensor([0] * 3 + [1] * 3)
    m.images = torch.nn.Parameter(torch.zeros(6, 1, 2, 2))
    m._expert_logits = lambda device: logits  # the stub expert
    m.spec = SimpleNamespace(num_classes=2)
    x, y = m.initial_set(images, labels)
    chosen = x[:, 0, 0, 0].long().tolist()
    assert [int(labels[j]) for j in chosen] == [0, 0, 0, 1, 1, 1]
    for k, j in enumerate(chosen):
        correct = [table[e][j] for e in (0, 1) if j in right[e]]  # the experts whose argmax is the class
        torch.testing.assert_close(y[k], torch.stack(correct).mean(0))
    # label_experts = 1: images accepted by expert 1 only fall back to expert 1's logits
    m.hparams.label_experts = 1
    x, y = m.initial_set(images, labels)
    for k, j in enumerate(x[:, 0, 0, 0].long().tolist()):
        want = table[0][j] if j in right[0] else table[1][j]
        torch.testing.assert_close(y[k], want)


def test_real_and_noise_initialisation(buffer_dir, tmp_path):
    data = ExpertSegments(str(buffer_dir))
    for pix_init in ("real", "noise"):
        m = make_module(data, tmp_path, pix_init=pix_init)
        m.attach(data)
        assert m.images.shape == (20, 1, 8, 8) and bool(torch.isfinite(m.label_logits).all())
        if pix_init == "noise":
            assert (m.label_logits.softmax(1).argmax(1) == m.labels).all()
    mtt = make_module(data, tmp_path, mode="mtt", pix_init="real")
    mtt.attach(data)
    assert mtt.label_logits is None and mtt.labels.tolist() == [c for c in range(10) for _ in range(2)]


def test_initial_images_come_from_the_training_split_without_validation(buffer_dir, tmp_path):
    data = ExpertSegments(str(buffer_dir), val_split=0.5)
    m = make_module(data, tmp_path)
    m.attach(data)
    x_val = torch.stack([data.val_set[i][0] for i in range(len(data.val_set))])
    x_train, _ = data.train_tensors()
    flat = m.images.detach().flatten(1)
    assert all(bool((x_train.flatten(1) == row).all(1).any()) for row in flat)
    assert not any(bool((x_val.flatten(1) == row).all(1).any()) for row in flat)
    logits = m._expert_logits(torch.device("cpu"))
    preds = torch.stack([logits(0, m.images.detach()[i : i + 1])[0] for i in range(20)]).argmax(1)
    assert (m.label_logits.argmax(1) == m.labels).all()  # correct experts' mean logits keep the class
    assert preds.shape == (20,)


# ------------------------------------------------------------------------------------------------ sampling


def test_start_epochs_stay_in_the_window(buffer_dir, tmp_path):
    data = ExpertSegments(str(buffer_dir))
    m = make_module(data, tmp_path, min_start_epoch=1, current_max_start_epoch=2, max_start_epoch=4,
                    expansion_end_epoch=20, batch_syn=6, syn_steps=7)
    m.attach(data, initialize=False)
    g = segment_generator(0, 0)
    seen = set()
    for it in range(40):
        seg = m.sample_segment(g, it)
        ub = start_epoch_upper_bound(it, 2, 4, 20, True)
        assert seg.upper_bound == ub == min(2 + (2 * it) // 20, 4)
        assert 1 <= seg.start_epoch < ub and 0 <= seg.expert < 3
        seen.add(seg.start_epoch)
        sizes = [len(b) for b in seg.loop.batches]
        assert sizes[:4] == [2, 6, 6, 6]  # randperm(20).split(6), last chunk popped first
        assert sorted(torch.cat(seg.loop.batches[:4]).tolist()) == list(range(20))  # an epoch without replacement
        assert len(seg.loop.aug_seeds) == 7
    assert seen == {1, 2, 3}
    mtt = make_module(data, tmp_path, mode="mtt", max_start_epoch=3)
    mtt.attach(data, initialize=False)
    starts = {mtt.sample_segment(g, it).start_epoch for it in range(60)}
    assert starts == {0, 1, 2}
    fixed = make_module(data, tmp_path, min_start_epoch=2, max_start_epoch=4, sequential_generation=False)
    fixed.attach(data, initialize=False)
    assert {fixed.sample_segment(g, 0).start_epoch for _ in range(40)} == {2, 3}


def test_ranks_draw_different_segments():
    a, b = segment_generator(0, 0), segment_generator(0, 1)
    assert not torch.equal(torch.randperm(50, generator=a), torch.randperm(50, generator=b))


# ------------------------------------------------------------------------------------------------ updates


def test_threshold_skip_leaves_everything_unchanged(buffer_dir, tmp_path):
    data = ExpertSegments(str(buffer_dir))
    m = make_module(data, tmp_path, threshold=1e-6)
    t = trainer(3)
    before = {}

    class Grab(L.Callback):
        def on_train_start(self, trainer, pl_module):
            before.update(snapshot(pl_module))

    t.callbacks.append(Grab())
    t.fit(m, datamodule=data)
    after = snapshot(m)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert m.threshold_skips == 3 and m.iteration == 3 and t.global_step == 3
    assert all(not opt.state for opt in m._optimizers)  # momenta never touched


def test_short_fit_writes_a_valid_distilled_set(zca_buffer_dir, tmp_path):
    data = ExpertSegments(str(zca_buffer_dir))
    m = make_module(data, tmp_path, max_start_epoch=2, current_max_start_epoch=1, save_every=2)
    t = trainer(3)
    t.fit(m, datamodule=data)
    ds = load_distilled(tmp_path / "out" / "last")
    assert ds.method == "datm" and ds.ipc == 2 and ds.images.shape == (20, 1, 8, 8)
    assert ds.label_logits.shape == (20, 10) and ds.step_size > 0 and ds.step_size != 0.01
    assert ds.zca is not None and torch.equal(ds.zca["transform"], ExpertBuffer(zca_buffer_dir).zca["transform"])
    assert ds.spec.zca and ds.extra["iteration"] == 3
    assert ds.config["mode"] == "datm" and ds.config["data_spec"]["dataset"] == "digits"
    torch.testing.assert_close(ds.images, m.images.detach())
    # the datamodule applied the buffer's ZCA rather than a refit
    assert torch.equal(data.zca.transform, ExpertBuffer(zca_buffer_dir).zca["transform"])


def test_mtt_fit_uses_hard_labels(buffer_dir, tmp_path):
    data = ExpertSegments(str(buffer_dir))
    m = make_module(data, tmp_path, mode="mtt", pix_init="real", threshold=1e-9)  # MTT never skips
    trainer(2).fit(m, datamodule=data)
    ds = load_distilled(tmp_path / "out" / "last")
    assert ds.method == "mtt" and ds.label_logits is None and m.threshold_skips == 0
    assert len(m._optimizers) == 2


def test_matching_loss_decreases(one_expert_dir, tmp_path):
    """Fixed segment (one expert, start 0, full batch, no DSA): SGD on the images lowers the loss."""
    data = ExpertSegments(str(one_expert_dir))
    m = make_module(data, tmp_path, mode="mtt", max_start_epoch=1, syn_steps=5, dsa=False, lr_img=100.0,
                    lr_lr=1e-5, pix_init="real")
    m.attach(data)
    m.configure_optimizers()
    g = segment_generator(0, 0)
    losses = []
    for it in range(20):
        result = m.segment_gradients(m.sample_segment(g, it))
        losses.append(float(result.loss))
        m.apply_update(m.combine(result)["grads"], it)
    assert losses[-1] < 0.9 * losses[0], losses
    assert sum(b < a for a, b in itertools.pairwise(losses)) >= 15, losses


def test_resume_equals_an_uninterrupted_run(buffer_dir, tmp_path):
    def run(steps: int, ckpt: str | None, folder: Path) -> TrajectoryMatching:
        L.seed_everything(0, verbose=False)
        data = ExpertSegments(str(buffer_dir))
        m = make_module(data, folder, lr_lr=1e-3)
        callback = ModelCheckpoint(dirpath=folder / "ckpt", every_n_train_steps=3, save_top_k=-1)
        t = trainer(steps, enable_checkpointing=True, callbacks=[callback])
        t.fit(m, datamodule=data, ckpt_path=ckpt)
        return m

    whole = run(6, None, tmp_path / "a")
    ckpt = tmp_path / "a" / "ckpt" / "epoch=0-step=3.ckpt"
    assert ckpt.is_file()
    resumed = run(6, str(ckpt), tmp_path / "b")
    for k, v in snapshot(whole).items():
        assert torch.equal(v, snapshot(resumed)[k]), k
    assert torch.equal(whole.generator.get_state(), resumed.generator.get_state())
    assert resumed.iteration == 6 and resumed.threshold_skips == whole.threshold_skips
    states_a = [o.state_dict() for o in whole._optimizers]
    states_b = [o.state_dict() for o in resumed._optimizers]
    for a, b in zip(states_a, states_b):
        for pa, pb in zip(a["state"].values(), b["state"].values()):
            assert torch.equal(pa["momentum_buffer"], pb["momentum_buffer"])


def _forced_update(m: TrajectoryMatching, step_size_grad: float) -> list[torch.Tensor]:
    return [torch.ones_like(m.images), torch.tensor(step_size_grad), torch.ones_like(m.label_logits)]


def test_bad_step_size_skip_undoes_the_update(buffer_dir, tmp_path):
    data = ExpertSegments(str(buffer_dir))
    m = make_module(data, tmp_path, lr_lr=1.0, on_bad_step_size="skip")
    m.attach(data)
    m.configure_optimizers()
    m.apply_update(_forced_update(m, -0.5), 0)  # a good update first: alpha 0.01 -> 0.51, momenta exist
    state, momenta = snapshot(m), [dict(o.state) for o in m._optimizers]
    bufs = [next(iter(s.values()))["momentum_buffer"].clone() for s in momenta]
    m.apply_update(_forced_update(m, 10.0), 1)  # alpha would become negative
    assert m.bad_step_sizes == 1
    assert all(torch.equal(v, snapshot(m)[k]) for k, v in state.items())
    after = [next(iter(o.state.values()))["momentum_buffer"] for o in m._optimizers]
    assert all(torch.equal(a, b) for a, b in zip(bufs, after))


def test_bad_step_size_stop_saves_the_last_good_set(buffer_dir, tmp_path):
    data = ExpertSegments(str(buffer_dir))
    m = make_module(data, tmp_path, lr_lr=1.0)
    m.attach(data)
    m.configure_optimizers()
    images = m.images.detach().clone()
    with pytest.raises(DDKitError, match=r"step_size: the update at iteration 7 made it -"):
        m.apply_update(_forced_update(m, 1.0), 7)
    ds = load_distilled(tmp_path / "out" / "last")
    assert ds.step_size == pytest.approx(0.01) and torch.equal(ds.images, images)
    with pytest.raises(DDKitError, match="step_size"):
        m.apply_update(_forced_update(m, float("nan")), 8)


def test_nonfinite_losses_are_skipped_then_stop(buffer_dir, tmp_path):
    data = ExpertSegments(str(buffer_dir))

    class Broken(TrajectoryMatching):
        def segment_gradients(self, segment):
            r = super().segment_gradients(segment)
            if self.iteration >= 1:
                return MatchingResult(torch.tensor(float("nan")), r.grad_images, r.grad_labels, r.grad_step_size)
            return r

    m = Broken(data.spec, **{**SMALL, "output": str(tmp_path / "out"), "seed": 0, "max_nonfinite": 3})
    captured = {}

    class Grab(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            if pl_module.iteration == 1:
                captured.update(snapshot(pl_module))

    with pytest.raises(DDKitError, match="matching loss: non-finite for 3 iterations in a row"):
        trainer(10, callbacks=[Grab()]).fit(m, datamodule=data)
    assert m.nonfinite_segments == 3 and m.iteration == 3
    assert all(torch.equal(v, snapshot(m)[k]) for k, v in captured.items())
    assert load_distilled(tmp_path / "out" / "last").extra["iteration"] == 3


@pytest.mark.parametrize("kwargs, message", [
    ({"ipc": 0}, "ipc: must be > 0, got 0"),
    ({"batch_syn": 0}, "batch_syn: must be > 0"),
    ({"graph_window": -1}, "graph_window: must be >= 0, got -1"),
    ({"engine": "unroll", "compile_trajectory": True}, "compile_trajectory: applies to the adjoint and tesla"),
    ({"syn_steps": -1}, "syn_steps: must be > 0, got -1"),
    ({"lr_img": 0.0}, "lr_img: must be a finite number > 0, got 0.0"),
    ({"lr_lr": -1e-5}, "lr_lr: must be a finite number > 0"),
    ({"lr_y": float("nan")}, "lr_y: must be a finite number > 0"),
    ({"lr_teacher": 0.0}, "lr_teacher"),
    ({"engine": "magic"}, "engine: must be one of unroll, tesla, adjoint, got 'magic'"),
    ({"pix_init": "zeros"}, "pix_init: must be one of"),
    ({"mode": "dc"}, "mode: must be one of datm, mtt, got 'dc'"),
    ({"on_bad_step_size": "ignore"}, "on_bad_step_size"),
    ({"min_start_epoch": 5, "max_start_epoch": 3}, "min_start_epoch: must lie in"),
])
def test_bad_options(buffer_dir, tmp_path, kwargs, message):
    data = ExpertSegments(str(buffer_dir))
    with pytest.raises(DDKitError, match=message.replace("(", r"\(").replace("[", r"\[")):
        make_module(data, tmp_path, **kwargs)


def test_bad_buffers(buffer_dir, tmp_path):
    with pytest.raises(DDKitError, match="buffer: directory not found"):
        ExpertSegments(str(tmp_path / "missing"))
    data = ExpertSegments(str(buffer_dir))
    with pytest.raises(DDKitError, match=r"buffer.epochs: must be >= max_start_epoch \+ expert_epochs = 6, got 5"):
        make_module(data, tmp_path, max_start_epoch=4, expert_epochs=2).attach(data)
    with pytest.raises(DDKitError, match="ipc: class .* classify correctly, got 1000"):
        make_module(data, tmp_path, ipc=1000).attach(data)
    with pytest.raises(DDKitError, match="label_experts: the buffer has 3 experts, got 4"):
        make_module(data, tmp_path, label_experts=4).attach(data)
    # a meta whose net does not fit the stored parameters
    broken = tmp_path / "broken"
    shutil.copytree(buffer_dir, broken)
    meta = json.loads((broken / "meta.json").read_text())
    meta["net_kwargs"]["width"] = 16
    (broken / "meta.json").write_text(json.dumps(meta))
    data = ExpertSegments(str(broken))
    with pytest.raises(DDKitError, match="buffer: parameter"):
        make_module(data, tmp_path).attach(data)
    with pytest.raises(DDKitError, match="zca: the buffer's experts were trained with zca=False, got True"):
        ExpertSegments(str(buffer_dir), zca=True)
    with pytest.raises(DDKitError, match="dataset: the buffer was made on 'digits'"):
        ExpertSegments(str(buffer_dir), dataset="mnist")


def test_fit_needs_max_steps_and_the_expert_datamodule(buffer_dir, tmp_path):
    data = ExpertSegments(str(buffer_dir))
    with pytest.raises(DDKitError, match="trainer.max_steps: must be the number of matching iterations"):
        L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, accelerator="cpu").fit(
            make_module(data, tmp_path), datamodule=data)
    with pytest.raises(DDKitError, match="data: TrajectoryMatching needs"):
        trainer(1).fit(make_module(data, tmp_path), datamodule=RealDataModule("digits"))
    with pytest.raises(DDKitError, match="trainer.precision"):
        trainer(1, precision="bf16-true").fit(make_module(data, tmp_path), datamodule=data)


def test_step_tokens():
    assert [int(t) for t in StepTokens(3)] == [0, 1, 2] and len(StepTokens(3)) == 3
    with pytest.raises(TypeError):
        len(StepTokens(None))


def test_bf16_mixed_runs_the_inner_loop_under_autocast(buffer_dir, tmp_path):
    data = ExpertSegments(str(buffer_dir))
    seen = []

    class Probe(TrajectoryMatching):
        def segment_gradients(self, segment):
            seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
            return super().segment_gradients(segment)

    m = Probe(data.spec, **{**SMALL, "output": str(tmp_path / "out"), "seed": 0})
    trainer(3, precision="bf16-mixed").fit(m, datamodule=data)
    assert seen == [True] * 3 and m.images.dtype == torch.float32
    ds = load_distilled(tmp_path / "out" / "last")
    assert ds.step_size > 0 and bool(torch.isfinite(ds.images).all()) and m.nonfinite_segments == 0


# ------------------------------------------------------------------------------------------------ DDP


@pytest.mark.distributed
def test_ddp_step_equals_one_process_over_both_segments(buffer_dir, tmp_path):
    args = [
        "fit", "--model", "ddkit.modules.matching.TrajectoryMatching",
        "--data", "ddkit.datamodules.experts.ExpertSegments", "--data.buffer", str(buffer_dir),
        *[a for k, v in SMALL.items() for a in (f"--model.{k}", str(v))],
        "--model.threshold", "null", "--model.seed", "0", "--model.output", "out",
        "--trainer.max_steps", "1", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
        "--trainer.strategy", "ddp", "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
        "--trainer.enable_model_summary", "false",
        # evaluation inside a DDP fit runs on every rank in lockstep (a rank-0-only run would block)
        "--trainer.callbacks+=ddkit.callbacks.synthetic.PeriodicEvaluation", "--trainer.callbacks.eval_every", "1",
        "--trainer.callbacks.epochs", "2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "ddkit.cli", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = load_distilled(tmp_path / "out" / "last")

    data = ExpertSegments(str(buffer_dir))
    m = make_module(data, tmp_path, threshold=None)
    m.attach(data)
    start = {k: v.detach().clone() for k, v in (("images", m.images), ("step_size", m.step_size),
                                                ("label_logits", m.label_logits))}
    results = [m.segment_gradients(m.sample_segment(segment_generator(0, r), 0)) for r in (0, 1)]
    mean = [(a + b) / 2 for a, b in zip(*[(r.grad_images, r.grad_step_size, r.grad_labels) for r in results])]
    # first SGD step with momentum: the momentum buffer is the gradient itself
    torch.testing.assert_close(ddp.images, start["images"] - SMALL["lr_img"] * mean[0], atol=1e-6, rtol=0)
    assert math.isclose(ddp.step_size, float(start["step_size"] - SMALL["lr_lr"] * mean[1]), abs_tol=1e-6)
    torch.testing.assert_close(ddp.label_logits, start["label_logits"] - SMALL["lr_y"] * mean[2], atol=1e-6, rtol=0)
    assert not torch.allclose(results[0].grad_images, results[1].grad_images)  # two different segments
    assert ddp.extra["iteration"] == 1
    assert load_distilled(tmp_path / "out" / "best").extra["val_acc"] >= 0


def test_folder_dataset_gets_a_validation_split_and_deterministic_init_images(tmp_path):
    """Tiny-ImageNet layout (folders): the val split is carved from train/, init images use the eval transform."""
    from PIL import Image

    from ddkit.datamodules.real import dataset_info

    root = tmp_path / "tiny"
    g = torch.Generator().manual_seed(0)
    for c in range(200):
        for split, count in (("train", 4), ("val_by_class", 1)):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(0, 256, (64, 64, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.png")
    info = dataset_info("tiny_imagenet")
    spec = RealDataModule("tiny_imagenet").spec
    kwargs = {"depth": 4, "width": 4, "norm": "instance"}
    net = build_net("convnet", 200, 3, 64, **kwargs)
    write_buffer_meta(tmp_path / "buf", BufferMeta.for_net("convnet", kwargs, spec, net, 2))
    theta = flatten_params(net)
    save_expert(tmp_path / "buf", 0, torch.stack([theta, theta * 0.9, theta * 0.8]))
    data = ExpertSegments(str(tmp_path / "buf"), root=str(root), val_split=200)
    data.setup("fit")
    assert len(data.val_set) == 200 and len(data.train_set) == 600 and info.num_classes == 200
    x, y = data.train_tensors()
    assert len(x) == 600 and torch.bincount(y).tolist() == [3] * 200
    m = TrajectoryMatching(data.spec, ipc=1, syn_steps=2, batch_syn=20, expert_epochs=1, max_start_epoch=1,
                           mode="mtt", pix_init="real", output=str(tmp_path / "out"), seed=0)
    m.attach(data)
    first = x[torch.tensor([0])]
    assert first.shape == (1, 3, 64, 64) and torch.equal(first, x[torch.tensor([0])])  # no random crop
    from ddkit.datamodules.real import random_real_subset

    assert torch.equal(m.images.detach(), x[random_real_subset(y, 1, 0)])
    result = m.segment_gradients(m.sample_segment(segment_generator(0, 0), 0))
    assert bool(torch.isfinite(result.loss))
