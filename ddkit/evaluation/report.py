"""The evaluation report: JSON for machines, a Markdown table for people. Written atomically."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ddkit.formats.common import atomic_file, write_json


def fmt(mean: float, std: float) -> str:
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def _normalized(x: float) -> float:
    """DD-Ranking's map of a score in [-1, 1] to [0, 100]: ``(e^x - e^-1) / (e - e^-1) * 100``."""
    return (math.exp(x) - math.exp(-1)) / (math.e - math.exp(-1)) * 100


def robust_scores(report: dict[str, Any], w: float = 0.5, gamma: float = 0.5) -> list[dict[str, Any]]:
    """DD-Ranking's label-robust and augmentation-robust scores of every distilled set, from the report's runs.

    Li, Zhong et al., "DD-Ranking: Rethinking the Evaluation of Dataset Distillation", arXiv 2505.13300 (and the
    ``ddranking`` package's documentation), accuracies as fractions:

    - hard-label recovery ``HLR = acc(real, hard) - acc(syn, hard)``: the full-data reference (``full`` baseline or
      ``full_data_accuracy``) minus the set under the ``hard`` protocol;
    - improvement over random ``IOR = acc(syn, P) - acc(random, P)`` under each protocol ``P``;
    - ``LRS = (e^a - e^-1) / (e - e^-1) * 100`` with ``a = w * IOR - (1 - w) * HLR`` (``w = 0.5`` by default);
    - ``ARS = (e^b - e^-1) / (e - e^-1) * 100`` with ``b = gamma * (acc(syn, P) - acc(random, P)) + (1 - gamma) *
      (acc(syn, P, no aug.) - acc(random, P, no aug.))`` (``gamma = 0.5``), when the report holds the runs without
      augmentation (``no_augmentation``).

    Each entry names the set and protocol and gives ``hlr``, ``ior``, ``lrs``, ``ars`` (None when a run they need is
    missing, with ``missing`` saying which).
    """
    mean = {(r["name"], r["kind"], r["protocol"]["name"], r.get("augmented", True)): r["mean"]
            for r in report["results"]}
    full = (report.get("full_data") or {}).get("mean")
    sets = sorted({r["name"] for r in report["results"] if r["kind"] == "distilled"})
    protocols = [p["name"] for p in report["protocols"]]
    out = []
    for name in sets:
        for p in protocols:
            syn, rdm = mean.get((name, "distilled", p, True)), mean.get(("random", "random", p, True))
            syn_hard = mean.get((name, "distilled", "hard", True))
            syn_n, rdm_n = mean.get((name, "distilled", p, False)), mean.get(("random", "random", p, False))
            missing = [what for what, v in (("full-data accuracy", full), ("set under hard", syn_hard),
                                            (f"random under {p}", rdm), (f"set under {p} without augmentation", syn_n),
                                            (f"random under {p} without augmentation", rdm_n)) if v is None]
            hlr = full - syn_hard if full is not None and syn_hard is not None else None
            ior = syn - rdm if syn is not None and rdm is not None else None
            lrs = _normalized(w * ior - (1 - w) * hlr) if hlr is not None and ior is not None else None
            ars = (_normalized(gamma * ior + (1 - gamma) * (syn_n - rdm_n))
                   if ior is not None and syn_n is not None and rdm_n is not None else None)
            out.append({"name": name, "protocol": p, "hlr": hlr, "ior": ior, "lrs": lrs, "ars": ars, "w": w,
                        "gamma": gamma, "missing": missing})
    return out


def markdown(report: dict[str, Any]) -> str:
    """One row per training set, one column per protocol; mean ± std test accuracy (%) over the seeds."""
    protocols = [p["name"] for p in report["protocols"]]
    rows: dict[tuple, dict[str, str]] = {}
    times: dict[tuple, float] = {}
    for r in report["results"]:
        key = (r["name"], r["ipc"])
        column = r["protocol"]["name"] + ("" if r.get("augmented", True) else " (no aug.)")
        if column not in protocols:
            protocols.append(column)
        rows.setdefault(key, {})[column] = fmt(r["mean"], r["std"])
        times[key] = times.get(key, 0.0) + r["wall_time_s"]
    ds = report["dataset"]
    lines = [
        f"# Evaluation: {ds['dataset']}, net {report['net']} {report['net_kwargs'] or ''}".rstrip(),
        "",
        f"Test accuracy (%), mean ± std over {report['seeds']} seeds.",
        "",
        "| set | IPC | " + " | ".join(protocols) + " | eval time (s) |",
        "|---|---|" + "---|" * len(protocols) + "---|",
    ]
    for (name, ipc), cells in rows.items():
        lines.append(f"| {name} | {ipc if ipc is not None else '-'} | "
                     + " | ".join(cells.get(p, "-") for p in protocols) + f" | {times[(name, ipc)]:.0f} |")
    full = report.get("full_data")
    if full:
        how = full["protocol"].get("name", "")
        epochs = full["protocol"].get("epochs")
        lines += ["", f"Full-data reference: {100 * full['mean']:.2f} % ({how}" + (f", {epochs} epochs)" if epochs else ")")]
    scores = report.get("robust_scores") or []
    if any(s["lrs"] is not None or s["ars"] is not None for s in scores):
        title = ("DD-Ranking scores (arXiv 2505.13300; HLR, IOR as fractions; LRS, ARS in [0, 100]; "
                 "`-`: a run they need is not in this report):")
        lines += ["", title, "", "| set | protocol | HLR | IOR | LRS | ARS |", "|---|---|---|---|---|---|"]
        for s in scores:
            cells = [f"{s[k]:.4f}" if s[k] is not None else "-" for k in ("hlr", "ior")]
            cells += [f"{s[k]:.2f}" if s[k] is not None else "-" for k in ("lrs", "ars")]
            lines.append(f"| {s['name']} | {s['protocol']} | " + " | ".join(cells) + " |")
    lines += ["", "Protocols:"]
    for p in report["protocols"]:
        lines.append("- " + ", ".join(f"{k}={v}" for k, v in p.items()))
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], output: Path) -> None:
    write_json(output / "report.json", report)
    with atomic_file(output / "report.md") as tmp:
        tmp.write_text(markdown(report))
