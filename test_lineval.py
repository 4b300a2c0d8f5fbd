"""Tests for lineval.py (CPU): the fast probe on features with known answers, then the command line
on a checkpoint from a short decorr.py run, random init, a tiny image folder whose classes a linear
layer separates, unreadable images, eval.jsonl's rows, and bad input (bad checkpoints included)."""

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch
import torchvision
from PIL import Image

import data
import lineval

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(autouse=True)
def one_thread():
    """Small ops on shared cores: one thread is faster, and leaves the other core free."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def png(path, hwc):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(hwc.numpy()).save(path)


def python(script, *argv):
    return subprocess.run(
        [sys.executable, os.path.join(HERE, script), *map(str, argv)],
        capture_output=True,
        text=True,
        cwd=HERE,
        timeout=300,
    )


def cli(*argv):
    return python("lineval.py", *argv)


def last_json(stdout):
    return json.loads(stdout.strip().splitlines()[-1])


def run_main(capsys, *argv):
    """lineval.main in this process (no interpreter start-up): its stdout lines and its JSON line."""
    lineval.main([str(a) for a in argv])
    lines = capsys.readouterr().out.strip().splitlines()
    return lines, json.loads(lines[-1])


def eval_rows(folder):
    with open(folder / "eval.jsonl") as fh:
        return [json.loads(line) for line in fh]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A decorr output folder from a two-step run (resnet18, CIFAR stem, synthetic data)."""
    out = tmp_path_factory.mktemp("run") / "out"
    argv = ["--steps", 2, "--batch-size", 32, "--proj", "64-64", "--amp", "none", "--workers", 0]
    r = python("decorr.py", *argv, "--out", out)
    assert r.returncode == 0, r.stderr
    return out


def write_folder(root, per_class, seed=0):
    """An ImageFolder in ImageNet layout: 2 classes x per_class images per split, 40 px; class 0
    is dark, class 1 bright (a linear layer on any backbone's features separates them)."""
    g = torch.Generator().manual_seed(seed)
    for split in ("train", "val"):
        for c in range(2):
            for i in range(per_class):
                img = (torch.rand(40, 40, 3, generator=g) * 128 + 127 * c).to(torch.uint8)
                png(root / split / f"class{c}" / f"{i}.png", img)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """2 classes x 6 images per split."""
    return write_folder(tmp_path_factory.mktemp("images"), 6)


RANDOM_ON_FOLDER = ["--random-init", "--arch", "resnet18", "--img-size", 32, "--workers", 0]


# ----------------------------------------------------------------------------- the probe itself


def blobs(n, d, classes, seed, sep):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=torch.Generator().manual_seed(123)) * sep
    y = torch.randint(classes, (n,), generator=g)
    return centres[y] + torch.randn(n, d, generator=g), y


def accuracy(head, x, y):
    with torch.no_grad():
        return [100.0 * c / len(y) for c in lineval.topk_correct(head(x), y)]


def test_probe_separable_features():
    """Gaussian blobs far apart, with a large offset and scale (standardization must cope), plus
    constant and dead dimensions: about 100%."""
    xt, yt = blobs(2000, 32, 10, 0, sep=4.0)
    xv, yv = blobs(500, 32, 10, 1, sep=4.0)
    shift = lambda x: torch.cat([x * 50 + 300, torch.zeros(len(x), 4), torch.full((len(x), 2), 7.0)], 1)
    head = lineval.fit_linear(shift(xt), yt, 10, epochs=30)
    top1, top5 = accuracy(head, shift(xv), yv)
    assert top1 >= 99.0 and top5 == 100.0


def test_probe_random_labels_stay_at_chance():
    xt, yt = blobs(2000, 64, 10, 0, sep=0.0)
    xv, yv = blobs(2000, 64, 10, 1, sep=0.0)
    head = lineval.fit_linear(xt, yt, 10, epochs=30)
    top1, top5 = accuracy(head, xv, yv)
    assert 5.0 <= top1 <= 16.0 and 40.0 <= top5 <= 60.0


def test_topk_correct_and_knn():
    logits = torch.tensor([[3.0, 2, 1, 0, -1, -2], [0, 1, 2, 3, 4, 5]])
    assert lineval.topk_correct(logits, torch.tensor([1, 0])) == [0, 1]
    assert lineval.topk_correct(logits[:, :3], torch.tensor([0, 0]), ks=(1, 5)) == [1, 2]  # 3 classes
    xt, yt = blobs(300, 16, 5, 0, sep=4.0)
    xv, yv = blobs(100, 16, 5, 1, sep=4.0)
    assert lineval.knn_top1(xt, yt, xv, yv, 5, k=10, chunk=7) >= 99.0


# ----------------------------------------------------------------------------- the command line


def test_decorr_run_end_to_end(run):
    """python decorr.py && python lineval.py out: arch, stem and data come from the run. The
    synthetic classes live in the shapes, which even this barely trained backbone's features
    show: the probes are far above chance (10 %)."""
    r = cli(run, "--knn", "--limit", 100, "--workers", 0)
    assert r.returncode == 0, r.stderr
    assert "Warning" not in r.stderr, r.stderr
    res = last_json(r.stdout)
    assert res["mode"] == "fast" and res["data"] == "synthetic" and res["arch"] == "resnet18"
    assert res["small_stem"] and res["step"] == 2 and not res["random_init"]
    assert res["ckpt"] == str(run / "checkpoint.pt") and res["n_train"] == res["n_val"] == 100
    assert 25 <= res["top1"] <= res["top5"] <= 100 and 20 <= res["knn_top1"] <= 100 and res["knn_k"] == 20
    assert res["limit"] == 100 and res["full"] is False and res["unreadable_images"] == 0
    assert eval_rows(run)[-1] == res


def test_backbone_pt_and_plain_state_dict(run, folder, capsys, tmp_path):
    """backbone.pt (settings from the checkpoint.pt beside it) and a torchvision model's
    state_dict (fc included, prefixed by DDP's module.) evaluate to the same numbers; the bright
    and dark classes are told apart."""
    common = ["--data", folder, "--workers", 0, "--fast-epochs", 5]
    _, a = run_main(capsys, run / "backbone.pt", *common)
    net = torchvision.models.resnet18()
    net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool = torch.nn.Identity()
    net.load_state_dict(torch.load(run / "backbone.pt"), strict=False)
    torch.save({"module." + k: v for k, v in net.state_dict().items()}, tmp_path / "plain.pth")
    _, b = run_main(capsys, tmp_path / "plain.pth", *common, "--img-size", 32)
    assert a["arch"] == b["arch"] == "resnet18" and a["small_stem"] and b["small_stem"]
    assert (a["top1"], a["top5"], a["img_size"]) == (b["top1"], b["top5"], b["img_size"])
    assert a["top1"] >= 90
    assert not os.path.exists(tmp_path / "eval.jsonl")


@pytest.fixture(scope="module")
def finished(folder, tmp_path_factory):
    """A decorr run that ran its whole schedule: one epoch of 3 steps on the 12-image folder."""
    out = tmp_path_factory.mktemp("finished") / "out"
    argv = ["--data", folder, "--epochs", 1, "--batch-size", 4, "--proj", "32-32", "--img-size", 32]
    r = python("decorr.py", *argv, "--amp", "none", "--workers", 0, "--out", out)
    assert r.returncode == 0, r.stderr
    return out


def test_eval_jsonl_marks_what_a_row_is(finished, run, capsys):
    """Each row records its settings and the checkpoint's step out of its run's last. Only the final
    checkpoint probed with the default settings on every image is marked full: another lr, weight
    decay, number of epochs, --limit, --holdout or --random-init, or a checkpoint before the run's
    last step (a run cut by --steps), is written beside it, marked as what it is."""
    before = len(eval_rows(finished)) if os.path.exists(finished / "eval.jsonl") else 0
    _, full = run_main(capsys, finished, "--workers", 0)
    others = [
        ["--lr", "0.01"],
        ["--wd", "0"],
        ["--fast-epochs", "5"],
        ["--limit", "4"],
        ["--holdout", "4"],
        ["--random-init", "--arch", "resnet18"],
    ]
    results = [run_main(capsys, finished, "--workers", 0, *argv)[1] for argv in others]
    rows = eval_rows(finished)[before:]
    assert rows == [full, *results]
    assert [r["full"] for r in rows] == [True] + [False] * 6
    assert (full["step"], full["run_last_step"], full["mode"]) == (3, 3, "fast")
    assert (full["lr"], full["wd"], full["epochs"], full["batch_size"], full["img_size"]) == (
        1e-3,
        1e-6,
        100,
        256,
        32,
    )
    assert [r["lr"] for r in results[:2]] == [0.01, 1e-3] and results[1]["wd"] == 0
    assert results[2]["epochs"] == 5 and results[3]["limit"] == 4 and results[4]["holdout"] == 4
    assert results[4]["n_val"] == 4 and results[4]["n_train"] == 8 and results[5]["random_init"]
    _, cut = run_main(capsys, run, "--workers", 0, "--limit", 50)
    assert (cut["step"], cut["run_last_step"], cut["full"]) == (2, 4 * (5000 // 32), False)


def test_eval_jsonl_is_safe_beside_a_run(finished, capsys, tmp_path):
    """lineval.py evaluates a folder that a live run holds (its OS lock) and appends its row; rows that
    several processes append at once stay whole lines."""
    data.hold_folder(finished)
    try:
        _, result = run_main(capsys, finished, "--workers", 0)
    finally:
        data.release_folder(finished)
    assert eval_rows(finished)[-1] == result
    path = tmp_path / "rows.jsonl"
    script = (
        "import sys, decorr\n"
        "for i in range(300):\n"
        "    decorr.append_jsonl(sys.argv[1], dict(writer=sys.argv[2], i=i, pad='x' * 5000))\n"
    )
    writers = [
        subprocess.Popen([sys.executable, "-c", script, str(path), name], cwd=HERE) for name in ("a", "b")
    ]
    assert [w.wait(timeout=120) for w in writers] == [0, 0]
    lines = path.read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    for name in ("a", "b"):
        assert [r["i"] for r in rows if r["writer"] == name] == list(range(300))


def test_random_init_estimates_batchnorm_first(capsys, monkeypatch):
    """--random-init estimates BatchNorm's statistics with --bn-passes train-mode passes over the first
    views of decorr.py's augmented training batches, no weight moving: each running mean and variance
    is the mean over the passes of that layer's batch statistics (checked by hand for the stem's), no
    longer the init's 0 and 1. --bn-passes 0 keeps the init's."""
    images = torch.randint(0, 256, (48, 3, 16, 16), dtype=torch.uint8)
    train = torch.utils.data.TensorDataset(images, torch.arange(48) % 4)
    torch.manual_seed(0)
    net, _ = lineval.build_backbone("resnet18", True)
    weights = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k and "tracked" not in k}
    settings = lineval.parse_args(["--random-init", "--batch-size", "16", "--img-size", "16", "--seed", "4"])
    settings.workers = 0
    lineval.estimate_batchnorm(net, train, 5, settings, True, torch.device("cpu"), False, 1)
    state = net.state_dict()
    for name, value in weights.items():
        assert torch.equal(state[name], value), name
    assert not net.training and net.bn1.momentum == 0.1 and int(net.bn1.num_batches_tracked) == 5
    conv1 = net.conv1
    means = []
    variances = []
    batch_settings = argparse.Namespace(seed=4, batch_size=16, img_size=16, workers=0)
    for x1, _, _ in data.batches(train, True, batch_settings, torch.device("cpu"), 0, 5):
        with torch.no_grad():
            h = conv1(x1).float()
        means.append(h.mean((0, 2, 3)))
        variances.append(h.var((0, 2, 3), unbiased=True))
    assert torch.allclose(net.bn1.running_mean, torch.stack(means).mean(0), rtol=1e-4, atol=1e-6)
    assert torch.allclose(net.bn1.running_var, torch.stack(variances).mean(0), rtol=1e-4, atol=1e-6)
    assert (net.layer4[1].bn2.running_var - 1).abs().max() > 1e-3
    monkeypatch.setattr(lineval, "load_data", lambda name, root="data": (train, train, 4, True))
    probe = ["--random-init", "--arch", "resnet18", "--img-size", 16, "--workers", 0, "--knn", 5]
    _, calibrated = run_main(capsys, *probe)
    _, raw = run_main(capsys, *probe, "--bn-passes", 0)
    assert (calibrated["bn_passes"], raw["bn_passes"]) == (12, 0)
    numbers = ("top1", "top5", "knn_top1")
    assert [calibrated[k] for k in numbers] != [raw[k] for k in numbers]


def test_holdout_is_a_fixed_draw_of_training_images():
    """--holdout N: N training images drawn with a fixed seed, the same every time, none in the probe's
    training part; together they are the whole training set."""
    train = torch.utils.data.TensorDataset(torch.arange(50))
    kept, held = lineval.hold_out(train, 10)
    again = lineval.hold_out(train, 10)[1]
    assert len(held) == 10 and len(kept) == 40 and held.indices == again.indices
    assert sorted(kept.indices + held.indices) == list(range(50))
    assert held.indices != list(range(10)) and held.indices != list(range(40, 50))


def test_random_init_without_checkpoint_is_seeded(folder, capsys):
    """Twice the same numbers; a --knn beyond the train images is capped, with a note."""
    args = RANDOM_ON_FOLDER + ["--data", folder, "--knn", 50]
    lines, a = run_main(capsys, *args)
    _, b = run_main(capsys, *args)
    assert a["ckpt"] is None and a["random_init"] and a["small_stem"] and a["n_train"] == a["n_val"] == 12
    assert (a["top1"], a["knn_top1"]) == (b["top1"], b["knn_top1"])
    assert a["knn_k"] == 12 and "note: --knn 50 is more than the 12 train images: k = 12" in lines
    assert a["top1"] >= 90 and a["knn_top1"] >= 90 and not a["full"]


def test_linear_mode_learns(folder, capsys):
    """The paper's protocol trains its linear layer: the loss falls from ln 2, and the held-out
    top-1 is far above chance (50 %). Without the SGD step the loss stays at 0.69 and top-1 at 50."""
    argv = RANDOM_ON_FOLDER + ["--data", folder, "--mode", "linear", "--epochs", 3, "--batch-size", 4]
    lines, res = run_main(capsys, *argv)
    epochs = [line for line in lines if line.startswith("epoch")]
    assert [line.split(" |")[0] for line in epochs] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    losses = [float(line.split("| loss ")[1].split()[0]) for line in epochs]
    assert losses[-1] < 0.3 and losses[-1] < losses[0], losses
    assert res["mode"] == "linear" and res["epochs"] == 3
    assert res["top1"] >= 90 and res["top5"] == 100


def test_unreadable_images_are_named_and_counted(folder, capsys, tmp_path):
    """A broken image in train/ and one in val/: each named once on stdout, though linear mode
    reads train/ every epoch, and counted in the JSON."""
    broken = []
    for split in ("train", "val"):
        for c in range(2):
            os.makedirs(tmp_path / split / f"class{c}")
            for i in range(2):
                name = f"class{c}/{i}.png"
                os.symlink(folder / split / name, tmp_path / split / name)
        path = tmp_path / split / "class1" / "9.png"
        path.write_bytes(b"not a png")
        broken.append(str(path))
    for mode in ("fast", "linear"):
        argv = RANDOM_ON_FOLDER + ["--data", tmp_path, "--mode", mode, "--epochs", 2, "--fast-epochs", 2]
        lines, res = run_main(capsys, *argv)
        named = [line for line in lines if line.startswith("lineval.py: cannot read image")]
        expect = [
            f"lineval.py: cannot read image {path}: replaced by the next readable one" for path in broken
        ]
        assert [line.split(" (JSON")[0] for line in named] == expect, lines
        assert res["unreadable_images"] == 2 and res["n_train"] == res["n_val"] == 5


# ----------------------------------------------------------------------------- bad input


def bad_inputs(run, folder, tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
    black = torch.zeros(8, 8, 3, dtype=torch.uint8)
    png(tmp_path / "noval" / "train" / "a" / "0.png", black)  # no val/
    png(tmp_path / "flatval" / "val" / "0.png", black)  # val/ without class folders
    png(tmp_path / "otherclasses" / "val" / "zebra" / "0.png", black)  # val/ with other classes
    for name in ("flatval", "otherclasses"):
        os.symlink(folder / "train", tmp_path / name / "train")
    rand = ["--random-init", "--arch", "resnet18", "--data"]
    return {
        "not a checkpoint": ([tmp_path / "notes.txt"], "cannot load checkpoint"),
        "not a state_dict": ([tmp_path / "list.pt"], "holds a list, not a state_dict"),
        "not a resnet": ([tmp_path / "other.pt"], "no ResNet weights"),
        "no such file": ([tmp_path / "missing.pt"], "no such file"),
        "not a decorr folder": ([tmp_path], "neither checkpoint.pt nor backbone.pt"),
        "arch mismatch": ([run, "--arch", "resnet34"], "does not fit resnet34"),
        "no val split": (rand + [tmp_path / "noval"], "no val/ folder"),
        "val without labels": (rand + [tmp_path / "flatval"], "class folder"),
        "val with other labels": (rand + [tmp_path / "otherclasses"], "different classes"),
        "unknown arch": (["--random-init", "--arch", "vgg16"], "unknown --arch 'vgg16'"),
        "nothing to evaluate": ([], "give a checkpoint"),
        "bad option value": ([run, "--mode", "best"], "invalid choice"),
        "unknown option": ([run, "--frobnicate"], "unrecognized arguments"),
        "bad number": ([run, "--epochs", "0"], "--epochs must be a number >= 1, got 0"),
        "lr below 0": ([run, "--lr", "-1"], "--lr must be a positive number, got -1.0"),
        "lr nan": ([run, "--lr", "nan"], "--lr must be a positive number, got nan"),
        "lr 0": ([run, "--lr", "0"], "--lr must be a positive number, got 0.0"),
        "lr 0 linear": ([run, "--mode", "linear", "--lr", "0"], "--lr must be a positive number, got 0.0"),
        "lr inf linear": (
            [run, "--mode", "linear", "--lr", "inf"],
            "--lr must be a positive number, got inf",
        ),
        "wd below 0": ([run, "--wd", "-5"], "--wd must be a number >= 0.0, got -5.0"),
        "wd nan linear": ([run, "--mode", "linear", "--wd", "nan"], "--wd must be a number >= 0.0, got nan"),
        "holdout below 0": ([run, "--holdout", "-1"], "--holdout must be a number >= 0, got -1"),
        "holdout all": ([run, "--holdout", "5000"], "--holdout 5000 leaves none of the 5000 train images"),
        "bn passes trained": ([run, "--bn-passes", "3"], "--bn-passes is for --random-init"),
        "workers below 0": ([run, "--workers", "-2"], "--workers must be a number >= 0, got -2"),
    }


def error_line(capsys, argv):
    """lineval.cli(argv) exits 2 with one line on stderr: that line."""
    with pytest.raises(SystemExit) as e:
        lineval.cli([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert e.value.code == 2, (argv, err)
    assert err.startswith("lineval.py: error: ") and err.count("\n") == 1, (argv, err)
    assert out == "", out
    return err


def test_bad_input_is_one_line_and_exit_2(run, folder, tmp_path, capsys):
    """Each bad input is one line and exit 2, and nothing is appended to eval.jsonl."""
    before = (run / "eval.jsonl").read_text() if (run / "eval.jsonl").exists() else None
    for name, (argv, expect) in bad_inputs(run, folder, tmp_path).items():
        assert expect in error_line(capsys, argv), name
    after = (run / "eval.jsonl").read_text() if (run / "eval.jsonl").exists() else None
    assert after == before


def bad_checkpoints(run, tmp_path):
    """{name: (file, what the error line says)}: files that are not checkpoints lineval can read."""
    backbone = (run / "backbone.pt").read_bytes()
    files = dict(
        empty=b"",
        truncated=backbone[: len(backbone) // 2],
        garbage=bytes(range(256)) * 4,
        text=b"hello",
    )
    bad = {}
    for name, content in files.items():
        (tmp_path / f"{name}.pt").write_bytes(content)
        bad[name] = (tmp_path / f"{name}.pt", "is empty" if name == "empty" else "cannot load checkpoint")
    objects = dict(
        list=([torch.zeros(2)], "holds a list, not a state_dict"),
        tensor=(torch.zeros(3), "holds a Tensor, not a state_dict"),
        numbers=({"lr": 0.1, "step": 3}, "holds a dict, not a state_dict"),
        vgg=(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Linear(8, 2)).state_dict(), "no ResNet"),
        flat_conv1=({"conv1.weight": torch.zeros(64)}, "no ResNet weights (no 4-d conv1.weight)"),
        resnet50=(torchvision.models.resnet50().state_dict(), "look like resnet50"),
    )
    for name, (obj, expect) in objects.items():
        torch.save(obj, tmp_path / f"{name}.pt")
        bad[name] = (tmp_path / f"{name}.pt", expect)
    return bad


def test_bad_checkpoints_are_one_line_naming_the_file(run, tmp_path, capsys):
    """Empty, truncated, garbage, a pickle of something else, another architecture's weights:
    exit 2, one line that names the file and says what to give instead (or which --arch)."""
    for name, (file, expect) in bad_checkpoints(run, tmp_path).items():
        argv = [file, "--arch", "resnet18", "--workers", 0] if name == "resnet50" else [file]
        err = error_line(capsys, argv)
        assert str(file) in err and expect in err, (name, err)
        assert "give a decorr --out folder" in err or "give the right --arch" in err, (name, err)


def test_backbone_pt_beside_a_broken_checkpoint(run, tmp_path, capsys):
    """backbone.pt takes the run's settings from checkpoint.pt beside it: a broken one is named."""
    os.symlink(run / "backbone.pt", tmp_path / "backbone.pt")
    (tmp_path / "checkpoint.pt").write_bytes(b"\x80\x02garbage")
    err = error_line(capsys, [tmp_path / "backbone.pt"])
    assert f"cannot load checkpoint {tmp_path / 'checkpoint.pt'}" in err, err


def test_empty_checkpoint_through_the_command_line(tmp_path):
    """: > out/checkpoint.pt, then python lineval.py out: one line, exit 2, no traceback."""
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    r = cli(tmp_path)
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("lineval.py: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert f"{tmp_path / 'checkpoint.pt'} is empty" in r.stderr and "give a decorr --out" in r.stderr, (
        r.stderr
    )
