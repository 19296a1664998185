"""Stored soft labels: shard round trip, batch slices, meta (bytes on disk), checks against the run, corruption."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ddkit.errors import DDKitError
from ddkit.formats.soft_labels import (
    SoftLabelReader,
    begin_soft_labels,
    check_soft_labels,
    finish_soft_labels,
    images_fingerprint,
    read_soft_label_meta,
    remove_soft_labels,
    save_shard,
    shard_exists,
    shard_name,
    validate_soft_labels,
)

N, B, K = 5, 2, 3  # 5 images in batches of 2: batches [0:2], [2:4], [4:5]


def _plan(**overrides) -> dict:
    plan = {"num_images": N, "num_classes": K, "image_shape": [1, 4, 4], "images_sha256": "abc", "batch_size": B,
            "seed": 7, "augment": "crop_flip", "view_size": 4, "crop_scale": [0.08, 1.0], "padding": 1,
            "mix": "cutmix", "mix_alpha": 1.0}
    return {**plan, **overrides}


def _shard(epoch: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(epoch)
    return {
        "order": torch.randperm(N, generator=g),
        "boxes": torch.randint(0, 3, (N, 4), generator=g, dtype=torch.int32),
        "flips": torch.tensor([1, 0, 0, 1, 1], dtype=torch.uint8),
        "mix_perm": torch.tensor([1, 0, 0, 1, 0]),
        "mix_lam": torch.tensor([0.25, 0.5, 1.0], dtype=torch.float64),
        "mix_box": torch.tensor([[0, 2, 0, 2], [1, 3, 1, 3], [0, 0, 0, 0]], dtype=torch.int32),
        "logits": torch.randn(N, K, generator=g).half(),
    }


def _store(path, epochs: int = 2, finish: bool = True) -> list[dict[str, torch.Tensor]]:
    begin_soft_labels(path, _plan(), epochs, {"path": "t.safetensors", "sha256": "f00"})
    shards = [_shard(e) for e in range(epochs)]
    for e, s in enumerate(shards):
        save_shard(path, e, s)
    if finish:
        finish_soft_labels(path, {"float32": 4 * N * 16, "uint8": N * 16})
    return shards


def test_round_trip_batches_are_exact_slices(tmp_path) -> None:
    path = tmp_path / "store"
    shards = _store(path)
    reader = SoftLabelReader(path)
    for e, s in enumerate(shards):
        for b, (lo, hi) in enumerate([(0, 2), (2, 4), (4, 5)]):
            got = reader.batch(e, b)
            assert torch.equal(got["index"], s["order"][lo:hi])
            assert torch.equal(got["boxes"], s["boxes"][lo:hi])
            assert torch.equal(got["flips"], s["flips"][lo:hi])
            assert torch.equal(got["mix_perm"], s["mix_perm"][lo:hi])
            assert got["mix_lam"].dtype == torch.float64 and got["mix_lam"].item() == s["mix_lam"][b].item()
            assert got["mix_box"].tolist() == s["mix_box"][b].tolist()
            assert got["logits"].dtype == torch.float16 and torch.equal(got["logits"], s["logits"][lo:hi])
    # no temporary files left behind by the atomic writes
    assert sorted(p.name for p in path.iterdir()) == ["epoch_0000.safetensors", "epoch_0001.safetensors", "meta.json"]


def test_meta_records_plan_teacher_and_bytes_on_disk(tmp_path) -> None:
    path = tmp_path / "store"
    _store(path, epochs=3)
    meta = read_soft_label_meta(path)
    assert meta["complete"] is True and meta["epochs"] == 3 and meta["batch_size"] == B and meta["seed"] == 7
    assert meta["teacher"] == {"path": "t.safetensors", "sha256": "f00"}
    sizes = [(path / shard_name(e)).stat().st_size for e in range(3)]
    assert meta["bytes"]["shards"] == sizes and meta["bytes"]["labels"] == sum(sizes)
    assert meta["bytes"]["images_float32"] == 320 and meta["bytes"]["labels_over_images_uint8"] == sum(sizes) / 80
    assert validate_soft_labels(path, deep=True)["epochs"] == 3


def test_check_against_the_run(tmp_path) -> None:
    path = tmp_path / "store"
    assert check_soft_labels(path, _plan(), 2) == "absent"
    begin_soft_labels(path, _plan(), 2, None)
    assert check_soft_labels(path, _plan(), 2) == "partial"
    save_shard(path, 0, _shard(0))
    save_shard(path, 1, _shard(1))
    finish_soft_labels(path)
    assert check_soft_labels(path, _plan(), 2) == "complete"
    assert check_soft_labels(path, _plan(), 1) == "complete"  # fewer epochs than stored is fine
    assert check_soft_labels(path, _plan(seed=None), 2) == "complete"  # no seed asked: take the store's


@pytest.mark.parametrize("overrides, field", [
    ({"batch_size": 4}, "soft_labels.batch_size"),
    ({"images_sha256": "other"}, "soft_labels.images_sha256"),
    ({"mix": "mixup"}, "soft_labels.mix"),
    ({"seed": 8}, "soft_labels.seed"),
])
def test_check_mismatch_is_one_line_error(tmp_path, overrides, field) -> None:
    path = tmp_path / "store"
    _store(path)
    with pytest.raises(DDKitError, match=f"^{field}: ") as e:
        check_soft_labels(path, _plan(**overrides), 2)
    assert "\n" not in str(e.value)


def test_fewer_epochs_or_other_teacher_is_an_error(tmp_path) -> None:
    path = tmp_path / "store"
    _store(path, epochs=2)
    with pytest.raises(DDKitError, match=r"^soft_labels.epochs: .*2 epochs, fewer than the 3"):
        check_soft_labels(path, _plan(), 3)
    with pytest.raises(DDKitError, match="^soft_labels.teacher: "):
        check_soft_labels(path, _plan(), 2, {"path": "other.safetensors", "sha256": "beef"})


def test_shard_checks(tmp_path) -> None:
    path = tmp_path / "store"
    begin_soft_labels(path, _plan(), 1, None)
    bad = _shard(0)
    del bad["logits"]
    with pytest.raises(DDKitError, match="^soft_labels.shard: missing tensors"):
        save_shard(path, 0, bad)
    bad = _shard(0)
    bad["logits"][0, 0] = float("inf")
    with pytest.raises(DDKitError, match="^soft_labels.shard.logits: contains non-finite"):
        save_shard(path, 0, bad)
    bad = _shard(0)
    bad["mix_box"] = bad["mix_box"][:2]
    with pytest.raises(DDKitError, match=r"^soft_labels.shard.mix_box: shape must be \[3, 4\]"):
        save_shard(path, 0, bad)
    assert not shard_exists(path, 0)
    with pytest.raises(DDKitError, match="^soft_labels: 1 epoch shards missing"):
        finish_soft_labels(path)


def test_corrupt_or_unfinished_store_is_detected(tmp_path) -> None:
    path = tmp_path / "store"
    _store(path, epochs=2, finish=False)
    with pytest.raises(DDKitError, match="did not finish"):
        validate_soft_labels(path)
    finish_soft_labels(path)
    shard = path / shard_name(1)
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(DDKitError, match="^soft_labels: shard size differs"):
        validate_soft_labels(path)
    with pytest.raises(DDKitError, match="^soft_labels: not a valid safetensors file"):
        SoftLabelReader(path).batch(1, 0)
    (path / "meta.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(DDKitError, match="^soft_labels.meta.format: "):
        read_soft_label_meta(path)


def test_remove_only_deletes_stores(tmp_path) -> None:
    path = tmp_path / "store"
    _store(path)
    remove_soft_labels(path)
    assert not path.exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.txt").write_text("keep me")
    with pytest.raises(DDKitError, match="refusing to delete"):
        remove_soft_labels(other)
    with pytest.raises(DDKitError, match="no meta.json"):
        check_soft_labels(other, _plan(), 1)
    assert (other / "x.txt").is_file()


def test_fingerprint_tracks_the_images() -> None:
    x = torch.zeros(2, 1, 3, 3)
    y = x.clone()
    y[1, 0, 2, 2] = 1e-6
    assert images_fingerprint(x) == images_fingerprint(x.clone())
    assert images_fingerprint(x) != images_fingerprint(y)
    assert images_fingerprint(x) != images_fingerprint(x.view(1, 2, 3, 3))


@pytest.mark.parametrize("key, value, message", [
    ("epochs", 10**15, r"^soft_labels.meta.epochs: must be an integer in \[0, 1000000\], got 1000000000000000$"),
    ("epochs", "2", r"^soft_labels.meta.epochs: must be an integer in \[0, 1000000\], got '2'$"),
    ("num_classes", 1e15, r"^soft_labels.meta.num_classes: must be an integer in \[1, 100000\], got 1000000000000000.0$"),
    ("batch_size", 0, r"^soft_labels.meta.batch_size: must be an integer >= 1, got 0$"),
    ("num_images", 2.5, r"^soft_labels.meta.num_images: must be an integer >= 1, got 2.5$"),
    ("complete", "yes", r"^soft_labels.meta.complete: must be true or false, got 'yes'$"),
])
def test_edited_counts_in_meta_are_one_line_errors(tmp_path, key, value, message) -> None:
    path = tmp_path / "store"
    _store(path, epochs=1)
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, key: value}))
    with pytest.raises(DDKitError, match=message):
        read_soft_label_meta(path)


# ---------------------------------------------------------------------------------------------- top-k


def test_topk_target_and_kd_loss_by_hand() -> None:
    """K = 4, k = 2, T = 2, teacher logits [4, 1, 2, 0]: the top-2 classes 0 and 2 keep their probabilities, classes
    1 and 3 share their total e^0.5 + e^0 evenly; the KL to a uniform student is computed by hand."""
    from ddkit.formats.soft_labels import dense_logits, topk_logits
    from ddkit.modules.kd import kd_loss

    stored = topk_logits(torch.tensor([[4.0, 1.0, 2.0, 0.0]]), 2, temperature=2.0)
    assert stored["logits"].tolist() == [[4.0, 2.0]] and stored["logit_index"].tolist() == [[0, 2]]
    rest = 2 * (math.log(math.exp(0.5) + 1) - math.log(2))
    assert stored["logit_rest"].item() == pytest.approx(rest, abs=1e-6)
    dense = dense_logits(stored["logits"], stored["logit_index"], stored["logit_rest"], 4)
    assert dense[0, 0].item() == 4.0 and dense[0, 2].item() == 2.0
    assert dense[0, 1].item() == dense[0, 3].item() == pytest.approx(rest, abs=1e-6)
    z = math.exp(2) + math.exp(1) + math.exp(0.5) + 1
    p = [math.exp(2) / z, (math.exp(0.5) + 1) / 2 / z, math.exp(1) / z, (math.exp(0.5) + 1) / 2 / z]
    assert torch.softmax(dense / 2, 1)[0].tolist() == pytest.approx(p, abs=1e-6)
    kl = sum(pi * math.log(pi / 0.25) for pi in p)
    assert kd_loss(torch.zeros(1, 4), dense, 2.0).item() == pytest.approx(kl, abs=1e-6)
    full = topk_logits(torch.tensor([[4.0, 1.0, 2.0, 0.0]]), 4, temperature=2.0)  # k = K: nothing left out
    assert dense_logits(full["logits"], full["logit_index"], full["logit_rest"], 4).tolist() == [[4.0, 1.0, 2.0, 0.0]]


def test_topk_store_round_trip_meta_and_bytes(tmp_path) -> None:
    from ddkit.formats.soft_labels import dense_logits, topk_logits

    path = tmp_path / "store"
    begin_soft_labels(path, _plan(topk=2, topk_temperature=3.0), 1, None)
    shard = _shard(0)
    top = topk_logits(shard["logits"], 2, 3.0)
    save_shard(path, 0, {**shard, **top})
    meta = finish_soft_labels(path)
    assert meta["topk"] == 2 and meta["topk_temperature"] == 3.0
    b = meta["bytes"]
    assert b["logits_full"] == N * K * 2 and b["logits_topk"] == N * (2 * 4 + 4)
    assert b["logits_saved"] == N * K * 2 - N * 12
    validate_soft_labels(path, deep=True)
    got = SoftLabelReader(path).batch(0, 1)["logits"]  # positions 2:4, dense float32
    want = dense_logits(top["logits"][2:4], top["logit_index"][2:4], top["logit_rest"][2:4], K)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert torch.equal(got.gather(1, top["logit_index"][2:4].long()), shard["logits"][2:4].float().topk(2).values)
    assert check_soft_labels(path, _plan(topk=2, topk_temperature=3.0), 1) == "complete"
    with pytest.raises(DDKitError, match=r"^soft_labels.topk: the stored labels were made with topk=2, this run has "
                                         r"topk=None"):
        check_soft_labels(path, _plan(), 1)
    with pytest.raises(DDKitError, match=r"^soft_labels.topk_temperature: the stored labels were made with "
                                         r"topk_temperature=3.0, this run has topk_temperature=4.0"):
        check_soft_labels(path, _plan(topk=2, topk_temperature=4.0), 1)
