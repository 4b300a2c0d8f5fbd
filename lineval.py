"""
lineval.py -- how good is a decorr backbone? A linear classifier on its frozen features.

    python decorr.py && python lineval.py out              # synthetic data: fast probe, ~30 s on a CPU
    python lineval.py out --data cifar10 --knn             # CIFAR-10: fast probe and 20-NN
    python lineval.py --random-init --arch resnet18 --data cifar10      # the baseline
    torchrun --nproc_per_node=8 lineval.py out --data /imagenet --mode linear   # the paper's protocol

CKPT is a decorr output folder, its checkpoint.pt or backbone.pt, or a torchvision ResNet
state_dict. A decorr run records its arguments: arch, stem, data and image size come from there
unless given. Modes:
  linear  the linear evaluation of the paper (Liu, Suganuma and Okatani, NeurIPS 2022), which is
          that of Barlow Twins: frozen backbone in eval mode, linear layer trained with SGD
          (momentum 0.9, batch 256, weight decay 1e-6, cosine lr from 0.3, 100 epochs) on
          RandomResizedCrop + flip; val Resize + CenterCrop. DDP over the linear layer.
  fast    features extracted once (no augmentation), standardized, a linear layer trained on them
          with Adam. The default when the train features fit in memory (CIFAR, synthetic).
--knn K adds cosine k-NN top-1 (exp(sim / 0.07) votes) on the same cached features; K is capped
at the number of train images. An image of a folder that cannot be read is replaced by the next
readable one and named on stdout; the JSON counts them (unreadable_images).
The last line of stdout is one JSON object (top1, top5 in percent, ...); for a decorr folder it is
also appended to CKPT/eval.jsonl (safe beside a run, and beside another lineval.py). Each row records
its settings (mode, lr, wd, epochs, batch_size, img_size, limit, holdout) and the checkpoint's step
out of its run's last (step, run_last_step). "full": true marks the run's result: the checkpoint of
the run's last step, probed with the default settings on every image.
--random-init first estimates the untrained network's BatchNorm statistics (--bn-passes): a network
whose statistics were never estimated is a floor too low.
"""

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2

from config import ARCHS, PROFILES, HelpFormatter, Parser, profile_name
from data import MEAN, STD, Folder, UsageError, batches, eval_transform, load_data
from decorr import append_jsonl, build_backbone, knn_predict, load_checkpoint

FAST_MAX_BYTES = 4 << 30  # --mode fast by default (one process) when the train features fit
CHECKPOINT_HINT = "give a decorr --out folder, its checkpoint.pt or backbone.pt, or a ResNet state_dict"


def parse_args(argv=None):
    p = Parser(
        description=__doc__.split("\n\n")[0].strip(),
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=HelpFormatter,
    )
    a = p.add_argument
    a("ckpt", nargs="?", help="decorr folder, checkpoint.pt, backbone.pt or torchvision state_dict")
    a("--mode", choices=("linear", "fast"), default=None, help="default: fast when features fit in memory")
    a(
        "--knn",
        type=int,
        nargs="?",
        const=20,
        default=0,
        metavar="K",
        help="also k-NN top-1 (K: 20); after CKPT",
    )
    a("--random-init", action="store_true", help="evaluate an untrained backbone (seeded) instead")
    a(
        "--bn-passes",
        type=int,
        default=None,
        help="--random-init: first estimate BatchNorm's statistics with N train-mode passes over augmented "
        "training batches, no update (default 12; 0: the init's mean 0, variance 1)",
    )
    a(
        "--holdout",
        type=int,
        default=0,
        metavar="N",
        help="evaluate on N training images held out from the probe (fixed draw), not on the val set: "
        "for choosing hyper-parameters",
    )
    a("--data", default=None, help="synthetic | cifar10 | cifar100 | PATH (default: the run's)")
    a("--data-root", default=None, help="where cifar10/cifar100 are (default: the run's, else data)")
    a("--arch", default=None, help=f"{' | '.join(ARCHS)} (default: the checkpoint's)")
    a("--img-size", type=int, default=None, help="crop size (default: the run's)")
    a("--epochs", type=int, default=100, help="linear mode epochs")
    a("--fast-epochs", type=int, default=100, help="fast mode epochs over the cached features")
    a("--batch-size", type=int, default=256, help="global batch, over all processes")
    a("--lr", type=float, default=None, help="default: 0.3 (SGD, linear mode), 1e-3 (Adam, fast mode)")
    a("--wd", type=float, default=1e-6, help="weight decay of the linear layer")
    a(
        "--amp",
        choices=("bf16", "none"),
        default=None,
        help="backbone autocast (default: bf16 where supported)",
    )
    a("--workers", type=int, default=None, help="data loader processes per device")
    a("--limit", type=int, default=0, help="use at most N images of each split, evenly spaced (quick checks)")
    a(
        "--seed",
        type=int,
        default=0,
        help="the probe's initialisation and order; --random-init: the network's",
    )
    args = p.parse_args(argv)
    if args.ckpt is None and not args.random_init:
        raise UsageError(
            "give a checkpoint (a decorr --out folder, its backbone.pt or checkpoint.pt), or --random-init"
        )
    if args.arch is not None and args.arch not in ARCHS:
        raise UsageError(f"unknown --arch {args.arch!r}; choose one of {', '.join(ARCHS)}")
    if args.bn_passes is not None and not args.random_init:
        raise UsageError("--bn-passes is for --random-init (a trained backbone has its statistics)")
    if args.random_init and args.bn_passes is None:
        args.bn_passes = 12
    check_numbers(args)
    return args


# the numeric flags and their lowest values (the lr is positive, the weight decay may be 0)
LOWEST = dict(epochs=1, fast_epochs=1, batch_size=1, img_size=1, knn=0, limit=0, bn_passes=0, holdout=0)
LOWEST.update(workers=0, wd=0.0)


def check_numbers(args):
    """Every numeric flag finite and in its range, before anything is read or written."""
    for name, low in LOWEST.items():
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value >= low):
            raise UsageError(f"--{name.replace('_', '-')} must be a number >= {low}, got {value}")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise UsageError(f"--lr must be a positive number, got {args.lr}")


def default_protocol(args, run):
    """Whether the probe's settings are the defaults (the lr of the mode's, the run's image size, every
    image of the data): only then can a row be the run's result."""
    parser_defaults = parse_args(["--random-init"])
    same = all(getattr(args, name) == getattr(parser_defaults, name) for name in ("wd", "batch_size"))
    if args.mode == "linear":
        same = same and args.epochs == parser_defaults.epochs
    else:
        same = same and args.fast_epochs == parser_defaults.fast_epochs
    return (
        same
        and not args.lr_given
        and not args.limit
        and not args.holdout
        and args.img_size == run.get("img_size")
    )


def last_step(run, n_train):
    """The last step of a decorr run's schedule (its epochs of the full training set), or None."""
    if not run.get("epochs") or not run.get("batch_size"):
        return None
    return run["epochs"] * (n_train // run["batch_size"])


def default_amp(cuda):
    """bf16 where the device supports it, else none."""
    if cuda:
        supported = torch.cuda.is_bf16_supported()
    else:
        supported = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return "bf16" if supported else "none"


def default_workers():
    """As decorr.py: the CPUs of this process's share less one, at most 10."""
    processes_here = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(0, min(10, (os.cpu_count() or 1) // processes_here - 1))


# ----------------------------------------------------------------------------- checkpoints


def find_checkpoint(path):
    """(the file to read, the decorr output folder or None) for a file or a decorr output folder."""
    if os.path.isdir(path):
        for name in ("checkpoint.pt", "backbone.pt"):
            file = os.path.join(path, name)
            if os.path.exists(file):
                return file, path
        raise UsageError(f"{path} has neither checkpoint.pt nor backbone.pt: not a decorr output folder")
    if not os.path.exists(path):
        raise UsageError(f"checkpoint {path!r}: no such file or folder")
    return path, None


def load(file):
    """What file holds, by decorr.load_checkpoint (tensors and plain Python values only)."""
    return load_checkpoint(file, advice=CHECKPOINT_HINT)


def run_settings(saved):
    """The arguments a decorr run recorded in its checkpoint, else {}."""
    if isinstance(saved, dict) and isinstance(saved.get("args"), dict):
        return saved["args"]
    return {}


def read_checkpoint(path):
    """Returns (backbone state_dict, the run's recorded args, its step, the file read, the decorr
    folder or None)."""
    file, folder = find_checkpoint(path)
    saved = load(file)
    run = run_settings(saved)
    step = saved.get("step") if run else None
    sibling = os.path.join(os.path.dirname(file), "checkpoint.pt")
    if not run and os.path.basename(file) == "backbone.pt" and os.path.exists(sibling):
        run = run_settings(load(sibling))  # a decorr backbone.pt: the run's settings
    return backbone_weights(saved, file), run, step, file, folder


def backbone_weights(saved, file):
    """The ResNet weights in what a checkpoint file holds (a decorr checkpoint, a state_dict plain or
    wrapped), without DDP's and torch.compile's prefixes, decorr's projector and predictor, or fc."""
    weights = saved
    for key in ("model", "state_dict"):  # decorr checkpoint, common wrappers
        if isinstance(weights, dict) and isinstance(weights.get(key), dict):
            weights = weights[key]
    if not is_state_dict(weights):
        raise UsageError(
            f"{file} holds a {type(saved).__name__}, not a state_dict or a decorr checkpoint; "
            f"{CHECKPOINT_HINT}"
        )
    state = {}
    for key, value in weights.items():
        for prefix in ("module.", "_orig_mod."):
            key = key.removeprefix(prefix)
        state[key] = value
    if any(key.startswith("backbone.") for key in state):  # a decorr model: keep the backbone
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    state = {key: value for key, value in state.items() if not key.startswith("fc.")}
    conv1 = state.get("conv1.weight")
    if conv1 is None or conv1.dim() != 4:
        raise UsageError(f"{file} holds no ResNet weights (no 4-d conv1.weight); {CHECKPOINT_HINT}")
    return state


def is_state_dict(obj):
    if not isinstance(obj, dict):
        return False
    return all(isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in obj.items())


def guess_arch(state):
    """The torchvision ResNet whose keys state has."""
    if "layer1.0.conv3.weight" in state:  # bottleneck blocks
        return "resnet50"
    if "layer3.5.conv1.weight" in state:  # six blocks in layer3
        return "resnet34"
    return "resnet18"


def load_weights(net, state, arch, small, path):
    reference = net.state_dict()
    missing = [key for key in reference if key not in state]
    unexpected = [key for key in state if key not in reference]
    misshaped = [key for key in reference if key in state and state[key].shape != reference[key].shape]
    if missing or unexpected or misshaped:
        stem = " (CIFAR stem)" if small else ""
        example = (misshaped + missing + unexpected)[0]
        raise UsageError(
            f"{path} does not fit {arch}{stem}: {len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(misshaped)} mis-shaped keys, e.g. {example!r}; its keys look like {guess_arch(state)}: "
            f"give the right --arch, or a checkpoint of a ResNet"
        )
    net.load_state_dict(state)


# ----------------------------------------------------------------------------- data


class Mapped(torch.utils.data.Dataset):
    """(transform(image), label, the unreadable paths replaced by it, joined by newlines) per item."""

    def __init__(self, base, transform):
        self.base = base
        self.transform = transform

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        image, label, unreadable = read_item(self.base, i)
        return self.transform(image), label, "\n".join(unreadable)


def read_item(ds, i):
    """(image, label, unreadable paths) of item i of a Folder, a TensorDataset or a Subset of one. A
    Folder replaces an image that it cannot read by the next one that it can."""
    if isinstance(ds, torch.utils.data.Subset):
        return read_item(ds.dataset, ds.indices[i])
    if isinstance(ds, Folder):
        return ds.read(i)
    image, label = ds[i]
    return image, label, []


class Unreadable:
    """The images replaced because they could not be read: each named on stdout when first met, as
    decorr.py does."""

    def __init__(self):
        self.paths = set()

    def add(self, batch):
        """batch: the third field of a batch of Mapped items."""
        for joined in batch:
            for path in joined.split("\n"):
                if path and path not in self.paths:
                    self.paths.add(path)
                    print(
                        f"lineval.py: cannot read image {path}: replaced by the next readable one "
                        "(JSON: unreadable_images)",
                        flush=True,
                    )


def evenly(ds, n):
    """At most n items of ds, evenly spaced (ImageFolders are sorted by class: all classes stay)."""
    if not n or n >= len(ds):
        return ds
    return torch.utils.data.Subset(ds, [i * len(ds) // n for i in range(n)])


def hold_out(train, n):
    """(the probe's train, held out): n training images drawn with a fixed seed are held out."""
    if n >= len(train):
        raise UsageError(f"--holdout {n} leaves none of the {len(train)} train images to train on")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    kept = torch.utils.data.Subset(train, sorted(order[n:].tolist()))
    held = torch.utils.data.Subset(train, sorted(order[:n].tolist()))
    return kept, held


@torch.no_grad()
def estimate_batchnorm(net, train, passes, args, small, device, amp, world):
    """--random-init: BatchNorm's running statistics, which no step has estimated (mean 0, variance 1),
    become the mean over `passes` train-mode forward passes of batches of the first views of
    decorr.py's augmentation (the images a run's statistics come from). No weight changes."""
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative mean over the passes
    batch_size = min(args.batch_size, len(train))
    settings = argparse.Namespace(seed=args.seed, batch_size=batch_size, img_size=args.img_size)
    settings.workers = args.workers
    net.train()
    for x1, _, _ in batches(train, small, settings, device, 0, passes):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            net(x1)
    net.eval()
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    if world > 1:  # the same network on every process
        for buffer in net.buffers():
            dist.broadcast(buffer, 0)


def transforms(size, small):
    """(train, val): RandomResizedCrop + flip; Resize(size * 256/224) + CenterCrop for large images,
    a resize to the crop size (usually none) for small ones."""
    train = v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(size, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(MEAN, STD),
        ]
    )
    val = eval_transform(size, small)
    if small:
        val = v2.Compose([v2.ToImage(), v2.Resize(size, antialias=True), val])
    return train, val


# ----------------------------------------------------------------------------- the probes


@torch.no_grad()
def extract(net, ds, batch_size, workers, device, amp, unreadable):
    """Features (float32, CPU) and labels of every item of ds (Mapped), in order."""
    loader = torch.utils.data.DataLoader(
        ds, batch_size, num_workers=workers, pin_memory=device.type == "cuda"
    )
    features = []
    labels = []
    for x, y, paths in loader:
        unreadable.add(paths)
        x = x.to(device, non_blocking=True, memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            features.append(net(x).float().cpu())
        labels.append(y)
    return torch.cat(features), torch.cat(labels)


def fit_linear(x, y, num_classes, epochs=100, lr=1e-3, wd=1e-6, batch_size=256, seed=0):
    """Multinomial logistic regression on the standardized features x (n x d, train mean and std),
    Adam with a cosine lr, mini-batches. Returns an nn.Linear on the raw features (the
    standardization folded in). Dimensions constant on the train set are ignored."""
    x = x.float()
    y = y.to(x.device)
    mean = x.mean(0)
    std = x.std(0)
    std = torch.where(std > 1e-6 * std.max().clamp_min(1e-30), std, torch.inf)
    z = (x - mean) / std
    generator = torch.Generator().manual_seed(seed)
    head = nn.Linear(x.shape[1], num_classes).to(x.device)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.01)
        head.bias.zero_()
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=wd)
    steps_per_epoch = math.ceil(len(x) / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator).to(x.device)
        for i in range(0, len(x), batch_size):
            idx = order[i : i + batch_size]
            loss = F.cross_entropy(head(z[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
    with torch.no_grad():  # W (x - m) / s + b = (W / s) x + b - (W / s) m
        head.weight.div_(std)
        head.bias.sub_(head.weight @ mean)
    return head


def topk_correct(logits, y, ks=(1, 5)):
    """Number of rows whose label is among the k highest logits, for each k."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hit = top == y.view(-1, 1)
    return [hit[:, :k].any(1).sum().item() for k in ks]


def knn_top1(bank, bank_y, query, query_y, num_classes, k, chunk=1024):
    correct = 0
    for i in range(0, len(query), chunk):  # a query x bank matrix per chunk
        pred = knn_predict(bank, bank_y, query[i : i + chunk], num_classes, k)
        correct += (pred == query_y[i : i + chunk]).sum().item()
    return 100.0 * correct / len(query)


# ----------------------------------------------------------------------------- linear mode (paper)


def all_sum(values, device, world):
    """The sums of values over the processes."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(t)
    return t.tolist()


def frozen_features(net, x, device, amp):
    x = x.to(device, non_blocking=True, memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        return net(x).float()


def linear_eval(net, dim, train, val, num_classes, args, device, amp, rank, world, say, unreadable):
    """SGD on a linear layer over the frozen backbone (eval mode), DDP over the linear layer;
    val accuracy after every epoch, the last one reported."""
    torch.manual_seed(args.seed)
    head = nn.Linear(dim, num_classes).to(device)
    head.weight.data.normal_(0, 0.01)
    head.bias.data.zero_()
    torch.manual_seed(args.seed + rank)  # augmentations differ across processes
    model = head
    if world > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(head, device_ids=device_ids)
    lr0 = args.lr
    opt = torch.optim.SGD(model.parameters(), lr=lr0, momentum=0.9, weight_decay=args.wd)
    local_batch = args.batch_size // world
    sampler = torch.utils.data.DistributedSampler(train, world, rank, shuffle=True, seed=args.seed)
    pin = device.type == "cuda"
    train_loader = torch.utils.data.DataLoader(
        train,
        local_batch,
        sampler=sampler,
        num_workers=args.workers,
        pin_memory=pin,
        drop_last=False,
        persistent_workers=args.workers > 0,
    )
    val_loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(val, range(rank, len(val), world)),
        local_batch,
        num_workers=args.workers,
        pin_memory=pin,
    )
    total = args.epochs * len(train_loader)
    step = 0
    for epoch in range(args.epochs):
        t0 = time.time()
        sampler.set_epoch(epoch)
        model.train()
        loss_sum = 0.0
        correct = 0
        seen = 0
        for x, y, paths in train_loader:
            unreadable.add(paths)
            lr = lr0 * 0.5 * (1 + math.cos(math.pi * step / total))
            for group in opt.param_groups:
                group["lr"] = lr
            y = y.to(device, non_blocking=True)
            logits = model(frozen_features(net, x, device, amp))
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
        loss_sum, correct, seen = all_sum([loss_sum, correct, seen], device, world)
        model.eval()
        hits = [0, 0, 0]
        with torch.no_grad():
            for x, y, paths in val_loader:
                unreadable.add(paths)
                c1, c5 = topk_correct(head(frozen_features(net, x, device, amp)), y.to(device))
                hits = [hits[0] + c1, hits[1] + c5, hits[2] + len(y)]
        c1, c5, n = all_sum(hits, device, world)
        top1 = 100.0 * c1 / n
        top5 = 100.0 * c5 / n
        say(
            f"epoch {epoch + 1}/{args.epochs} | loss {loss_sum / seen:.4f} | "
            f"train top1 {100.0 * correct / seen:.2f} | val top1 {top1:.2f} top5 {top5:.2f} | "
            f"lr {lr:.4f} | {seen / (time.time() - t0):.0f} img/s"
        )
    return top1, top5


# ----------------------------------------------------------------------------- main


def fill_in_settings(args, run, state):
    """Data, data root, arch and image size: the command line's, else the run's, else the data's
    defaults in config.PROFILES (the arch: that of the weights). Returns whether the backbone has
    the CIFAR stem (the weights', else that of decorr.py for the image size)."""
    args.data = args.data or run.get("data") or "synthetic"
    args.data_root = args.data_root or run.get("data_root") or "data"
    profile = PROFILES[profile_name(args.data)]
    args.img_size = args.img_size or run.get("img_size") or profile["img_size"]
    if state is None:
        args.arch = args.arch or run.get("arch") or profile["arch"]
        return args.img_size <= 64
    args.arch = args.arch or run.get("arch") or guess_arch(state)
    return state["conv1.weight"].shape[-1] == 3


def quiet(*args, **kwargs):
    pass


def main(argv=None):
    args = parse_args(argv)
    t_start = time.time()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cuda = torch.cuda.is_available()
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    else:
        device = torch.device("cpu")
    if args.amp is None:
        args.amp = default_amp(cuda)
    if args.workers is None:
        args.workers = default_workers()
    say = print if rank == 0 else quiet

    # what to evaluate: weights and the run's settings, then command-line overrides
    if args.ckpt:
        state, run, step, file, folder = read_checkpoint(args.ckpt)
    else:
        state, run, step, file, folder = None, {}, None, None, None
    small_stem = fill_in_settings(args, run, state)

    torch.manual_seed(args.seed)  # --random-init: decorr's step-0 backbone
    net, dim = build_backbone(args.arch, small_stem)
    if args.random_init:
        step = None
    else:
        load_weights(net, state, args.arch, small_stem, file)
    del state
    train, val, num_classes, small = load_data(args.data, args.data_root)
    run_last_step = last_step(run, len(train))
    train = evenly(train, args.limit)
    val = evenly(val, args.limit)
    augmented = train
    if args.holdout:
        train, val = hold_out(train, args.holdout)
    if args.mode is None:
        fits = world == 1 and len(train) * dim * 4 <= FAST_MAX_BYTES
        args.mode = "fast" if fits else "linear"
    args.lr_given = args.lr is not None
    if args.lr is None:  # SGD on augmented images, Adam on cached features
        args.lr = 0.3 if args.mode == "linear" else 1e-3
    if world > 1 and (args.mode == "fast" or args.knn):
        raise UsageError("--mode fast and --knn run in one process: use python, not torchrun")
    if args.batch_size % world:
        raise UsageError(f"--batch-size {args.batch_size} does not split over {world} processes")
    knn = min(args.knn, len(train))
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
        if cuda:
            torch.cuda.set_device(device)
    net = net.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)
    amp = args.amp == "bf16"
    if args.random_init and args.bn_passes:
        estimate_batchnorm(net, augmented, args.bn_passes, args, small, device, amp, world)
    stem = " (CIFAR stem)" if small_stem else ""
    if args.random_init:
        source = f"random init (seed {args.seed}, BatchNorm statistics of {args.bn_passes} passes)"
    else:
        source = f"from {file}"
    at_step = "" if step is None else f" step {step}"
    say(
        f"lineval | {args.arch}{stem} {source}{at_step} | {args.data}: {len(train)} train, {len(val)} "
        f"{'held-out train' if args.holdout else 'val'}, "
        f"{num_classes} classes, {args.img_size} px | mode {args.mode} | {world} x {device.type} | "
        f"amp {args.amp}"
    )

    if knn < args.knn:
        say(f"note: --knn {args.knn} is more than the {len(train)} train images: k = {knn}")
    train_transform, val_transform = transforms(args.img_size, small)
    unreadable = Unreadable()
    result = dict(mode=args.mode)
    if args.mode == "linear":
        result["top1"], result["top5"] = linear_eval(
            net,
            dim,
            Mapped(train, train_transform),
            Mapped(val, val_transform),
            num_classes,
            args,
            device,
            amp,
            rank,
            world,
            say,
            unreadable,
        )
        result["epochs"] = args.epochs
    if args.mode == "fast" or knn:
        t0 = time.time()
        features = []
        for split in (train, val):
            ds = Mapped(split, val_transform)
            features.append(extract(net, ds, args.batch_size, args.workers, device, amp, unreadable))
        (xt, yt), (xv, yv) = features
        say(f"features: train {tuple(xt.shape)}, val {tuple(xv.shape)} in {time.time() - t0:.1f} s")
    if args.mode == "fast":
        head = fit_linear(
            xt.to(device), yt, num_classes, args.fast_epochs, args.lr, args.wd, args.batch_size, args.seed
        )
        with torch.no_grad():
            c1, c5 = topk_correct(head(xv.to(device)), yv.to(device))
        result.update(top1=100.0 * c1 / len(yv), top5=100.0 * c5 / len(yv), epochs=args.fast_epochs)
    if knn:
        result.update(knn_top1=knn_top1(xt, yt, xv, yv, num_classes, knn), knn_k=knn)
    paths = sorted(unreadable.paths)
    if world > 1:  # each process met its own
        gathered = [None] * world
        dist.all_gather_object(gathered, paths)
        paths = sorted(set().union(*gathered))
    final = step is not None and step == run_last_step
    result.update(
        lr=args.lr,
        wd=args.wd,
        batch_size=args.batch_size,
        ckpt=file or None,
        step=step,
        run_last_step=run_last_step,
        random_init=args.random_init,
        bn_passes=args.bn_passes,
        limit=args.limit,
        holdout=args.holdout,
        full=not args.random_init and final and default_protocol(args, run),
        arch=args.arch,
        small_stem=small_stem,
        data=args.data,
        img_size=args.img_size,
        n_train=len(train),
        n_val=len(val),
        unreadable_images=len(paths),
        seed=args.seed,
        seconds=round(time.time() - t_start, 1),
    )
    if rank == 0:
        if folder:
            append_jsonl(os.path.join(folder, "eval.jsonl"), result)
        print(json.dumps(result), flush=True)
    if world > 1:
        dist.barrier()


def cli(argv=None):
    """main() with bad input reported as one line on stderr and exit code 2."""
    try:
        main(argv)
    except UsageError as e:
        lines = str(e).strip().splitlines()
        message = lines[-1] if lines else "bad input"
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"lineval.py: error: {message}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    cli()
