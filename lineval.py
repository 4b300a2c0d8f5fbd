"""
lineval.py -- how good is a decorr backbone? A linear classifier on its frozen features.

    python decorr.py && python lineval.py out              # synthetic data: fast probe, ~30 s on a CPU
    python lineval.py out --data cifar10 --knn             # CIFAR-10: fast probe and 20-NN
    python lineval.py --random-init --arch resnet18 --data cifar10      # the baseline
    torchrun --nproc_per_node=8 lineval.py out --data /imagenet --mode linear   # the paper's protocol

CKPT is a decorr output folder, its checkpoint.pt or backbone.pt, or a torchvision ResNet
state_dict. A decorr run records its arguments: arch, stem, data and image size come from there
unless given. Modes:
  linear  the paper's protocol (NOTES.md): frozen backbone in eval mode, linear layer trained with
          SGD (momentum 0.9, batch 256, weight decay 1e-6, cosine lr from 0.3, 100 epochs) on
          RandomResizedCrop + flip; val Resize + CenterCrop. DDP over the linear layer.
  fast    features extracted once (no augmentation), standardized, a linear layer trained on them
          with Adam. The default when the train features fit in memory (CIFAR, synthetic).
--knn K adds cosine k-NN top-1 (exp(sim / 0.07) votes) on the same cached features.
The last line of stdout is one JSON object (top1, top5 in percent, ...); for a decorr folder it is
also appended to CKPT/eval.jsonl.
"""

import argparse
import json
import math
import os
import sys
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2

from data import MEAN, STD, UsageError, eval_transform, load_data
from decorr import ARCHS, PROFILES, Parser, append_jsonl, build_backbone, knn_predict

FAST_MAX_BYTES = 4 << 30  # --mode fast by default (one process) when the train features fit


def parse_args(argv=None):
    p = Parser(
        description=__doc__.split("\n\n")[0].strip(),
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    a("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.ckpt is None and not args.random_init:
        raise UsageError(
            "give a checkpoint (a decorr --out folder, its backbone.pt or checkpoint.pt), or --random-init"
        )
    if args.arch is not None and args.arch not in ARCHS:
        raise UsageError(f"unknown --arch {args.arch!r}; choose one of {', '.join(ARCHS)}")
    for k, low in dict(epochs=1, fast_epochs=1, batch_size=1, img_size=1, knn=0, limit=0).items():
        if getattr(args, k) is not None and getattr(args, k) < low:
            raise UsageError(f"--{k.replace('_', '-')} must be at least {low}, got {getattr(args, k)}")
    return args


# ----------------------------------------------------------------------------- checkpoints


def read_checkpoint(path):
    """Returns (backbone state_dict, the run's recorded args, its step, the file read, the decorr
    folder or None)."""
    folder = path if os.path.isdir(path) else None
    if folder:
        names = [n for n in ("checkpoint.pt", "backbone.pt") if os.path.exists(os.path.join(path, n))]
        if not names:
            raise UsageError(f"{path} has neither checkpoint.pt nor backbone.pt: not a decorr output folder")
        path = os.path.join(path, names[0])
    elif not os.path.exists(path):
        raise UsageError(f"checkpoint {path!r}: no such file or folder")
    obj = torch_load(path)
    run = obj.get("args", {}) if isinstance(obj, dict) else {}
    step = obj.get("step") if isinstance(obj, dict) and run else None
    sibling = os.path.join(os.path.dirname(path), "checkpoint.pt")
    if not run and os.path.basename(path) == "backbone.pt" and os.path.exists(sibling):
        meta = torch_load(sibling)  # a decorr backbone.pt: the run's settings
        run = meta.get("args", {}) if isinstance(meta, dict) else {}
    for key in ("model", "state_dict"):  # decorr checkpoint, common wrappers
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UsageError(f"{path} is not a state_dict or a decorr checkpoint")
    sd = {}
    for k, v in obj.items():
        for prefix in ("module.", "_orig_mod."):
            k = k.removeprefix(prefix)
        sd[k] = v
    if any(k.startswith("backbone.") for k in sd):  # decorr model: keep the backbone
        sd = {k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")}
    sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    if "conv1.weight" not in sd:
        raise UsageError(f"{path} holds no ResNet weights (no conv1.weight)")
    return sd, run, step, path, folder


def torch_load(path):
    """torch.load(weights_only=True), memory-mapped where the file allows (only what is used is read)."""
    with warnings.catch_warnings(action="ignore"):
        for mmap in (True, False):  # mmap needs torch.save's zip format
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except Exception as e:
                err = str(e)
    why = err.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()[0].split(". ")[0][:120]
    raise UsageError(f"{path} is not a checkpoint of plain tensors saved by torch.save ({why})")


def guess_arch(sd):
    return (
        "resnet50"
        if "layer1.0.conv3.weight" in sd
        else "resnet34"
        if "layer3.5.conv1.weight" in sd
        else "resnet18"
    )


def load_weights(net, sd, arch, small, path):
    ref = net.state_dict()
    missing = [k for k in ref if k not in sd]
    unexpected = [k for k in sd if k not in ref]
    shape = [k for k in ref if k in sd and sd[k].shape != ref[k].shape]
    if missing or unexpected or shape:
        raise UsageError(
            f"{path} does not fit {arch}{' (CIFAR stem)' if small else ''}: {len(missing)} "
            f"missing, {len(unexpected)} unexpected, {len(shape)} mis-shaped keys, e.g. "
            f"{(shape + missing + unexpected)[0]!r} (wrong --arch?)"
        )
    net.load_state_dict(sd)


# ----------------------------------------------------------------------------- data


class Mapped(torch.utils.data.Dataset):
    def __init__(self, base, transform):
        self.base, self.transform = base, transform

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return self.transform(x), y


def evenly(ds, n):
    """At most n items of ds, evenly spaced (ImageFolders are sorted by class: all classes stay)."""
    if not n or n >= len(ds):
        return ds
    return torch.utils.data.Subset(ds, [i * len(ds) // n for i in range(n)])


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


def check_labels(train, val, data):
    classes = [getattr(ds, "classes", None) for ds in (train, val)]
    if classes[0] != classes[1]:
        raise UsageError(
            f"--data {data!r}: the val classes differ from the train classes "
            f"({len(classes[1])} vs {len(classes[0])}): labels would not line up"
        )


# ----------------------------------------------------------------------------- the probes


@torch.no_grad()
def extract(net, ds, batch_size, workers, device, amp):
    """Features (float32, CPU) and labels of every item of ds, in order."""
    loader = torch.utils.data.DataLoader(
        ds, batch_size, num_workers=workers, pin_memory=device.type == "cuda"
    )
    feats, labels = [], []
    for x, y in loader:
        x = x.to(device, non_blocking=True, memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            feats.append(net(x).float().cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def fit_linear(x, y, num_classes, epochs=100, lr=1e-3, wd=1e-6, batch_size=256, seed=0):
    """Multinomial logistic regression on the standardized features x (n x d, train mean and std),
    Adam with a cosine lr, mini-batches. Returns an nn.Linear on the raw features (the
    standardization folded in). Dimensions constant on the train set are ignored."""
    x, y = x.float(), y.to(x.device)
    mean, std = x.mean(0), x.std(0)
    std = torch.where(std > 1e-6 * std.max().clamp_min(1e-30), std, torch.inf)
    z = (x - mean) / std
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(x.shape[1], num_classes).to(x.device)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.01)
        head.bias.zero_()
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=wd)
    steps_per_epoch = math.ceil(len(x) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g).to(x.device)
        for i in range(0, len(x), batch_size):
            idx = perm[i : i + batch_size]
            loss = F.cross_entropy(head(z[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
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


def linear_eval(net, dim, train, val, num_classes, args, device, amp, rank, world, say):
    """SGD on a linear layer over the frozen backbone (eval mode), DDP over the linear layer;
    val accuracy after every epoch, the last one reported."""
    torch.manual_seed(args.seed)
    head = nn.Linear(dim, num_classes).to(device)
    head.weight.data.normal_(0, 0.01)
    head.bias.data.zero_()
    torch.manual_seed(args.seed + rank)  # augmentations differ across processes
    model = (
        nn.parallel.DistributedDataParallel(
            head, device_ids=[device.index] if device.type == "cuda" else None
        )
        if world > 1
        else head
    )
    lr0 = 0.3 if args.lr is None else args.lr
    opt = torch.optim.SGD(model.parameters(), lr=lr0, momentum=0.9, weight_decay=args.wd)
    local_b = args.batch_size // world
    sampler = torch.utils.data.DistributedSampler(train, world, rank, shuffle=True, seed=args.seed)
    pin = device.type == "cuda"
    train_loader = torch.utils.data.DataLoader(
        train,
        local_b,
        sampler=sampler,
        num_workers=args.workers,
        pin_memory=pin,
        drop_last=False,
        persistent_workers=args.workers > 0,
    )
    val_loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(val, range(rank, len(val), world)),
        local_b,
        num_workers=args.workers,
        pin_memory=pin,
    )
    total, step = args.epochs * len(train_loader), 0

    def features(x):
        x = x.to(device, non_blocking=True, memory_format=torch.channels_last)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            return net(x).float()

    def all_sum(*v):
        t = torch.tensor(v, dtype=torch.float64, device=device)
        if world > 1:
            dist.all_reduce(t)
        return t.tolist()

    for epoch in range(args.epochs):
        t0 = time.time()
        sampler.set_epoch(epoch)
        model.train()
        loss_sum = correct = seen = 0
        for x, y in train_loader:
            lr = lr0 * 0.5 * (1 + math.cos(math.pi * step / total))
            for g in opt.param_groups:
                g["lr"] = lr
            y = y.to(device, non_blocking=True)
            logits = model(features(x))
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
        loss_sum, correct, seen = all_sum(loss_sum, correct, seen)
        model.eval()
        hits = [0, 0, 0]
        with torch.no_grad():
            for x, y in val_loader:
                c1, c5 = topk_correct(head(features(x)), y.to(device))
                hits = [hits[0] + c1, hits[1] + c5, hits[2] + len(y)]
        c1, c5, n = all_sum(*hits)
        top1, top5 = 100.0 * c1 / n, 100.0 * c5 / n
        say(
            f"epoch {epoch + 1}/{args.epochs} | loss {loss_sum / seen:.4f} | train top1 {100.0 * correct / seen:.2f} "
            f"| val top1 {top1:.2f} top5 {top5:.2f} | lr {lr:.4f} | {seen / (time.time() - t0):.0f} img/s"
        )
    return top1, top5


# ----------------------------------------------------------------------------- main


def main(argv=None):
    args = parse_args(argv)
    t_start = time.time()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if args.amp is None:
        bf16 = (
            torch.cuda.is_bf16_supported()
            if cuda
            else getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        )
        args.amp = "bf16" if bf16 else "none"
    if args.workers is None:
        args.workers = max(
            0, min(10, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1)
        )
    say = print if rank == 0 else (lambda *a, **k: None)

    # what to evaluate: weights and the run's settings, then command-line overrides
    sd, run, step, file, folder = read_checkpoint(args.ckpt) if args.ckpt else (None, {}, None, None, None)
    args.data = args.data or run.get("data") or "synthetic"
    args.data_root = args.data_root or run.get("data_root") or "data"
    profile = PROFILES[
        "synthetic"
        if args.data == "synthetic"
        else "cifar"
        if args.data in ("cifar10", "cifar100")
        else "folder"
    ]
    args.arch = args.arch or run.get("arch") or (guess_arch(sd) if sd is not None else profile["arch"])
    args.img_size = args.img_size or run.get("img_size") or profile["img_size"]
    small_stem = sd["conv1.weight"].shape[-1] == 3 if sd is not None else args.img_size <= 64

    torch.manual_seed(args.seed)  # --random-init: decorr's step-0 backbone
    net, dim = build_backbone(args.arch, small_stem)
    if not args.random_init:
        load_weights(net, sd, args.arch, small_stem, file)
    del sd
    step = None if args.random_init else step
    train, val, num_classes, small = load_data(args.data, args.data_root)
    check_labels(train, val, args.data)
    train, val = evenly(train, args.limit), evenly(val, args.limit)
    if args.mode is None:
        args.mode = "fast" if world == 1 and len(train) * dim * 4 <= FAST_MAX_BYTES else "linear"
    if world > 1 and (args.mode == "fast" or args.knn):
        raise UsageError("--mode fast and --knn run in one process: use python, not torchrun")
    if args.batch_size % world:
        raise UsageError(f"--batch-size {args.batch_size} does not split over {world} processes")
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
        if cuda:
            torch.cuda.set_device(device)
    net = net.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)
    amp = args.amp == "bf16"
    stem = " (CIFAR stem)" if small_stem else ""
    say(
        f"lineval | {args.arch}{stem} {'random init (seed ' + str(args.seed) + ')' if args.random_init else 'from ' + file}"
        f"{'' if step is None else f' step {step}'} | {args.data}: {len(train)} train, {len(val)} val, "
        f"{num_classes} classes, {args.img_size} px | mode {args.mode} | {world} x {device.type} | amp {args.amp}"
    )

    train_tf, val_tf = transforms(args.img_size, small)
    result = dict(mode=args.mode)
    if args.mode == "linear":
        result["top1"], result["top5"] = linear_eval(
            net,
            dim,
            Mapped(train, train_tf),
            Mapped(val, val_tf),
            num_classes,
            args,
            device,
            amp,
            rank,
            world,
            say,
        )
        result["epochs"] = args.epochs
    if args.mode == "fast" or args.knn:
        t0 = time.time()
        xt, yt = extract(net, Mapped(train, val_tf), args.batch_size, args.workers, device, amp)
        xv, yv = extract(net, Mapped(val, val_tf), args.batch_size, args.workers, device, amp)
        say(f"features: train {tuple(xt.shape)}, val {tuple(xv.shape)} in {time.time() - t0:.1f} s")
    if args.mode == "fast":
        head = fit_linear(
            xt.to(device),
            yt,
            num_classes,
            args.fast_epochs,
            1e-3 if args.lr is None else args.lr,
            args.wd,
            args.batch_size,
            args.seed,
        )
        with torch.no_grad():
            c1, c5 = topk_correct(head(xv.to(device)), yv.to(device))
        result.update(top1=100.0 * c1 / len(yv), top5=100.0 * c5 / len(yv), epochs=args.fast_epochs)
    if args.knn:
        result.update(knn_top1=knn_top1(xt, yt, xv, yv, num_classes, args.knn), knn_k=args.knn)
    result.update(
        ckpt=file or None,
        step=step,
        random_init=args.random_init,
        arch=args.arch,
        small_stem=small_stem,
        data=args.data,
        img_size=args.img_size,
        n_train=len(train),
        n_val=len(val),
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
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else "bad input"
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"lineval.py: error: {msg}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    cli()
