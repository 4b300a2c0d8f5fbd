"""Tests for lineval.py (CPU, well under two minutes): the fast probe on features with known answers,
then the command line on a checkpoint from a short decorr.py run, random init, and bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torchvision
from PIL import Image

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


def cli(*argv):
    return subprocess.run(
        [sys.executable, os.path.join(HERE, "lineval.py"), *map(str, argv)],
        capture_output=True,
        text=True,
        cwd=HERE,
        timeout=300,
    )


def last_json(stdout):
    return json.loads(stdout.strip().splitlines()[-1])


def run_main(capsys, *argv):
    """lineval.main in this process (no interpreter start-up): its JSON line."""
    lineval.main([str(a) for a in argv])
    return last_json(capsys.readouterr().out)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A decorr output folder from a two-step run (resnet18, CIFAR stem, synthetic data)."""
    out = tmp_path_factory.mktemp("run") / "out"
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(HERE, "decorr.py"),
            "--steps",
            "2",
            "--batch-size",
            "32",
            "--proj",
            "64-64",
            "--amp",
            "none",
            "--workers",
            "0",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=HERE,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny ImageFolder in ImageNet layout: 2 classes x 6 images per split, 40 px."""
    root = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c in range(2):
            for i in range(6):
                img = (torch.rand(40, 40, 3, generator=g) * 128 + 127 * c).to(torch.uint8)
                png(root / split / f"class{c}" / f"{i}.png", img)
    return root


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
    """python decorr.py && python lineval.py out: arch, stem and data come from the run."""
    r = cli(run, "--knn", "--limit", 100, "--workers", 0)
    assert r.returncode == 0, r.stderr
    res = last_json(r.stdout)
    assert res["mode"] == "fast" and res["data"] == "synthetic" and res["arch"] == "resnet18"
    assert res["small_stem"] and res["step"] == 2 and not res["random_init"]
    assert res["ckpt"] == str(run / "checkpoint.pt") and res["n_train"] == res["n_val"] == 100
    assert 0 <= res["top1"] <= res["top5"] <= 100 and 0 <= res["knn_top1"] <= 100 and res["knn_k"] == 20
    with open(run / "eval.jsonl") as fh:
        rows = [json.loads(line) for line in fh]
    assert rows[-1] == res


def test_backbone_pt_and_plain_state_dict(run, folder, capsys, tmp_path):
    """backbone.pt (settings from the checkpoint.pt beside it) and a torchvision model's
    state_dict (fc included, prefixed by DDP's module.) evaluate to the same numbers."""
    common = ["--data", folder, "--workers", 0, "--fast-epochs", 5]
    a = run_main(capsys, run / "backbone.pt", *common)
    net = torchvision.models.resnet18()
    net.conv1, net.maxpool = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False), torch.nn.Identity()
    net.load_state_dict(torch.load(run / "backbone.pt"), strict=False)
    torch.save({"module." + k: v for k, v in net.state_dict().items()}, tmp_path / "plain.pth")
    b = run_main(capsys, tmp_path / "plain.pth", *common, "--img-size", 32)
    assert a["arch"] == b["arch"] == "resnet18" and a["small_stem"] and b["small_stem"]
    assert (a["top1"], a["top5"], a["img_size"]) == (b["top1"], b["top5"], b["img_size"])
    assert not os.path.exists(tmp_path / "eval.jsonl")


def test_random_init_from_run_folder(run, capsys):
    res = run_main(capsys, run, "--random-init", "--limit", 100, "--workers", 0, "--fast-epochs", 5)
    assert (
        res["random_init"] and res["arch"] == "resnet18" and res["data"] == "synthetic" and res["small_stem"]
    )
    assert json.loads((run / "eval.jsonl").read_text().splitlines()[-1])["random_init"]


def test_random_init_without_checkpoint_is_seeded(folder, capsys):
    args = [
        "--random-init",
        "--arch",
        "resnet18",
        "--data",
        folder,
        "--img-size",
        32,
        "--workers",
        0,
        "--knn",
        3,
    ]
    a, b = run_main(capsys, *args), run_main(capsys, *args)
    assert a["ckpt"] is None and a["random_init"] and a["small_stem"] and a["n_train"] == a["n_val"] == 12
    assert (a["top1"], a["knn_top1"]) == (b["top1"], b["knn_top1"])


def test_linear_mode(run, folder, capsys):
    lineval.main(
        [
            str(a)
            for a in (
                run,
                "--mode",
                "linear",
                "--data",
                folder,
                "--epochs",
                2,
                "--batch-size",
                8,
                "--workers",
                0,
            )
        ]
    )
    out = capsys.readouterr().out.strip().splitlines()
    assert [line.split(" |")[0] for line in out if line.startswith("epoch")] == ["epoch 1/2", "epoch 2/2"]
    res = json.loads(out[-1])
    assert res["mode"] == "linear" and res["epochs"] == 2 and 0 <= res["top1"] <= res["top5"] == 100


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
        "not a checkpoint": ([tmp_path / "notes.txt"], "is not a checkpoint"),
        "not a state_dict": ([tmp_path / "list.pt"], "not a state_dict"),
        "not a resnet": ([tmp_path / "other.pt"], "no ResNet weights"),
        "no such file": ([tmp_path / "missing.pt"], "no such file"),
        "not a decorr folder": ([tmp_path], "neither checkpoint.pt nor backbone.pt"),
        "arch mismatch": ([run, "--arch", "resnet34"], "does not fit resnet34"),
        "no val split": (rand + [tmp_path / "noval"], "no val/ folder"),
        "val without labels": (rand + [tmp_path / "flatval"], "class folder"),
        "val with other labels": (rand + [tmp_path / "otherclasses"], "val classes differ"),
        "unknown arch": (["--random-init", "--arch", "vgg16"], "unknown --arch 'vgg16'"),
        "nothing to evaluate": ([], "give a checkpoint"),
        "bad option value": ([run, "--mode", "best"], "invalid choice"),
        "unknown option": ([run, "--frobnicate"], "unrecognized arguments"),
        "bad number": ([run, "--epochs", "0"], "--epochs must be at least 1"),
    }


def test_bad_input_is_one_line_and_exit_2(run, folder, tmp_path, capsys):
    for name, (argv, expect) in bad_inputs(run, folder, tmp_path).items():
        with pytest.raises(SystemExit) as e:
            lineval.cli([str(a) for a in argv])
        err = capsys.readouterr().err
        assert e.value.code == 2, name
        assert err.startswith("lineval.py: error: ") and err.count("\n") == 1 and expect in err, (name, err)


def test_bad_input_through_the_command_line(tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    r = cli(tmp_path / "notes.txt")
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("lineval.py: error: ") and r.stderr.count("\n") == 1, r.stderr
