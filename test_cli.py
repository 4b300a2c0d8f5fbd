"""End-to-end tests of the decorr.py command line: each runs the real script in a subprocess on
the built-in synthetic data with a tiny configuration (ResNet-18 at 32 px, batch 32, projector
64-64, no autocast, no loader processes, a handful of steps)."""
import json, math, os, shutil, signal, subprocess, sys, time
from pathlib import Path

import pytest
import torch
import torchvision

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
import decorr  # noqa: E402

SMALL = ["--batch-size", "32", "--proj", "64-64", "--amp", "none", "--workers", "0", "--log-every", "1"]
# the short run of test 1; lr 1.0 (0.125 after batch scaling) lowers the loss by ~20% in 10 steps
TRAIN = SMALL + ["--epochs", "1", "--warmup-epochs", "0", "--steps", "10", "--lr", "1.0", "--diag-every", "5"]
TRAIN_KEYS = {"epoch", "step", "loss", "inv", "cov", "lr"}
DIAG_KEYS = {"corr_dist", "wp_offdiag", "eff_rank_proj", "eff_rank_backbone", "feat_std", "knn_top1"}


def run(args, timeout=600, script=("decorr.py",), **kw):
    """Run decorr.py (or `script`, a list of argv items before `args`) from the repository root."""
    cmd = [sys.executable, *script, *[str(a) for a in args]]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kw)


def rows(out):
    return [json.loads(line) for line in open(Path(out) / "log.jsonl")]


def train_rows(out):
    return [r for r in rows(out) if "loss" in r]


def assert_one_error_line(p, code=2):
    assert p.returncode == code, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    assert "Traceback" not in p.stderr, p.stderr
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("decorr.py: error: "), lines[0]
    return lines[0]


def write_png(path, seed):
    g = torch.Generator().manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torchvision.io.write_png(torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8, generator=g), str(path))

# ----------------------------------------------------------------------------- 1. a short real run

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "out"
    p = run(TRAIN + ["--out", out])
    assert p.returncode == 0, p.stderr[-3000:]
    return out, p


def test_short_run(trained):
    out, p = trained
    assert "Traceback" not in p.stderr
    for name in ("log.jsonl", "checkpoint.pt", "backbone.pt", "wp.png"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.tmp*"))

    log = rows(out)
    tr = [r for r in log if "loss" in r]
    assert [r["step"] for r in tr] == list(range(1, 11))
    for r in tr:
        assert TRAIN_KEYS <= r.keys(), r
        assert r["epoch"] == 0
        assert all(math.isfinite(r[k]) for k in ("loss", "inv", "cov", "lr")), r
        assert r["lr"] > 0
    losses = [r["loss"] for r in tr]
    assert losses[-1] < 0.95 * losses[0], losses            # the loss goes down (~20% here)
    assert max(r["lr"] for r in tr) <= 1.0 * 32 / 256 + 1e-12  # lr scaled by batch / 256

    diag = [r for r in log if "corr_dist" in r]
    assert [r["step"] for r in diag] == [5, 10]               # --diag-every 5
    for r in diag:
        assert DIAG_KEYS <= r.keys(), r
        assert all(math.isfinite(r[k]) for k in DIAG_KEYS), r
        assert 0 <= r["knn_top1"] <= 100
        assert 1 <= r["eff_rank_proj"] <= 64 + 1e-3
        assert r["feat_std"] > 0

    ckpt = decorr.load_checkpoint(out / "checkpoint.pt")
    assert ckpt["step"] == 10 and ckpt["args"]["proj"] == "64-64"

    net = torchvision.models.resnet18()
    net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool = torch.nn.Identity()
    sd = torch.load(out / "backbone.pt", map_location="cpu", weights_only=True)
    missing, unexpected = net.load_state_dict(sd, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    assert torch.equal(net.conv1.weight, ckpt["model"]["backbone.conv1.weight"])

    img = torchvision.io.decode_png(torchvision.io.read_file(str(out / "wp.png")))
    assert img.dtype == torch.uint8 and tuple(img.shape) == (3, 256, 516)
    assert img.float().std() > 0

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
}
EXPECT = {"proj-abc": "--proj", "proj-zero": "--proj", "partitions": "--partitions",
          "data-missing": "/nonexistent", "data-empty": "train/", "data-no-val": "val/",
          "data-no-images": "class folder", "arch": "resnet9", "batch-abc": "--batch-size"}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(case, tmp_path):
    out = tmp_path / "out"
    args = SMALL + ["--steps", "1"] + BAD[case](tmp_path) + ["--out", out]
    line = assert_one_error_line(run(args, timeout=120))
    assert EXPECT[case] in line, line
    assert not out.exists()                                  # nothing written for bad input


def test_partitions_not_a_multiple_of_world_size(tmp_path):
    # as torchrun would set it for 2 processes: the check comes before any process group starts
    env = dict(os.environ, WORLD_SIZE="2", RANK="0", LOCAL_RANK="0")
    out = tmp_path / "out"
    p = run(SMALL + ["--steps", "1", "--partitions", "3", "--batch-size", "30", "--out", out], timeout=120, env=env)
    line = assert_one_error_line(p)
    assert "--partitions 3 is not a multiple of the world size 2" in line, line
    assert not out.exists()


def test_garbage_checkpoint_is_kept(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    junk = b"\x80\x32" + bytes(range(256)) * 20         # starts like a pickle of protocol 50
    (out / "checkpoint.pt").write_bytes(junk)
    line = assert_one_error_line(run(SMALL + ["--steps", "1", "--out", out], timeout=120))
    assert "cannot load checkpoint" in line and "checkpoint.pt" in line and "--fresh" in line
    assert (out / "checkpoint.pt").read_bytes() == junk
    assert sorted(os.listdir(out)) == ["checkpoint.pt"]      # no log.jsonl, no temporary file


def test_truncated_checkpoint_is_kept(trained, tmp_path):
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


def test_resume_with_other_proj(trained, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(trained[0] / "checkpoint.pt", out / "checkpoint.pt")
    before = (out / "checkpoint.pt").read_bytes()
    args = [a if a != "64-64" else "32-32" for a in TRAIN]
    line = assert_one_error_line(run(args + ["--out", out], timeout=120))
    assert "--proj 64-64 -> 32-32" in line, line
    assert "--lr" not in line and "--batch-size" not in line  # only what differs is named
    assert (out / "checkpoint.pt").read_bytes() == before


def test_corrupt_image(tmp_path):
    data = _folder(tmp_path, ("train", "val"), images=True)
    bad = data / "train" / "a" / "x.png"
    bad.write_bytes(b"\x89PNG not really" + os.urandom(100))
    out = tmp_path / "out"
    p = run(["--data", data, "--arch", "resnet18", "--img-size", "32", "--batch-size", "2",
             "--proj", "64-64", "--amp", "none", "--workers", "0", "--epochs", "1", "--steps", "1",
             "--out", out], timeout=120)
    line = assert_one_error_line(p)
    assert str(bad) in line, line
    assert not out.exists(), f"bad data wrote {os.listdir(out)} (images read after {out} is made)"

# ----------------------------------------------------------------------------- 3. resume after SIGTERM

RESUME = SMALL + ["--steps", "6", "--seed", "1"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Run A: 6 steps without interruption (also the fp32 eager reference of test 7)."""
    out = tmp_path_factory.mktemp("uninterrupted") / "a"
    p = run(RESUME + ["--out", out])
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def test_resume_equals_uninterrupted(uninterrupted, tmp_path):
    a, b = uninterrupted, tmp_path / "b"
    with open(tmp_path / "b.stdout", "w") as so, open(tmp_path / "b.stderr", "w") as se:
        proc = subprocess.Popen([sys.executable, "decorr.py", *map(str, RESUME + ["--out", b])],
                                cwd=ROOT, stdout=so, stderr=se)
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
    assert not (b / "backbone.pt").exists()                  # only a finished run exports

    pb = run(RESUME + ["--out", b])
    assert pb.returncode == 0, pb.stderr[-3000:]
    assert f"resumed from {b / 'checkpoint.pt'} at step {stopped}" in pb.stdout

    la, lb = train_rows(a), train_rows(b)
    assert [r["step"] for r in lb] == [r["step"] for r in la] == list(range(1, 7))
    for ra, rb in zip(la, lb):
        # bitwise: CPU kernels are deterministic and the views are seeded by (seed, epoch, index)
        assert (ra["loss"], ra["inv"], ra["cov"], ra["lr"]) == (rb["loss"], rb["inv"], rb["cov"], rb["lr"]), (ra, rb)
    ca, cb = (decorr.load_checkpoint(d / "checkpoint.pt") for d in (a, b))
    assert ca["step"] == cb["step"] == 6
    assert ca["model"].keys() == cb["model"].keys()
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    for sa, sb in zip(ca["optimizer"]["state"].values(), cb["optimizer"]["state"].values()):
        assert torch.equal(sa["mu"], sb["mu"])

    # --fresh: the old checkpoint and log are moved aside, training starts at step 0
    pf = run(RESUME[:-4] + ["--steps", "1", "--seed", "1", "--fresh", "--out", b])
    assert pf.returncode == 0, pf.stderr[-3000:]
    assert "resumed from" not in pf.stdout and "--fresh" in pf.stdout
    moved = [f for f in os.listdir(b) if f.startswith("checkpoint.pt.") and ".tmp" not in f]
    assert len(moved) == 1, os.listdir(b)
    assert (b / ("log.jsonl" + moved[0][len("checkpoint.pt"):])).exists()
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
    path = tmp_path / "checkpoint.pt"
    old = dict(model=torch.arange(10.0), step=3)
    decorr.atomic_write(str(path), lambda fh: torch.save(old, fh))
    p = run([path], script=("-c", KILL_IN_REPLACE), timeout=120)
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr)
    assert "not reached" not in p.stdout
    tmp = [f for f in os.listdir(tmp_path) if ".tmp" in f]
    assert len(tmp) == 1 and (tmp_path / tmp[0]).stat().st_size > 16_000_000   # the new one was written
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
    out = tmp_path / "out"
    p = run(SMALL + ["--steps", "8", "--save-every-steps", "2", "--out", out],
            script=("-c", NAN_FROM_4TH_CALL), timeout=300)
    line = assert_one_error_line(p, code=1)
    assert "non-finite loss" in line and "at step 4" in line, line
    assert str(out / "checkpoint.pt") in line and "(step 2)" in line, line
    ckpt = decorr.load_checkpoint(out / "checkpoint.pt")
    assert ckpt["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert [r["step"] for r in train_rows(out)] == [1, 2, 3]
    assert not (out / "backbone.pt").exists()

# ----------------------------------------------------------------------------- 6. torchrun, 2 processes


def test_torchrun_two_processes(tmp_path):
    losses = []
    for i in range(3):
        out = tmp_path / f"out{i}"
        p = run(["--standalone", "--nproc_per_node=2", "decorr.py", "--steps", "3", "--batch-size", "32",
                 "--partitions", "2", "--proj", "64-64", "--amp", "none", "--workers", "0", "--log-every", "1",
                 "--out", out], script=("-m", "torch.distributed.run"), timeout=400)
        assert p.returncode == 0, (i, p.stdout[-3000:], p.stderr[-3000:])
        assert "terminate called" not in p.stderr and "Traceback" not in p.stderr, p.stderr[-3000:]
        assert p.stdout.count("done at step 3") == 1                 # rank 0 speaks, rank 1 does not
        assert sorted(os.listdir(out)) == ["backbone.pt", "checkpoint.pt", "log.jsonl", "wp.png"]
        log = rows(out)
        assert log[-1] == {"step": 3, "ranks_in_sync": True}
        tr = [r for r in log if "loss" in r]
        assert [r["step"] for r in tr] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in tr)
        ckpt = decorr.load_checkpoint(out / "checkpoint.pt")
        assert ckpt["step"] == 3 and len(ckpt["rng"]) == 2
        losses.append([r["loss"] for r in tr])
    assert losses[0] == losses[1] == losses[2]                      # same seed, same run

# ----------------------------------------------------------------------------- 7. bf16 autocast, compile


def test_bf16_close_to_fp32(uninterrupted, tmp_path):
    out = tmp_path / "bf16"
    p = run([a if a != "none" else "bf16" for a in RESUME[:-4]] + ["--steps", "3", "--seed", "1", "--out", out])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "amp bf16" in p.stdout.splitlines()[0]
    bf16, fp32 = [r["loss"] for r in train_rows(out)], [r["loss"] for r in train_rows(uninterrupted)][:3]
    assert len(bf16) == 3 and all(math.isfinite(x) for x in bf16), bf16
    assert bf16 != fp32                                   # autocast is really on
    for x, y in zip(bf16, fp32):
        assert abs(x - y) <= 0.1 * abs(y), (bf16, fp32)


def test_compile_one_step(uninterrupted, tmp_path):
    out = tmp_path / "out"
    p = run(RESUME[:-4] + ["--seed", "1", "--compile", "--steps", "1", "--out", out], timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "compile" in p.stdout.splitlines()[0]
    tr = train_rows(out)
    assert [r["step"] for r in tr] == [1] and math.isfinite(tr[0]["loss"])
    assert abs(tr[0]["loss"] - train_rows(uninterrupted)[0]["loss"]) <= 1e-4 * abs(tr[0]["loss"])
    assert decorr.load_checkpoint(out / "checkpoint.pt")["step"] == 1
