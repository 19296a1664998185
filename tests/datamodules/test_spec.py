import pytest

from ddkit.datamodules.real import DATASETS, RealDataModule
from ddkit.datamodules.spec import DataSpec
from ddkit.errors import DDKitError


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_every_dataset_spec_round_trips_through_its_dict(name):
    spec = RealDataModule(name).spec
    assert DataSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize("field, value, message", [
    ("num_classes", 10**15, r"^where.num_classes: must be an integer in \[1, 100000\], got 1000000000000000$"),
    ("num_classes", "10", r"^where.num_classes: must be an integer in \[1, 100000\], got '10'$"),
    ("in_chans", True, r"^where.in_chans: must be an integer in \[1, 1024\], got True$"),
    ("image_size", 8.0, r"^where.image_size: must be an integer in \[1, 4096\], got 8.0$"),
    ("mean", [0.1, "x"], r"^where.mean: must be a list of 1 finite numbers, got \[0.1, 'x'\]$"),
    ("std", [float("nan")], r"^where.std: must be a list of 1 positive finite numbers, got \[nan\]$"),
    ("zca", 1, r"^where.zca: must be true or false, got 1$"),
    ("class_names", [1, 2], r"^where.class_names: must be a list of 10 names, got \[1, 2\]$"),
    ("dataset", None, r"^where.dataset: must be a name, got None$"),
    ("extra", 1, r"^where: unknown fields \['extra'\]"),
])
def test_a_bad_field_is_one_error_naming_it(field, value, message):
    d = {**RealDataModule("digits").spec.to_dict(), field: value}
    with pytest.raises(DDKitError, match=message):
        DataSpec.from_dict(d, "where")


def test_missing_fields_and_non_mappings_are_refused():
    d = RealDataModule("digits").spec.to_dict()
    del d["image_size"]
    with pytest.raises(DDKitError, match=r"^data_spec: missing fields \['image_size'\]"):
        DataSpec.from_dict(d)
    with pytest.raises(DDKitError, match=r"^data_spec: must be a mapping, got \[1, 2\]$"):
        DataSpec.from_dict([1, 2])
