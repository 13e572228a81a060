"""Plot a run's metrics.jsonl against the step: one PNG, one panel per metric.

    grpo-fast plot outputs/tiny-online                    # -> outputs/tiny-online/metrics.png
    grpo-fast plot outputs/tiny-online --metrics reward kl --output reward.png

By default the panels are the main metrics the run logged (of reward, loss, kl, entropy,
eval/accuracy, pairwise_accuracy, completions/mean_length); rows lacking a metric (eval rows,
for example) are skipped for that panel. Noisy curves get a moving average drawn over the raw
values. Uses matplotlib's Agg backend, so no display is needed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

from .data import DataError
from .rundir import METRICS_FILE, read_jsonl

DEFAULT_METRICS = ("reward", "loss", "kl", "entropy", "eval/accuracy", "pairwise_accuracy",
                   "completions/mean_length")
# Curves with more points than this get a moving average over ~1/20 of them.
SMOOTH_MIN_POINTS = 20


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl file (a torn last line, from a kill mid-write, is dropped).
    FileNotFoundError if absent; DataError (a ValueError) naming the file and line if another row
    is not JSON, or if there is no row at all."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics file (is this a run's output_dir?)")
    try:
        rows = read_jsonl(path)
    except ValueError as e:
        raise DataError(str(e)) from None
    if not rows:
        raise DataError(f"{path}: empty, nothing to plot")
    return rows


def series(rows: list[dict], metric: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the rows holding a finite value of `metric`."""
    points = [(row["step"], row[metric]) for row in rows
              if isinstance(row.get(metric), (int, float)) and math.isfinite(row[metric])]
    return [p[0] for p in points], [p[1] for p in points]


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to `window` values (shorter at the start), same length as values."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_run(run_dir: str, output: Optional[str] = None, metrics: Optional[Sequence[str]] = None) -> str:
    """Write a PNG of `run_dir/metrics.jsonl` (default `run_dir/metrics.png`); returns its path.

    `metrics` chooses the panels (each must appear in the file); by default the present ones of
    DEFAULT_METRICS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(run_dir) / METRICS_FILE
    rows = read_metrics(path)
    present = {m for m in {k for row in rows for k in row} if series(rows, m)[0]}
    if metrics:
        missing = [m for m in metrics if m not in present]
        if missing:
            raise DataError(f"{path}: no values for {', '.join(missing)}; "
                            f"logged metrics: {', '.join(sorted(present - {'step', 'time'}))}")
        names = list(metrics)
    else:
        names = [m for m in DEFAULT_METRICS if m in present]
        if not names:
            raise DataError(f"{path}: none of the default metrics ({', '.join(DEFAULT_METRICS)}) "
                            "is logged; choose some with --metrics")

    cols = min(len(names), 3)
    nrows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        steps, values = series(rows, name)
        if len(values) > SMOOTH_MIN_POINTS:
            ax.plot(steps, values, color="tab:blue", alpha=0.3, linewidth=1)
            ax.plot(steps, moving_average(values, max(2, len(values) // 20)), color="tab:blue", linewidth=2)
        else:
            ax.plot(steps, values, color="tab:blue", marker="o", markersize=3)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    fig.suptitle(str(Path(run_dir).resolve().name))
    fig.tight_layout()
    out = Path(output) if output else Path(run_dir) / "metrics.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return str(out)
