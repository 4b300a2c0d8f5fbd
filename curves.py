"""Watching a run: curves.png drawn from log.jsonl, wp.png drawn from the linear predictor W_p, and
optional logging to Weights & Biases.

decorr.py's rank 0 calls draw_curves after every diagnostics pass and at the end of the run, and the
wandb_* functions when --wandb is given; draw_wp draws a linear predictor's W_p at a diagnostics pass.
Neither matplotlib nor wandb is imported until it is used: a run that never draws or logs pays nothing
for them.
"""

import json
import math
import os

import torch

from data import UsageError, atomic_write

# the keys of a training row that are not loss terms; any other number in such a row is a term
TRAINING_KEYS = ("epoch", "step", "loss", "lr", "img_per_s", "bad_images")
# the panels of a diagnostics row, in order: (title, keys drawn in it); keys not named here get a panel each
DIAGNOSTICS_PANELS = (
    ("knn_top1 (%)", ("knn_top1",)),
    ("corr_dist", ("corr_dist",)),
    ("effective rank", ("eff_rank_proj", "eff_rank_backbone")),
    ("feat_std", ("feat_std",)),
    ("wp_offdiag", ("wp_offdiag",)),
    ("bridge_dist", ("bridge_dist",)),
    ("bridge_align", ("bridge_align",)),
)
DIAGNOSTICS_NOT_DRAWN = ("epoch", "step", "diag_s")
# the panels meant for more than one curve: their curves are named in a legend even when only one is logged
SHARED_PANELS = [title for title, keys in DIAGNOSTICS_PANELS if len(keys) > 1]
COLUMNS = 3
# a linear-scale panel's y axis shows at least this fraction of the largest magnitude of its values
MINIMUM_SPAN = 0.05
# wp.png shows W_p average-pooled to at most this many rows and columns
WP_SIZE = 256
WP_TITLES = ("|W_p| (Fig. 3a)", "|W_p| rows / their diagonal entry (Fig. 3b)")
WANDB_MISSING = "--wandb needs the wandb package: pip install wandb"


# ----------------------------------------------------------------------------- reading the log


def is_number(value):
    """A finite int or float (a bool is not a number here)."""
    if isinstance(value, bool):
        return False
    if not isinstance(value, (int, float)):
        return False
    return math.isfinite(value)


def read_log(log_path):
    """The rows of log.jsonl as (training rows, diagnostics rows), each sorted by step with one row per step.

    A line that is not a whole JSON object (the last line, cut by a crash) is skipped. Where a step
    appears twice (a run resumed from an older checkpoint without its log rewritten), the later row wins.
    A missing file reads as no rows.
    """
    training_by_step = {}
    diagnostics_by_step = {}
    if not os.path.exists(log_path):
        return [], []
    with open(log_path, encoding="utf-8") as file:
        for line in file:
            line = line.strip()
            if not line.endswith("}"):
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(row, dict):
                continue
            if not is_number(row.get("step")):
                continue
            if "loss" in row:
                training_by_step[row["step"]] = row
            else:
                diagnostics_by_step[row["step"]] = row
    training_rows = [training_by_step[step] for step in sorted(training_by_step)]
    diagnostics_rows = [diagnostics_by_step[step] for step in sorted(diagnostics_by_step)]
    return training_rows, diagnostics_rows


def extra_keys(rows, known_keys):
    """The numeric keys of rows that are not in known_keys, in the order they first appear."""
    keys = []
    for row in rows:
        for key, value in row.items():
            if key not in known_keys and key not in keys and is_number(value):
                keys.append(key)
    return keys


def series(rows, key):
    """(steps, values) of key over rows, leaving out rows where it is missing or not a finite number."""
    steps = []
    values = []
    for row in rows:
        value = row.get(key)
        if is_number(value):
            steps.append(row["step"])
            values.append(value)
    return steps, values


def curve_panels(log_path):
    """The panels draw_curves draws, as a list of (title, lines, from diagnostics), where lines is a list
    of (label, steps, values), none of them empty. A panel with no data is left out."""
    training_rows, diagnostics_rows = read_log(log_path)
    wanted = [("loss", ("loss",), False)]
    for term in extra_keys(training_rows, TRAINING_KEYS):
        wanted.append((f"loss term: {term}", (term,), False))
    wanted.append(("lr", ("lr",), False))
    wanted.append(("img/s", ("img_per_s",), False))
    diagnostics_known = set(DIAGNOSTICS_NOT_DRAWN)
    for title, keys in DIAGNOSTICS_PANELS:
        wanted.append((title, keys, True))
        diagnostics_known.update(keys)
    for key in extra_keys(diagnostics_rows, diagnostics_known):
        wanted.append((key, (key,), True))
    panels = []
    for title, keys, from_diagnostics in wanted:
        rows = diagnostics_rows if from_diagnostics else training_rows
        lines = []
        for key in keys:
            steps, values = series(rows, key)
            if steps:
                lines.append((key, steps, values))
        if lines:
            panels.append((title, lines, from_diagnostics))
    return panels


# ----------------------------------------------------------------------------- drawing


def wants_log_scale(lines):
    """Log scale for a panel whose values are all positive and span more than two decades."""
    values = [value for _, _, line_values in lines for value in line_values]
    if min(values) <= 0:
        return False
    return max(values) / min(values) > 100


def widened_view(lines, margin):
    """The y limits (bottom, top) of a linear-scale panel whose values barely move, or None for a panel
    that keeps matplotlib's own limits.

    The rule: the y axis shows at least MINIMUM_SPAN (5 %) of the largest magnitude of the panel's
    values, so that noise in a value that hardly moves (bridge_dist from 1.410 to 1.413) is not drawn
    across the whole panel as if it were a trend. matplotlib's own view is the values' span with `margin`
    of it added above and below; where that is narrower than the minimum, the view is the minimum,
    centred on the values. A panel whose view is at least the minimum (one that moves), or whose values
    are all 0, is left to matplotlib.
    """
    values = [value for _, _, line_values in lines for value in line_values]
    low = min(values)
    high = max(values)
    minimum_span = MINIMUM_SPAN * max(abs(low), abs(high))
    if (high - low) * (1 + 2 * margin) >= minimum_span:
        return None
    centre = (low + high) / 2
    return centre - minimum_span / 2, centre + minimum_span / 2


def range_text(lines):
    """The range of a panel's values for its title: "1.410 to 1.413", with as many decimals as the first
    digit of the span needs; "0.5 throughout" for values that do not move, "0.5" for a single value."""
    values = [value for _, _, line_values in lines for value in line_values]
    low = min(values)
    high = max(values)
    if len(values) == 1:
        return f"{low:.4g}"
    if low == high:
        return f"{low:.4g} throughout"
    decimals = max(0, math.ceil(-math.log10(high - low)))
    return f"{low:.{decimals}f} to {high:.{decimals}f}"


def draw_curves(log_path, png_path):
    """Draw log.jsonl's curves as small panels on one step axis (from step 0) and write them to png_path
    atomically. Returns the titles of the panels drawn (an empty list: a log with no data yet, drawn as a
    picture that says so)."""
    # imported here: decorr.py imports this file, and most of its commands never draw
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    panels = curve_panels(log_path)
    columns = max(1, min(COLUMNS, len(panels)))
    rows = max(1, math.ceil(len(panels) / columns))
    figure = Figure(figsize=(3.4 * columns, 2.3 * rows + 0.6), dpi=100)
    FigureCanvasAgg(figure)
    run_name = os.path.basename(os.path.dirname(os.path.abspath(log_path)))
    if not panels:
        figure.text(0.5, 0.5, f"{run_name}: no data yet in {os.path.basename(log_path)}", ha="center")
    last_step = 0
    for _, lines, _ in panels:
        for _, steps, _ in lines:
            last_step = max(last_step, steps[-1])
    # the same step axis in every panel: set in each, not shared (shared axes cost a quadratic layout)
    right = max(last_step, 1) * 1.02
    for index, (title, lines, from_diagnostics) in enumerate(panels):
        axes = figure.add_subplot(rows, columns, index + 1)
        for label, steps, values in lines:
            marker = "o" if from_diagnostics or len(steps) == 1 else None
            axes.plot(steps, values, marker=marker, markersize=3, linewidth=1.2, label=label)
        axes.set_xlim(0, right)
        axes.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
        shown_title = title
        if title.startswith("loss") and wants_log_scale(lines):
            axes.set_yscale("log")
        else:
            axes.yaxis.set_major_locator(MaxNLocator(nbins=4))
            view = widened_view(lines, axes.margins()[1])
            if view is not None:
                axes.set_ylim(*view)
                shown_title = f"{title} ({range_text(lines)})"
        if len(lines) > 1 or title in SHARED_PANELS:
            axes.legend(fontsize=7, frameon=False)
        axes.set_title(shown_title, fontsize=9, y=1.0, pad=4)  # a fixed place: matplotlib skips placing it
        axes.tick_params(labelsize=7)
        axes.yaxis.get_offset_text().set_fontsize(7)
        axes.grid(alpha=0.3)
        if index >= len(panels) - columns:
            axes.set_xlabel("step", fontsize=8)
    if panels:
        figure.suptitle(f"{run_name}: step {last_step}", fontsize=10)
        figure.subplots_adjust(
            left=0.07,
            right=0.98,
            top=1 - 0.75 / figure.get_figheight(),
            bottom=0.45 / figure.get_figheight(),
            hspace=0.6,
            wspace=0.3,
        )
    atomic_write(png_path, lambda file: figure.savefig(file, format="png"))
    figure.clear()
    return [title for title, _, _ in panels]


# ----------------------------------------------------------------------------- wp.png


def pool_columns(matrix, size):
    """matrix (R x C) with its columns averaged down to size columns (R x size), in the windows of
    torch's adaptive average pooling (C / size columns each where size divides C)."""
    return torch.nn.functional.adaptive_avg_pool1d(matrix[None], size)[0]


def wp_pictures(w, size=WP_SIZE):
    """The two pictures of wp.png (Appendix C, Fig. 3) as float32 CPU tensors: (a) |W_p| and (b) |W_p|
    with each row divided by its diagonal entry, |w_ij / w_ii|. Where W_p has more than size rows, each
    is average-pooled to size x size (the mean of the magnitudes over blocks of W_p); where it has no
    more, they are the magnitudes themselves."""
    w = w.detach().float().cpu()
    magnitudes = w.abs()
    diagonal = magnitudes.diagonal()[:, None]
    if len(w) <= size:
        return magnitudes, magnitudes / diagonal
    # the columns pooled first, then the rows: the same block means as adaptive_avg_pool2d, and each row's
    # division by its diagonal entry is done on D x size numbers, not D x D (D = 8192: twice as fast)
    pooled_columns = pool_columns(magnitudes, size)
    pooled_magnitudes = pool_columns(pooled_columns.T, size).T
    pooled_relative = pool_columns((pooled_columns / diagonal).T, size).T
    return pooled_magnitudes, pooled_relative


def draw_wp(w, step, png_path):
    """Draw W_p (D x D) at a training step as wp.png and write it to png_path atomically: two panels,
    (a) |W_p| and (b) |W_p| with each row divided by its diagonal entry (Appendix C, Fig. 3), each with a
    colour bar, their axes numbered as W_p's rows and columns. A W_p larger than WP_SIZE is shown pooled
    (wp_pictures), and the title says so. A zero diagonal entry leaves its row of (b) blank.

    Returns the Figure, for a caller that wants to read what was drawn; it is freed when dropped."""
    # imported here, as in draw_curves
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pictures = wp_pictures(w)
    rows = len(w)
    title = f"W_p at step {step}: {rows} x {rows}"
    if len(pictures[0]) < rows:
        title += f", shown pooled to {len(pictures[0])} x {len(pictures[0])}"
    figure = Figure(figsize=(10, 4.8), dpi=100)
    FigureCanvasAgg(figure)
    for index, (panel_title, picture) in enumerate(zip(WP_TITLES, pictures)):
        axes = figure.add_subplot(1, 2, index + 1)
        # extent: the axes count W_p's rows and columns, whatever the pooling
        image = axes.imshow(
            picture.numpy(), cmap="viridis", vmin=0, interpolation="nearest", extent=(0, rows, rows, 0)
        )
        colour_bar = figure.colorbar(image, ax=axes, fraction=0.046, pad=0.03)
        colour_bar.ax.tick_params(labelsize=7)
        axes.set_title(panel_title, fontsize=10)
        axes.set_xlabel("column j", fontsize=8)
        axes.set_ylabel("row i", fontsize=8)
        axes.tick_params(labelsize=7)
    figure.suptitle(title, fontsize=11)
    figure.subplots_adjust(left=0.06, right=0.94, top=0.86, bottom=0.1, wspace=0.3)
    atomic_write(png_path, lambda file: figure.savefig(file, format="png"))
    return figure


# ----------------------------------------------------------------------------- Weights & Biases


def check_wandb():
    """The wandb module; UsageError (one line: how to install it) where it cannot be imported."""
    try:
        import wandb
    except ImportError:
        raise UsageError(WANDB_MISSING) from None
    return wandb


def wandb_start(project, name, config, out_dir, resume):
    """Start (or, resuming, continue) the W&B run of the run in out_dir, and return it.

    The W&B run id is kept in out_dir/wandb_id.txt: with resume true and that file there, the same
    W&B run goes on; otherwise a new one starts and its id replaces the file's. W&B's own files go in
    out_dir/wandb. WANDB_MODE=offline keeps everything there, to `wandb sync` later.
    """
    wandb = check_wandb()
    os.makedirs(out_dir, exist_ok=True)
    id_path = os.path.join(out_dir, "wandb_id.txt")
    run_id = None
    if resume and os.path.exists(id_path):
        with open(id_path, encoding="utf-8") as file:
            run_id = file.read().strip() or None
    try:
        run = wandb.init(
            project=project,
            name=name,
            config=dict(config),
            dir=out_dir,
            id=run_id,
            resume="allow" if run_id else None,
        )
    except wandb.errors.Error as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(
            f"--wandb: {message} (or set WANDB_MODE=offline to log to {out_dir}/wandb)"
        ) from None
    atomic_write(id_path, lambda file: file.write((run.id + "\n").encode()))
    return run


def wandb_log(run, row, step):
    """Log a row of numbers (a line of log.jsonl) to the W&B run at the training step."""
    run.log(dict(row), step=int(step))


def wandb_images(run, paths, step):
    """Log those of the PNG files in paths that exist as W&B images keyed by their file stem
    (curves.png: "curves"), at the training step."""
    wandb = check_wandb()
    images = {}
    for path in paths:
        if os.path.exists(path):
            stem = os.path.splitext(os.path.basename(path))[0]
            images[stem] = wandb.Image(path)
    if images:
        run.log(images, step=int(step))


def wandb_finish(run):
    """Finish the W&B run and wait until wandb has written (or, online, sent) all of it: run.finish()
    alone can return before the offline run's file is complete."""
    wandb = check_wandb()
    run.finish()
    wandb.teardown()
