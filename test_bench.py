"""Tests for bench.py: the Algorithm 1 reference, the measuring helpers, the bytes of partitions
spanning processes, and each sub-command end to end at a tiny size in a subprocess (with -W
error), so that the benchmark harness cannot rot. Run: pytest -q test_bench.py"""

import json
import os
import platform
import re
import subprocess
import sys

import pytest
import torch

import bench
import decorr

HERE = os.path.dirname(os.path.abspath(__file__))


def run(*argv, timeout=300):
    """bench.py in a subprocess, warnings as errors, one thread (tiny sizes; a busy machine's
    oversubscribed thread pools would only slow it down)."""
    return subprocess.run(
        [sys.executable, "-W", "error", os.path.join(HERE, "bench.py"), *argv],
        capture_output=True,
        text=True,
        cwd=HERE,
        timeout=timeout,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )


def table_rows(stdout):
    """Header and body rows of the markdown table in stdout, as lists of stripped cells."""
    lines = [l for l in stdout.splitlines() if l.startswith("|")]
    assert len(lines) >= 3 and re.fullmatch(r"\|(-+\|)+", lines[1]), stdout
    cells = lambda l: [c.strip() for c in l.strip("|").split("|")]
    return cells(lines[0]), [cells(l) for l in lines[2:]]


def ok(p):
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Traceback" not in p.stderr and "Warning" not in p.stderr, p.stderr[-3000:]


# ----------------------------------------------------------------------------- the reference


@pytest.mark.parametrize("n,D,parts", [(32, 24, 1), (32, 24, 4), (32, 24, 16), (32, 6, 2)])
def test_algorithm1_matches_decorr_loss(n, D, parts):
    """Values and gradients, Gram form (m < D) and D x D form (the last case, m = 16 >= D = 6)."""
    outs = []
    for fn in (decorr.decorr_loss, bench.algorithm1):
        f1, f2, w = bench.loss_inputs(n, D, torch.device("cpu"), seed=3)
        loss, inv, cov = fn(f1, f2, w, parts, 25.0, 3.0)
        loss.backward()
        outs.append([loss, inv, cov, f1.grad, f2.grad, w.grad])
    for x, y in zip(*outs):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def test_algorithm1_is_the_per_part_formula():
    torch.manual_seed(1)
    n, D, parts = 12, 5, 3
    f1, f2, w = torch.randn(n, D), torch.randn(n, D), torch.randn(D, D)
    m, wtw, cov = n // parts, w.T @ w, 0.0
    for j in range(parts):
        for f in (f1, f2):
            p = f[j * m : (j + 1) * m] @ w.T
            cov += ((p.T @ p / m - wtw) ** 2).sum() / parts
    inv = ((f1 @ w.T - f2) ** 2).mean() + ((f2 @ w.T - f1) ** 2).mean()
    loss, inv_b, cov_b = bench.algorithm1(f1, f2, w, parts, 2.0, 3.0)
    torch.testing.assert_close(cov_b, cov)
    torch.testing.assert_close(inv_b, inv)
    torch.testing.assert_close(loss, 2.0 * inv + 3.0 / D * cov)


# ----------------------------------------------------------------------------- helpers


def test_md_table():
    lines = bench.md_table(["a", "long header"], [[1, "x"], ["wide cell", 2.5]]).splitlines()
    assert lines[0] == "| a         | long header |"
    assert lines[1] == "|-----------|-------------|"
    assert lines[3] == "| wide cell | 2.5         |"
    assert len({len(l) for l in lines}) == 1


def test_measure_rounds():
    calls = dict(a=0, b=0)

    def fn(k):
        def f():
            calls[k] += 1

        return f

    cpu = torch.device("cpu")
    times = bench.measure(dict(a=fn("a"), b=fn("b")), cpu, 2, 5, 1e9)
    assert calls == dict(a=7, b=7) and [len(t) for t in times.values()] == [5, 5]
    times = bench.measure(dict(a=fn("a"), b=fn("b")), cpu, 1, 5, 0.0)  # max_time spent: one round
    assert calls == dict(a=9, b=9) and [len(t) for t in times.values()] == [1, 1]
    assert bench.measure(dict(c=lambda: 0.25), cpu, 0, 3, 1e9) == dict(c=[0.25] * 3)  # times itself


def test_peak_bytes_follows_live_memory():
    cpu = torch.device("cpu")
    if platform.libc_ver()[0] != "glibc" or not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("CPU peak memory needs glibc and Linux")
    # in a fresh process: what earlier tests left in this one's heap could serve the 64 MiB unseen
    code = """
import torch, bench
cpu = torch.device("cpu")
with bench.live_memory(cpu) as live:
    big = [bench.peak_bytes(lambda: torch.ones(16 * 2**20).sum(), cpu) for _ in range(2)]   # 64 MiB, freed at once
    print(live, *big, bench.peak_bytes(lambda: torch.ones(16).sum(), cpu))
"""
    p = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, timeout=120)
    live, *big, small = p.stdout.split()
    assert live == "True", p.stderr
    assert all(60 * 2**20 < int(b) < 100 * 2**20 for b in big), big
    assert int(small) < 8 * 2**20


def test_parts_bytes_at_the_paper_sizes():
    MiB = 2**20
    # D 2048: k = 8 = W nothing; k = 2: parts of 1024 rows over 4 ranks, Gram form: per view an
    # all-gather and a reduce-scatter of 4 x 256 x 2048 floats, each sending 3/4 of them
    assert bench.parts_bytes(2048, 8, 2048, 8) == (1, "Gram", 0)
    assert bench.parts_bytes(2048, 8, 2048, 2) == (4, "Gram", 2 * 2 * 3 * 256 * 2048 * 4)
    assert bench.parts_bytes(2048, 8, 2048, 2)[2] == 24 * MiB
    # k = 1: m = 2048 >= D, one D x D all-reduce per view, forward and backward, 2 x 7/8 of 16 MiB each
    assert bench.parts_bytes(2048, 8, 2048, 1) == (8, "D x D", 2 * 2 * 2 * 7 * 2048**2 * 4 // 8)
    assert bench.parts_bytes(2048, 8, 8192, 1) == (8, "Gram", 2 * 2 * 7 * 256 * 8192 * 4)
    assert bench.parts_bytes(2048, 8, 8192, 32) == (1, "Gram", 0)  # k > W: parts inside ranks
    assert bench.parts_bytes(6, 2, 64, 3)[0] == 2  # parts straddling two ranks


# ----------------------------------------------------------------------------- the sub-commands


def test_loss_tiny(tmp_path):
    out = tmp_path / "loss.json"
    p = run("loss", "--dims", "8,32", "--parts", "1,4", "--rows", "16", "--repeats", "2", "--json", str(out))
    ok(p)
    header, rows = table_rows(p.stdout)
    assert header[:4] == ["D", "parts", "decorr_loss ms", "Algorithm 1 ms"]
    assert {"matmul bound ms", "ours / bound", "ours peak MiB", "memory ratio", "rel. diff"} <= set(header)
    assert [r[:2] for r in rows] == [["8", "1"], ["8", "4"], ["32", "1"], ["32", "4"]]
    for r in rows:
        assert all(c == "-" or float(c) >= 0 for c in r), r  # numbers; "-" only for a 0-byte ratio
        assert float(r[2]) > 0 and float(r[3]) > 0 and float(r[-1]) < 1e-4
    doc = json.loads(out.read_text())
    assert doc["command"] == "loss" and doc["settings"]["rows"] == 16 and doc["markdown"] in p.stdout
    assert doc["machine"]["torch"] == torch.__version__ and doc["machine"]["threads"] == 1
    for r in doc["results"]:
        gram = r["rows"] // r["parts"] < r["D"]  # the bound is timed for the Gram form only
        for name in ("decorr_loss", "algorithm1") + (("bound",) if gram else ()):
            assert 1 <= len(r[name]["times"]) <= 2 and r[name]["seconds"] > 0
        assert (r["ours_over_bound"] is not None) == gram == (r["bound"].get("seconds") is not None)
        assert r["decorr_loss"]["peak_bytes"] >= 0 and r["algorithm1"]["peak_bytes"] >= 0
        assert r["rel_diff"] < 1e-4 and r["speedup"] > 0


def test_train_tiny(tmp_path):
    out = tmp_path / "train.json"
    p = run(
        "train",
        "--projs",
        "32-16",
        "--img-size",
        "8",
        "--batch",
        "4",
        "--parts",
        "2",
        "--repeats",
        "1",
        "--amp",
        "none",
        "--json",
        str(out),
    )
    ok(p)
    header, rows = table_rows(p.stdout)
    assert header[:3] == ["projector", "variant", "images/s"] and "head share" in header
    assert [r[:2] for r in rows] == [["32-16", "decorr"], ["32-16", "algorithm1"], ["32-16", "no head"]]
    assert all(float(r[2]) > 0 for r in rows) and rows[0][5].endswith("%") and rows[2][5] == "-"
    doc = json.loads(out.read_text())
    assert doc["settings"]["parts"] == 2 and doc["settings"]["batch"] == 4
    res = {r["variant"]: r for r in doc["results"]}
    assert set(res) == {"decorr", "algorithm1", "nohead"}
    assert all(r["img_per_s"] > 0 and r["peak_bytes"] >= 0 for r in res.values())
    assert res["decorr"]["head_share"] is not None and res["nohead"]["head_share"] is None


def test_data_tiny(tmp_path):
    out = tmp_path / "data.json"
    p = run(
        "data",
        "--batch",
        "8",
        "--threads",
        "1",
        "--workers",
        "1",
        "--folder-size",
        "40",
        "--repeats",
        "1",
        "--amp",
        "none",
        "--json",
        str(out),
    )
    ok(p)
    summary = json.loads(p.stdout.strip().splitlines()[-1])  # the last line: one JSON object
    assert summary["speedup_32px"] == pytest.approx(
        summary["batched_img_per_s"] / summary["per_sample_img_per_s"]
    )
    assert summary["threads"] == 1 and summary["workers"] == 1 and summary["batch"] == 8
    assert all(summary[k] > 0 for k in ("batched_img_per_s", "folder_img_per_s", "train_img_per_s", "step_s"))
    header, rows = table_rows(p.stdout)
    assert header[3] == "images/s" and header[-1] == "data / step"
    assert [r[0] for r in rows] == [
        "data.batches, batched",
        "torchvision v2, per sample",
        "torchvision v2, per sample",
        "data.batches, JPEG folder",
        "training step: decorr.Model resnet18 4096-256",
    ]
    assert all(float(r[3]) > 0 for r in rows) and rows[3][-1] == "-" and rows[4][-1] == "1"
    doc = json.loads(out.read_text())
    assert doc["summary"] == summary and len(doc["results"]) == 4
    assert summary["per_sample_img_per_s"] == max(r["img_per_s"] for r in doc["results"][1:3])


def test_parts_tiny(tmp_path):
    """Two gloo processes: the bytes counted on decorr_loss's collectives are the layout's, in the
    Gram form (D 16) and the D x D form (D 4); k = W sends nothing."""
    out = tmp_path / "parts.json"
    p = run(
        "parts",
        "--world",
        "2",
        "--batch",
        "8",
        "--dims",
        "16,4",
        "--parts",
        "1,2",
        "--repeats",
        "1",
        "--json",
        str(out),
    )
    ok(p)
    header, rows = table_rows(p.stdout)
    assert header[:5] == ["W", "B", "n = B/W", "D", "k"]
    res = json.loads(out.read_text())["results"]
    measured = [r for r in res if "seconds" in r]
    assert [(r["D"], r["parts"], r["form"]) for r in measured] == [
        (16, 1, "Gram"),
        (16, 2, "Gram"),
        (4, 1, "D x D"),
        (4, 2, "D x D"),
    ]
    for r in measured:
        assert (
            r["counted_bytes"]
            == r["bytes"]
            == (0 if r["parts"] == 2 else bench.parts_bytes(8, 2, r["D"], 1)[2])
        )
        assert r["seconds"] > 0
    assert all(r["bytes"] > 0 for r in measured if r["parts"] == 1)
    paper = [(r["world"], r["batch"], r["D"], r["parts"]) for r in res if "seconds" not in r]
    assert paper == [(8, 2048, D, k) for D in (2048, 8192) for k in (1, 2, 8)]


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["nope"],
        ["loss", "--dims", "a,b"],
        ["loss", "--dims", "0"],
        ["loss", "--rows", "10", "--parts", "3"],
        ["loss", "--max-time", "0"],
        ["loss", "--json", "/no/such/dir/x.json"],
        ["loss", "--bogus"],
        ["train", "--projs", "12-x"],
        ["train", "--projs", "2048-0"],
        ["train", "--arch", "vgg"],
        ["train", "--batch", "6", "--parts", "4"],
        ["train", "--amp", "fp8"],
        ["train", "--warmup", "0"],
        ["data", "--workers", "-1"],
        ["data", "--threads", "0"],
        ["parts", "--world", "4", "--batch", "10"],
        ["parts", "--batch", "8", "--parts", "3"],
        ["parts", "--max-time", "5"],
    ],
)
def test_bad_input_one_line_exit_2(argv, capsys):
    assert bench.cli(argv) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bench.py: error: "), err
    assert out == ""


@pytest.mark.parametrize("argv", [["nope"], ["train", "--proj", "2048-x-1"]])
def test_bad_input_from_the_shell(argv):
    p = run(*argv, timeout=120)
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bench.py: error: "), p.stderr
    assert p.stdout == ""
