"""Plot the demo's loss curve from `dsv2 train`'s log lines (stderr redirected to files) and print its numbers.

Usage: python benchmarks/demo_plot.py OUT.png LOG [LOG ...]   (the logs of a run and its resumes, in order)

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


def read(logs: list[Path]) -> tuple[dict[int, tuple[float, float]], dict[int, float]]:
    train: dict[int, tuple[float, float]] = {}  # step -> (loss, tokens/s)
    held: dict[int, float] = {}
    for log in logs:
        for line in log.read_text().splitlines():
            if m := STEP.match(line):
                train[int(m[1])] = (float(m[2]), float(m[4].replace(",", "")))
            elif m := EVAL.match(line):
                held[int(m[1])] = float(m[2])
    return train, held


def main() -> None:
    out, logs = Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]]
    train, held = read(logs)
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
