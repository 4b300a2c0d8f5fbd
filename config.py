"""
config.py -- the command line of decorr.py: its flags, the defaults that depend on the data and the
loss, and the checks that refuse a run before anything is written (one line on stderr, exit 2).

    args = config.parse_args(["--data", "cifar10", "--proj", "2048-2048-2048"])
"""

import argparse
import math
import os

import torch

from data import UsageError

ARCHS = ("resnet18", "resnet34", "resnet50")


def parse_proj(spec):
    """'8192-8192-8192' -> [8192, 8192, 8192]: the projector's widths, the last is D."""
    dims = [int(d) if d.isdigit() else 0 for d in spec.split("-")]
    if min(dims) <= 0:
        raise UsageError(f"--proj {spec!r} is not a list of positive widths like 8192-8192-8192")
    return dims


DESCRIPTION = """decorr.py -- self-supervised pre-training with the decorrelation loss of Liu, Suganuma,
Okatani, "Bridging the Gap from Asymmetry Tricks to Decorrelation Principles in Non-contrastive
Self-supervised Learning", NeurIPS 2022; Barlow Twins, VICReg, SimSiam and BYOL in the same harness
(--loss)."""

# Defaults that depend on the data: the paper's ImageNet recipe for image folders (sec. 5.1), a
# CPU-sized demo for the built-in synthetic data, the usual CIFAR recipe for CIFAR.
PROFILES = dict(
    folder=dict(arch="resnet50", img_size=224, proj="2048-2048-2048", epochs=100, batch_size=2048, wd=1e-6),
    cifar=dict(arch="resnet18", img_size=32, proj="2048-2048-2048", epochs=800, batch_size=256, wd=1e-4),
    synthetic=dict(arch="resnet18", img_size=32, proj="4096-256", epochs=4, batch_size=256, wd=1e-4),
)
LARS_ETA = dict(folder=0.001, cifar=0.02, synthetic=0.02)  # the trust coefficient of each profile
# Each loss's coefficients (the official ones for the baselines) and the terms it logs.
LOSSES = dict(
    decorr=(dict(inv_coef=1.0, cov_coef=1.0), ("inv", "cov")),
    barlowtwins=(dict(cov_coef=0.0051), ("on_diag", "off_diag")),
    vicreg=(dict(inv_coef=25.0, std_coef=25.0, cov_coef=1.0), ("inv", "var", "cov")),
    simsiam=(dict(optimizer="sgd"), ("sim_12", "sim_21")),
    byol=(dict(tau_base=0.99), ("reg_12", "reg_21")),
)
# The flags that define what a run computes: a resumed run must keep them.
RUN_DEFINING = """data arch proj img_size batch_size loss partitions seed no_std lr wd identity_predictor
    predictor_init stopgrad inv_coef cov_coef std_coef lars_eta epochs warmup_epochs warmup_steps amp
    predictor optimizer tau_base fix_pred_lr loss_scale lars_clip""".split()
# The flags that apply to some losses only: given with another --loss, they would do nothing.
APPLIES_TO = dict(
    partitions=("decorr",),
    no_std=("decorr",),
    identity_predictor=("decorr",),
    stopgrad=("decorr",),
    predictor_init=("decorr",),
    inv_coef=("decorr", "vicreg"),
    std_coef=("vicreg",),
    predictor=("simsiam", "byol"),
    fix_pred_lr=("simsiam", "byol"),
    tau_base=("byol",),
)
# The numeric flags and the values they take.
POSITIVE = ("epochs", "batch_size", "partitions", "img_size", "log_every", "lr", "lars_eta", "loss_scale")
NOT_NEGATIVE = """steps warmup_epochs warmup_steps save_every_steps diag_every workers wd inv_coef cov_coef
    std_coef""".split()


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help with the description as written and every flag's default: " (default: VALUE)" is appended
    to the help of a flag with a fixed default that its help does not state already. A switch
    (store_true) is left as it is; a flag whose default is None (it depends on the data or the loss) says
    its default in its own help."""

    def _get_help_string(self, action):
        text = action.help
        if action.nargs == 0 or action.default is None or "default" in text:
            return text
        return text + " (default: %(default)s)"


# the data profiles as --help names them
PROFILE_NAMES = dict(folder="folders", cifar="cifar", synthetic="synthetic")


def defaults_text(values):
    """The defaults of a flag in values ({profile or loss: value}) as --help says them, the ones with the
    same value named together: "2048 for folders, 256 for cifar and synthetic"."""
    names_by_value = {}
    for name, value in values.items():
        names_by_value.setdefault(value, []).append(PROFILE_NAMES.get(name, name))
    return ", ".join(f"{value} for {' and '.join(names)}" for value, names in names_by_value.items())


def profile_default(flag_name):
    """The defaults of a flag that depends on the data profile, from PROFILES, for --help."""
    return defaults_text({profile: values[flag_name] for profile, values in PROFILES.items()})


def loss_default(flag_name):
    """The defaults of a flag that depends on the loss, from LOSSES, for --help (the losses that set it)."""
    values = {}
    for loss, (coefficients, _) in LOSSES.items():
        if flag_name in coefficients:
            values[loss] = coefficients[flag_name]
    return defaults_text(values)


def add_arguments(p):
    a = p.add_argument
    a(
        "--data",
        default="synthetic",
        help="synthetic | cifar10 | cifar100 | PATH (image folders: PATH/train, PATH/val)",
    )
    a("--data-root", default="data", help="where cifar10/cifar100 are (never downloaded)")
    a("--arch", choices=ARCHS, default=None, help=f"the backbone (default: {profile_default('arch')})")
    a("--img-size", type=int, default=None, help=f"crop size (default: {profile_default('img_size')})")
    a(
        "--proj",
        default=None,
        help=f"projector widths, the last is D (default: {profile_default('proj')})",
    )
    a("--epochs", type=int, default=None, help=f"epochs to train (default: {profile_default('epochs')})")
    a(
        "--batch-size",
        type=int,
        default=None,
        help=f"global batch, over all processes (default: {profile_default('batch_size')})",
    )
    a("--lr", type=float, default=0.3, help="base lr, scaled by batch/256")
    a("--wd", type=float, default=None, help=f"weight decay (default: {profile_default('wd')})")
    a(
        "--lars-eta",
        type=float,
        default=None,
        help=f"LARS trust coefficient (default: {defaults_text(LARS_ETA)})",
    )
    a(
        "--warmup-epochs",
        type=int,
        default=10,
        help="linear warm-up, cut to a tenth of the run; over its N steps the lr rises from lr/N to lr",
    )
    a(
        "--warmup-steps",
        type=int,
        default=None,
        help="instead of --warmup-epochs: a warm-up of N steps from lr 0 (Barlow Twins, VICReg), any length "
        "(default: none, --warmup-epochs applies)",
    )
    a("--loss", choices=tuple(LOSSES), default="decorr", help="decorr, or a baseline in the same harness")
    a(
        "--partitions",
        type=int,
        default=None,
        help="k, parts of the global batch (default: batch/256 if 256 divides it, else 1)",
    )
    a(
        "--inv-coef",
        type=float,
        default=None,
        help=f"C_inv; vicreg: sim coef (default: {loss_default('inv_coef')})",
    )
    a(
        "--cov-coef",
        type=float,
        default=None,
        help=f"C_cov; vicreg: cov coef; barlowtwins: lambda (default: {loss_default('cov_coef')})",
    )
    a("--std-coef", type=float, default=None, help=f"vicreg: std coef (default: {loss_default('std_coef')})")
    a(
        "--loss-scale",
        type=float,
        default=1.0,
        help="the loss is multiplied by this (solo-learn's Barlow Twins: 0.1)",
    )
    a(
        "--predictor",
        choices=("mlp", "linear"),
        default=None,
        help="simsiam, byol: the method's MLP, or one D x D linear layer without bias (default: mlp)",
    )
    a(
        "--fix-pred-lr",
        action="store_true",
        help="simsiam, byol: the predictor keeps the base lr (no schedule)",
    )
    a(
        "--tau-base",
        type=float,
        default=None,
        help=f"byol: the target's decay at step 0, rising to 1 (default: {loss_default('tau_base')})",
    )
    a(
        "--optimizer",
        choices=("lars", "sgd"),
        default=None,
        help="default: sgd for simsiam (momentum 0.9, weight decay on every parameter), else lars",
    )
    a("--lars-clip", action="store_true", help="LARS: the step is min(trust ratio, lr), apex LARC's clip")
    a("--no-std", action="store_true", help="Table 3: no standardization")
    a("--identity-predictor", action="store_true", help="Table 3: W fixed to I")
    a("--stopgrad", action="store_true", help="Table 3: StopGrad on the invariance targets")
    a(
        "--predictor-init",
        choices=("identity", "random"),
        default=None,
        help="W at step 0 (default: identity)",
    )
    a(
        "--amp",
        choices=("bf16", "fp16", "none"),
        default=None,
        help="default: bf16 where the device supports it, else none; fp16 is for CUDA only",
    )
    a(
        "--compile",
        action="store_true",
        help="torch.compile the model; CUDA only (on CPUs torch 2.14 miscompiles this model: refused there)",
    )
    a(
        "--workers",
        type=int,
        default=None,
        help="image-folder loader processes per device (default: the CPU cores per process - 1, at most 10)",
    )
    a("--seed", type=int, default=0, help="the seed of the weights, the data order and the augmentations")
    a(
        "--out",
        default="out",
        help="the run's folder: log.jsonl, checkpoint.pt, backbone.pt, curves.png, wp.png (linear predictor "
        "only), and with --wandb wandb_id.txt and wandb/; lineval.py appends eval.jsonl there. A run holds "
        "it (an OS lock on the folder) while it lives: a second run on it is refused",
    )
    a("--steps", type=int, default=0, help="stop after N optimiser steps (0: run all epochs)")
    a(
        "--log-every",
        type=int,
        default=10,
        help="log, and check for a signal or a non-finite loss, every N steps",
    )
    a("--save-every-steps", type=int, default=0, help="also checkpoint every N steps")
    a("--diag-every", type=int, default=0, help="diagnostics every N steps (0: once per epoch)")
    a("--fresh", action="store_true", help="start over; every output of the old run is moved aside")
    a(
        "--wandb",
        metavar="PROJECT",
        default=None,
        help="also log to this W&B project (pip install wandb; default: none, no W&B)",
    )
    a("--wandb-name", default=None, help="the W&B run's name (default: one W&B chooses)")


def profile_name(data):
    if data == "synthetic":
        return "synthetic"
    if data in ("cifar10", "cifar100"):
        return "cifar"
    return "folder"


def make_parser():
    """decorr.py's command line: its flags, and --help with every flag's default."""
    p = Parser(description=DESCRIPTION, formatter_class=HelpFormatter)
    add_arguments(p)
    return p


def parse_args(argv=None):
    p = make_parser()
    args = p.parse_args(argv)
    refuse_unused_flags(args)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        bf16 = torch.cuda.is_bf16_supported()
    else:
        bf16 = torch.cpu._is_avx512_bf16_supported()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    workers = max(0, min(10, (os.cpu_count() or 1) // local_world - 1))
    profile = profile_name(args.data)
    defaults = dict(PROFILES[profile], lars_eta=LARS_ETA[profile])
    defaults.update(amp="bf16" if bf16 else "none", workers=workers, predictor_init="identity")
    defaults.update(optimizer="lars", predictor="mlp")
    defaults.update(LOSSES[args.loss][0])
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.partitions is None:  # the paper's per-GPU batch of 256 rows per part, whatever the processes
        args.partitions = args.batch_size // 256 if args.batch_size % 256 == 0 else 1
    parse_proj(args.proj)
    check_numbers(args)
    if args.amp == "fp16" and not torch.cuda.is_available():
        raise UsageError(
            "--amp fp16 needs CUDA (on a CPU it runs hundreds of times slower); use --amp bf16 or none"
        )
    if args.batch_size % world:
        raise UsageError(f"--batch-size {args.batch_size} does not split over {world} processes")
    if args.batch_size % args.partitions:
        raise UsageError(
            f"--batch-size {args.batch_size} does not split into --partitions {args.partitions} equal parts"
        )
    return args


def flag(name):
    return "--" + name.replace("_", "-")


def refuse_unused_flags(args):
    """A flag given for a --loss it does nothing for is an error: an ablation that does nothing is wrong."""
    for name, losses in APPLIES_TO.items():
        if getattr(args, name) not in (None, False) and args.loss not in losses:
            raise UsageError(
                f"{flag(name)} does nothing with --loss {args.loss} (it is for {', '.join(losses)})"
            )
    if args.wandb_name is not None and args.wandb is None:
        raise UsageError("--wandb-name does nothing without --wandb PROJECT")
    optimizer = args.optimizer or LOSSES[args.loss][0].get("optimizer", "lars")
    if optimizer == "sgd" and (args.lars_eta is not None or args.lars_clip):
        raise UsageError("--lars-eta and --lars-clip do nothing with --optimizer sgd")
    if args.identity_predictor and args.predictor_init is not None:
        raise UsageError("--predictor-init does nothing with --identity-predictor (W is I throughout)")


def check_numbers(args):
    """Every numeric flag finite and in its range, and the scaled lr within float32."""
    for name in POSITIVE:
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            raise UsageError(f"{flag(name)} must be a positive number, got {value}")
    for name in NOT_NEGATIVE:
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise UsageError(f"{flag(name)} must be a number >= 0, got {value}")
    if args.tau_base is not None and not 0 <= args.tau_base <= 1:
        raise UsageError(f"--tau-base must be in [0, 1], got {args.tau_base}")
    if args.lr * args.batch_size / 256 > 1e30:
        raise UsageError(f"--lr {args.lr}: scaled by batch/256 it leaves the range of float32")
