"""
decorr.py -- self-supervised pre-training with the decorrelation loss of Liu, Suganuma, Okatani,
"Bridging the Gap from Asymmetry Tricks to Decorrelation Principles in Non-contrastive
Self-supervised Learning", NeurIPS 2022; Barlow Twins, VICReg, and the asymmetric SimSiam and BYOL
(baselines.py) in the same harness (--loss).

    backbone -> projector -> standardize (SyncBN, affine=False) -> linear predictor W
    loss = C_inv * ||W F1 - F2||^2 + C_cov / D * sum_parts ||W^T W - W C_part W^T||^2   (eq. 17, 19)

Top to bottom: 1. the method: standardize, decorr_loss, Barlow Twins and VICReg  2. the model
3. LARS and the schedule  4. diagnostics  5. files  6. training. The data and the augmentation are
in data.py, the command line and its checks in config.py, SimSiam, BYOL and the bridge's measures in
baselines.py, the sums over processes and BatchNorm synchronised on CPUs in distributed.py.
    python decorr.py                     # synthetic data, under 10 minutes on a 2-core CPU
    torchrun --nproc_per_node=8 decorr.py --data /imagenet --proj 8192-8192-8192
"""

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

from baselines import (
    bridge_align,
    bridge_dist,
    byol_loss,
    byol_predictor,
    byol_tau,
    ema_update,
    linear_predictor,
    make_target,
    simsiam_loss,
    simsiam_predictor,
    simsiam_projector,
)
from config import LOSSES, RUN_DEFINING, flag, parse_args, parse_proj
from curves import check_wandb, draw_curves, draw_wp, wandb_finish, wandb_images, wandb_log, wandb_start
from data import (
    UsageError,
    append_jsonl,
    atomic_write,
    batches,
    eval_transform,
    hold_folder,
    load_data,
    rank_world,
    read_jsonl,
    release_folder,
)
from distributed import AllGather, AllReduce, batch_stats, global_sum, sync_batchnorm

# ----------------------------------------------------------------------------- 1. the method


def working_precision(*tensors):
    """The tensors in float32, or all in float64 if one is: the losses' precision under autocast."""
    if torch.float64 in [t.dtype for t in tensors]:
        dtype = torch.float64
    else:
        dtype = torch.float32
    return [t.to(dtype) for t in tensors]


def standardize(f, eps=1e-5):
    """Std(f_i) = (f_i - mu_i) / sigma_i per dimension over the (global) batch, appendix eq. 33:
    BatchNorm1d(affine=False) in training mode (biased variance), in working precision."""
    (f,) = working_precision(f)
    mean, var = batch_stats(f, (0,))
    return (f - mean) / torch.sqrt(var + eps)


class GramSquare(torch.autograd.Function):
    """scale * ||W[:, lo:hi]^T W||_F^2 with the symmetric backward 4 scale W[:, lo:hi] (W[:, lo:hi]^T W):
    for lo:hi = all, d||W^T W||^2/dW = 4 W (W^T W) (Lemma 3.2), one D^3 product where autograd spends
    two. With this rank's rows and scale = world size, the mean of the gradients over ranks is exact."""

    @staticmethod
    def forward(ctx, w, lo, hi, scale):
        block = w[:, lo:hi].T @ w
        ctx.save_for_backward(w, block)
        ctx.lo = lo
        ctx.hi = hi
        ctx.scale = scale
        return scale * block.pow(2).sum()

    @staticmethod
    def backward(ctx, grad):
        w, block = ctx.saved_tensors
        return 4 * ctx.scale * grad * (w[:, ctx.lo : ctx.hi] @ block), None, None, None


@functools.cache
def part_group(ranks_per_group, world):
    """The process group of this rank's block of consecutive ranks (made once, by all ranks)."""
    if ranks_per_group == world:
        return None
    return dist.new_subgroups(ranks_per_group)[0]


def rows_of_part(part, part_size, first_row, n):
    """The slice of this rank's n rows that belongs to part `part`, whose rows start at part * part_size
    in the group; first_row is this rank's first row in the group. Empty when the part is elsewhere."""
    start = min(max(part * part_size - first_row, 0), n)
    stop = min(max((part + 1) * part_size - first_row, 0), n)
    return slice(start, stop)


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
        n, D = f1.shape
        rank, world = rank_world()
        if n * world % parts:
            raise UsageError(f"a batch of {n * world} rows does not split into {parts} equal partitions")
        m = n * world // parts  # rows per part
        g = math.lcm(n, m) // n  # ranks per group: the fewest ranks that hold whole parts
        group = part_group(g, world) if g > 1 else None
        first_row = rank % g * n  # my first row in the group
        p1 = f1 @ w.T
        p2 = f2 @ w.T
        if stopgrad:
            t1, t2 = f1.detach(), f2.detach()
        else:
            t1, t2 = f1, f2
        inv = (p1 - t2).pow(2).mean() + (p2 - t1).pow(2).mean()  # eq. 17
        cov = 0.0
        if m >= D:  # each rank of a group: its block of rows of the D x D difference
            rows = slice(rank % g * D // g, (rank % g + 1) * D // g)
            wtw = w[:, rows].T @ w
            for p in (p1, p2):
                for j in range(g * n // m):  # the group's parts
                    mine = rows_of_part(j, m, first_row, n)
                    c = p[mine].T @ p[mine]
                    if g > 1:
                        c = AllReduce.apply(c, group)
                    cov = cov + (c[rows] / m - wtw).pow(2).sum() * world / parts  # eq. 19
        else:
            cov = 2 * GramSquare.apply(w, rank * D // world, (rank + 1) * D // world, world)
            for p in (p1, p2):
                if g == 1:  # whole parts: one batched product
                    blocks = p.view(-1, m, D)
                    gram = torch.bmm(blocks, blocks.transpose(1, 2)).pow(2).sum()
                else:  # my rows of my parts' Gram matrices
                    q = AllGather.apply(p, group)
                    my_parts = range(first_row // m, (first_row + n - 1) // m + 1)
                    gram = sum(
                        (p[rows_of_part(j, m, first_row, n)] @ q[j * m : (j + 1) * m].T).pow(2).sum()
                        for j in my_parts
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
        global_batch = z1.shape[0] * rank_world()[1]
        c = global_sum(standardize(z1).T @ standardize(z2)) / global_batch
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
        n, D = z1.shape
        world = rank_world()[1]
        inv = (z1 - z2).pow(2).mean()
        var = 0.0
        cov = 0.0
        for z in (z1, z2):
            z = z - batch_stats(z, (0,))[0]
            c = global_sum(z.T @ z) / (n * world - 1)
            var = var + F.relu(1 - torch.sqrt(c.diagonal() + 1e-4)).mean() / 2
            cov = cov + (c.pow(2).sum() - c.diagonal().pow(2).sum()) / D
    return sim_coef * inv + std_coef * var + cov_coef * cov, inv, var, cov


# ----------------------------------------------------------------------------- 2. the model


def build_backbone(arch, small_stem):
    """torchvision ResNet without fc, zero_init_residual=True (sec. 5.1); for images of 64 px or
    less the CIFAR stem: 3x3 conv, stride 1, no max-pool. Returns (backbone, feature dim).
    A backbone.pt that decorr.py writes loads into build_backbone(arch, small_stem)[0]."""
    net = getattr(torchvision.models, arch)(zero_init_residual=True)
    if small_stem:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


def build_projector(in_dim, dims):
    """Linear + BatchNorm + ReLU between layers, plain Linear last; no biases (a BatchNorm follows)."""
    layers = []
    for d_in, d_out in zip([in_dim] + dims, dims):
        layers.append(nn.Linear(d_in, d_out, bias=False))
        layers.append(nn.BatchNorm1d(d_out))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers[:-2])


class Model(nn.Module):
    """Backbone -> projector -> the loss of --loss; forward(x1, x2) returns (loss, *terms). For
    decorr, standardization and the predictor W; SimSiam and BYOL have a predictor (an MLP, or W with
    --predictor linear), BYOL a target network; Barlow Twins and VICReg none."""

    def __init__(self, args):
        super().__init__()
        self.args = args
        self.backbone, dim = build_backbone(args.arch, small_stem=args.img_size <= 64)
        dims = parse_proj(args.proj)
        if args.loss == "simsiam":
            self.projector = simsiam_projector(dim, dims)
        else:
            self.projector = build_projector(dim, dims)
        self.predictor = None
        self.target = None
        if args.loss == "decorr":
            D = dims[-1]
            # The paper does not state W's init. Identity (default): W^T W = I, the loss's fixed point
            # for decorrelated features; from nn.Linear's random init (appendix C, Fig. 3) W first shrinks.
            self.predictor = nn.Linear(D, D, bias=False)
            if args.identity_predictor or args.predictor_init == "identity":
                self.predictor.weight.data.copy_(torch.eye(D))
            self.predictor.weight.requires_grad_(not args.identity_predictor)  # Table 3: W fixed to I
        if args.loss in ("simsiam", "byol"):
            self.predictor = self.build_predictor(dims[-1])
        if args.loss == "byol":  # the target network: backbone + projector, an average of the online ones
            self.target = make_target(self.online())

    def build_predictor(self, D):
        if self.args.predictor == "linear":
            return linear_predictor(D)
        if self.args.loss == "simsiam":
            return simsiam_predictor(D)
        return byol_predictor(D)

    def online(self):
        """The network that BYOL's target averages: backbone and projector (as one module)."""
        return nn.Sequential(self.backbone, self.projector)

    def linear_weight(self):
        """W of a linear predictor (decorr, or --predictor linear); None for an MLP or no predictor."""
        if isinstance(self.predictor, nn.Linear):
            return self.predictor.weight
        return None

    def forward(self, x1, x2):
        loss, *terms = self.method_loss(x1, x2)
        if self.args.loss_scale != 1:  # solo-learn's recipe scales Barlow Twins' loss by 0.1
            loss = loss * self.args.loss_scale
        return loss, *terms

    def method_loss(self, x1, x2):
        args = self.args
        f1 = self.projector(self.backbone(x1))  # BatchNorm statistics per view
        f2 = self.projector(self.backbone(x2))
        if args.loss == "barlowtwins":
            return barlow_twins_loss(f1, f2, args.cov_coef)
        if args.loss == "vicreg":
            return vicreg_loss(f1, f2, args.inv_coef, args.std_coef, args.cov_coef)
        if args.loss == "simsiam":
            return simsiam_loss(self.predictor(f1), self.predictor(f2), f1, f2)
        if args.loss == "byol":
            with torch.no_grad():  # the target's BatchNorms in training mode, as the online ones
                target1 = self.target(x1)
                target2 = self.target(x2)
            return byol_loss(self.predictor(f1), self.predictor(f2), target1, target2)
        if not args.no_std:
            f1 = standardize(f1)
            f2 = standardize(f2)
        w = self.predictor.weight
        return decorr_loss(f1, f2, w, args.partitions, args.inv_coef, args.cov_coef, args.stopgrad)


# ----------------------------------------------------------------------------- 3. LARS and the schedule


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as in Barlow Twins: momentum, eta 0.001; groups with lars=False
    (biases, BatchNorm) get neither weight decay nor the trust ratio. clip: the trust ratio r becomes
    min(r / lr, 1), so a weight's step is min(r, lr) (g + wd w): apex LARC's clip mode, solo-learn's
    clip_lr in its CIFAR recipes."""

    def __init__(self, params, lr, weight_decay, momentum=0.9, eta=0.001, clip=False):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta, lars=True, clip=clip)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p] = dict(mu=torch.zeros_like(p))

    @torch.no_grad()
    def step(self):
        # torch._foreach_*: one call per op for all tensors (a GPU step is launch-bound)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]  # changed in place: reset before each backward
            if group["lars"]:
                torch._foreach_add_(grads, params, alpha=group["weight_decay"])
                param_norms = torch.stack(torch._foreach_norm(params))
                grad_norms = torch.stack(torch._foreach_norm(grads))
                both_positive = (param_norms > 0) & (grad_norms > 0)
                trust = torch.where(both_positive, group["eta"] * param_norms / grad_norms, 1.0)
                if group["clip"] and group["lr"] > 0:
                    trust = torch.clamp(trust / group["lr"], max=1.0)
                torch._foreach_mul_(grads, list(trust.unbind()))
            momenta = [self.state[p]["mu"] for p in params]
            torch._foreach_mul_(momenta, group["momentum"])
            torch._foreach_add_(momenta, grads)
            torch._foreach_add_(params, momenta, alpha=-group["lr"])


def make_optimizer(model, args):
    """LARS on the weights, biases and BatchNorm parameters without weight decay or trust ratio; or
    (--optimizer sgd) SimSiam's SGD: momentum 0.9, weight decay on every parameter (main_simsiam.py)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "sgd":
        groups = [dict(params=params)]
    else:
        weights = [p for p in params if p.ndim > 1]
        others = [p for p in params if p.ndim <= 1]
        groups = [dict(params=weights), dict(params=others, lars=False, weight_decay=0.0)]
    if args.fix_pred_lr:
        groups = fixed_predictor_lr(groups, model.predictor, base_learning_rate(args))
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=0.9, weight_decay=args.wd)
    return LARS(groups, lr=0.0, weight_decay=args.wd, eta=args.lars_eta, clip=args.lars_clip)


def fixed_predictor_lr(groups, predictor, lr):
    """SimSiam's --fix-pred-lr: each group split in two, the predictor's share keeps lr throughout."""
    predictor_ids = {id(p) for p in predictor.parameters()}
    split = []
    for group in groups:
        others = [p for p in group["params"] if id(p) not in predictor_ids]
        mine = [p for p in group["params"] if id(p) in predictor_ids]
        split.append(dict(group, params=others))
        split.append(dict(group, params=mine, fixed_lr=lr))
    return split


def base_learning_rate(args):
    """--lr scaled by batch/256 (the linear scaling rule of the paper and of every baseline)."""
    return args.lr * args.batch_size / 256


def learning_rate(step, total, warmup, base, from_zero=False):
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `total`. The warm-up's first step
    runs at base / warmup, or at 0 with from_zero (--warmup-steps, as Barlow Twins' and VICReg's main.py)."""
    if step < warmup:
        reached = step if from_zero else step + 1
        return base * reached / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * progress))


def train_step(model, opt, scaler, x1, x2, lr, amp):
    """One update at learning rate lr, forward under autocast(amp): (loss, *terms), not read back to the
    CPU (bench.py times this function)."""
    for group in opt.param_groups:
        group["lr"] = group.get("fixed_lr", lr)
    with torch.autocast(x1.device.type, dtype=amp, enabled=amp is not None):
        loss, *terms = model(x1, x2)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return loss, *terms


# ----------------------------------------------------------------------------- 4. diagnostics


def centred_unit(x, eps=1e-8):
    """Each column centred and scaled to unit root mean square."""
    x = x.float() - x.float().mean(0)
    return x / (x.pow(2).mean(0).sqrt() + eps)


def corr_dist(h):
    """Fig. 1's ||Sigma - I||_F^2 / D, Sigma the correlation of h, via ||Z^T Z/n||^2 = ||Z Z^T||^2/n^2."""
    z = centred_unit(h)
    n, D = h.shape
    return ((z @ z.T).pow(2).sum() / n**2 - 2 * z.pow(2).sum() / n + D).item() / D


def wp_offdiag(w):
    """W_p's energy off the diagonal, rows divided by their diagonal entry (Fig. 3b); 0 if diagonal."""
    scaled = w.float() / w.float().diagonal().unsqueeze(1)
    return (1 - scaled.shape[0] / scaled.pow(2).sum()).item()


def eff_rank(x):
    """exp(entropy of the normalised singular values) of the centred x: about r for rank r."""
    s = torch.linalg.svdvals(x.float() - x.float().mean(0))
    p = s / s.sum().clamp_min(1e-12)
    return math.exp(-(p * p.clamp_min(1e-12).log()).sum().item())


def collapsing(feat_std, rank):
    """Complete collapse, or one direction left (dimensional collapse)."""
    return feat_std < 1e-3 or rank < 2.0


def knn_predict(bank, bank_y, query, num_classes, k=20, t=0.07):
    """Cosine k-NN with exp(sim / t)-weighted votes, as in SSL papers (Wu et al. 2018)."""
    bank = F.normalize(bank.float(), dim=1)
    query = F.normalize(query.float(), dim=1)
    sim, idx = (query @ bank.T).topk(min(k, len(bank)), dim=1)
    votes = query.new_zeros(len(query), num_classes)
    votes.scatter_add_(1, bank_y.to(idx.device)[idx], (sim / t).exp())
    return votes.argmax(1)


def fixed_batch(dataset, n, size, small, device, unreadable=None):
    """n images spread over the dataset, without augmentation, and their labels: the diagnostics' batch.
    An image folder's unreadable images, each replaced by the next readable one, are added to the
    list unreadable."""
    evaluate = eval_transform(size, small)
    indices = range(0, len(dataset), max(1, len(dataset) // n))[:n]
    items = []
    for i in indices:
        if hasattr(dataset, "read"):  # an image folder: (image, label, the unreadable paths skipped)
            image, label, bad = dataset.read(i)
            if unreadable is not None:
                unreadable.extend(bad)
            items.append((image, label))
        else:
            items.append(dataset[i])
    images = torch.stack([evaluate(x) for x, _ in items]).to(device)
    labels = torch.tensor([y for _, y in items])
    return images, labels


@torch.no_grad()
def diagnostics(model, probe, bank, num_classes, amp=None):
    """The mechanism, measured on fixed batches without augmentation, in eval mode, in float32."""
    was_training = model.training
    probe_x, probe_y = probe
    bank_x, bank_y = bank
    model.eval()
    with torch.autocast(probe_x.device.type, dtype=amp, enabled=amp is not None):
        h = model.backbone(probe_x).float()
        h_bank = model.backbone(bank_x).float()
        z = model.projector(h).float()
    out = dict(
        corr_dist=corr_dist(h),
        eff_rank_proj=eff_rank(centred_unit(z)),
        eff_rank_backbone=eff_rank(h),
        feat_std=z.std(0).mean().item(),
    )
    w = model.linear_weight()
    if w is not None:  # a linear predictor: how W_p lines up with the second moment of its input
        f = predictor_input(model.args, z)
        out["wp_offdiag"] = wp_offdiag(w)
        out["bridge_dist"] = bridge_dist(w, f)
        out["bridge_align"] = bridge_align(w, f)
    predicted = knn_predict(h_bank, bank_y, h, num_classes).cpu()
    out["knn_top1"] = 100.0 * (predicted == probe_y).float().mean().item()
    model.train(was_training)
    return out


def predictor_input(args, z):
    """What a linear predictor sees: decorr's standardized projection (over this batch, eq. 33), else z."""
    if args.loss == "decorr" and not args.no_std:
        return (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-5)
    return z


# ----------------------------------------------------------------------------- 5. files


def load_checkpoint(path, advice="use --fresh to start over"):
    """torch.load of a file we wrote; an empty, truncated or foreign file is a UsageError naming it."""
    if os.path.getsize(path) == 0:
        raise UsageError(f"checkpoint {path} is empty (a crash while it was copied?); {advice}")
    try:
        with warnings.catch_warnings(action="ignore"):  # garbage can look like a pickle header
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [""])[0]
        if not reason or len(reason) > 100:
            reason = type(e).__name__
        raise UsageError(
            f"cannot load checkpoint {path}: not a complete PyTorch file ({reason}); {advice}"
        ) from None


def load_run_checkpoint(path):
    """A checkpoint of decorr.py: a dict with the run's args, step, model, optimizer and scaler."""
    ckpt = load_checkpoint(path)
    keys = ("args", "step", "model", "optimizer", "scaler")
    if not isinstance(ckpt, dict) or not all(key in ckpt for key in keys):
        raise UsageError(
            f"{path} is not a checkpoint of decorr.py; use another --out, or --fresh to start over"
        )
    return ckpt


def all_finite(model):
    """One tensor, True when every parameter and buffer of the model is finite."""
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    return torch.stack([torch.isfinite(t).all() for t in tensors]).all()


# ----------------------------------------------------------------------------- 6. training

OUTPUTS = ("checkpoint.pt", "log.jsonl", "backbone.pt", "wp.png", "curves.png", "eval.jsonl", "wandb_id.txt")


def move_aside(out):
    """--fresh: every output of the old run renamed with one timestamp: nothing in out/ is the old run's."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    for name in OUTPUTS:
        path = os.path.join(out, name)
        if os.path.exists(path):
            os.replace(path, f"{path}.{stamp}")
            print(f"--fresh: {path} moved aside to {path}.{stamp}")


def resume(args, ckpt_path, master):
    """The checkpoint to continue, checked to be this run's; None to start (--fresh: the old moved aside)."""
    if args.fresh:
        if master:
            move_aside(args.out)
        return None
    if not os.path.exists(ckpt_path):
        return None
    ckpt = load_run_checkpoint(ckpt_path)
    old = ckpt["args"]
    diff = []
    for name in RUN_DEFINING:
        if old.get(name) != getattr(args, name):
            diff.append(f"{flag(name)} {old.get(name)} -> {getattr(args, name)}")
    if diff:
        raise UsageError(
            f"{ckpt_path} was made with other settings ({'; '.join(diff)}); "
            f"use the same ones, another --out, or --fresh"
        )
    return ckpt


def check_data(args, train, small, device):
    """Steps per epoch, after the checks that need the data."""
    steps_per_epoch = len(train) // args.batch_size
    side = train.tensors[0].shape[-1] if small else args.img_size
    if steps_per_epoch == 0:
        raise UsageError(f"{len(train)} training images are fewer than --batch-size {args.batch_size}")
    if side != args.img_size:
        raise UsageError(f"--img-size {args.img_size}: in-memory images train at their size, {side}")
    if args.compile and device.type != "cuda":
        raise UsageError("--compile is for CUDA: on CPUs torch miscompiles this model")
    total = args.epochs * steps_per_epoch
    if args.warmup_steps is not None and args.warmup_steps >= total:
        raise UsageError(f"--warmup-steps {args.warmup_steps} leaves nothing of the run's {total} steps")
    return steps_per_epoch


def build_model(args, device, world):
    """The model on the device, its BatchNorms synchronised across processes when there are several."""
    torch.manual_seed(args.seed)  # the initial weights: the only random draw
    model = Model(args)
    if world > 1:
        model = sync_batchnorm(model, device)
    model = model.to(device)
    model.backbone.to(memory_format=torch.channels_last)
    if model.target is not None:
        model.target.to(memory_format=torch.channels_last)
    return model


def trim_log(log_path, step):
    """Keep the log's complete rows up to `step`: a line cut by a crash and the steps redone go."""
    rows = [row for row in read_jsonl(log_path) if row.get("step", 0) <= step]
    text = "".join(json.dumps(row) + "\n" for row in rows)
    atomic_write(log_path, lambda fh: fh.write(text.encode()))


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def catch_stop_signals(numbers=STOP_SIGNALS):
    """(a list, the handlers replaced): SIGTERM, SIGUSR1 (preemption: SLURM sends SIGUSR1 first) and a
    first Ctrl-C append to the list, and the run stops with a checkpoint; a second Ctrl-C aborts."""
    received = []

    def stop(number, frame):
        received.append(number)

    def interrupt(number, frame):
        if signal.SIGINT in received:
            raise KeyboardInterrupt
        received.append(number)
        print(
            "decorr.py: Ctrl-C: stopping with a checkpoint; Ctrl-C again aborts", file=sys.stderr, flush=True
        )

    previous = {}
    for number in numbers:
        previous[number] = signal.signal(number, interrupt if number == signal.SIGINT else stop)
    return received, previous


def read_device(loss, term_values, seen_bad, stop, device, world):
    """(loss, terms, bad images, stop) as Python numbers, the same on every rank: the one sync."""
    flags = torch.tensor([seen_bad, bool(stop)], dtype=loss.dtype, device=device)
    stats = torch.stack([loss.detach(), *(t.detach() for t in term_values), *flags])
    if world > 1:
        dist.all_reduce(stats)
        stats[:-2] /= world
    loss_value, *values, bad_images, stopping = stats.tolist()
    return loss_value, values, bad_images, stopping


def header_line(args, train, steps_per_epoch, world, device):
    parts = ""
    if args.loss == "decorr":
        parts = f" | partitions {args.partitions} of {args.batch_size // args.partitions} images"
    compiled = " compile" if args.compile else ""
    stem = "CIFAR" if args.img_size <= 64 else "ImageNet"
    return (
        f"{args.loss} | {args.arch} ({stem} stem) {args.proj} | {args.data}: {len(train)} images, "
        f"{steps_per_epoch} steps/epoch, {args.epochs} epochs | batch {args.batch_size} on {world} x "
        f"{device.type}{parts} | amp {args.amp}{compiled}"
    )


def progress_line(epoch, args, step, last, loss_value, terms, lr, img_per_s, eta):
    term_text = " ".join(f"{name} {value:.4f}" for name, value in terms.items())
    return (
        f"epoch {epoch + 1}/{args.epochs} step {step}/{last} | loss {loss_value:.4f} {term_text} | "
        f"lr {lr:.4f} | {img_per_s:.0f} img/s | eta {datetime.timedelta(seconds=int(eta))}"
    )


def run_diagnostics(raw_model, probe, bank, num_classes, amp, out, log_path, epoch, step):
    """The diagnostics pass: a row in the log, a line on stdout, and wp.png for a linear predictor."""
    started = time.time()
    values = diagnostics(raw_model, probe, bank, num_classes, amp)
    row = dict(epoch=epoch, step=step, **values, diag_s=time.time() - started)
    append_jsonl(log_path, row)
    line = f"  diag step {step}: " + " ".join(f"{name} {value:.3f}" for name, value in values.items())
    if collapsing(values["feat_std"], values["eff_rank_proj"]):
        line += "  <- collapse?"
    print(line)
    if raw_model.linear_weight() is not None:
        draw_wp(raw_model.linear_weight(), step, os.path.join(out, "wp.png"))
    draw_curves(log_path, os.path.join(out, "curves.png"))
    return row


def save_checkpoint(path, args, step, raw_model, opt, scaler):
    state = dict(
        args=vars(args),
        step=step,
        model=raw_model.state_dict(),
        optimizer=opt.state_dict(),
        scaler=scaler.state_dict(),
    )
    atomic_write(path, lambda fh: torch.save(state, fh))


def restore(ckpt, ckpt_path, raw_model, opt, scaler):
    try:
        raw_model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
    except (RuntimeError, ValueError, KeyError) as e:
        reason = str(e).strip().splitlines()[0][:100]
        raise UsageError(
            f"{ckpt_path} does not fit this model ({reason}); use another --out, or --fresh"
        ) from None


def last_good(ckpt_path, saved):
    """Where the run can be taken up again: the last checkpoint written, whose weights were finite."""
    if saved is None:
        return "no checkpoint was written"
    return f"the last good checkpoint is {ckpt_path} (step {saved}), left untouched"


def main(argv=None):
    args = parse_args(argv)
    if args.wandb:
        check_wandb()  # before anything is written: without the package, one line and exit 2
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    else:
        device = torch.device("cpu")
    master = rank == 0
    say = print if master else (lambda *a, **k: None)
    out = args.out
    ckpt_path = os.path.join(out, "checkpoint.pt")
    log_path = os.path.join(out, "log.jsonl")

    # data and checkpoint before anything is written: bad input costs nothing
    train, val, num_classes, small = load_data(args.data, args.data_root)
    steps_per_epoch = check_data(args, train, small, device)
    if master:  # the diagnostics' fixed batches
        unreadable = []
        probe = fixed_batch(val, 256, args.img_size, small, device, unreadable)
        bank = fixed_batch(train, 384, args.img_size, small, device, unreadable)
    total = args.epochs * steps_per_epoch
    warmup = min(args.warmup_epochs * steps_per_epoch, total // 10)  # at most a tenth of the run
    if args.warmup_steps is not None:
        warmup = args.warmup_steps
    last = min(total, args.steps or total)
    if master:  # from here the folder is this run's (an OS lock): a second run on it is refused
        hold_folder(out)
    ckpt = resume(args, ckpt_path, master)
    if ckpt is not None and ckpt["step"] >= last:
        say(f"{ckpt_path} is at step {ckpt['step']}, the last step asked for is {last}: nothing to do")
        release_folder(out)
        return

    # the model, the optimiser and the processes
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
    raw_model = build_model(args, device, world)
    opt = make_optimizer(raw_model, args)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    step = 0
    if ckpt is not None:
        restore(ckpt, ckpt_path, raw_model, opt, scaler)
        step = ckpt["step"]
        say(f"resumed from {ckpt_path} at step {step}")
        del ckpt
    model = raw_model
    if args.compile:
        model = torch.compile(model)
    if world > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if master:
        os.makedirs(out, exist_ok=True)
        trim_log(log_path, step)
    wandb_run = None
    if master and args.wandb:
        wandb_run = wandb_start(args.wandb, args.wandb_name, vars(args), out, resume=step > 0)
    stop, previous_handlers = catch_stop_signals()

    # the schedule
    base_lr = base_learning_rate(args)
    terms = LOSSES[args.loss][1]
    amp = dict(bf16=torch.bfloat16, fp16=torch.float16).get(args.amp)
    say(header_line(args, train, steps_per_epoch, world, device))

    started = time.time()
    last_log_time = started
    first_step = step
    last_log_step = step
    saved = step if step > 0 else None  # a resumed run's checkpoint is its last good one
    stopping = False
    bad_images = 0
    seen_bad = 0
    reported = set()
    if master:  # the diagnostics' batches: each unreadable image named once, each replacement counted
        for path in sorted(set(unreadable)):
            message = f"decorr.py: cannot read image {path}: replaced by the next readable one"
            print(message + " in the diagnostics' batch (log.jsonl: bad_images)", flush=True)
        reported.update(unreadable)
        seen_bad = len(unreadable)
    for x1, x2, bad in batches(train, args.img_size <= 64, args, device, step, last):
        for path in sorted(set(bad) - reported):
            message = f"decorr.py: cannot read image {path}: replaced by the next readable one"
            print(message + " (log.jsonl: bad_images)", flush=True)
        reported.update(bad)
        seen_bad += len(bad)
        epoch = step // steps_per_epoch
        lr = learning_rate(step, total, warmup, base_lr, from_zero=args.warmup_steps is not None)
        loss, *term_values = train_step(model, opt, scaler, x1, x2, lr, amp)
        if raw_model.target is not None:  # BYOL eq. 1, tau from BYOL sec. 3.3 at this step
            tau = byol_tau(step, total, args.tau_base)
            ema_update(raw_model.target, raw_model.online(), tau)
        step += 1
        log_now = step % args.log_every == 0 or step == last
        diagnose_now = step % (args.diag_every or steps_per_epoch) == 0 or step == last
        save_now = (
            step == last
            or step % steps_per_epoch == 0
            or step % (args.save_every_steps or steps_per_epoch) == 0
        )

        # the CPU reads the device here only: in between, a GPU never waits for it (one process reads it
        # at once after a signal; several wait for the next logged step, where they agree to stop)
        if log_now or diagnose_now or save_now or (world == 1 and stop):
            loss_value, values, bad_images, stopping = read_device(
                loss, term_values, seen_bad, stop, device, world
            )
            if not math.isfinite(loss_value):
                raise FloatingPointError(
                    f"non-finite loss ({loss_value}) at step {step}; {last_good(ckpt_path, saved)}"
                )
        if (diagnose_now or save_now or stopping) and not all_finite(raw_model):
            raise FloatingPointError(f"non-finite weights after step {step}; {last_good(ckpt_path, saved)}")
        if master and (log_now or stopping):
            now = time.time()
            img_per_s = (step - last_log_step) * args.batch_size / (now - last_log_time)
            eta = (last - step) * (now - started) / (step - first_step)
            row = dict(epoch=epoch, step=step, loss=loss_value, **dict(zip(terms, values)))
            row.update(lr=lr, img_per_s=img_per_s, bad_images=int(bad_images))
            append_jsonl(log_path, row)
            if wandb_run:
                wandb_log(wandb_run, row, step)
            print(
                progress_line(
                    epoch, args, step, last, loss_value, dict(zip(terms, values)), lr, img_per_s, eta
                )
            )
            last_log_time = now
            last_log_step = step
        if master and diagnose_now:
            row = run_diagnostics(raw_model, probe, bank, num_classes, amp, out, log_path, epoch, step)
            if wandb_run:
                wandb_log(wandb_run, row, step)
                wandb_images(wandb_run, [os.path.join(out, "wp.png"), os.path.join(out, "curves.png")], step)
        if master and (save_now or stopping):
            save_checkpoint(ckpt_path, args, step, raw_model, opt, scaler)
            saved = step
        if stopping:
            break

    if master and not stopping:
        backbone = raw_model.backbone.state_dict()
        atomic_write(os.path.join(out, "backbone.pt"), lambda fh: torch.save(backbone, fh))
    if master and stopping:  # the last step drew them with its diagnostics
        draw_curves(log_path, os.path.join(out, "curves.png"))
    if wandb_run:
        wandb_finish(wandb_run)
    say(f"{'stopped by signal' if stopping else 'done'} at step {step}: {out}/")
    for number, handler in previous_handlers.items():
        signal.signal(number, handler)
    release_folder(out)
    del model, raw_model, opt  # torchrun + gloo: release the model before the barrier
    if world > 1:
        dist.barrier()


if __name__ == "__main__":
    try:
        main()
    except (UsageError, FloatingPointError) as e:
        message = str(e).strip().splitlines()[-1].split("UsageError: ", 1)[-1]
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"decorr.py: error: {message}", file=sys.stderr)
        sys.exit(2 if isinstance(e, UsageError) else 1)
    except KeyboardInterrupt:
        if int(os.environ.get("RANK", 0)) == 0:
            print("decorr.py: aborted by Ctrl-C; the last checkpoint written is kept", file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
