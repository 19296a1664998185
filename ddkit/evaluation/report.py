"""The evaluation report: JSON for machines, a Markdown table for people. Written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ddkit.formats.common import atomic_file, write_json


def fmt(mean: float, std: float) -> str:
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def markdown(report: dict[str, Any]) -> str:
    """One row per training set, one column per protocol; mean ± std test accuracy (%) over the seeds."""
    protocols = [p["name"] for p in report["protocols"]]
    rows: dict[tuple, dict[str, str]] = {}
    times: dict[tuple, float] = {}
    for r in report["results"]:
        key = (r["name"], r["ipc"])
        rows.setdefault(key, {})[r["protocol"]["name"]] = fmt(r["mean"], r["std"])
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
    lines += ["", "Protocols:"]
    for p in report["protocols"]:
        lines.append("- " + ", ".join(f"{k}={v}" for k, v in p.items()))
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], output: Path) -> None:
    write_json(output / "report.json", report)
    with atomic_file(output / "report.md") as tmp:
        tmp.write_text(markdown(report))
