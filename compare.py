"""
compare.py -- the five methods side by side on the built-in data, each at its published small-data
recipe and at a second learning rate, with the same image budget; SimSiam and BYOL also with the
linear predictor of the paper's bridge. Every run is reported: linear probe top-1/top-5 and 20-NN
(lineval.py), the last diagnostics pass's corr_dist and bridge_dist, and wall time; the random
network is the floor. One command makes the README's table:

    python compare.py                       # 2 epochs a run, 13 runs: see README.md for the time
    python compare.py --epochs 6 --out compare6      # the .ci/gpu step
    python compare.py --only simsiam byol   # some methods only (names as in the table's first column)

OUT/NAME/ holds each run (decorr.py's outputs and lineval's eval.jsonl); OUT/results.jsonl one row
per finished run; OUT/table.md the table; OUT/bridge.png the linear predictors' bridge_dist and
bridge_align against the step. A run whose row is in results.jsonl is not redone, and a
run that was stopped resumes from its checkpoint: a stopped comparison continues where it was.
"""

import argparse
import json
import os
import subprocess
import sys
import time

from config import Parser
from data import UsageError
from decorr import read_jsonl

# The recipes, adapted to the built-in data (ResNet-18 with the CIFAR stem, 32 px, batch 256).
# (name, --loss, flags, [recipe lr, second lr], where the settings come from)
DECORR = []  # decorr.py's small-data profile: 4096-256, LARS eta 0.02, wd 1e-4
BARLOW_TWINS = ["--proj", "2048-2048-2048", "--loss-scale", "0.1", "--lars-clip", "--wd", "1e-4"]
VICREG = ["--proj", "2048-2048-2048", "--lars-clip", "--wd", "1e-4"]
SIMSIAM = ["--proj", "2048-2048-2048", "--optimizer", "sgd", "--wd", "1e-5"]
BYOL = ["--proj", "4096-256", "--lars-clip", "--wd", "1e-5", "--tau-base", "0.99"]
RUNS = [
    ("decorr", "decorr", DECORR, [0.3, 0.45], "the paper sec. 5.1 and Table 5; decorr.py's profile"),
    ("barlowtwins", "barlowtwins", BARLOW_TWINS, [0.3, 0.03], "solo-learn cifar/barlow.yaml"),
    ("vicreg", "vicreg", VICREG, [0.3, 0.03], "solo-learn cifar/vicreg.yaml"),
    ("simsiam", "simsiam", SIMSIAM, [0.5, 0.05], "solo-learn cifar/simsiam.yaml; 0.05: the official"),
    ("byol", "byol", BYOL, [1.0, 0.1], "solo-learn cifar/byol.yaml"),
    ("simsiam-linear", "simsiam", SIMSIAM + ["--predictor", "linear"], [0.5], "as simsiam, W linear"),
    ("byol-linear", "byol", BYOL + ["--predictor", "linear"], [1.0], "as byol, W linear"),
]
COLUMNS = "run | lr | probe top-1 (top-5) | 20-NN | corr_dist | bridge_dist | wall".split(" | ")


def parse_args(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=2, help="the image budget of every run, in epochs")
    p.add_argument("--out", default="compare", help="folder of the runs, results.jsonl and table.md")
    p.add_argument("--diag-every", type=int, default=5, help="diagnostics every N steps")
    p.add_argument("--only", nargs="+", default=None, help="run these names only")
    args = p.parse_args(argv)
    names = [run[0] for run in RUNS]
    unknown = [name for name in args.only or [] if name not in names]
    if unknown:
        p.error(f"--only {' '.join(unknown)}: no such run (the runs: {' '.join(names)})")
    return args


def last_json_line(text):
    lines = [line for line in text.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])


def run_command(command, log_path):
    """Run a command with its output appended to log_path; exit with its status if it fails."""
    print("+", " ".join(command), flush=True)
    started = time.time()
    result = subprocess.run(command, capture_output=True, text=True)
    with open(log_path, "a") as fh:
        fh.write(result.stdout + result.stderr)
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or [""])[-1]
        sys.exit(f"compare.py: {command[1]} failed (exit {result.returncode}: {reason}); see {log_path}")
    return result.stdout, time.time() - started


def train_and_evaluate(name, loss, flags, lr, args):
    """One run: pre-training with decorr.py, then lineval.py's probe and 20-NN; the table's row."""
    folder = os.path.join(args.out, f"{name}_lr{lr}")
    os.makedirs(folder, exist_ok=True)
    log_path = os.path.join(folder, "compare.log")
    train = [sys.executable, "decorr.py", "--loss", loss, *flags, "--lr", str(lr)]
    train += ["--epochs", str(args.epochs), "--diag-every", str(args.diag_every), "--log-every", "1"]
    train += ["--out", folder]
    _, train_s = run_command(train, log_path)
    stdout, _ = run_command([sys.executable, "lineval.py", folder, "--knn", "20"], log_path)
    evaluation = last_json_line(stdout)
    diagnostics = [row for row in read_jsonl(os.path.join(folder, "log.jsonl")) if "corr_dist" in row]
    last = diagnostics[-1]
    return dict(
        name=name,
        loss=loss,
        lr=lr,
        flags=" ".join(flags),
        top1=evaluation["top1"],
        top5=evaluation["top5"],
        knn_top1=evaluation["knn_top1"],
        corr_dist=last["corr_dist"],
        bridge_dist=last.get("bridge_dist"),
        bridge_align=last.get("bridge_align"),
        step=last["step"],
        train_s=round(train_s),
    )


def random_floor(args):
    """The same probe on the untrained network (seeded) with the runs' architecture and data."""
    log_path = os.path.join(args.out, "random_init.log")
    command = [sys.executable, "lineval.py", "--random-init", "--arch", "resnet18", "--data", "synthetic"]
    stdout, _ = run_command(command + ["--knn", "20"], log_path)
    evaluation = last_json_line(stdout)
    return dict(
        name="random init",
        loss="-",
        lr=None,
        flags="--random-init",
        top1=evaluation["top1"],
        top5=evaluation["top5"],
        knn_top1=evaluation["knn_top1"],
        corr_dist=None,
        bridge_dist=None,
        bridge_align=None,
        step=0,
        train_s=None,
    )


def number(value, digits):
    if value is None:
        return "-"
    return f"{value:.{digits}f}"


def table_order(row):
    """The table's order: RUNS' order, each method's lrs as listed, the random network last."""
    for index, (name, _, _, lrs, _) in enumerate(RUNS):
        if row["name"] == name and row["lr"] in lrs:
            return index, lrs.index(row["lr"])
    return len(RUNS), 0


def table(rows):
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in sorted(rows, key=table_order):
        wall = "-" if row["train_s"] is None else f"{row['train_s']} s"
        cells = [
            row["name"],
            number(row["lr"], 2),
            f"{row['top1']:.1f} % ({row['top5']:.1f})",
            f"{row['knn_top1']:.1f} %",
            number(row["corr_dist"], 2),
            number(row["bridge_dist"], 3),
            wall,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def draw_bridge(args, png_path):
    """bridge_dist and bridge_align against the step for every run of a linear predictor, at its
    recipe lr (the first of its lrs): the README's picture of the bridge."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 3), dpi=100)
    FigureCanvasAgg(figure)
    panels = figure.subplots(1, 2)
    for name, _, _, lrs, _ in RUNS:
        log_path = os.path.join(args.out, f"{name}_lr{lrs[0]}", "log.jsonl")
        rows = [row for row in read_jsonl(log_path) if "bridge_dist" in row]
        if not rows:
            continue
        steps = [row["step"] for row in rows]
        for axes, key in zip(panels, ("bridge_dist", "bridge_align")):
            axes.plot(steps, [row[key] for row in rows], marker=".", label=f"{name}, lr {lrs[0]}")
    for axes, key in zip(panels, ("bridge_dist (0: W^T W proportional to F)", "bridge_align (1: aligned)")):
        axes.set_title(key, fontsize=9)
        axes.set_xlabel("step", fontsize=8)
        axes.tick_params(labelsize=8)
    panels[1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(png_path, format="png")


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    results_path = os.path.join(args.out, "results.jsonl")
    done = {(row["name"], row["lr"]) for row in read_jsonl(results_path)}
    for choice in (0, 1):  # every recipe lr first, then the second ones
        for name, loss, flags, lrs, source in RUNS:
            if choice >= len(lrs) or (args.only and name not in args.only):
                continue
            lr = lrs[choice]
            if (name, lr) in done:
                continue
            row = train_and_evaluate(name, loss, flags, lr, args)
            row["source"] = source
            with open(results_path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
    if ("random init", None) not in done:
        with open(results_path, "a") as fh:
            fh.write(json.dumps(random_floor(args)) + "\n")
    text = table(read_jsonl(results_path))
    with open(os.path.join(args.out, "table.md"), "w") as fh:
        fh.write(text)
    draw_bridge(args, os.path.join(args.out, "bridge.png"))
    print(text)


if __name__ == "__main__":
    try:
        main()
    except UsageError as e:
        print(f"compare.py: error: {e}", file=sys.stderr)
        sys.exit(2)
