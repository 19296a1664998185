"""Checks the ``ddkit`` command runs before any class is built: config files, YAML values, Trainer options.

Each problem is one DDKitError naming the option (or the config file) and the bad value, so that the user gets one
line instead of a traceback from deep inside jsonargparse, PyYAML or Lightning.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ddkit.errors import DDKitError, check_int

# The most nodes a YAML document may hold once its aliases are expanded. The shipped configs have a few hundred;
# an alias bomb (each level repeating the previous one ten times) passes a billion in a few hundred bytes.
MAX_YAML_NODES = 100_000
MAX_CONFIG_BYTES = 10 << 20
CONFIG_FLAGS = ("-c", "--config")
# Options whose value jsonargparse also reads as a config file of that group (``--model model.yaml``).
GROUP_FLAGS = ("--model", "--data", "--trainer", "--checkpoint", "--optimizer", "--lr_scheduler")


def check_command_line(argv: list[str]) -> None:
    """Config files named in ``argv`` must be UTF-8 YAML mappings of bounded size; YAML values must be bounded."""
    option = ""
    for arg in argv:
        if arg.startswith("-") and "=" not in arg:
            option = arg
            continue
        key, value = arg.split("=", 1) if arg.startswith("-") else (option, arg)
        option = ""
        if key in CONFIG_FLAGS or (key in GROUP_FLAGS and Path(value).suffix in (".yaml", ".yml")):
            check_config_file(value)
        elif "*" in value:  # an alias: the value may be YAML (``--model.net_kwargs '{a: &a [..], b: [*a, *a]}'``)
            try:
                node = yaml.compose(value, Loader=yaml.SafeLoader)
            except (yaml.YAMLError, RecursionError):
                continue  # not YAML: jsonargparse takes it as a plain string
            _check_node_count(node, key.lstrip("-") or "value", value)


def check_config_file(path: str) -> None:
    """One DDKitError naming ``path`` unless it is a non-empty UTF-8 YAML mapping without an alias bomb.

    jsonargparse also takes the config itself as the value (``--config '{trainer: {max_epochs: 1}}'``).
    """
    file = Path(path)
    if not file.is_file():
        try:
            node = yaml.compose(path, Loader=yaml.SafeLoader)
        except (yaml.YAMLError, RecursionError):
            node = None
        if not isinstance(node, yaml.MappingNode):
            raise DDKitError(f"config: file not found, got {path!r}")
        _check_node_count(node, "config", path)
        return
    if file.stat().st_size > MAX_CONFIG_BYTES:
        raise DDKitError(f"config: larger than {MAX_CONFIG_BYTES >> 20} MB (not a config file?), got {path!r}")
    data = file.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DDKitError(f"config: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}), got {path!r}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        where = f" at line {e.problem_mark.line + 1}, column {e.problem_mark.column + 1}" if e.problem_mark else ""
        raise DDKitError(f"config: not valid YAML ({e.problem}{where}), got {path!r}") from None
    except yaml.YAMLError as e:
        raise DDKitError(f"config: not valid YAML ({str(e).splitlines()[0]}), got {path!r}") from None
    except RecursionError:
        raise DDKitError(f"config: YAML nested too deeply, got {path!r}") from None
    if node is None:
        raise DDKitError(f"config: empty (no options in it), got {path!r}")
    if not isinstance(node, yaml.MappingNode):
        raise DDKitError(f"config: must be a mapping of options (key: value lines), got {path!r}")
    _check_node_count(node, "config", path)


def _check_node_count(node: yaml.Node | None, field: str, shown: str) -> None:
    """Refuse a YAML node tree whose aliases expand to more than MAX_YAML_NODES nodes (or refer to themselves).

    Counted on the composed tree, where an alias is the anchored node object itself: each distinct node's
    expanded size is computed once (memoised), so counting costs as much as the text, whatever it expands to.
    """
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(n: yaml.Node) -> int:
        key = id(n)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise DDKitError(f"{field}: YAML alias refers to itself, got {shown[:200]!r}")
        open_nodes.add(key)
        if isinstance(n, yaml.SequenceNode):
            children = n.value
        elif isinstance(n, yaml.MappingNode):
            children = [part for pair in n.value for part in pair]
        else:
            children = []
        total = 1 + sum(size(c) for c in children)
        open_nodes.discard(key)
        sizes[key] = total
        return total

    if node is None:
        return
    try:
        total = size(node)
    except RecursionError:
        raise DDKitError(f"{field}: YAML nested too deeply, got {shown[:200]!r}") from None
    if total > MAX_YAML_NODES:
        raise DDKitError(f"{field}: YAML aliases expand to {total:,} nodes, more than the limit of "
                         f"{MAX_YAML_NODES:,} (an alias bomb?), got {shown[:200]!r}")


# ------------------------------------------------------------------------------------------------ Trainer options

# Trainer counts: (option, smallest value). Lightning takes -1 as "no limit" for max_epochs and max_steps.
TRAINER_COUNTS = (("max_epochs", -1), ("max_steps", -1), ("min_epochs", 0), ("min_steps", 0), ("num_nodes", 1),
                  ("accumulate_grad_batches", 1), ("check_val_every_n_epoch", 1))
CHECKPOINT_COUNTS = (("every_n_epochs", 0), ("every_n_train_steps", 0), ("save_top_k", -1))


def check_run_options(config: Any) -> None:
    """``seed_everything``, ``trainer.*``, ``checkpoint.*`` and ``model.net_kwargs`` of one subcommand's parsed
    config (a Namespace)."""
    seed = config.get("seed_everything")
    if seed is not None and not isinstance(seed, bool):  # true: draw a seed, false: do not seed
        check_int(seed, "seed_everything", 0, 2**32 - 1)
    trainer = config.get("trainer") or {}
    for key, low in TRAINER_COUNTS:
        if trainer.get(key) is not None:
            check_int(trainer.get(key), f"trainer.{key}", low)
    checkpoint = config.get("checkpoint") or {}
    for key, low in CHECKPOINT_COUNTS:
        if checkpoint.get(key) is not None:
            check_int(checkpoint.get(key), f"checkpoint.{key}", low)
    model = config.get("model") or {}
    net_kwargs = (model.get("init_args") or {}).get("net_kwargs") if hasattr(model, "get") else None
    for key in ("num_classes", "in_chans", "image_size"):
        if isinstance(net_kwargs, dict) and key in net_kwargs:  # build_net takes these from the data
            raise DDKitError(f"model.net_kwargs.{key}: set by the data (the dataset or data.{key}), not by "
                             f"net_kwargs, got {net_kwargs[key]!r}")
    accelerator = trainer.get("accelerator", "auto")
    if isinstance(accelerator, str):
        _check_accelerator(accelerator)
        _check_devices(trainer.get("devices", "auto"), on_cpu=accelerator == "cpu" or not _gpu_available())


def _gpu_available() -> bool:
    import torch

    return torch.cuda.is_available() or torch.backends.mps.is_available()


def _check_accelerator(name: str) -> None:
    """An accelerator this machine has (``auto`` always is): Lightning would fail later with a traceback."""
    from lightning.pytorch.accelerators import AcceleratorRegistry

    if name == "gpu":
        available = _gpu_available()
    elif name in AcceleratorRegistry:
        available = AcceleratorRegistry[name]["accelerator"].is_available()
    else:
        available = name == "auto"
        if not available:
            raise DDKitError(f"trainer.accelerator: must be auto, gpu or one of {', '.join(AcceleratorRegistry)}, "
                             f"got {name!r}")
    if not available:
        raise DDKitError(f"trainer.accelerator: not available on this machine (use auto or cpu), got {name!r}")


def _check_devices(devices: Any, on_cpu: bool) -> None:
    """A positive count, ``auto``; on GPUs also -1 (all) or a list of device indices (as ints or "0,1")."""
    value = devices
    if isinstance(value, str) and value != "auto":
        parts = value.split(",")
        try:
            value = [int(p) for p in parts if p.strip()] if len(parts) > 1 else int(value)
        except ValueError:
            pass
    ok = value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)
    if not on_cpu:
        ok = ok or value == -1 or (isinstance(value, list) and bool(value)
                                   and all(isinstance(d, int) and d >= 0 for d in value))
    if not ok:
        kinds = ("a number of CPU processes >= 1 or auto" if on_cpu
                 else "a number >= 1, -1 (all), auto or a list of device indices")
        raise DDKitError(f"trainer.devices: must be {kinds}, got {devices!r}")
