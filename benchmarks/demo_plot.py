"""Plot the demo's loss curve from `dsv2 train`'s log lines (stderr redirected to files) and print its numbers.

Usage: python benchmarks/demo_plot.py OUT.png LOG [LOG ...]   (the logs of a run, its resumes and later stages, in order)

Reads ``step N: loss L  lr X  T tok/s ...`` and ``step N: held-out loss L`` lines; needs matplotlib, which
dsv2 does not depend on (install it anywhere on PYTHONPATH for this script).
"""

from __future__ import annotations

import re
import statistics
import sys
from pathlib import Path

STEP = re.compile(r"^step (\d+): loss ([\d.]+)\s+lr (\S+)\s+([\d,]+) tok/s")
EVAL = re.compile(r"^step (\d+): held-out loss ([\d.]+)")


def read(logs: list[Path]) -> tuple[dict[int, tuple[float, float]], dict[int, float], list[int]]:
    """Training and held-out losses by step, and where each new stage began.

    A log whose steps start below the last step read is a new run started from the previous one's
    weights (``dsv2 train --init-from``): its steps are counted on from there.
    """
    train: dict[int, tuple[float, float]] = {}  # step -> (loss, tokens/s)
    held: dict[int, float] = {}
    stages: list[int] = []
    offset = 0
    for log in logs:
        first = True
        for line in log.read_text().splitlines():
            m = STEP.match(line) or EVAL.match(line)
            if m is None:
                continue
            if first and train and int(m[1]) < max(train):
                offset = max(train)
                stages.append(offset)
            first = False
            step = offset + int(m[1])
            if m.re is STEP:
                train[step] = (float(m[2]), float(m[4].replace(",", "")))
            else:
                held[step] = float(m[2])
    return train, held, stages


def main() -> None:
    out, logs = Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]]
    train, held, stages = read(logs)
    speeds = [s for _, s in train.values()]
    print(
        f"{len(train)} logging windows; tokens/s median {statistics.median(speeds):,.0f}, min {min(speeds):,.0f}, max {max(speeds):,.0f}"
    )
    print("held-out:", ", ".join(f"{v:.3f} ({k})" for k, v in sorted(held.items())))
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps = sorted(train)
    ax.plot(steps, [train[s][0] for s in steps], lw=1, label="training loss (mean of 10 steps)")
    ax.plot(sorted(held), [held[s] for s in sorted(held)], "o-", ms=4, label="held-out files of the training packages")
    for start in stages:
        ax.axvline(start, color="grey", ls="--", lw=1)
        ax.annotate("new text, --init-from", (start, 5.7), xytext=(4, 0), textcoords="offset points", fontsize=8)
    ax.set_xlabel("step (4,096 tokens each)")
    ax.set_ylabel("cross-entropy, nats/token")
    ax.set_ylim(2, 6)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("dsv2 demo model: dsv2 train on 2 CPU cores")
    fig.tight_layout()
    fig.savefig(out)


if __name__ == "__main__":
    main()
