"""Quality on real data: Fashion-MNIST, every method at IPC 1 / 10 / 50 under every protocol, 3 seeds, on CPU.

Runs the stage table of :mod:`ddkit.pipelines` on Fashion-MNIST (the configs under configs/fashion_mnist/ as they
are, plus the path overrides the driver prints with every command):

- full data: ``configs/fashion_mnist/classifier.yaml`` with the setting's evaluation net (1 run);
- random real subset: ``ddkit evaluate --baselines [random]`` (a new subset per seed);
- SRe2L: ``sre2l/squeeze`` (supervised BN ConvNet-D3 width 32) -> ``sre2l/recover_ipc10`` (``--model.init_args.ipc
  K``) -> ``sre2l/relabel_ipc10`` (stored soft labels, 1 run, reported beside the table);
- SC-DD: ``scdd/pretrain_mocov2`` -> ``scdd/probe`` -> recover (``scdd/recover_ipc10`` if present, else SRe2L's
  config from the SSL teacher) -> ``scdd/relabel_ipc10``;
- MTT / DATM: ``{mtt,datm}/buffer`` -> ``{mtt,datm}/distill_ipc{1,10,50}``;

then ``ddkit evaluate`` of every set under ``hard``, ``soft`` and ``kd`` (one call per cell, 3 seeds). The ``kd``
teacher is each family's own for SRe2L / SC-DD sets and the supervised SRe2L teacher for random and MTT sets (for
DATM's ZCA-whitened sets: the same recipe trained on ZCA-whitened data). Artifacts and per-stage stamps go to
``runs/quality_fmnist/``; a rerun redoes only stages whose command, config or inputs changed.

Writes benchmarks/results/quality_fmnist.json (every cell with its protocol record, seeds, wall times and command;
cells without a cached run are ``not run``), benchmarks/results/quality_fmnist.png, the quality section of
BENCHMARKS.md, its section on the other benchmarks' results, and the headline rows in README.md.

    python benchmarks/quality_fmnist.py                         # everything (many CPU hours)
    python benchmarks/quality_fmnist.py --ipc 1 10              # a subset; other cells are kept from the cache
    python benchmarks/quality_fmnist.py --methods random datm --protocols soft
    python benchmarks/quality_fmnist.py --dry-run               # the stage table with its cache state
    python benchmarks/quality_fmnist.py --table-only            # regenerate the JSON, plot and tables from the cache
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ddkit.errors import DDKitError
from ddkit.formats.common import atomic_file, write_json
from ddkit.pipelines import (
    KD_RECIPES,
    LABELS,
    METHODS,
    OWN_PROTOCOL,
    PROTOCOLS,
    Plan,
    build_plan,
    collect,
    dry_run,
    fmt_cell,
    replace_section,
    results_table,
    run_in_process,
    run_stages,
    run_subprocess,
)

RESULTS = REPO / "benchmarks" / "results"
IPCS = (1, 10, 50)
# DC / DSA papers, Fashion-MNIST, ConvNet-D3 width 128, `hard`-style evaluation (BENCHMARKS.md, evaluation settings).
ANCHORS: dict[str, dict[int, float]] = {
    "random (DC/DSA papers)": {1: 51.4, 10: 73.8, 50: 82.5},
    "DC (paper)": {1: 70.5, 10: 82.3, 50: 83.6},
    "DSA (paper)": {1: 70.6, 10: 84.6, 50: 88.7},
}
FULL_ANCHOR = 93.5
# The evaluation settings of BENCHMARKS.md.
SETTINGS: dict[str, dict[str, Any]] = {
    "fmnist-cpu": {"net_kwargs": {"depth": 3, "width": 32, "norm": "instance"}, "epochs": 300,
                   "text": "`fmnist-cpu`: ConvNet-D3 width 32, instance norm, 300 epochs under every protocol"},
    "fmnist-paper": {"net_kwargs": {"depth": 3, "width": 128, "norm": "instance"}, "epochs": None,
                     "text": "`fmnist-paper`: ConvNet-D3 width 128, instance norm, each protocol's own epochs "
                             "(hard 300, soft 1000, kd 300)"},
}
# The kd protocol takes the Fashion-MNIST relabel configs' recipe (configs/fashion_mnist/{sre2l,scdd}/relabel_ipc10):
# T 30, Mixup, RandomCrop(pad 4) + flip, AdamW lr 5e-3 / wd 0.01, batch 32, per-epoch cosine.
KD_OPTIONS = KD_RECIPES["fashion_mnist"]


def make_plan(setting: str, methods=METHODS, ipcs=IPCS, protocols=PROTOCOLS, full: bool = True,
              root: str = "runs/quality_fmnist", seeds: int = 3, progress_bars: bool = False) -> Plan:
    """The Fashion-MNIST plan for an evaluation setting (a subset of methods / IPCs / protocols)."""
    if setting not in SETTINGS:
        raise DDKitError(f"setting: must be one of {', '.join(SETTINGS)}, got {setting!r}")
    s = SETTINGS[setting]
    return Plan(dataset="fashion_mnist", root=root, methods=tuple(methods), ipcs=tuple(ipcs),
                protocols=tuple(protocols), full=full, seeds=seeds, eval_net_kwargs=s["net_kwargs"],
                eval_epochs=s["epochs"], kd_options=KD_OPTIONS, eval_dir=f"eval_{setting}",
                progress_bars=progress_bars)


# ---------------------------------------------------------------------------------------------------------------
# Goals of issue #4 (reported against, never assumed)
# ---------------------------------------------------------------------------------------------------------------


def goals(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each ``met`` / ``not met`` / ``not run`` from the measured cells."""
    index = {(c["method"], c["ipc"], c["protocol"]): c for c in doc["cells"]}
    out = []
    for k, target in ((10, ANCHORS["DSA (paper)"][10]), (50, ANCHORS["DSA (paper)"][50])):
        c = index.get(("datm", k, "soft"))
        done = c is not None and c["status"] == "done"
        out.append({"goal": f"DATM at IPC {k} (soft, its protocol) above DSA's {target}",
                    "value": round(100 * c["mean"], 2) if done else None,
                    "status": ("met" if 100 * c["mean"] > target else "not met") if done else "not run"})
    for k in doc["ipcs"]:
        a, b = index.get(("scdd", k, "kd")), index.get(("sre2l", k, "kd"))
        done = a is not None and b is not None and a["status"] == b["status"] == "done"
        out.append({"goal": f"SC-DD above SRe2L under kd at IPC {k}",
                    "value": [round(100 * a["mean"], 2), round(100 * b["mean"], 2)] if done else None,
                    "status": ("met" if a["mean"] > b["mean"] else "not met") if done else "not run"})
    return out


# ---------------------------------------------------------------------------------------------------------------
# Writers: JSON, plot, BENCHMARKS.md sections, README headline rows
# ---------------------------------------------------------------------------------------------------------------


def plot(doc: dict[str, Any], path: Path) -> None:
    """Accuracy against IPC, one panel per protocol, one line per method (mean ± std over seeds); the published
    anchors (hard protocol, width 128) dashed in the hard panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protocols = doc["protocols"]
    fig, axes = plt.subplots(1, len(protocols), figsize=(5 * len(protocols), 4.2), sharey=True)
    index = {(c["method"], c["ipc"], c["protocol"]): c for c in doc["cells"]}
    measured = 0
    for ax, p in zip(axes, protocols):
        for m in doc["methods"]:
            pts = [(k, index[(m, k, p)]) for k in doc["ipcs"] if index.get((m, k, p), {}).get("status") == "done"]
            if not pts:
                continue
            measured += len(pts)
            xs = [k for k, _ in pts]
            ax.errorbar(xs, [100 * c["mean"] for _, c in pts], yerr=[100 * c["std"] for _, c in pts], marker="o",
                        capsize=3, label=LABELS[m] + (" (own)" if OWN_PROTOCOL[m] == p else ""))
        if p == "hard":
            for (name, vals), style in zip(ANCHORS.items(), (":", "-.", "--")):
                ks = sorted(vals)
                ax.plot(ks, [vals[k] for k in ks], linestyle=style, color="grey", marker=".", label=name)
        ax.axhline(FULL_ANCHOR, color="black", linestyle=":", linewidth=1)
        full = doc.get("full_data") or {}
        if full.get("status") == "done":
            ax.axhline(100 * full["accuracy"], color="black", linewidth=1, label="full data (ddkit)")
        ax.set_xscale("log")
        ax.set_xticks(doc["ipcs"], [str(k) for k in doc["ipcs"]])
        ax.set_xlabel("images per class")
        ax.set_title(f"protocol {p}")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower right")
    axes[0].set_ylabel("test accuracy (%)")
    note = "" if measured else " — no ddkit cell measured yet (only the published anchors)"
    fig.suptitle(f"Fashion-MNIST, {doc['setting']}; dotted: full data 93.5 (paper){note}", fontsize=10)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _time(seconds: float | None, cpu: float | None = None) -> str:
    if seconds is None:
        return "not run"
    return f"{seconds:.0f} s" + ("" if cpu is None else f" ({cpu:.0f} s)")


def quality_section(doc: dict[str, Any]) -> str:
    """The generated quality section of BENCHMARKS.md."""
    s = SETTINGS[doc["setting"]]
    lines = [
        f"Fashion-MNIST, CPU. Evaluation {s['text']}, {doc['seeds']} seeds; test accuracy (%), mean ± std over the "
        "seeds. Every cell is one `ddkit evaluate` call made by the script (its command is in the JSON). **Bold**: "
        "the method's own protocol (" + ", ".join(f"{LABELS[m]} `{p}`" for m, p in OWN_PROTOCOL.items()) + "). "
        "`not run`: no cached run of that cell; nothing is filled in by hand.",
        "",
        results_table(doc, anchors=ANCHORS),
    ]
    full = doc.get("full_data") or {}
    if full.get("status") == "done":
        lines.append(f"Full data (`configs/fashion_mnist/classifier.yaml` with the evaluation net, ConvNet-D3 width "
                     f"{s['net_kwargs']['width']}, {full['epochs']} epochs, 1 run, {full['wall_time_s']:.0f} s): "
                     f"**{100 * full['accuracy']:.2f}** (papers, width 128: {FULL_ANCHOR}).")
    else:
        lines.append(f"Full data (`configs/fashion_mnist/classifier.yaml`): {full.get('status', 'not run')} "
                     f"(papers: {FULL_ANCHOR}).")
    lines += ["", "Notes:",
              ("- Published rows: DC / DSA papers, ConvNet-D3 width 128, their `hard`-style evaluation; they sit in the "
               "`hard` columns and are not ddkit runs."),
              ("- `kd` teacher: SRe2L and SC-DD sets are taught by their own teacher (supervised squeeze; MoCo v2 + "
               "linear probe); random and MTT sets by the supervised SRe2L teacher; DATM sets (ZCA-whitened, like "
               "its buffer) by the same SRe2L recipe trained on ZCA-whitened data (`sre2l_teacher_zca`). "
               f"kd recipe (the relabel configs'): {json.dumps(doc['kd_options'])}."),
              ("- `soft` on a set without learned labels trains on one-hot targets at the learned step size when "
               "the set has one (MTT), else at lr 0.01."),
              ("- Distill wall (CPU): wall time and user + sys CPU time (all threads) of the IPC-specific stage "
               "(recover, or trajectory matching with its periodic evaluation), from the stamps; shared stages "
               "(teachers, SSL pretraining, buffers) are listed below. The machine's load average is recorded in "
               "the JSON; on a shared machine the wall times are upper bounds and the CPU times the better guide."),
              ""]
    shared: dict[str, Any] = dict(doc.get("shared_stages", {}))
    for rec in doc["method_records"].values():
        shared.update(rec["shared_stages"])
    if shared:
        lines.append("Shared stages, wall (CPU): " + "; ".join(
            f"`{n}` {_time(v['wall_time_s'], v.get('cpu_s'))}" for n, v in shared.items()) + ".")
    for name, rec in doc["teachers"].items():
        split = "test split" if not rec["val_split"] else f"held-out {int(rec['val_split'])} training images"
        lines.append(f"Teacher `{name}`: {100 * rec['val_acc']:.2f} % on the {split}.")
    for m, rec in doc["method_records"].items():
        for k, r in rec["relabel"].items():
            lines.append(f"{LABELS[m]} relabel stage (its config, 1 run) at IPC {k}: {100 * r['val_acc']:.2f} %.")
    lines += ["", "Goals (issue #4):"]
    for g in doc["goals"]:
        lines.append(f"- {g['goal']}: {g['status']}" + (f" ({g['value']})" if g["value"] is not None else ""))
    lines += ["", "![accuracy against IPC](benchmarks/results/quality_fmnist.png)", "",
              (f"Reproduce: `{doc['command']}` (the table: `python benchmarks/quality_fmnist.py`; any subset with "
               "`--ipc`, `--methods`, `--protocols`; `--table-only` regenerates this section, the JSON and the plot "
               "from the cache). "
               f"Session wall time {doc['session_wall_time_s']:.0f} s; recorded wall (CPU) time of every stage "
               f"behind the table {doc['stages_wall_time_s']:.0f} s ({doc.get('stages_cpu_s', 0):.0f} s).")]
    return "\n".join(lines) + "\n"


def headline(doc: dict[str, Any]) -> str:
    """README rows: each method under its own protocol at every IPC, the anchors, the full-data reference."""
    index = {(c["method"], c["ipc"], c["protocol"]): c for c in doc["cells"]}
    s = SETTINGS[doc["setting"]]
    intro = (f"Fashion-MNIST, CPU, evaluation {s['text']}, {doc['seeds']} seeds, test accuracy (%). Each ddkit row "
             "uses the protocol named in its second column; the published rows use the DC/DSA papers' hard-label "
             "evaluation with ConvNet-D3 width 128. `not run`: not measured yet.")
    lines = [intro, "",
             "| method | protocol | " + " | ".join(f"IPC {k}" for k in doc["ipcs"]) + " |",
             "|---|---|" + "---|" * len(doc["ipcs"])]
    for m in doc["methods"]:
        p = OWN_PROTOCOL[m]
        lines.append(f"| {LABELS[m]} (ddkit) | `{p}` | "
                     + " | ".join(fmt_cell(index.get((m, k, p))) for k in doc["ipcs"]) + " |")
    for name, vals in ANCHORS.items():
        lines.append(f"| {name} | hard, width 128 | " + " | ".join(f"{vals[k]}" for k in doc["ipcs"]) + " |")
    full = doc.get("full_data") or {}
    ours = f"{100 * full['accuracy']:.2f}" if full.get("status") == "done" else "not run"
    lines += ["", (f"Full data: ddkit {ours} (`configs/fashion_mnist/classifier.yaml`, width {s['net_kwargs']['width']}); "
                   f"papers {FULL_ANCHOR} (width 128)."),
              "", "![accuracy against IPC](benchmarks/results/quality_fmnist.png)", "",
              ("Regenerate: `python benchmarks/quality_fmnist.py`. Every protocol for every set, wall times and goals: "
               "[BENCHMARKS.md](BENCHMARKS.md).")]
    return "\n".join(lines) + "\n"


def committed(results: Path) -> set[str]:
    """Names of the files in ``results`` that git tracks (all present files when git cannot tell)."""
    try:
        out = subprocess.run(["git", "ls-files", "--", "."], cwd=results, capture_output=True, text=True, check=True)
        return {Path(line).name for line in out.stdout.splitlines()}
    except (OSError, subprocess.CalledProcessError):
        return {p.name for p in results.glob("*")}


KNOWN = {"quality_fmnist.json", "recover_speed.json", "matching_memory.json", "ssl_bn_spread.json"}


def added_by(path: Path) -> str:
    """The subject of the commit that added ``path`` (it names the command), or ``?``."""
    try:
        out = subprocess.run(["git", "log", "--diff-filter=A", "--format=%s", "-1", "--", path.name], cwd=path.parent,
                             capture_output=True, text=True, check=True)
        return out.stdout.strip().replace("|", "/") or "?"
    except (OSError, subprocess.CalledProcessError):
        return "?"


def others_section(results: Path) -> str:
    """Links to the other benchmarks' committed results, quoting only numbers that are in those files."""
    tracked = committed(results)
    lines: list[str] = []

    def load(name: str) -> dict | None:
        p = results / name
        return json.loads(p.read_text()) if name in tracked and p.is_file() else None

    rec = load("recover_speed.json")
    lines.append("### Recover step time against a plain PyTorch loop, `benchmarks/recover_speed.py`")
    lines.append("")
    if rec:
        lines.append(f"[recover_speed.json](benchmarks/results/recover_speed.json), command `{rec['command']}`, "
                     f"target {rec.get('target')}.")
        lines += ["", ("| setting | ddkit CPU ms/step (median) | plain CPU ms/step (median) | ratio (CPU time) | "
                       "ratio, no logger / progress bar | ratio (wall time) | command |"), "|---|---|---|---|---|---|---|"]
        for name, r in rec["results"].items():
            cells = [r.get(k, "not measured") for k in ("median_ddkit_ms", "median_plain_ms", "median_ratio",
                                                         "median_quiet_ratio", "median_wall_ratio")]
            lines.append(f"| {name} | {' | '.join(map(str, cells))} | `{r.get('command', rec['command'])}` |")
        if rec.get("note"):
            lines += ["", rec["note"]]
    else:
        lines.append("No committed results yet (`benchmarks/results/recover_speed.json`).")
    mem = load("matching_memory.json")
    lines += ["", "### Matching step time and peak memory against syn_steps, `benchmarks/matching_memory.py`", ""]
    if mem:
        lines.append(f"[matching_memory.json](benchmarks/results/matching_memory.json), command `{mem['command']}`; "
                     f"{mem.get('problem', '')}; {mem.get('machine', '')}.")
        lines += ["", "| engine | syn_steps | CPU s/step | wall s/step | peak RSS (GB) | base RSS (GB) |",
                  "|---|---|---|---|---|---|"]
        for r in sorted(mem["results"].values(), key=lambda r: (r["engine"], r["syn_steps"])):
            cpu = f"{r['step_cpu_s']:.2f}" if "step_cpu_s" in r else "—"
            lines.append(f"| {r['engine']} | {r['syn_steps']} | {cpu} | {r['step_s']:.2f} | "
                         f"{r['peak_bytes'] / 1e9:.2f} | {r['base_bytes'] / 1e9:.2f} |")
        lines.append("")
        for name, t in mem.get("targets", {}).items():
            lines.append(f"- {name}: {t['value']:.2f} (target {t['target']}): {'met' if t['met'] else 'not met'}")
        runs = sorted(str(p) for p in (results / "matching_memory_runs").glob("*.json") if p.name in tracked)
        if runs:
            from matching_memory import pooled

            pool = "python benchmarks/matching_memory.py --pool benchmarks/results/matching_memory_runs/*.json"
            lines += ["", f"Every committed run (`benchmarks/results/matching_memory_runs/`, command in each file; `{pool}`):",
                      "", pooled(runs, 80)]
    else:
        lines.append("No committed results yet (`benchmarks/results/matching_memory.json`).")
    lines += ["", "### SSL squeeze on Fashion-MNIST, `benchmarks/ssl_fmnist.py`", ""]
    ssl = sorted(p for p in results.glob("ssl_fmnist_*.json") if p.name in tracked)
    if ssl:
        head = ("| method | linear probe lr 30, SSL / random init (%) | kNN-20 pooled weighted, SSL / random (%) "
                "| pretraining | command |")
        lines += [head, "|---|---|---|---|---|"]
        for p in ssl:
            r = json.loads(p.read_text())
            lines.append(
                f"| [{r['method']}](benchmarks/results/{p.name}) | {r['ssl']['probe_flat_lr30']} / "
                f"{r['random']['probe_flat_lr30']} | {r['ssl']['knn20_pooled_weighted_t0.1']} / "
                f"{r['random']['knn20_pooled_weighted_t0.1']} | {r.get('pretrain_steps_done')} steps, "
                f"{r.get('pretrain_seconds')} s | `{r['command']}` |")
    else:
        lines.append("No committed results yet (`benchmarks/results/ssl_fmnist_*.json`).")
    lines += ["", "### DATM / MTT on Fashion-MNIST against iterations, `benchmarks/datm_fmnist.py`", ""]
    matching = sorted(p for p in results.glob("matching_fmnist_ipc*.json") if p.name in tracked)
    if matching:
        lines += ["| file | method | protocol | initial set | best set | random subset | chain wall (CPU) min |",
                  "|---|---|---|---|---|---|---|"]
        for p in matching:
            doc = json.loads(p.read_text())
            for m, rec in doc["methods"].items():
                cells = [rec["initial"], rec["best"], doc["random"].get(rec["protocol"])]
                acc = [f"{c['mean']:.2f} ± {c['std']:.2f}" if c else "not run" for c in cells]
                chain = " / ".join("—" if s is None else f"{s / 60:.1f}"
                                   for s in (rec["chain_wall_time_s"], rec["chain_cpu_s"]))
                lines.append(f"| [{p.name}](benchmarks/results/{p.name}) | {m.upper()} (IPC {doc['ipc']}) | "
                             f"`{rec['protocol']}` | {' | '.join(acc)} | {chain} |")
            if p.with_suffix(".png").name in tracked:
                lines += ["", f"![test accuracy against iterations](benchmarks/results/{p.with_suffix('.png').name})"]
        lines += ["", "Command: `python benchmarks/datm_fmnist.py` (initial set = the iteration-0 snapshot)."]
    else:
        lines.append("No committed results yet (`benchmarks/results/matching_fmnist_ipc*.json`).")
    reports = sorted(p for p in results.glob("*.json") if p.name in tracked and p.name not in KNOWN)
    reports = [p for p in reports if {"results", "protocols", "net"} <= set(json.loads(p.read_text()))]
    lines += ["", "### Single `ddkit evaluate` reports", ""]
    if reports:
        lines += ["| file | set | IPC | protocol | net | accuracy (%) | seeds | added by |", "|---|---|---|---|---|---|---|---|"]
        for p in reports:
            rep = json.loads(p.read_text())
            for r in rep["results"]:
                lines.append(f"| [{p.name}](benchmarks/results/{p.name}) | {r['name']} | {r['ipc']} | "
                             f"{r['protocol']['name']} | {rep['net']} {json.dumps(rep['net_kwargs'])} | "
                             f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f} | {rep['seeds']} | {added_by(p)} |")
    else:
        lines.append("None committed.")
    spread = load("ssl_bn_spread.json")
    lines += ["", "### BN running-statistics spread, SSL vs supervised teacher, `benchmarks/ssl_bn_spread.py`", ""]
    if spread:
        lines.append(f"[ssl_bn_spread.json](benchmarks/results/ssl_bn_spread.json), command `{spread['command']}`.")
        if spread.get("table_markdown"):
            lines += ["", spread["table_markdown"]]
        if "ssl_bn_spread.png" in tracked:
            lines += ["", "![BN statistics spread](benchmarks/results/ssl_bn_spread.png)"]
    else:
        lines.append("No committed results yet (`benchmarks/results/ssl_bn_spread.json`).")
    return "\n".join(lines) + "\n"


BENCHMARKS_TEMPLATE = """# Benchmarks

Every number here comes from a script in `benchmarks/` and a JSON file in `benchmarks/results/`, with the command
that reproduces it. The generated parts (between the `<!-- ...:begin/end -->` markers) are rewritten by
`python benchmarks/quality_fmnist.py` (`--table-only` to rewrite them from what is cached and committed).

## Quality on real data: Fashion-MNIST

<!-- quality:begin -->
<!-- quality:end -->

## Speed and memory

<!-- others:begin -->
<!-- others:end -->
"""


def write_outputs(doc: dict[str, Any], results: Path = RESULTS, benchmarks_md: Path = REPO / "BENCHMARKS.md",
                  readme: Path | None = REPO / "README.md") -> None:
    """Write the JSON and the plot, and regenerate the marked sections of BENCHMARKS.md (created from a template
    when absent) and of README.md (left alone when it has no ``headline`` markers)."""
    write_json(results / "quality_fmnist.json", doc)
    plot(doc, results / "quality_fmnist.png")
    text = benchmarks_md.read_text() if benchmarks_md.is_file() else BENCHMARKS_TEMPLATE
    text = replace_section(text, "quality", quality_section(doc))
    text = replace_section(text, "others", others_section(results))
    with atomic_file(benchmarks_md) as tmp:
        tmp.write_text(text)
    if readme is not None and readme.is_file() and "<!-- headline:begin -->" in readme.read_text():
        with atomic_file(readme) as tmp:
            tmp.write_text(replace_section(readme.read_text(), "headline", headline(doc)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ipc", type=int, nargs="+", default=list(IPCS), help="IPCs to run (default 1 10 50)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=PROTOCOLS)
    parser.add_argument("--no-full", action="store_true", help="skip the full-data reference")
    parser.add_argument("--setting", default="fmnist-cpu", choices=sorted(SETTINGS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--root", default="runs/quality_fmnist", help="artifacts, stamps, logs")
    parser.add_argument("--force", nargs="*", default=[], help="fnmatch patterns of stage names to rerun")
    parser.add_argument("--in-process", action="store_true", help="run stages in this process (default: children)")
    parser.add_argument("--progress-bars", action="store_true", help="keep Lightning's progress bars")
    parser.add_argument("--dry-run", action="store_true", help="list the stages and their cache state")
    parser.add_argument("--table-only", action="store_true", help="run nothing; regenerate outputs from the cache")
    args = parser.parse_args(argv)
    os.chdir(REPO)  # configs/ and the root are relative to the repository
    start = time.perf_counter()
    load_start = os.getloadavg()
    for k in args.ipc:
        if k <= 0:
            raise SystemExit(f"error: ipc: must be > 0, got {k}")
    full_plan = make_plan(args.setting, root=args.root, seeds=args.seeds, full=not args.no_full,
                          ipcs=sorted(set(IPCS) | set(args.ipc)))
    run_plan = make_plan(args.setting, args.methods, args.ipc, args.protocols, not args.no_full, args.root,
                         args.seeds, args.progress_bars)
    built = build_plan(run_plan)
    if args.dry_run:
        dry_run(built.stages)
        return 0
    results = []
    if not args.table_only:
        results = run_stages(built.stages, args.root, run_in_process if args.in_process else run_subprocess,
                             force=args.force)
    full_built = build_plan(full_plan)
    doc = collect(full_built, full_plan, results)
    doc["setting"] = args.setting
    doc["benchmark"] = "quality_fmnist"
    doc["command"] = "python benchmarks/quality_fmnist.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    doc["anchors"] = {"source": "DC/DSA papers, Fashion-MNIST, ConvNet-D3 width 128", "rows": ANCHORS,
                      "full_data": FULL_ANCHOR}
    doc["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                      "loadavg_start": load_start, "loadavg_end": os.getloadavg()}
    doc["session_wall_time_s"] = round(time.perf_counter() - start, 1)
    doc["goals"] = goals(doc)
    write_outputs(doc)
    print(results_table(doc, anchors=ANCHORS))
    for g in doc["goals"]:
        print(f"{g['goal']}: {g['status']}")
    print(f"session wall time {doc['session_wall_time_s']:.0f} s; wrote {RESULTS / 'quality_fmnist.json'}, "
          f"{RESULTS / 'quality_fmnist.png'}, BENCHMARKS.md")
    return 1 if any(r.status in ("failed", "blocked") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
