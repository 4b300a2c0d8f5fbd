"""
data.py -- the images of a decorr run: the built-in synthetic textures, CIFAR-10/100 from torchvision's
files, image folders (the ImageNet layout), and the two augmented views of each image, made on batches
on the device (the BYOL / Barlow Twins pipeline, each image with its own parameters).

decorr.py calls load_data() once and batches() for the training loop; lineval.py uses load_data() and
eval_transform(). UsageError, rank_world and atomic_write, which every file uses, are defined here first.
"""

import fcntl
import hashlib
import itertools
import json
import math
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.utils.data import TensorDataset
from torchvision.transforms import v2


class UsageError(Exception):
    """Bad input: reported as one line on stderr, exit code 2."""


def rank_world():
    """(rank, number of processes); (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def atomic_write(path, write):
    """write(file) to a temporary file, fsync, rename over path: a crash leaves the old or the new file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    os.fsync(folder)
    os.close(folder)


def append_jsonl(path, row):
    """One whole line at the end of path, under an exclusive lock: lines of several writers never mix."""
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.write(json.dumps(row) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path):
    """The complete rows of a log; a last line cut by a crash is dropped."""
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        lines = fh.read().split("\n")
    return [json.loads(line) for line in lines if line.endswith("}")]


# The --out folder of a run is held by it for as long as it lives: an OS lock (flock) on the folder
# itself, which the OS releases when the process ends, however it ends. No file is written for it; the
# holder's pid is read back from the kernel's table of locks (/proc/locks).
HELD = {}  # folder -> the open descriptor of the folder, locked by a run of this process


def lock_holder(folder):
    """The pid of the process that holds an flock on folder, from /proc/locks, or None."""
    status = os.stat(folder)
    key = f"{os.major(status.st_dev):02x}:{os.minor(status.st_dev):02x}:{status.st_ino}"
    try:
        with open("/proc/locks") as fh:
            table = fh.read().splitlines()
    except OSError:
        return None
    for line in table:
        fields = line.split()  # "1: FLOCK  ADVISORY  WRITE 1234 00:2a:5678 0 EOF"
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == key:
            return int(fields[4])
    return None


def program_of(pid):
    """The script a process runs (decorr.py), from its command line, or None."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            arguments = fh.read().decode(errors="replace").split("\0")
    except OSError:
        return None
    scripts = [os.path.basename(a) for a in arguments if a.endswith(".py")]
    return scripts[0] if scripts else None


def hold_folder(folder):
    """Lock folder (created if need be) for this process's run; a folder that another run holds is a
    UsageError naming its pid, and nothing is written. A lock this process kept from a run that
    ended with an exception (in-process use: tests, notebooks) is given up first."""
    folder = os.path.realpath(folder)
    release_folder(folder)
    os.makedirs(folder, exist_ok=True)
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        pid = lock_holder(folder)
        program = program_of(pid) if pid is not None else None
        raise UsageError(
            f"{folder} is in use by another run ({program or 'a program'}, pid {pid or 'unknown'}): wait "
            "for it to end, or use another --out"
        ) from None
    HELD[folder] = descriptor
    return descriptor


def release_folder(folder):
    descriptor = HELD.pop(os.path.realpath(folder), None)
    if descriptor is not None:
        os.close(descriptor)  # closing the descriptor releases the lock


SYNTH_TRAIN = 5000  # images of the built-in data
SYNTH_VAL = 1000
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def synthetic_images(n, seed, size=32):
    """10 classes of textures (stripes, checkerboards, rings, dots, spokes, grids, blobs), random
    scale, phase, centre, colours and noise: the class lives in the shape, which survives the
    augmentations; the colours, which a random network sees first, carry nothing. uint8, labels."""
    g = torch.Generator().manual_seed(seed)

    def uniform(*shape):
        return torch.rand(*shape, generator=g)

    labels = torch.randperm(n, generator=g) % 10
    t = torch.linspace(0, 1, size)
    yy, xx = [c.expand(n, size, size) for c in torch.meshgrid(t, t, indexing="ij")]
    phase = uniform(n, 1, 1) * 2 * math.pi
    cx = uniform(n, 1, 1)
    cy = uniform(n, 1, 1)
    r = torch.hypot(xx - cx, yy - cy)
    theta = torch.atan2(yy - cy, xx - cx)
    diag = torch.where(uniform(n, 1, 1) < 0.5, xx + yy, xx - yy) / math.sqrt(2)
    f = (2.5 + 3.5 * uniform(n, 1, 1)) * 2 * math.pi  # random frequency
    blobs = F.interpolate(torch.randn(n, 1, 4, 4, generator=g), size, mode="bicubic")[:, 0]
    spokes = torch.randint(3, 7, (n, 1, 1), generator=g)
    grid_lines = (torch.cos(f / 2 * xx + phase).abs() > 0.9) | (torch.cos(f / 2 * yy).abs() > 0.9)
    patterns = [
        torch.sin(f * yy + phase),  # horizontal stripes
        torch.sin(f * xx + phase),  # vertical stripes
        torch.sin(f * diag + phase),  # diagonal stripes
        torch.sign(torch.sin(f * xx + phase) * torch.sin(f * yy)),  # checkerboard
        torch.sign(torch.sin(f * (xx + yy) / 1.4) * torch.sin(f * (xx - yy) / 1.4 + phase)),  # diagonal one
        torch.sin(f * 1.5 * r + phase),  # rings
        (torch.cos(f * xx + phase) * torch.cos(f * yy) > 0.5).float() * 2 - 1,  # dots
        torch.sin(spokes * theta + phase),  # spokes
        grid_lines.float() * 2 - 1,  # grid
        torch.tanh(2 * blobs),  # blobs
    ]
    u = torch.stack(patterns)[labels, torch.arange(n)].unsqueeze(1)  # n x 1 x H x W in [-1, 1]
    c1 = uniform(n, 3, 1, 1)
    c2 = (c1 + 0.25 + 0.5 * uniform(n, 3, 1, 1)) % 1  # every channel differs
    noise = 0.08 * torch.randn(n, 3, size, size, generator=g)
    img = c1 * (1 + u) / 2 + c2 * (1 - u) / 2 + noise
    return (img.clamp(0, 1) * 255).round().to(torch.uint8), labels


class Folder(torch.utils.data.Dataset):
    """Image folders (root/<class>/<image>) of (PIL image, label). An image that cannot be decoded
    is replaced by the next one that can, the same every time; read(i) also names those skipped."""

    def __init__(self, root):
        try:
            scan = torchvision.datasets.ImageFolder(root, loader=str)
        except (FileNotFoundError, RuntimeError) as e:
            raise UsageError(f"--data {root!r}: {str(e).splitlines()[0]}") from None
        self.root = root
        self.samples = scan.samples
        self.classes = scan.classes
        self.read(0)  # at least one image must be readable

    def __len__(self):
        return len(self.samples)

    def read(self, i):
        """(image, label, the unreadable paths skipped to reach it)."""
        bad = []
        for k in range(len(self)):
            path, label = self.samples[(i + k) % len(self)]
            try:
                with open(path, "rb") as fh:
                    return Image.open(fh).convert("RGB"), label, bad
            except Exception:
                bad.append(path)
        raise UsageError(f"--data {self.root!r}: none of its {len(self)} images can be read")

    def __getitem__(self, key):
        """folder[i]: (image, label). folder[i, u, size]: the loader workers' part of training, both views
        cropped and flipped by uniforms u as torchvision does (bicubic, antialias), and the skipped paths."""
        if isinstance(key, int):
            return self.read(key)[:2]
        index, uniforms, size = key
        img, _, bad = self.read(index)
        x = v2.functional.pil_to_tensor(img)
        u = torch.tensor(uniforms, dtype=torch.float64)
        views = []
        for v, box in enumerate(crop_boxes(u, *x.shape[1:]).long().tolist()):
            view = v2.functional.resized_crop(x, *box, [size, size], v2.InterpolationMode.BICUBIC)
            if u[v, 22] < 0.5:  # flip p 0.5
                view = view.flip(-1)
            views.append(view)
        return views[0], views[1], "\n".join(bad)


def load_cifar(data, root):
    """CIFAR-10 or -100 from torchvision's files under root (never downloaded), in memory as uint8."""
    if data == "cifar10":
        dataset = torchvision.datasets.CIFAR10
    else:
        dataset = torchvision.datasets.CIFAR100
    try:  # torchvision checks the files' MD5 first
        splits = [dataset(root, train=train, download=False) for train in (True, False)]
    except RuntimeError:
        raise UsageError(
            f"{data} not found under --data-root {root!r}; download it there "
            f"once (torchvision.datasets.{dataset.__name__}(root, download=True))"
        ) from None
    sets = []
    for split in splits:
        images = torch.from_numpy(split.data).permute(0, 3, 1, 2).contiguous()
        sets.append(TensorDataset(images, torch.tensor(split.targets)))
    return sets[0], sets[1], len(sets[0].tensors[1].unique()), True


def load_data(data, root="data"):
    """(train, val, num_classes, small) for 'synthetic', 'cifar10', 'cifar100' (torchvision's files under
    root, never downloaded; in memory, uint8) or image folders PATH/{train,val}/<class>/<image>."""
    if data == "synthetic":
        train = TensorDataset(*synthetic_images(SYNTH_TRAIN, 0))
        val = TensorDataset(*synthetic_images(SYNTH_VAL, 1))
        return train, val, 10, True
    if data in ("cifar10", "cifar100"):
        return load_cifar(data, root)
    if not os.path.isdir(data):
        raise UsageError(f"--data {data!r}: no such directory (or use synthetic, cifar10, cifar100)")
    for split in ("train", "val"):  # both checked before any folder is scanned
        if not os.path.isdir(os.path.join(data, split)):
            raise UsageError(
                f"--data {data!r} has no {split}/ folder (ImageNet layout: {split}/<class>/<image>)"
            )
    train = Folder(os.path.join(data, "train"))
    val = Folder(os.path.join(data, "val"))
    if val.classes != train.classes:  # the k-NN monitor and the probe compare labels across the two
        only_train = sorted(set(train.classes) - set(val.classes))[:3]
        only_val = sorted(set(val.classes) - set(train.classes))[:3]
        raise UsageError(
            f"--data {data!r}: train/ and val/ have different classes "
            f"(only in train/: {only_train or 'none'}; only in val/: {only_val or 'none'})"
        )
    return train, val, len(train.classes), False


def eval_transform(size, small):
    """No augmentation; Resize + CenterCrop for large images."""
    steps = [v2.ToImage()]
    if not small:
        steps.append(v2.Resize(size * 256 // 224, antialias=True))
        steps.append(v2.CenterCrop(size))
    steps.append(v2.ToDtype(torch.float32, scale=True))
    steps.append(v2.Normalize(MEAN, STD))
    return v2.Compose(steps)


# Augmentation: the BYOL / Barlow Twins pipeline on batches (BYOL, Grill et al. 2020, table 6),
# each image with its own parameters, set by NU uniform numbers per view. They are drawn per global
# batch from a generator seeded by (seed, epoch, batch), so, through the epoch's order, they are a
# function of (seed, epoch, image index): not of the rank, the number of processes or a resume.
# Columns:
#   0-9 crop area, 10-19 crop log-ratio (ten tries), 20-21 crop position, 22 flip, 23 jitter on,
#   24-27 brightness, contrast, saturation, hue, 28-31 jitter order, 32 grayscale, 33 blur on,
#   34 blur sigma, 35 solarize on
NU = 36
VIEWS = ((1.0, 0.0), (0.1, 0.2))  # (blur p, solarize p) of view 1 and view 2
# In-memory data, images per call: a GPU is launch-bound, a CPU likes one batch (it stays in the caches).
AHEAD = dict(cuda=4096)


def crop_boxes(u, H, W, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop's boxes (top, left, height, width) by torchvision's rule: of ten tries of an
    area and a log-uniform ratio the first that fits, else the whole image cut to the nearest ratio."""
    H = torch.as_tensor(H, dtype=torch.float64).expand(len(u))
    W = torch.as_tensor(W, dtype=torch.float64).expand(len(u))
    area = (H * W)[:, None] * (scale[0] + (scale[1] - scale[0]) * u[:, :10])
    log_ratio = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 10:20]
    r = torch.exp(log_ratio)
    w = torch.sqrt(area * r).round()
    h = torch.sqrt(area / r).round()
    fits = (w > 0) & (w <= W[:, None]) & (h > 0) & (h <= H[:, None])
    first = fits.byte().argmax(1, keepdim=True)
    tried = fits.any(1)
    fallback_w = torch.where(W / H > ratio[1], (H * ratio[1]).round(), W)  # the whole image, cut
    fallback_h = torch.where(W / H < ratio[0], (W / ratio[0]).round(), H)
    w = torch.where(tried, w.gather(1, first)[:, 0], fallback_w)
    h = torch.where(tried, h.gather(1, first)[:, 0], fallback_h)
    top = torch.where(tried, (u[:, 20] * (H - h + 1)).floor(), ((H - h) / 2).floor())
    left = torch.where(tried, (u[:, 21] * (W - w + 1)).floor(), ((W - w) / 2).floor())
    return torch.stack([top, left, h, w], 1)


def sample_positions(t, start, length, extent):
    """grid_sample coordinates in [-1, 1] of the pixel centres t (in [0, 1]) of a crop, kept in it."""
    s = (t * length[:, None] - 0.5).clamp_min(0).minimum(length[:, None] - 1)
    return (2 * (start[:, None] + s) + 1) / extent - 1


def resized_crops(x, u, size):
    """RandomResizedCrop + flip of a batch in one bilinear resampling, as v2.functional.resized_crop
    (BILINEAR) of each image (torchvision's pipeline: bicubic); no antialias (crops <= size here)."""
    n, _, H, W = x.shape
    t = (torch.arange(size, device=x.device, dtype=torch.float64) + 0.5) / size
    box = crop_boxes(u, H, W).to(x.device, non_blocking=True)  # non_blocking: no sync
    flip = (u[:, 22] < 0.5).to(x.device, non_blocking=True)
    ys = sample_positions(t, box[:, 0], box[:, 2], H)
    xs = sample_positions(t, box[:, 1], box[:, 3], W)
    xs = torch.where(flip[:, None], xs.flip(1), xs)  # flip p 0.5
    grid = torch.stack([xs[:, None, :].expand(n, size, size), ys[:, :, None].expand(n, size, size)], 3)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="border", align_corners=False)


def gray(x):
    return 0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]  # ITU-R 601-2, as torchvision


def blend(x, ref, f):
    f = f.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * ref).clamp(0, 1)


def brightness(x, f):
    return blend(x, 0, f)


def contrast(x, f):
    return blend(x, gray(x).mean((1, 2, 3), keepdim=True), f)


def saturation(x, f):
    return blend(x, gray(x), f)


def hue_shift(x, shift):
    """Hue turned by `shift` (a fraction of the circle) in HSV space, as torchvision's adjust_hue."""
    r, g, b = x.unbind(1)
    v = x.amax(1)
    c = v - x.amin(1)
    cs = torch.where(c > 0, c, 1)
    h = torch.where(v == r, (g - b) / cs, torch.where(v == g, 2 + (b - r) / cs, 4 + (r - g) / cs))
    h = (h / 6 + shift.view(-1, 1, 1)) % 1
    s = c / torch.where(v > 0, v, 1)
    k = (torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1) + 6 * h[:, None]) % 6
    return v[:, None] * (1 - s[:, None] * torch.minimum(k, 4 - k).clamp(0, 1))


JITTER = (brightness, contrast, saturation, hue_shift)  # ColorJitter's ops, numbered as torchvision's


def gaussian_blur(x, sigma, k=23):
    """Per-image sigma, a k x k kernel, reflect padding: torchvision's GaussianBlur, separably."""
    n, C, H, W = x.shape
    t = torch.arange(k, device=x.device, dtype=x.dtype) - (k - 1) / 2
    kernel = torch.exp(-0.5 * (t / sigma.to(x).view(-1, 1)).pow(2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(C, 0)
    y = F.pad(x.reshape(1, n * C, H, W), [k // 2] * 4, mode="reflect")
    y = F.conv2d(y, kernel.view(-1, 1, 1, k), groups=n * C)
    y = F.conv2d(y, kernel.view(-1, 1, k, 1), groups=n * C)
    return y.view(n, C, H, W)


def colour(x, u, blur_p, solarize_p, small):
    """The rest of a view on a batch x in [0, 1]: ColorJitter(0.4, 0.4, 0.2, 0.1) p 0.8, its ops in a random
    order per image as torchvision's, grayscale p 0.2, blur (not for small images), solarize, normalisation;
    in float (torchvision rounds uint8 between ops). u stays on the CPU: nothing waits for the device."""

    def on_device(t):
        return t.to(x.device, non_blocking=True)

    jitter_on = u[:, 23] < 0.8
    order = u[:, 28:32].argsort(1)
    ud = on_device(u)
    x = x.clone()
    factors = [0.6 + 0.8 * ud[:, 24], 0.6 + 0.8 * ud[:, 25], 0.8 + 0.4 * ud[:, 26], 0.2 * ud[:, 27] - 0.1]
    f = torch.stack(factors, 1).to(x)
    for turn in range(4):  # each op runs on the images whose turn it is, only on them
        for op, adjust in enumerate(JITTER):
            i = on_device(torch.nonzero(jitter_on & (order[:, turn] == op))[:, 0])
            if len(i):
                x[i] = adjust(x[i], f[i, op])
    x = torch.where((ud[:, 32] < 0.2).view(-1, 1, 1, 1), gray(x).expand_as(x), x)
    i = on_device(torch.nonzero(u[:, 33] < blur_p)[:, 0])
    if len(i) and not small:
        x[i] = gaussian_blur(x[i], 0.1 + 1.9 * ud[i, 34])
    solarize = (ud[:, 35] < solarize_p).view(-1, 1, 1, 1) & (x >= 128 / 255)
    x = torch.where(solarize, 1 - x, x)
    return torch.stack([(x[:, c] - MEAN[c]) / STD[c] for c in range(3)], 1)


def seeded(*key):
    """A generator seeded by a hash of key: the same numbers for the same key in every process."""
    digest = hashlib.sha256(repr(key).encode()).hexdigest()
    return torch.Generator().manual_seed(int(digest[:15], 16))


def finish_views(crops, u, small):
    """Both views' crops on the device, in [0, 1] -> coloured, normalised, channels-last."""
    views = []
    for v, crop in enumerate(crops):
        blur_p, solarize_p = VIEWS[v]
        view = colour(crop, u[:, v], blur_p, solarize_p, small)
        views.append(view.contiguous(memory_format=torch.channels_last))
    return views


def batches(train, small, args, device, first, last):
    """(x1, x2, unreadable paths) for steps first+1..last: rank r's rows [r n, (r+1) n) of each global
    batch, on the device; order from (seed, epoch), views from (seed, epoch, batch), no blur if small."""
    rank, world = rank_world()
    B = args.batch_size
    n = B // world
    steps_per_epoch = len(train) // B

    def plan():  # this rank's image indices and uniforms, per step
        for step in range(first, last):
            epoch, b = divmod(step, steps_per_epoch)
            if step == first or b == 0:
                order = torch.randperm(len(train), generator=seeded(args.seed, epoch))
            u = torch.rand(B, 2, NU, generator=seeded(args.seed, epoch, b), dtype=torch.float64)
            global_batch = order[b * B : (b + 1) * B]
            yield global_batch[rank * n : (rank + 1) * n], u[rank * n : (rank + 1) * n]

    if isinstance(train, TensorDataset):  # the views of several steps at once
        images = train.tensors[0].to(device)
        steps = plan()
        steps_per_call = max(1, AHEAD.get(device.type, 0) // n)
        while ahead := list(itertools.islice(steps, steps_per_call)):
            idx = torch.cat([i for i, _ in ahead])
            u = torch.cat([u for _, u in ahead])
            x = images[idx.to(device, non_blocking=True)].float() / 255
            crops = [resized_crops(x, u[:, v], args.img_size) for v in (0, 1)]
            views = finish_views(crops, u, small)
            for s in range(len(ahead)):
                yield views[0][s * n : (s + 1) * n], views[1][s * n : (s + 1) * n], []
        return
    keys = ([(i, uu, args.img_size) for i, uu in zip(idx.tolist(), u.tolist())] for idx, u in plan())
    loader = torch.utils.data.DataLoader(
        train,
        batch_sampler=keys,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=args.workers > 0,
    )
    for (_, u), (c1, c2, bad) in zip(plan(), loader):
        crops = [c.to(device, non_blocking=True).float() / 255 for c in (c1, c2)]
        x1, x2 = finish_views(crops, u, small)
        yield x1, x2, [path for paths in bad for path in paths.split("\n") if path]
