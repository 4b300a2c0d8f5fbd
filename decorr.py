"""
decorr.py -- self-supervised pre-training with the decorrelation loss of Liu, Suganuma, Okatani,
"Bridging the Gap from Asymmetry Tricks to Decorrelation Principles in Non-contrastive
Self-supervised Learning", NeurIPS 2022; Barlow Twins and VICReg as baselines (--loss).

    backbone -> projector -> standardize (SyncBN, affine=False) -> linear predictor W
    loss = C_inv * ||W F1 - F2||^2 + C_cov / D * sum_parts ||W^T W - W C_part W^T||^2   (eq. 17, 19)

Top to bottom: 1. the method: standardize, decorr_loss, the baselines  2. BatchNorm synchronised
on CPUs  3. the model  4. data, augmentation  5. LARS  6. diagnostics  7. files  8. training.
    python decorr.py                     # synthetic data, under 10 minutes on a 2-core CPU
    torchrun --nproc_per_node=8 decorr.py --data /imagenet --proj 8192-8192-8192
"""

import argparse
import datetime
import functools
import json
import math
import os
import signal
import sys
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image

from data import UsageError, batches, eval_transform, load_data, rank_world

# ----------------------------------------------------------------------------- 1. the method


class AllReduce(torch.autograd.Function):
    """Sum over the ranks of `group`, and so is its backward: exact gradients under DDP's mean."""

    @staticmethod
    def forward(ctx, x, group=None):
        ctx.group, x = group, x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return AllReduce.forward(ctx, grad, ctx.group), None


class AllGather(torch.autograd.Function):
    """The rows of every rank of `group`; backward: my rows of the gradient summed over the ranks."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.new_empty(dist.get_world_size(group) * x.shape[0], *x.shape[1:])
        dist.all_gather_single(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out = grad.new_empty(grad.shape[0] // dist.get_world_size(ctx.group), *grad.shape[1:])
        dist.reduce_scatter_single(out, grad.contiguous(), group=ctx.group)
        return out, None


def global_sum(x):
    return AllReduce.apply(x, None) if rank_world()[1] > 1 else x


def batch_stats(x, dims):
    """Mean and biased variance over `dims` of the global batch (equal batches on all ranks)."""
    world = rank_world()[1]
    mean = global_sum(x.mean(dims)) / world
    return mean, global_sum((x - mean.view(-1, *[1] * (x.dim() - 2))).pow(2).mean(dims)) / world


def working_precision(*ts):
    """The tensors in float32, or all in float64 if one is: the losses' precision under autocast."""
    dtype = torch.float64 if torch.float64 in [t.dtype for t in ts] else torch.float32
    return [t.to(dtype) for t in ts]


def standardize(f, eps=1e-5):
    """Std(f_i) = (f_i - mu_i) / sigma_i per dimension over the (global) batch, appendix eq. 33:
    BatchNorm1d(affine=False) in training mode (biased variance), in working precision."""
    (f,) = working_precision(f)
    mean, var = batch_stats(f, (0,))
    return (f - mean) / torch.sqrt(var + eps)


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
        return 4 * ctx.scale * grad * (w[:, ctx.lo : ctx.hi] @ b), None, None, None


@functools.cache
def part_group(g, world):
    """The process group of this rank's block of g consecutive ranks (made once, by all ranks)."""
    return None if g == world else dist.new_subgroups(g)[0]


def decorr_loss(f1, f2, w, parts=1, inv_coef=1.0, cov_coef=1.0, stopgrad=False):
    """Algorithm 1 (appendix F): returns (loss, inv, cov) for standardized features f1, f2 (n x D,
    this rank's rows) and the predictor weight w (D x D), p = f @ w.T:
        inv = mean((p1 - f2)^2) + mean((p2 - f1)^2)                               eq. 17
        cov = mean over parts j of sum_v ||p_vj^T p_vj / m - W^T W||_F^2          eq. 19
        loss = inv_coef * inv + cov_coef / D * cov
    k = `parts` splits the global batch into parts of m rows; under torch.distributed rank r holds
    rows [r n, (r+1) n), so a rank may hold several parts (k > world), a part span ranks (k < world).
    The value is this rank's share: its mean over ranks (what DDP optimises) is the single-process
    loss with the same k. For m < D, with P = p_vj, no D x D matrix per part is formed:
        ||P^T P/m - W^T W||^2 = ||P P^T||^2/m^2 - 2 ||P W^T||^2/m + ||W^T W||^2;
    a rank forms its rows of its parts' m x m Gram matrices (other ranks' rows gathered with
    autograd) and of W^T W (GramSquare). For m >= D that would cancel near convergence, and a D x D
    matrix is no larger than the part: formed as written, a block of its rows per rank of the part.
    stopgrad: Table 3's StopGrad on the targets. Float32 even under autocast (float64 stays float64)."""
    with torch.autocast(f1.device.type, enabled=False):
        f1, f2, w = working_precision(f1, f2, w)
        (n, D), (rank, world) = f1.shape, rank_world()
        if n * world % parts:
            raise UsageError(f"a batch of {n * world} rows does not split into {parts} equal partitions")
        m = n * world // parts  # rows per part
        g = math.lcm(n, m) // n  # ranks per group: the fewest holding whole parts
        group, lo = part_group(g, world) if g > 1 else None, rank % g * n  # lo: my first row in it
        mine = lambda j: slice(min(max(j * m - lo, 0), n), min(max((j + 1) * m - lo, 0), n))  # of part j
        p1, p2 = f1 @ w.T, f2 @ w.T
        t1, t2 = (f1.detach(), f2.detach()) if stopgrad else (f1, f2)
        inv = (p1 - t2).pow(2).mean() + (p2 - t1).pow(2).mean()
        cov = 0.0
        if m >= D:  # each rank of a group: its block of rows of the D x D difference
            rows = slice(rank % g * D // g, (rank % g + 1) * D // g)
            wtw = w[:, rows].T @ w
            for p in (p1, p2):
                for j in range(g * n // m):  # the group's parts
                    c = p[mine(j)].T @ p[mine(j)]
                    c = AllReduce.apply(c, group) if g > 1 else c
                    cov = cov + (c[rows] / m - wtw).pow(2).sum() * world / parts
        else:
            cov = 2 * GramSquare.apply(w, rank * D // world, (rank + 1) * D // world, world)
            for p in (p1, p2):
                if g == 1:  # whole parts: one product
                    gram = torch.bmm(p.view(-1, m, D), p.view(-1, m, D).transpose(1, 2)).pow(2).sum()
                else:  # my rows of my parts' Grams
                    q = AllGather.apply(p, group)
                    gram = sum(
                        (p[mine(j)] @ q[j * m : (j + 1) * m].T).pow(2).sum()
                        for j in range(lo // m, (lo + n - 1) // m + 1)
                    )
                cov = cov + gram * world / (parts * m * m) - 2 * (p @ w.T).pow(2).sum() / n
        loss = inv_coef * inv + cov_coef / D * cov
    return loss, inv, cov


def barlow_twins_loss(z1, z2, lambd=0.0051):
    """Barlow Twins (Zbontar et al., ICML 2021) as the official main.py: (loss, on_diag, off_diag),
        loss = sum_i (1 - c_ii)^2 + lambd * sum_{i != j} c_ij^2,   c = BN(z1)^T BN(z2) / N
    with BN = standardize, N the global batch and c summed over ranks with AllReduce (the official
    raw all_reduce makes the gradients world-size times too small; these are one process's)."""
    with torch.autocast(z1.device.type, enabled=False):
        c = global_sum(standardize(z1).T @ standardize(z2)) / (z1.shape[0] * rank_world()[1])
        on_diag = (1 - c.diagonal()).pow(2).sum()
        off_diag = c.pow(2).sum() - c.diagonal().pow(2).sum()
    return on_diag + lambd * off_diag, on_diag, off_diag


def vicreg_loss(z1, z2, sim_coef=25.0, std_coef=25.0, cov_coef=1.0):
    """VICReg (Bardes, Ponce, LeCun, ICLR 2022) as the official main_vicreg.py: (loss, inv, var, cov),
        inv = mean((z1 - z2)^2),   var = sum_v mean_i relu(1 - sqrt(C_v,ii + 1e-4)) / 2,
        cov = sum_v sum_{i != j} C_v,ij^2 / D,   loss = sim_coef inv + std_coef var + cov_coef cov
    with C_v view v's covariance over the global batch of N (/ (N - 1)), summed with AllReduce."""
    with torch.autocast(z1.device.type, enabled=False):
        z1, z2 = working_precision(z1, z2)
        (n, D), world = z1.shape, rank_world()[1]
        inv, var, cov = (z1 - z2).pow(2).mean(), 0.0, 0.0
        for z in (z1, z2):
            z = z - batch_stats(z, (0,))[0]
            c = global_sum(z.T @ z) / (n * world - 1)
            var = var + F.relu(1 - torch.sqrt(c.diagonal() + 1e-4)).mean() / 2
            cov = cov + (c.pow(2).sum() - c.diagonal().pow(2).sum()) / D
    return sim_coef * inv + std_coef * var + cov_coef * cov, inv, var, cov


# ----------------------------------------------------------------------------- 2. SyncBatchNorm on CPU


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm with statistics over all ranks, as standardize() (SyncBatchNorm refuses CPU tensors)."""

    def _check_input_dim(self, x):
        pass  # BatchNorm1d and 2d alike

    def forward(self, x):
        if not (self.training and rank_world()[1] > 1):
            return super().forward(x)
        xf = x.float()
        mean, var = batch_stats(xf, [0, *range(2, x.dim())])
        with torch.no_grad():
            n = x.numel() // x.shape[1] * dist.get_world_size()
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * n / max(n - 1, 1), self.momentum)
            self.num_batches_tracked += 1
        col = lambda v: v.view(-1, *[1] * (x.dim() - 2))  # per channel, broadcastable
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
    net = getattr(torchvision.models, arch)(zero_init_residual=True)
    if small_stem:
        net.conv1, net.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    dim, net.fc = net.fc.in_features, nn.Identity()
    return net, dim


def parse_proj(spec):
    dims = [int(d) if d.isdigit() else 0 for d in spec.split("-")]
    if min(dims) <= 0:
        raise UsageError(f"--proj {spec!r} is not a list of positive widths like 8192-8192-8192")
    return dims


def build_projector(in_dim, dims):
    """Linear + BatchNorm + ReLU between layers, plain Linear last; no biases (a BatchNorm follows)."""
    layers = [
        mod
        for d_in, d in zip([in_dim] + dims, dims)
        for mod in (nn.Linear(d_in, d, bias=False), nn.BatchNorm1d(d), nn.ReLU(inplace=True))
    ]
    return nn.Sequential(*layers[:-2])


class Model(nn.Module):
    """Backbone -> projector -> the loss of --loss; forward(x1, x2) returns (loss, *terms). For
    decorr, standardization and the predictor W; the baselines have no predictor."""

    def __init__(self, args):
        super().__init__()
        self.args, (self.backbone, dim), dims = (
            args,
            build_backbone(args.arch, args.img_size <= 64),
            parse_proj(args.proj),
        )
        self.projector, D, self.predictor = build_projector(dim, dims), dims[-1], None
        if args.loss == "decorr":
            # The paper does not state W's init. Identity (default): W^T W = I, the loss's fixed point
            # for decorrelated features; from nn.Linear's random init (appendix C, Fig. 3) W first shrinks.
            self.predictor = nn.Linear(D, D, bias=False)
            if args.identity_predictor or args.predictor_init == "identity":
                self.predictor.weight.data.copy_(torch.eye(D))
            self.predictor.weight.requires_grad_(not args.identity_predictor)  # Table 3: W fixed to I

    def forward(self, x1, x2):
        a = self.args
        f1, f2 = (self.projector(self.backbone(x)) for x in (x1, x2))  # BN statistics per view
        if a.loss == "barlowtwins":
            return barlow_twins_loss(f1, f2, a.cov_coef)
        if a.loss == "vicreg":
            return vicreg_loss(f1, f2, a.inv_coef, a.std_coef, a.cov_coef)
        if not a.no_std:
            f1, f2 = standardize(f1), standardize(f2)
        return decorr_loss(f1, f2, self.predictor.weight, a.partitions, a.inv_coef, a.cov_coef, a.stopgrad)


# ----------------------------------------------------------------------------- 5. optimisation


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as in Barlow Twins: momentum, eta 0.001; groups with lars=False
    (biases, BatchNorm) get neither weight decay nor the trust ratio."""

    def __init__(self, params, lr, weight_decay, momentum=0.9, eta=0.001):
        super().__init__(
            params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta, lars=True)
        )
        self.state.update({p: dict(mu=torch.zeros_like(p)) for g in self.param_groups for p in g["params"]})

    @torch.no_grad()
    def step(self):  # torch._foreach_*: one call per op for all tensors (a GPU step is launch-bound)
        for g in self.param_groups:
            ps = [p for p in g["params"] if p.grad is not None]
            dps = [p.grad for p in ps]  # changed in place: reset before each backward
            if g["lars"]:
                torch._foreach_add_(dps, ps, alpha=g["weight_decay"])
                pn, dn = torch.stack(torch._foreach_norm(ps)), torch.stack(torch._foreach_norm(dps))
                torch._foreach_mul_(
                    dps, list(torch.where((pn > 0) & (dn > 0), g["eta"] * pn / dn, 1.0).unbind())
                )
            mu = [self.state[p]["mu"] for p in ps]
            torch._foreach_mul_(mu, g["momentum"])
            torch._foreach_add_(mu, dps)
            torch._foreach_add_(ps, mu, alpha=-g["lr"])


def make_optimizer(model, args):
    params = [p for p in model.parameters() if p.requires_grad]
    return LARS(
        [
            dict(params=[p for p in params if p.ndim > 1]),
            dict(params=[p for p in params if p.ndim <= 1], lars=False, weight_decay=0.0),
        ],
        lr=0.0,
        weight_decay=args.wd,
        eta=args.lars_eta,
    )


def learning_rate(step, total, warmup, base):  # linear warmup, then cosine decay to 0
    return (
        base * (step + 1) / warmup
        if step < warmup
        else base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    )


def train_step(model, opt, scaler, x1, x2, lr, amp):
    """One update at learning rate lr, forward under autocast(amp): (loss, *terms), unread (bench.py times it)."""
    for g in opt.param_groups:
        g["lr"] = lr
    with torch.autocast(x1.device.type, dtype=amp, enabled=amp is not None):
        loss, *terms = model(x1, x2)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return loss, *terms


# ----------------------------------------------------------------------------- 6. diagnostics


def centred_unit(x, eps=1e-8):
    x = x.float() - x.float().mean(0)
    return x / (x.pow(2).mean(0).sqrt() + eps)


def corr_dist(h):
    """Fig. 1's ||Sigma - I||_F^2 / D, Sigma the correlation of h, via ||Z^T Z/n||^2 = ||Z Z^T||^2/n^2."""
    z, (n, D) = centred_unit(h), h.shape
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


def collapsing(feat_std, rank):  # complete collapse, or one direction left (dimensional)
    return feat_std < 1e-3 or rank < 2.0


def knn_predict(bank, bank_y, query, num_classes, k=20, t=0.07):
    """Cosine k-NN with exp(sim / t)-weighted votes, as in SSL papers (Wu et al. 2018)."""
    bank, query = F.normalize(bank.float(), dim=1), F.normalize(query.float(), dim=1)
    sim, idx = (query @ bank.T).topk(min(k, len(bank)), dim=1)
    votes = query.new_zeros(len(query), num_classes).scatter_add_(
        1, bank_y.to(idx.device)[idx], (sim / t).exp()
    )
    return votes.argmax(1)


def fixed_batch(ds, n, size, small, device):
    """n images spread over ds, without augmentation, and their labels: the diagnostics' batch."""
    evaluate, items = (
        eval_transform(size, small),
        [ds[i] for i in range(0, len(ds), max(1, len(ds) // n))[:n]],
    )
    return torch.stack([evaluate(x) for x, _ in items]).to(device), torch.tensor([y for _, y in items])


@torch.no_grad()
def diagnostics(model, probe, bank, num_classes, amp=None):
    """The mechanism, measured on fixed batches without augmentation, in eval mode, in float32."""
    was_training, ((xq, yq), (xb, yb)) = model.training, (probe, bank)
    model.eval()
    with torch.autocast(xq.device.type, dtype=amp, enabled=amp is not None):
        h, hb = model.backbone(xq).float(), model.backbone(xb).float()
        z = model.projector(h).float()
    out = dict(
        corr_dist=corr_dist(h),
        eff_rank_proj=eff_rank(centred_unit(z)),
        eff_rank_backbone=eff_rank(h),
        feat_std=z.std(0).mean().item(),
    )
    if model.predictor is not None:  # decorr only
        out["wp_offdiag"] = wp_offdiag(model.predictor.weight)
    out["knn_top1"] = 100.0 * (knn_predict(hb, yb, h, num_classes).cpu() == yq).float().mean().item()
    model.train(was_training)
    return out


def wp_picture(w, size=256):
    """Appendix C, Fig. 3: (a) |W_p|, (b) rows divided by their diagonal; side by side, uint8."""
    w = w.detach().float().cpu()
    a, b = (
        F.interpolate(F.adaptive_avg_pool2d(m[None, None], min(size, len(m))), size)[0, 0]
        for m in (w.abs(), (w / w.diagonal()[:, None]).abs())
    )
    a = torch.cat([a / a.max().clamp_min(1e-12), torch.ones(size, 4), b / b.max().clamp_min(1e-12)], 1).clamp(
        0, 1
    )
    return (torch.stack([a.sqrt(), a, a.pow(2)]) * 255).round().to(torch.uint8)  # dark to yellow


# ----------------------------------------------------------------------------- 7. files


def atomic_write(path, write):
    """write(file) to a temporary file, fsync, rename over path: a crash leaves the old or the new file."""
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


def load_checkpoint(path):
    try:
        with warnings.catch_warnings(action="ignore"):  # garbage can look like a pickle header
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(
            f"cannot load checkpoint {path}: {str(e).splitlines()[0][:200]} "
            f"(truncated or not a decorr checkpoint? use --fresh to start over)"
        ) from None


# ----------------------------------------------------------------------------- 8. training

# Defaults that depend on the data: the paper's ImageNet recipe for image folders (sec. 5.1), a
# CPU-sized demo for the built-in synthetic data, the usual CIFAR recipe for CIFAR. Then each
# loss's coefficients (the official ones for the baselines) and the terms it logs.
PROFILES = dict(
    folder=dict(
        arch="resnet50",
        img_size=224,
        proj="2048-2048-2048",
        epochs=100,
        batch_size=2048,
        wd=1e-6,
        lars_eta=0.001,
    ),
    cifar=dict(
        arch="resnet18",
        img_size=32,
        proj="2048-2048-2048",
        epochs=800,
        batch_size=256,
        wd=1e-4,
        lars_eta=0.02,
    ),
    synthetic=dict(
        arch="resnet18", img_size=32, proj="4096-256", epochs=4, batch_size=256, wd=1e-4, lars_eta=0.02
    ),
)
LOSSES = dict(
    decorr=(dict(inv_coef=1.0, cov_coef=1.0), ("inv", "cov")),
    barlowtwins=(dict(cov_coef=0.0051), ("on_diag", "off_diag")),
    vicreg=(dict(inv_coef=25.0, std_coef=25.0, cov_coef=1.0), ("inv", "var", "cov")),
)
RUN_DEFINING = (
    "data",
    "arch",
    "proj",
    "img_size",
    "batch_size",
    "loss",
    "partitions",
    "seed",
    "no_std",
    "lr",
    "wd",
    "identity_predictor",
    "predictor_init",
    "stopgrad",
    "inv_coef",
    "cov_coef",
    "std_coef",
    "lars_eta",
)


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a(
        "--data",
        default="synthetic",
        help="synthetic | cifar10 | cifar100 | PATH (image folders: PATH/train, PATH/val)",
    )
    a("--data-root", default="data", help="where cifar10/cifar100 are (never downloaded)")
    a("--arch", choices=ARCHS, default=None, help="default: resnet50 for folders, else resnet18")
    a("--img-size", type=int, default=None, help="crop size (default: 224 for folders, else 32)")
    a(
        "--proj",
        default=None,
        help="projector widths, the last is D (default: 4096-256 for synthetic, else 2048-2048-2048)",
    )
    a("--epochs", type=int, default=None)
    a("--batch-size", type=int, default=None, help="global batch, over all processes")
    a("--lr", type=float, default=0.3, help="base lr, scaled by batch/256")
    a("--wd", type=float, default=None, help="weight decay (default: 1e-6 for folders, else 1e-4)")
    a(
        "--lars-eta",
        type=float,
        default=None,
        help="LARS trust coefficient (default: 0.001 for folders, 0.02 else)",
    )
    a("--warmup-epochs", type=int, default=10, help="at most a tenth of the run")
    a("--loss", choices=tuple(LOSSES), default="decorr", help="decorr, or a baseline in the same harness")
    a(
        "--partitions",
        type=int,
        default=None,
        help="k, parts of the global batch (default: the number of processes)",
    )
    a("--inv-coef", type=float, default=None, help="C_inv (default 1); vicreg: sim coef (25)")
    a(
        "--cov-coef",
        type=float,
        default=None,
        help="C_cov (default 1); vicreg: cov coef (1); barlowtwins: lambda (0.0051)",
    )
    a("--std-coef", type=float, default=None, help="vicreg: std coef (25)")
    a("--no-std", action="store_true", help="Table 3: no standardization")
    a("--identity-predictor", action="store_true", help="Table 3: W fixed to I")
    a("--stopgrad", action="store_true", help="Table 3: StopGrad on the invariance targets")
    a("--predictor-init", choices=("identity", "random"), default="identity", help="W at step 0")
    a("--amp", choices=("bf16", "fp16", "none"), default=None, help="default: bf16 where supported")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--workers", type=int, default=None, help="image-folder loader processes per device")
    a("--seed", type=int, default=0)
    a("--out", default="out", help="folder for log.jsonl, checkpoint.pt, backbone.pt, wp.png")
    a("--steps", type=int, default=0, help="stop after N optimiser steps (0: run all epochs)")
    a(
        "--log-every",
        type=int,
        default=10,
        help="log, and check for a signal or a non-finite loss, every N steps",
    )
    a("--save-every-steps", type=int, default=0, help="also checkpoint every N steps")
    a("--diag-every", type=int, default=0, help="diagnostics every N steps (0: once per epoch)")
    a("--fresh", action="store_true", help="start over; the old checkpoint and log are moved aside")
    args, world = p.parse_args(argv), int(os.environ.get("WORLD_SIZE", 1))
    profile = PROFILES[
        "synthetic"
        if args.data == "synthetic"
        else "cifar"
        if args.data in ("cifar10", "cifar100")
        else "folder"
    ]
    bf16 = (
        torch.cuda.is_bf16_supported() if torch.cuda.is_available() else torch.cpu._is_avx512_bf16_supported()
    )
    workers = max(0, min(10, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1))
    for k, v in dict(
        profile, partitions=world, amp="bf16" if bf16 else "none", workers=workers, **LOSSES[args.loss][0]
    ).items():
        setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    parse_proj(args.proj)
    for k in ("epochs", "batch_size", "partitions", "img_size", "log_every"):
        if getattr(args, k) <= 0:
            raise UsageError(f"--{k.replace('_', '-')} must be positive, got {getattr(args, k)}")
    for parts, what in (
        (world, f"over {world} processes"),
        (args.partitions, f"into --partitions {args.partitions} equal parts"),
    ):
        if args.batch_size % parts:
            raise UsageError(f"--batch-size {args.batch_size} does not split {what}")
    return args


def resume(args, ckpt_path, log_path, master):
    """The checkpoint to continue, checked to be this run's; None to start (--fresh: the old moved aside)."""
    if not os.path.exists(ckpt_path):
        return None
    if args.fresh:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        for path in filter(os.path.exists, (ckpt_path, log_path) if master else ()):
            os.replace(path, f"{path}.{stamp}")
            print(f"--fresh: {path} moved aside to {path}.{stamp}")
        return None
    ckpt = load_checkpoint(ckpt_path)
    old = ckpt.get("args", {}) if isinstance(ckpt, dict) else {}
    diff = [
        f"--{k.replace('_', '-')} {old.get(k)} -> {getattr(args, k)}"
        for k in RUN_DEFINING
        if old.get(k) != getattr(args, k)
    ]
    if diff:
        raise UsageError(
            f"{ckpt_path} was made with other settings ({'; '.join(diff)}); use the same ones, another --out, or --fresh"
        )
    return ckpt


def main(argv=None):
    args = parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    master, out = rank == 0, args.out
    say = print if master else (lambda *a, **k: None)
    ckpt_path, log_path = os.path.join(out, "checkpoint.pt"), os.path.join(out, "log.jsonl")

    # data and checkpoint before anything is written: bad input costs nothing
    train, val, num_classes, small = load_data(args.data, args.data_root)
    spe, side = (
        len(train) // args.batch_size,
        train.tensors[0].shape[-1] if small else args.img_size,
    )  # steps/epoch
    for bad, why in (
        (spe == 0, f"{len(train)} training images are fewer than --batch-size {args.batch_size}"),
        (side != args.img_size, f"--img-size {args.img_size}: in-memory images train at their size, {side}"),
        (
            args.compile and device.type != "cuda",
            "--compile is for CUDA: on CPUs torch miscompiles this model",
        ),
    ):
        if bad:
            raise UsageError(why)
    if master:  # the diagnostics' fixed batches
        probe, bank = (
            fixed_batch(val, 256, args.img_size, small, device),
            fixed_batch(train, 384, args.img_size, small, device),
        )
    ckpt = resume(args, ckpt_path, log_path, master)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
    torch.manual_seed(args.seed)  # the initial weights: the only random draw
    raw = Model(args)
    raw = (sync_batchnorm(raw, device) if world > 1 else raw).to(device)
    raw.backbone.to(memory_format=torch.channels_last)
    opt, scaler, step = (
        make_optimizer(raw, args),
        torch.amp.GradScaler(device.type, enabled=args.amp == "fp16"),
        0,
    )
    if ckpt is not None:
        for obj, key in ((raw, "model"), (opt, "optimizer"), (scaler, "scaler")):
            obj.load_state_dict(ckpt[key])
        step = ckpt["step"]
        say(f"resumed from {ckpt_path} at step {step}")
        del ckpt
    model = torch.compile(raw) if args.compile else raw
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if master:
        os.makedirs(out, exist_ok=True)
        rows = (
            [json.loads(r) for r in open(log_path).read().split("\n") if r.endswith("}")]
            if os.path.exists(log_path)
            else []
        )
        rows = [r for r in rows if r.get("step", 0) <= step]  # drop a line cut by a crash, and steps redone
        atomic_write(log_path, lambda fh: fh.write("".join(json.dumps(r) + "\n" for r in rows).encode()))
    stop = []
    for sig in (signal.SIGTERM, signal.SIGUSR1):  # preemption (SLURM sends SIGUSR1 first)
        signal.signal(sig, lambda s, f: stop.append(s))

    total, terms, amp = (
        args.epochs * spe,
        LOSSES[args.loss][1],
        dict(bf16=torch.bfloat16, fp16=torch.float16).get(args.amp),
    )
    warmup, last = min(args.warmup_epochs * spe, total // 10), min(total, args.steps or total)
    k = (
        f" | partitions {args.partitions} of {args.batch_size // args.partitions} images"
        if raw.predictor
        else ""
    )
    say(
        f"{args.loss} | {args.arch} {args.proj} | {args.data}: {len(train)} images, {spe} steps/epoch, {args.epochs} "
        f"epochs | batch {args.batch_size} on {world} x {device.type}{k} | amp {args.amp}{' compile' if args.compile else ''}"
    )
    t0 = t_last = time.time()
    step0 = s_last = saved = step
    stopping, bad_images, seen_bad, reported = False, 0, 0, set()
    for x1, x2, bad in batches(train, args.img_size <= 64, args, device, step, last):
        for path in sorted(set(bad) - reported):
            print(
                f"decorr.py: cannot read image {path}: replaced by the next readable one (log.jsonl: bad_images)",
                flush=True,
            )
        reported.update(bad)
        epoch, lr, seen_bad = (
            step // spe,
            learning_rate(step, total, warmup, args.lr * args.batch_size / 256),
            seen_bad + len(bad),
        )
        loss, *term_values = train_step(model, opt, scaler, x1, x2, lr, amp)
        step += 1  # done
        logs, diag = (
            step % args.log_every == 0 or step == last,
            step % (args.diag_every or spe) == 0 or step == last,
        )
        save = step == last or step % spe == 0 or step % (args.save_every_steps or spe) == 0
        if logs or diag or save:  # the CPU reads the device here only: in between, a GPU never waits for it
            stats = torch.stack(
                [
                    loss.detach(),
                    *(t.detach() for t in term_values),
                    *torch.tensor([seen_bad, bool(stop)], dtype=loss.dtype, device=device),
                ]
            )
            if world > 1:
                dist.all_reduce(stats)
                stats[:-2] /= world
            loss_v, *values, bad_images, stopping = stats.tolist()  # all ranks decide alike
            if not math.isfinite(loss_v):
                raise FloatingPointError(
                    f"non-finite loss ({loss_v}) at step {step}; the last good "
                    f"checkpoint is {ckpt_path} (step {saved}), left untouched"
                )
        if master and (logs or stopping):
            now = time.time()
            ips, eta = (
                (step - s_last) * args.batch_size / (now - t_last),
                (last - step) * (now - t0) / (step - step0),
            )
            append_jsonl(
                log_path,
                dict(
                    epoch=epoch,
                    step=step,
                    loss=loss_v,
                    **dict(zip(terms, values)),
                    lr=lr,
                    img_per_s=ips,
                    bad_images=int(bad_images),
                ),
            )
            say(
                f"epoch {epoch + 1}/{args.epochs} step {step}/{last} | loss {loss_v:.4f} "
                + " ".join(f"{k} {v:.4f}" for k, v in zip(terms, values))
                + f" | lr {lr:.4f} | {ips:.0f} img/s | eta {datetime.timedelta(seconds=int(eta))}"
            )
            t_last, s_last = now, step
        if master and diag:
            t_diag = time.time()
            d = diagnostics(raw, probe, bank, num_classes, amp)
            append_jsonl(log_path, dict(epoch=epoch, step=step, **d, diag_s=time.time() - t_diag))
            say(
                f"  diag step {step}: "
                + " ".join(f"{k} {v:.3f}" for k, v in d.items())
                + ("  <- collapse?" if collapsing(d["feat_std"], d["eff_rank_proj"]) else "")
            )
            if raw.predictor:
                pic = Image.fromarray(wp_picture(raw.predictor.weight).permute(1, 2, 0).numpy())
                atomic_write(os.path.join(out, "wp.png"), lambda fh: pic.save(fh, format="PNG"))
        if master and (save or stopping):
            state = dict(
                args=vars(args),
                step=step,
                model=raw.state_dict(),
                optimizer=opt.state_dict(),
                scaler=scaler.state_dict(),
            )
            atomic_write(ckpt_path, lambda fh: torch.save(state, fh))
            saved = step
        if stopping:
            break
    if master and not stopping:
        atomic_write(os.path.join(out, "backbone.pt"), lambda fh: torch.save(raw.backbone.state_dict(), fh))
    say(f"{'stopped by signal' if stopping else 'done'} at step {step}: {out}/")
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
