"""``ddkit chain METHOD``: a method's whole chain of ``ddkit`` stages in one command, with the artifact cache.

The stage table is :func:`ddkit.pipelines.build_plan`'s (the one ``make demo`` and benchmarks/quality_fmnist.py run)
restricted to one method and one IPC: e.g. for ``sre2l`` the supervised teacher (squeeze), recover, relabel, then
``ddkit evaluate`` of the set under the method's own protocol. Each stage is printed as it starts; a stage whose
outputs exist and whose stamp matches its command, configs and inputs is skipped, so a second call with nothing
changed takes seconds. Artifacts go to ``--root``; TensorBoard runs, the evaluation's included, to ``--log_dir``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from jsonargparse import ArgumentParser

from ddkit.errors import DDKitError

METHODS = ("sre2l", "scdd", "mtt", "datm", "random")
# Smoke-test budgets: every stage runs, in seconds on digits; the numbers mean nothing.
SMOKE_EXTRA: dict[str, tuple[str, ...]] = {
    "teacher": ("--trainer.max_epochs", "1"),
    "pretrain": ("--trainer.max_epochs", "1"),
    "probe": ("--trainer.max_epochs", "1"),
    "recover": ("--model.init_args.iterations", "5"),
    "relabel": ("--trainer.max_epochs", "2"),
    "distill": ("--trainer.max_steps", "5"),
}
BUDGETS = ("config", "demo", "smoke")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="ddkit chain", exit_on_error=False, description=(
        "Run a method's whole chain (e.g. sre2l: squeeze -> recover -> relabel -> evaluate) with an artifact cache: "
        "unchanged stages are skipped. Example: ddkit chain sre2l --data digits --ipc 10"))
    parser.add_argument("method", type=str, help=f"one of {', '.join(METHODS)}")
    parser.add_argument("--data", type=str, default="digits", help="dataset; its configs are configs/<data>/")
    parser.add_argument("--ipc", type=int, default=10, help="images per class")
    parser.add_argument("--root", type=str | None, default=None,
                        help="folder of every artifact, stamp and report (default: runs/chains/<data>)")
    parser.add_argument("--log_dir", type=str, default="runs", help="TensorBoard folder of every stage")
    parser.add_argument("--budget", type=str, default="config", help=(
        "config: the configs' own epochs / iterations and the protocols' own epochs; demo: make demo's reduced "
        "budgets; smoke: a few steps per stage, to check that the chain runs"))
    parser.add_argument("--seeds", type=int, default=3, help="evaluation networks (mean ± std over them)")
    parser.add_argument("--force", type=list[str], default=[], help="stage name patterns to rerun, e.g. '[sre2l_*]'")
    parser.add_argument("--dry_run", type=bool, default=False, help="list the stages and their cache state only")
    return parser


def config_dir(dataset: str) -> str:
    """``configs`` in the working directory when it has the dataset's configs, else the package checkout's."""
    here = Path("configs")
    if (here / dataset).is_dir():
        return str(here)
    return str(Path(__file__).resolve().parents[1] / "configs")


def chain_plan(method: str, dataset: str, ipc: int, root: str | None, log_dir: str, budget: str, seeds: int):
    """The :class:`ddkit.pipelines.Plan` of one method's chain.

    Raises:
        DDKitError: for an unknown method or budget, or a dataset without configs.
    """
    from ddkit.demo import DEMO_EXTRA
    from ddkit.pipelines import KD_RECIPES, Plan

    if method not in METHODS:
        raise DDKitError(f"method: must be one of {', '.join(METHODS)}, got {method!r}")
    if budget not in BUDGETS:
        raise DDKitError(f"budget: must be one of {', '.join(BUDGETS)}, got {budget!r}")
    configs = config_dir(dataset)
    if not (Path(configs) / dataset).is_dir():
        raise DDKitError(f"data: no configs/{dataset}/ folder of stage configs, got {dataset!r}")
    extra = {"config": {}, "demo": DEMO_EXTRA, "smoke": SMOKE_EXTRA}[budget]
    eval_epochs = {"config": None, "demo": 100, "smoke": 2}[budget]
    return Plan(dataset=dataset, root=root or f"runs/chains/{dataset}", methods=(method,), ipcs=(ipc,), full=False,
                own_protocol_only=True, seeds=seeds, eval_epochs=eval_epochs, kd_options=KD_RECIPES.get(dataset, {}),
                extra=extra, config_dir=configs, log_dir=log_dir)


def chain_cli(args: list[str]) -> None:
    """Parse ``args`` and run the chain; end with where the set, the report and the logs are.

    Exits with code 1 when a stage failed (its own error is printed above the summary).
    """
    from ddkit.pipelines import build_plan, dry_run, is_cached, run_in_process, run_stages

    cfg = build_parser().parse_args(args)
    plan = chain_plan(cfg.method, cfg.data, cfg.ipc, cfg.root, cfg.log_dir, cfg.budget, cfg.seeds)
    built = build_plan(plan)
    if cfg.dry_run:
        dry_run(built.stages)
        return
    results = run_stages(built.stages, plan.root, run_in_process, force=cfg.force)
    print()
    set_dir = built.sets.get((cfg.method, cfg.ipc))
    if set_dir is not None:
        print(f"set:    {set_dir}   (picture: {set_dir}/grid.png)")
    for (_, _, protocol), stage in built.cells.items():
        report = Path(stage.outputs[0]) / "report.json"
        if is_cached(stage) and report.is_file():
            r = json.loads(report.read_text())["results"][0]
            print(f"report: {stage.outputs[0]}/report.md   ({protocol} protocol: {100 * r['mean']:.1f} ± "
                  f"{100 * r['std']:.1f} % test accuracy over {len(r['accuracies'])} seeds)")
    print(f"logs:   tensorboard --logdir {plan.log_dir}")
    bad = [r for r in results if r.status in ("failed", "blocked")]
    for r in bad:
        print(f"{r.status}: {r.name}: {r.error}", file=sys.stderr)
    if bad:
        sys.exit(1)
