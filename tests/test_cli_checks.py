import time

import pytest
from jsonargparse import Namespace

from ddkit.cli_checks import MAX_YAML_NODES, check_command_line, check_config_file, check_run_options
from ddkit.errors import DDKitError
from tests.conftest import REPO


def test_every_shipped_config_passes():
    configs = sorted(REPO.glob("configs/**/*.yaml"))
    assert len(configs) > 50
    for path in configs:
        check_config_file(str(path))


def test_an_alias_bomb_is_counted_in_time_linear_in_its_text(tmp_path):
    # 30 levels of 10 copies: ~1.2e31 nodes once expanded (the repunits 11 .. 1...1, + 31 keys + the root),
    # counted by visiting each of the ~330 composed nodes once
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 31)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines))
    start = time.perf_counter()
    expanded = "12,345,679,012,345,679,012,345,679,012,373"
    with pytest.raises(DDKitError, match=rf"^config: YAML aliases expand to {expanded} nodes"):
        check_config_file(str(path))
    assert time.perf_counter() - start < 1


def test_aliases_below_the_bound_are_accepted():
    # the root + 2 keys + a (1 + 10) + b (1 + 10 * 11) = 125 nodes: a normal use of anchors; "*.png" is no YAML
    anchors = "{a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1], b: [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]}"
    check_command_line(["--model.net_kwargs", anchors, "--data.root", "*.png"])
    assert MAX_YAML_NODES > 125


def test_the_alias_of_an_inline_option_is_named():
    with pytest.raises(DDKitError, match=r"^model.net_kwargs: YAML alias refers to itself"):
        check_command_line(["fit", "--model.net_kwargs=&a [*a]"])


def _config(trainer=None, checkpoint=None, seed=0):
    return Namespace(seed_everything=seed, trainer=Namespace(**(trainer or {})),
                     checkpoint=Namespace(**(checkpoint or {})))


@pytest.mark.parametrize("trainer", [{}, {"devices": "auto"}, {"devices": 1}, {"devices": "2"}, {"max_epochs": -1},
                                     {"max_steps": 0}, {"accelerator": "cpu", "devices": 1}])
def test_good_run_options_pass(trainer):
    check_run_options(_config(trainer, {"every_n_epochs": 0, "save_top_k": -1}, seed=True))


@pytest.mark.parametrize("config, message", [
    (_config({"devices": []}), r"^trainer.devices: must be a number of CPU processes >= 1 or auto, got \[\]$"),
    (_config({"devices": "0,1"}), r"^trainer.devices: must be a number of CPU processes >= 1 or auto, got '0,1'$"),
    (_config({"num_nodes": 0}), r"^trainer.num_nodes: must be an integer >= 1, got 0$"),
    (_config({"accumulate_grad_batches": 0}), r"^trainer.accumulate_grad_batches: must be an integer >= 1, got 0$"),
    (_config(checkpoint={"save_top_k": -2}), r"^checkpoint.save_top_k: must be an integer >= -1, got -2$"),
    (_config(seed=2**32), r"^seed_everything: must be an integer in \[0, 4294967295\], got 4294967296$"),
])
def test_bad_run_options_are_one_error(config, message):
    with pytest.raises(DDKitError, match=message):
        check_run_options(config)


def test_a_group_config_file_is_checked_but_other_yaml_paths_are_not(tmp_path):
    empty = tmp_path / "model.yaml"
    empty.write_text("")
    with pytest.raises(DDKitError, match=r"^config: empty \(no options in it\)"):
        check_command_line(["fit", "--model", str(empty)])
    check_command_line(["evaluate", "--output", str(empty)])  # a path the run writes, not a config
