"""
data.py -- the images of a decorr run: the built-in synthetic textures, CIFAR-10/100 from torchvision's
files, image folders (the ImageNet layout), and the two augmented views of each image, made on batches
on the device (the BYOL / Barlow Twins pipeline, each image with its own parameters).

decorr.py calls load_data() once and batches() for the training loop; lineval.py uses load_data() and
eval_transform().
"""

import hashlib
import itertools
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


SYNTH_TRAIN, SYNTH_VAL = 5000, 1000  # images of the built-in data
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def synthetic_images(n, seed, size=32):
    """10 classes of textures (stripes, checkerboards, rings, dots, spokes, grids, blobs), random
    scale, phase, centre, colours and noise: the class lives in the shape, which survives the
    augmentations; the colours, which a random network sees first, carry nothing. uint8, labels."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.rand(*s, generator=g)
    y = torch.randperm(n, generator=g) % 10
    t = torch.linspace(0, 1, size)
    yy, xx = [c.expand(n, size, size) for c in torch.meshgrid(t, t, indexing="ij")]
    phase, cx, cy = rnd(n, 1, 1) * 2 * math.pi, rnd(n, 1, 1), rnd(n, 1, 1)
    r, theta = torch.hypot(xx - cx, yy - cy), torch.atan2(yy - cy, xx - cx)
    diag = torch.where(rnd(n, 1, 1) < 0.5, xx + yy, xx - yy) / math.sqrt(2)
    f = (2.5 + 3.5 * rnd(n, 1, 1)) * 2 * math.pi  # random frequency
    blobs = F.interpolate(torch.randn(n, 1, 4, 4, generator=g), size, mode="bicubic")[:, 0]
    patterns = [
        torch.sin(f * yy + phase),  # horizontal stripes
        torch.sin(f * xx + phase),  # vertical stripes
        torch.sin(f * diag + phase),  # diagonal stripes
        torch.sign(torch.sin(f * xx + phase) * torch.sin(f * yy)),  # checkerboard
        torch.sign(torch.sin(f * (xx + yy) / 1.4) * torch.sin(f * (xx - yy) / 1.4 + phase)),
        torch.sin(f * 1.5 * r + phase),  # rings
        (torch.cos(f * xx + phase) * torch.cos(f * yy) > 0.5).float() * 2 - 1,  # dots
        torch.sin(torch.randint(3, 7, (n, 1, 1), generator=g) * theta + phase),  # spokes
        ((torch.cos(f / 2 * xx + phase).abs() > 0.9) | (torch.cos(f / 2 * yy).abs() > 0.9)).float() * 2 - 1,
        torch.tanh(2 * blobs),  # blobs
    ]
    u = torch.stack(patterns)[y, torch.arange(n)].unsqueeze(1)  # n x 1 x H x W in [-1, 1]
    c1 = rnd(n, 3, 1, 1)
    c2 = (c1 + 0.25 + 0.5 * rnd(n, 3, 1, 1)) % 1  # every channel differs
    img = c1 * (1 + u) / 2 + c2 * (1 - u) / 2 + 0.08 * torch.randn(n, 3, size, size, generator=g)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8), y


class Folder(torch.utils.data.Dataset):
    """Image folders (root/<class>/<image>) of (PIL image, label). An image that cannot be decoded
    is replaced by the next one that can, the same every time; read(i) also names those skipped."""

    def __init__(self, root):
        try:
            scan = torchvision.datasets.ImageFolder(root, loader=str)
        except (FileNotFoundError, RuntimeError) as e:
            raise UsageError(f"--data {root!r}: {str(e).splitlines()[0]}") from None
        self.root, self.samples, self.classes = root, scan.samples, scan.classes
        self.read(0)  # at least one image must be readable

    def __len__(self):
        return len(self.samples)

    def read(self, i):
        bad = []
        for path, label in (self.samples[(i + k) % len(self)] for k in range(len(self))):
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
        img, _, bad = self.read(key[0])
        x, u = v2.functional.pil_to_tensor(img), torch.tensor(key[1], dtype=torch.float64)
        views = [
            v2.functional.resized_crop(x, *box, [key[2]] * 2, v2.InterpolationMode.BICUBIC)
            for box in crop_boxes(u, *x.shape[1:]).long().tolist()
        ]
        return *[y.flip(-1) if flip < 0.5 else y for y, flip in zip(views, u[:, 22])], "\n".join(bad)


def load_data(data, root="data"):
    """(train, val, num_classes, small) for 'synthetic', 'cifar10', 'cifar100' (torchvision's files under
    root, never downloaded; in memory, uint8) or image folders PATH/{train,val}/<class>/<image>."""
    if data == "synthetic":
        return (
            TensorDataset(*synthetic_images(SYNTH_TRAIN, 0)),
            TensorDataset(*synthetic_images(SYNTH_VAL, 1)),
            10,
            True,
        )
    if data in ("cifar10", "cifar100"):
        cls = torchvision.datasets.CIFAR10 if data == "cifar10" else torchvision.datasets.CIFAR100
        try:  # torchvision checks the files' MD5 first
            sets = [cls(root, train=t, download=False) for t in (True, False)]
        except RuntimeError:
            raise UsageError(
                f"{data} not found under --data-root {root!r}; download it there "
                f"once (torchvision.datasets.{cls.__name__}(root, download=True))"
            ) from None
        sets = [
            TensorDataset(torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(s.targets))
            for s in sets
        ]
        return sets[0], sets[1], len(sets[0].tensors[1].unique()), True
    if not os.path.isdir(data):
        raise UsageError(f"--data {data!r}: no such directory (or use synthetic, cifar10, cifar100)")
    for split in ("train", "val"):  # both checked before any folder is scanned
        if not os.path.isdir(os.path.join(data, split)):
            raise UsageError(
                f"--data {data!r} has no {split}/ folder (ImageNet layout: {split}/<class>/<image>)"
            )
    train, val = Folder(os.path.join(data, "train")), Folder(os.path.join(data, "val"))
    return train, val, len(train.classes), False


def eval_transform(size, small):  # no augmentation; Resize + CenterCrop for large images
    t = [v2.ToImage()] + (
        [] if small else [v2.Resize(size * 256 // 224, antialias=True), v2.CenterCrop(size)]
    )
    return v2.Compose(t + [v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])


# Augmentation: the BYOL / Barlow Twins pipeline (NOTES.md) on batches, each image with its own
# parameters, set by NU uniform numbers per view. They are drawn per global batch from a
# generator seeded by (seed, epoch, batch), so, through the epoch's order, they are a function of
# (seed, epoch, image index): not of the rank, the number of processes or a resume. Columns:
#   0-9 crop area, 10-19 crop log-ratio (ten tries), 20-21 crop position, 22 flip, 23 jitter on,
#   24-27 brightness, contrast, saturation, hue, 28-31 jitter order, 32 grayscale, 33 blur on,
#   34 blur sigma, 35 solarize on
NU, VIEWS = 36, ((1.0, 0.0), (0.1, 0.2))  # (blur p, solarize p) of view 1 and view 2
AHEAD = dict(
    cuda=4096
)  # in-memory data, images per call: a GPU is launch-bound, a CPU likes one batch (cache)


def crop_boxes(u, H, W, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop's boxes (top, left, height, width) by torchvision's rule: of ten tries of an
    area and a log-uniform ratio the first that fits, else the whole image cut to the nearest ratio."""
    H, W = (torch.as_tensor(s, dtype=torch.float64).expand(len(u)) for s in (H, W))
    area = (H * W)[:, None] * (scale[0] + (scale[1] - scale[0]) * u[:, :10])
    r = torch.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 10:20])
    w, h = torch.sqrt(area * r).round(), torch.sqrt(area / r).round()
    fits = (w > 0) & (w <= W[:, None]) & (h > 0) & (h <= H[:, None])
    first, tried = fits.byte().argmax(1, keepdim=True), fits.any(1)
    w = torch.where(tried, w.gather(1, first)[:, 0], torch.where(W / H > ratio[1], (H * ratio[1]).round(), W))
    h = torch.where(tried, h.gather(1, first)[:, 0], torch.where(W / H < ratio[0], (W / ratio[0]).round(), H))
    top = torch.where(tried, (u[:, 20] * (H - h + 1)).floor(), ((H - h) / 2).floor())
    left = torch.where(tried, (u[:, 21] * (W - w + 1)).floor(), ((W - w) / 2).floor())
    return torch.stack([top, left, h, w], 1)


def resized_crops(x, u, size):
    """RandomResizedCrop + flip of a batch in one bilinear resampling, as v2.functional.resized_crop
    (BILINEAR) of each image (torchvision's pipeline: bicubic); no antialias (crops <= size here)."""
    (n, _, H, W), t = x.shape, (torch.arange(size, device=x.device, dtype=torch.float64) + 0.5) / size
    box, flip = (v.to(x.device, non_blocking=True) for v in (crop_boxes(u, H, W), u[:, 22] < 0.5))  # no sync

    def coords(start, length, extent):  # sample positions in the crop, kept in it, in [-1, 1]
        s = (t * length[:, None] - 0.5).clamp_min(0).minimum(length[:, None] - 1)
        return (2 * (start[:, None] + s) + 1) / extent - 1

    ys, xs = coords(box[:, 0], box[:, 2], H), coords(box[:, 1], box[:, 3], W)
    xs = torch.where(flip[:, None], xs.flip(1), xs)  # flip p 0.5
    grid = torch.stack([xs[:, None, :].expand(n, size, size), ys[:, :, None].expand(n, size, size)], 3)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="border", align_corners=False)


def gray(x):
    return 0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]  # ITU-R 601-2, as torchvision


def blend(x, ref, f):
    return (f.view(-1, 1, 1, 1) * x + (1 - f.view(-1, 1, 1, 1)) * ref).clamp(0, 1)


def hue_shift(x, shift):
    """Hue turned by `shift` (a fraction of the circle) in HSV space, as torchvision's adjust_hue."""
    (r, g, b), v, lo = x.unbind(1), x.amax(1), x.amin(1)
    c = v - lo
    cs = torch.where(c > 0, c, 1)
    h = torch.where(v == r, (g - b) / cs, torch.where(v == g, 2 + (b - r) / cs, 4 + (r - g) / cs))
    h, s = (h / 6 + shift.view(-1, 1, 1)) % 1, c / torch.where(v > 0, v, 1)
    k = (torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1) + 6 * h[:, None]) % 6
    return v[:, None] * (1 - s[:, None] * torch.minimum(k, 4 - k).clamp(0, 1))


JITTER = (
    lambda x, f: blend(x, 0, f),  # brightness
    lambda x, f: blend(x, gray(x).mean((1, 2, 3), keepdim=True), f),  # contrast
    lambda x, f: blend(x, gray(x), f),  # saturation
    hue_shift,
)  # hue


def gaussian_blur(x, sigma, k=23):
    """Per-image sigma, a k x k kernel, reflect padding: torchvision's GaussianBlur, separably."""
    n, C, H, W = x.shape
    t = torch.arange(k, device=x.device, dtype=x.dtype) - (k - 1) / 2
    ker = torch.exp(-0.5 * (t / sigma.to(x).view(-1, 1)).pow(2))
    ker = (ker / ker.sum(1, keepdim=True)).repeat_interleave(C, 0)
    y = F.pad(x.reshape(1, n * C, H, W), [k // 2] * 4, mode="reflect")
    y = F.conv2d(F.conv2d(y, ker.view(-1, 1, 1, k), groups=n * C), ker.view(-1, 1, k, 1), groups=n * C)
    return y.view(n, C, H, W)


def colour(x, u, blur_p, solarize_p, small):
    """The rest of a view on a batch x in [0, 1]: ColorJitter(0.4, 0.4, 0.2, 0.1) p 0.8, its ops in a random
    order per image as torchvision's, grayscale p 0.2, blur (not for small images), solarize, normalisation;
    in float (torchvision rounds uint8 between ops). u stays on the CPU: nothing waits for the device."""
    dev = lambda t: t.to(x.device, non_blocking=True)
    on, order, ud, x = u[:, 23] < 0.8, u[:, 28:32].argsort(1), dev(u), x.clone()
    f = torch.stack(
        [0.6 + 0.8 * ud[:, 24], 0.6 + 0.8 * ud[:, 25], 0.8 + 0.4 * ud[:, 26], 0.2 * ud[:, 27] - 0.1], 1
    ).to(x)
    for turn in range(4):  # each op runs on the images whose turn it is, only on them
        for op, fn in enumerate(JITTER):
            i = dev(torch.nonzero(on & (order[:, turn] == op))[:, 0])
            if len(i):
                x[i] = fn(x[i], f[i, op])
    x = torch.where((ud[:, 32] < 0.2).view(-1, 1, 1, 1), gray(x).expand_as(x), x)
    i = dev(torch.nonzero(u[:, 33] < blur_p)[:, 0])
    if len(i) and not small:
        x[i] = gaussian_blur(x[i], 0.1 + 1.9 * ud[i, 34])
    x = torch.where((ud[:, 35] < solarize_p).view(-1, 1, 1, 1) & (x >= 128 / 255), 1 - x, x)
    return torch.stack([(x[:, c] - MEAN[c]) / STD[c] for c in range(3)], 1)


def batches(train, small, args, device, first, last):
    """(x1, x2, unreadable paths) for steps first+1..last: rank r's rows [r n, (r+1) n) of each global
    batch, on the device; order from (seed, epoch), views from (seed, epoch, batch), no blur if small."""
    (rank, world), B = rank_world(), args.batch_size
    n, spe = B // world, len(train) // B
    seed = lambda *k: torch.Generator().manual_seed(
        int(hashlib.sha256(repr(k).encode()).hexdigest()[:15], 16)
    )

    def plan():  # this rank's image indices and uniforms, per step
        for step in range(first, last):
            epoch, b = divmod(step, spe)
            if step == first or b == 0:
                order = torch.randperm(len(train), generator=seed(args.seed, epoch))
            u = torch.rand(B, 2, NU, generator=seed(args.seed, epoch, b), dtype=torch.float64)
            yield order[b * B : (b + 1) * B][rank * n : (rank + 1) * n], u[rank * n : (rank + 1) * n]

    finish = lambda crops, u: [
        colour(c, u[:, v], *VIEWS[v], small).contiguous(memory_format=torch.channels_last)
        for v, c in enumerate(crops)
    ]  # both views' crops on the device, in [0, 1]
    if isinstance(train, TensorDataset):  # the views of several steps at once
        images, steps = train.tensors[0].to(device), plan()
        while ahead := list(itertools.islice(steps, max(1, AHEAD.get(device.type, 0) // n))):
            idx, u = torch.cat([i for i, _ in ahead]), torch.cat([u for _, u in ahead])
            x = images[idx.to(device, non_blocking=True)].float() / 255
            views = finish([resized_crops(x, u[:, v], args.img_size) for v in (0, 1)], u)
            yield from ((*(v[s * n : (s + 1) * n] for v in views), []) for s in range(len(ahead)))
        return
    keys = ([(i, uu, args.img_size) for i, uu in zip(idx.tolist(), u.tolist())] for idx, u in plan())
    loader = torch.utils.data.DataLoader(
        train,
        batch_sampler=keys,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=args.workers > 0,
    )
    for (idx, u), (c1, c2, bad) in zip(plan(), loader):
        crops = [c.to(device, non_blocking=True).float() / 255 for c in (c1, c2)]
        yield *finish(crops, u), [p for b in bad for p in b.split("\n") if p]
