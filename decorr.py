"""
decorr.py -- self-supervised pre-training with the decorrelation loss of
Liu, Suganuma, Okatani, "Bridging the Gap from Asymmetry Tricks to Decorrelation
Principles in Non-contrastive Self-supervised Learning", NeurIPS 2022.

    backbone -> projector -> standardize (SyncBN, affine=False) -> linear predictor W
    loss = C_inv * ||W F1 - F2||^2 + C_cov / D * sum_parts ||W^T W - W C_part W^T||^2   (eq. 17, 19)

Read top to bottom: 1. the method: standardize(), decorr_loss()  2. BatchNorm synchronised across
CPU processes  3. the model  4. data and augmentation  5. LARS  6. diagnostics  7. files  8. training.
    python decorr.py                     # synthetic data, under 10 minutes on a 2-core CPU
    torchrun --nproc_per_node=8 decorr.py --data /imagenet --proj 8192-8192-8192
"""
import argparse, datetime, json, math, os, random, signal, sys, time, warnings

import numpy as np
from PIL import Image
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
import torchvision
from torch.utils.data import TensorDataset
from torchvision.transforms import v2

class UsageError(Exception):
    """Bad input: reported as one line on stderr, exit code 2."""

def distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

# ----------------------------------------------------------------------------- 1. the method

def batch_stats(x, dims):
    """Mean and biased variance over `dims` of the global batch (equal batches on all ranks). The
    all_reduce is autograd-aware: its backward sums all ranks' gradients, exact under DDP's mean."""
    if not distributed():
        return x.mean(dims), x.var(dims, correction=0)
    world = dist.get_world_size()
    mean = dist_fn.all_reduce(x.mean(dims)) / world
    var = dist_fn.all_reduce((x - mean.view(-1, *[1] * (x.dim() - 2))).pow(2).mean(dims)) / world
    return mean, var

def standardize(f, eps=1e-5):
    """Std(f_i) = (f_i - mu_i) / sigma_i per dimension over the (global) batch, appendix eq. 33.
    Exactly BatchNorm1d(affine=False) in training mode (biased variance); float32 or float64."""
    f = f if f.dtype == torch.float64 else f.float()
    mean, var = batch_stats(f, (0,))
    return (f - mean) / torch.sqrt(var + eps)

def part_cov(p, wtw):
    """||p^T p / m - W^T W||_F^2 for one part p (m x D) of the predictions, eq. 19 as written."""
    return (p.T @ p / p.shape[0] - wtw).pow(2).sum()

class GramSquare(torch.autograd.Function):
    """scale * ||W[:, lo:hi]^T W||_F^2 with the symmetric backward 4 scale W[:, lo:hi] (W[:, lo:hi]^T W):
    for lo:hi = all, d||W^T W||^2/dW = 4 W (W^T W), one D^3 product where autograd spends two.
    With this rank's rows and scale = world size, the mean of the gradients over ranks is exact."""
    @staticmethod
    def forward(ctx, w, lo, hi, scale):
        b = w[:, lo:hi].T @ w
        ctx.save_for_backward(w, b)
        ctx.lo, ctx.hi, ctx.scale = lo, hi, scale
        return scale * b.pow(2).sum()
    @staticmethod
    def backward(ctx, grad):
        w, b = ctx.saved_tensors
        return 4 * ctx.scale * grad * (w[:, ctx.lo:ctx.hi] @ b), None, None, None

def decorr_loss(f1, f2, w, parts=1, inv_coef=1.0, cov_coef=1.0, stopgrad=False, shard_wtw=False):
    """Algorithm 1 (appendix F): returns (loss, inv, cov) for standardized features f1, f2 (n x D)
    of this device and the predictor weight w (D x D), p = f @ w.T.

        inv = mean((p1 - f2)^2) + mean((p2 - f1)^2)                               eq. 17
        cov = mean over parts j of sum_v ||p_vj^T p_vj / m - W^T W||_F^2          eq. 19, m = n/parts
        loss = inv_coef * inv + cov_coef / D * cov

    No D x D matrix per part is kept. For parts of m < D rows, with P = p_vj (||P^T P|| = ||P P^T||):
        ||P^T P/m - W^T W||^2 = ||P P^T||^2/m^2 - 2 ||P W^T||^2/m + ||W^T W||^2
    and the middle term summed over parts is one n x D product. For m >= D that expansion would
    cancel near convergence, and a part's D x D matrix is no larger than the part: it is formed as
    written and recomputed in backward (checkpoint). stopgrad=True: Table 3's StopGrad on the targets.
    shard_wtw=True (torch.distributed, m < D): each rank forms its rows of W^T W only (GramSquare).
    Float32 (float64 inputs stay float64), even under autocast."""
    with torch.autocast(f1.device.type, enabled=False):
        dtype = torch.float64 if torch.float64 in (f1.dtype, f2.dtype, w.dtype) else torch.float32
        f1, f2, w = f1.to(dtype), f2.to(dtype), w.to(dtype)
        n, D = f1.shape
        if n % parts:
            raise UsageError(f"{n} rows per device do not split into {parts} equal partitions")
        m = n // parts
        p1, p2 = f1 @ w.T, f2 @ w.T
        t1, t2 = (f1.detach(), f2.detach()) if stopgrad else (f1, f2)
        inv = (p1 - t2).pow(2).mean() + (p2 - t1).pow(2).mean()
        if m >= D:
            wtw = w.T @ w
            cov = sum(torch.utils.checkpoint.checkpoint(part_cov, pj, wtw, use_reentrant=False)
                      for p in (p1, p2) for pj in p.split(m)) / parts
        else:
            rank, world = (dist.get_rank(), dist.get_world_size()) if shard_wtw and distributed() else (0, 1)
            cov = 2 * GramSquare.apply(w, rank * D // world, (rank + 1) * D // world, world)
            for p in (p1, p2):
                pp = p.view(parts, m, D)
                gram = torch.bmm(pp, pp.transpose(1, 2))                   # parts x m x m
                cov = cov + gram.pow(2).sum() / (parts * m * m) - 2 * (p @ w.T).pow(2).sum() / n
        loss = inv_coef * inv + cov_coef / D * cov
    return loss, inv, cov

# ----------------------------------------------------------------------------- 2. SyncBatchNorm on CPU

class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm with statistics over all ranks, as standardize() (SyncBatchNorm refuses CPU tensors)."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-d input, got {x.dim()}-d")

    def forward(self, x):
        if not (self.training and distributed()):
            return super().forward(x)
        xf = x.float()
        mean, var = batch_stats(xf, [0, *range(2, x.dim())])
        with torch.no_grad():
            n = x.numel() // x.shape[1] * dist.get_world_size()
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * n / max(n - 1, 1), self.momentum)
            self.num_batches_tracked += 1
        col = lambda v: v.view(-1, *[1] * (x.dim() - 2))          # per channel, broadcastable
        y = (xf - col(mean)) / torch.sqrt(col(var) + self.eps)
        return (y * col(self.weight) + col(self.bias) if self.affine else y).to(x.dtype)

def sync_batchnorm(module, device):
    """Every BatchNorm synchronised across processes, as in the paper (sec. 5.1)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            bn = CPUSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine)
            bn.load_state_dict(child.state_dict())
            setattr(module, name, bn)
        else:
            sync_batchnorm(child, device)
    return module

# ----------------------------------------------------------------------------- 3. the model

ARCHS = ("resnet18", "resnet34", "resnet50")

def build_backbone(arch, small_stem):
    """torchvision ResNet without fc, zero_init_residual=True (sec. 5.1); for images of 64 px or
    less the CIFAR stem: 3x3 conv, stride 1, no max-pool. Returns (backbone, feature dim)."""
    if arch not in ARCHS:
        raise UsageError(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}")
    net = getattr(torchvision.models, arch)(zero_init_residual=True)
    if small_stem:
        net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    dim, net.fc = net.fc.in_features, nn.Identity()
    return net, dim

def parse_proj(spec):
    dims = [int(d) if d.isdigit() else 0 for d in spec.split("-")]
    if min(dims) <= 0:
        raise UsageError(f"--proj {spec!r} is not a list of positive widths like 8192-8192-8192")
    return dims

def build_projector(in_dim, dims):
    """MLP: Linear + BatchNorm + ReLU between layers, plain Linear last. No biases: each Linear is
    followed by a BatchNorm or by the standardization, which removes them."""
    layers = []
    for d_in, d in zip([in_dim] + dims, dims):
        layers += [nn.Linear(d_in, d, bias=False), nn.BatchNorm1d(d), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers[:-2])

class Decorr(nn.Module):
    """Backbone -> projector -> standardize -> predictor; forward(x1, x2) returns (loss, inv, cov)."""

    def __init__(self, args):
        super().__init__()
        self.args = args
        self.backbone, dim = build_backbone(args.arch, args.img_size <= 64)
        dims = parse_proj(args.proj)
        self.projector, D = build_projector(dim, dims), dims[-1]
        # The paper does not state W's init. Identity (default): W^T W = I, the loss's fixed point for
        # decorrelated features; from nn.Linear's random init (appendix C, Fig. 3) W first shrinks.
        self.predictor = nn.Linear(D, D, bias=False)
        if args.identity_predictor or args.predictor_init == "identity":
            self.predictor.weight.data.copy_(torch.eye(D))
        self.predictor.weight.requires_grad_(not args.identity_predictor)   # Table 3: W fixed to I

    def forward(self, x1, x2):
        a = self.args
        f1, f2 = (self.projector(self.backbone(x)) for x in (x1, x2))   # BN statistics per view
        if not a.no_std:
            f1, f2 = standardize(f1), standardize(f2)
        return decorr_loss(f1, f2, self.predictor.weight, a.parts_per_device, a.inv_coef,
                           a.cov_coef, a.stopgrad, shard_wtw=True)

# ----------------------------------------------------------------------------- 4. data

SYNTH_TRAIN, SYNTH_VAL = 5000, 1000
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
    k = lambda lo, hi: (lo + (hi - lo) * rnd(n, 1, 1)) * 2 * math.pi     # random frequency
    phase, cx, cy = rnd(n, 1, 1) * 2 * math.pi, rnd(n, 1, 1), rnd(n, 1, 1)
    r, theta = torch.hypot(xx - cx, yy - cy), torch.atan2(yy - cy, xx - cx)
    diag = torch.where(rnd(n, 1, 1) < 0.5, xx + yy, xx - yy) / math.sqrt(2)
    f = k(2.5, 6)
    blobs = F.interpolate(torch.randn(n, 1, 4, 4, generator=g), size, mode="bicubic")[:, 0]
    patterns = [
        torch.sin(f * yy + phase),                                          # horizontal stripes
        torch.sin(f * xx + phase),                                          # vertical stripes
        torch.sin(f * diag + phase),                                        # diagonal stripes
        torch.sign(torch.sin(f * xx + phase) * torch.sin(f * yy)),          # checkerboard
        torch.sign(torch.sin(f * (xx + yy) / 1.4) * torch.sin(f * (xx - yy) / 1.4 + phase)),
        torch.sin(f * 1.5 * r + phase),                                     # rings
        (torch.cos(f * xx + phase) * torch.cos(f * yy) > 0.5).float() * 2 - 1,  # dots
        torch.sin(torch.randint(3, 7, (n, 1, 1), generator=g) * theta + phase),  # spokes
        ((torch.cos(f / 2 * xx + phase).abs() > 0.9) | (torch.cos(f / 2 * yy).abs() > 0.9)).float() * 2 - 1,
        torch.tanh(2 * blobs),                                              # blobs
    ]
    u = torch.stack(patterns)[y, torch.arange(n)].unsqueeze(1)             # n x 1 x H x W in [-1, 1]
    c1 = rnd(n, 3, 1, 1)
    c2 = (c1 + 0.25 + 0.5 * rnd(n, 3, 1, 1)) % 1                  # every channel differs
    img = c1 * (1 + u) / 2 + c2 * (1 - u) / 2 + 0.08 * torch.randn(n, 3, size, size, generator=g)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8), y

def load_image(path):
    try:
        with open(path, "rb") as fh:
            return Image.open(fh).convert("RGB")
    except Exception as e:
        raise UsageError(f"cannot read image {path}: {e}") from None

def load_data(data, root="data"):
    """Returns (train, val, num_classes, small): datasets of (image, label). `data` is
    'synthetic', 'cifar10', 'cifar100' (torchvision, under root, never downloaded) or the path
    of an ImageFolder tree in ImageNet layout (data/train/<class>/..., data/val/<class>/...)."""
    if data == "synthetic":
        return (TensorDataset(*synthetic_images(SYNTH_TRAIN, 0)),
                TensorDataset(*synthetic_images(SYNTH_VAL, 1)), 10, True)
    if data in ("cifar10", "cifar100"):
        cls = torchvision.datasets.CIFAR10 if data == "cifar10" else torchvision.datasets.CIFAR100
        try:
            sets = [cls(root, train=t, download=False) for t in (True, False)]
        except RuntimeError:
            raise UsageError(f"{data} not found under --data-root {root!r}; download it there "
                             f"once (torchvision.datasets.{cls.__name__}(root, download=True))") from None
        sets = [TensorDataset(torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous(),
                              torch.tensor(s.targets)) for s in sets]
        return sets[0], sets[1], len(sets[0].tensors[1].unique()), True
    if not os.path.isdir(data):
        raise UsageError(f"--data {data!r}: no such directory (or use synthetic, cifar10, cifar100)")
    for split in ("train", "val"):                       # both checked before any folder is scanned
        if not os.path.isdir(os.path.join(data, split)):
            raise UsageError(f"--data {data!r} has no {split}/ folder (ImageNet layout: {split}/<class>/<image>)")
    splits = []
    for path in (os.path.join(data, "train"), os.path.join(data, "val")):
        try:
            splits.append(torchvision.datasets.ImageFolder(path, loader=load_image))
        except (FileNotFoundError, RuntimeError) as e:
            raise UsageError(f"--data {path!r}: {str(e).splitlines()[0]}") from None
    return splits[0], splits[1], len(splits[0].classes), False

def augmentation(size, small, blur_p, solarize_p):
    """One view of the BYOL / Barlow Twins pipeline (NOTES.md); no blur for small images (CIFAR)."""
    t = [v2.ToImage(), v2.RandomResizedCrop(size, (0.08, 1.0), interpolation=v2.InterpolationMode.BICUBIC),
         v2.RandomHorizontalFlip(), v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
         v2.RandomGrayscale(p=0.2)]
    if not small:
        t.append(v2.RandomApply([v2.GaussianBlur(23, sigma=(0.1, 2.0))], p=blur_p))
    t += [v2.RandomSolarize(128, p=solarize_p), v2.ToDtype(torch.float32, scale=True),
          v2.Normalize(MEAN, STD)]
    return v2.Compose(t)

def eval_transform(size, small):
    """No augmentation: Resize(size * 256/224) + CenterCrop(size) for large images."""
    t = [v2.ToImage()] + ([] if small else [v2.Resize(size * 256 // 224, antialias=True), v2.CenterCrop(size)])
    return v2.Compose(t + [v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])

class TwoViews(torch.utils.data.Dataset):
    """Two asymmetric views per image, each drawn with its own random parameters (per sample, not
    per batch). The draw is seeded by (seed, epoch, index), so a resumed run sees the same views."""

    def __init__(self, base, size, small, seed):
        self.base, self.seed, self.epoch = base, seed, 0
        self.aug1 = augmentation(size, small, blur_p=1.0, solarize_p=0.0)
        self.aug2 = augmentation(size, small, blur_p=0.1, solarize_p=0.2)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, _ = self.base[i]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 100_003 + self.epoch) * 10_000_019 + i)
            return self.aug1(x), self.aug2(x)

# ----------------------------------------------------------------------------- 5. optimisation

class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as in Barlow Twins: momentum, eta 0.001; groups with lars=False
    (biases, BatchNorm) get neither weight decay nor the trust ratio."""

    def __init__(self, params, lr, weight_decay, momentum=0.9, eta=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta, lars=True))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in (p for p in g["params"] if p.grad is not None):
                dp = p.grad
                if g["lars"]:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    pn, dn = p.norm(), dp.norm()
                    dp = dp * torch.where((pn > 0) & (dn > 0), g["eta"] * pn / dn, 1.0)
                mu = self.state[p].get("mu")
                if mu is None:
                    mu = self.state[p]["mu"] = torch.zeros_like(p)
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])

def make_optimizer(model, args):
    params = [p for p in model.parameters() if p.requires_grad]
    return LARS([dict(params=[p for p in params if p.ndim > 1]),
                 dict(params=[p for p in params if p.ndim <= 1], lars=False, weight_decay=0.0)],
                lr=0.0, weight_decay=args.wd, eta=args.lars_eta)

def learning_rate(step, total, warmup, base):
    """Linear warmup, then cosine decay to 0, per step."""
    return (base * (step + 1) / warmup if step < warmup else
            base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))

# ----------------------------------------------------------------------------- 6. diagnostics

def centred_unit(x, eps=1e-8):
    x = x.float() - x.float().mean(0)
    return x / (x.pow(2).mean(0).sqrt() + eps)

def corr_dist(h):
    """||Sigma - I||_F^2 / D for the correlation matrix Sigma of h (n x D), Fig. 1's quantity;
    via the n x n Gram matrix: ||Z^T Z/n||^2 = ||Z Z^T||^2 / n^2."""
    z = centred_unit(h)
    n, D = z.shape
    return ((z @ z.T).pow(2).sum() / n**2 - 2 * z.pow(2).sum() / n + D).item() / D

def wp_offdiag(w):
    """W_p's energy off the diagonal, rows divided by their diagonal entry (Fig. 3b); 0 if diagonal."""
    wn = w.float() / w.float().diagonal().unsqueeze(1)
    return (1 - wn.shape[0] / wn.pow(2).sum()).item()

def eff_rank(x):
    """exp(entropy of the normalised singular values) of the centred x: about r for rank r."""
    s = torch.linalg.svdvals(x.float() - x.float().mean(0))
    p = s / s.sum().clamp_min(1e-12)
    return math.exp(-(p * p.clamp_min(1e-12).log()).sum().item())

def collapsing(feat_std, rank):
    """Complete collapse (constant output) or dimensional collapse (about one direction left)."""
    return feat_std < 1e-3 or rank < 2.0

def knn_predict(bank, bank_y, query, num_classes, k=20, t=0.07):
    """Cosine k-NN with exp(sim / t)-weighted votes, as in SSL papers (Wu et al. 2018)."""
    bank, query = F.normalize(bank.float(), dim=1), F.normalize(query.float(), dim=1)
    sim, idx = (query @ bank.T).topk(min(k, len(bank)), dim=1)
    votes = query.new_zeros(len(query), num_classes).scatter_add_(1, bank_y.to(idx.device)[idx], (sim / t).exp())
    return votes.argmax(1)

def fixed_batch(ds, n, size, small, device):
    """n images spread over ds, without augmentation, and their labels: the diagnostics' batch."""
    evaluate, items = eval_transform(size, small), [ds[i] for i in range(0, len(ds), max(1, len(ds) // n))[:n]]
    return torch.stack([evaluate(x) for x, _ in items]).to(device), torch.tensor([y for _, y in items])

@torch.no_grad()
def diagnostics(model, probe, bank, num_classes, amp=None):
    """The mechanism, measured on a fixed held-out batch without augmentation, in eval mode; the
    forward passes under autocast(amp), the measures in float32."""
    was_training = model.training
    model.eval()
    (xq, yq), (xb, yb) = probe, bank
    with torch.autocast(xq.device.type, dtype=amp, enabled=amp is not None):
        h, hb = model.backbone(xq).float(), model.backbone(xb).float()
        z = model.projector(h).float()
    out = dict(corr_dist=corr_dist(h), wp_offdiag=wp_offdiag(model.predictor.weight),
               eff_rank_proj=eff_rank(centred_unit(z)), eff_rank_backbone=eff_rank(h),
               feat_std=z.std(0).mean().item())
    if num_classes:
        pred = knn_predict(hb, yb, h, num_classes)
        out["knn_top1"] = 100.0 * (pred.cpu() == yq).float().mean().item()
    model.train(was_training)
    return out

def wp_picture(w, size=256):
    """Appendix C, Fig. 3: (a) |W_p|, (b) rows divided by their diagonal; side by side, uint8."""
    w = w.detach().float().cpu()
    panels = []
    for m in (w.abs(), (w / w.diagonal().unsqueeze(1)).abs()):
        m = F.adaptive_avg_pool2d(m[None, None], min(size, m.shape[0]))[0, 0]
        m = (m / m.max().clamp_min(1e-12)).clamp(0, 1)
        panels.append(F.interpolate(m[None, None], size, mode="nearest")[0, 0])
    a = torch.cat([panels[0], torch.ones(size, 4), panels[1]], 1)
    rgb = torch.stack([a.sqrt(), a, a.pow(2)])          # a dark-to-yellow map: diagonal is bright
    return (rgb * 255).round().to(torch.uint8)

# ----------------------------------------------------------------------------- 7. files

def atomic_write(path, write):
    """write(file) to a temporary file, fsync, rename over path: a crash at any instant leaves
    either the old file or the new one, both complete."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    os.fsync(dfd)
    os.close(dfd)

def append_jsonl(path, row):
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")
        fh.flush()
        os.fsync(fh.fileno())

def read_jsonl(path):
    """The complete lines of a JSON-lines file (a line cut by a crash is dropped)."""
    lines = open(path).read().split("\n") if os.path.exists(path) else []
    return [json.loads(line) for line in lines if line.endswith("}")]   # rows are flat objects

def load_checkpoint(path):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")                     # garbage can look like a pickle header
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"cannot load checkpoint {path}: {str(e).splitlines()[0][:200]} "
                         f"(truncated or not a decorr checkpoint? use --fresh to start over)") from None

def rng_state():
    """Every random generator of this process, in a form torch.load(weights_only=True) accepts."""
    kind, keys, *rest = np.random.get_state()
    return dict(torch=torch.get_rng_state(), python=random.getstate(),
                numpy=[kind, torch.from_numpy(keys.astype(np.int64)), *rest],
                cuda=torch.cuda.get_rng_state() if torch.cuda.is_available() else None)

def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state((s["numpy"][0], s["numpy"][1].numpy().astype(np.uint32), *s["numpy"][2:]))
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])

# ----------------------------------------------------------------------------- 8. training

# Defaults that depend on the data: the paper's ImageNet recipe for image folders (sec. 5.1),
# a CPU-sized demo for the built-in synthetic data, the usual CIFAR recipe for CIFAR.
PROFILES = dict(
    folder=dict(arch="resnet50", img_size=224, proj="2048-2048-2048", epochs=100, batch_size=2048, wd=1e-6, lars_eta=0.001),
    cifar=dict(arch="resnet18", img_size=32, proj="2048-2048-2048", epochs=800, batch_size=256, wd=1e-4, lars_eta=0.02),
    synthetic=dict(arch="resnet18", img_size=32, proj="4096-256", epochs=4, batch_size=256, wd=1e-4, lars_eta=0.02),
)
RUN_DEFINING = ("data", "arch", "proj", "img_size", "batch_size", "partitions", "seed", "no_std",
                "identity_predictor", "predictor_init", "stopgrad", "inv_coef", "cov_coef", "lr", "wd", "lars_eta")

class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)

def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--data", default="synthetic", help="synthetic | cifar10 | cifar100 | PATH (ImageFolder: PATH/train, PATH/val)")
    a("--data-root", default="data", help="where cifar10/cifar100 are (never downloaded)")
    a("--arch", default=None, help=f"{' | '.join(ARCHS)} (default: resnet50 for folders, else resnet18)")
    a("--img-size", type=int, default=None, help="crop size (default: 224 for folders, else 32)")
    a("--proj", default=None, help="projector widths, the last is D (default: 4096-256 for synthetic, else 2048-2048-2048)")
    a("--epochs", type=int, default=None)
    a("--batch-size", type=int, default=None, help="global batch, over all processes")
    a("--lr", type=float, default=0.3, help="base lr, scaled by batch/256")
    a("--wd", type=float, default=None, help="weight decay (default: 1e-6 for folders, else 1e-4)")
    a("--lars-eta", type=float, default=None, help="LARS trust coefficient (default: 0.001 for "
      "folders as in the paper; 0.02 for small data, as solo-learn's CIFAR recipes)")
    a("--warmup-epochs", type=int, default=10, help="at most a tenth of the run")
    a("--partitions", type=int, default=1, help="k: parts of the global batch (Table 5 #PARTITION)")
    a("--inv-coef", type=float, default=1.0, help="C_inv (Table 5 INV COEF)")
    a("--cov-coef", type=float, default=1.0, help="C_cov (Table 5 COV COEF)")
    a("--no-std", action="store_true", help="Table 3: no standardization")
    a("--identity-predictor", action="store_true", help="Table 3: W fixed to I")
    a("--stopgrad", action="store_true", help="Table 3: StopGrad on the invariance targets")
    a("--predictor-init", choices=("identity", "random"), default="identity", help="W at step 0")
    a("--amp", choices=("bf16", "fp16", "none"), default=None, help="default: bf16 where supported")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--workers", type=int, default=None, help="data loader processes per device")
    a("--seed", type=int, default=0)
    a("--out", default="out", help="folder for log.jsonl, checkpoint.pt, backbone.pt, wp.png")
    a("--steps", type=int, default=0, help="stop after N optimiser steps (0: run all epochs)")
    a("--log-every", type=int, default=10)
    a("--save-every-steps", type=int, default=0, help="also checkpoint every N steps")
    a("--diag-every", type=int, default=0, help="diagnostics every N steps (0: once per epoch)")
    a("--fresh", action="store_true", help="start over; the old checkpoint and log are moved aside")
    args = p.parse_args(argv)
    profile = PROFILES["synthetic" if args.data == "synthetic" else
                       "cifar" if args.data in ("cifar10", "cifar100") else "folder"]
    for k, v in profile.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    world = int(os.environ.get("WORLD_SIZE", 1))
    parse_proj(args.proj)
    if args.arch not in ARCHS:
        raise UsageError(f"unknown --arch {args.arch!r}; choose one of {', '.join(ARCHS)}")
    for k in ("epochs", "batch_size", "partitions", "img_size", "log_every"):
        if getattr(args, k) <= 0:
            raise UsageError(f"--{k.replace('_', '-')} must be positive, got {getattr(args, k)}")
    if args.partitions % world:
        raise UsageError(f"--partitions {args.partitions} is not a multiple of the world size {world}")
    if args.batch_size % args.partitions:
        raise UsageError(f"--batch-size {args.batch_size} does not split into --partitions "
                         f"{args.partitions} equal parts")
    args.parts_per_device = args.partitions // world
    return args

def main(argv=None):
    args = parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    if args.amp is None:                                  # bf16 where the hardware has it
        args.amp = "bf16" if (torch.cuda.is_bf16_supported() if device.type == "cuda" else
                              getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()) else "none"
    if args.workers is None:
        args.workers = max(0, min(10, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1))
    master, out = rank == 0, args.out
    say = print if master else (lambda *a, **k: None)
    ckpt_path, log_path = os.path.join(out, "checkpoint.pt"), os.path.join(out, "log.jsonl")

    # data (before anything is written, so that bad data costs nothing)
    train, val, num_classes, small = load_data(args.data, args.data_root)
    spe = len(train) // args.batch_size                       # optimiser steps per epoch
    if spe == 0:
        raise UsageError(f"{len(train)} training images are fewer than --batch-size {args.batch_size}")
    if master:                                   # the diagnostics' images, read before writing
        probe = fixed_batch(val, 256, args.img_size, small, device)
        bank = fixed_batch(train, 384, args.img_size, small, device)

    # resume or start
    ckpt = None
    if os.path.exists(ckpt_path):
        if args.fresh and master:
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
            for path in filter(os.path.exists, (ckpt_path, log_path)):
                os.replace(path, f"{path}.{stamp}")
            say(f"--fresh: previous checkpoint and log moved aside (*.{stamp})")
        elif not args.fresh:
            ckpt = load_checkpoint(ckpt_path)
            old = ckpt.get("args", {}) if isinstance(ckpt, dict) else {}
            diff = [f"--{k.replace('_', '-')} {old.get(k)} -> {getattr(args, k)}" for k in RUN_DEFINING
                    if old.get(k) != getattr(args, k)]
            if diff:
                raise UsageError(f"{ckpt_path} was made with other settings ({'; '.join(diff)}); "
                                 f"use the same ones, another --out, or --fresh")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
    for seed in (torch.manual_seed, random.seed, np.random.seed):
        seed(args.seed)

    raw = Decorr(args)
    raw = (sync_batchnorm(raw, device) if world > 1 else raw).to(device)
    raw.backbone.to(memory_format=torch.channels_last)
    opt = make_optimizer(raw, args)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    step = 0
    if ckpt is not None:
        for obj, key in ((raw, "model"), (opt, "optimizer"), (scaler, "scaler")):
            obj.load_state_dict(ckpt[key])
        step = ckpt["step"]
        if len(ckpt["rng"]) == world:
            set_rng_state(ckpt["rng"][rank])
        say(f"resumed from {ckpt_path} at step {step}")
        del ckpt
    model = torch.compile(raw) if args.compile else raw
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if master:
        os.makedirs(out, exist_ok=True)
        rows = [r for r in read_jsonl(log_path) if r.get("step", 0) <= step]   # drop steps redone
        atomic_write(log_path, lambda fh: fh.write("".join(json.dumps(r) + "\n" for r in rows).encode()))

    def save_checkpoint():
        states = [rng_state()] * world
        if world > 1:
            dist.all_gather_object(states, states[0])
        if master:
            state = dict(args=vars(args), step=step, model=raw.state_dict(), optimizer=opt.state_dict(),
                         scaler=scaler.state_dict(), rng=states)
            atomic_write(ckpt_path, lambda fh: torch.save(state, fh))

    stop = []
    for sig in (signal.SIGTERM, signal.SIGUSR1):          # preemption (SLURM sends SIGUSR1 first)
        signal.signal(sig, lambda s, f: stop.append(s))

    views = TwoViews(train, args.img_size, small, args.seed)
    sampler = torch.utils.data.DistributedSampler(train, world, rank, shuffle=True, seed=args.seed, drop_last=True)
    total, local_b = args.epochs * spe, args.batch_size // world
    warmup = min(args.warmup_epochs * spe, total // 10)
    last = min(total, args.steps) if args.steps else total
    amp = dict(bf16=torch.bfloat16, fp16=torch.float16).get(args.amp)
    diag_every = args.diag_every or spe
    say(f"decorr | {args.arch} {args.proj} | {args.data}: {len(train)} images, {spe} steps/epoch, "
        f"{args.epochs} epochs | batch {args.batch_size} on {world} x {device.type} | "
        f"partitions {args.partitions} | amp {args.amp}{' compile' if args.compile else ''}")
    t0, t_last, step0, s_last, saved, stopping, warned = time.time(), time.time(), step, step, step, False, False
    while step < last and not stopping:
        epoch, offset = divmod(step, spe)
        sampler.set_epoch(epoch)
        views.epoch = epoch
        idx = list(sampler)
        batches = [idx[i * local_b:(i + 1) * local_b] for i in range(offset, spe)]
        loader = torch.utils.data.DataLoader(views, batch_sampler=batches, num_workers=args.workers,
                                             pin_memory=device.type == "cuda")
        for x1, x2 in loader:
            x1, x2 = [x.to(device, non_blocking=True, memory_format=torch.channels_last) for x in (x1, x2)]
            lr = learning_rate(step, total, warmup, args.lr * args.batch_size / 256)
            for g in opt.param_groups:
                g["lr"] = lr
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss, inv, cov = model(x1, x2)
            stats = torch.stack([loss.detach(), inv.detach(), cov.detach(),
                                 torch.tensor(float(bool(stop)), device=device)])
            if world > 1:
                dist.all_reduce(stats)
                stats[:3] /= world
            loss_v, inv_v, cov_v, stop_v = stats.tolist()
            if not math.isfinite(loss_v):
                raise FloatingPointError(f"non-finite loss ({loss_v}) at step {step + 1}; the last good "
                                         f"checkpoint is {ckpt_path} (step {saved}), left untouched")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            step += 1
            stopping = stop_v > 0                             # the same decision on every rank
            if master and (step % args.log_every == 0 or step == last or stopping):
                now = time.time()
                ips = (step - s_last) * args.batch_size / (now - t_last)
                eta = (last - step) * (now - t0) / (step - step0)
                append_jsonl(log_path, dict(epoch=epoch, step=step, loss=loss_v, inv=inv_v, cov=cov_v, lr=lr, img_per_s=ips))
                say(f"epoch {epoch + 1}/{args.epochs} step {step}/{last} | loss {loss_v:.4f} inv {inv_v:.4f} "
                    f"cov {cov_v:.4f} | lr {lr:.4f} | {ips:.0f} img/s | eta {datetime.timedelta(seconds=int(eta))}")
                t_last, s_last = now, step
            if master and (step % diag_every == 0 or step == last):
                t_diag = time.time()
                d = diagnostics(raw, probe, bank, num_classes, amp)
                append_jsonl(log_path, dict(epoch=epoch, step=step, **d, diag_s=time.time() - t_diag))
                warn = "  <- collapse?" if collapsing(d["feat_std"], d["eff_rank_proj"]) and not warned else ""
                warned = warned or bool(warn)
                say(f"  diag step {step}: " + " ".join(f"{k} {v:.3f}" for k, v in d.items()) + warn)
                png = torchvision.io.encode_png(wp_picture(raw.predictor.weight)).numpy().tobytes()
                atomic_write(os.path.join(out, "wp.png"), lambda fh: fh.write(png))
            if step == last or stopping or step % spe == 0 or (args.save_every_steps and step % args.save_every_steps == 0):
                save_checkpoint()
                saved = step
            if step == last or stopping:
                break
    if master and not stopping:
        atomic_write(os.path.join(out, "backbone.pt"), lambda fh: torch.save(raw.backbone.state_dict(), fh))
    if world > 1:                                           # every rank holds the same parameters
        sums = [None] * world
        dist.all_gather_object(sums, [p.detach().double().sum().item() for p in raw.parameters()])
        if master:
            append_jsonl(log_path, dict(step=step, ranks_in_sync=all(s == sums[0] for s in sums)))
    say(f"{'stopped by signal' if stopping else 'done'} at step {step}: {out}/" + ("" if stopping else " (backbone.pt, wp.png)"))
    del model, raw, opt
    if world > 1:
        dist.barrier()


if __name__ == "__main__":
    try:
        main()
    except (UsageError, FloatingPointError) as e:
        msg = str(e).strip().splitlines()[-1].split("UsageError: ", 1)[-1]
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"decorr.py: error: {msg}", file=sys.stderr)
        sys.exit(2 if isinstance(e, UsageError) else 1)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
