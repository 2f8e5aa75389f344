#!/usr/bin/env python3
"""Plot of a bench.py results file: median ms and MFU per workload, this run vs the anchors.

``python bench/plot.py RESULTS.json [OUT.png]`` redraws a plot from saved results.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SERIES = (
    ("packed (this run)", lambda r: r.get("packed", {}), "tab:blue"),
    ("unpacked source (this run)", lambda r: r.get("baseline", {}), "tab:orange"),
    ("original packing (anchor H100)", lambda r: (r.get("anchor") or {}).get("original_packing", {}), "tab:gray"),
    ("unpacked source (anchor H100)", lambda r: (r.get("anchor") or {}).get("unpacked_source", {}), "silver"),
)


def plot_results(report: dict, path: Path) -> None:
    """Two panels of grouped bars (median ms on a log axis, MFU in %); series without data are left out."""
    workloads = report["workloads"]
    names = list(workloads)
    series = [(label, [get(workloads[n]) for n in names], color) for label, get, color in SERIES]
    series = [s for s in series if any("median_ms" in fig for fig in s[1])]
    width = 0.8 / max(len(series), 1)
    fig, axes = plt.subplots(1, 2, figsize=(max(10, 3.2 * len(names)), 4.8))
    for ax, key, scale, ylabel in ((axes[0], "median_ms", 1, "median forward time (ms, log)"),
                                   (axes[1], "mfu", 100, "MFU (% of measured matmul rate)")):
        for k, (label, figures, color) in enumerate(series):
            xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(names))]
            values = [fig[key] * scale if key in fig else 0.0 for fig in figures]
            bars = ax.bar(xs, values, width, label=label, color=color)
            for bar, value in zip(bars, values):
                if value:
                    ax.annotate(f"{value:.0f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                                ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(names)), names, rotation=15, fontsize=8)
        ax.set_ylabel(ylabel)
        if key == "median_ms":
            ax.set_yscale("log")
    env, settings = report["environment"], report["settings"]
    fig.suptitle(f"{settings['variant']} {settings['dtype']} on {env['device']} (torch {env['torch']}, "
                 f"attn {settings['attn_requested']}"
                 f"{', compiled' if settings['compile'] else ''})", fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(series), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    results = Path(sys.argv[1])
    out = Path(sys.argv[2]) if len(sys.argv) == 3 else results.with_name("bench.png")
    plot_results(json.loads(results.read_text()), out)
    print(out)
