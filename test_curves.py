"""Tests of curves.py: curves.png drawn from log.jsonl, wp.png drawn from W_p, and the optional W&B
logging, run with the real wandb package in offline mode and its offline run read back from the files it
leaves."""

import gc
import json
import math
import os
import struct
import subprocess
import sys
import warnings
import weakref
from pathlib import Path

import numpy
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
import curves  # noqa: E402
from data import UsageError  # noqa: E402

EVERY_PANEL = [
    "loss",
    "loss term: inv",
    "loss term: cov",
    "lr",
    "img/s",
    "knn_top1 (%)",
    "corr_dist",
    "effective rank",
    "feat_std",
    "wp_offdiag",
    "bridge_dist",
    "bridge_align",
]


def training_row(step, loss=None, **terms):
    """A line of log.jsonl as decorr.py writes it after a logged step (decorr's terms by default)."""
    if loss is None:
        loss = 5.0 * math.exp(-step / 20) + 1.0
    if not terms:
        terms = dict(inv=loss / 3, cov=2 * loss / 3)
    return dict(
        epoch=step // 50,
        step=step,
        loss=loss,
        **terms,
        lr=0.3 * min(1, step / 10),
        img_per_s=900.0 + step,
        bad_images=0,
    )


def diagnostics_row(step, **extra):
    """A line of log.jsonl as decorr.py writes it after a diagnostics pass."""
    return dict(
        epoch=step // 50,
        step=step,
        corr_dist=10.0 / step,
        eff_rank_proj=5.0 + step / 10,
        eff_rank_backbone=20.0 + step / 10,
        feat_std=0.5,
        wp_offdiag=0.01 * step,
        knn_top1=10.0 + step / 8,
        diag_s=0.4,
        **extra,
    )


def write_log(path, rows, tail=""):
    """log.jsonl with rows, one JSON object a line, then tail (a line cut by a crash)."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + tail)
    return path


def decorr_log(path, training_steps=80, diagnostics_every=16, bridge=True):
    """A decorr run's log: training rows every 10 steps, a diagnostics row every diagnostics_every rows."""
    rows = []
    for index in range(1, training_steps + 1):
        rows.append(training_row(10 * index))
        if index % diagnostics_every == 0:
            extra = dict(bridge_dist=1.0 / index, bridge_align=0.5 + index / 200) if bridge else {}
            rows.append(diagnostics_row(10 * index, **extra))
    return write_log(path, rows)


def panel(panels, title):
    """The lines of the panel with that title, as {label: (steps, values)}."""
    for panel_title, lines, _ in panels:
        if panel_title == title:
            return {label: (steps, values) for label, steps, values in lines}
    raise KeyError(title)


def draw(tmp_path, log_path):
    """draw_curves with every warning an error; checks curves.png is a whole PNG and nothing else was left."""
    png_path = tmp_path / "curves.png"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        titles = curves.draw_curves(str(log_path), str(png_path))
    with Image.open(png_path) as image:
        image.verify()
    with Image.open(png_path) as image:
        assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 200
    assert not [name for name in os.listdir(tmp_path) if ".tmp" in name]
    return titles


# ----------------------------------------------------------------------------- curves.png


def test_every_panel(tmp_path):
    """A decorr run's log draws every panel, each from the rows it belongs to."""
    log_path = decorr_log(tmp_path / "log.jsonl", training_steps=20, diagnostics_every=10)
    assert draw(tmp_path, log_path) == EVERY_PANEL
    panels = curves.curve_panels(str(log_path))
    assert panel(panels, "loss")["loss"][0] == list(range(10, 201, 10))
    assert panel(panels, "loss term: cov")["cov"][1][0] == pytest.approx(training_row(10)["cov"])
    assert panel(panels, "knn_top1 (%)")["knn_top1"] == ([100, 200], [22.5, 35.0])
    assert set(panel(panels, "effective rank")) == {"eff_rank_proj", "eff_rank_backbone"}


def test_other_losses_and_unknown_keys(tmp_path):
    """Barlow Twins' and VICReg's terms, and a number no panel names (in either kind of row), get panels."""
    rows = [training_row(step, on_diag=1.0, off_diag=2.0, new_term=0.5) for step in (1, 2, 3)]
    rows.append(diagnostics_row(3, new_figure=7.0))
    titles = draw(tmp_path, write_log(tmp_path / "log.jsonl", rows))
    assert titles[:4] == ["loss", "loss term: on_diag", "loss term: off_diag", "loss term: new_term"]
    assert "new_figure" in titles and "bridge_dist" not in titles
    vicreg = [training_row(step, inv=1.0, var=0.5, cov=0.1) for step in (1, 2)]
    titles = draw(tmp_path, write_log(tmp_path / "log.jsonl", vicreg))
    assert titles == ["loss", "loss term: inv", "loss term: var", "loss term: cov", "lr", "img/s"]


def test_cut_last_line(tmp_path):
    """The last line, cut by a crash, is left out; the rest is drawn."""
    rows = [training_row(step) for step in range(1, 6)] + [diagnostics_row(5)]
    log_path = write_log(tmp_path / "log.jsonl", rows, tail='{"epoch": 0, "step": 6, "loss": 1.2, "in')
    assert "knn_top1 (%)" in draw(tmp_path, log_path)
    assert panel(curves.curve_panels(str(log_path)), "loss")["loss"][0] == [1, 2, 3, 4, 5]


def test_resumed_run_is_one_series(tmp_path):
    """Rows 1..3, then a resumed run's 4..6 in the same log: one series from step 1. A log not rewritten
    after a crash (steps 4, 5 redone) keeps the later rows."""
    log_path = tmp_path / "log.jsonl"
    write_log(log_path, [training_row(step) for step in (1, 2, 3)] + [diagnostics_row(3)])
    with open(log_path, "a") as file:
        for row in [training_row(step) for step in (4, 5, 6)] + [diagnostics_row(6)]:
            file.write(json.dumps(row) + "\n")
    draw(tmp_path, log_path)
    panels = curves.curve_panels(str(log_path))
    assert panel(panels, "loss")["loss"] == (
        [1, 2, 3, 4, 5, 6],
        [training_row(step)["loss"] for step in range(1, 7)],
    )
    assert panel(panels, "corr_dist")["corr_dist"][0] == [3, 6]
    redone = [training_row(step) for step in (1, 2, 3, 4, 5)] + [
        training_row(step, loss=9.0) for step in (4, 5, 6)
    ]
    write_log(log_path, redone, tail='{"step": 7')
    steps, values = panel(curves.curve_panels(str(log_path)), "loss")["loss"]
    assert steps == [1, 2, 3, 4, 5, 6] and values[3:] == [9.0, 9.0, 9.0]


def test_one_point_empty_and_odd_values(tmp_path):
    """One logged step draws (as a marker); an empty or missing log draws a picture that says so; values
    that would warn on a log scale (zero, negative, NaN) or span decades draw without a warning."""
    one = write_log(tmp_path / "log.jsonl", [training_row(1), diagnostics_row(1)])
    assert draw(tmp_path, one)[:2] == ["loss", "loss term: inv"]
    assert draw(tmp_path, write_log(tmp_path / "log.jsonl", [])) == []
    assert draw(tmp_path, tmp_path / "missing.jsonl") == []
    spans = [training_row(step, loss=10.0**-step, inv=0.0, cov=-1.0 * step) for step in range(1, 8)]
    spans.append(training_row(8, loss=float("nan"), inv=float("inf"), cov=1.0))
    assert curves.wants_log_scale(curves.curve_panels(str(write_log(tmp_path / "log.jsonl", spans)))[0][1])
    assert draw(tmp_path, tmp_path / "log.jsonl")[:3] == ["loss", "loss term: inv", "loss term: cov"]
    assert panel(curves.curve_panels(str(tmp_path / "log.jsonl")), "loss")["loss"][0] == list(range(1, 8))


def test_no_figure_kept(tmp_path, monkeypatch):
    """Many redraws keep no matplotlib figure alive (no memory growth over a long run)."""
    import matplotlib.figure

    alive = weakref.WeakSet()
    made = []

    class CountedFigure(matplotlib.figure.Figure):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            alive.add(self)
            made.append(1)

    monkeypatch.setattr(matplotlib.figure, "Figure", CountedFigure)
    log_path = decorr_log(tmp_path / "log.jsonl", training_steps=10, diagnostics_every=5)
    for _ in range(3):
        draw(tmp_path, log_path)
    gc.collect()
    assert len(made) == 3 and len(alive) == 0


def test_nothing_imported_until_used():
    """Importing curves (as decorr.py does) imports neither matplotlib nor wandb."""
    code = "import sys, curves; print(sorted(m for m in ('matplotlib', 'wandb') if m in sys.modules))"
    process = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], cwd=ROOT, capture_output=True, text=True
    )
    assert process.returncode == 0 and process.stdout.strip() == "[]", process.stderr[-2000:]


# ----------------------------------------------------------------------------- curves.png: the y axis


def drawn_axes(tmp_path, log_path, monkeypatch):
    """draw_curves's panels as it saved them: {title as drawn: (y limits, y scale)}."""
    import matplotlib.figure

    drawn = {}

    class RecordingFigure(matplotlib.figure.Figure):
        def savefig(self, *args, **kwargs):
            super().savefig(*args, **kwargs)
            for axes in self.axes:
                drawn[axes.get_title()] = (axes.get_ylim(), axes.get_yscale())

    monkeypatch.setattr(matplotlib.figure, "Figure", RecordingFigure)
    draw(tmp_path, log_path)
    return drawn


def one_line(values):
    """The lines of a panel with one curve of these values."""
    return [("value", list(range(len(values))), values)]


def test_flat_panels_show_the_minimum_span(tmp_path, monkeypatch):
    """bridge_dist moving from 1.4103 to 1.4131 (noise) is drawn on a y axis 5 % of 1.4131 high, centred on
    its values, with its range in the title; so is feat_std, which does not move. Panels that move keep
    matplotlib's own limits (the values' span and 5 % of it above and below) and their titles."""
    rows = []
    for step, bridge_dist in ((10, 1.4103), (20, 1.4131), (30, 1.4118)):
        rows.append(training_row(step))
        rows.append(diagnostics_row(step, bridge_dist=bridge_dist, bridge_align=0.3 + step / 100))
    log_path = write_log(tmp_path / "log.jsonl", rows)
    drawn = drawn_axes(tmp_path, log_path, monkeypatch)
    (bottom, top), scale = drawn["bridge_dist (1.410 to 1.413)"]
    assert scale == "linear"
    assert top - bottom == pytest.approx(0.05 * 1.4131)
    assert (bottom + top) / 2 == pytest.approx((1.4103 + 1.4131) / 2)
    assert drawn["feat_std (0.5 throughout)"][0] == pytest.approx((0.5 - 0.0125, 0.5 + 0.0125))
    assert drawn["bridge_align"] == (pytest.approx((0.4 - 0.01, 0.6 + 0.01)), "linear")
    corr_dist = [10.0 / step for step in (10, 20, 30)]
    span = max(corr_dist) - min(corr_dist)
    assert drawn["corr_dist"][0] == pytest.approx(
        (min(corr_dist) - 0.05 * span, max(corr_dist) + 0.05 * span)
    )
    # the panel names returned stay the panels' names
    assert "bridge_dist" in curves.draw_curves(str(log_path), str(tmp_path / "curves.png"))


def test_log_scale_panels_unchanged(tmp_path, monkeypatch):
    """A loss spanning decades is drawn on a log scale under its own title, its values inside the axis."""
    rows = [training_row(step, loss=10.0**-step, inv=1.0, cov=2.0 + step) for step in range(1, 6)]
    drawn = drawn_axes(tmp_path, write_log(tmp_path / "log.jsonl", rows), monkeypatch)
    (bottom, top), scale = drawn["loss"]
    assert scale == "log"
    assert bottom <= 1e-5 and top >= 0.1
    assert drawn["loss term: inv (1 throughout)"][0] == pytest.approx((0.975, 1.025))
    assert "loss term: cov" in drawn


def test_minimum_span_rule():
    """At the edge of the rule: a view (span and 5 % margins) narrower than 5 % of the largest magnitude is
    widened to that, centred; one as wide is left alone, as are values all 0 and values around 0."""
    assert curves.widened_view(one_line([100.0, 105.0]), 0.05) is None
    bottom, top = curves.widened_view(one_line([100.0, 104.7]), 0.05)
    assert (bottom, top) == pytest.approx((102.35 - 0.05 * 104.7 / 2, 102.35 + 0.05 * 104.7 / 2))
    bottom, top = curves.widened_view(one_line([-1.413, -1.41]), 0.05)
    assert (bottom, top) == pytest.approx((-1.4115 - 0.05 * 1.413 / 2, -1.4115 + 0.05 * 1.413 / 2))
    assert curves.widened_view(one_line([0.0, 0.0]), 0.05) is None
    assert curves.widened_view(one_line([-0.001, 0.001]), 0.05) is None
    assert curves.widened_view(one_line([100.0, 104.7]), 0.1) is None
    assert curves.range_text(one_line([1.4103, 1.4131, 1.4118])) == "1.410 to 1.413"
    assert curves.range_text(one_line([910.0, 930.0])) == "910 to 930"
    assert curves.range_text(one_line([-1.413, -1.41])) == "-1.413 to -1.410"
    assert curves.range_text(one_line([0.5, 0.5])) == "0.5 throughout"
    assert curves.range_text(one_line([32.58881])) == "32.59"


# ----------------------------------------------------------------------------- wp.png

WP_TITLES = ["|W_p| (Fig. 3a)", "|W_p| rows / their diagonal entry (Fig. 3b)"]


def draw_wp(tmp_path, w, step):
    """draw_wp with every warning an error; checks wp.png is a whole PNG and nothing else was left; the
    figure, and its two panels (the axes with a picture)."""
    png_path = tmp_path / "wp.png"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        figure = curves.draw_wp(w, step, str(png_path))
    with Image.open(png_path) as image:
        image.verify()
    with Image.open(png_path) as image:
        assert image.format == "PNG" and image.size[0] > 600 and image.size[1] > 300
    assert not [name for name in os.listdir(tmp_path) if ".tmp" in name]
    panels = [axes for axes in figure.axes if axes.images]
    return figure, panels


def picture(axes):
    """The values drawn in a panel, as a float64 tensor."""
    return torch.from_numpy(numpy.asarray(axes.images[0].get_array(), dtype=numpy.float64))


def test_wp_small(tmp_path):
    """A 3 x 3 W_p (a parameter, with its gradient) is drawn as it is: |W_p| and |w_ij / w_ii| in two titled
    panels under a title with the step, each with a colour bar from 0 to its largest value. The figure is
    freed once dropped. A zero diagonal entry leaves its row of (b) blank, without a warning."""
    w = torch.nn.Parameter(torch.tensor([[2.0, -1.0, 0.5], [0.3, -4.0, 2.0], [-0.1, 0.2, 0.5]]))
    figure, panels = draw_wp(tmp_path, w, 7)
    assert figure.get_suptitle() == "W_p at step 7: 3 x 3"
    assert [axes.get_title() for axes in panels] == WP_TITLES
    magnitudes = torch.tensor([[2.0, 1.0, 0.5], [0.3, 4.0, 2.0], [0.1, 0.2, 0.5]], dtype=torch.float64)
    relative = torch.tensor([[1.0, 0.5, 0.25], [0.075, 1.0, 0.5], [0.2, 0.4, 1.0]], dtype=torch.float64)
    assert torch.allclose(picture(panels[0]), magnitudes)
    assert torch.allclose(picture(panels[1]), relative)
    assert len(figure.axes) == 4
    for axes, largest in zip(panels, (4.0, 1.0)):
        colour_bar = axes.images[0].colorbar
        assert colour_bar is not None and colour_bar.ax in figure.axes
        assert (colour_bar.vmin, colour_bar.vmax) == pytest.approx((0.0, largest))
    freed = weakref.ref(draw_wp(tmp_path, w, 7)[0])
    gc.collect()
    assert freed() is None
    with torch.no_grad():
        w[1, 1] = 0.0
    _, panels = draw_wp(tmp_path, w, 8)
    blank = numpy.ma.getmaskarray(panels[1].images[0].get_array())
    assert blank[1].all() and not blank[0].any() and not blank[2].any()


def test_wp_large_is_pooled(tmp_path):
    """An 8192 x 8192 W_p is drawn pooled to 256 x 256: each value the mean of |W_p| (or |w_ij / w_ii|) over
    a 32 x 32 block, and the title says so."""
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(8192, 8192, generator=generator) + 4 * torch.eye(8192)
    figure, panels = draw_wp(tmp_path, w, 1200)
    assert figure.get_suptitle() == "W_p at step 1200: 8192 x 8192, shown pooled to 256 x 256"
    assert [axes.get_title() for axes in panels] == WP_TITLES
    magnitudes = w.abs()
    expected = magnitudes.reshape(256, 32, 256, 32).mean(dim=(1, 3))
    assert torch.allclose(picture(panels[0]).float(), expected, rtol=1e-5)
    relative = magnitudes / magnitudes.diagonal()[:, None]
    expected = relative.reshape(256, 32, 256, 32).mean(dim=(1, 3))
    assert torch.allclose(picture(panels[1]).float(), expected, rtol=1e-5)
    assert picture(panels[0])[3, 5].item() == pytest.approx(
        magnitudes[96:128, 160:192].mean().item(), rel=1e-5
    )
    assert all(axes.images[0].colorbar is not None for axes in panels)


def test_wp_pooling_uneven_blocks():
    """D = 300 into 256: block i of the pooled pictures covers rows floor(300 i / 256) to
    ceil(300 (i + 1) / 256), one or two rows (and the same for columns)."""
    generator = torch.Generator().manual_seed(1)
    w = torch.randn(300, 300, generator=generator)
    pooled_magnitudes, pooled_relative = curves.wp_pictures(w)
    assert pooled_magnitudes.shape == pooled_relative.shape == (256, 256)
    magnitudes = w.abs()
    relative = magnitudes / magnitudes.diagonal()[:, None]
    for i in (0, 1, 100, 255):
        for j in (0, 37, 255):
            rows = slice(300 * i // 256, -(-300 * (i + 1) // 256))
            columns = slice(300 * j // 256, -(-300 * (j + 1) // 256))
            assert pooled_magnitudes[i, j].item() == pytest.approx(magnitudes[rows, columns].mean().item())
            assert pooled_relative[i, j].item() == pytest.approx(relative[rows, columns].mean().item())
    assert curves.wp_pictures(w, size=300)[0].equal(magnitudes)


# ----------------------------------------------------------------------------- W&B, offline


def wandb_records(path):
    """The records of a run-*.wandb file (LevelDB log format: 32 KiB blocks of records with a 7-byte
    header, checksum, length, kind: 1 whole, 2 first, 3 middle, 4 last), as wandb's protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    position = 7
    pieces = b""
    while position + 7 <= len(data):
        left_in_block = 32768 - position % 32768
        if left_in_block < 7:
            position += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0:
            position += left_in_block
            continue
        pieces += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            pieces = b""
            yield record


def offline_runs(out_dir):
    """The offline W&B runs under out_dir/wandb (sorted by folder name: start second, then id), as dicts
    of id, folder, config and summary.

    wandb 0.31 writes no wandb-summary.json or config.yaml offline: the run's config and summary are
    only in its run-ID.wandb transaction log, which `wandb sync` uploads; they are read from there."""
    runs = []
    for folder in sorted(Path(out_dir, "wandb").glob("offline-run-*")):
        config = {}
        summary = {}
        run_id = None
        for record in wandb_records(next(folder.glob("run-*.wandb"))):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_id = record.run.run_id
                updates = record.run.config.update
            elif kind == "config":
                updates = record.config.update
            elif kind == "summary":
                for item in record.summary.update:
                    summary[item.key or ".".join(item.nested_key)] = json.loads(item.value_json)
                continue
            else:
                continue
            for item in updates:
                config[item.key or ".".join(item.nested_key)] = json.loads(item.value_json)
        runs.append(dict(id=run_id, folder=folder.name, config=config, summary=summary))
    return runs


@pytest.fixture
def wandb_offline(monkeypatch):
    """The real wandb package, in offline mode."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        pytest.fail("the W&B tests need the wandb package: pip install -r requirements-dev.txt")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    monkeypatch.delenv("WANDB_RESUME", raising=False)


def test_wandb_offline_run(tmp_path, wandb_offline):
    """wandb_start, wandb_log and wandb_images make an offline run whose config holds the arguments and
    whose summary holds the last loss, the k-NN monitor and the pictures; a resumed start continues the
    same W&B run, a new one starts another."""
    out = tmp_path / "out"
    arguments = dict(loss="decorr", proj="64-64", lr=0.2, steps=2, wandb="decorr-test", wandb_name=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run = curves.wandb_start("decorr-test", None, arguments, str(out), resume=False)
        first = training_row(1)
        second = training_row(2, loss=2.5)
        curves.wandb_log(run, first, 1)
        curves.wandb_log(run, second, 2)
        diagnostics = diagnostics_row(2)
        curves.wandb_log(run, diagnostics, 2)
        write_log(out / "log.jsonl", [first, second, diagnostics])
        curves.draw_curves(str(out / "log.jsonl"), str(out / "curves.png"))
        curves.wandb_images(run, [str(out / "wp.png"), str(out / "curves.png")], 2)
        curves.wandb_finish(run)
    run_id = (out / "wandb_id.txt").read_text().strip()
    assert run_id == run.id
    [offline] = offline_runs(out)
    assert offline["id"] == run_id and offline["folder"].endswith(run_id)
    assert {key: offline["config"][key] for key in arguments} == arguments
    assert offline["summary"]["loss"] == 2.5
    assert offline["summary"]["knn_top1"] == diagnostics["knn_top1"]
    assert offline["summary"]["curves._type"] == "image-file"  # nested keys joined by "."
    assert not [key for key in offline["summary"] if key.startswith("wp.")]  # no wp.png: none logged
    assert list(out.glob("wandb/offline-run-*/files/media/images/curves_2_*.png"))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed = curves.wandb_start("decorr-test", None, arguments, str(out), resume=True)
        curves.wandb_log(resumed, training_row(3), 3)
        curves.wandb_finish(resumed)
        fresh = curves.wandb_start("decorr-test", None, arguments, str(out), resume=False)
        curves.wandb_finish(fresh)
    assert resumed.id == run_id and fresh.id != run_id
    assert (out / "wandb_id.txt").read_text().strip() == fresh.id
    assert sorted(offline["id"] for offline in offline_runs(out)) == sorted([run_id, run_id, fresh.id])


def test_wandb_missing(monkeypatch, tmp_path):
    """Without wandb, check_wandb and wandb_start raise one line that says how to install it, and write
    nothing."""
    monkeypatch.setitem(sys.modules, "wandb", None)
    for call in (curves.check_wandb, lambda: curves.wandb_start("p", None, {}, str(tmp_path / "out"), False)):
        with pytest.raises(UsageError) as error:
            call()
        assert "pip install wandb" in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- decorr.py --wandb
# These two need decorr.py's --wandb (wired by the lead): they fail until then.

CLI = ["--steps", "2", "--batch-size", "32", "--proj", "64-64", "--amp", "none", "--workers", "0"]
CLI += ["--log-every", "1", "--diag-every", "2"]


def test_cli_wandb_offline(tmp_path):
    """A short run with --wandb in offline mode: curves.png, and an offline run with the loss, the k-NN
    monitor and the arguments; no Python warning."""
    out = tmp_path / "out"
    environment = dict(os.environ, WANDB_MODE="offline")
    command = [sys.executable, "decorr.py", *CLI, "--out", str(out), "--wandb", "decorr-test"]
    process = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-3000:]
    assert "Warning" not in process.stderr and "Warning" not in process.stdout, process.stderr[-3000:]
    assert (out / "curves.png").exists()
    [offline] = offline_runs(out)
    assert "loss" in offline["summary"] and "knn_top1" in offline["summary"]
    assert offline["config"]["proj"] == "64-64"


def test_cli_wandb_missing(tmp_path):
    """--wandb without the package: exit 2, one line on stderr that says how to install it, no out folder."""
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / "wandb.py").write_text('raise ImportError("no wandb here")\n')
    out = tmp_path / "out"
    environment = dict(os.environ, PYTHONPATH=str(hidden))
    command = [sys.executable, "decorr.py", *CLI, "--out", str(out), "--wandb", "decorr-test"]
    process = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300)
    assert process.returncode == 2, process.stderr[-3000:]
    lines = process.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install wandb" in lines[0], process.stderr
    assert not out.exists()
