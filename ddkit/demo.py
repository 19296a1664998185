"""``make demo``: every pipeline end to end on scikit-learn digits (embedded data) at IPC 10, then one results table.

The same stage table as benchmarks/quality_fmnist.py (:mod:`ddkit.pipelines`), on digits with fewer epochs / steps /
iterations (the reductions are the ``extra`` overrides below, printed with every command):

- full-data reference: ``configs/digits/classifier.yaml`` with the evaluation ConvNet;
- SRe2L: supervised BN teacher (``sre2l/squeeze``) -> recover -> relabel;
- SC-DD: MoCo v2 pretraining -> linear probe (the teacher) -> recover -> relabel;
- MTT and DATM: expert buffer -> trajectory matching;
- the random real subset;

then ``ddkit evaluate`` of every set under its own method's protocol (``--all-protocols``: under hard, soft and kd),
3 seeds each. Every stage is an ordinary ``ddkit`` command run in this process; artifacts, stamps and reports go to
``demo_out/``, every TensorBoard run (evaluations included) to ``demo_out/runs``, and a second run reuses whatever
is unchanged (``--force 'sre2l_*'`` reruns stages by name). ``--verbose`` shows Lightning's banners and warnings.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from ddkit.formats.common import atomic_file, write_json
from ddkit.pipelines import (
    KD_RECIPES,
    LABELS,
    OWN_PROTOCOL,
    Plan,
    build_plan,
    collect,
    cpu_seconds,
    dry_run,
    results_table,
    run_in_process,
    run_stages,
    run_subprocess,
    set_threads,
)

OUT = "demo_out"

# Reduced budgets for the demo (the configs' own values are for a standalone run of each stage).
DEMO_EXTRA: dict[str, tuple[str, ...]] = {
    "reference": ("--trainer.max_epochs", "10"),
    "teacher": ("--trainer.max_epochs", "10"),
    "pretrain": ("--trainer.max_epochs", "10"),
    "probe": ("--trainer.max_epochs", "10"),
    "recover": ("--model.init_args.iterations", "150"),
    "relabel": ("--trainer.max_epochs", "200"),  # with Mixup the KD student needs the epochs: 50 gave 13 %
    "distill": ("--trainer.max_steps", "100"),
}


def demo_plan(all_protocols: bool = False, root: str = OUT) -> Plan:
    """The digits plan of ``make demo``."""
    return Plan(dataset="digits", root=root, ipcs=(10,), own_protocol_only=not all_protocols, seeds=3,
                eval_net_kwargs={"depth": 3, "width": 32, "norm": "instance"}, eval_epochs=100,
                kd_options=KD_RECIPES["digits"], extra=DEMO_EXTRA, log_dir=f"{root}/runs")


def summary(doc: dict) -> str:
    """The table, the full-data reference and what each column means."""
    plan_protocols = ["hard", "soft", "kd"]
    lines = [f"Digits (8x8), IPC 10, test accuracy (%) mean ± std over {doc['seeds']} seeds; evaluation net "
             f"ConvNet-D3 {doc['eval_net']['net_kwargs']}, {doc['eval_epochs']} epochs per protocol. Bold: the "
             "method's own protocol (" + ", ".join(f"{LABELS[m]} {p}" for m, p in OWN_PROTOCOL.items()) + ").", ""]
    lines.append(results_table(doc, protocols=plan_protocols))
    full = doc.get("full_data") or {}
    if full.get("status") == "done":
        lines.append(f"Full data (configs/digits/classifier.yaml with the evaluation net, {full['epochs']} epochs, "
                     f"1 run): {100 * full['accuracy']:.1f} %.")
    for name, rec in doc["teachers"].items():
        split = "test split" if not rec["val_split"] else f"held-out {rec['val_split']} of the training set"
        lines.append(f"Teacher {name}: {100 * rec['val_acc']:.1f} % on the {split}.")
    for m, rec in doc["method_records"].items():
        for k, r in rec["relabel"].items():
            lines.append(f"{LABELS[m]} relabel stage (its config's KD recipe, 1 run) at IPC {k}: "
                         f"{100 * r['val_acc']:.1f} %.")
    lines.append("kd teachers: SRe2L/SC-DD sets their own; random and MTT the supervised SRe2L teacher; DATM "
                 "(ZCA-whitened) the same recipe trained on ZCA-whitened digits.")
    return "\n".join(lines) + "\n"


def run(argv: list[str] | None = None) -> int:
    """Run the demo; return 0 when every stage ran or was cached."""
    parser = argparse.ArgumentParser(prog="python -m ddkit.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--all-protocols", action="store_true", help="evaluate every set under hard, soft and kd")
    parser.add_argument("--force", nargs="*", default=[], help="fnmatch patterns of stage names to rerun")
    parser.add_argument("--subprocess", action="store_true", help="run each stage in a child process")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: digits-sized tensors gain nothing from more)")
    parser.add_argument("--root", default=OUT, help="output folder")
    parser.add_argument("--dry-run", action="store_true", help="list the stages and their cache state, run nothing")
    parser.add_argument("--verbose", action="store_true", help="keep Lightning's banners, seed lines and warnings")
    args = parser.parse_args(argv)
    if args.verbose:
        os.environ["DDKIT_VERBOSE"] = "1"  # read by every stage's ddkit.cli.main
    start, cpu0 = time.perf_counter(), cpu_seconds()
    set_threads(args.threads)
    plan = demo_plan(args.all_protocols, args.root)
    built = build_plan(plan)
    if args.dry_run:
        dry_run(built.stages)
        return 0
    results = run_stages(built.stages, plan.root, run_subprocess if args.subprocess else run_in_process,
                         force=args.force)
    doc = collect(built, plan, results)
    doc["total_wall_time_s"] = round(time.perf_counter() - start, 1)
    doc["total_cpu_s"] = round(cpu_seconds() - cpu0, 1)
    text = summary(doc)
    write_json(Path(plan.root) / "results.json", doc)
    with atomic_file(Path(plan.root) / "table.md") as tmp:
        tmp.write_text(text)
    print("\n" + text)
    print("Pictures of the distilled sets (one row per class):")
    for (m, k), path in built.sets.items():
        print(f"  {LABELS[m]}, IPC {k}: {path}/grid.png")
    print(f"demo wall time {doc['total_wall_time_s']:.0f} s, CPU time {doc['total_cpu_s']:.0f} s; "
          f"table: {plan.root}/table.md; TensorBoard (every stage and evaluation): tensorboard --logdir {plan.log_dir}")
    bad = [r for r in results if r.status in ("failed", "blocked")]
    for r in bad:
        print(f"{r.status}: {r.name}: {r.error}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(run())
