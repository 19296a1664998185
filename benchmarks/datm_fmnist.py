"""DATM and MTT on Fashion-MNIST at one IPC, `fmnist-cpu` setting: the end-to-end check of the matching family.

Runs the chains of :mod:`ddkit.pipelines` through the quality benchmark's stage cache (``runs/quality_fmnist``, the
same stages and commands as ``benchmarks/quality_fmnist.py``, so each is run once for both scripts):

- DATM: ``datm/buffer`` -> ``datm/distill_ipcK`` -> ``ddkit evaluate`` of its best set under ``soft`` (3 seeds);
- MTT: ``mtt/buffer`` -> ``mtt/distill_ipcK`` -> ``ddkit evaluate`` of its best set under ``hard``;
- the random real subset under ``soft`` and ``hard`` (a new subset per seed);

then tests every set the distillation's PeriodicEvaluation kept under ``<output>/snapshots/`` (iteration 0 is the
initialisation: for DATM the selected real images with their initial expert labels) under the method's protocol,
3 seeds each, for the curve of test accuracy against distillation iterations. The best set is chosen during
distillation on a validation split of the training set, never on the test split.

Writes benchmarks/results/matching_fmnist_ipcK.json (every figure, its command and wall times; the chain wall time is
buffer + distill + evaluation of the best set, from the stage stamps) and benchmarks/results/matching_fmnist_ipcK.png.

    python benchmarks/datm_fmnist.py                      # DATM and MTT at IPC 10
    python benchmarks/datm_fmnist.py --methods datm       # DATM only
    python benchmarks/datm_fmnist.py --table-only         # rewrite the JSON and plot from the cache
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from quality_fmnist import RESULTS, make_plan

from ddkit.formats.common import write_json
from ddkit.pipelines import OWN_PROTOCOL, Stage, build_plan, is_cached, made_in, run_stages, run_subprocess

# Issue 7's bars: DATM (soft) >= random (soft) + 6 and >= its initialisation + 2; MTT (hard) > random (hard).
DATM_OVER_RANDOM, DATM_OVER_INIT = 6.0, 2.0


def snapshot_stage(cell: Stage, snapshot: Path) -> Stage:
    """The evaluation ``cell`` (a best set under its protocol) with the set replaced by ``snapshot``."""
    argv = list(cell.argv)
    argv[argv.index("--distilled") + 1] = json.dumps([str(snapshot)])
    out = f"{cell.outputs[0]}_snapshots/{snapshot.name}"
    argv[argv.index("--output") + 1] = out
    return Stage(f"{cell.name}_{snapshot.name}", tuple(argv), (out,), (str(snapshot),), (), "evaluate", cell.method,
                 cell.ipc)


def report(stage: Stage) -> dict[str, Any] | None:
    """Mean, std (in %) and seeds of a cached evaluation stage, else None."""
    path = Path(stage.outputs[0]) / "report.json"
    if not (is_cached(stage) and path.is_file()):
        return None
    rep = json.loads(path.read_text())
    r = rep["results"][0]
    return {"mean": round(100 * r["mean"], 2), "std": round(100 * r["std"], 2),
            "accuracies": [round(100 * a, 2) for a in r["accuracies"]], "seeds": rep["seeds"],
            "wall_time_s": made_in(stage), "command": stage.command()}


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for m, rec in doc["methods"].items():
        pts = [(int(it), s) for it, s in rec["snapshots"].items() if s is not None]
        if not pts:
            continue
        pts.sort()
        xs, ys, es = [p[0] for p in pts], [p[1]["mean"] for p in pts], [p[1]["std"] for p in pts]
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=f"{m.upper()} ({rec['protocol']})")
        rnd = doc["random"].get(rec["protocol"])
        if rnd is not None:
            ax.axhline(rnd["mean"], ls="--", lw=1, color=ax.lines[-1].get_color(),
                       label=f"random real subset ({rec['protocol']})")
    ax.set_xlabel("distillation iterations")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Fashion-MNIST IPC {doc['ipc']}, ConvNet-D3 w32, 3 seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--methods", nargs="+", default=["datm", "mtt"], choices=["datm", "mtt"])
    parser.add_argument("--root", default="runs/quality_fmnist", help="the quality benchmark's stage cache")
    parser.add_argument("--table-only", action="store_true", help="run nothing; rewrite the outputs from the cache")
    args = parser.parse_args(argv)
    os.chdir(REPO)
    start = time.perf_counter()
    protocols = sorted({OWN_PROTOCOL[m] for m in args.methods})
    built = build_plan(make_plan("fmnist-cpu", ["random", *args.methods], [args.ipc], protocols, full=False,
                                 root=args.root))
    # Each distilled set under its own protocol only; the random subset under each of those protocols.
    wanted = {(m, args.ipc, OWN_PROTOCOL[m]) for m in args.methods} | {("random", args.ipc, p) for p in protocols}
    cells = {key: s for key, s in built.cells.items() if key in wanted}
    stages = [s for s in built.stages if s.kind != "evaluate" or s in cells.values()]
    failed = False
    if not args.table_only:
        failed |= any(r.status in ("failed", "blocked") for r in run_stages(stages, args.root, run_subprocess))
    snapshot_stages: dict[str, list[Stage]] = {}
    for m in args.methods:
        snap_dir = Path(built.sets[(m, args.ipc)]).parent / "snapshots"
        snaps = sorted(snap_dir.iterdir()) if snap_dir.is_dir() else []
        snapshot_stages[m] = [snapshot_stage(cells[(m, args.ipc, OWN_PROTOCOL[m])], s) for s in snaps]
    if not args.table_only:
        todo = [s for ss in snapshot_stages.values() for s in ss]
        failed |= any(r.status in ("failed", "blocked") for r in run_stages(todo, args.root, run_subprocess))

    by_name = {s.name: s for s in built.stages}
    doc: dict[str, Any] = {"benchmark": "matching_fmnist", "ipc": args.ipc, "setting": "fmnist-cpu",
                           "command": "python benchmarks/datm_fmnist.py " + " ".join(argv or sys.argv[1:]),
                           "random": {p: report(cells[("random", args.ipc, p)]) for p in protocols}, "methods": {}}
    for m in args.methods:
        chain = [by_name[f"{m}_buffer"], by_name[f"{m}_distill_ipc{args.ipc}"], cells[(m, args.ipc, OWN_PROTOCOL[m])]]
        walls, cpus = [made_in(s) for s in chain], [made_in(s, "cpu_s") for s in chain]
        snaps = {str(int(s.outputs[0].rsplit("iter_", 1)[1])): report(s) for s in snapshot_stages[m]}
        best = report(chain[-1])
        best_meta = Path(built.sets[(m, args.ipc)]) / "meta.json"
        rec = {"protocol": OWN_PROTOCOL[m], "best": best, "snapshots": snaps, "initial": snaps.get("0"),
               "best_iteration": (json.loads(best_meta.read_text()).get("extra", {}).get("iteration")
                                  if best_meta.is_file() else None),
               "chain_wall_time_s": round(sum(walls), 1) if all(w is not None for w in walls) else None,
               "chain_cpu_s": round(sum(cpus), 1) if all(c is not None for c in cpus) else None,
               "stage_wall_time_s": {s.name: w for s, w in zip(chain, walls)},
               "stage_cpu_s": {s.name: c for s, c in zip(chain, cpus)},
               "chain_commands": [s.command() for s in chain]}
        rnd = doc["random"][OWN_PROTOCOL[m]]
        checks = {}
        if best and rnd:
            checks["over_random"] = round(best["mean"] - rnd["mean"], 2)
        if best and rec["initial"]:
            checks["over_initial"] = round(best["mean"] - rec["initial"]["mean"], 2)
        if m == "datm":
            checks["over_random_met"] = checks.get("over_random", -1e9) >= DATM_OVER_RANDOM
            checks["over_initial_met"] = checks.get("over_initial", -1e9) >= DATM_OVER_INIT
        else:
            checks["over_random_met"] = checks.get("over_random", -1e9) > 0
        checks["chain_wall_within_90_min"] = (rec["chain_wall_time_s"] or 1e9) <= 90 * 60
        rec["checks"] = checks
        doc["methods"][m] = rec
    doc["session_wall_time_s"] = round(time.perf_counter() - start, 1)
    out = RESULTS / f"matching_fmnist_ipc{args.ipc}"
    write_json(out.with_suffix(".json"), doc)
    plot(doc, out.with_suffix(".png"))
    for m, rec in doc["methods"].items():
        best, initial = (f"{r['mean']} ± {r['std']}" if r else "not run" for r in (rec["best"], rec["initial"]))
        print(f"{m} ({rec['protocol']}): best {best}, initial {initial}; chain wall {rec['chain_wall_time_s']} s, "
              f"CPU {rec['chain_cpu_s']} s; checks {rec['checks']}")
    print("random: " + ", ".join(f"{p} {r['mean']} ± {r['std']}" if r else f"{p} not run"
                                 for p, r in doc["random"].items()))
    print(f"wrote {out.with_suffix('.json')}, {out.with_suffix('.png')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
