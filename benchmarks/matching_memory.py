"""Trajectory-matching step: time per outer step and peak memory against ``syn_steps``, for each gradient engine.

One fixed CPU problem, the `fmnist-cpu` shape (BENCHMARKS.md, evaluation settings): ConvNet-D3 width 32, instance norm, 1x28x28
inputs, 10 classes, IPC 10 (100 synthetic images), batch_syn 100, DATM soft labels, DSA on every inner step. Each
(engine, syn_steps) setting runs in a fresh subprocess that builds a one-expert ExpertBuffer (random trajectory: the
cost does not depend on the values), attaches ``TrajectoryMatching`` (noise init) and runs ``warmup + steps`` outer
steps exactly as ``training_step`` does them (sample the segment, ``segment_gradients``, ``combine``,
``apply_update``), without the Trainer. Peak memory is the process's ``ru_maxrss``; ``base`` is the RSS just before
the first step (interpreter, torch, data), so ``peak - base`` is what the matching step itself adds. Time is
measured both as wall time and as the process's CPU time (``time.process_time``, one torch thread): the machine is
shared, and CPU time is what the ratios between engines rest on. Settings run interleaved (for each syn_steps, the
three engines, in an order rotated per repeat), ``--repeats`` times; a setting's time is the median over repeats of
each run's mean step time, its peak the maximum.

    python benchmarks/matching_memory.py                    # writes benchmarks/results/matching_memory.{json,md}
    python benchmarks/matching_memory.py --syn_steps 10 20 --repeats 1 --steps 2   # quick look
    python benchmarks/matching_memory.py --pool benchmarks/results/matching_memory_runs/*.json  # earlier runs
    python benchmarks/matching_memory.py --problem cifar100-ipc10 --engines unroll --syn_steps 1 2 --steps 1 \
        --warmup 0 --repeats 1 --output benchmarks/results/matching_real_shapes/cifar100-ipc10_unroll.json
        # the shapes of a paper-scale DATM config (PROBLEMS below); no targets are checked for them

Engines: ``unroll``, ``tesla``, ``adjoint`` (TrajectoryMatching's default ``graph_window``: the last steps keep
their graphs), ``adjoint-w0`` (``graph_window: 0``, every step recomputed: the least memory) and
``adjoint-compiled`` (default window, ``compile_trajectory: true``: the graph-free first pass through
``torch.compile``; the compilation falls in the warm-up step, whose time is recorded as ``warmup_s``).

Targets (issue #7): adjoint peak at 80 steps <= 1.3x its peak at 10, while unroll's grows several-fold; adjoint time
per step <= 1.2x unroll's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
# `adjoint` runs with TrajectoryMatching's default graph_window; `adjoint-w0` recomputes every step (least memory);
# `adjoint-compiled` compiles the graph-free first pass.
VARIANTS = {"adjoint-w0": {"graph_window": 0}, "adjoint-compiled": {"compile_trajectory": True}}
ENGINES = ("unroll", "tesla", "adjoint", "adjoint-w0", "adjoint-compiled")
ADJOINTS = ("adjoint", "adjoint-w0", "adjoint-compiled")
# Issue #7: adjoint peak at the most steps / at the fewest, and adjoint time / unroll time.
PEAK_TARGET, TIME_TARGET = 1.3, 1.2
# The problems a run can measure: `fmnist-cpu` (the default, issue #7's) and the shapes of the paper-scale DATM configs
# configs/cifar10/datm/distill_ipc50.yaml and configs/cifar100/datm/distill_ipc10.yaml (ConvNet-D3 width 128, instance
# norm, 3x32x32; images and labels generated, the cost does not depend on their values).
PROBLEMS = {
    "fmnist-cpu": {"dataset": "fashion_mnist", "classes": 10, "chans": 1, "size": 28, "width": 32, "ipc": 10,
                   "batch_syn": 100},
    "cifar10-ipc50": {"dataset": "cifar10", "classes": 10, "chans": 3, "size": 32, "width": 128, "ipc": 50,
                      "batch_syn": 500},
    "cifar100-ipc10": {"dataset": "cifar100", "classes": 100, "chans": 3, "size": 32, "width": 128, "ipc": 10,
                       "batch_syn": 1000},
}


def describe(problem: str) -> str:
    p = PROBLEMS[problem]
    return (f"ConvNet-D3 width {p['width']} instance norm, {p['chans']}x{p['size']}x{p['size']}, {p['classes']} classes, "
            f"IPC {p['ipc']} ({p['ipc'] * p['classes']} images), batch_syn {p['batch_syn']}, DATM soft labels, DSA")


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(engine: str, syn_steps: int, steps: int, warmup: int, threads: int, problem: str = "fmnist-cpu") -> dict:
    """One setting in this (fresh) process; returns its measurements."""
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(REPO))
    from ddkit.datamodules.spec import DataSpec
    from ddkit.formats.buffer import BufferMeta, ExpertBuffer, save_expert, write_buffer_meta
    from ddkit.modules.matching import TrajectoryMatching, segment_generator
    from ddkit.nets import build_net
    from ddkit.ops.matching_grad import flatten_params

    p = PROBLEMS[problem]
    c, k = p["chans"], p["classes"]
    spec = DataSpec(p["dataset"], k, c, p["size"], (0.5,) * c, (0.25,) * c, class_names=tuple(map(str, range(k))))
    kwargs = {"depth": 3, "width": p["width"], "norm": "instance"}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        net = build_net("convnet", k, c, p["size"], **kwargs)
        write_buffer_meta(tmp, BufferMeta.for_net("convnet", kwargs, spec, net, 3))
        theta = flatten_params(net)
        g = torch.Generator().manual_seed(0)
        rows = [theta]
        for _ in range(3):
            rows.append(rows[-1] + 0.01 * torch.randn(theta.shape, generator=g))
        save_expert(tmp, 0, torch.stack(rows))
        data = SimpleNamespace(buffer=ExpertBuffer(tmp))
        m = TrajectoryMatching(spec, ipc=p["ipc"], syn_steps=syn_steps, expert_epochs=2, max_start_epoch=1,
                               sequential_generation=False, batch_syn=p["batch_syn"], threshold=None,
                               engine=engine.split("-")[0], **VARIANTS.get(engine, {}), pix_init="noise",
                               output=str(Path(tmp) / "out"), seed=0)
        m.attach(data)
        m.configure_optimizers()
        generator = segment_generator(0, 0)
        base = rss_bytes()
        times, cpu_times, losses, warmup_times = [], [], [], []
        for it in range(warmup + steps):
            start, start_cpu = time.perf_counter(), time.process_time()
            result = m.segment_gradients(m.sample_segment(generator, it))
            combined = m.combine(result)
            m.apply_update(combined["grads"], it)
            m.iteration = it + 1
            if it >= warmup:
                times.append(time.perf_counter() - start)
                cpu_times.append(time.process_time() - start_cpu)
            else:
                warmup_times.append(time.perf_counter() - start)
            losses.append(combined["loss"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    return {"engine": engine, "syn_steps": syn_steps, "step_s": statistics.mean(times), "step_times_s": times,
            "step_cpu_s": statistics.mean(cpu_times), "warmup_s": warmup_times,
            "base_bytes": base, "peak_bytes": peak, "losses": losses, "num_params": int(theta.numel())}


def run_child(engine: str, syn_steps: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", engine, str(syn_steps), "--steps", str(args.steps), "--warmup",
           str(args.warmup), "--threads", str(args.threads), "--problem", args.problem]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{engine} {syn_steps} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def gb(b: float) -> str:
    return f"{b / 2**30:.2f}"


def markdown(summary: dict) -> str:
    rows = summary["results"]
    lines = [
        "# Matching step: time and peak memory against syn_steps (CPU)",
        "",
        (f"Problem: {summary['problem']}. {summary['threads']} thread(s), {summary['steps']} timed steps after "
         f"{summary['warmup']} warm-up, median of {summary['repeats']} interleaved repeats; peak = ru_maxrss of a "
         f"fresh process, +step = peak - RSS before the first step. Machine: {summary['machine']}."),
        "",
        "| syn_steps | " + " | ".join(f"{e}: CPU s/step (wall) | {e}: peak GB (+step)" for e in ENGINES) + " |",
        "|---|" + "---|---|" * len(ENGINES),
    ]
    for n in summary["syn_steps"]:
        cells = []
        for e in ENGINES:
            r = rows.get(f"{e}/{n}")
            if r is None:
                cells += ["-", "-"]
            else:
                cells += [f"{r['step_cpu_s']:.2f} ({r['step_s']:.2f})",
                          f"{gb(r['peak_bytes'])} (+{gb(r['peak_bytes'] - r['base_bytes'])})"]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "Targets:"]
    for name, t in summary["targets"].items():
        lines.append(f"- {name}: {t['value']:.2f} (target {t['target']}) -> {'met' if t['met'] else 'NOT met'}")
    lines += ["", f"Command: `{summary['command']}`", ""]
    return "\n".join(lines)


def targets(rows: dict, syn_steps: list[int]) -> dict:
    out = {}
    lo, hi = min(syn_steps), max(syn_steps)
    for a in ADJOINTS:
        if f"{a}/{lo}" in rows and f"{a}/{hi}" in rows:
            a_lo, a_hi = rows[f"{a}/{lo}"], rows[f"{a}/{hi}"]
            out[f"{a} peak {hi} / peak {lo}"] = {"value": a_hi["peak_bytes"] / a_lo["peak_bytes"],
                                                 "target": f"<= {PEAK_TARGET}",
                                                 "met": a_hi["peak_bytes"] <= PEAK_TARGET * a_lo["peak_bytes"]}
    if f"unroll/{lo}" in rows and f"unroll/{hi}" in rows:
        u_lo, u_hi = rows[f"unroll/{lo}"], rows[f"unroll/{hi}"]
        growth = (u_hi["peak_bytes"] - u_hi["base_bytes"]) / max(1, u_lo["peak_bytes"] - u_lo["base_bytes"])
        out[f"unroll +step {hi} / +step {lo}"] = {"value": growth, "target": ">= 3 (grows several-fold)",
                                                  "met": growth >= 3}
    for a in ADJOINTS:
        for key, label in (("step_cpu_s", "CPU"), ("step_s", "wall")):
            worst = 0.0
            for n in syn_steps:
                if f"{a}/{n}" in rows and f"unroll/{n}" in rows:
                    worst = max(worst, rows[f"{a}/{n}"][key] / rows[f"unroll/{n}"][key])
            if worst:
                out[f"max over syn_steps of {a} / unroll {label} time per step"] = {
                    "value": worst, "target": f"<= {TIME_TARGET}", "met": worst <= TIME_TARGET}
    return out


def pooled(paths: list[str], syn_steps: int) -> str:
    """Markdown: adjoint / unroll CPU time at ``syn_steps`` per repeat of each earlier run (repeats are paired:
    within a repeat the engines run back to back), and the median over all of them."""
    lines = [f"adjoint / unroll CPU time per step at syn_steps {syn_steps}, per repeat", "",
             "| run | unroll s | adjoint s | ratio per repeat | ratio of medians |", "|---|---|---|---|---|"]
    ratios = []
    for path in paths:
        rows = json.loads(Path(path).read_text())["results"]
        unroll, adjoint = rows[f"unroll/{syn_steps}"], rows[f"adjoint/{syn_steps}"]
        pairs = list(zip(adjoint["step_cpu_s_runs"], unroll["step_cpu_s_runs"]))
        ratios += [a / u for a, u in pairs]
        lines.append(f"| {Path(path).name} | {' '.join(f'{u:.2f}' for _, u in pairs)} | "
                     f"{' '.join(f'{a:.2f}' for a, _ in pairs)} | {' '.join(f'{a / u:.2f}' for a, u in pairs)} | "
                     f"{adjoint['step_cpu_s'] / unroll['step_cpu_s']:.2f} |")
    within = sum(r <= TIME_TARGET for r in ratios)
    lines += ["", (f"All {len(ratios)} repeats: median ratio {statistics.median(ratios):.2f}, "
                   f"{within} of {len(ratios)} at most {TIME_TARGET}, range {min(ratios):.2f}-{max(ratios):.2f}.")]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--syn_steps", type=int, nargs="+", default=[10, 20, 40, 80])
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--steps", type=int, default=3, help="timed outer steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed outer steps first")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved sweeps")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--output", default=str(RESULTS / "matching_memory.json"))
    parser.add_argument("--problem", default="fmnist-cpu", choices=list(PROBLEMS),
                        help="the shapes (fmnist-cpu: issue #7's targets; the others: the DATM configs')")
    parser.add_argument("--pool", nargs="+", metavar="JSON",
                        help="run nothing: pool the adjoint/unroll ratios at the largest --syn_steps of these runs")
    parser.add_argument("--child", nargs=2, metavar=("ENGINE", "SYN_STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pool:
        print(pooled(args.pool, max(args.syn_steps)))
        return
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.steps, args.warmup, args.threads,
                               args.problem)))
        return

    import torch

    runs: dict[str, list[dict]] = {}
    for rep in range(args.repeats):
        for n in args.syn_steps:
            for e in args.engines[rep % len(args.engines):] + args.engines[: rep % len(args.engines)]:
                r = run_child(e, n, args)
                runs.setdefault(f"{e}/{n}", []).append(r)
                print(f"repeat {rep} {e:8s} syn_steps {n:3d}: {r['step_s']:.2f} s/step ({r['step_cpu_s']:.2f} s CPU), "
                      f"peak {gb(r['peak_bytes'])} GB "
                      f"(+{gb(r['peak_bytes'] - r['base_bytes'])})", flush=True)
    rows = {}
    for key, rs in runs.items():
        rows[key] = {"engine": rs[0]["engine"], "syn_steps": rs[0]["syn_steps"],
                     "step_s": statistics.median(r["step_s"] for r in rs),
                     "step_s_runs": [r["step_s"] for r in rs],
                     "step_cpu_s": statistics.median(r["step_cpu_s"] for r in rs),
                     "step_cpu_s_runs": [r["step_cpu_s"] for r in rs],
                     "peak_bytes": max(r["peak_bytes"] for r in rs),
                     "base_bytes": min(r["base_bytes"] for r in rs),
                     "first_loss": rs[0]["losses"][0], "warmup_s_runs": [r["warmup_s"] for r in rs],
                     "num_params": rs[0]["num_params"]}
    summary = {
        "problem": describe(args.problem), "problem_name": args.problem,
        "syn_steps": args.syn_steps, "engines": args.engines, "steps": args.steps, "warmup": args.warmup,
        "repeats": args.repeats, "threads": args.threads,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared), "
                   f"torch {torch.__version__}",
        "command": "python benchmarks/matching_memory.py " + " ".join(sys.argv[1:]),
        "results": rows,
    }
    summary["targets"] = targets(rows, args.syn_steps) if args.problem == "fmnist-cpu" else {}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO))
    from ddkit.formats.common import write_json

    write_json(out, summary)
    md = markdown(summary)
    out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
