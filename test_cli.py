"""End-to-end tests of the decorr.py command line: each runs the real script in a subprocess (one
process, or two under torchrun) on the built-in synthetic data with a tiny configuration (ResNet-18
at 32 px, batch 32, projector 64-64, no autocast, no loader processes, a handful of steps). The runs
are module fixtures, each made once and checked by several tests."""

import copy
import functools
import itertools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch.utils.data import TensorDataset

ROOT = Path(__file__).resolve().parent
README = ROOT / "README.md"
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import decorr  # noqa: E402
from conftest import run_main  # noqa: E402

SMALL = ["--batch-size", "32", "--proj", "64-64", "--amp", "none", "--workers", "0", "--log-every", "1"]
# constant lr 1.0 (0.125 after batch scaling): the decorr loss falls by ~20% in 10 steps
FAST = SMALL + ["--epochs", "1", "--warmup-epochs", "0", "--lr", "1.0"]
TRAIN = FAST + ["--steps", "10", "--diag-every", "5", "--partitions", "2"]  # section 1's run
WORLD = FAST + ["--steps", "3"]  # section 6's runs
TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "decorr.py")
TERMS = {"decorr": ("inv", "cov"), "barlowtwins": ("on_diag", "off_diag"), "vicreg": ("inv", "var", "cov")}
DIAG_KEYS = {
    "corr_dist",
    "eff_rank_proj",
    "eff_rank_backbone",
    "feat_std",
    "knn_top1",
}  # + wp_offdiag (decorr)
FILES = ["backbone.pt", "checkpoint.pt", "curves.png", "log.jsonl", "wp.png"]


def threads(script=("decorr.py",)):
    """The environment of a run, its threads fixed whatever the machine: one per process under torchrun,
    two in a single process. The batch is then cut in two alike (over the processes, or by the CPU
    kernels over the threads), so the same run on 1 and 2 processes rounds alike (with one thread
    against two processes, VICReg's step-2 cov term differs by 1e-4), and two runs compared bitwise
    run alike."""
    return dict(os.environ, OMP_NUM_THREADS="1" if "torch.distributed.run" in script else "2")


def run(args, timeout=600, script=("decorr.py",), **kw):
    """Run decorr.py (or `script`, a list of argv items before `args`) from the repository root."""
    cmd = [sys.executable, *script, *[str(a) for a in args]]
    kw.setdefault("env", threads(script))
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kw)


def run_ok(tmp_path_factory, name, args, script=("decorr.py",)):
    """A run that must succeed, into a fresh out folder: (out, completed process)."""
    out = tmp_path_factory.mktemp(name) / "out"
    p = run(args + ["--out", out], script=script)
    assert p.returncode == 0, (name, p.stdout[-3000:], p.stderr[-3000:])
    return out, p


def rows(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def complete_rows(out):
    """The rows of a log that a running process may be appending to: a line without its newline yet
    is not read."""
    text = (Path(out) / "log.jsonl").read_text()
    return [json.loads(line) for line in text.split("\n")[:-1]]


def train_rows(out):
    return [r for r in rows(out) if "loss" in r]


def header(p):
    return p.stdout.splitlines()[0]


def assert_one_error_line(p, code=2):
    assert p.returncode == code, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    assert "Traceback" not in p.stderr, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("decorr.py: error: "), lines[0]
    return lines[0]


def assert_no_warnings(p):
    """Nothing on stderr looks like a Python warning ("UserWarning:", "FutureWarning:", ...)."""
    assert "Warning" not in p.stderr, p.stderr[-3000:]


def assert_same_losses(ref, other, terms, steps=3, rel=1e-4):
    """The first `steps` log rows of two runs agree: loss and each term to `rel`, step, epoch, lr."""
    a, b = train_rows(ref)[:steps], train_rows(other)[:steps]
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, steps + 1))
    for ra, rb in zip(a, b, strict=True):
        assert (ra["epoch"], ra["lr"]) == (rb["epoch"], rb["lr"]), (ra, rb)
        for k in ("loss", *terms):
            assert math.isfinite(ra[k]) and math.isclose(ra[k], rb[k], rel_tol=rel, abs_tol=1e-7), (k, ra, rb)


def write_png(path, seed):
    rgb = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)


# ----------------------------------------------------------------------------- 1. a short real run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """10 steps with a constant lr on one process, k = 2 (also section 6's one-process reference for
    k = 2)."""
    return run_ok(tmp_path_factory, "trained", TRAIN)


def test_short_run(trained):
    """A run writes its files, logs each step and diagnostics, lowers the loss, exports a loadable
    backbone and Fig. 3's picture, and states its settings in the header."""
    out, p = trained
    assert "Traceback" not in p.stderr
    assert_no_warnings(p)
    head = header(p)
    assert head.startswith("decorr | resnet18 (CIFAR stem) 64-64 | synthetic: 5000 images,"), head
    assert "| batch 32 on 1 x cpu | partitions 2 of 16 images | amp none" in head, head
    assert sorted(os.listdir(out)) == FILES  # no temporary file left

    log = rows(out)
    tr = [r for r in log if "loss" in r]
    assert [r["step"] for r in tr] == list(range(1, 11))
    for r in tr:
        assert {"epoch", "step", "loss", "inv", "cov", "lr"} <= r.keys(), r
        assert r["epoch"] == 0
        assert all(math.isfinite(r[k]) for k in ("loss", "inv", "cov", "lr")), r
        assert r["lr"] > 0
    losses = [r["loss"] for r in tr]
    assert losses[-1] < 0.95 * losses[0], losses  # the loss goes down (~20% here)
    assert max(r["lr"] for r in tr) <= 1.0 * 32 / 256 + 1e-12  # lr scaled by batch / 256

    diag = [r for r in log if "corr_dist" in r]
    assert [r["step"] for r in diag] == [5, 10]  # --diag-every 5
    for r in diag:
        assert DIAG_KEYS | {"wp_offdiag"} <= r.keys(), r
        assert all(math.isfinite(r[k]) for k in DIAG_KEYS | {"wp_offdiag"}), r
        assert 0 <= r["knn_top1"] <= 100
        assert 1 <= r["eff_rank_proj"] <= 64 + 1e-3
        assert r["feat_std"] > 0

    ckpt = decorr.load_checkpoint(out / "checkpoint.pt")
    assert ckpt["step"] == 10 and ckpt["args"]["proj"] == "64-64" and ckpt["args"]["partitions"] == 2
    assert "rng" not in ckpt  # nothing random is drawn after the init

    net = torchvision.models.resnet18()
    net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool = torch.nn.Identity()
    sd = torch.load(out / "backbone.pt", map_location="cpu", weights_only=True)
    missing, unexpected = net.load_state_dict(sd, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    assert torch.equal(net.conv1.weight, ckpt["model"]["backbone.conv1.weight"])
    backbone = decorr.build_backbone("resnet18", small_stem=True)[0]  # as the README loads it
    backbone.load_state_dict(sd)  # strict: every key, no fc

    with Image.open(out / "wp.png") as img:
        assert img.format == "PNG" and img.size[0] > img.size[1] > 200
        assert any(lo < hi for lo, hi in img.getextrema())  # not a blank picture


# ----------------------------------------------------------------------------- 2. bad input


def _folder(tmp, split_dirs=("train",), images=False):
    data = tmp / "data"
    data.mkdir()
    for s in split_dirs:
        (data / s).mkdir()
        if images:
            for j, c in enumerate("ab"):
                for i in range(2):
                    write_png(data / s / c / f"{i}.png", 10 * j + i)
    return data


BAD = {
    "proj-abc": lambda t: ["--proj", "abc"],
    "proj-zero": lambda t: ["--proj", "0-5"],
    "partitions": lambda t: ["--batch-size", "30", "--partitions", "4"],
    "data-missing": lambda t: ["--data", "/nonexistent"],
    "data-empty": lambda t: ["--data", _folder(t, ())],
    "data-no-val": lambda t: ["--data", _folder(t, ("train",), images=True)],
    "data-no-images": lambda t: ["--data", _folder(t, ("train", "val"))],
    "arch": lambda t: ["--arch", "resnet9"],
    "batch-abc": lambda t: ["--batch-size", "abc"],
    "compile-cpu": lambda t: ["--compile"],  # torch's CPU code generator miscompiles the model (README)
}
EXPECT = {
    "proj-abc": "--proj",
    "proj-zero": "--proj",
    "partitions": "--partitions",
    "data-missing": "/nonexistent",
    "data-empty": "train/",
    "data-no-val": "val/",
    "data-no-images": "class folder",
    "arch": "resnet9",
    "batch-abc": "--batch-size",
    "compile-cpu": "--compile is for CUDA",
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(case, tmp_path):
    """Bad arguments or data: one line on stderr, exit code 2, nothing written."""
    out = tmp_path / "out"
    args = SMALL + ["--steps", "1"] + BAD[case](tmp_path) + ["--out", out]
    line = assert_one_error_line(run(args, timeout=120))
    assert EXPECT[case] in line, line
    assert not out.exists()


def test_batch_not_splitting_over_processes(tmp_path, monkeypatch):
    """--batch-size must split over the processes (one line, before any process group starts); k need
    not be a multiple of the number of processes."""
    env = dict(os.environ, WORLD_SIZE="2", RANK="0", LOCAL_RANK="0")  # as torchrun sets it for rank 0
    out = tmp_path / "out"
    p = run(
        SMALL + ["--steps", "1", "--batch-size", "33", "--partitions", "3", "--out", out],
        timeout=120,
        env=env,
    )
    line = assert_one_error_line(p)
    assert "--batch-size 33 does not split over 2 processes" in line, line
    assert not out.exists()
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert decorr.parse_args(["--batch-size", "30", "--partitions", "3"]).partitions == 3
    assert decorr.parse_args(["--batch-size", "30"]).partitions == 1  # default: not the processes


def test_garbage_checkpoint_is_kept(tmp_path):
    """A checkpoint that is not one: one line naming it and --fresh; the file stays, nothing is added."""
    out = tmp_path / "out"
    out.mkdir()
    junk = b"\x80\x32" + bytes(range(256)) * 20  # starts like a pickle of protocol 50
    (out / "checkpoint.pt").write_bytes(junk)
    line = assert_one_error_line(run(SMALL + ["--steps", "1", "--out", out], timeout=120))
    assert "cannot load checkpoint" in line and "checkpoint.pt" in line and "--fresh" in line
    assert (out / "checkpoint.pt").read_bytes() == junk
    assert sorted(os.listdir(out)) == ["checkpoint.pt"]  # no log.jsonl, no temporary file


def test_truncated_checkpoint_is_kept(trained, tmp_path):
    """A truncated checkpoint: one line; the checkpoint and the log are left as they were."""
    out = tmp_path / "out"
    out.mkdir()
    data = (trained[0] / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    shutil.copy(trained[0] / "log.jsonl", out / "log.jsonl")
    log = (out / "log.jsonl").read_bytes()
    line = assert_one_error_line(run(TRAIN + ["--out", out], timeout=120))
    assert "cannot load checkpoint" in line
    assert (out / "checkpoint.pt").read_bytes() == data[: len(data) // 2]
    assert (out / "log.jsonl").read_bytes() == log


def _resume_refused(trained, tmp_path, args):
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(trained[0] / "checkpoint.pt", out / "checkpoint.pt")
    before = (out / "checkpoint.pt").read_bytes()
    line = assert_one_error_line(run(args + ["--out", out], timeout=120))
    assert (out / "checkpoint.pt").read_bytes() == before
    assert os.listdir(out) == ["checkpoint.pt"]
    return line


def test_resume_with_other_proj(trained, tmp_path):
    """Resuming with another run-defining setting is refused, naming only what differs."""
    line = _resume_refused(trained, tmp_path, [a if a != "64-64" else "32-32" for a in TRAIN])
    assert "--proj 64-64 -> 32-32" in line, line
    assert "--lr" not in line and "--batch-size" not in line and "--loss" not in line


def test_resume_with_other_loss(trained, tmp_path):
    """--loss is run-defining: resuming a decorr run with --loss vicreg is refused."""
    decorr_only = TRAIN.index("--partitions")
    args = TRAIN[:decorr_only] + TRAIN[decorr_only + 2 :] + ["--loss", "vicreg"]  # a flag for decorr only
    line = _resume_refused(trained, tmp_path, args)
    assert "--loss decorr -> vicreg" in line, line
    assert "--proj" not in line and "--lr" not in line


# ----------------------------------------------------------------------------- 3. resume after SIGTERM

RESUME = SMALL + ["--steps", "6", "--seed", "1"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Run A: 6 steps without interruption (also the fp32 eager reference of section 8)."""
    return run_ok(tmp_path_factory, "uninterrupted", RESUME)[0]


def test_resume_equals_uninterrupted(uninterrupted, tmp_path):
    """SIGTERM checkpoints and stops; resuming gives bitwise the uninterrupted run; --fresh moves the
    old checkpoint and log aside."""
    a, b = uninterrupted, tmp_path / "b"
    with open(tmp_path / "b.stdout", "w") as so, open(tmp_path / "b.stderr", "w") as se:
        proc = subprocess.Popen(
            [sys.executable, "decorr.py", *map(str, RESUME + ["--out", b])],
            cwd=ROOT,
            stdout=so,
            stderr=se,
            env=threads(),
        )
        try:
            deadline = time.time() + 300
            while time.time() < deadline and proc.poll() is None:
                if (b / "log.jsonl").exists() and any(r.get("step", 0) >= 2 for r in complete_rows(b)):
                    break
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    out1 = (tmp_path / "b.stdout").read_text()
    assert rc == 0, (tmp_path / "b.stderr").read_text()[-3000:]
    assert "stopped by signal" in out1
    stopped = decorr.load_checkpoint(b / "checkpoint.pt")["step"]
    assert 2 <= stopped < 6, f"the signal came too late to test a resume (step {stopped})"
    assert train_rows(b)[-1]["step"] == stopped
    assert not (b / "backbone.pt").exists()  # only a finished run exports

    pb = run(RESUME + ["--out", b])
    assert pb.returncode == 0, pb.stderr[-3000:]
    assert f"resumed from {b / 'checkpoint.pt'} at step {stopped}" in pb.stdout

    la, lb = train_rows(a), train_rows(b)
    assert [r["step"] for r in lb] == [r["step"] for r in la] == list(range(1, 7))
    for ra, rb in zip(la, lb, strict=True):
        # bitwise: CPU kernels are deterministic and the views are seeded by (seed, epoch, index)
        assert (ra["loss"], ra["inv"], ra["cov"], ra["lr"]) == (rb["loss"], rb["inv"], rb["cov"], rb["lr"]), (
            ra,
            rb,
        )
    ca, cb = (decorr.load_checkpoint(d / "checkpoint.pt") for d in (a, b))
    assert ca["step"] == cb["step"] == 6
    assert ca["model"].keys() == cb["model"].keys()
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    for sa, sb in zip(ca["optimizer"]["state"].values(), cb["optimizer"]["state"].values(), strict=True):
        assert torch.equal(sa["mu"], sb["mu"])

    # --fresh: the old checkpoint and log are moved aside, training starts at step 0
    pf = run(RESUME[:-4] + ["--steps", "1", "--seed", "1", "--fresh", "--out", b])
    assert pf.returncode == 0, pf.stderr[-3000:]
    assert "resumed from" not in pf.stdout and "--fresh" in pf.stdout
    moved = [f for f in os.listdir(b) if f.startswith("checkpoint.pt.") and ".tmp" not in f]
    assert len(moved) == 1, os.listdir(b)
    assert (b / ("log.jsonl" + moved[0][len("checkpoint.pt") :])).exists()
    old = decorr.load_checkpoint(b / moved[0])
    assert old["step"] == 6 and torch.equal(old["model"]["predictor.weight"], cb["model"]["predictor.weight"])
    assert decorr.load_checkpoint(b / "checkpoint.pt")["step"] == 1
    assert [r["step"] for r in train_rows(b)] == [1]


# ----------------------------------------------------------------------------- 4. atomic write

KILL_IN_REPLACE = """
import os, signal, sys, torch
import decorr
os.replace = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
big = dict(model=torch.randn(4_000_000), step=99)
decorr.atomic_write(sys.argv[1], lambda fh: torch.save(big, fh))
print("not reached")
"""


def test_atomic_write_survives_kill(tmp_path):
    """A kill between writing and renaming leaves the old checkpoint complete."""
    path = tmp_path / "checkpoint.pt"
    old = dict(model=torch.arange(10.0), step=3)
    decorr.atomic_write(str(path), lambda fh: torch.save(old, fh))
    p = run([path], script=("-c", KILL_IN_REPLACE), timeout=120)
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr)
    assert "not reached" not in p.stdout
    tmp = [f for f in os.listdir(tmp_path) if ".tmp" in f]
    assert len(tmp) == 1 and (tmp_path / tmp[0]).stat().st_size > 16_000_000  # the new one was written
    back = decorr.load_checkpoint(path)
    assert back["step"] == 3 and torch.equal(back["model"], old["model"])


# ----------------------------------------------------------------------------- 5. non-finite loss

# decorr.py's own __main__ block, run in the imported module's namespace after the patch
NAN_FROM_4TH_CALL = """
import sys
import decorr
orig, calls = decorr.decorr_loss, [0]
def patched(*a, **k):
    calls[0] += 1
    loss, inv, cov = orig(*a, **k)
    return (loss * float("nan") if calls[0] >= 4 else loss), inv, cov
decorr.decorr_loss = patched
sys.argv = ["decorr.py"] + sys.argv[1:]
src = open(decorr.__file__).read()
block = src[src.index('\\nif __name__ == "__main__":'):]
ns = vars(decorr)
ns["__name__"] = "__main__"
exec(compile(block, decorr.__file__, "exec"), ns)
"""


def test_nan_loss_stops_with_last_checkpoint(tmp_path):
    """A non-finite loss stops the run with one line naming the step and the last good checkpoint."""
    out = tmp_path / "out"
    p = run(
        SMALL + ["--steps", "8", "--save-every-steps", "2", "--out", out],
        script=("-c", NAN_FROM_4TH_CALL),
        timeout=300,
    )
    line = assert_one_error_line(p, code=1)
    assert "non-finite loss" in line and "at step 4" in line, line
    assert str(out / "checkpoint.pt") in line and "(step 2)" in line, line
    ckpt = decorr.load_checkpoint(out / "checkpoint.pt")
    assert ckpt["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert [r["step"] for r in train_rows(out)] == [1, 2, 3]
    assert not (out / "backbone.pt").exists()


# ----------------------------------------------------------------------------- 6. torchrun, 2 processes


@pytest.fixture(scope="module")
def single_k1(tmp_path_factory):
    """3 steps on one process, no --partitions (so k = 1: 32 rows are not a multiple of 256)."""
    return run_ok(tmp_path_factory, "single_k1", WORLD)


@pytest.fixture(scope="module")
def double_k1(tmp_path_factory):
    """The same command on 2 processes (so k = 1 again: the one part spans both ranks)."""
    return run_ok(tmp_path_factory, "double_k1", WORLD, script=TORCHRUN)


@pytest.fixture(scope="module")
def double_k2(tmp_path_factory):
    """The same 3 steps on 2 processes with --partitions 2: one part per rank."""
    return run_ok(tmp_path_factory, "double_k2", WORLD + ["--partitions", "2"], script=TORCHRUN)


def test_default_partitions_do_not_depend_on_processes(single_k1, double_k1):
    """Without --partitions, k is the batch / 256 when 256 divides it, else 1, whatever the number of
    processes: the same command is k = 1 for python and under torchrun (and the header says so)."""
    assert "| batch 32 on 1 x cpu | partitions 1 of 32 images |" in header(single_k1[1]), header(single_k1[1])
    assert "| batch 32 on 2 x cpu | partitions 1 of 32 images |" in header(double_k1[1]), header(double_k1[1])
    for out, _ in (single_k1, double_k1):
        assert decorr.load_checkpoint(out / "checkpoint.pt")["args"]["partitions"] == 1


@pytest.mark.parametrize("name", ["single_k1", "double_k2"])
def test_no_warnings(name, request):
    """A short run prints no Python warning, on one process or two (torchrun's own notice about
    OMP_NUM_THREADS is all that may come on stderr)."""
    out, p = request.getfixturevalue(name)
    assert_no_warnings(p)
    if name.startswith("double"):
        other = [
            line
            for line in p.stderr.splitlines()
            if line.strip() and set(line.strip()) != {"*"} and not line.startswith("Setting OMP_NUM_THREADS")
        ]
        assert not other, p.stderr[-3000:]


@pytest.mark.parametrize("name", ["double_k1", "double_k2"])
def test_torchrun_two_processes(name, request):
    """Under torchrun: rank 0 alone speaks and writes (one header, one row per step), the checkpoint
    and log are those of the 3 steps."""
    out, p = request.getfixturevalue(name)
    assert "terminate called" not in p.stderr and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert p.stdout.count("done at step 3") == 1
    assert p.stdout.count(" | amp none") == 1  # one header
    assert sorted(os.listdir(out)) == FILES
    assert [r["step"] for r in rows(out) if "corr_dist" in r] == [3]
    tr = train_rows(out)
    assert [r["step"] for r in tr] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in tr)
    ckpt = decorr.load_checkpoint(out / "checkpoint.pt")
    assert ckpt["step"] == 3 and "rng" not in ckpt


@pytest.mark.parametrize("k", [1, 2])
def test_world_size_invariance(k, request):
    """The same command logs the same losses on 1 and 2 processes (rows of the global batch split
    over ranks, views a function of the image), for a part spanning ranks (k = 1) or one per rank."""
    ref, other = ("single_k1", "double_k1") if k == 1 else ("trained", "double_k2")
    assert_same_losses(request.getfixturevalue(ref)[0], request.getfixturevalue(other)[0], TERMS["decorr"])


def test_world_size_same_weights(single_k1, double_k1):
    """After 3 steps, 1 and 2 processes hold the same weights and BatchNorm statistics: each tensor
    differs by under 2% of how far it moved from the initial weights (float rounding: <= 0.3%)."""
    a = decorr.load_checkpoint(single_k1[0] / "checkpoint.pt")["model"]
    b = decorr.load_checkpoint(double_k1[0] / "checkpoint.pt")["model"]
    torch.manual_seed(0)  # the script's initial weights (--seed 0)
    init = decorr.Model(decorr.parse_args(WORLD)).state_dict()
    assert a.keys() == b.keys() == init.keys()
    for k, w0 in init.items():
        if not w0.is_floating_point():
            assert torch.equal(a[k], b[k]), k  # num_batches_tracked
            continue
        moved = (a[k] - w0).norm().item()
        assert moved > 0, k  # every tensor trains
        assert (b[k] - a[k]).norm().item() <= 0.02 * moved, (k, moved, (b[k] - a[k]).norm().item())
        if w0.dim() > 1:  # LARS moves a matrix by ~1% in 3 steps, so
            assert moved <= 0.05 * w0.norm().item(), k  # init really is the run's starting point


def test_two_process_forward_deterministic(double_k1, double_k2):
    """Both 2-process runs start from the same weights and views: step 1's invariance term (which
    does not depend on k) is bitwise the same."""
    assert train_rows(double_k1[0])[0]["inv"] == train_rows(double_k2[0])[0]["inv"]


# ----------------------------------------------------------------------------- 7. baselines

# A constant lr that lowers each loss within 6 steps: Barlow Twins at the default 0.3 (its 3-step mean
# halves); VICReg with the official coefficients (sim 25, std 25, cov 1) stays flat for 15 steps at any
# lr tried (0.3 to 10; its sim and std terms balance at the initial scale), with sim coef 5 and lr 3.0
# its std term falls and the 3-step mean with it (by ~10%).
BASELINE = SMALL + ["--epochs", "1", "--warmup-epochs", "0", "--diag-every", "3"]
BASELINE_ARGS = {
    "barlowtwins": ["--loss", "barlowtwins"],
    "vicreg": ["--loss", "vicreg", "--lr", "3.0", "--inv-coef", "5"],
}


@pytest.fixture(scope="module", params=list(BASELINE_ARGS))
def loss_name(request):
    return request.param


@pytest.fixture(scope="module")
def baseline_single(loss_name, tmp_path_factory):
    """6 steps of a baseline on one process (two threads: `threads`)."""
    args = BASELINE + BASELINE_ARGS[loss_name] + ["--steps", "6"]
    return run_ok(tmp_path_factory, f"{loss_name}_single", args)


@pytest.fixture(scope="module")
def baseline_double(loss_name, tmp_path_factory):
    """The first 2 of those steps on 2 processes (one thread each: `threads`)."""
    args = BASELINE + BASELINE_ARGS[loss_name] + ["--steps", "2"]
    return run_ok(tmp_path_factory, f"{loss_name}_double", args, script=TORCHRUN)


def test_baseline_trains(loss_name, baseline_single):
    """--loss barlowtwins / vicreg: the loss falls, rows carry the loss's own terms, no predictor
    (no wp.png, no wp_offdiag, no predictor weights), the header names the loss and no partitions."""
    out, p = baseline_single
    assert_no_warnings(p)
    head = header(p)
    assert head.startswith(f"{loss_name} | resnet18 (CIFAR stem) 64-64 |") and "partitions" not in head, head
    assert sorted(os.listdir(out)) == ["backbone.pt", "checkpoint.pt", "curves.png", "log.jsonl"]
    others = {t for terms in TERMS.values() for t in terms} - set(TERMS[loss_name])
    tr = train_rows(out)
    assert [r["step"] for r in tr] == list(range(1, 7))
    for r in tr:
        assert {"loss", *TERMS[loss_name]} <= r.keys() and not others & r.keys(), r
        assert all(math.isfinite(r[k]) for k in ("loss", *TERMS[loss_name])), r
    losses = [r["loss"] for r in tr]
    assert sum(losses[3:]) < 0.95 * sum(losses[:3]), losses  # batch-to-batch noise is large: 3-step means
    diag = [r for r in rows(out) if "corr_dist" in r]
    assert [r["step"] for r in diag] == [3, 6]
    for r in diag:
        assert DIAG_KEYS <= r.keys() and "wp_offdiag" not in r, r
    ckpt = decorr.load_checkpoint(out / "checkpoint.pt")
    assert ckpt["args"]["loss"] == loss_name and ckpt["step"] == 6
    assert not [k for k in ckpt["model"] if k.startswith("predictor")]
    assert p.stdout.splitlines()[-1].startswith("done at step 6")


def test_baseline_world_size_invariance(loss_name, baseline_single, baseline_double):
    """A baseline logs the same losses and terms on 1 and 2 processes, with the threads fixed (`threads`:
    the batch is cut in two alike, so the rounding is alike: step 2's losses agree to 2e-7 here). Two
    steps (step 2 follows the first update): Barlow Twins amplifies float rounding ~50x a step, and
    at step 3 the two differ by 1e-4; with one thread in the single process, VICReg's step 2 cov
    term differs by 1.05e-4."""
    out, p = baseline_double
    assert "Traceback" not in p.stderr and p.stdout.count("done at step 2") == 1
    assert sorted(os.listdir(out)) == ["backbone.pt", "checkpoint.pt", "curves.png", "log.jsonl"]
    assert_same_losses(baseline_single[0], out, TERMS[loss_name], steps=2)


def test_baseline_lineval(loss_name, baseline_single):
    """lineval.py reads a baseline's backbone.pt (the run's settings from its checkpoint) and ends
    with a JSON line holding the probe's top-1: on 256 validation images of 10 classes, well above
    chance (10 %: 17 % is 3.7 binomial sigma above it; 23 % is measured)."""
    out = baseline_single[0]
    p = run(
        [out / "backbone.pt", "--fast-epochs", "30", "--limit", "256", "--amp", "none", "--workers", "0"],
        script=("lineval.py",),
        timeout=300,
    )
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    assert_no_warnings(p)
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["ckpt"] == str(out / "backbone.pt") and not res["random_init"]
    assert (res["arch"], res["small_stem"], res["data"], res["n_train"]) == (
        "resnet18",
        True,
        "synthetic",
        256,
    )
    assert res["epochs"] == 30 and res["n_val"] == 256
    assert 17 < res["top1"] <= res["top5"] <= 100, res


# ----------------------------------------------------------------------------- 8. bf16 autocast


def test_bf16_close_to_fp32(uninterrupted, tmp_path):
    """--amp bf16 really autocasts and stays within 10% of the float32 losses."""
    out = tmp_path / "bf16"
    p = run(
        [a if a != "none" else "bf16" for a in RESUME[:-4]] + ["--steps", "3", "--seed", "1", "--out", out]
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "amp bf16" in header(p)
    bf16, fp32 = [r["loss"] for r in train_rows(out)], [r["loss"] for r in train_rows(uninterrupted)][:3]
    assert len(bf16) == 3 and all(math.isfinite(x) for x in bf16), bf16
    assert bf16 != fp32  # autocast is really on
    for x, y in zip(bf16, fp32, strict=True):
        assert abs(x - y) <= 0.1 * abs(y), (bf16, fp32)


# ----------------------------------------------------------------------------- 9. in-process runs
# decorr.main(argv) in this process, so that a test can see inside a run: the model and inputs of a
# step (decorr.train_step wrapped), a signal sent at a chosen step. The data is the built-in kind,
# fewer and smaller: 512 training and 64 validation images of 16 px (data.synthetic_images); the
# diagnostics run on 32 of them instead of 256 and 384 (their code is the same).

SMALL_IP = ["--batch-size", "16", "--proj", "32-32", "--img-size", "16", "--amp", "none", "--workers", "0"]
SMALL_IP += ["--log-every", "1"]


@functools.cache
def small_synthetic(n_train):
    train, val = (
        TensorDataset(*data.synthetic_images(n, seed, size=16)) for n, seed in ((n_train, 0), (64, 1))
    )
    return train, val, 10, True


def in_process(monkeypatch, argv, wrap_step=None, n_train=512, diag_images=32):
    """decorr.main(argv) here, on small_synthetic(n_train); wrap_step(train_step, i, *args), if given,
    replaces train_step's i-th call (from 0). The preemption handlers main installs are removed after."""
    for module in (decorr, data):
        if hasattr(module, "load_data"):
            monkeypatch.setattr(module, "load_data", lambda name, root="data": small_synthetic(n_train))
    fixed_batch = decorr.fixed_batch
    monkeypatch.setattr(decorr, "fixed_batch", lambda ds, n, *a: fixed_batch(ds, min(n, diag_images), *a))
    if wrap_step:
        train_step, calls = decorr.train_step, []

        def step(*args):
            calls.append(len(calls))
            return wrap_step(train_step, calls[-1], *args)

        monkeypatch.setattr(decorr, "train_step", step)
    try:
        run_main(argv)
    finally:
        monkeypatch.undo()


def fake_step(model, opt, scaler, x1, x2, lr, amp):
    """A step that trains nothing, for the tests of what main() does around the step (cheap)."""
    return torch.tensor(1.0), torch.tensor(0.5), torch.tensor(0.5)


# Table 3's flags, each from the command line to the model: a one-step run's checkpoint equals one
# step made here by hand (backbone, projector, standardization or not, decorr_loss with or without
# StopGrad, LARS at the logged lr) from the run's own initial weights and inputs, and differs from
# the other flags' steps by far more than rounding.
TABLE3 = {
    "default": ([], True, False),
    "no-std": (["--no-std"], False, False),
    "stopgrad": (["--stopgrad"], True, True),
}
STEP1 = SMALL_IP + ["--epochs", "1", "--warmup-epochs", "0", "--lr", "5", "--steps", "1"]


def by_hand_step(args, init, x1, x2, lr, std, stopgrad):
    """(loss, weights after one step) of the decorr model `args` describes, from `init`."""
    model = decorr.Model(args)
    model.load_state_dict(init)
    model.backbone.to(memory_format=torch.channels_last)
    opt = decorr.make_optimizer(model, args)
    f1, f2 = (model.projector(model.backbone(x)) for x in (x1, x2))
    if std:
        f1, f2 = decorr.standardize(f1), decorr.standardize(f2)
    w = model.predictor.weight
    loss = decorr.decorr_loss(f1, f2, w, args.partitions, args.inv_coef, args.cov_coef, stopgrad)[0]
    loss.backward()
    for group in opt.param_groups:
        group["lr"] = lr
    opt.step()
    return loss.item(), {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def table3(tmp_path_factory):
    """One step of each TABLE3 run: {name: (initial weights, x1, x2, lr, checkpoint, log rows)}, and
    the by-hand steps {(std, stopgrad): (loss, weights)} from the default run's weights and inputs."""
    runs = {}
    for name, (flags, _, _) in TABLE3.items():
        seen = {}

        def record(train_step, i, model, opt, scaler, x1, x2, lr, amp, seen=seen):
            seen.update(init={k: v.clone() for k, v in model.state_dict().items()}, x=(x1, x2), lr=lr)
            return train_step(model, opt, scaler, x1, x2, lr, amp)

        out = tmp_path_factory.mktemp(name) / "out"
        with pytest.MonkeyPatch.context() as mp:
            in_process(mp, STEP1 + flags + ["--out", out], wrap_step=record)
        runs[name] = (seen, decorr.load_checkpoint(out / "checkpoint.pt"), train_rows(out))
    seen = runs["default"][0]
    args = decorr.parse_args(STEP1)
    hand = {
        (std, sg): by_hand_step(args, seen["init"], *seen["x"], seen["lr"], std, sg)
        for _, std, sg in TABLE3.values()
    }
    return runs, hand


@pytest.mark.parametrize("name", list(TABLE3))
def test_table3_flags_reach_the_model(table3, name):
    """--no-std (no standardization) and --stopgrad (targets detached), and neither: the run's step
    is the by-hand step with that setting (each tensor within 1e-4 of how far it moved; the loss
    logged), not the others' (some tensor off by more than 5 %). The runs start alike (same seed)."""
    runs, hand = table3
    (seen, ckpt, rows), (_, std, sg) = runs[name], TABLE3[name]
    init = seen["init"]
    assert all(torch.equal(init[k], runs["default"][0]["init"][k]) for k in init)
    assert rows[0]["lr"] == seen["lr"] == 5 * 16 / 256

    def worst(expected):  # the largest error of a tensor relative to its move
        errors = []
        for k, v in expected.items():
            moved = (v - init[k]).float().norm()
            if v.is_floating_point() and moved > 0:
                errors.append(((ckpt["model"][k] - v).norm() / moved).item())
        return max(errors)

    for (h_std, h_sg), (loss, weights) in hand.items():
        if (h_std, h_sg) == (std, sg):
            assert worst(weights) <= 1e-4, name
            assert rows[0]["loss"] == pytest.approx(loss, rel=1e-6)
        else:
            assert worst(weights) > 0.05, (name, h_std, h_sg)


def test_default_predictor_starts_at_identity(table3):
    """The default W at step 0 is the identity (the fixed point for decorrelated features); after one
    LARS step it has moved by exactly lr * eta * ||I|| (the first step's trust ratio)."""
    runs, _ = table3
    seen, ckpt, _ = runs["default"]
    w0, w1 = seen["init"]["predictor.weight"], ckpt["model"]["predictor.weight"]
    assert torch.equal(w0, torch.eye(32))
    eta = ckpt["args"]["lars_eta"]
    assert (w1 - w0).norm().item() == pytest.approx(seen["lr"] * eta * math.sqrt(32), rel=1e-4)


def test_identity_predictor_stays_identity(monkeypatch, tmp_path):
    """--identity-predictor: W is I at step 0 and still I after a step (LARS does not hold it, so no
    later step moves it either), while the rest of the model trains."""
    seen = []

    def record(train_step, i, model, opt, scaler, x1, x2, lr, amp):
        optimised = any(p is model.predictor.weight for g in opt.param_groups for p in g["params"])
        seen.append(
            (model.predictor.weight.detach().clone(), model.projector[0].weight.detach().clone(), optimised)
        )
        return train_step(model, opt, scaler, x1, x2, lr, amp)

    out = tmp_path / "out"
    in_process(
        monkeypatch, STEP1[:-2] + ["--steps", "2", "--identity-predictor", "--out", out], wrap_step=record
    )
    ckpt = decorr.load_checkpoint(out / "checkpoint.pt")
    assert ckpt["step"] == 2 and ckpt["args"]["identity_predictor"] and len(seen) == 2
    assert all(torch.equal(w, torch.eye(32)) and not optimised for w, _, optimised in seen)
    assert torch.equal(ckpt["model"]["predictor.weight"], torch.eye(32))
    assert not torch.equal(ckpt["model"]["projector.0.weight"], seen[0][1])  # the projector trains


def test_predictor_init_random(monkeypatch, tmp_path):
    """--predictor-init random: W at step 0 is nn.Linear's init (entries within 1/sqrt(D), far from I),
    and the first LARS step moves it by lr * eta * ||W_0||."""
    seen = []

    def record(train_step, i, model, opt, scaler, x1, x2, lr, amp):
        seen.append((model.predictor.weight.detach().clone(), lr))
        return train_step(model, opt, scaler, x1, x2, lr, amp)

    out = tmp_path / "out"
    in_process(monkeypatch, STEP1 + ["--predictor-init", "random", "--out", out], wrap_step=record)
    ((w0, lr),) = seen
    ckpt = decorr.load_checkpoint(out / "checkpoint.pt")
    w1 = ckpt["model"]["predictor.weight"]
    assert w0.abs().max() <= 1 / math.sqrt(32) and w0.std() > 0.5 / math.sqrt(
        3 * 32
    )  # U(-1/sqrt(D), 1/sqrt(D))
    assert (w0 - torch.eye(32)).norm() > 0.9 * math.sqrt(32)
    assert (w1 - w0).norm().item() == pytest.approx(
        lr * ckpt["args"]["lars_eta"] * w0.norm().item(), rel=1e-4
    )


@pytest.mark.parametrize("warmup_epochs, warmup", [(1, 4), (5, 8)], ids=["epochs", "tenth"])
def test_lr_schedule_exact(monkeypatch, tmp_path, warmup_epochs, warmup):
    """The logged lr, and the lr each step is given, is exactly base lr x batch / 256 on the paper's
    schedule: linear warm-up over min(warmup epochs, a tenth of the run) steps, then cosine to 0 (64
    images, batch 16: 4 steps an epoch, 20 epochs, 80 steps; warm-up 1 epoch = 4 steps, or 5 epochs
    cut to 8). The lr rises for exactly `warmup` steps, reaches the base at the last of them, and
    falls from the step after next."""
    given = []

    def record(train_step, i, model, opt, scaler, x1, x2, lr, amp):
        given.append(lr)
        return fake_step(model, opt, scaler, x1, x2, lr, amp)

    out, steps, total, base = tmp_path / "out", warmup + 3, 80, 0.4 * 16 / 256
    argv = SMALL_IP + ["--epochs", "20", "--warmup-epochs", warmup_epochs, "--lr", "0.4", "--steps", steps]
    in_process(monkeypatch, argv + ["--diag-every", "1000", "--out", out], wrap_step=record, n_train=64)
    expected = [
        base * s / warmup
        if s <= warmup
        else base * 0.5 * (1 + math.cos(math.pi * (s - 1 - warmup) / (total - warmup)))
        for s in range(1, steps + 1)
    ]
    logged = [r["lr"] for r in train_rows(out)]
    assert len(logged) == len(given) == steps
    for s, (a, b, e) in enumerate(zip(logged, given, expected, strict=True), 1):
        assert a == b == pytest.approx(e, rel=1e-12, abs=0), (s, a, b, e)
    rises = [b > a for a, b in itertools.pairwise([0.0, *logged])]
    assert rises == [True] * warmup + [False] * 3
    assert (
        logged[warmup - 1] == logged[warmup] == pytest.approx(base, rel=1e-12) and logged[warmup + 1] < base
    )


def test_sigusr1_stops_and_a_cut_line_is_dropped_on_resume(monkeypatch, tmp_path, capsys):
    """SIGUSR1 (SLURM's warning before preemption) stops a run as SIGTERM does: at the step it came in,
    with a checkpoint of that step and no backbone.pt. A line cut by a crash at the end of log.jsonl
    is dropped on resume: after it, every line of the log is whole JSON, and steps 1..4 once each."""
    out = tmp_path / "out"
    argv = SMALL_IP + ["--epochs", "1", "--steps", "4", "--out", out]

    def signal_at_step_2(train_step, i, *args):
        if i == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        return train_step(*args)

    previous = signal.signal(signal.SIGUSR1, lambda number, frame: None)  # were it not caught: no kill
    try:
        in_process(monkeypatch, argv, wrap_step=signal_at_step_2)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    stdout = capsys.readouterr().out
    assert "stopped by signal at step 2" in stdout, stdout[-2000:]
    assert decorr.load_checkpoint(out / "checkpoint.pt")["step"] == 2
    assert not (out / "backbone.pt").exists()
    assert [r["step"] for r in train_rows(out)] == [1, 2]

    cut = '{"epoch": 0, "step": 3, "loss": 41.2'
    with open(out / "log.jsonl", "a") as fh:
        fh.write(cut)
    in_process(monkeypatch, argv)
    stdout = capsys.readouterr().out
    assert f"resumed from {out / 'checkpoint.pt'} at step 2" in stdout and "done at step 4" in stdout
    text = (out / "log.jsonl").read_text()
    assert cut not in text and text.endswith("\n")
    log = [json.loads(line) for line in text.splitlines()]  # every line whole
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    assert (out / "backbone.pt").exists()


def test_collapse_flag_in_progress_line(monkeypatch, tmp_path, capsys):
    """The diagnostics line ends with "<- collapse?" when decorr.collapsing says so: measured (the real
    diagnostics) on the run's model with its projector's last layer zeroed (complete collapse), then
    with every output a copy of the first (one direction: dimensional collapse), then as it is
    (healthy: no flag)."""
    diagnostics, calls = decorr.diagnostics, []

    def collapsed(model, *args, **kw):
        calls.append(len(calls))
        if calls[-1] < 2:
            model = copy.deepcopy(model)
            w = model.projector[-1].weight
            with torch.no_grad():
                w.copy_(w[:1].expand_as(w) if calls[-1] else torch.zeros_like(w))
        return diagnostics(model, *args, **kw)

    monkeypatch.setattr(decorr, "diagnostics", collapsed)
    out = tmp_path / "out"
    argv = SMALL_IP + ["--epochs", "1", "--steps", "3", "--diag-every", "1", "--out", out]
    in_process(monkeypatch, argv, wrap_step=lambda train_step, i, *args: fake_step(*args))
    lines = [line for line in capsys.readouterr().out.splitlines() if "diag step" in line]
    diag = [r for r in rows(out) if "feat_std" in r]
    assert [r["step"] for r in diag] == [1, 2, 3] and len(lines) == 3 and calls == [0, 1, 2]
    flags = [line.endswith("<- collapse?") for line in lines]
    assert flags == [True, True, False], lines
    assert flags == [decorr.collapsing(r["feat_std"], r["eff_rank_proj"]) for r in diag]
    assert diag[0]["feat_std"] == 0 and diag[1]["feat_std"] > 1e-3 and diag[1]["eff_rank_proj"] < 2


def test_fp16_scaler_checkpointed_and_resumed(monkeypatch, tmp_path):
    """--amp fp16: main makes an enabled GradScaler, steps with it, writes its state in the checkpoint
    and restores it on resume (the growth tracker counts on from 2, not from 0). decorr.py refuses fp16
    on a CPU, so here the run is told fp16 after its flags are checked and each step computes in
    float32 with the run's real scaler; the fp16 kernels themselves need CUDA."""
    parse_args, states = decorr.parse_args, []

    def as_fp16(argv=None):
        args = parse_args(argv)
        args.amp = "fp16"
        return args

    def record(train_step, i, model, opt, scaler, x1, x2, lr, amp):
        assert amp is torch.float16 and scaler.is_enabled()
        before = scaler.state_dict()
        result = train_step(model, opt, scaler, x1, x2, lr, None)
        states.append((before, scaler.state_dict()))
        return result

    out = tmp_path / "out"
    for steps in (2, 3):
        monkeypatch.setattr(decorr, "parse_args", as_fp16)
        in_process(
            monkeypatch, SMALL_IP + ["--epochs", "1", "--steps", steps, "--out", out], wrap_step=record
        )
        ckpt = decorr.load_checkpoint(out / "checkpoint.pt")
        assert ckpt["step"] == steps and ckpt["args"]["amp"] == "fp16"
        assert ckpt["scaler"] == states[-1][1]
    trackers = [(a["_growth_tracker"], b["_growth_tracker"]) for a, b in states]
    assert trackers == [(0, 1), (1, 2), (2, 3)]  # the third step: the resumed run's first
    assert all(a["scale"] == b["scale"] == 2.0**16 for a, b in states)  # no overflow, no growth yet


# decorr.py under torchrun, rank 1 alone sent SIGUSR1 during its second step; each rank writes how many
# steps it made. The data: small_synthetic's, made here.
STOP_ONE_RANK = """
import os, signal, sys
sys.path.insert(0, sys.argv.pop(1))
import datetime, functools
import torch.distributed as dist
from torch.utils.data import TensorDataset
import data, decorr
# ranks that disagree wait for each other: give up after a minute rather than gloo's half hour
dist.init_process_group = functools.partial(dist.init_process_group, timeout=datetime.timedelta(seconds=60))
sets = [TensorDataset(*data.synthetic_images(n, seed, size=16)) for n, seed in ((512, 0), (64, 1))]
decorr.load_data = lambda name, root="data": (*sets, 10, True)
train_step, calls = decorr.train_step, []
def step(*args):
    calls.append(1)
    if len(calls) == 2 and os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGUSR1)
    return train_step(*args)
decorr.train_step = step
decorr.main(sys.argv[1:])
out = sys.argv[sys.argv.index("--out") + 1]
with open(os.path.join(out, "steps" + os.environ["RANK"]), "w") as fh:
    fh.write(str(len(calls)))
dist.destroy_process_group()
"""


def test_stop_decided_on_two_ranks(tmp_path):
    """A signal to one rank stops both at the same step: the stop flag is summed over the ranks with
    the step's statistics, so rank 0, which got no signal, stops at step 2 too and checkpoints it."""
    script, out = tmp_path / "stop_one_rank.py", tmp_path / "out"
    script.write_text(STOP_ONE_RANK)
    args = [ROOT, *SMALL_IP, "--epochs", "1", "--steps", "5", "--out", out]
    cmd = [sys.executable, *TORCHRUN[:-1], script, *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=200)
        except subprocess.TimeoutExpired:  # torchrun stops its workers on SIGTERM (SIGKILL after 30 s)
            proc.terminate()
            stdout, stderr = proc.communicate(timeout=60)
            pytest.fail(f"the ranks did not stop together (stopped after 200 s): {stdout[-2000:]}")
    assert proc.returncode == 0, (stdout[-3000:], stderr[-3000:])
    assert stdout.count("stopped by signal at step 2") == 1, stdout[-3000:]
    assert [(out / f"steps{r}").read_text() for r in (0, 1)] == ["2", "2"]
    assert decorr.load_checkpoint(out / "checkpoint.pt")["step"] == 2
    assert [r["step"] for r in train_rows(out)] == [1, 2]
    assert not (out / "backbone.pt").exists()


# ----------------------------------------------------------------------------- 10. the README's recipe


def test_folder_defaults_are_the_papers_recipe(monkeypatch):
    """For image folders the defaults are the paper's ImageNet recipe (sec. 5.1): ResNet-50 at 224 px,
    projector 2048-2048-2048, 100 epochs, global batch 2048, LARS eta 0.001 with momentum 0.9, base
    lr 0.3 (x batch/256), weight decay 1e-6, 10 warm-up epochs; k = 8 for that batch, on 8 processes
    as on 1. The loss's coefficients default to 1 and 1."""
    for world in ("1", "8"):
        monkeypatch.setenv("WORLD_SIZE", world)
        a = decorr.parse_args(["--data", "/imagenet"])
        got = (a.arch, a.img_size, a.proj, a.epochs, a.batch_size, a.lars_eta, a.lr, a.wd, a.warmup_epochs)
        assert got == ("resnet50", 224, "2048-2048-2048", 100, 2048, 0.001, 0.3, 1e-6, 10)
        assert (a.partitions, a.inv_coef, a.cov_coef, a.loss) == (8, 1.0, 1.0, "decorr")
    assert (
        decorr.LARS([torch.nn.Parameter(torch.ones(1))], lr=0.1, weight_decay=0.0).defaults["momentum"] == 0.9
    )


def test_table2_commands_match_their_rows(monkeypatch):
    """Each Table 2 command of the README, parsed as its 8 processes parse it, has its row's projector,
    k and coefficients (a row "2048^3, k=32, 10/1" is projector 2048-2048-2048, 32 parts, C_inv 10,
    C_cov 1)."""
    monkeypatch.setenv("WORLD_SIZE", "8")
    table = re.findall(
        r"^\| ([^|]+), k=(\d+), (\d+)/(\d+) \| [\d.]+ \| `([^`]+)` \|$", README.read_text(), re.M
    )
    assert len(table) == 6, table
    for proj, k, inv, cov, command in table:
        assert command.startswith("torchrun --nproc_per_node=8 decorr.py "), command
        a = decorr.parse_args(command.split()[3:])
        width = proj.split("^")[0]
        assert a.proj == (proj if "^" not in proj else "-".join([width] * int(proj.split("^")[1]))), command
        assert (a.partitions, a.inv_coef, a.cov_coef) == (int(k), float(inv), float(cov)), command
        assert a.batch_size == 2048


# ----------------------------------------------------------------------------- 10. --warmup-steps


def test_warmup_steps_schedule_exact(monkeypatch, tmp_path):
    """--warmup-steps 5: the lr of step s (from 1) is base (s - 1) / 5 for the first 5 steps, from
    exactly 0 (Barlow Twins' and VICReg's warm-up), then cosine to 0 at the run's 80 steps, whatever
    --warmup-epochs says; as many steps as asked, not a tenth of the run."""
    given = []

    def record(train_step, i, model, opt, scaler, x1, x2, lr, amp):
        given.append(lr)
        return fake_step(model, opt, scaler, x1, x2, lr, amp)

    out, warmup, steps, total, base = tmp_path / "out", 12, 15, 80, 0.4 * 16 / 256
    argv = SMALL_IP + ["--epochs", "20", "--warmup-steps", warmup, "--warmup-epochs", "1", "--lr", "0.4"]
    argv += ["--steps", steps, "--diag-every", "1000", "--out", out]
    in_process(monkeypatch, argv, wrap_step=record, n_train=64)
    expected = [
        base * (s - 1) / warmup
        if s <= warmup
        else base * 0.5 * (1 + math.cos(math.pi * (s - 1 - warmup) / (total - warmup)))
        for s in range(1, steps + 1)
    ]
    logged = [r["lr"] for r in train_rows(out)]
    assert given[0] == logged[0] == 0.0
    for s, (a, b, e) in enumerate(zip(logged, given, expected, strict=True), 1):
        assert a == b == pytest.approx(e, rel=1e-12, abs=0), (s, a, b, e)
    assert logged[warmup] == pytest.approx(base, rel=1e-12) and logged[warmup + 1] < base


def test_warmup_steps_longer_than_the_run_is_refused(tmp_path):
    """A warm-up that leaves no step of the run is bad input: one line, exit 2, nothing written."""
    p = run(SMALL + ["--epochs", "1", "--warmup-steps", "156", "--out", tmp_path / "out"])
    assert p.returncode == 2 and p.stderr.splitlines() == [
        "decorr.py: error: --warmup-steps 156 leaves nothing of the run's 156 steps"
    ]
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- 11. one run per folder, Ctrl-C

LONG = SMALL + ["--steps", "400", "--seed", "3"]


def start(args, tmp_path, name):
    """decorr.py started in the background, its stdout and stderr in files; returns the process."""
    stdout = open(tmp_path / f"{name}.stdout", "w")
    stderr = open(tmp_path / f"{name}.stderr", "w")
    command = [sys.executable, "decorr.py", *map(str, args)]
    return subprocess.Popen(command, cwd=ROOT, stdout=stdout, stderr=stderr, env=threads())


def wait_for_step(process, out, step, seconds=300):
    """Wait until the run in out has logged the step (or ended)."""
    deadline = time.time() + seconds
    while time.time() < deadline and process.poll() is None:
        if (out / "log.jsonl").exists() and any(r.get("step", 0) >= step for r in complete_rows(out)):
            return
        time.sleep(0.02)
    raise AssertionError(f"step {step} not logged in {seconds} s (exit code {process.poll()})")


def test_a_second_run_on_a_held_folder_is_refused(tmp_path):
    """While a run lives, its --out is held: a second run there gets one line naming the folder and the
    holder's pid, exit 2, and writes nothing; a holder killed with SIGKILL leaves no stale lock."""
    out = tmp_path / "out"
    first = start(LONG + ["--out", out], tmp_path, "first")
    try:
        wait_for_step(first, out, 1)
        before = sorted(os.listdir(out))
        second = run(SMALL + ["--steps", "2", "--lr", "0.1", "--out", out])
        assert second.returncode == 2 and second.stdout == "", second.stdout[-2000:]
        assert second.stderr.splitlines() == [
            f"decorr.py: error: {out.resolve()} is in use by another run (decorr.py, pid {first.pid}): wait "
            "for it to end, or use another --out"
        ]
        assert sorted(os.listdir(out)) == before
        assert first.poll() is None
    finally:
        first.kill()
        first.wait()
    third = run(SMALL + ["--steps", "1", "--seed", "3", "--out", out])
    assert third.returncode == 0 and "done at step 1" in third.stdout, third.stderr[-2000:]


def test_ctrl_c_stops_with_a_checkpoint_and_the_run_resumes(tmp_path):
    """The first Ctrl-C (SIGINT) stops the run as SIGTERM does: a checkpoint at the step it came, 'stopped
    by signal', exit 0, no traceback; the same command resumes from there."""
    out = tmp_path / "out"
    process = start(LONG + ["--out", out], tmp_path, "run")
    try:
        wait_for_step(process, out, 2)
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=300)
    finally:
        process.kill()
    stdout = (tmp_path / "run.stdout").read_text()
    stderr = (tmp_path / "run.stderr").read_text()
    assert code == 0 and "Traceback" not in stderr, stderr[-3000:]
    assert "decorr.py: Ctrl-C: stopping with a checkpoint; Ctrl-C again aborts" in stderr
    stopped = decorr.load_checkpoint(out / "checkpoint.pt")["step"]
    assert f"stopped by signal at step {stopped}" in stdout and 2 <= stopped < 400
    assert train_rows(out)[-1]["step"] == stopped and not (out / "backbone.pt").exists()
    again = run(SMALL + ["--steps", str(stopped + 1), "--seed", "3", "--out", out])
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {out / 'checkpoint.pt'} at step {stopped}" in again.stdout
    assert f"done at step {stopped + 1}" in again.stdout


def test_a_second_ctrl_c_aborts_at_once(tmp_path):
    """Ctrl-C twice: the run aborts without waiting for the step's end: exit 130, one line on stderr
    after the first Ctrl-C's, no traceback."""
    out = tmp_path / "out"
    process = start(LONG + ["--out", out], tmp_path, "run")
    try:
        wait_for_step(process, out, 2)
        process.send_signal(signal.SIGINT)
        time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=300)
    finally:
        process.kill()
    stderr = (tmp_path / "run.stderr").read_text()
    assert code == 130 and "Traceback" not in stderr, stderr[-3000:]
    assert stderr.splitlines()[-2:] == [
        "decorr.py: Ctrl-C: stopping with a checkpoint; Ctrl-C again aborts",
        "decorr.py: aborted by Ctrl-C; the last checkpoint written is kept",
    ]


INNER_TESTS = """
from test_cli import SMALL_IP, in_process


def test_a_long_run_in_this_process(monkeypatch, tmp_path):
    print("the run starts", flush=True)
    in_process(monkeypatch, SMALL_IP + ["--epochs", "200", "--out", tmp_path / "out"], n_train=64)


def test_after():
    print("the suite went on", flush=True)
"""


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_the_suite_stops_on_sigterm_and_ctrl_c(tmp_path, number):
    """SIGTERM or Ctrl-C to pytest while a test runs decorr.main in the pytest process stops the whole
    suite at once: the run does not take the signal for itself ('stopped by signal'), the next test
    does not run, pytest reports the interruption."""
    (tmp_path / "test_inner.py").write_text(INNER_TESTS)
    command = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "conftest", "-p", "no:cacheprovider"]
    command += ["test_inner.py", "--rootdir", str(tmp_path)]
    environment = dict(threads(), PYTHONPATH=str(ROOT))
    with open(tmp_path / "pytest.out", "w") as log:
        process = subprocess.Popen(
            command, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=environment
        )
        try:
            deadline = time.time() + 300
            while "step 2/" not in (tmp_path / "pytest.out").read_text() and time.time() < deadline:
                assert process.poll() is None, (tmp_path / "pytest.out").read_text()[-3000:]
                time.sleep(0.05)
            sent = time.time()
            process.send_signal(number)
            code = process.wait(timeout=60)
            seconds = time.time() - sent
        finally:
            process.kill()
    output = (tmp_path / "pytest.out").read_text()
    assert code != 0 and seconds < 30, (code, seconds, output[-3000:])
    assert "the run starts" in output and "stopped by signal" not in output, output[-3000:]
    assert "the suite went on" not in output and "KeyboardInterrupt" in output, output[-3000:]
