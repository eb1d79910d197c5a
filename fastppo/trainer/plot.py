"""curves.png: a grid of training curves from metrics.jsonl (raw values faint, an exponential moving average
solid), one colour per run when several runs are overlaid (`fastppo plot RUN_DIR [RUN_DIR ...]`)."""

from __future__ import annotations

import math
from pathlib import Path

from .reporting import read_metrics

# (metric, panel title, y-axis label)
PANELS = [
    ("reward_mean", "reward (reward model / functions)", "mean score per sequence"),
    ("task_score_mean", "task score (ground truth)", "mean score per sequence"),
    ("kl_mean", "KL to the reference", "nats per sequence"),
    ("teacher_kl", "KL(policy || teacher) (distill)", "nats per token"),
    ("entropy", "policy entropy", "nats per token"),
    ("clipfrac", "clip fraction", "fraction of tokens"),
    ("policy_loss", "policy loss", "loss"),
    ("value_loss", "value loss", "loss"),
    ("response_length", "response length", "tokens"),
]


def smooth(values: list[float], weight: float) -> list[float]:
    """Bias-corrected exponential moving average (TensorBoard's smoothing); NaN values are skipped."""
    out, avg, norm = [], 0.0, 0.0
    for v in values:
        if math.isfinite(v):
            avg, norm = weight * avg + (1 - weight) * v, weight * norm + (1 - weight)
        out.append(avg / norm if norm else float("nan"))
    return out


def plot_runs(runs: dict[str, list[dict]], path: Path, smoothing: float = 0.8) -> Path:
    """runs: label -> metrics rows. Writes a PNG grid of the panels any run has."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in PANELS if any(p[0] in m for rows in runs.values() for m in rows)]
    if not panels:
        raise ValueError("no known metric to plot (is metrics.jsonl empty?)")
    cols = min(4, len(panels))
    rows_n = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.2 * rows_n), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, title, ylabel) in zip(axes.flat, panels):
        for i, (label, rows) in enumerate(runs.items()):
            pts = [(m["iteration"], float(m[key])) for m in rows if key in m and m[key] is not None]
            if not pts:
                continue
            x, y = zip(*pts)
            c = colours[i % len(colours)]
            ax.plot(x, y, color=c, alpha=0.25, linewidth=1)
            ax.plot(x, smooth(list(y), smoothing), color=c, linewidth=2, label=label)
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if len(runs) > 1 and handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(runs), 4), frameon=False)
    fig.suptitle(f"fastppo training curves (faint: raw, solid: EMA smoothing {smoothing})")
    fig.tight_layout(rect=(0, 0.05 if len(runs) > 1 else 0, 1, 0.96))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_curves(metrics: list[dict], path: Path, label: str = "run") -> Path:
    return plot_runs({label: metrics}, path)


def main(argv=None) -> int:
    """`fastppo plot RUN_DIR [RUN_DIR ...] [-o PNG]`: redraw curves from metrics.jsonl, overlaying runs."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="fastppo plot", description=main.__doc__)
    parser.add_argument("runs", nargs="+", help="run folders holding metrics.jsonl")
    parser.add_argument("-o", "--output", help="PNG to write (default: RUN_DIR/curves.png for one run, "
                                               "curves.png here for several)")
    parser.add_argument("--smoothing", type=float, default=0.8, help="EMA weight in [0, 1) (default 0.8)")
    args = parser.parse_args(argv)
    if not 0 <= args.smoothing < 1:
        parser.error(f"--smoothing={args.smoothing}: must be in [0, 1)")
    runs = {}
    for d in args.runs:
        f = Path(d) / "metrics.jsonl"
        if not f.is_file():
            print(f"fastppo plot: {f} does not exist", file=sys.stderr)
            return 2
        label = Path(d).resolve().name
        while label in runs:
            label += "'"
        try:
            runs[label] = read_metrics(f)
        except ValueError as e:
            print(f"fastppo plot: {e}", file=sys.stderr)
            return 2
    out = Path(args.output) if args.output else (Path(args.runs[0]) / "curves.png" if len(runs) == 1
                                                 else Path("curves.png"))
    try:
        plot_runs(runs, out, args.smoothing)
    except ImportError:
        print("fastppo plot: needs matplotlib: pip install 'fastppo[plot]'", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"fastppo plot: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
