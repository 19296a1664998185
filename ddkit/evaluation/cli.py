"""``ddkit evaluate``: a jsonargparse front end to :func:`ddkit.evaluation.evaluator.run_evaluation`."""

from __future__ import annotations

from jsonargparse import ActionConfigFile, ArgumentParser

from ddkit.datamodules.real import RealDataModule
from ddkit.evaluation.evaluator import run_evaluation
from ddkit.evaluation.report import markdown


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="ddkit evaluate", exit_on_error=False, description=(
        "Train fresh networks on distilled sets and baselines under named protocols (hard, soft, kd) and report "
        "mean ± std test accuracy. Example: ddkit evaluate --data.dataset fashion_mnist --baselines [random] "
        "--ipc 10 --protocols [hard] --seeds 3"))
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="YAML config with any of the options")
    parser.add_class_arguments(RealDataModule, "data")
    parser.add_function_arguments(run_evaluation, skip={"data"})
    return parser


def evaluate_cli(args: list[str]) -> dict:
    parser = build_parser()
    cfg = parser.parse_args(args)
    cfg.pop("config", None)
    init = parser.instantiate_classes(cfg)
    kwargs = {k: v for k, v in vars(init).items() if k != "data"}
    report = run_evaluation(data=init.data, **kwargs)
    print(markdown(report))
    return report
