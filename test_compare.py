"""Tests for compare.py: the runs it makes, the rows and the table it writes, and a stopped comparison
taken up again. decorr.py and lineval.py run in this process (their commands are those compare.py
builds), on 64 training images of 16 px, with a tiny projector.

    python -m pytest -q test_compare.py
"""

import contextlib
import io
import json
import subprocess
import sys

import compare
import decorr
import lineval
from conftest import run_main
from test_cli import ROOT, small_synthetic

TINY = ["--batch-size", "16", "--proj", "32-32", "--img-size", "16", "--amp", "none", "--workers", "0"]
RUNS = [
    ("decorr", "decorr", TINY, [5.0], "test"),
    ("byol-linear", "byol", TINY + ["--predictor", "linear"], [1.0, 0.5], "test"),
]


def in_process(monkeypatch, calls):
    """compare.run_command, running decorr.py and lineval.py here on small data; records each command."""
    data = small_synthetic(64)
    monkeypatch.setattr(decorr, "load_data", lambda name, root="data": data)
    monkeypatch.setattr(lineval, "load_data", lambda name, root="data": data)

    def run_command(command, log_path):
        calls.append(command[1:])
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            if command[1] == "decorr.py":
                run_main(command[2:])
            else:
                lineval.main(command[2:])
        return stdout.getvalue(), 1.0

    monkeypatch.setattr(compare, "run_command", run_command)


def test_compare_runs_every_method_and_lr_then_the_floor(monkeypatch, tmp_path):
    """Every (method, lr) trains for --epochs with the method's flags and is probed; the recipe lrs
    come first; each row holds the probe, the k-NN, the last diagnostics' corr_dist, and bridge_dist
    for a linear predictor only; the random network closes the table; a second call redoes nothing."""
    monkeypatch.setattr(compare, "RUNS", RUNS)
    calls = []
    in_process(monkeypatch, calls)
    out = tmp_path / "cmp"
    compare.main(["--epochs", "1", "--out", str(out), "--diag-every", "2"])
    trained = [c for c in calls if c[0] == "decorr.py"]
    assert [(c[c.index("--loss") + 1], c[c.index("--lr") + 1]) for c in trained] == [
        ("decorr", "5.0"),
        ("byol", "1.0"),
        ("byol", "0.5"),
    ]
    for command in trained:
        assert (
            command[command.index("--epochs") + 1] == "1"
            and command[command.index("--diag-every") + 1] == "2"
        )
        assert ("--predictor" in command) == (command[command.index("--loss") + 1] == "byol")
    probes = [c for c in calls if c[0] == "lineval.py"]
    assert len(probes) == 4 and "--random-init" in probes[-1]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["name"], r["lr"]) for r in rows] == [
        ("decorr", 5.0),
        ("byol-linear", 1.0),
        ("byol-linear", 0.5),
        ("random init", None),
    ]
    for row in rows[:3]:
        assert 0 <= row["top1"] <= row["top5"] <= 100 and 0 <= row["knn_top1"] <= 100, row
        assert row["step"] == 4 and row["corr_dist"] > 0 and 0 <= row["bridge_dist"] <= 2, row
        log = [json.loads(line) for line in (out / f"{row['name']}_lr{row['lr']}" / "log.jsonl").open()]
        assert [r["step"] for r in log if "corr_dist" in r] == [2, 4]
    assert rows[3]["corr_dist"] is None and rows[3]["bridge_dist"] is None
    table = (out / "table.md").read_text().splitlines()
    assert table[0].startswith("| run | lr | probe top-1") and len(table) == 2 + 4
    assert table[-1].startswith("| random init | - |")
    assert (out / "bridge.png").read_bytes().startswith(b"\x89PNG")
    calls.clear()
    compare.main(["--epochs", "1", "--out", str(out)])
    assert calls == [] and (out / "table.md").read_text().splitlines() == table


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    """An unknown --only name is refused before anything runs: one line on stderr, exit 2."""
    command = [sys.executable, "compare.py", "--only", "simclr", "--out", str(tmp_path / "cmp")]
    p = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stdout == "", (p.stdout, p.stderr)
    assert p.stderr.splitlines() == [
        "compare.py: error: --only simclr: no such run (the runs: decorr barlowtwins vicreg simsiam byol "
        "simsiam-linear byol-linear)"
    ]
    assert not (tmp_path / "cmp").exists()
