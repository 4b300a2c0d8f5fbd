"""Tests for compare.py: the protocol's runs in order (floor, grid, choice, seeds, bridge, default run),
the rows it keys by everything that defines them, a stopped comparison taken up again, a diverged run,
the one LARS of every LARS method, and bad input. decorr.py and lineval.py run in this process (their
commands are those compare.py builds), on 32 training images of 8 px (2 steps an epoch), with a tiny
projector, and the probe trained 10 epochs instead of 100.

    python -m pytest -q test_compare.py
"""

import contextlib
import io
import json
import os
import subprocess
import sys

import pytest
from torch.utils.data import TensorDataset

import compare
import data
import decorr
import lineval
from conftest import run_main
from test_cli import ROOT

TINY = ["--batch-size", "16", "--proj", "32-32", "--img-size", "8", "--amp", "none", "--workers", "0"]
METHODS = [
    ("decorr", "decorr", TINY, 3.0, "test"),
    ("byol", "byol", TINY + ["--tau-base", "0.97"], 0.3, "test"),
]
FLOOR = ["--arch", "resnet18", "--img-size", "8", "--amp", "none", "--workers", "0", "--bn-passes", "2"]
PROTOCOL = ["--epochs", "1", "--warmup-steps", "1", "--seeds", "2", "--holdout", "16", "--diag-every", "2"]


def tiny_data():
    """32 training and 32 val images of the built-in data at 8 px."""
    train, val = (TensorDataset(*data.synthetic_images(32, seed, size=8)) for seed in (0, 1))
    return train, val, 10, True


def in_process(monkeypatch, calls, diverge_at=(), outputs=None):
    """compare.run_command, running decorr.py and lineval.py here on small data; records each command
    (and its output in outputs). A training at an lr in diverge_at fails as a non-finite loss does."""
    images = tiny_data()
    monkeypatch.setattr(decorr, "load_data", lambda name, root="data": images)
    monkeypatch.setattr(lineval, "load_data", lambda name, root="data": images)
    monkeypatch.setattr(compare, "METHODS", METHODS)
    monkeypatch.setattr(compare, "BRIDGE", [("byol-linear", "byol")])
    monkeypatch.setattr(compare, "DEFAULT_RUN", TINY + ["--epochs", "1"])
    monkeypatch.setattr(compare, "FLOOR", FLOOR)
    monkeypatch.setattr(compare, "EXTEND", 0)  # the grid of three alone (the extension: fake_runs)

    def run_command(command, log_path):
        calls.append(command[1:])
        if command[1] == "decorr.py" and "--lr" in command:
            if float(command[command.index("--lr") + 1]) in diverge_at:
                return (
                    1,
                    "decorr.py: error: non-finite loss (nan) at step 2; no checkpoint was written\n",
                    1.0,
                )
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            if command[1] == "decorr.py":
                run_main(command[2:])
            else:
                lineval.main(command[2:] + ["--fast-epochs", "10"])
        if outputs is not None:
            outputs.append(stdout.getvalue())
        return 0, stdout.getvalue(), 1.0

    monkeypatch.setattr(compare, "run_command", run_command)


def value(command, name):
    return command[command.index(name) + 1]


def read_rows(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_the_protocol_in_order_then_nothing_again(monkeypatch, tmp_path):
    """The floor per seed; every method at 1/3, 1 and 3 x its recipe lr, seed 0, probed on held-out
    training images only; the lr with the best held-out probe; the seeds there, probed on the val set
    (seed 0 not trained again); the linear-predictor variant at its method's lr; the default run per
    seed. Every training has the same budget and warm-up. A second call makes nothing. (The grid's
    extension past its ends: the next test.)"""
    calls = []
    in_process(monkeypatch, calls)
    out = tmp_path / "cmp"
    compare.main(PROTOCOL + ["--out", str(out)])
    trained = [c for c in calls if c[0] == "decorr.py"]
    probes = [c for c in calls if c[0] == "lineval.py"]
    floor = [("--random-init" in c, value(c, "--seed"), "--holdout" in c) for c in probes[:3]]
    assert floor == [(True, "0", False), (True, "1", False), (True, "0", True)]
    probes = probes[1:]  # the grid's probes from probes[2]
    grid = [(value(c, "--loss"), value(c, "--lr"), value(c, "--seed")) for c in trained[:6]]
    assert grid == [("decorr", lr, "0") for lr in ("1.0", "3.0", "9.0")] + [
        ("byol", lr, "0") for lr in ("0.1", "0.3", "0.9")
    ]
    for command in trained[:-2]:
        assert value(command, "--epochs") == "1" and value(command, "--warmup-steps") == "1"
        assert value(command, "--diag-every") == "2"
    assert [value(c, "--holdout") for c in probes[2:8]] == ["16"] * 6
    assert not any("--holdout" in c for c in probes[8:])
    rows = read_rows(out)
    grid_rows = [r for r in rows if r["stage"] == "grid"]
    assert len(grid_rows) == 6 and all(r["evaluation"] == "holdout" for r in grid_rows)
    for name in ("decorr", "byol"):
        mine = [r for r in grid_rows if r["name"] == name]
        best = max(mine, key=lambda r: (r["top1"], -r["lr"]))
        seeds = [r for r in rows if r["stage"] == "seeds" and r["name"] == name]
        assert [(r["lr"], r["seed"], r["evaluation"]) for r in seeds] == [
            (best["lr"], 0, "val"),
            (best["lr"], 1, "val"),
        ]
        assert seeds[0]["folder"] == best["folder"] and seeds[1]["folder"] != best["folder"]
        at_best = [
            c for c in trained[:-3] if value(c, "--loss") == name and value(c, "--lr") == str(best["lr"])
        ]
        assert [value(c, "--seed") for c in at_best] == ["0", "1"]
    byol_lr = next(r["lr"] for r in rows if r["stage"] == "seeds" and r["name"] == "byol")
    bridge = [r for r in rows if r["stage"] == "bridge"]
    assert [(r["name"], r["lr"], r["seed"]) for r in bridge] == [("byol-linear", byol_lr, 0)]
    assert 0 <= bridge[0]["bridge_dist"] <= 2
    assert [value(c, "--seed") for c in trained[-2:]] == ["0", "1"] and "--warmup-steps" not in trained[-1]
    assert len(trained) == 6 + 2 + 1 + 2
    for row in rows:
        assert row["status"] == "done" and 0 <= row["top1"] <= row["top5"] <= 100, row
    table = (out / "table.md").read_text().splitlines()
    assert [line.split(" | ")[0] for line in table[2:]] == [
        "| decorr",
        "| byol",
        "| byol-linear",
        "| decorr, `python decorr.py`",
        "| random init (2 BN passes)",
    ]
    assert " ± " in table[2] and table[2].split(" | ")[7] == "2"
    grid_lines = (out / "grid.md").read_text().splitlines()
    assert len(grid_lines) == 2 + 1 + 6 and grid_lines[2].startswith("| random init | - | - |")
    for picture in ("fig1.png", "bridge.png"):
        assert (out / picture).read_bytes().startswith(b"\x89PNG")
    calls.clear()
    compare.main(PROTOCOL + ["--out", str(out)])
    assert calls == [] and (out / "table.md").read_text().splitlines() == table


def test_a_row_is_keyed_by_its_budget_and_a_stopped_run_resumes(monkeypatch, tmp_path):
    """Another --epochs makes new rows in new folders, never the old ones. A run stopped half-way (its
    checkpoint, no backbone.pt) is resumed by the next call from its checkpoint, not started over."""
    calls = []
    outputs = []
    in_process(monkeypatch, calls, outputs=outputs)
    out = tmp_path / "cmp"
    only = ["--only", "decorr", "--seeds", "1", "--holdout", "16", "--diag-every", "2", "--out", str(out)]
    # a stopped run: the grid's first run of the 2-epoch budget, stopped at step 2 of 4
    protocol = compare.Protocol(compare.parse_args(["--epochs", "2", "--warmup-steps", "1"] + only))
    flags = protocol.method_flags("decorr", 1.0, 0)
    stopped = out / "runs" / f"decorr_lr1_seed0_{compare.digest(flags)}"
    run_main(flags + ["--steps", "2", "--out", stopped])
    compare.main(["--epochs", "1", "--warmup-steps", "1"] + only)
    first = read_rows(out)
    assert [r["stage"] for r in first] == ["grid"] * 3 + ["seeds"]
    assert all(r["step"] == 2 for r in first)
    calls.clear()
    outputs.clear()
    compare.main(["--epochs", "2", "--warmup-steps", "1"] + only)
    rows = read_rows(out)
    trained = [c for c in calls if c[0] == "decorr.py"]
    assert len(rows) == 8 and len(trained) == 3
    assert {r["folder"] for r in rows[:4]}.isdisjoint(r["folder"] for r in rows[4:])
    assert all(value(r["flags"].split(), "--epochs") == "2" and r["step"] == 4 for r in rows[4:])
    assert rows[4]["folder"] == f"runs/{stopped.name}" and rows[4]["resumed"] is True
    assert f"resumed from {stopped / 'checkpoint.pt'} at step 2" in outputs[0]
    steps = [r["step"] for r in decorr.read_jsonl(stopped / "log.jsonl") if "loss" in r]
    assert steps == list(range(1, 5))


def test_a_diverged_run_is_reported_and_not_chosen(monkeypatch, tmp_path):
    """A run whose loss stops being finite gets a 'diverged' row; the protocol goes on, chooses among
    the others, and the grid table says so."""
    calls = []
    in_process(monkeypatch, calls, diverge_at=(9.0,))
    out = tmp_path / "cmp"
    compare.main(PROTOCOL + ["--only", "decorr", "--seeds", "1", "--out", str(out)])
    rows = read_rows(out)
    diverged = [r for r in rows if r["status"] == "diverged"]
    assert [(r["name"], r["lr"]) for r in diverged] == [("decorr", 9.0)]
    assert [r["lr"] for r in rows if r["stage"] == "seeds"] != [9.0]
    assert "| decorr | 9 | 3 | diverged |" in (out / "grid.md").read_text()


def fake_runs(monkeypatch, calls, probe):
    """compare.run_command without training: decorr.py writes one diagnostics row and lineval.py
    answers probe(loss, lr) as the probe's top-1."""

    def run_command(command, log_path):
        calls.append(command[1:])
        folder = os.path.dirname(log_path)
        if command[1] == "decorr.py":
            decorr.append_jsonl(
                os.path.join(folder, "log.jsonl"), dict(step=4, corr_dist=1.0, eff_rank_backbone=2.0)
            )
            return 0, "done at step 4\n", 1.0
        train = [c for c in calls if c[0] == "decorr.py" and c[-1] == folder][-1]
        top1 = probe(value(train, "--loss"), float(value(train, "--lr")))
        return 0, json.dumps(dict(top1=top1, top5=top1, knn_top1=top1)) + "\n", 1.0

    monkeypatch.setattr(compare, "run_command", run_command)


def test_a_best_lr_at_an_end_of_the_grid_extends_it(monkeypatch, tmp_path):
    """Where the best held-out probe is at the grid's lowest (highest) lr, the lr 3x lower (higher)
    is tried next, twice at most; a best lr inside the grid ends it. The seeds then run at the best
    lr of the extended grid, which the grid table lists in full."""
    calls = []
    lowest_wins = lambda loss, lr: 100 - lr if loss == "decorr" else 50 + lr  # noqa: E731
    fake_runs(monkeypatch, calls, lowest_wins)
    out = tmp_path / "cmp"
    compare.main(["--only", "decorr", "byol", "--seeds", "1", "--out", str(out)])
    trained = [(value(c, "--loss"), value(c, "--lr")) for c in calls if c[0] == "decorr.py"]
    assert trained == [
        ("decorr", "0.1"),
        ("decorr", "0.3"),
        ("decorr", "0.9"),
        ("decorr", "0.03333"),
        ("decorr", "0.01111"),
        ("byol", "0.3333"),
        ("byol", "1.0"),
        ("byol", "3.0"),
        ("byol", "9.0"),
        ("byol", "27.0"),
    ]
    rows = read_rows(out)
    assert [(r["name"], r["lr"]) for r in rows if r["stage"] == "seeds"] == [
        ("decorr", 0.01111),
        ("byol", 27.0),
    ]
    grid = (out / "grid.md").read_text()
    assert "| decorr | 0.01111 | 0.037 |" in grid and "| byol | 27 | 27 |" in grid
    calls.clear()
    inside = lambda loss, lr: 50 - abs(lr - 0.3) if loss == "decorr" else 0  # noqa: E731
    fake_runs(monkeypatch, calls, inside)
    compare.main(["--only", "decorr", "--seeds", "1", "--out", str(tmp_path / "other")])
    assert [value(c, "--lr") for c in calls if c[0] == "decorr.py"] == ["0.1", "0.3", "0.9"]


def protocol_with(rows):
    args = compare.parse_args(["--out", "unused"])
    protocol = compare.Protocol.__new__(compare.Protocol)
    protocol.args = args
    protocol.rows = {}
    for lr, row in rows.items():
        key = compare.digest(protocol.method_flags("decorr", lr, 0), protocol.probe_flags("holdout"))
        protocol.rows[key] = dict(row, key=key)
    return protocol


def test_the_choice_is_the_best_held_out_probe():
    """The chosen lr: the best held-out top-1 of the finished grid (a tie to the lower lr); none while
    an lr of the grid has no row (the lr past an end where the best is), or when every lr diverged."""
    done = lambda top1: dict(status="done", top1=top1)  # noqa: E731
    diverged = dict(status="diverged")
    assert protocol_with({0.1: done(50.0), 0.3: done(70.0), 0.9: done(60.0)}).chosen_lr("decorr") == 0.3
    assert protocol_with({0.1: done(80.0), 0.3: done(90.0), 0.9: diverged}).chosen_lr("decorr") == 0.3
    assert protocol_with({0.1: done(60.0), 0.3: done(60.0), 0.9: done(20.0)}).chosen_lr("decorr") is None
    grid = {0.1: done(60.0), 0.3: done(60.0), 0.9: done(20.0), 0.03333: done(50.0)}
    assert protocol_with(grid).chosen_lr("decorr") == 0.1  # a tie goes to the lower lr
    grid = {0.1: done(50.0), 0.3: diverged, 0.9: done(60.0), 2.7: done(30.0)}
    assert protocol_with(grid).chosen_lr("decorr") == 0.9
    assert protocol_with({0.1: done(60.0), 0.3: done(70.0)}).chosen_lr("decorr") is None
    assert protocol_with({0.1: diverged, 0.3: diverged, 0.9: diverged}).chosen_lr("decorr") is None


def test_one_lars_for_every_lars_method_and_simsiam_as_published():
    """Every LARS method of the protocol (decorr, Barlow Twins, VICReg, BYOL) runs the same LARS, not
    clipped; SimSiam runs SGD with --fix-pred-lr; BYOL's tau_base is 0.97; the grid is 1/3, 1, 3."""
    settings = {}
    for name, loss, flags, _, _ in compare.METHODS:
        args = decorr.parse_args(["--loss", loss, *flags])
        if args.optimizer == "lars":
            settings[name] = (args.lars_eta, args.lars_clip)
        else:
            assert name == "simsiam" and args.optimizer == "sgd" and args.fix_pred_lr
    assert sorted(settings) == ["barlowtwins", "byol", "decorr", "vicreg"]
    assert set(settings.values()) == {(0.02, False)}
    assert decorr.parse_args(["--loss", "byol", *compare.BYOL]).tau_base == 0.97
    assert compare.grid_lrs(0.3) == [0.1, 0.3, 0.9] and compare.grid_lrs(0.5) == [0.1667, 0.5, 1.5]


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--only", "simclr"],
            "--only simclr: no such run (the runs: decorr barlowtwins vicreg simsiam byol",
        ),
        (["--epochs", "0"], "--epochs must be at least 1, got 0"),
        (["--seeds", "0"], "--seeds must be at least 1, got 0"),
        (["--warmup-steps", "-1"], "--warmup-steps must be at least 0, got -1"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, argv, message):
    """Bad flags are refused before anything runs or is written: one line on stderr, exit 2."""
    command = [sys.executable, "compare.py", *argv, "--out", str(tmp_path / "cmp")]
    p = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stdout == "", (p.stdout, p.stderr)
    assert len(p.stderr.splitlines()) == 1 and p.stderr.startswith("compare.py: error: " + message)
    assert not (tmp_path / "cmp").exists()


def test_progress_is_shown_while_a_run_trains(tmp_path, capsys):
    """run_command shows the child's lines as they come and keeps them in the log."""
    script = "import time\nfor i in range(3):\n    print('line', i)\n"
    log = tmp_path / "log.txt"
    code, output, seconds = compare.run_command([sys.executable, "-c", script], str(log))
    assert code == 0 and output == "line 0\nline 1\nline 2\n" and log.read_text() == output
    assert capsys.readouterr().out.splitlines()[-3:] == ["    line 0", "    line 1", "    line 2"]


def test_a_run_stopped_by_a_signal_stops_the_comparison(monkeypatch, tmp_path):
    """A training that a signal stopped (Ctrl-C reaches compare.py's child too) makes no row and no
    probe: compare.py stops, naming it, and the same command continues."""
    calls = []

    def run_command(command, log_path):
        calls.append(command[1])
        return 0, "epoch 1/1 step 2/4 | loss 1.0\nstopped by signal at step 2: out/\n", 1.0

    monkeypatch.setattr(compare, "run_command", run_command)
    out = tmp_path / "cmp"
    with pytest.raises(SystemExit) as stopped:
        compare.main(["--only", "decorr", "--out", str(out)])
    assert (
        stopped.value.code
        == "compare.py: stopped by signal at step 2; the same command continues the comparison"
    )
    assert calls == ["decorr.py"] and not (out / "results.jsonl").exists()
