"""Tests for bench.py: the Algorithm 1 reference, the measuring helpers (steady-state timing of
loader processes, figures below the noise shown as notes), the bytes of partitions spanning
processes (counted on the collectives decorr_loss calls), and each sub-command end to end at a tiny
size, in a subprocess with -W error, so that the benchmark harness cannot rot.
Run: pytest -q test_bench.py"""

import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

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
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    assert len(lines) >= 3 and re.fullmatch(r"\|(-+\|)+", lines[1]), stdout
    cells = lambda line: [c.strip() for c in line.strip("|").split("|")]
    return cells(lines[0]), [cells(line) for line in lines[2:]]


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
    for x, y in zip(*outs, strict=True):
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
    assert len({len(line) for line in lines}) == 1


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
    times = bench.measure(dict(a=fn("a")), cpu, 0, 2, 1e9)  # --warmup 0
    assert calls["a"] == 11 and len(times["a"]) == 2


def test_loader_processes_timed_in_steady_state():
    """Loader processes prepare batches ahead: here 3 processes whose first batches (the warm-up
    run's 3 and the 2 x 3 prepared ahead) are ready at once, then 3 take 30 ms (10 ms a batch).
    A timed run takes one batch from each process after those: 10 ms a batch, not 0."""
    taken = []

    def batches():
        while True:
            if len(taken) >= 9 and len(taken) % 3 == 0:
                time.sleep(0.03)
            taken.append(1)
            yield len(taken)

    assert bench.loader("anything", 0) == ("anything", 1, 0)  # no processes: one batch a run
    settings = types.SimpleNamespace(warmup=1, repeats=2, max_time=1e9)
    times = bench.data_times(dict(x=bench.loader(batches(), 3)), torch.device("cpu"), settings)
    assert len(taken) == 3 + 6 + 2 * 3 and len(times["x"]) == 2
    assert all(0.009 < t < 0.02 for t in times["x"]), times


def test_figures_below_the_noise_are_notes():
    assert bench.head_share([1.0], [1.1]) == "below noise"  # one run each: a negative share
    assert bench.head_share([2.0, 2.2], [1.9, 2.1]) == "below noise"  # 0.1 apart, spread 0.1
    assert bench.head_share([2.0, 2.0], [1.0, 1.0]) == 0.5
    assert bench.over_bound(0.5, 1.0) == "under the bound: noise"  # faster than its own products
    assert bench.over_bound(1.5, 1.0) == 1.5 and bench.over_bound(1.5, None) is None
    # 3 processes taking 30 ms a batch deliver one every 10 ms at best
    assert bench.plausible(0.01, [0.03, 0.03], 3) and not bench.plausible(0.001, [0.03, 0.03], 3)
    assert bench.num("below noise", ".2f") == "below noise" and bench.num(None, ".2f") == "-"


def test_peak_bytes_follows_live_memory():
    if platform.libc_ver()[0] != "glibc" or not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("CPU peak memory needs glibc and Linux")
    # in a fresh process: what earlier tests left in this one's heap could serve the 64 MiB unseen
    code = """
import torch, bench
cpu = torch.device("cpu")
with bench.live_memory(cpu) as live:
    # 64 MiB, freed at once
    big = [bench.peak_bytes(lambda: torch.ones(16 * 2**20).sum(), cpu) for _ in range(2)]
    print(live, *big, bench.peak_bytes(lambda: torch.ones(16).sum(), cpu))
"""
    p = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, timeout=120)
    live, *big, small = p.stdout.split()
    assert live == "True", p.stderr
    assert all(60 * 2**20 < int(b) < 100 * 2**20 for b in big), big
    assert int(small) < 8 * 2**20


# ----------------------------------------------------------------------------- partitions spanning processes


def parts_bytes(B, W, D, k):
    """What decorr_loss sends per step and rank with k partitions of a global batch of B rows on W
    processes, float32, if the collectives are ring algorithms (an all-gather or a reduce-scatter
    of S bytes over g ranks sends (g-1)/g S from each, an all-reduce twice that). Returns
    (g: ranks per group holding whole parts, form, bytes).
    Gram form (part of m < D rows) over g > 1 ranks: per view, the forward all-gathers the group's
    g n x D predictions, the backward reduce-scatters their gradient. D x D form (m >= D): per view
    and part of the group, an all-reduce of its D x D matrix forward and of its gradient backward.
    g = 1 (k a multiple of W; k = W is Algorithm 1's layout): nothing."""
    n = B // W
    m = B // k
    g = math.lcm(n, m) // n
    if m < D:
        return g, "Gram", 2 * 2 * (g - 1) * n * D * 4
    return g, "D x D", 2 * (g * n // m) * 2 * 2 * (g - 1) * D * D * 4 // g


def test_parts_bytes_at_the_paper_sizes():
    MiB = 2**20
    # D 2048: k = 8 = W nothing; k = 2: parts of 1024 rows over 4 ranks, Gram form: per view an
    # all-gather and a reduce-scatter of 4 x 256 x 2048 floats, each sending 3/4 of them
    assert parts_bytes(2048, 8, 2048, 8) == (1, "Gram", 0)
    assert parts_bytes(2048, 8, 2048, 2) == (4, "Gram", 2 * 2 * 3 * 256 * 2048 * 4)
    assert parts_bytes(2048, 8, 2048, 2)[2] == 24 * MiB
    # k = 1: m = 2048 >= D, one D x D all-reduce per view, forward and backward, 2 x 7/8 of 16 MiB each
    assert parts_bytes(2048, 8, 2048, 1) == (8, "D x D", 2 * 2 * 2 * 7 * 2048**2 * 4 // 8)
    assert parts_bytes(2048, 8, 8192, 1) == (8, "Gram", 2 * 2 * 7 * 256 * 8192 * 4)
    assert parts_bytes(2048, 8, 8192, 32) == (1, "Gram", 0)  # k > W: parts inside ranks
    assert parts_bytes(6, 2, 64, 3)[0] == 2  # parts straddling two ranks


# The bytes one rank sends in each collective decorr_loss calls, by the ring rule, read from the
# collective's own arguments: a count independent of parts_bytes' layout.
nbytes = lambda t: t.numel() * t.element_size()
SENT = dict(
    all_reduce=lambda g, t: 2 * (g - 1) * nbytes(t) / g,
    all_gather_single=lambda g, out, x: (g - 1) * nbytes(x),
    reduce_scatter_single=lambda g, out, x: (g - 1) * nbytes(out),
)


def counting(collective, rule, sent):
    """collective, which also adds the bytes this rank sends in it to sent[0]."""

    def counted(*args, **kwargs):
        sent[0] += rule(dist.get_world_size(kwargs.get("group")), *args)
        return collective(*args, **kwargs)

    return counted


def counting_worker(rank, world, tmp, sizes):
    """One of `world` gloo processes: the bytes it sends in decorr_loss's collectives, forward and
    backward, per (D, k) of sizes, written to tmp/rank.json."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    sent = [0.0]
    for name, rule in SENT.items():
        setattr(dist, name, counting(getattr(dist, name), rule, sent))
    counts = []
    for B, D, k in sizes:
        g = torch.Generator().manual_seed(rank)
        f1, f2 = (torch.randn(B // world, D, generator=g).requires_grad_() for _ in range(2))
        w = torch.eye(D).requires_grad_()
        sent[0] = 0.0
        decorr.decorr_loss(f1, f2, w, parts=k)[0].backward()
        counts.append(sent[0])
    with open(f"{tmp}/{rank}.json", "w") as fh:
        json.dump(counts, fh)
    dist.destroy_process_group()


def test_parts_bytes_are_what_decorr_loss_sends():
    """Two gloo processes, Gram form (D 16) and D x D form (D 4): each rank sends what parts_bytes
    says, counted on the collectives decorr_loss calls; k = W sends nothing."""
    sizes = [(8, 16, 1), (8, 16, 2), (8, 4, 1), (8, 4, 2), (12, 64, 3)]
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(counting_worker, args=(2, tmp, sizes), nprocs=2, start_method="fork")
        counted = [json.loads(open(f"{tmp}/{rank}.json").read()) for rank in range(2)]
    expected = [parts_bytes(B, 2, D, k) for B, D, k in sizes]
    assert [form for _, form, _ in expected] == ["Gram", "Gram", "D x D", "D x D", "Gram"]
    for rank in range(2):
        assert counted[rank] == [sent for _, _, sent in expected], (rank, counted, expected)
    assert expected[1][2] == expected[3][2] == 0 and all(e[2] > 0 for e in expected[::2])


# ----------------------------------------------------------------------------- the sub-commands


def numbers_or_notes(cells):
    """The cells are numbers >= 0, '-' or a note: nothing negative, nothing that is not finite."""
    for cell in cells:
        if re.fullmatch(r"[-+0-9.e]+%?", cell) and cell != "-":
            value = float(cell.rstrip("%"))
            assert math.isfinite(value) and value >= 0, cells
        else:
            assert cell in ("-", "below noise", "under the bound: noise"), cells  # no other note


def test_loss_tiny(tmp_path):
    out = tmp_path / "loss.json"
    p = run("loss", "--dims", "8,32", "--parts", "1,4", "--rows", "16", "--repeats", "2", "--json", str(out))
    ok(p)
    header, rows = table_rows(p.stdout)
    assert header[:4] == ["D", "parts", "decorr_loss ms", "Algorithm 1 ms"]
    assert {"matmul bound ms", "ours / bound", "ours peak MiB", "memory ratio", "rel. diff"} <= set(header)
    assert [r[:2] for r in rows] == [["8", "1"], ["8", "4"], ["32", "1"], ["32", "4"]]
    for r in rows:
        numbers_or_notes(r)
        assert float(r[2]) > 0 and float(r[3]) > 0 and float(r[-1]) < 1e-4
    doc = json.loads(out.read_text())
    assert doc["command"] == "loss" and doc["settings"]["rows"] == 16 and doc["markdown"] in p.stdout
    assert doc["machine"]["torch"] == torch.__version__ and doc["machine"]["threads"] == 1
    for r in doc["results"]:
        gram = r["rows"] // r["parts"] < r["D"]  # the bound is timed for the Gram form only
        for name in ("decorr_loss", "algorithm1") + (("bound",) if gram else ()):
            assert 1 <= len(r[name]["times"]) <= 2 and r[name]["seconds"] > 0
        assert (r["ours_over_bound"] is not None) == gram == (r["bound"].get("seconds") is not None)
        for ratio in (r["ours_over_bound"], r["ref_over_bound"]):
            assert ratio is None or ratio == "under the bound: noise" or ratio >= 0.9
        assert r["decorr_loss"]["peak_bytes"] >= 0 and r["algorithm1"]["peak_bytes"] >= 0
        assert r["rel_diff"] < 1e-4 and r["speedup"] > 0


def test_train_tiny(tmp_path):
    out = tmp_path / "train.json"
    argv = ["--projs", "32-16", "--img-size", "8", "--batch", "4", "--parts", "2", "--warmup", "0"]
    p = run("train", *argv, "--repeats", "1", "--amp", "none", "--json", str(out))
    ok(p)
    header, rows = table_rows(p.stdout)
    assert header[:3] == ["projector", "variant", "images/s"] and "head share" in header
    assert [r[:2] for r in rows] == [["32-16", "decorr"], ["32-16", "algorithm1"], ["32-16", "no head"]]
    assert all(float(r[2]) > 0 for r in rows) and rows[2][5] == "-"
    for r in rows:
        numbers_or_notes(r[2:])
        assert r[5] == "-" or r[5] == "below noise" or 0 < float(r[5].rstrip("%")) <= 100, r
    doc = json.loads(out.read_text())
    assert doc["settings"]["parts"] == 2 and doc["settings"]["batch"] == 4 and doc["settings"]["warmup"] == 0
    res = {r["variant"]: r for r in doc["results"]}
    assert set(res) == {"decorr", "algorithm1", "nohead"}
    assert all(r["img_per_s"] > 0 and r["peak_bytes"] >= 0 for r in res.values())
    assert res["decorr"]["head_share"] == "below noise" or 0 < res["decorr"]["head_share"] <= 1
    assert res["nohead"]["head_share"] is None


def test_data_small_prints_no_impossible_ratio(tmp_path):
    """bench.py data --batch 32 --repeats 1 --max-time 5 --workers 1, with two per-sample loader
    processes (the folder at 40 px and the step in float32 keep it short): the loader processes'
    rate is one they can have made, so speedup_32px is a number, or it is marked not steady and
    speedup_32px says why; every figure is in range."""
    out = tmp_path / "data.json"
    argv = ["--batch", "32", "--repeats", "1", "--max-time", "5", "--workers", "1", "--threads", "2"]
    p = run("data", *argv, "--folder-size", "40", "--amp", "none", "--json", str(out))
    ok(p)
    summary = json.loads(p.stdout.strip().splitlines()[-1])  # the last line: one JSON object
    assert summary["threads"] == 2 and summary["workers"] == 1 and summary["batch"] == 32
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
    doc = json.loads(out.read_text())
    assert doc["summary"] == summary and len(doc["results"]) == 4
    in_process, loaders = doc["results"][1:3]
    assert "possible" not in in_process and loaders["possible"] in (True, False), loaders
    if not loaders["possible"]:  # on a busy machine the batches prepared ahead can outrun the timing
        assert rows[2][3] == "faster than made: not steady", rows[2]
        assert summary["speedup_32px"].startswith("not measured: 2 loader processes timed faster"), summary
        rows = rows[:2] + rows[3:]
    for r in rows:
        numbers_or_notes(r[3:])
    assert all(float(r[3]) > 0 for r in rows) and rows[-2][-1] == "-" and rows[-1][-1] == "1.000"
    if loaders["possible"]:
        assert isinstance(summary["speedup_32px"], float), summary["speedup_32px"]
        assert summary["speedup_32px"] == pytest.approx(
            summary["batched_img_per_s"] / summary["per_sample_img_per_s"]
        )
    assert summary["per_sample_img_per_s"] == max(in_process["img_per_s"], loaders["img_per_s"])
    assert (
        f"speedup_32px = batched images/s over the faster per-sample row: {summary['speedup_32px']:.1f}"
        in p.stdout
    )


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "argv,named",
    [
        ([], []),
        (["nope"], []),
        (["loss", "--dims", "a,b"], ["--dims"]),
        (["loss", "--dims", "0"], ["--dims"]),
        (["loss", "--rows", "10", "--parts", "3"], ["--rows", "--parts"]),
        (["loss", "--max-time", "0"], ["--max-time"]),
        (["loss", "--json", "/no/such/dir/x.json"], ["--json"]),
        (["loss", "--json", "."], ["--json"]),  # a directory
        (["loss", "--bogus"], ["--bogus"]),
        (["train", "--projs", "12-x"], ["--projs"]),
        (["train", "--projs", "2048-0"], ["--projs"]),
        (["train", "--arch", "vgg"], ["--arch"]),
        (["train", "--batch", "6", "--parts", "4"], ["--batch", "--parts"]),
        (["train", "--amp", "fp8"], ["--amp"]),
        (["train", "--warmup", "-1"], ["--warmup"]),
        (["data", "--workers", "-1"], ["--workers"]),
        (["data", "--threads", "0"], ["--threads"]),
        (["parts"], []),
    ],
)
def test_bad_input_one_line_exit_2(argv, named, capsys):
    """One line on stderr, which names the flags the user typed (and no other)."""
    assert bench.cli(argv) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bench.py: error: "), err
    assert re.findall(r"--[\w-]+", lines[0]) == named, err
    assert out == ""


# Each sub-command's settings at a tiny size, so that a bad value let through ends at once (and fails the
# test) instead of running long; and every numeric flag of each, with a value out of its range.
TINY = dict(
    loss=["--dims", "8", "--parts", "1", "--rows", "16"],
    train=["--projs", "8-4", "--img-size", "8", "--batch", "4", "--amp", "none"],
    data=["--batch", "8", "--threads", "1", "--workers", "0", "--folder-size", "8", "--amp", "none"],
)
ROUNDS = {"--warmup": "-1", "--repeats": "0", "--steps": "0", "--max-time": "0"}
OUT_OF_RANGE = dict(
    loss=dict(ROUNDS, **{"--dims": "8,0", "--parts": "1,0", "--rows": "1"}),
    train=dict(ROUNDS, **{"--img-size": "0", "--batch": "1", "--parts": "0"}),
    data=dict(ROUNDS, **{"--batch": "1", "--threads": "0", "--workers": "-1", "--folder-size": "0"}),
)
NUMBERS = [
    (command, flag, value)
    for command, flags in OUT_OF_RANGE.items()
    for flag, out_of_range in flags.items()
    for value in ("nan", "inf", out_of_range)
]


@pytest.mark.parametrize("command,flag,value", NUMBERS)
def test_numbers_checked_before_anything_runs(command, flag, value, tmp_path, capsys):
    """nan, inf and a value out of range: one line naming the flag and the value, exit 2, no --json file."""
    out = tmp_path / "out.json"
    rounds = ["--warmup", "0", "--repeats", "1", "--max-time", "1"]
    argv = [command, *TINY[command], *rounds, flag, value, "--json", str(out)]
    assert bench.cli(argv) == 2
    stdout, stderr = capsys.readouterr()
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bench.py: error: "), stderr
    assert flag in lines[0] and repr(value) in lines[0], stderr
    assert stdout == "" and not out.exists()


def options(command, capsys, monkeypatch):
    """{flag: its help} of bench.py COMMAND --help, each on one line; an option's first flag names it."""
    monkeypatch.setenv("COLUMNS", "400")  # no line broken inside a default
    with pytest.raises(SystemExit):
        bench.cli([command, "--help"])
    listing = capsys.readouterr().out.split("\noptions:\n")[1]
    blocks = re.split(r"\n(?=  -)", listing)
    return {block.split()[0].rstrip(","): " ".join(block.split()) for block in blocks}


def shown_default(help_text):
    """The default an option's help shows (its first word), this device's where it depends on the device."""
    shown = help_text.split("(default: ")[1].split(")")[0]
    if shown.startswith("CPU "):
        cpu, gpu = shown.split("; ")
        shown = (gpu if torch.cuda.is_available() else cpu).split(" ", 1)[1]
    return shown.split()[0].rstrip(",")


@pytest.mark.parametrize("command", ["loss", "train", "data"])
def test_every_option_shows_its_default(command, capsys, monkeypatch):
    """Each option's help shows its default, and the default shown is the one used; the numeric options
    are the ones test_numbers_checked_before_anything_runs covers."""
    helps = options(command, capsys, monkeypatch)
    del helps["-h"]
    for help_text in helps.values():
        assert re.search(r"\(default: [^)]+\)", help_text), help_text
    defaults = vars(bench.parse_args([command]))
    for flag in set(helps) - {"--json", "--amp"}:  # none; decorr.py's
        assert vars(bench.parse_args([command, flag, shown_default(helps[flag])])) == defaults, flag
    numbers = [flag for flag, help_text in helps.items() if help_text.split()[1].isupper()]  # a METAVAR
    assert set(numbers) - {"--json", "--projs"} == set(OUT_OF_RANGE[command]) - {"--steps"}


def test_projs_help_and_error(capsys, monkeypatch):
    """--projs: what it is, its format and its default in --help; its errors name --projs."""
    help_text = options("train", capsys, monkeypatch)["--projs"]
    assert "projectors, comma-separated: widths joined by -, the last is D" in help_text
    assert "(default: 4096-256,2048-2048-2048,8192-8192-8192)" in help_text
    for projs in ("4096-256,12-x", "2048-0", "4096-256,"):
        assert bench.cli(["train", "--projs", projs]) == 2
        err = capsys.readouterr().err
        assert re.findall(r"--[\w-]+", err) == ["--projs"] and repr(projs) in err, err


def test_bad_input_from_the_shell():
    p = run("train", "--proj", "2048-x-1", timeout=120)
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bench.py: error: "), p.stderr
    assert p.stdout == ""
