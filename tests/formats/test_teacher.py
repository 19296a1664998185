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


# ---------------------------------------------------------------------------------------------- import


def _randomize_bn(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial running statistics and affine parameters, so a BN mismatch would show in the logits."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)


def test_import_torchvision_resnet18_predicts_like_the_source(tmp_path, capsys):
    import torchvision

    from ddkit.cli import main

    torch.manual_seed(0)
    src = torchvision.models.resnet18(num_classes=1000).eval()
    _randomize_bn(src, 1)
    torch.save(src.state_dict(), tmp_path / "resnet18.pth")
    out = tmp_path / "teacher.safetensors"
    main(["teacher", "import", str(tmp_path / "resnet18.pth"), "--net", "resnet18", "--dataset", "imagenet",
          "--output", str(out)])
    assert "resnet18 (imagenet stem), 1000 classes, 224 px" in capsys.readouterr().out
    net, meta = load_teacher(out)
    assert (meta.net, meta.net_kwargs, meta.data_spec.num_classes) == ("resnet18", {"stem": "imagenet"}, 1000)
    assert meta.data_spec.mean == (0.485, 0.456, 0.406) and len(meta.extra["imported_from"]["sha256"]) == 64
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = src(x), net(x)
    assert want.shape == (3, 1000) and want.abs().max() > 0.1
    assert (got - want).abs().max().item() <= 1e-6


def test_import_timm_resnet50_training_checkpoint(tmp_path):
    """timm's ResNet-50 with timm's/SRe2L's checkpoint shape: {"state_dict": {"module.<name>": ...}, "epoch": ...},
    a CIFAR stem (3x3 conv1) and a 200-class head (Tiny-ImageNet at 64 px)."""
    import timm

    from ddkit.datamodules.spec import DataSpec as Spec
    from ddkit.formats.teacher import import_resnet_checkpoint

    torch.manual_seed(0)
    src = timm.create_model("resnet50", pretrained=False, num_classes=200).eval()
    src.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    src.maxpool = torch.nn.Identity()
    _randomize_bn(src, 3)
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}, "epoch": 7},
               tmp_path / "ckpt.pth.tar")
    spec = Spec("tiny_imagenet", 200, 3, 64, (0.48, 0.45, 0.40), (0.23, 0.23, 0.23))
    meta = import_resnet_checkpoint(tmp_path / "ckpt.pth.tar", "resnet50", spec, tmp_path / "t.safetensors")
    assert meta.net_kwargs == {"stem": "cifar"}
    net, _ = load_teacher(tmp_path / "t.safetensors")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (net(x) - src(x)).abs().max().item() <= 1e-6


def test_import_refuses_mismatches_with_one_line(tmp_path):
    import torchvision

    from ddkit.formats.teacher import import_resnet_checkpoint

    spec = DataSpec("imagenet", 1000, 3, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(DDKitError, match=r"^checkpoint: weights do not fit net 'resnet50' \(.*\), got '.*r18.pth'$"):
        import_resnet_checkpoint(tmp_path / "r18.pth", "resnet50", spec, tmp_path / "t.safetensors")
    with pytest.raises(DDKitError, match=r"^checkpoint: its head has 1000 classes but dataset 'tiny_imagenet' has 200"):
        import_resnet_checkpoint(tmp_path / "r18.pth", "resnet18", DataSpec("tiny_imagenet", 200, 3, 64, (0.5,) * 3,
                                                                           (0.2,) * 3), tmp_path / "t.safetensors")
    torch.save({"optimizer": {"lr": 0.1}}, tmp_path / "opt.pth")
    with pytest.raises(DDKitError, match=r"^checkpoint: no state dict in it"):
        import_resnet_checkpoint(tmp_path / "opt.pth", "resnet18", spec, tmp_path / "t.safetensors")
    with pytest.raises(DDKitError, match=r"^net: must be one of resnet18, resnet50, got 'vgg16'$"):
        import_resnet_checkpoint(tmp_path / "r18.pth", "vgg16", spec, tmp_path / "t.safetensors")
    assert not (tmp_path / "t.safetensors").exists()
