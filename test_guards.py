"""What decorr.py refuses and what it never writes: bad checkpoints, non-finite weights, flags that do
nothing, resumes that would change the run, and the outputs --fresh moves aside. Each case runs the
command line as a user would and checks the exit code, the one line on stderr and the files left."""

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

import config
import decorr

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--proj", "32-32", "--batch-size", "16", "--amp", "none", "--workers", "0", "--log-every", "1"]


def run(args, env=None, timeout=300):
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(
        [sys.executable, "decorr.py", *map(str, args)],
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


def refused(p):
    """Exit 2 with exactly one line on stderr, no traceback; that line."""
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert "Traceback" not in p.stderr
    return lines[0]


@pytest.fixture(scope="module")
def one_step_run(tmp_path_factory):
    """The out folder of a finished 1-step run, made once; each test works on a copy."""
    out = tmp_path_factory.mktemp("one_step") / "out"
    p = run(TINY + ["--steps", "1", "--out", out])
    assert p.returncode == 0, p.stderr
    return out


def copy_of(run_folder, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(run_folder, out)
    return out


@pytest.mark.parametrize("content", [b"", b"hello", "truncated", "list"])
def test_bad_checkpoint_is_one_line(tmp_path, content):
    out = tmp_path / "out"
    out.mkdir()
    ckpt = out / "checkpoint.pt"
    if content == "truncated":
        good = tmp_path / "good.pt"
        torch.save(dict(args={}, step=1, model={"w": torch.randn(1000)}), good)
        ckpt.write_bytes(good.read_bytes()[:2000])
    elif content == "list":
        torch.save([1, 2, 3], ckpt)
    else:
        ckpt.write_bytes(content)
    line = refused(run(TINY + ["--steps", "1", "--out", out]))
    assert str(ckpt) in line
    assert "--fresh" in line
    assert len(line) < 300
    assert sorted(os.listdir(out)) == ["checkpoint.pt"]  # nothing else written


def test_checkpoint_of_another_model_is_one_line(tmp_path, one_step_run):
    out = copy_of(one_step_run, tmp_path)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    ckpt["model"] = {"backbone.conv1.weight": torch.zeros(3)}
    torch.save(ckpt, out / "checkpoint.pt")
    line = refused(run(TINY + ["--steps", "2", "--out", out]))
    assert "does not fit this model" in line


def test_diverging_run_writes_no_non_finite_checkpoint(tmp_path):
    out = tmp_path / "out"
    p = run(TINY + ["--steps", "4", "--save-every-steps", "1", "--lr", "1e29", "--out", out])
    assert p.returncode == 1, p.stderr
    assert "non-finite" in p.stderr
    assert not (out / "backbone.pt").exists()
    if (out / "checkpoint.pt").exists():
        ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
        assert f"(step {ckpt['step']})" in p.stderr
        for name, tensor in ckpt["model"].items():
            assert torch.isfinite(tensor).all(), name
    else:
        assert "no checkpoint was written" in p.stderr


def test_weights_checked_before_a_checkpoint(tmp_path, monkeypatch):
    """The loss before the update can be finite while the weights after it are not."""
    out = tmp_path / "out"
    real_step = decorr.train_step

    def poisoned_step(model, *args):
        result = real_step(model, *args)
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))
        return result

    monkeypatch.setattr(decorr, "train_step", poisoned_step)
    with pytest.raises(FloatingPointError, match="non-finite weights after step 1; no checkpoint"):
        decorr.main(TINY + ["--steps", "2", "--save-every-steps", "1", "--out", str(out)])
    assert not (out / "checkpoint.pt").exists()


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--lr", "nan"], "--lr must be a positive number"),
        (["--lr", "-1"], "--lr must be a positive number"),
        (["--lr", "1e300"], "range of float32"),
        (["--steps", "-1"], "--steps must be a number >= 0"),
        (["--wd", "inf"], "--wd must be a number >= 0"),
        (["--epochs", "0"], "--epochs must be a positive number"),
        (["--std-coef", "1"], "--std-coef does nothing with --loss decorr"),
        (["--loss", "barlowtwins", "--identity-predictor"], "--identity-predictor does nothing with --loss"),
        (["--loss", "vicreg", "--stopgrad"], "--stopgrad does nothing with --loss vicreg"),
        (["--loss", "vicreg", "--no-std"], "--no-std does nothing with --loss vicreg"),
        (["--loss", "barlowtwins", "--partitions", "2"], "--partitions does nothing"),
        (["--loss", "barlowtwins", "--inv-coef", "2"], "--inv-coef does nothing"),
        (["--loss", "barlowtwins", "--predictor-init", "random"], "--predictor-init does nothing"),
        (["--identity-predictor", "--predictor-init", "random"], "--predictor-init does nothing"),
        (["--wandb-name", "x"], "--wandb-name does nothing without --wandb"),
        (["--predictor", "linear"], "--predictor does nothing with --loss decorr"),
        (["--loss", "vicreg", "--fix-pred-lr"], "--fix-pred-lr does nothing with --loss vicreg"),
        (["--loss", "simsiam", "--tau-base", "0.9"], "--tau-base does nothing with --loss simsiam"),
        (["--loss", "byol", "--tau-base", "1.5"], "--tau-base must be in [0, 1]"),
        (["--loss", "byol", "--loss-scale", "0"], "--loss-scale must be a positive number"),
        (
            ["--loss", "simsiam", "--lars-eta", "0.02"],
            "--lars-eta and --lars-clip do nothing with --optimizer sgd",
        ),
        (["--optimizer", "sgd", "--lars-clip"], "--lars-eta and --lars-clip do nothing with --optimizer sgd"),
    ],
)
def test_bad_flags_are_refused(flags, words):
    with pytest.raises(decorr.UsageError, match=re.escape(words)):
        config.parse_args(flags)


@pytest.mark.parametrize("flags", [["--steps", "-1"], ["--amp", "fp16"], ["--std-coef", "1"]])
def test_bad_flags_exit_2_before_anything_is_written(tmp_path, flags):
    if "fp16" in flags and torch.cuda.is_available():
        pytest.skip("fp16 is allowed on CUDA")
    out = tmp_path / "out"
    line = refused(run(TINY + ["--out", out] + flags, timeout=60))
    assert line.startswith("decorr.py: error: --")
    assert not out.exists()


def test_per_method_defaults():
    """SimSiam trains with SGD unless told otherwise (its official recipe), the others with LARS;
    BYOL's target starts at tau 0.99; the asymmetric methods default to their MLP predictors."""
    simsiam = config.parse_args(["--loss", "simsiam"])
    assert (simsiam.optimizer, simsiam.predictor, simsiam.tau_base) == ("sgd", "mlp", None)
    assert config.parse_args(["--loss", "simsiam", "--optimizer", "lars"]).optimizer == "lars"
    byol = config.parse_args(["--loss", "byol"])
    assert (byol.optimizer, byol.predictor, byol.tau_base, byol.loss_scale) == ("lars", "mlp", 0.99, 1.0)
    assert config.parse_args([]).optimizer == "lars" and not config.parse_args([]).lars_clip


def test_default_partitions_follow_the_batch_not_the_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert config.parse_args(["--batch-size", "2048"]).partitions == 8
    assert config.parse_args(["--batch-size", "512"]).partitions == 2
    assert config.parse_args(["--batch-size", "64"]).partitions == 1
    assert config.parse_args(["--batch-size", "300"]).partitions == 1
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert config.parse_args([]).partitions == 1
    assert config.parse_args(["--batch-size", "2048", "--partitions", "4"]).partitions == 4


def test_fresh_moves_every_old_output_aside(tmp_path, one_step_run):
    out = copy_of(one_step_run, tmp_path)
    (out / "eval.jsonl").write_text('{"top1": 50.0}\n')
    old = set(os.listdir(out))
    assert {"checkpoint.pt", "log.jsonl", "backbone.pt", "wp.png", "eval.jsonl"} <= old
    # the fresh run dies before its end (its weights diverge): nothing of the old run may be left
    p = run(TINY + ["--steps", "3", "--fresh", "--lr", "1e29", "--out", out])
    assert p.returncode == 1, p.stderr
    names = set(os.listdir(out))
    stamped = [name for name in names if re.search(r"\.\d{8}-\d{6}-\d{6}$", name)]
    assert sorted(name.rsplit(".", 1)[0] for name in stamped) == sorted(old)
    assert len({name.rsplit(".", 1)[1] for name in stamped}) == 1  # one timestamp for all of them
    assert "backbone.pt" not in names
    assert "eval.jsonl" not in names


def test_resume_refused_when_the_schedule_changes(tmp_path, one_step_run):
    out = copy_of(one_step_run, tmp_path)
    log_before = (out / "log.jsonl").read_bytes()
    checkpoint_before = (out / "checkpoint.pt").read_bytes()
    for flags, name in [(["--epochs", "40"], "--epochs"), (["--warmup-epochs", "1"], "--warmup-epochs")]:
        line = refused(run(TINY + ["--steps", "2", "--out", out] + flags))
        assert name in line
        assert "--fresh" in line
    assert (out / "log.jsonl").read_bytes() == log_before
    assert (out / "checkpoint.pt").read_bytes() == checkpoint_before


def test_run_past_its_last_step_rewrites_nothing(tmp_path, one_step_run):
    out = copy_of(one_step_run, tmp_path)
    before = {name: (out / name).stat().st_mtime_ns for name in os.listdir(out)}
    p = run(TINY + ["--steps", "1", "--out", out])
    assert p.returncode == 0, p.stderr
    assert "nothing to do" in p.stdout
    after = {name: (out / name).stat().st_mtime_ns for name in os.listdir(out)}
    assert after == before


def test_val_classes_must_match_train(tmp_path):
    root = tmp_path / "folders"
    for split, classes in (("train", ("cat", "dog")), ("val", ("cat", "eel"))):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (i * 90, 40, 200)).save(root / split / name / f"{i}.png")
    line = refused(run(["--data", root, "--img-size", "8", "--out", tmp_path / "out"], timeout=60))
    assert "different classes" in line
    assert "dog" in line
    assert "eel" in line
    assert not (tmp_path / "out").exists()


def test_readme_backbone_lines_load_the_backbone(one_step_run):
    out = one_step_run
    readme = open(os.path.join(HERE, "README.md")).read()
    section = readme.split("### Loading the backbone", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert code.count("load_state_dict") == 2
    namespace = {}
    exec(code.replace("out/backbone.pt", str(out / "backbone.pt")), namespace)
    expected = torch.load(out / "backbone.pt", weights_only=True)
    for model in (namespace["resnet"], namespace["backbone"]):
        state = model.state_dict()
        assert state.keys() == expected.keys()
        for name, tensor in expected.items():
            assert torch.equal(state[name], tensor), name


def project_files():
    tracked = subprocess.run(["git", "ls-files"], cwd=HERE, capture_output=True, text=True, check=True)
    return [name for name in tracked.stdout.split() if name.endswith((".py", ".md", ".toml", ".txt"))]


def test_local_links_resolve_and_nothing_outside_is_cited():
    for name in project_files():
        text = open(os.path.join(HERE, name)).read()
        for cited in ("NOTES" + ".md", "RECIPES" + ".md", "appendix" + ".txt", "../" + "shared"):
            assert cited not in text, (name, cited)
        if name.endswith(".md"):
            for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
                if not target.startswith("http"):
                    path = os.path.join(HERE, os.path.dirname(name), target)
                    assert os.path.exists(path), (name, target)


def help_texts(text):
    """The options of a --help as {an option's first flag: its help, on one line}."""
    helps = {}
    flag_name = None
    for line in text.split("\noptions:\n", 1)[1].splitlines():
        if line.startswith("  -"):
            invocation, _, help_start = line.strip().partition("  ")
            flag_name = invocation.split()[0].rstrip(",")
            helps[flag_name] = help_start.strip()
        elif flag_name is not None and line.strip():
            helps[flag_name] = (helps[flag_name] + " " + line.strip()).strip()
    return helps


def shown_defaults(text):
    """The defaults a help names per profile or loss: "(default: 2048 for folders, 256 for cifar and
    synthetic)" -> {"folder": "2048", "cifar": "256", "synthetic": "256"}."""
    shown = re.search(r"\(default: ([^)]*)\)", text).group(1)
    values = {}
    for part in shown.split(", "):
        value, _, names = part.partition(" for ")
        for name in names.split(" and "):
            values["folder" if name == "folders" else name] = value
    return values


def test_help_shows_every_default():
    """python decorr.py --help: the description as written; every flag but -h and the switches says its
    default, a fixed one as "(default: VALUE)"; the defaults per data profile are PROFILES' and LARS_ETA's
    and the ones per loss LOSSES', and they are what a run uses; --out names every output of a run, and
    --compile says it is for CUDA only."""
    environment = dict(os.environ, COLUMNS="1000")  # no line wrapped
    p = subprocess.run(
        [sys.executable, "decorr.py", "--help"], cwd=HERE, capture_output=True, text=True, env=environment
    )
    assert p.returncode == 0, p.stderr
    assert config.DESCRIPTION in p.stdout
    helps = help_texts(p.stdout)
    actions = config.make_parser()._actions
    assert set(helps) == {action.option_strings[0] for action in actions}
    for action in actions:
        if action.nargs == 0:  # -h and the switches
            continue
        text = helps[action.option_strings[0]]
        assert "default" in text, action.option_strings[0]
        if action.default is not None:
            assert text.endswith(f"(default: {action.default})"), action.option_strings[0]
    profile_flags = dict(arch="--arch", img_size="--img-size", proj="--proj", epochs="--epochs")
    profile_flags.update(batch_size="--batch-size", wd="--wd")
    for name, flag_name in profile_flags.items():
        shown = shown_defaults(helps[flag_name])
        assert shown == {profile: str(values[name]) for profile, values in config.PROFILES.items()}, flag_name
    assert shown_defaults(helps["--lars-eta"]) == {
        profile: str(eta) for profile, eta in config.LARS_ETA.items()
    }
    for data, profile in (("synthetic", "synthetic"), ("cifar10", "cifar"), ("images", "folder")):
        args = config.parse_args(["--data", data])
        for name, flag_name in profile_flags.items():
            assert str(getattr(args, name)) == shown_defaults(helps[flag_name])[profile], (data, flag_name)
        assert str(args.lars_eta) == shown_defaults(helps["--lars-eta"])[profile]
    loss_flags = dict(
        inv_coef="--inv-coef", cov_coef="--cov-coef", std_coef="--std-coef", tau_base="--tau-base"
    )
    for name, flag_name in loss_flags.items():
        shown = shown_defaults(helps[flag_name])
        assert shown == {
            loss: str(values[name]) for loss, (values, _) in config.LOSSES.items() if name in values
        }
        for loss, value in shown.items():
            assert str(getattr(config.parse_args(["--loss", loss]), name)) == value, (loss, flag_name)
    out_help = helps["--out"]
    for name in decorr.OUTPUTS:
        assert name in out_help, name
    for words in ("curves.png", "wp.png (linear predictor only)", "lineval.py appends eval.jsonl", "wandb/"):
        assert words in out_help, words
    assert "CUDA only" in helps["--compile"]
