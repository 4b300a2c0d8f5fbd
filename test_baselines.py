"""Tests for baselines.py: SimSiam's and BYOL's losses against transcriptions of their official code
(facebookresearch/simsiam main_simsiam.py and builder.py; deepmind-research byol/utils/helpers.py
and byol/byol_experiment.py), the predictor heads, BYOL's target network, and the bridge measures.
Float64, small sizes. Then both methods through decorr.py: training with either predictor, 1 process
against 2, BYOL's stop-and-continue and its target's update.

    python -m pytest -q test_baselines.py
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import baselines
import config
import decorr
import lineval
from conftest import init_gloo
from test_cli import ROOT, SMALL_IP, TORCHRUN, assert_same_losses, in_process, rows, small_synthetic

LOSSES_TERMS = {name: terms for name, (_, terms) in config.LOSSES.items()}

# ----------------------------------------------------------------------------- helpers


def assert_close(actual, expected, tol, what):
    """|actual - expected| <= tol * max(1, |expected|), elementwise, in float64."""
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    error = (actual - expected).abs().max().item()
    scale = max(1.0, expected.abs().max().item())
    assert error <= tol * scale, f"{what}: error {error:.3g} (scale {scale:.3g})"


def official_simsiam(p1, p2, z1, z2):
    """facebookresearch/simsiam: builder.py returns z detached; main_simsiam.py's criterion."""
    z1 = z1.detach()
    z2 = z2.detach()
    criterion = nn.CosineSimilarity(dim=1)
    return -(criterion(p1, z2).mean() + criterion(p2, z1).mean()) * 0.5


def explicit_simsiam(p1, p2, z1, z2):
    """SimSiam eq. 1-2 written out: D(p, z) = -p/||p|| . z/||z||, L = D(p1, sg z2)/2 + D(p2, sg z1)/2."""
    z1 = z1.detach()
    z2 = z2.detach()
    d12 = -((p1 * z2).sum(1) / (p1.norm(dim=1) * z2.norm(dim=1))).mean()
    d21 = -((p2 * z1).sum(1) / (p2.norm(dim=1) * z1.norm(dim=1))).mean()
    return d12 / 2 + d21 / 2


def official_byol(p1, p2, z1, z2):
    """deepmind-research byol: helpers.py l2_normalize and regression_loss, byol_experiment.py
    loss_fn's repr_loss (the two directions summed, then jnp.mean)."""

    def l2_normalize(x, epsilon=1e-12):
        square_sum = torch.sum(torch.square(x), dim=-1, keepdim=True)
        x_inv_norm = torch.rsqrt(torch.maximum(square_sum, torch.tensor(epsilon, dtype=x.dtype)))
        return x * x_inv_norm

    def regression_loss(x, y):
        normed_x = l2_normalize(x)
        normed_y = l2_normalize(y)
        return torch.sum((normed_x - normed_y) ** 2, dim=-1)

    repr_loss = regression_loss(p1, z2.detach())
    repr_loss = repr_loss + regression_loss(p2, z1.detach())
    return torch.mean(repr_loss)


def leaf_inputs(n, D, seed):
    """Float64 leaves h1, h2 (predictor inputs), w (a shared linear predictor) and z1, z2 (targets),
    all requiring grad: p = h w^T, so w's gradient is a parameter gradient that DDP would average."""
    generator = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(n, D, generator=generator, dtype=torch.float64) for _ in range(4)]
    w = torch.randn(D, D, generator=generator, dtype=torch.float64) / math.sqrt(D)
    h1, h2, z1, z2 = tensors
    return h1, h2, w, z1, z2


def run_loss(loss_fn, h1, h2, w, z1, z2):
    """loss_fn on fresh leaves: (values, grads of h1, h2, w, z1, z2) after backward of the first value."""
    leaves = [t.clone().requires_grad_() for t in (h1, h2, w, z1, z2)]
    a1, a2, weight, b1, b2 = leaves
    out = loss_fn(a1 @ weight.T, a2 @ weight.T, b1, b2)
    if not isinstance(out, tuple):
        out = (out,)
    out[0].backward()
    return [v.detach() for v in out], [leaf.grad for leaf in leaves]


def psd_power(matrix, power):
    """matrix^power for a symmetric positive semi-definite matrix, via eigh."""
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    return eigenvectors @ torch.diag(eigenvalues.clamp_min(0) ** power) @ eigenvectors.T


def orthogonal_columns_features(n, b, seed):
    """f (n x D) with orthogonal columns and f^T f / n = diag(b)."""
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, len(b), generator=generator, dtype=torch.float64))
    return q * math.sqrt(n) * torch.tensor(b, dtype=torch.float64).sqrt()


# ----------------------------------------------------------------------------- 1. the losses


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_simsiam_loss_equals_official(seed):
    h1, h2, w, z1, z2 = leaf_inputs(16, 9, seed)
    values, grads = run_loss(baselines.simsiam_loss, h1, h2, w, z1, z2)
    official_values, official_grads = run_loss(official_simsiam, h1, h2, w, z1, z2)
    explicit_values, _ = run_loss(explicit_simsiam, h1, h2, w, z1, z2)
    assert_close(values[0], official_values[0], 1e-9, "simsiam loss vs official")
    assert_close(values[0], explicit_values[0], 1e-9, "simsiam loss vs eq. 1-2")
    assert_close(values[0], -(values[1] + values[2]) / 2, 1e-12, "loss = -(sim_12 + sim_21) / 2")
    for name, grad, official_grad in zip(("h1", "h2", "w"), grads, official_grads):
        assert_close(grad, official_grad, 1e-9, f"simsiam grad of {name}")
    assert grads[3] is None and grads[4] is None, "z must get no gradient"
    assert -1.0 <= values[0].item() <= 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_byol_loss_equals_official(seed):
    h1, h2, w, z1, z2 = leaf_inputs(16, 9, seed)
    values, grads = run_loss(baselines.byol_loss, h1, h2, w, z1, z2)
    official_values, official_grads = run_loss(official_byol, h1, h2, w, z1, z2)
    assert_close(values[0], official_values[0], 1e-9, "byol loss vs official")
    assert_close(values[0], values[1] + values[2], 1e-12, "loss = reg_12 + reg_21")
    for name, grad, official_grad in zip(("h1", "h2", "w"), grads, official_grads):
        assert_close(grad, official_grad, 1e-9, f"byol grad of {name}")
    assert grads[3] is None and grads[4] is None, "z must get no gradient"
    assert 0.0 <= values[0].item() <= 8.0


def test_losses_at_their_extremes():
    """p parallel to z: SimSiam -1, BYOL 0; p = -z: SimSiam 1, BYOL 8."""
    generator = torch.Generator().manual_seed(3)
    z1 = torch.randn(8, 5, generator=generator, dtype=torch.float64)
    z2 = torch.randn(8, 5, generator=generator, dtype=torch.float64)
    assert_close(baselines.simsiam_loss(3 * z2, 2 * z1, z1, z2)[0], -1.0, 1e-12, "simsiam minimum")
    assert_close(baselines.simsiam_loss(-z2, -z1, z1, z2)[0], 1.0, 1e-12, "simsiam maximum")
    assert_close(baselines.byol_loss(3 * z2, 2 * z1, z1, z2)[0], 0.0, 1e-12, "byol minimum")
    assert_close(baselines.byol_loss(-z2, -z1, z1, z2)[0], 8.0, 1e-12, "byol maximum")


@pytest.mark.parametrize("loss_fn", [baselines.simsiam_loss, baselines.byol_loss])
def test_losses_in_float32_under_autocast(loss_fn):
    """bfloat16 inputs under autocast: the loss and its terms are float32, close to float64's."""
    h1, h2, w, z1, z2 = leaf_inputs(16, 9, 4)
    p1 = h1 @ w.T
    p2 = h2 @ w.T
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss_fn(p1.bfloat16(), p2.bfloat16(), z1.bfloat16(), z2.bfloat16())
    assert all(value.dtype == torch.float32 for value in out)
    reference = loss_fn(p1, p2, z1, z2)
    assert_close(out[0].double(), reference[0], 3e-2, "bfloat16 inputs vs float64")


# ----------------------------------------------------------------------------- 2. the heads


def layer_kinds(module):
    return [type(layer).__name__ for layer in module]


def test_simsiam_projector_structure():
    projector = baselines.simsiam_projector(12, [12, 12, 20])
    expected = ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear", "BatchNorm1d"]
    assert layer_kinds(projector) == expected
    linears = [layer for layer in projector if isinstance(layer, nn.Linear)]
    assert [(layer.in_features, layer.out_features) for layer in linears] == [(12, 12), (12, 12), (12, 20)]
    assert all(layer.bias is None for layer in linears)
    norms = [layer for layer in projector if isinstance(layer, nn.BatchNorm1d)]
    assert [layer.affine for layer in norms] == [True, True, False]
    out = projector(torch.randn(10, 12))
    assert out.shape == (10, 20)
    assert_close(out.mean(0), torch.zeros(20), 1e-5, "affine-free BatchNorm output mean")
    single = baselines.simsiam_projector(12, [7])
    assert layer_kinds(single) == ["Linear", "BatchNorm1d"]
    assert single[0].in_features == 12 and single[0].out_features == 7 and not single[1].affine


def test_simsiam_predictor_structure():
    predictor = baselines.simsiam_predictor(32)
    assert layer_kinds(predictor) == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert (predictor[0].in_features, predictor[0].out_features) == (32, 8)
    assert predictor[0].bias is None
    assert predictor[1].num_features == 8 and predictor[1].affine
    assert (predictor[3].in_features, predictor[3].out_features) == (8, 32)
    assert predictor[3].bias is not None
    assert predictor(torch.randn(6, 32)).shape == (6, 32)
    assert baselines.simsiam_predictor(32, hidden=5)[0].out_features == 5


def test_byol_predictor_structure():
    predictor = baselines.byol_predictor(16)
    assert layer_kinds(predictor) == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert (predictor[0].in_features, predictor[0].out_features) == (16, 4096)
    assert predictor[0].bias is not None
    assert predictor[1].num_features == 4096 and predictor[1].affine
    assert (predictor[3].in_features, predictor[3].out_features) == (4096, 16)
    assert predictor[3].bias is None
    small = baselines.byol_predictor(16, hidden=24)
    assert small[0].out_features == 24 and small(torch.randn(5, 16)).shape == (5, 16)


def test_linear_predictor():
    predictor = baselines.linear_predictor(10)
    assert isinstance(predictor, nn.Linear) and predictor.bias is None
    assert predictor.weight.shape == (10, 10) and predictor.weight.requires_grad
    identity = baselines.linear_predictor(10, identity=True)
    assert torch.equal(identity.weight.detach(), torch.eye(10))


# ----------------------------------------------------------------------------- 3. BYOL's target network


def test_byol_tau_schedule():
    for tau_base in (0.9, 0.99, 0.996):
        total = 37
        taus = [baselines.byol_tau(step, total, tau_base) for step in range(total + 1)]
        assert_close(taus[0], tau_base, 1e-15, "tau at step 0")
        assert_close(taus[-1], 1.0, 1e-15, "tau at the last step")
        assert all(later >= earlier for earlier, later in zip(taus, taus[1:])), "tau must not fall"
        assert_close(baselines.byol_tau(10, 20, tau_base), 1 - (1 - tau_base) / 2, 1e-15, "tau halfway")
        assert baselines.byol_tau(total + 5, total, tau_base) == 1.0, "clipped past the end"


def tiny_module(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2, bias=False))


def test_make_target_is_a_frozen_copy():
    online = tiny_module(0)
    target = baselines.make_target(online)
    for (name, p_online), p_target in zip(online.named_parameters(), target.parameters()):
        assert torch.equal(p_online, p_target), name
        assert p_online.data_ptr() != p_target.data_ptr(), name
        assert p_online.requires_grad and not p_target.requires_grad, name
    for b_online, b_target in zip(online.buffers(), target.buffers()):
        assert torch.equal(b_online, b_target) and b_online.data_ptr() != b_target.data_ptr()


def test_ema_update_by_hand():
    """Parameters: tau target + (1 - tau) online; buffers (the target's BatchNorm state) untouched,
    as deepmind's target_state, which only the target's own forward passes change."""
    online = tiny_module(1)
    target = baselines.make_target(online)
    with torch.no_grad():
        for parameter in online.parameters():
            parameter.add_(torch.randn_like(parameter))
        target.train()
        target(torch.randn(8, 3))  # the target's own running statistics move
    online(torch.randn(8, 3))  # and the online's, differently
    tau = 0.9
    target_before = [p.clone() for p in target.parameters()]
    buffers_before = [b.clone() for b in target.buffers()]
    online_before = [p.clone() for p in online.parameters()]
    baselines.ema_update(target, online, tau)
    for after, before, online_value in zip(target.parameters(), target_before, online_before):
        assert_close(after, tau * before + (1 - tau) * online_value, 1e-6, "ema of a parameter")
        assert not after.requires_grad
    for after, before in zip(target.buffers(), buffers_before):
        assert torch.equal(after, before), "ema_update must leave the target's buffers alone"
    for after, before in zip(online.parameters(), online_before):
        assert torch.equal(after, before), "ema_update must not change the online network"
    baselines.ema_update(target, online, 0.0)
    for after, online_value in zip(target.parameters(), online.parameters()):
        assert torch.equal(after, online_value), "tau = 0 copies the online parameters"
    with pytest.raises(ValueError):
        baselines.ema_update(target, nn.Linear(3, 4), tau)


def test_ema_update_in_float64_exact_formula():
    online = tiny_module(2).double()
    target = baselines.make_target(online)
    with torch.no_grad():
        for parameter in online.parameters():
            parameter.mul_(-2.0).add_(0.5)
    before = [p.clone() for p in target.parameters()]
    baselines.ema_update(target, online, 0.99)
    for after, old, new in zip(target.parameters(), before, online.parameters()):
        assert_close(after, old + (1 - 0.99) * (new - old), 1e-14, "x + (1 - tau) (y - x)")


# ----------------------------------------------------------------------------- 4. the bridge, measured


def random_features(n, D, seed):
    generator = torch.Generator().manual_seed(seed)
    scales = torch.linspace(0.2, 3.0, D, dtype=torch.float64)
    return torch.randn(n, D, generator=generator, dtype=torch.float64) * scales


def test_bridge_dist_zero_when_proportional():
    f = random_features(50, 6, 0)
    moment = f.T @ f / 50
    root = psd_power(moment, 0.5)
    for c in (1.0, 0.01, 7.0):
        assert abs(baselines.bridge_dist(c * root, f)) < 1e-12
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    assert abs(baselines.bridge_dist(3.0 * q @ root, f)) < 1e-12, "W = c Q F^(1/2): W^T W = c^2 F^"
    assert abs(baselines.bridge_dist((c * root).float(), f.float())) < 1e-6, "float32 inputs"


def test_bridge_dist_known_value():
    """A = diag(a) / |a|, B = diag(b) / |b|: || A - B || = sqrt(2 - 2 a.b / (|a| |b|))."""
    a = [1.0, 2.0, 3.0]
    b = [3.0, 1.0, 1.0]
    f = orthogonal_columns_features(40, b, 2)
    w = torch.diag(torch.tensor(a, dtype=torch.float64).sqrt())
    inner = (1 * 3 + 2 * 1 + 3 * 1) / (math.sqrt(14) * math.sqrt(11))
    assert_close(baselines.bridge_dist(w, f), math.sqrt(2 - 2 * inner), 1e-12, "bridge_dist")
    assert_close(baselines.bridge_dist(w, 5 * f), math.sqrt(2 - 2 * inner), 1e-12, "scale of f")
    disjoint = orthogonal_columns_features(40, [0.0, 1.0, 1.0], 3)
    w_first = torch.diag(torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    assert_close(baselines.bridge_dist(w_first, disjoint), math.sqrt(2), 1e-12, "orthogonal: sqrt 2")
    assert math.isnan(baselines.bridge_dist(torch.zeros(3, 3, dtype=torch.float64), f))


def test_bridge_dist_range_on_random_inputs():
    generator = torch.Generator().manual_seed(4)
    for trial in range(20):
        D = 3 + trial % 5
        n = 2 + 4 * trial  # includes n < D (a singular F^)
        f = torch.randn(n, D, generator=generator, dtype=torch.float64)
        w = torch.randn(D, D, generator=generator, dtype=torch.float64)
        value = baselines.bridge_dist(w, f)
        assert isinstance(value, float)
        assert 0.0 <= value <= math.sqrt(2) + 1e-12 and value <= 2.0
        assert_close(baselines.bridge_dist(3 * w, f), value, 1e-12, "scale-free in W")


def test_bridge_align_one_when_commuting():
    f = random_features(60, 7, 5)
    moment = f.T @ f / 60
    eye = torch.eye(7, dtype=torch.float64)
    polynomial = 0.5 * eye + moment + 0.3 * moment @ moment
    assert_close(baselines.bridge_align(polynomial, f), 1.0, 1e-12, "W a positive polynomial of F^")
    assert_close(baselines.bridge_align(-polynomial, f), 1.0, 1e-12, "|u^T W u|: the sign of W")
    assert_close(baselines.bridge_align(psd_power(moment, 0.5), f), 1.0, 1e-12, "W = F^(1/2)")
    eigenvectors = torch.linalg.eigh(moment)[1]
    top = eigenvectors[:, 3:]
    assert_close(baselines.bridge_align(top @ top.T, f), 1.0, 1e-12, "W u_j = 0 counts as aligned")


def test_bridge_align_below_one_and_range():
    generator = torch.Generator().manual_seed(6)
    for trial in range(20):
        D = 3 + trial % 5
        n = 2 + 4 * trial
        f = torch.randn(n, D, generator=generator, dtype=torch.float64)
        w = torch.randn(D, D, generator=generator, dtype=torch.float64)
        value = baselines.bridge_align(w, f)
        assert isinstance(value, float)
        assert 0.0 <= value < 1.0 - 1e-6
        assert_close(baselines.bridge_align(0.1 * w, 4 * f), value, 1e-12, "scale-free")
    f = random_features(60, 5, 7)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=generator, dtype=torch.float64))
    rotated = q @ torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64)) @ q.T
    assert baselines.bridge_align(rotated, f) < 0.99, "symmetric W with other eigenvectors"
    assert math.isnan(baselines.bridge_align(rotated, torch.zeros(4, 5, dtype=torch.float64)))
    assert math.isnan(baselines.bridge_align(torch.zeros(5, 5, dtype=torch.float64), f))


def test_bridge_align_weights_by_eigenvalue():
    """F^ = diag(b) with b = (4, 1, 0): u_1, u_2, u_3 the axes, W e_1 = e_1, W e_2 = e_2 + e_3, and
    W e_3 = e_1 + e_2 (weight 0): (4 * 1 + 1 * 1/sqrt 2 + 0) / 5."""
    f = orthogonal_columns_features(30, [4.0, 1.0, 0.0], 8)
    w = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    assert_close(baselines.bridge_align(w, f), (4 + 1 / math.sqrt(2)) / 5, 1e-12, "weighted mean")


# ----------------------------------------------------------------------------- 5. two processes


N_DIST = 24  # global rows, 12 per rank
D_DIST = 7
LOSSES = {"simsiam": baselines.simsiam_loss, "byol": baselines.byol_loss}


def _dist_worker(rank, world, tmp):
    """Rank r computes each loss on its rows [r n, (r+1) n) of the global batch under a gloo group
    and saves its values and gradients."""
    init_gloo(rank, world, tmp, seconds=60)
    try:
        inputs = torch.load(os.path.join(tmp, "inputs.pt"))
        n = N_DIST // world
        rows = slice(rank * n, (rank + 1) * n)
        results = {}
        for name, loss_fn in LOSSES.items():
            h1, h2, w, z1, z2 = inputs
            values, grads = run_loss(loss_fn, h1[rows], h2[rows], w, z1[rows], z2[rows])
            results[name] = dict(values=values, grads=grads)
        torch.save(results, os.path.join(tmp, f"out_{rank}.pt"))
    finally:
        dist.barrier()
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("baselines_dist"))
    inputs = leaf_inputs(N_DIST, D_DIST, 10)
    torch.save(inputs, os.path.join(tmp, "inputs.pt"))
    mp.spawn(_dist_worker, args=(2, tmp), nprocs=2, join=True)
    return inputs, [torch.load(os.path.join(tmp, f"out_{rank}.pt")) for rank in range(2)]


@pytest.mark.parametrize("name", list(LOSSES))
def test_two_processes_equal_one(two_process_results, name):
    """DDP optimises the mean over ranks of each rank's loss (it averages parameter gradients): that
    mean, its terms and W's averaged gradient equal the single process's; rank r's gradient of its
    rows is world x the single-process gradient of those rows; z gets no gradient on any rank."""
    inputs, outputs = two_process_results
    world = 2
    values, grads = run_loss(LOSSES[name], *inputs)
    per_rank = [output[name] for output in outputs]
    for i, value in enumerate(values):
        mean = torch.stack([result["values"][i] for result in per_rank]).mean()
        assert_close(mean, value, 1e-9, f"{name}: mean over ranks of value {i}")
    mean_w_grad = torch.stack([result["grads"][2] for result in per_rank]).mean(0)
    assert_close(mean_w_grad, grads[2], 1e-9, f"{name}: mean over ranks of W's gradient")
    n = N_DIST // world
    for rank, result in enumerate(per_rank):
        rows = slice(rank * n, (rank + 1) * n)
        assert_close(result["grads"][0] / world, grads[0][rows], 1e-9, f"{name}: rank {rank} h1 grad")
        assert_close(result["grads"][1] / world, grads[1][rows], 1e-9, f"{name}: rank {rank} h2 grad")
        assert result["grads"][3] is None and result["grads"][4] is None, f"{name}: z got a gradient"


# ----------------------------------------------------------------------------- through decorr.py
# SimSiam and BYOL, each with its MLP and with the linear predictor, trained by decorr.main on the
# in-process data of test_cli.py (512 training images of 16 px), on one process and under torchrun.

ASYMMETRIC = {
    "simsiam-mlp": ["--loss", "simsiam", "--lr", "5"],
    "simsiam-linear": ["--loss", "simsiam", "--predictor", "linear", "--lr", "5"],
    "byol-mlp": ["--loss", "byol", "--lr", "1.0"],
    "byol-linear": ["--loss", "byol", "--predictor", "linear", "--lr", "1.0"],
}
ASYMMETRIC_RUN = SMALL_IP + ["--epochs", "1", "--warmup-epochs", "0", "--diag-every", "3"]
BRIDGE_KEYS = {"wp_offdiag", "bridge_dist", "bridge_align"}

# decorr.main under torchrun on the same in-process data.
TWO_RANKS = """
import sys
sys.path.insert(0, sys.argv.pop(1))
import torch.distributed as dist
from torch.utils.data import TensorDataset
import data, decorr
sets = [TensorDataset(*data.synthetic_images(n, seed, size=16)) for n, seed in ((512, 0), (64, 1))]
decorr.load_data = lambda name, root="data": (*sets, 10, True)
decorr.main(sys.argv[1:])
dist.destroy_process_group()
"""


def comparable(rows):
    """A log's rows without the wall-clock fields."""
    return [{k: v for k, v in row.items() if k not in ("img_per_s", "diag_s")} for row in rows]


@pytest.fixture(scope="module")
def asymmetric_run(tmp_path_factory):
    """asymmetric_run(name): the output folder of a 6-step run of ASYMMETRIC[name] on one process,
    made once and shared by the tests."""
    done = {}

    def get(name):
        if name not in done:
            out = tmp_path_factory.mktemp(name) / "out"
            with pytest.MonkeyPatch.context() as monkeypatch:
                in_process(monkeypatch, ASYMMETRIC_RUN + ASYMMETRIC[name] + ["--steps", "6", "--out", out])
            done[name] = out
        return done[name]

    return get


@pytest.mark.parametrize("name", list(ASYMMETRIC))
def test_asymmetric_trains(name, asymmetric_run, capsys, monkeypatch):
    """--loss simsiam / byol with either predictor: the loss falls, rows carry the method's terms,
    the diagnostics hold the bridge's measures (and wp.png is drawn) exactly when W is linear, the
    checkpoint holds BYOL's target, and lineval.py reads the backbone."""
    out = asymmetric_run(name)
    loss = name.split("-")[0]
    linear = name.endswith("linear")
    terms = LOSSES_TERMS[loss]
    train = [row for row in rows(out) if "loss" in row]
    assert [row["step"] for row in train] == list(range(1, 7))
    for row in train:
        assert {"loss", *terms} <= row.keys() and all(math.isfinite(row[k]) for k in ("loss", *terms))
    losses = [row["loss"] for row in train]
    if loss == "simsiam":  # -(sim_12 + sim_21) / 2 in [-1, 1]
        assert all(-1 <= x <= 1 for x in losses) and sum(losses[3:]) / 3 < sum(losses[:3]) / 3 - 0.01
        assert all(math.isclose(r["loss"], -(r["sim_12"] + r["sim_21"]) / 2, abs_tol=1e-6) for r in train)
    else:  # the sum of two regression losses, each in [0, 4]
        assert all(0 <= x <= 8 for x in losses) and sum(losses[3:]) < 0.95 * sum(losses[:3]), losses
        assert all(math.isclose(r["loss"], r["reg_12"] + r["reg_21"], rel_tol=1e-6) for r in train)
    diagnostics = [row for row in rows(out) if "corr_dist" in row]
    assert [row["step"] for row in diagnostics] == [3, 6]
    for row in diagnostics:
        if linear:
            assert BRIDGE_KEYS <= row.keys(), row
            assert 0 <= row["bridge_dist"] <= 2 and 0 <= row["bridge_align"] <= 1, row
        else:
            assert not BRIDGE_KEYS & row.keys(), row
    assert (out / "wp.png").exists() == linear
    state = decorr.load_checkpoint(out / "checkpoint.pt")["model"]
    target = sorted(k.removeprefix("target.1.") for k in state if k.startswith("target.1."))
    assert bool(target) == (loss == "byol")
    if target:  # the target: backbone and projector, with their BatchNorm buffers
        assert target == sorted(k.removeprefix("projector.") for k in state if k.startswith("projector."))
        assert any(k.startswith("target.0.") and k.endswith("running_mean") for k in state)
    if linear:
        assert state["predictor.weight"].shape == (32, 32) and "predictor.bias" not in state
    monkeypatch.setattr(lineval, "load_data", lambda name, root="data": small_synthetic(512))
    lineval.main([str(out / "backbone.pt"), "--fast-epochs", "5", "--workers", "0"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["ckpt"] == str(out / "backbone.pt") and result["n_train"] == 512
    assert 0 <= result["top1"] <= result["top5"] <= 100, result


@pytest.mark.parametrize("name", list(ASYMMETRIC))
def test_asymmetric_two_processes_equal_one(name, asymmetric_run, tmp_path):
    """The same run on 2 processes (torchrun, gloo) logs the first two steps' losses and terms of one
    process to 1e-4: the BatchNorms of the predictor and of BYOL's target are synchronised too."""
    script, double = tmp_path / "two_ranks.py", tmp_path / "double"
    script.write_text(TWO_RANKS)
    args = ASYMMETRIC_RUN + ASYMMETRIC[name] + ["--steps", "2"]
    command = [sys.executable, *TORCHRUN[:-1], str(script), str(ROOT), *args, "--out", str(double)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    assert_same_losses(asymmetric_run(name), double, LOSSES_TERMS[name.split("-")[0]], steps=2)


def test_byol_stop_and_continue_equals_uninterrupted(asymmetric_run, tmp_path, monkeypatch):
    """BYOL stopped after step 3 and continued to step 6 logs what the 6-step run logs, and ends with
    the same online and target weights: the target, its BatchNorm buffers and tau's step resume."""
    args = ASYMMETRIC_RUN + ASYMMETRIC["byol-mlp"]
    whole, parts = asymmetric_run("byol-mlp"), tmp_path / "parts"
    in_process(monkeypatch, args + ["--steps", "3", "--out", parts])
    in_process(monkeypatch, args + ["--steps", "6", "--out", parts])
    assert comparable(rows(whole)) == comparable(rows(parts))
    a = decorr.load_checkpoint(whole / "checkpoint.pt")["model"]
    b = decorr.load_checkpoint(parts / "checkpoint.pt")["model"]
    assert a.keys() == b.keys() and any(k.startswith("target.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_target_follows_the_online_network_by_tau(monkeypatch, tmp_path):
    """After each step t (from 0) of a K-step run, the target's parameters are tau_t target +
    (1 - tau_t) online with tau_t = byol_tau(t, K, tau_base), K the run's epochs in steps (not
    --steps); its BatchNorm running statistics are its own (not the online network's)."""
    seen = []

    def record(train_step, i, model, *args):
        before = [p.detach().clone() for p in model.target.parameters()]
        result = train_step(model, *args)
        seen.append((before, [p.detach().clone() for p in model.online().parameters()], model))
        return result

    out = tmp_path / "out"
    in_process(
        monkeypatch,
        ASYMMETRIC_RUN + ASYMMETRIC["byol-mlp"] + ["--steps", "2", "--tau-base", "0.9", "--out", out],
        wrap_step=record,
    )
    total = 512 // 16  # one epoch of 512 images in batches of 16
    model = seen[-1][2]
    state = decorr.load_checkpoint(out / "checkpoint.pt")["model"]
    for t, (before, online, _) in enumerate(seen):
        tau = baselines.byol_tau(t, total, 0.9)
        if t + 1 < len(seen):
            after = seen[t + 1][0]
        else:
            after = list(model.target.parameters())
        for old, new, theta in zip(before, after, online, strict=True):
            torch.testing.assert_close(new, tau * old + (1 - tau) * theta, rtol=1e-6, atol=1e-7)
    assert not torch.equal(state["target.1.1.running_mean"], state["projector.1.running_mean"])
