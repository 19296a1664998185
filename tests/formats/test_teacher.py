import pytest
import torch

from ddkit.datamodules.spec import DataSpec
from ddkit.errors import DDKitError
from ddkit.formats.teacher import TeacherMeta, load_teacher, save_teacher
from ddkit.nets import build_net

SPEC = DataSpec("digits", 10, 1, 8, (0.3,), (0.4,))


def test_teacher_round_trip_predicts_identically(tmp_path):
    net = build_net("convnet_bn", 10, 1, 8, width=8)
    net.eval()
    save_teacher(tmp_path / "t.safetensors", net, TeacherMeta("convnet_bn", {"width": 8}, SPEC))
    back, meta = load_teacher(tmp_path / "t.safetensors")
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(back(x), net(x)) and meta.data_spec == SPEC and not back.training


def test_corrupt_and_foreign_teacher_files(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(DDKitError, match="teacher: not a valid safetensors file"):
        load_teacher(tmp_path / "junk.safetensors")
    with pytest.raises(DDKitError, match="teacher: file not found"):
        load_teacher(tmp_path / "missing.safetensors")
