"""End-to-end tests of the decorr.py command line: each runs the real script in a subprocess (one
process, or two under torchrun) on the built-in synthetic data with a tiny configuration (ResNet-18
at 32 px, batch 32, projector 64-64, no autocast, no loader processes, a handful of steps). The runs
are module fixtures, each made once and checked by several tests."""

import json
import math
import os
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

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
import decorr  # noqa: E402

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
FILES = ["backbone.pt", "checkpoint.pt", "log.jsonl", "wp.png"]


def run(args, timeout=600, script=("decorr.py",), **kw):
    """Run decorr.py (or `script`, a list of argv items before `args`) from the repository root."""
    cmd = [sys.executable, *script, *[str(a) for a in args]]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kw)


def run_ok(tmp_path_factory, name, args, script=("decorr.py",)):
    """A run that must succeed, into a fresh out folder: (out, completed process)."""
    out = tmp_path_factory.mktemp(name) / "out"
    p = run(args + ["--out", out], script=script)
    assert p.returncode == 0, (name, p.stdout[-3000:], p.stderr[-3000:])
    return out, p


def rows(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


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
    assert head.startswith("decorr | resnet18 64-64 | synthetic: 5000 images,"), head
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
    missing, unexpected = net.load_state_dict(sd, strict=True)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    assert torch.equal(net.conv1.weight, ckpt["model"]["backbone.conv1.weight"])

    with Image.open(out / "wp.png") as img:
        assert img.format == "PNG" and img.mode == "RGB" and img.size == (516, 256)
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
    assert decorr.parse_args(["--batch-size", "30"]).partitions == 2  # default: WORLD_SIZE


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
    line = _resume_refused(trained, tmp_path, TRAIN + ["--loss", "vicreg"])
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
            [sys.executable, "decorr.py", *map(str, RESUME + ["--out", b])], cwd=ROOT, stdout=so, stderr=se
        )
        try:
            deadline = time.time() + 300
            while time.time() < deadline and proc.poll() is None:
                if (b / "log.jsonl").exists() and any(r.get("step", 0) >= 2 for r in train_rows(b)):
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
    """3 steps on one process, no --partitions (so k = 1)."""
    return run_ok(tmp_path_factory, "single_k1", WORLD)


@pytest.fixture(scope="module")
def double_k1(tmp_path_factory):
    """The same 3 steps on 2 processes with --partitions 1: the one part spans both ranks."""
    return run_ok(tmp_path_factory, "double_k1", WORLD + ["--partitions", "1"], script=TORCHRUN)


@pytest.fixture(scope="module")
def double_default(tmp_path_factory):
    """The same 3 steps on 2 processes without --partitions (so k = 2, one part per rank)."""
    return run_ok(tmp_path_factory, "double_default", WORLD, script=TORCHRUN)


def test_default_partitions_one_per_process(single_k1, double_default):
    """Without --partitions, k is the number of processes: 1 for python, 2 under torchrun."""
    assert "| batch 32 on 1 x cpu | partitions 1 of 32 images |" in header(single_k1[1]), header(single_k1[1])
    assert "| batch 32 on 2 x cpu | partitions 2 of 16 images |" in header(double_default[1]), header(
        double_default[1]
    )
    assert decorr.load_checkpoint(single_k1[0] / "checkpoint.pt")["args"]["partitions"] == 1
    assert decorr.load_checkpoint(double_default[0] / "checkpoint.pt")["args"]["partitions"] == 2


@pytest.mark.parametrize("name", ["single_k1", "double_default"])
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


@pytest.mark.parametrize("name", ["double_k1", "double_default"])
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
    ref, other = ("single_k1", "double_k1") if k == 1 else ("trained", "double_default")
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


def test_two_process_forward_deterministic(double_k1, double_default):
    """Both 2-process runs start from the same weights and views: step 1's invariance term (which
    does not depend on k) is bitwise the same."""
    assert train_rows(double_k1[0])[0]["inv"] == train_rows(double_default[0])[0]["inv"]


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
    """6 steps of a baseline on one process."""
    return run_ok(
        tmp_path_factory, f"{loss_name}_single", BASELINE + BASELINE_ARGS[loss_name] + ["--steps", "6"]
    )


@pytest.fixture(scope="module")
def baseline_double(loss_name, tmp_path_factory):
    """The first 2 of those steps on 2 processes."""
    return run_ok(
        tmp_path_factory,
        f"{loss_name}_double",
        BASELINE + BASELINE_ARGS[loss_name] + ["--steps", "2"],
        script=TORCHRUN,
    )


def test_baseline_trains(loss_name, baseline_single):
    """--loss barlowtwins / vicreg: the loss falls, rows carry the loss's own terms, no predictor
    (no wp.png, no wp_offdiag, no predictor weights), the header names the loss and no partitions."""
    out, p = baseline_single
    assert_no_warnings(p)
    head = header(p)
    assert head.startswith(f"{loss_name} | resnet18 64-64 |") and "partitions" not in head, head
    assert sorted(os.listdir(out)) == ["backbone.pt", "checkpoint.pt", "log.jsonl"]
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
    """A baseline logs the same losses and terms on 1 and 2 processes. Two steps (step 2 follows the
    first update): Barlow Twins amplifies float rounding ~50x a step: at step 3 even one process
    run with 1 thread and with 2 threads differs by 5e-4."""
    out, p = baseline_double
    assert "Traceback" not in p.stderr and p.stdout.count("done at step 2") == 1
    assert sorted(os.listdir(out)) == ["backbone.pt", "checkpoint.pt", "log.jsonl"]
    assert_same_losses(baseline_single[0], out, TERMS[loss_name], steps=2)


def test_baseline_lineval(loss_name, baseline_single):
    """lineval.py reads a baseline's backbone.pt (the run's settings from its checkpoint) and ends
    with a JSON line holding the probe's top-1."""
    out = baseline_single[0]
    p = run(
        [out / "backbone.pt", "--fast-epochs", "2", "--limit", "256", "--amp", "none", "--workers", "0"],
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
    assert 0 <= res["top1"] <= 100 and res["epochs"] == 2


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
