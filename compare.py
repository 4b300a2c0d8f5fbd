"""
compare.py -- the five methods at equal effort on the built-in data, in one command:

    python compare.py                          # the protocol: about 4 h on a 2-core CPU with bf16
    python compare.py --only decorr byol       # some methods (names as in the table's first column)
    python compare.py --seeds 5                # more seeds at the chosen lrs (the others are kept)

The protocol, every step the same for every method:
  1. floor    the untrained network, its BatchNorm statistics estimated (lineval.py --random-init),
              one per seed: the floor every method must beat (also on the held-out images, seed 0).
  2. grid     each method at 1/3, 1 and 3 times its recipe's lr, seed 0, the same budget (--epochs,
              a warm-up of --warmup-steps from lr 0), the same augmentation and, for the LARS methods,
              the same LARS (unclipped, eta 0.02); probed on --holdout training images held out from
              the probe (lineval.py --holdout), never on the val set.
  3. choice   each method's lr: the best held-out probe top-1 of its grid. Where that is an end of
              the grid, the next lr past it (3x further) is tried, twice at most, for every method.
  4. seeds    the chosen lr with seeds 0 .. --seeds - 1, probed on the val set: mean and sd.
  5. bridge   SimSiam and BYOL with the linear predictor at their chosen lr (seed 0).
  6. default  `python decorr.py --seed S` as the README's quick start runs it, for each seed.

OUT/runs/NAME_lrLR_seedS_KEY/ holds each run (decorr.py's outputs, lineval's eval.jsonl and
compare.log, the run's output); OUT/results.jsonl one row per finished evaluation, keyed by
everything that defines it (the training command without --out, and the probe's); OUT/table.md,
OUT/grid.md the tables; OUT/fig1.png corr_dist and the effective rank of the backbone against the
step (the paper's Fig. 1); OUT/bridge.png the linear predictors' bridge_dist and bridge_align. A row
in results.jsonl is never redone and a stopped run resumes from its checkpoint, so the same command
continues a stopped comparison (Ctrl-C stops it, the run in progress with a checkpoint); another
budget or setting makes other rows. A run whose loss or weights stop being finite is reported as
diverged and the protocol goes on.
"""

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time

from config import Parser
from data import UsageError
from decorr import read_jsonl

# The recipes, adapted to the built-in data (ResNet-18 with the CIFAR stem, 32 px, batch 256):
# (name, --loss, flags, recipe lr, where they come from). Every LARS method runs the same LARS,
# unclipped with eta 0.02 (decorr.py's small-data setting): the official LARS of Barlow Twins, VICReg,
# BYOL and decorr is unclipped, and under the clip every weight of these models steps by eta at any
# lr >= 0.01, so an lr grid would not change their steps.
LARS = ["--lars-eta", "0.02"]
DECORR = LARS  # decorr.py's small-data profile: 4096-256, wd 1e-4
BARLOW_TWINS = ["--proj", "2048-2048-2048", "--loss-scale", "0.1", "--wd", "1e-4", *LARS]
VICREG = ["--proj", "2048-2048-2048", "--wd", "1e-4", *LARS]
SIMSIAM = ["--proj", "2048-2048-2048", "--optimizer", "sgd", "--wd", "1e-5", "--fix-pred-lr"]
BYOL = ["--proj", "4096-256", "--wd", "1e-5", "--tau-base", "0.97", *LARS]
METHODS = [
    ("decorr", "decorr", DECORR, 0.3, "the paper, sec. 5.1 and Table 5; decorr.py's small-data profile"),
    ("barlowtwins", "barlowtwins", BARLOW_TWINS, 0.3, "solo-learn cifar/barlow.yaml"),
    ("vicreg", "vicreg", VICREG, 0.3, "solo-learn cifar/vicreg.yaml"),
    ("simsiam", "simsiam", SIMSIAM, 0.5, "solo-learn cifar/simsiam.yaml; --fix-pred-lr: the official"),
    ("byol", "byol", BYOL, 1.0, "solo-learn cifar/byol.yaml; tau 0.97: deepmind's 40-epoch preset"),
]
# The bridge: a method run again with the linear predictor, at the lr chosen for the method.
BRIDGE = [("simsiam-linear", "simsiam"), ("byol-linear", "byol")]
GRID = (1 / 3, 1, 3)  # the lrs tried, relative to the recipe's
EXTEND = 2  # where the best lr is at an end of the grid, up to this many more steps of 3x past it
DEFAULT_RUN = []  # `python decorr.py`: the README's quick start
FLOOR = ["--arch", "resnet18", "--data", "synthetic"]  # the runs' backbone and data, untrained
EXTRA = ("random-init", "default-run")  # the --only names of the floor and the default run


def parse_args(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--epochs", type=int, default=4, help="the image budget of every run, in epochs (default 4: 76 steps)")
    a("--warmup-steps", type=int, default=10, help="every run's warm-up from lr 0, in steps (default 10)")
    a("--seeds", type=int, default=3, help="seeds at the chosen lr, and of the floor and default run (3)")
    a("--holdout", type=int, default=1000, help="training images held out to choose the lr (default 1000)")
    a("--out", default="compare", help="folder of the runs, results.jsonl and the tables (default compare)")
    a("--diag-every", type=int, default=5, help="diagnostics every N steps (default 5)")
    a("--only", nargs="+", default=None, help="these names only (default: all)")
    args = p.parse_args(argv)
    names = [method[0] for method in METHODS] + [name for name, _ in BRIDGE] + list(EXTRA)
    unknown = [name for name in args.only or [] if name not in names]
    if unknown:
        p.error(f"--only {' '.join(unknown)}: no such run (the runs: {' '.join(names)})")
    for name in ("epochs", "seeds", "holdout", "diag_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.warmup_steps < 0:
        p.error(f"--warmup-steps must be at least 0, got {args.warmup_steps}")
    return args


def wanted(args, name):
    return args.only is None or name in args.only


def method_named(name):
    for method in METHODS:
        if method[0] == name:
            return method
    raise KeyError(name)


def grid_lrs(recipe_lr, multiples=GRID):
    """The grid's lrs for a recipe lr, to 4 significant digits: 0.3 -> [0.1, 0.3, 0.9]."""
    return [float(f"{recipe_lr * multiple:.4g}") for multiple in multiples]


def best_lr(rows):
    """The lr of the best held-out probe top-1 among the finished rows ({lr: row or None}); a tie goes
    to the lower lr; None if none finished."""
    finished = [(row["top1"], -lr) for lr, row in rows.items() if row is not None and row["status"] == "done"]
    return -max(finished)[1] if finished else None


def digest(*parts):
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:10]


# ----------------------------------------------------------------------------- running


def run_command(command, log_path):
    """Run a command, its output shown as it comes and appended to log_path: (exit code, output,
    seconds)."""
    print("+", " ".join(command[1:]), flush=True)
    started = time.time()
    environment = dict(os.environ, PYTHONUNBUFFERED="1")
    lines = []
    with open(log_path, "a") as log:
        child = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment
        )
        try:
            for line in child.stdout:
                log.write(line)
                lines.append(line)
                print("    " + line, end="", flush=True)
        except KeyboardInterrupt:  # Ctrl-C reached the child too: decorr.py writes its checkpoint
            child.wait()
            raise
        child.wait()
    return child.returncode, "".join(lines), time.time() - started


def last_line(output):
    lines = output.strip().splitlines()
    return lines[-1] if lines else ""


def last_json_line(output):
    lines = [line for line in output.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])


class Protocol:
    """The rows done so far (results.jsonl), and the runs and evaluations that make new ones. A row's
    key is a digest of the training command (without --out) and of the probe's flags."""

    def __init__(self, args):
        self.args = args
        self.results_path = os.path.join(args.out, "results.jsonl")
        self.rows = {row["key"]: row for row in read_jsonl(self.results_path)}
        self.started = time.time()
        self.made = 0

    def add(self, row):
        self.rows[row["key"]] = row
        with open(self.results_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        self.made += 1
        minutes = (time.time() - self.started) / 60
        print(
            f"compare.py: row {self.made} of this call after {minutes:.1f} min: {row['name']}, {row['stage']}"
        )

    def train_flags(self, loss, flags, lr, seed):
        """decorr.py's flags for a run of the protocol, all but --out."""
        args = self.args
        command = ["--loss", loss, *flags, "--lr", str(lr), "--seed", str(seed)]
        command += ["--epochs", str(args.epochs), "--warmup-steps", str(args.warmup_steps)]
        return command + ["--diag-every", str(args.diag_every), "--log-every", "1"]

    def method_flags(self, name, lr, seed, predictor=None):
        _, loss, flags, _, _ = method_named(name)
        if predictor:
            flags = [*flags, "--predictor", predictor]
        return self.train_flags(loss, flags, lr, seed)

    def probe_flags(self, evaluation):
        """lineval.py's flags: 'holdout', the probe and 20-NN on held-out training images, or 'val'."""
        if evaluation == "holdout":
            return ["--knn", "20", "--holdout", str(self.args.holdout)]
        return ["--knn", "20"]

    def row(self, train_flags, evaluation):
        return self.rows.get(digest(train_flags, self.probe_flags(evaluation)))

    def evaluate(self, stage, name, train_flags, evaluation, folder_name, **fields):
        """The row of one run and one probe; the run is trained first unless it was."""
        args = self.args
        probe_flags = self.probe_flags(evaluation)
        key = digest(train_flags, probe_flags)
        if key in self.rows:
            return self.rows[key]
        folder = os.path.join(args.out, "runs", f"{folder_name}_{digest(train_flags)}")
        os.makedirs(folder, exist_ok=True)
        log_path = os.path.join(folder, "compare.log")
        row = dict(key=key, stage=stage, name=name, **fields, evaluation=evaluation)
        row.update(flags=" ".join(train_flags), folder=os.path.relpath(folder, args.out))
        print(f"compare.py: {name}, {stage}, {folder_name}, probed on {evaluation}", flush=True)
        if self.train(train_flags, folder, log_path, row):
            command = [sys.executable, "lineval.py", folder, *probe_flags]
            code, output, _ = run_command(command, log_path)
            if code != 0:
                sys.exit(f"compare.py: lineval.py failed (exit {code}: {last_line(output)}); see {log_path}")
            result = last_json_line(output)
            row.update(top1=result["top1"], top5=result["top5"], knn_top1=result["knn_top1"])
            diagnostics = [r for r in read_jsonl(os.path.join(folder, "log.jsonl")) if "corr_dist" in r]
            last = diagnostics[-1]
            row.update(step=last["step"], corr_dist=last["corr_dist"])
            row.update(eff_rank_backbone=last["eff_rank_backbone"], bridge_dist=last.get("bridge_dist"))
            row["bridge_align"] = last.get("bridge_align")
        self.add(row)
        return row

    def train(self, train_flags, folder, log_path, row):
        """Train the run unless this protocol finished it (its wall time is kept in the folder); a
        stopped run resumes from its checkpoint. False, with the row marked, when the run diverged."""
        timing_path = os.path.join(folder, "compare_train.json")
        if not os.path.exists(timing_path):
            resumed = os.path.exists(os.path.join(folder, "checkpoint.pt"))
            command = [sys.executable, "decorr.py", *train_flags, "--out", folder]
            code, output, seconds = run_command(command, log_path)
            reason = last_line(output)
            if code == 0 and "stopped by signal" in reason:
                sys.exit(f"compare.py: {reason.split(':')[0]}; the same command continues the comparison")
            if code == 1 and "non-finite" in reason:
                row.update(status="diverged", reason=reason, train_s=round(seconds), resumed=resumed)
                return False
            if code != 0:
                sys.exit(f"compare.py: decorr.py failed (exit {code}: {reason}); see {log_path}")
            with open(timing_path, "w") as fh:
                json.dump(dict(train_s=round(seconds), resumed=resumed), fh)
        with open(timing_path) as fh:
            row.update(json.load(fh))
        row["status"] = "done"
        return True

    def method_run(self, stage, name, lr, seed, evaluation, predictor=None):
        recipe_lr = method_named(name)[3]
        row_name = name if predictor is None else f"{name}-{predictor}"
        train_flags = self.method_flags(name, lr, seed, predictor)
        fields = dict(lr=lr, times_recipe=round(lr / recipe_lr, 4), seed=seed)
        return self.evaluate(
            stage, row_name, train_flags, evaluation, f"{row_name}_lr{lr:g}_seed{seed}", **fields
        )

    def grid(self, name):
        """The multiples of the recipe lr that the method's grid holds, and their held-out rows (None
        where not yet made). GRID first; while its best lr is at an end (EXTEND times at most), the
        next multiple past that end, 3x further, joins it: the same rule for every method."""
        multiples = list(GRID)
        while True:
            lrs = grid_lrs(method_named(name)[3], multiples)
            rows = {lr: self.row(self.method_flags(name, lr, 0), "holdout") for lr in lrs}
            best = best_lr(rows)
            extended = len(multiples) - len(GRID)
            if None in rows.values() or best is None or extended == EXTEND:
                return multiples, rows
            if best == lrs[0]:
                multiples.insert(0, multiples[0] / 3)
            elif best == lrs[-1]:
                multiples.append(multiples[-1] * 3)
            else:
                return multiples, rows

    def grid_rows(self, name):
        return self.grid(name)[1]

    def chosen_lr(self, name):
        """The grid's lr with the best held-out probe top-1; None while the grid is unfinished or if
        every lr diverged."""
        rows = self.grid_rows(name)
        if None in rows.values():
            return None
        return best_lr(rows)

    def seed_rows(self, name, predictor=None, seeds=None):
        """The val rows made at a method's chosen lr, by seed (seed 0 only for a linear predictor)."""
        lr = self.chosen_lr(name)
        if lr is None:
            return []
        rows = [
            self.row(self.method_flags(name, lr, seed, predictor), "val") for seed in seeds or self.seeds()
        ]
        return [row for row in rows if row is not None]

    def seeds(self):
        return range(self.args.seeds)

    def floor_flags(self, seed):
        return ["--random-init", *FLOOR, "--seed", str(seed)]

    def floor(self, seed, evaluation="val"):
        """The untrained network's probe, its BatchNorm statistics estimated: on the val set, or on the
        held-out training images (the grid's floor)."""
        args = self.args
        key = digest(self.floor_flags(seed), self.probe_flags(evaluation))
        if key in self.rows:
            return self.rows[key]
        log_path = os.path.join(args.out, "random_init.log")
        command = [sys.executable, "lineval.py", *self.floor_flags(seed), *self.probe_flags(evaluation)]
        code, output, _ = run_command(command, log_path)
        if code != 0:
            sys.exit(f"compare.py: lineval.py failed (exit {code}: {last_line(output)}); see {log_path}")
        result = last_json_line(output)
        row = dict(key=key, stage="floor", name="random init", seed=seed, evaluation=evaluation)
        row.update(status="done", flags=" ".join(self.floor_flags(seed)), bn_passes=result["bn_passes"])
        row.update(top1=result["top1"], top5=result["top5"], knn_top1=result["knn_top1"])
        self.add(row)
        return row

    def floor_rows(self, evaluation="val"):
        keys = [digest(self.floor_flags(seed), self.probe_flags(evaluation)) for seed in self.seeds()]
        return [self.rows[key] for key in keys if key in self.rows]

    def default_flags(self, seed):
        return [*DEFAULT_RUN, "--seed", str(seed)]

    def default_run(self, seed):
        name = "decorr (default run)"
        return self.evaluate(
            "default", name, self.default_flags(seed), "val", f"default_seed{seed}", seed=seed
        )

    def default_rows(self):
        rows = [self.row(self.default_flags(seed), "val") for seed in self.seeds()]
        return [row for row in rows if row is not None]


def run_protocol(protocol):
    """The protocol's steps in order (the module's docstring)."""
    args = protocol.args
    if wanted(args, "random-init"):
        for seed in protocol.seeds():
            protocol.floor(seed)
        protocol.floor(0, "holdout")
    names = [name for name, *_ in METHODS if wanted(args, name)]
    for name in names:
        missing = [None]
        while missing:  # the grid, then each step past an end that its best lr asks for
            missing = [lr for lr, row in protocol.grid_rows(name).items() if row is None]
            for lr in missing:
                protocol.method_run("grid", name, lr, 0, "holdout")
    for name in names:
        lr = protocol.chosen_lr(name)
        if lr is None:
            print(f"compare.py: {name} diverged at every lr of its grid: no seeds", flush=True)
            continue
        print(f"compare.py: {name}: lr {lr:g} chosen on the held-out images", flush=True)
        for seed in protocol.seeds():
            protocol.method_run("seeds", name, lr, seed, "val")
    for variant, base in BRIDGE:
        lr = protocol.chosen_lr(base)
        if wanted(args, variant) and lr is not None:
            protocol.method_run("bridge", base, lr, 0, "val", predictor="linear")
    if wanted(args, "default-run"):
        for seed in protocol.seeds():
            protocol.default_run(seed)


# ----------------------------------------------------------------------------- tables and pictures


def number(value, digits):
    if value is None:
        return "-"
    return f"{value:.{digits}f}"


def mean_sd(values, digits=1):
    """'mean ± sd' (the sample sd) of the values, or the value alone for one."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def summary_line(label, lr_text, rows):
    """A table line: the mean ± sd over rows of a run's numbers; diverged runs are counted apart."""
    done = [row for row in rows if row["status"] == "done"]
    diverged = len(rows) - len(done)
    walls = [row["train_s"] for row in done if row.get("train_s") is not None]
    cells = [
        label,
        lr_text,
        mean_sd([row["top1"] for row in done]),
        mean_sd([row["top5"] for row in done]),
        mean_sd([row["knn_top1"] for row in done]),
        mean_sd([row["corr_dist"] for row in done if row.get("corr_dist") is not None]),
        mean_sd([row["eff_rank_backbone"] for row in done if row.get("eff_rank_backbone") is not None]),
        f"{len(done)}" + (f" (+{diverged} diverged)" if diverged else ""),
        f"{statistics.mean(walls):.0f} s" if walls else "-",
    ]
    return "| " + " | ".join(cells) + " |"


TABLE_COLUMNS = ["run", "lr (x recipe)", "probe top-1", "top-5", "20-NN", "corr_dist", "eff. rank"]
TABLE_COLUMNS += ["seeds", "wall a run"]


def table(protocol):
    """Each method at its chosen lr, mean ± sd over the seeds; the bridge runs; the default run; the
    floor. Probes on the val set."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for name, _, _, recipe_lr, _ in METHODS:
        rows = protocol.seed_rows(name)
        if rows:
            lr = protocol.chosen_lr(name)
            lines.append(summary_line(name, f"{lr:g} ({lr / recipe_lr:.3g}x)", rows))
    for variant, base in BRIDGE:
        rows = protocol.seed_rows(base, predictor="linear", seeds=[0])
        if rows:
            lr = protocol.chosen_lr(base)
            lines.append(summary_line(variant, f"{lr:g} (as {base})", rows))
    rows = protocol.default_rows()
    if rows:
        lines.append(summary_line("decorr, `python decorr.py`", "0.3 (its default)", rows))
    rows = protocol.floor_rows()
    if rows:
        lines.append(summary_line(f"random init ({rows[0]['bn_passes']} BN passes)", "-", rows))
    return "\n".join(lines) + "\n"


GRID_COLUMNS = ["method", "lr", "x recipe", "held-out probe top-1", "held-out 20-NN", "corr_dist"]
GRID_COLUMNS += ["eff. rank", "wall", "chosen"]


def grid_table(protocol):
    """Every grid run (seed 0) with its held-out probe, and the lr chosen; the floor on the same images."""
    lines = ["| " + " | ".join(GRID_COLUMNS) + " |", "|" + "---|" * len(GRID_COLUMNS)]
    for row in protocol.floor_rows("holdout")[:1]:
        numbers = [f"{row['top1']:.1f} %", f"{row['knn_top1']:.1f} %"]
        lines.append("| " + " | ".join(["random init", "-", "-", *numbers, "-", "-", "-", ""]) + " |")
    for name, _, _, recipe_lr, _ in METHODS:
        chosen = protocol.chosen_lr(name)
        for lr, row in protocol.grid_rows(name).items():
            if row is None:
                continue
            if row["status"] == "done":
                numbers = [f"{row['top1']:.1f} %", f"{row['knn_top1']:.1f} %", number(row["corr_dist"], 2)]
                numbers.append(number(row["eff_rank_backbone"], 1))
            else:
                numbers = ["diverged", "-", "-", "-"]
            cells = [name, f"{lr:g}", f"{lr / recipe_lr:.3g}", *numbers, f"{row['train_s']} s"]
            cells.append("yes" if lr == chosen else "")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def new_figure(width, height, columns):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure, figure.subplots(1, columns)


def diagnostics_of(protocol, row):
    return [
        r for r in read_jsonl(os.path.join(protocol.args.out, row["folder"], "log.jsonl")) if "corr_dist" in r
    ]


def draw_fig1(protocol, png_path):
    """The paper's Fig. 1, small: corr_dist of the backbone's features (on the diagnostics' fixed val
    batch) against the step, and the backbone's effective rank; one line per method at its chosen lr,
    the mean over its seeds, shaded between the lowest and the highest seed."""
    figure, panels = new_figure(9, 3.2, 2)
    for name, *_ in METHODS:
        rows = [row for row in protocol.seed_rows(name) if row["status"] == "done"]
        if not rows:
            continue
        logs = [diagnostics_of(protocol, row) for row in rows]
        steps = [r["step"] for r in logs[0]]
        for axes, key in zip(panels, ("corr_dist", "eff_rank_backbone")):
            series = [[r[key] for r in log] for log in logs if len(log) == len(steps)]
            mean = [statistics.mean(values) for values in zip(*series)]
            lines = axes.plot(steps, mean, marker=".", label=f"{name}, lr {protocol.chosen_lr(name):g}")
            low = [min(values) for values in zip(*series)]
            high = [max(values) for values in zip(*series)]
            axes.fill_between(steps, low, high, color=lines[0].get_color(), alpha=0.15)
    titles = ("corr_dist of the backbone (Fig. 1; 0: decorrelated)", "effective rank of the backbone")
    for axes, title in zip(panels, titles):
        axes.set_title(title, fontsize=9)
        axes.set_xlabel("step", fontsize=8)
        axes.tick_params(labelsize=8)
    panels[0].set_yscale("log")
    panels[1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(png_path, format="png")


def draw_bridge(protocol, png_path):
    """bridge_dist and bridge_align against the step for every run with a linear predictor: decorr
    and the bridge runs, at their chosen lr, seed 0."""
    figure, panels = new_figure(8, 3, 2)
    runs = [("decorr", protocol.seed_rows("decorr", seeds=[0]))]
    runs += [(variant, protocol.seed_rows(base, predictor="linear", seeds=[0])) for variant, base in BRIDGE]
    for label, rows in runs:
        if not rows or rows[0]["status"] != "done":
            continue
        log = [r for r in diagnostics_of(protocol, rows[0]) if "bridge_dist" in r]
        steps = [r["step"] for r in log]
        for axes, key in zip(panels, ("bridge_dist", "bridge_align")):
            axes.plot(steps, [r[key] for r in log], marker=".", label=f"{label}, lr {rows[0]['lr']:g}")
    titles = ("bridge_dist (0: W^T W proportional to F)", "bridge_align (1: aligned)")
    for axes, title in zip(panels, titles):
        axes.set_title(title, fontsize=9)
        axes.set_xlabel("step", fontsize=8)
        axes.tick_params(labelsize=8)
    panels[1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(png_path, format="png")


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    protocol = Protocol(args)
    run_protocol(protocol)
    text = table(protocol)
    with open(os.path.join(args.out, "table.md"), "w") as fh:
        fh.write(text)
    with open(os.path.join(args.out, "grid.md"), "w") as fh:
        fh.write(grid_table(protocol))
    draw_fig1(protocol, os.path.join(args.out, "fig1.png"))
    draw_bridge(protocol, os.path.join(args.out, "bridge.png"))
    print(text)


if __name__ == "__main__":
    try:
        main()
    except UsageError as e:
        print(f"compare.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("compare.py: stopped by Ctrl-C; the same command continues the comparison", file=sys.stderr)
        sys.exit(130)
