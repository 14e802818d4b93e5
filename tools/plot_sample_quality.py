"""Sample FID against training time for several runs trained with --eval-every, one curve per run,
coloured by model: the figure images/sample_quality.png in the README.

    python3 tools/plot_sample_quality.py RUN_DIR... --out images/sample_quality.png
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import utils  # noqa: E402  (first: it sets matplotlib's file-only backend)
import matplotlib.pyplot as plt  # noqa: E402

COLUMN = "fid[mnist-cnn]"


def fid_curve(run: Path) -> tuple[list[float], list[float]]:
    """(seconds spent training when each FID was measured, the FID) from a run's metrics.csv."""
    seconds, fids, elapsed = [], [], 0.0
    with open(run / "metrics.csv") as f:
        for row in csv.DictReader(f):
            elapsed += float(row["sec_per_step"]) + float(row["data_wait"])
            if math.isfinite(float(row.get(COLUMN) or "nan")):
                seconds.append(elapsed)
                fids.append(float(row[COLUMN]))
    return seconds, fids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    figure, axis = plt.subplots(figsize=(6, 3.6))
    colours, labelled = {}, set()
    for run in args.runs:
        model = json.loads((run / "config.json").read_text())["model"]
        colour = colours.setdefault(model, f"C{len(colours)}")
        seconds, fids = fid_curve(run)
        axis.plot([s / 60 for s in seconds], fids, marker="o", markersize=3, color=colour,
                  label=None if model in labelled else model)
        labelled.add(model)
    axis.set(xlabel="minutes spent training", ylabel=f"sample {COLUMN} (2,000 samples)")
    axis.grid(alpha=0.3)
    axis.legend()
    utils.write_figure(figure, args.out)


if __name__ == "__main__":
    main()
