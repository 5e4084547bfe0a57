"""Curves of a run's metrics.jsonl (sft.py or wrpo.py) as PNG files; needs matplotlib.

    python -m eval.plot out/wrpo/metrics.jsonl                 # -> out/wrpo/plots/*.png
    python -m eval.plot out/sft/metrics.jsonl --out_dir=plots

One figure per group of metrics the run logged: loss, rewards (source / target / weighted
chosen, rejected, margins), accuracies, alpha, learning rate, gradient norm. Training values are
lines over optimizer steps; held-out evaluations (eval/...) are points. A last line that is not a
row (torn by a crash mid-append, a crashed run's normal leftover) is dropped with a note, as a
resume drops it; a bad line anywhere else is an error naming file:line.
"""

import argparse
import json
import sys
from pathlib import Path

from eval import cli, fail, output_problem, outputs_problem, read_input

FIGURES = {
    "loss": ["loss"],
    "rewards": ["rewards/source_chosen", "rewards/target_chosen", "rewards/chosen", "rewards/rejected",
                "rewards/margins"],
    "accuracies": ["rewards/accuracies", "rewards/source_accuracies", "rewards/target_accuracies"],
    "alpha": ["alpha"],
    "lr": ["lr"],
    "grad_norm": ["grad_norm"],
}


def read_metrics(path):
    """The rows of metrics file `path`; its last line dropped, with a note, when a crash tore it."""
    rows = []
    lines = read_input(path).splitlines()
    last = max((i for i, line in enumerate(lines, 1) if line.strip()), default=0)
    for i, line in enumerate(lines, 1):
        try:
            if line.strip():
                row = json.loads(line)
                if not isinstance(row, dict) or "step" not in row:
                    raise ValueError("no step")
                rows.append(row)
        except ValueError:
            if i == last and rows:
                print(f"note: {path}:{i}: dropped the last line, not a whole metrics row (torn by a crash while "
                      "writing)", file=sys.stderr)
                continue
            fail(f"{path}:{i}: not a metrics row (sft.py and wrpo.py write one JSON object per step)")
    if not rows:
        fail(f"{path}: no metrics rows")
    return rows


def plot(rows, out_dir):
    """Write one PNG per figure whose metrics appear in `rows`; returns the paths written."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        fail("plotting needs matplotlib: pip install matplotlib")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, keys in FIGURES.items():
        series = []
        for key in keys:
            train = [(r["step"], r[key]) for r in rows if key in r and "lr" in r]
            held = [(r["step"], r[f"eval/{key}"]) for r in rows if f"eval/{key}" in r]
            series += [(key, train, "-"), (f"eval/{key}", held, "o--")]
        series = [s for s in series if s[1]]
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for label, points, style in series:
            ax.plot(*zip(*points), style, label=label, markersize=4)
        ax.set_xlabel("optimizer step")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def main(argv):
    ap = argparse.ArgumentParser(prog="python -m eval.plot", description=__doc__.split("\n\n")[0])
    ap.add_argument("metrics", help="a run's metrics.jsonl")
    ap.add_argument("--out_dir", default="", help="default: plots/ beside the metrics file")
    args = ap.parse_args(argv)
    out_dir = Path(args.out_dir) if args.out_dir else Path(args.metrics).parent / "plots"
    if problem := (output_problem(out_dir, what="--out_dir is the folder to write the figures in", folder=True)
                   or outputs_problem([out_dir / f"{name}.png" for name in FIGURES], [args.metrics])):
        fail(problem)
    rows = read_metrics(args.metrics)
    try:
        written = plot(rows, out_dir)
    except OSError as e:  # e.g. a read-only folder, or a file on the way
        fail(f"cannot write the figures to {out_dir} ({e.strerror or e})")
    print(f"{len(written)} figures -> {out_dir}: {', '.join(p.name for p in written)}")


if __name__ == "__main__":
    cli(main)
