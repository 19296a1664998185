"""ExpertBuffer: round trip, lazy rows, validation errors, and the reference replay_buffer importer."""

import json
import pathlib

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from ddkit.datamodules.spec import DataSpec
from ddkit.errors import DDKitError
from ddkit.formats import buffer as buffer_format
from ddkit.formats.buffer import (
    BufferMeta,
    ExpertBuffer,
    import_reference_buffer,
    save_expert,
    write_buffer_meta,
)
from ddkit.nets import build_net
from ddkit.ops.zca import fit_zca

SPEC = DataSpec("digits", 10, 1, 8, (0.3,), (0.4,), class_names=tuple(str(i) for i in range(10)))
NET_KWARGS = {"depth": 2, "width": 4}


def _net() -> nn.Module:
    return build_net("convnet", 10, 1, 8, **NET_KWARGS)


def _meta(epochs: int = 3, zca: bool = False, spec: DataSpec = SPEC) -> BufferMeta:
    return BufferMeta.for_net("convnet", NET_KWARGS, spec, _net(), epochs, {"optimizer": "sgd", "lr": 0.01}, zca)


def _write(path: pathlib.Path, experts: int = 2, epochs: int = 3) -> list[torch.Tensor]:
    meta = _meta(epochs)
    write_buffer_meta(path, meta)
    trajs = [torch.randn(epochs + 1, meta.num_params, generator=torch.Generator().manual_seed(k)) for k in
             range(experts)]
    for k, t in enumerate(trajs):
        save_expert(path, k, t, metadata={"rank": k % 2})
    return trajs


def test_meta_fields_follow_the_net():
    net, meta = _net(), _meta()
    assert meta.param_names == [n for n, _ in net.named_parameters()]
    assert meta.param_shapes == [list(p.shape) for p in net.parameters()]
    # conv1 (1->4, 3x3) + b, GN w + b, conv2 (4->4) + b, GN w + b,
    # head: 1-channel input gets padding 3, so 8 px -> 12 -> pool 6 -> pool 3: 4*3*3 = 36 features -> 10
    assert meta.num_params == (36 + 4) + 8 + (144 + 4) + 8 + (360 + 10)
    assert meta.num_params == sum(p.numel() for p in net.parameters())


def test_round_trip_rows_equal_trajectory(tmp_path):
    trajs = _write(tmp_path, experts=2, epochs=3)
    buf = ExpertBuffer(tmp_path)
    assert (buf.num_experts, buf.epochs, buf.num_params) == (2, 3, trajs[0].shape[1])
    assert buf.zca is None
    for k, t in enumerate(trajs):
        assert torch.equal(buf.trajectory(k), t)
        for e in range(4):
            row = buf.params(k, e)
            assert row.dtype == torch.float32 and row.shape == (buf.num_params,)
            assert torch.equal(row, t[e])
    assert buf.expert_metadata(1)["rank"] == 1 and buf.expert_metadata(1)["expert"] == 1
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["format"] == "ddkit.buffer" and meta["version"] == 1
    assert meta["num_params"] == buf.num_params and meta["epochs"] == 3 and meta["zca"] is None
    assert meta["dataset"] == "digits" and meta["net"] == "convnet" and meta["net_kwargs"] == NET_KWARGS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["expert_0000.safetensors", "expert_0001.safetensors",
                                                          "meta.json"]  # no temporary files left


def test_params_reads_one_row_not_the_file(tmp_path, monkeypatch):
    trajs = _write(tmp_path, experts=1)
    buf = ExpertBuffer(tmp_path)

    def no_whole_file(*args, **kwargs):
        raise AssertionError("params() must not load the whole file")

    monkeypatch.setattr(buffer_format, "load_tensors", no_whole_file)
    assert torch.equal(buf.params(0, 2), trajs[0][2])
    assert torch.equal(buf.params(torch.tensor(0), torch.tensor(1)), trajs[0][1])  # 0-d integer tensors work


def test_build_net_and_unflatten_feed_functional_call(tmp_path):
    trajs = _write(tmp_path, experts=1)
    buf = ExpertBuffer(tmp_path)
    net = buf.build_net()
    with torch.no_grad():
        for p, v in zip(net.parameters(), buf.unflatten(trajs[0][3]).values()):
            p.copy_(v)
    x = torch.randn(2, 1, 8, 8)
    out = torch.func.functional_call(net, buf.unflatten(buf.params(0, 3)), (x,))
    assert torch.allclose(out, net(x))


def test_zca_round_trip(tmp_path):
    zca = fit_zca(torch.rand(50, 1, 8, 8)).state_dict()
    spec = DataSpec("digits", 10, 1, 8, (0.0,), (1.0,), zca=True)
    meta = _meta(zca=True, spec=spec)
    write_buffer_meta(tmp_path, meta, zca=zca)
    save_expert(tmp_path, 0, torch.zeros(4, meta.num_params))
    buf = ExpertBuffer(tmp_path)
    assert buf.meta.zca and buf.meta.data_spec.zca
    assert json.loads((tmp_path / "meta.json").read_text())["zca"] == "zca.safetensors"
    assert all(torch.equal(buf.zca[k], zca[k]) for k in ("mean", "transform", "inverse"))
    write_buffer_meta(tmp_path, meta)  # rewriting the meta alone keeps the stored transform
    with pytest.raises(DDKitError, match="zca: meta.zca is true"):
        write_buffer_meta(tmp_path / "other", meta)
    with pytest.raises(DDKitError, match="zca: ZCA tensors given but meta.zca is false"):
        write_buffer_meta(tmp_path / "other", _meta(), zca=zca)


def test_missing_directory_and_meta(tmp_path):
    with pytest.raises(DDKitError, match="buffer: directory not found"):
        ExpertBuffer(tmp_path / "nope")
    save_expert(tmp_path, 0, torch.zeros(4, 10))  # no meta yet: nothing to validate the shape against
    with pytest.raises(DDKitError, match="buffer.meta: file not found"):
        ExpertBuffer(tmp_path)


def test_no_experts(tmp_path):
    write_buffer_meta(tmp_path, _meta())
    with pytest.raises(DDKitError, match="buffer: no expert_"):
        ExpertBuffer(tmp_path)


def test_wrong_shapes_are_refused(tmp_path):
    meta = _meta(epochs=3)
    write_buffer_meta(tmp_path, meta)
    with pytest.raises(DDKitError, match=r"trajectory shape must be \[4, "):
        save_expert(tmp_path, 0, torch.zeros(3, meta.num_params))
    with pytest.raises(DDKitError, match=r"must be \[epochs \+ 1, P\]"):
        save_expert(tmp_path, 0, torch.zeros(meta.num_params))
    with pytest.raises(DDKitError, match="index: must be an integer >= 0"):
        save_expert(tmp_path, -1, torch.zeros(4, meta.num_params))
    save_expert(tmp_path, 0, torch.zeros(4, meta.num_params))
    write_buffer_meta(tmp_path, _meta(epochs=5))  # the meta now promises more epochs than the file holds
    with pytest.raises(DDKitError, match=r"expert_0000.safetensors: trajectory must be float32 \[6, "):
        ExpertBuffer(tmp_path)


def test_epochs_and_indices_are_checked(tmp_path):
    _write(tmp_path, experts=2, epochs=3)
    buf = ExpertBuffer(tmp_path)
    assert buf.epochs == 3  # the matching stage checks max_start_epoch + expert_epochs <= epochs
    with pytest.raises(DDKitError, match=r"epoch: must be in \[0, 3\], got 4"):
        buf.params(0, 4)
    with pytest.raises(DDKitError, match=r"expert: must be in \[0, 1\], got 2"):
        buf.params(2, 0)
    with pytest.raises(DDKitError, match="epoch: must be an integer"):
        buf.params(0, 1.5)


def test_check_net_count_and_shapes(tmp_path):
    _write(tmp_path, experts=1)
    buf = ExpertBuffer(tmp_path)
    buf.check_net(_net())
    wide = build_net("convnet", 10, 1, 8, depth=2, width=8)
    count = sum(p.numel() for p in wide.parameters())
    with pytest.raises(DDKitError, match=rf"buffer: parameter count {buf.num_params} does not match net convnet "
                                         rf"\({count}\), got "):
        buf.check_net(wide)


def test_check_net_same_count_other_shapes(tmp_path):
    meta = BufferMeta.for_net("mlp", {}, SPEC, nn.Linear(4, 3), 1)  # [3, 4], [3]: 15 floats
    with pytest.raises(DDKitError, match=r"parameter shapes do not match net linear at parameter 0 "
                                         r"\(buffer \[3, 4\], net \[5, 2\]\)"):
        buffer_format.check_params(meta, nn.Linear(2, 5))  # [5, 2], [5]: 15 floats


def test_nan_is_refused_on_save_and_on_load(tmp_path):
    meta = _meta()
    write_buffer_meta(tmp_path, meta)
    bad = torch.zeros(4, meta.num_params)
    bad[2, 5] = float("nan")
    with pytest.raises(DDKitError, match="non-finite"):
        save_expert(tmp_path, 0, bad)
    bad[2, 5] = float("inf")
    save_file({"trajectory": bad}, str(tmp_path / "expert_0000.safetensors"))  # written behind ddkit's back
    buf = ExpertBuffer(tmp_path)
    assert torch.equal(buf.params(0, 1), bad[1])  # finite rows stay readable
    with pytest.raises(DDKitError, match=r"expert_0000.safetensors\[epoch 2\]: contains 1 non-finite"):
        buf.params(0, 2)
    with pytest.raises(DDKitError, match="non-finite"):
        buf.trajectory(0)


def test_truncated_and_corrupt_files(tmp_path):
    _write(tmp_path, experts=2)
    file = tmp_path / "expert_0001.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(DDKitError, match="expert_0001.safetensors: not a valid safetensors file"):
        ExpertBuffer(tmp_path)
    file.write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(DDKitError, match="expert_0001.safetensors: not a valid safetensors file"):
        ExpertBuffer(tmp_path)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(DDKitError, match="buffer.meta: not valid JSON"):
        ExpertBuffer(tmp_path)


def test_meta_format_and_version(tmp_path):
    _write(tmp_path, experts=1)
    meta = json.loads((tmp_path / "meta.json").read_text())
    (tmp_path / "meta.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(DDKitError, match="buffer.meta.version: unsupported version"):
        ExpertBuffer(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({**meta, "num_params": 7}))
    with pytest.raises(DDKitError, match="buffer.meta.num_params: does not match"):
        ExpertBuffer(tmp_path)


# ------------------------------------------------------------------------------------------------ importer


def _reference_expert(net: nn.Module, epochs: int, seed: int) -> list[list[torch.Tensor]]:
    """What MTT's buffer.py keeps per expert: per-epoch lists of detached per-layer tensors."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=g) for p in net.parameters()] for _ in range(epochs + 1)]


def test_import_reference_buffer(tmp_path):
    net = _net()
    files = []
    for n in range(2):  # two files of 2 experts, 3 epochs each
        experts = [_reference_expert(net, 3, seed=10 * n + j) for j in range(2)]
        torch.save(experts, tmp_path / f"replay_buffer_{n}.pt")
        files.append((tmp_path / f"replay_buffer_{n}.pt", experts))
    buf = import_reference_buffer([str(f) for f, _ in files], str(tmp_path / "out"), "convnet", NET_KWARGS, SPEC)
    assert (buf.num_experts, buf.epochs, buf.num_params) == (4, 3, _meta().num_params)
    assert buf.meta.param_names == _meta().param_names
    k = 0
    for _, experts in files:
        for expert in experts:
            for e, layers in enumerate(expert):
                assert torch.equal(buf.params(k, e), torch.cat([t.reshape(-1) for t in layers]))
            k += 1
    assert buf.expert_metadata(3)["source"] == "replay_buffer_1.pt"
    with pytest.raises(DDKitError, match="out: must not exist or be an empty directory"):
        import_reference_buffer([str(files[0][0])], str(tmp_path / "out"), "convnet", NET_KWARGS, SPEC)


def test_import_refuses_a_layout_that_does_not_fit(tmp_path):
    net = _net()
    torch.save([_reference_expert(net, 2, 0), _reference_expert(net, 3, 1)], tmp_path / "uneven.pt")
    with pytest.raises(DDKitError, match=r"uneven.pt\[expert 1\]: all experts must have 3 epochs"):
        import_reference_buffer([str(tmp_path / "uneven.pt")], str(tmp_path / "a"), "convnet", NET_KWARGS, SPEC)
    assert not (tmp_path / "a").exists()  # nothing half-written
    torch.save([_reference_expert(net, 2, 0)], tmp_path / "narrow.pt")
    with pytest.raises(DDKitError, match=r"narrow.pt\[expert 0\]\[epoch 0\]\[param 0\]: must be a tensor of shape "
                                         r"\[8, 1, 3, 3\], got \[4, 1, 3, 3\]"):
        import_reference_buffer([str(tmp_path / "narrow.pt")], str(tmp_path / "b"), "convnet",
                                {"depth": 2, "width": 8}, SPEC)
    bad = _reference_expert(net, 2, 0)
    bad[1][0][0, 0, 0, 0] = float("nan")
    torch.save([bad], tmp_path / "nan.pt")
    with pytest.raises(DDKitError, match="non-finite"):
        import_reference_buffer([str(tmp_path / "nan.pt")], str(tmp_path / "c"), "convnet", NET_KWARGS, SPEC)
    with pytest.raises(DDKitError, match="files: file not found"):
        import_reference_buffer([str(tmp_path / "missing.pt")], str(tmp_path / "d"), "convnet", NET_KWARGS, SPEC)


class _Payload:
    """Unpickling this calls ``pathlib.Path.touch(marker)``: a stand-in for arbitrary code."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_import_refuses_a_crafted_pickle_without_running_it(tmp_path):
    marker = tmp_path / "payload_ran"
    torch.save([_Payload(marker)], tmp_path / "replay_buffer_0.pt")
    with pytest.raises(DDKitError, match=r"files: cannot be read with torch.load\(weights_only=True\) "
                                         r"\(UnpicklingError: Unsupported global"):
        import_reference_buffer([str(tmp_path / "replay_buffer_0.pt")], str(tmp_path / "out"), "convnet",
                                NET_KWARGS, SPEC)
    assert not marker.exists()
    assert not (tmp_path / "out").exists()
    # The payload is live: an unsafe load of the same kind of file does run it.
    live = tmp_path / "live_payload_ran"
    torch.save([_Payload(live)], tmp_path / "live.pt")
    torch.load(tmp_path / "live.pt", weights_only=False)
    assert live.exists()
