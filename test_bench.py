"""Tests for bench.py: the Algorithm 1 reference, and each sub-command end to end at a tiny size
(subprocesses included), so that the benchmark harness cannot rot. Run: pytest -q test_bench.py"""
import json, os, re, subprocess, sys

import pytest
import torch

import bench
import decorr

HERE = os.path.dirname(os.path.abspath(__file__))


def run(*argv, timeout=600):
    return subprocess.run([sys.executable, os.path.join(HERE, "bench.py"), *argv], capture_output=True,
                          text=True, cwd=HERE, timeout=timeout)


def table_rows(stdout):
    """The body rows of the first markdown table in stdout, as lists of stripped cells."""
    lines = [l for l in stdout.splitlines() if l.startswith("|")]
    assert len(lines) >= 3, stdout
    assert re.fullmatch(r"\|(-+\|)+", lines[1]), lines[1]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return header, [[c.strip() for c in l.strip("|").split("|")] for l in lines[2:]]


@pytest.mark.parametrize("parts,per_part", [(1, False), (4, False), (4, True), (16, False)])
def test_algorithm1_matches_decorr_loss(parts, per_part):
    torch.manual_seed(0)
    n, D = 32, 24
    x = torch.randn(n, D)
    f1, f2 = decorr.standardize(x), decorr.standardize(x + torch.randn(n, D))
    w0 = torch.randn(D, D) / D**0.5
    outs = []
    for fn, kw in ((decorr.decorr_loss, {}), (bench.algorithm1, dict(wtw_per_part=per_part))):
        a, b, w = [t.clone().requires_grad_() for t in (f1, f2, w0)]
        loss, inv, cov = fn(a, b, w, parts, 25.0, 3.0, **kw)
        loss.backward()
        outs.append([loss, inv, cov, a.grad, b.grad, w.grad])
    for x, y in zip(*outs):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
    assert bench.check_reference()["ok"]


def test_algorithm1_literal_per_part():
    """Part j is exactly Algorithm 1 run on its rows: cov averaged over parts."""
    torch.manual_seed(1)
    n, D, parts = 12, 5, 3
    f1, f2, w = torch.randn(n, D), torch.randn(n, D), torch.randn(D, D)
    m, wtw, cov = n // parts, w.T @ w, 0.0
    for j in range(parts):
        for f in (f1, f2):
            p = f[j * m:(j + 1) * m] @ w.T
            cov += ((p.T @ p / m - wtw) ** 2).sum() / parts
    inv = ((f1 @ w.T - f2) ** 2).mean() + ((f2 @ w.T - f1) ** 2).mean()
    loss, inv_b, cov_b = bench.algorithm1(f1, f2, w, parts, 2.0, 3.0)
    torch.testing.assert_close(cov_b, cov)
    torch.testing.assert_close(inv_b, inv)
    torch.testing.assert_close(loss, 2.0 * inv + 3.0 / D * cov)


def test_md_table():
    t = bench.md_table(["a", "long header"], [[1, "x"], ["wide cell", 2.5]])
    lines = t.splitlines()
    assert lines[0] == "| a         | long header |"
    assert lines[1] == "|-----------|-------------|"
    assert lines[3] == "| wide cell | 2.5         |"
    assert len({len(l) for l in lines}) == 1


def test_measure_counts_long_warmup():
    sec, times, counted = bench.measure(lambda: None, torch.device("cpu"), 1, 5, 1e-9)
    assert counted and len(times) == 1
    sec, times, counted = bench.measure(lambda: None, torch.device("cpu"), 1, 4, 100.0)
    assert not counted and len(times) == 4


def test_measure_rounds_lockstep_and_oom():
    import time
    cpu = torch.device("cpu")
    fns = dict(slow=lambda: time.sleep(0.02), fast=lambda: time.sleep(0.005))
    r = bench.measure_rounds(fns, cpu, 1, 50, 0.1, lockstep=True)
    assert len(r["slow"]["times"]) == len(r["fast"]["times"]) < 50
    r = bench.measure_rounds(fns, cpu, 1, 50, 0.1)
    assert len(r["fast"]["times"]) > len(r["slow"]["times"])

    def oom():
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")
    seen = []
    r = bench.measure_rounds(dict(ok=lambda: None, big=oom), cpu, 1, 2, 10.0,
                             before_first=seen.append, after_first=seen.append)
    assert r["big"]["status"] == "oom" and r["big"]["seconds"] is None
    assert r["ok"]["status"] == "ok" and len(r["ok"]["times"]) == 2
    assert seen == ["ok", "ok", "big", "big"]


def test_loss_tiny(tmp_path):
    """Two sizes: D = 32 runs (both methods, two partition counts); D = 4096 is over a 0.05 GiB
    --mem-cap and is reported as OOM* (predicted) without being run."""
    out = tmp_path / "loss.json"
    p = run("loss", "--dims", "32,4096", "--parts", "1,4", "--rows", "16", "--repeats", "2", "--warmup", "1",
            "--mem-cap", "0.05", "--json", str(out))
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    header, rows = table_rows(p.stdout)
    assert header[:4] == ["D", "parts", "decorr_loss ms", "Algorithm 1 ms"]
    assert "matmul bound ms" in header and "ours / bound" in header and "memory ratio" in header
    assert [r[:2] for r in rows] == [["32", "1"], ["32", "4"], ["4096", "1"], ["4096", "4"]]
    for r in rows[:2]:                               # every cell a number, nothing failed
        for c in r:
            float(c)
    for r in rows[2:]:
        assert r[2] == r[3] == r[8] == r[9] == "OOM*"
    assert "OOM*: predicted" in p.stdout
    doc = json.loads(out.read_text())
    assert doc["command"] == "loss" and doc["settings"]["rows"] == 16
    m = doc["machine"]
    assert m["torch"] == torch.__version__ and m["threads"] == torch.get_num_threads()
    assert m["cpu"] and m["device"] == "cpu" and m["ram_bytes"] > 0
    assert doc["reference_check"]["ok"]
    assert [(r["D"], r["parts"]) for r in doc["results"]] == [(32, 1), (32, 4), (4096, 1), (4096, 4)]
    for r in doc["results"][:2]:
        ours = r["decorr_loss"]
        assert r["bound_s"] == ours["bound_s"] > 0 and r["ours_over_bound"] == ours["over_bound"] > 0
        assert "W^T W and its backward W (W^T W)" in {b["product"] for b in ours["bound_products"]}
        assert len(ours["bound_times"]) == len(ours["times"])
        for method in ("decorr_loss", "algorithm1"):
            x = r[method]
            assert x["status"] == "ok" and x["seconds"] > 0 and x["peak_bytes"] >= 0
            assert 1 <= len(x["times"]) <= 2 and x["threads"] >= 1 and x["predicted_peak_bytes"] > 0
        assert r["rel_diff"] < 1e-4
        assert r["speedup"] > 0 and r["ours_over_bound"] > 0
    for r in doc["results"][2:]:
        assert r["bound_s"] is None
        for method in ("decorr_loss", "algorithm1"):
            assert r[method]["status"] == "oom" and r[method]["predicted"]
    assert doc["markdown"] in p.stdout


def test_child_out_of_memory_is_oom_not_a_crash():
    """The address-space limit turns an allocation beyond --mem-cap into status oom."""
    spec = dict(kind="loss", device="cpu", method="algorithm1", rows=64, D=4096, parts=8, warmup=0,
                repeats=1, max_time=10, mem_cap=8 * 2**20, inv_coef=1.0, cov_coef=1.0, wtw_per_part=False)
    p = run("_one", json.dumps(spec))
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1])["status"] == "oom"


def test_train_tiny(tmp_path):
    out = tmp_path / "train.json"
    p = run("train", "--projs", "32-16", "--arch", "resnet18", "--img-size", "8", "--batch", "4",
            "--steps", "1", "--warmup", "1", "--amp", "none", "--json", str(out))
    assert p.returncode == 0, p.stderr
    header, rows = table_rows(p.stdout)
    assert header[:3] == ["projector", "variant", "images/s"] and "head share" in header
    assert [r[:2] for r in rows] == [["32-16", "decorr"], ["32-16", "algorithm1"], ["32-16", "no head"]]
    for r in rows:
        assert float(r[2]) > 0
    assert rows[0][5].endswith("%") and rows[2][5] == "-"
    doc = json.loads(out.read_text())
    assert doc["command"] == "train" and doc["machine"]["threads"] == torch.get_num_threads()
    assert doc["settings"]["arch"] == "resnet18" and doc["settings"]["batch"] == 4
    res = {r["variant"]: r for r in doc["results"]}
    assert set(res) == {"decorr", "algorithm1", "nohead"}
    for r in res.values():
        assert r["status"] == "ok" and r["img_per_s"] > 0 and r["peak_bytes"] >= 0
    assert res["decorr"]["head_share"] is not None and res["nohead"]["head_share"] is None


@pytest.mark.parametrize("argv", [
    [], ["nope"], ["loss", "--dims", "a,b"], ["loss", "--dims", "0"], ["loss", "--rows", "10", "--parts", "3"],
    ["train", "--projs", "12-x"], ["train", "--projs", "2048-0"], ["train", "--arch", "vgg"],
    ["train", "--batch", "6", "--parts", "4"], ["loss", "--json", "/no/such/dir/x.json"],
    ["loss", "--bogus"], ["train", "--amp", "fp8"], ["loss", "--mem-cap", "-1"],
])
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
    assert "Traceback" not in p.stderr and p.stdout == ""
