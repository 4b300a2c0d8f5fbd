"""
baselines.py -- the asymmetric methods that the paper bridges to decorrelation, and the measures of
that bridge: SimSiam (Chen & He, CVPR 2021) and BYOL (Grill et al., NeurIPS 2020), with their
predictor heads, BYOL's target network, and two scale-free measures of how a linear predictor W
lines up with the second moment of its input (DirectPred, Tian, Chen & Ganguli, ICML 2021).

    simsiam_loss   -(cos(p1, sg(z2)) + cos(p2, sg(z1))) / 2              SimSiam eq. 1-2, builder.py
    byol_loss      mean(2 - 2 cos(p1, sg(z2')) + 2 - 2 cos(p2, sg(z1')))  BYOL eq. 2-3
    byol_tau       1 - (1 - tau_base) (cos(pi k / K) + 1) / 2              BYOL sec. 3.3
    ema_update     xi <- tau xi + (1 - tau) theta                          BYOL eq. 1
    bridge_dist    || W^T W / ||W^T W|| - F^ / ||F^|| ||_F,  F^ = f^T f / n
    bridge_align   sum_j s_j |u_j^T W u_j| / ||W u_j|| / sum_j s_j,  F^ = sum_j s_j u_j u_j^T

The losses need no collective: each rank's value is the mean over its own rows, so with equal
batches per rank the mean over ranks (what DDP optimises) is the single-process loss. Nothing here
imports decorr; decorr imports this file.
"""

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------- 1. the losses


def loss_precision(*tensors):
    """The tensors in float64 if the first is float64, else in float32 (bfloat16 or float16 under
    autocast would round the cosines); the losses below run in this precision."""
    if tensors[0].dtype == torch.float64:
        dtype = torch.float64
    else:
        dtype = torch.float32
    return [t.to(dtype) for t in tensors]


def simsiam_loss(p1, p2, z1, z2):
    """SimSiam's symmetrised negative cosine (Chen & He, CVPR 2021, eq. 1-2, with the stop-gradient
    of eq. 3-4), as facebookresearch/simsiam main_simsiam.py and simsiam/builder.py:
        criterion = nn.CosineSimilarity(dim=1)
        loss = -(criterion(p1, z2).mean() + criterion(p2, z1).mean()) * 0.5,  z detached.
    p1, p2: the predictor's outputs (n x D); z1, z2: the projector's outputs of the same rows.
    Returns (loss, sim_12, sim_21) with sim_12 = mean_i cos(p1_i, z2_i) and sim_21 = mean_i
    cos(p2_i, z1_i), so loss = -(sim_12 + sim_21) / 2, at least -1. z is detached here, so it gets
    no gradient from this loss. Under torch.distributed each value is the mean over this rank's
    rows; with equal batches per rank the mean over ranks (DDP's averaged gradients) equals the
    single-process loss, and the gradient of this rank's rows is world x the single-process one.
    Float32 even under autocast (float64 stays float64)."""
    with torch.autocast(p1.device.type, enabled=False):
        p1, p2, z1, z2 = loss_precision(p1, p2, z1, z2)
        sim_12 = F.cosine_similarity(p1, z2.detach(), dim=1).mean()
        sim_21 = F.cosine_similarity(p2, z1.detach(), dim=1).mean()
        loss = -(sim_12 + sim_21) * 0.5
    return loss, sim_12, sim_21


def l2_normalize(x, eps=1e-12):
    """Rows scaled to unit norm as deepmind-research byol/utils/helpers.py l2_normalize:
    x / sqrt(max(sum x^2, eps))."""
    return x * torch.rsqrt(x.pow(2).sum(dim=1, keepdim=True).clamp_min(eps))


def byol_loss(p1, p2, z1, z2):
    """BYOL's loss (Grill et al., NeurIPS 2020, eq. 2-3) as deepmind-research byol/byol_experiment.py:
        regression_loss(x, y) = ||x/||x|| - y/||y|| ||^2 = 2 - 2 cos(x, y)     (helpers.py)
        loss = mean_i [regression_loss(p1_i, sg(z2_i)) + regression_loss(p2_i, sg(z1_i))]
    p1, p2: the online predictor's outputs (n x D); z1, z2: the target network's projections of the
    same rows, detached here, so they get no gradient. Returns (loss, reg_12, reg_21) with reg_12 =
    mean_i (2 - 2 cos(p1_i, z2_i)), reg_21 = mean_i (2 - 2 cos(p2_i, z1_i)), loss = reg_12 + reg_21,
    in [0, 8]. Under torch.distributed each value is the mean over this rank's rows; with equal
    batches per rank the mean over ranks (DDP's averaged gradients, deepmind's pmean) equals the
    single-process loss. Float32 even under autocast (float64 stays float64)."""
    with torch.autocast(p1.device.type, enabled=False):
        p1, p2, z1, z2 = loss_precision(p1, p2, z1, z2)
        q1 = l2_normalize(p1)
        q2 = l2_normalize(p2)
        t1 = l2_normalize(z1.detach())
        t2 = l2_normalize(z2.detach())
        reg_12 = (2 - 2 * (q1 * t2).sum(dim=1)).mean()
        reg_21 = (2 - 2 * (q2 * t1).sum(dim=1)).mean()
        loss = reg_12 + reg_21
    return loss, reg_12, reg_21


# ----------------------------------------------------------------------------- 2. the heads


def simsiam_projector(in_dim, dims):
    """SimSiam's projector as facebookresearch/simsiam builder.py: Linear-BN-ReLU for every width of
    `dims` but the last, then Linear-BatchNorm1d(affine=False) (official: in_dim -> in_dim -> in_dim ->
    2048, dims = [in_dim, in_dim, 2048]). No Linear has a bias: a BatchNorm follows each (the official
    output Linear keeps a bias frozen at its init, which the affine-free BatchNorm removes)."""
    layers = []
    for d_in, d_out in zip([in_dim] + dims[:-1], dims[:-1]):
        layers.append(nn.Linear(d_in, d_out, bias=False))
        layers.append(nn.BatchNorm1d(d_out))
        layers.append(nn.ReLU(inplace=True))
    last_in = ([in_dim] + dims)[-2]
    layers.append(nn.Linear(last_in, dims[-1], bias=False))
    layers.append(nn.BatchNorm1d(dims[-1], affine=False))
    return nn.Sequential(*layers)


def simsiam_predictor(D, hidden=None):
    """SimSiam's bottleneck predictor as facebookresearch/simsiam builder.py:
    Linear(D, D/4, bias=False) - BatchNorm1d - ReLU - Linear(D/4, D) (with bias, no BatchNorm on the
    output); official D = 2048, hidden 512. `hidden` overrides D // 4."""
    if hidden is None:
        hidden = D // 4
    return nn.Sequential(
        nn.Linear(D, hidden, bias=False),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, D),
    )


def byol_predictor(D, hidden=4096):
    """BYOL's predictor, the MLP of deepmind-research byol/utils/networks.py:
    Linear(D, hidden) with bias - BatchNorm1d - ReLU - Linear(hidden, D) without bias; official D = 256,
    hidden 4096 (BYOL sec. 3.3). The first bias sits before a BatchNorm, as in the official code."""
    return nn.Sequential(
        nn.Linear(D, hidden, bias=True),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, D, bias=False),
    )


def linear_predictor(D, identity=False):
    """One D x D linear layer without bias: the paper's predictor (sec. 3, eq. 17) and DirectPred's
    (Tian, Chen & Ganguli, ICML 2021) setting for SimSiam and BYOL. nn.Linear's random init, or the
    identity if `identity`."""
    predictor = nn.Linear(D, D, bias=False)
    if identity:
        with torch.no_grad():
            predictor.weight.copy_(torch.eye(D))
    return predictor


# ----------------------------------------------------------------------------- 3. BYOL's target network


def byol_tau(step, total_steps, tau_base):
    """BYOL's target decay at 0-based step k of K = total_steps (BYOL sec. 3.3; deepmind-research
    byol/utils/schedules.py target_ema, step clipped at K):
        tau_k = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2,
    tau_base at k = 0, rising to 1 at k = K."""
    step = min(step, total_steps)
    return 1 - (1 - tau_base) * (math.cos(math.pi * step / total_steps) + 1) / 2


def make_target(online_module):
    """BYOL's target network: a copy of the online module (backbone + projector) with no gradient.
    deepmind-research initialises the target from its own seed and reports no difference from the
    same one (byol_experiment.py _make_initial_state); a copy makes it the same on every rank."""
    target = copy.deepcopy(online_module)
    for parameter in target.parameters():
        parameter.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(target_module, online_module, tau):
    """BYOL eq. 1, xi <- tau xi + (1 - tau) theta, for every parameter, written as deepmind-research
    byol_experiment.py _update_fn writes it: x + (1 - tau) (y - x) (one torch._foreach_lerp_).
    Buffers are not touched: in the official code the target's BatchNorm state (target_state) is its
    own, updated only by the target's forward passes in training mode, never averaged with or copied
    from the online state. So the lead runs the target in train mode (batch statistics, synchronised
    like the online network's) and saves its buffers with it. Call after the optimiser's step."""
    target_params = list(target_module.parameters())
    online_params = list(online_module.parameters())
    if len(target_params) != len(online_params):
        raise ValueError(f"target has {len(target_params)} parameters, online {len(online_params)}")
    torch._foreach_lerp_(target_params, [p.detach() for p in online_params], 1 - tau)


# ----------------------------------------------------------------------------- 4. the bridge, measured


def second_moment(f):
    """F^ = f^T f / n in float64: the uncentred second moment of the predictor's input f (n x D)."""
    f = f.detach().to(torch.float64)
    return f.T @ f / f.shape[0]


def bridge_dist(w, f):
    """How far W^T W is from proportional to F^ = f^T f / n (the paper, sec. 3: W_p^T W_p -> F F^T;
    DirectPred, Tian, Chen & Ganguli, ICML 2021), for a linear predictor p = f W^T (w: D x D):
        || W^T W / ||W^T W||_F - F^ / ||F^||_F ||_F = sqrt(2 - 2 <A, B>),
    0 when proportional. Both are positive semi-definite, so <A, B> >= 0 and the value lies in
    [0, sqrt 2], inside [0, 2]; nan if W or f is zero. Float64; on f's rows only (no collective:
    the diagnostics' fixed batch is the same on every rank). O(D^2 n + D^3)."""
    w = w.detach().to(device=f.device, dtype=torch.float64)
    wtw = w.T @ w
    moment = second_moment(f)
    wtw_norm = torch.linalg.matrix_norm(wtw)
    moment_norm = torch.linalg.matrix_norm(moment)
    if wtw_norm == 0 or moment_norm == 0:
        return float("nan")
    return torch.linalg.matrix_norm(wtw / wtw_norm - moment / moment_norm).item()


def bridge_align(w, f):
    """How far F^'s eigenvectors are eigenvectors of W (DirectPred, Tian, Chen & Ganguli, ICML 2021:
    W_p's eigenspace aligns with F's), with F^ = f^T f / n = sum_j s_j u_j u_j^T:
        sum_j s_j |u_j^T W u_j| / ||W u_j|| / sum_j s_j,
    the s_j-weighted mean of |cos| between u_j and W u_j, in [0, 1]; 1 when every u_j is an
    eigenvector of W (W commutes with F^, distinct s_j). A u_j with W u_j = 0 (||W u_j|| at most
    1e-12 of the largest, float64 rounding) counts as aligned: an eigenvector of W with eigenvalue 0.
    nan if f or W is zero. Within a repeated eigenvalue of F^ the basis is eigh's choice. Float64;
    on f's rows only (no collective). O(D^2 n + D^3)."""
    w = w.detach().to(device=f.device, dtype=torch.float64)
    eigenvalues, eigenvectors = torch.linalg.eigh(second_moment(f))
    weights = eigenvalues.clamp_min(0)
    if weights.sum() == 0:
        return float("nan")
    mapped = w @ eigenvectors
    along = (eigenvectors * mapped).sum(dim=0).abs()
    lengths = torch.linalg.vector_norm(mapped, dim=0)
    if lengths.max() == 0:
        return float("nan")
    killed = lengths <= 1e-12 * lengths.max()  # W u_j = 0 up to float64 rounding
    cosines = torch.where(killed, 1.0, along / torch.where(killed, 1.0, lengths))
    return ((weights * cosines.clamp(max=1.0)).sum() / weights.sum()).item()
