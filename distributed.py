"""
distributed.py -- statistics over all processes, with exact gradients: the sums and gathers that
decorr.py's losses use across ranks, and BatchNorm synchronised across CPU processes (torch's
SyncBatchNorm refuses CPU tensors). In one process every function here is the plain computation.

    global_sum(x)                x summed over the ranks, backward summed too (AllReduce)
    batch_stats(x, dims)         mean and biased variance over the global batch
    sync_batchnorm(module, dev)  every BatchNorm synchronised: nn.SyncBatchNorm on CUDA, else ours
"""

import torch
import torch.distributed as dist
import torch.nn as nn

from data import rank_world

# ----------------------------------------------------------------------------- 1. collectives with gradients


class AllReduce(torch.autograd.Function):
    """Sum over the ranks of `group`, and so is its backward: exact gradients under DDP's mean."""

    @staticmethod
    def forward(ctx, x, group=None):
        ctx.group = group
        x = x.contiguous().clone()
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
    """x summed over all ranks (with its gradient); x itself in one process."""
    if rank_world()[1] > 1:
        return AllReduce.apply(x, None)
    return x


def per_channel(v, ndim):
    """A vector of channel values shaped to broadcast over a tensor of ndim dimensions (N, C, ...)."""
    return v.view(-1, *[1] * (ndim - 2))


def batch_stats(x, dims):
    """Mean and biased variance over `dims` of the global batch (equal batches on all ranks)."""
    world = rank_world()[1]
    mean = global_sum(x.mean(dims)) / world
    var = global_sum((x - per_channel(mean, x.dim())).pow(2).mean(dims)) / world
    return mean, var


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
        y = (xf - per_channel(mean, x.dim())) / torch.sqrt(per_channel(var, x.dim()) + self.eps)
        if self.affine:
            y = y * per_channel(self.weight, x.dim()) + per_channel(self.bias, x.dim())
        return y.to(x.dtype)


def sync_batchnorm(module, device):
    """Every BatchNorm synchronised across processes, as in the paper (sec. 5.1)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            bn = CPUSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine)
            bn.load_state_dict(child.state_dict())
            for name_in_bn, parameter in bn.named_parameters():  # a frozen one (BYOL's target) stays so
                parameter.requires_grad_(getattr(child, name_in_bn).requires_grad)
            setattr(module, name, bn)
        else:
            sync_batchnorm(child, device)
    return module
