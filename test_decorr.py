"""Tests for decorr.py against the paper (Liu, Suganuma, Okatani, NeurIPS 2022).

Algorithm 1 of the appendix is the implementation truth: `algorithm1` below transcribes it
part by part (one part = one GPU's local batch in the paper) and decorr_loss must agree with
it in value and gradients. Small sizes throughout: the whole file runs in well under a
minute on a 2-core CPU.

    python -m pytest -q test_decorr.py
"""

import itertools
import math
import os
import types

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import baselines
import decorr
import distributed
from conftest import init_gloo

# ----------------------------------------------------------------------------- helpers


def algorithm1(f1, f2, w, parts=1, inv_coef=1.0, cov_coef=1.0, stopgrad=False):
    """Direct transcription of Algorithm 1 (appendix F), one part at a time.

    Each part j (m = n/parts rows) is what one GPU computes; under data-parallel training the
    gradients are averaged over the GPUs, so the effective loss is the mean over parts.
    Returns (loss, inv, cov) with inv and cov the means over parts; runs in the inputs' dtype."""
    n, D = f1.shape
    m = n // parts
    wtw = w.T @ w  # the same on every part (hoisted out of the loop: saves time only)
    losses, invs, covs = [], [], []
    for j in range(parts):
        a, b = f1[j * m : (j + 1) * m], f2[j * m : (j + 1) * m]
        p1, p2 = a @ w.T, b @ w.T
        ta, tb = (a.detach(), b.detach()) if stopgrad else (a, b)
        inv = (p1 - tb).pow(2).mean() + (p2 - ta).pow(2).mean()
        cov1 = p1.T @ p1 / m
        cov2 = p2.T @ p2 / m
        cov = (cov1 - wtw).pow(2).sum() + (cov2 - wtw).pow(2).sum()
        losses.append(inv_coef * inv + cov_coef / D * cov)
        invs.append(inv)
        covs.append(cov)
    return torch.stack(losses).mean(), torch.stack(invs).mean(), torch.stack(covs).mean()


def rel_err(actual, expected):
    """||actual - expected|| / ||expected||, computed in float64."""
    a = torch.as_tensor(actual).detach().double()
    e = torch.as_tensor(expected).detach().double()
    return ((a - e).norm() / e.norm().clamp_min(1e-300)).item()


def assert_rel(actual, expected, rtol, what):
    err = rel_err(actual, expected)
    dt = getattr(actual, "dtype", None)
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.0e} (result dtype {dt})"


def raw_features(n, D, g, dtype=torch.float64):
    """Unstandardized features: correlated, offset, differently scaled dimensions."""
    x = torch.randn(n, D, generator=g, dtype=torch.float64)
    x = x @ (torch.eye(D, dtype=torch.float64) + 0.5 * torch.randn(D, D, generator=g, dtype=torch.float64))
    x = x * (0.5 + 2 * torch.rand(D, generator=g, dtype=torch.float64)) + 3 * torch.randn(
        D, generator=g, dtype=torch.float64
    )
    return x.to(dtype)


def standardized(n, D, g, dtype=torch.float64):
    x = raw_features(n, D, g, torch.float64)
    return ((x - x.mean(0)) / x.std(0, correction=0)).to(dtype)


def whitened_parts(n, D, parts, g):
    """n x D features (float64) whose every part of m = n/parts rows has zero mean and identity
    covariance F_j^T F_j / m = I (so the whole batch is standardized and whitened too)."""
    m = n // parts
    assert m >= D
    out = []
    for _ in range(parts):
        x = torch.randn(m, D, generator=g, dtype=torch.float64)
        q, _ = torch.linalg.qr(x - x.mean(0))  # orthonormal columns, orthogonal to 1
        out.append(q * math.sqrt(m))
    return torch.cat(out)


def loss_and_grads(fn, f1, f2, w, **kw):
    ins = [t.detach().clone().requires_grad_() for t in (f1, f2, w)]
    loss, inv, cov = fn(*ins, **kw)
    grads = torch.autograd.grad(loss, ins)
    return (loss, inv, cov), grads


# ----------------------------------------------------------------------------- 1. decorr_loss == Algorithm 1

LOSS_CASES = [  # parts, inv_coef, cov_coef, stopgrad
    (1, 1.0, 1.0, False),
    (2, 25.0, 1.0, False),
    (8, 10.0, 8.0, False),
    (1, 1.0, 25.0, True),
    (2, 1.0, 1.0, True),
    (8, 25.0, 1.0, True),
]


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-9), (torch.float32, 1e-4)], ids=["f64", "f32"])
@pytest.mark.parametrize("parts,inv_coef,cov_coef,stopgrad", LOSS_CASES)
def test_decorr_loss_matches_algorithm1(dtype, rtol, parts, inv_coef, cov_coef, stopgrad):
    g = torch.Generator().manual_seed(100 + parts)
    n, D = 64, 24
    f1 = standardized(n, D, g)
    f2 = standardized(n, D, g) * 0.5 + f1 * 0.5  # correlated second view
    w = torch.randn(D, D, generator=g, dtype=torch.float64) / math.sqrt(D)
    kw = dict(parts=parts, inv_coef=inv_coef, cov_coef=cov_coef, stopgrad=stopgrad)
    # the truth: Algorithm 1 in float64 on exactly the values the tested dtype can hold
    f1, f2, w = (t.to(dtype).double() for t in (f1, f2, w))
    ref, ref_g = loss_and_grads(algorithm1, f1, f2, w, **kw)
    out, out_g = loss_and_grads(decorr.decorr_loss, f1.to(dtype), f2.to(dtype), w.to(dtype), **kw)
    for name, a, e in zip(("loss", "inv", "cov"), out, ref, strict=True):
        assert_rel(a, e, rtol, name)
    for name, a, e in zip(("dL/df1", "dL/df2", "dL/dw"), out_g, ref_g, strict=True):
        assert_rel(a, e, rtol, name)


def test_decorr_loss_keeps_float64():
    """A reference implementation should not silently round float64 inputs to float32."""
    g = torch.Generator().manual_seed(1)
    f1, f2 = standardized(16, 8, g), standardized(16, 8, g)
    w = torch.randn(8, 8, generator=g, dtype=torch.float64)
    loss, inv, cov = decorr.decorr_loss(f1, f2, w, parts=2)
    assert loss.dtype == inv.dtype == cov.dtype == torch.float64


@pytest.mark.parametrize("parts", [1, 2, 8])
def test_decorr_loss_float32_near_converged(parts):
    """Near the optimum: every part whitened (F_j^T F_j / m = I), views almost equal, W close to
    I. The covariance term is then a small difference of O(D) quantities; float32 must still
    give loss, inv, cov and gradients to 1e-4 of the exact (float64) Algorithm 1."""
    g = torch.Generator().manual_seed(7)
    n, D, eps = 512, 32, 0.01
    f1 = whitened_parts(n, D, parts, g)
    f2 = f1 + eps * torch.randn(n, D, generator=g, dtype=torch.float64)
    w = torch.eye(D, dtype=torch.float64) + eps * torch.randn(
        D, D, generator=g, dtype=torch.float64
    ) / math.sqrt(D)
    f1, f2, w = (t.float() for t in (f1, f2, w))
    ref, ref_g = loss_and_grads(algorithm1, f1.double(), f2.double(), w.double(), parts=parts)
    ref32, _ = loss_and_grads(algorithm1, f1, f2, w, parts=parts)
    out, out_g = loss_and_grads(decorr.decorr_loss, f1, f2, w, parts=parts)
    assert out[0].dtype == torch.float32
    for name, a, e, r32 in zip(("loss", "inv", "cov"), out, ref, ref32, strict=True):
        assert rel_err(a, e) <= 1e-4, (
            f"{name}: decorr_loss float32 relative error {rel_err(a, e):.3e} > 1e-4 "
            f"(Algorithm 1 itself in float32: {rel_err(r32, e):.1e}; exact {name} = {e.item():.4e})"
        )
    for name, a, e in zip(("dL/df1", "dL/df2", "dL/dw"), out_g, ref_g, strict=True):
        assert_rel(a, e, 1e-4, name)


def test_decorr_loss_rejects_unequal_parts():
    f = torch.zeros(10, 4)
    with pytest.raises(decorr.UsageError):
        decorr.decorr_loss(f, f, torch.eye(4), parts=3)


# ----------------------------------------------------------------------------- 1b. the baselines


def off_diagonal_entries(c):
    return c[~torch.eye(c.shape[0], dtype=torch.bool)]


def official_barlow_twins(z1, z2, lambd):
    """Transcription of Barlow Twins' main.py (BarlowTwins.forward after the projector), one process:
    BatchNorm1d(affine=False) in training mode, c = bn(z1)^T bn(z2) / batch size."""
    bn = nn.BatchNorm1d(z1.shape[1], affine=False, dtype=z1.dtype).train()
    c = bn(z1).T @ bn(z2) / z1.shape[0]
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = off_diagonal_entries(c).pow(2).sum()
    return on_diag + lambd * off_diag, on_diag, off_diag


def official_vicreg(x, y, sim_coeff, std_coeff, cov_coeff):
    """Transcription of VICReg's main_vicreg.py (VICReg.forward after the projector), one process."""
    batch_size, num_features = x.shape
    repr_loss = F.mse_loss(x, y)
    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)
    std_x = torch.sqrt(x.var(dim=0) + 0.0001)
    std_y = torch.sqrt(y.var(dim=0) + 0.0001)
    std_loss = torch.mean(F.relu(1 - std_x)) / 2 + torch.mean(F.relu(1 - std_y)) / 2
    cov_x = (x.T @ x) / (batch_size - 1)
    cov_y = (y.T @ y) / (batch_size - 1)
    cov_loss = (
        off_diagonal_entries(cov_x).pow(2).sum() / num_features
        + off_diagonal_entries(cov_y).pow(2).sum() / num_features
    )
    loss = sim_coeff * repr_loss + std_coeff * std_loss + cov_coeff * cov_loss
    return loss, repr_loss, std_loss, cov_loss


@pytest.mark.parametrize(
    "name,ours,ref,coefs",
    [
        ("barlowtwins", decorr.barlow_twins_loss, official_barlow_twins, (0.0051,)),
        ("barlowtwins-lambda", decorr.barlow_twins_loss, official_barlow_twins, (0.3,)),
        ("vicreg", decorr.vicreg_loss, official_vicreg, (25.0, 25.0, 1.0)),
        ("vicreg-coefs", decorr.vicreg_loss, official_vicreg, (5.0, 2.0, 3.0)),
    ],
)
def test_baseline_matches_official(name, ours, ref, coefs):
    """Values (loss and each term) and gradients, float64, to 1e-9; the features are scaled so that
    some of VICReg's hinge terms are active and some not."""
    g = torch.Generator().manual_seed(21)
    n, D = 40, 12
    z1 = raw_features(n, D, g) * torch.linspace(0.2, 2.0, D, dtype=torch.float64)
    z2 = z1 + 0.5 * raw_features(n, D, g)
    outs = []
    for fn in (ours, ref):
        a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        vals = fn(a, b, *coefs)
        outs.append((vals, torch.autograd.grad(vals[0], (a, b))))
    (vo, go), (vr, gr) = outs
    assert len(vo) == len(vr)
    for i, (a, e) in enumerate(zip(vo, vr, strict=True)):
        assert a.dtype == torch.float64
        assert_rel(a, e, 1e-9, f"{name} term {i}")
    for a, e, what in zip(go, gr, ("dL/dz1", "dL/dz2"), strict=True):
        assert_rel(a, e, 1e-9, f"{name} {what}")


def test_baselines_float32_under_autocast():
    g = torch.Generator().manual_seed(22)
    z1, z2 = raw_features(32, 8, g, torch.float32), raw_features(32, 8, g, torch.float32)
    for fn in (decorr.barlow_twins_loss, decorr.vicreg_loss):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(z1.bfloat16(), z2.bfloat16())
        assert all(t.dtype == torch.float32 for t in out)
        for a, e in zip(out, fn(z1.bfloat16().float(), z2.bfloat16().float()), strict=True):
            assert_rel(a, e, 1e-5, fn.__name__)


# ----------------------------------------------------------------------------- 2. Lemma 3.2


def test_lemma_3_2_gradients():
    """Lemma 3.2 (appendix eq. 20-22) in decorr_loss. With F the D x n matrix of a batch's features
    divided by sqrt(n) (so that E_x[f f^T] = F F^T), L = 1/2 E_x ||W f1 - StopGrad(f2)||^2
    = 1/2 ||W F1 - F2||_F^2. decorr_loss with stopgrad, cov_coef 0 and inv_coef D/2 is this loss in
    both directions, L(1->2) + L(2->1), so its gradients must be the lemma's closed forms:
      dL/dW = (W F1 F1^T - F2 F1^T) + (W F2 F2^T - F1 F2^T)     eq. 21, once per direction
      dL/dF1 = W^T W F1 - W^T F2                               eq. 22 (F1 is a target only in L(2->1),
                                                                where StopGrad removes it)
    and without StopGrad eq. 22 no longer holds. Raw (not standardized) features, float64."""
    g = torch.Generator().manual_seed(3)
    n, D = 40, 12
    f1, f2 = raw_features(n, D, g), raw_features(n, D, g)
    w = torch.randn(D, D, generator=g, dtype=torch.float64)
    F1, F2 = f1.T / math.sqrt(n), f2.T / math.sqrt(n)
    for stopgrad in (True, False):
        a, b, ww = (t.clone().requires_grad_() for t in (f1, f2, w))
        loss, _, _ = decorr.decorr_loss(a, b, ww, inv_coef=D / 2, cov_coef=0.0, stopgrad=stopgrad)
        gw, g1, g2 = torch.autograd.grad(loss, (ww, a, b))
        gF1, gF2 = math.sqrt(n) * g1.T, math.sqrt(n) * g2.T  # dL/dF = sqrt(n) (dL/df)^T
        eq22_1, eq22_2 = w.T @ w @ F1 - w.T @ F2, w.T @ w @ F2 - w.T @ F1
        eq20 = 0.5 * (w @ F1 - F2).pow(2).sum() + 0.5 * (w @ F2 - F1).pow(2).sum()
        assert_rel(loss, eq20, 1e-12, "eq. 20, both directions")
        assert_rel(gw, (w @ F1 @ F1.T - F2 @ F1.T) + (w @ F2 @ F2.T - F1 @ F2.T), 1e-12, "eq. 21")
        if stopgrad:
            assert_rel(gF1, eq22_1, 1e-12, "eq. 22, dL/dF1")
            assert_rel(gF2, eq22_2, 1e-12, "eq. 22, dL/dF2")
        else:  # the targets' own gradient is added: eq. 22 fails, by the other direction's residual
            assert rel_err(gF1, eq22_1) > 0.1
            assert_rel(gF1, eq22_1 - (w @ F2 - F1), 1e-12, "dL/dF1 without StopGrad")


def test_lemma_3_2_in_decorr_loss_stopgrad():
    """decorr_loss with cov_coef=0 and stopgrad=True is Lemma 3.2's loss in both directions,
    scaled by 2/(nD): its W gradient is 2/(nD) [(W F1 - F2) F1^T + (W F2 - F1) F2^T]."""
    g = torch.Generator().manual_seed(4)
    n, D = 48, 10
    f1, f2 = standardized(n, D, g), standardized(n, D, g)
    w = torch.randn(D, D, generator=g, dtype=torch.float64, requires_grad=True)
    f1.requires_grad_()
    loss, _, _ = decorr.decorr_loss(f1, f2, w, cov_coef=0.0, stopgrad=True)
    gw, gf1 = torch.autograd.grad(loss, (w, f1))
    F1, F2, W = f1.detach().T, f2.T, w.detach()
    assert_rel(gw, 2 / (n * D) * ((W @ F1 - F2) @ F1.T + (W @ F2 - F1) @ F2.T), 1e-5, "dL/dW")
    assert_rel(gf1, 2 / (n * D) * (W.T @ W @ F1 - W.T @ F2).T, 1e-5, "dL/dF1")  # target f1 detached


def test_gram_square_symmetric_backward_and_shards():
    """GramSquare's one-product backward 4 W (W^T W) equals autograd's gradient of ||W^T W||^2;
    with uneven row shards and scale = number of shards, the values and gradients averaged over
    the shards equal the whole (what DDP's mean over ranks sees)."""
    g = torch.Generator().manual_seed(3)
    D, k = 40, 3
    w = torch.randn(D, D, generator=g, dtype=torch.float64, requires_grad=True)
    full = (w.T @ w).pow(2).sum()
    (full_grad,) = torch.autograd.grad(full, w)
    val = decorr.GramSquare.apply(w, 0, D, 1)
    (grad,) = torch.autograd.grad(2.5 * val, w)
    assert torch.allclose(val, full, rtol=1e-12) and torch.allclose(grad, 2.5 * full_grad, rtol=1e-12)
    vals, grads = [], []
    for r in range(k):
        v = decorr.GramSquare.apply(w, r * D // k, (r + 1) * D // k, k)
        vals.append(v.detach())
        grads.append(torch.autograd.grad(v, w)[0])
    assert len({(r + 1) * D // k - r * D // k for r in range(k)}) == 2  # the shards are uneven
    assert torch.allclose(sum(vals) / k, full.detach(), rtol=1e-12)
    assert torch.allclose(sum(grads) / k, full_grad, rtol=1e-12)
    assert not torch.allclose(grads[0], grads[1])  # each rank contributes its own part


# ----------------------------------------------------------------------------- 3. standardize == BatchNorm1d


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-9), (torch.float32, 1e-5)], ids=["f64", "f32"])
def test_standardize_equals_batchnorm(dtype, rtol):
    g = torch.Generator().manual_seed(5)
    n, D = 32, 8
    x = raw_features(n, D, g, dtype)
    up = torch.randn(n, D, generator=g, dtype=torch.float64).to(dtype)
    bn = nn.BatchNorm1d(D, affine=False, dtype=dtype).train()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = decorr.standardize(xa), bn(xb)
    (ya * up).sum().backward()
    (yb * up).sum().backward()
    assert_rel(ya, yb, rtol, "standardize(x)")
    assert_rel(xa.grad, xb.grad, rtol, "d/dx")
    assert ya.dtype == dtype, f"standardize returned {ya.dtype} for {dtype} input"


# ----------------------------------------------------------------------------- 4. memory


def saved_bytes(fn):
    """Bytes of the distinct storages that autograd saves for backward while fn() runs."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = max(storages.get(s.data_ptr(), 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    total = sum(storages.values())
    del out
    return total


def test_memory_does_not_scale_with_parts():
    """Algorithm 1 keeps a D x D matrix per part alive for backward (several hundred MB here);
    decorr_loss must need a small fraction of that, independent of the number of parts."""
    g = torch.Generator().manual_seed(6)
    n, D, parts = 512, 1024, 32
    f1 = torch.randn(n, D, generator=g).requires_grad_()
    f2 = torch.randn(n, D, generator=g).requires_grad_()
    w = (torch.randn(D, D, generator=g) / math.sqrt(D)).requires_grad_()
    ref = saved_bytes(lambda: algorithm1(f1, f2, w, parts=parts))
    ours = saved_bytes(lambda: decorr.decorr_loss(f1, f2, w, parts=parts))
    ours1 = saved_bytes(lambda: decorr.decorr_loss(f1, f2, w, parts=1))
    MB = 2**20
    assert ref > 2 * parts * D * D * 4, f"reference saved only {ref / MB:.0f} MB: measurement broken?"
    assert ours < ref / 10, f"decorr_loss saves {ours / MB:.1f} MB vs Algorithm 1 {ref / MB:.1f} MB"
    assert ours < 1.5 * ours1, f"saved memory grows with parts: {ours1 / MB:.1f} MB -> {ours / MB:.1f} MB"


# ----------------------------------------------------------------------------- 5. autocast


def test_autocast_bf16_returns_float32():
    g = torch.Generator().manual_seed(8)
    n, D = 64, 16
    x1, x2 = raw_features(n, D, g, torch.float32), raw_features(n, D, g, torch.float32)
    w = torch.randn(D, D, generator=g) / math.sqrt(D)

    def run(autocast, a, b):
        ins = [t.clone().requires_grad_() for t in (a, b, w)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            f1, f2 = decorr.standardize(ins[0]), decorr.standardize(ins[1])
            loss, inv, cov = decorr.decorr_loss(f1, f2, ins[2], parts=2, inv_coef=25.0)
        grads = torch.autograd.grad(loss, ins)
        return (f1, f2, loss, inv, cov), grads

    (fa, fb, *vals), grads = run(True, x1, x2)
    (fa32, fb32, *vals32), grads32 = run(False, x1, x2)
    for t in (fa, fb, *vals):
        assert t.dtype == torch.float32
    for name, a, e in zip(
        ("std(x1)", "std(x2)", "loss", "inv", "cov"), (fa, fb, *vals), (fa32, fb32, *vals32), strict=True
    ):
        assert_rel(a, e, 1e-5, name)
    for name, a, e in zip(("dx1", "dx2", "dw"), grads, grads32, strict=True):
        assert_rel(a, e, 1e-5, name)

    # bf16 inputs, as a Linear under autocast would produce them: float32 results, computed
    # exactly as from the same values in float32
    h1, h2 = x1.bfloat16(), x2.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s1, s2 = decorr.standardize(h1), decorr.standardize(h2)
        out = decorr.decorr_loss(h1, h2, w.bfloat16(), parts=2)
    assert s1.dtype == s2.dtype == torch.float32 and out[0].dtype == torch.float32
    assert_rel(s1, decorr.standardize(h1.float()), 1e-6, "std(bf16)")
    assert_rel(s2, decorr.standardize(h2.float()), 1e-6, "std(bf16)")
    for a, e in zip(
        out, decorr.decorr_loss(h1.float(), h2.float(), w.bfloat16().float(), parts=2), strict=True
    ):
        assert_rel(a, e, 1e-5, "decorr_loss(bf16)")


# ----------------------------------------------------------------------------- 6. distributed


def _finish_group():
    dist.barrier()
    dist.destroy_process_group()


def _dist_loss_worker(rank, world, tmp):
    """Rank r standardizes its rows [r n, (r+1) n) of the global batch (synchronised) and computes
    each case's loss on them; saves values and gradients."""
    init_gloo(rank, world, tmp)
    try:
        data = torch.load(os.path.join(tmp, "inputs.pt"))
        results = []
        for case in data["cases"][world]:
            x1, x2, w = (
                data["x1"][:, : case["D"]],
                data["x2"][:, : case["D"]],
                data["w"][: case["D"], : case["D"]],
            )
            n = x1.shape[0]
            rows = slice(rank * n // world, (rank + 1) * n // world)
            a, b, wl = (t.clone().requires_grad_() for t in (x1[rows], x2[rows], w))
            out = one_loss(case, a, b, wl)
            out[0].backward()
            results.append(dict(values=[v.detach() for v in out], gw=wl.grad, g1=a.grad, g2=b.grad))
        torch.save(results, os.path.join(tmp, f"out{world}_{rank}.pt"))
    finally:
        _finish_group()


def one_loss(case, a, b, w):
    """The case's loss of raw features a, b (and W for decorr): (loss, *terms)."""
    if case["loss"] == "barlowtwins":
        return decorr.barlow_twins_loss(a, b, case["cov"])
    if case["loss"] == "vicreg":
        return decorr.vicreg_loss(a, b, case["inv"], 25.0, case["cov"])
    f1, f2 = decorr.standardize(a), decorr.standardize(b)
    return decorr.decorr_loss(
        f1, f2, w, parts=case["k"], inv_coef=case["inv"], cov_coef=case["cov"], stopgrad=case.get("sg", False)
    )


N_DIST = 48  # global rows: 24, 16, 12 per rank on 2, 3, 4 processes
DIST_CASES = {  # world -> cases; k < world: a part spans ranks; k = 3 on 2 or 4: parts straddle ranks
    world: [
        dict(loss="decorr", D=D, k=k, inv=inv, cov=cov, sg=sg)
        for D in (13, 40)  # D = 13: parts of m >= D rows (D x D form) but k = 4, 8; 40: Gram form
        for k, inv, cov, sg in ks
    ]
    + [dict(loss="barlowtwins", D=13, cov=0.0051), dict(loss="vicreg", D=13, inv=25.0, cov=1.0)]
    for world, ks in {
        2: [(1, 1.0, 1.0, False), (2, 25.0, 8.0, False), (3, 1.0, 2.0, False), (4, 1.0, 1.0, True)],
        3: [(1, 1.0, 1.0, False), (2, 10.0, 1.0, False), (6, 1.0, 1.0, False)],
        4: [(1, 1.0, 1.0, True), (2, 25.0, 1.0, False), (3, 1.0, 1.0, False), (8, 1.0, 1.0, False)],
    }.items()
}


@pytest.fixture(scope="module")
def dist_losses(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("dist_losses"))
    g = torch.Generator().manual_seed(9)
    data = dict(
        x1=raw_features(N_DIST, 40, g),
        x2=raw_features(N_DIST, 40, g),
        w=torch.randn(40, 40, generator=g, dtype=torch.float64) / math.sqrt(40),
        cases=DIST_CASES,
    )
    torch.save(data, os.path.join(tmp, "inputs.pt"))
    for world in DIST_CASES:
        if os.path.exists(os.path.join(tmp, "store")):
            os.remove(os.path.join(tmp, "store"))
        mp.spawn(_dist_loss_worker, args=(world, tmp), nprocs=world, join=True)
    return data, {w: [torch.load(os.path.join(tmp, f"out{w}_{r}.pt")) for r in range(w)] for w in DIST_CASES}


@pytest.mark.parametrize(
    "world,case",
    [(w, i) for w, cs in DIST_CASES.items() for i in range(len(cs))],
    ids=[
        f"world{w}-{c['loss']}-D{c['D']}" + (f"-k{c['k']}-sg{int(c['sg'])}" if "k" in c else "")
        for w, cs in DIST_CASES.items()
        for c in cs
    ],
)
def test_distributed_equals_single_process(dist_losses, world, case):
    """W processes, each with its contiguous rows of the global batch, vs one process holding the
    whole batch with the same k, in float64: DDP averages parameter gradients, so the optimised loss
    is the mean over ranks, and it and W's gradient must equal the single process's; the
    synchronised standardization (and the baselines' all_reduce) sums the ranks' gradients in
    backward, so rank r's feature gradient is W x the single-process gradient of its rows."""
    data, outs = dist_losses
    c = DIST_CASES[world][case]
    ins = [
        t.clone().requires_grad_()
        for t in (data["x1"][:, : c["D"]], data["x2"][:, : c["D"]], data["w"][: c["D"], : c["D"]])
    ]
    single = one_loss(c, *ins)
    single[0].backward()
    res = [o[case] for o in outs[world]]
    for i, v in enumerate(single):
        assert_rel(torch.stack([r["values"][i] for r in res]).mean(), v, 1e-9, f"mean over ranks of term {i}")
    if c["loss"] == "decorr":
        assert_rel(
            torch.stack([r["gw"] for r in res]).mean(0), ins[2].grad, 1e-9, "mean over ranks of W.grad"
        )
    n = N_DIST
    for r, out in enumerate(res):
        rows = slice(r * n // world, (r + 1) * n // world)
        assert_rel(out["g1"] / world, ins[0].grad[rows], 1e-9, f"rank {r} grad of view 1 / world")
        assert_rel(out["g2"] / world, ins[1].grad[rows], 1e-9, f"rank {r} grad of view 2 / world")


def _dist_bn_worker(rank, world, tmp):
    init_gloo(rank, world, tmp)
    try:
        data = torch.load(os.path.join(tmp, "inputs.pt"))
        n = data["x"].shape[0]
        rows = slice(rank * n // world, (rank + 1) * n // world)
        bn = nn.BatchNorm2d(data["weight"].numel())
        with torch.no_grad():
            bn.weight.copy_(data["weight"])
            bn.bias.copy_(data["bias"])
        model = decorr.sync_batchnorm(nn.Sequential(bn), torch.device("cpu")).train()
        sbn = model[0]
        out = dict(kind=type(sbn).__name__)
        x = data["x"][rows].clone().requires_grad_()
        y = model(x)
        (y * data["up"][rows]).sum().backward()
        with torch.no_grad():
            model(data["x2"][rows])  # a second step for the running stats
        out.update(
            y=y.detach(),
            gx=x.grad,
            gweight=sbn.weight.grad,
            gbias=sbn.bias.grad,
            running_mean=sbn.running_mean.clone(),
            running_var=sbn.running_var.clone(),
            num_batches_tracked=sbn.num_batches_tracked.clone(),
        )
        model.eval()  # diagnostics() runs the model in eval mode
        try:
            with torch.no_grad():
                out["y_eval"] = model(data["x"][rows])
        except Exception as e:  # reported by the eval-mode test
            out["eval_error"] = f"{type(e).__name__}: {e}"
        torch.save(out, os.path.join(tmp, f"out{rank}.pt"))
    finally:
        _finish_group()


@pytest.fixture(scope="module")
def dist_bn(tmp_path_factory):
    """2 ranks with CPUSyncBatchNorm (via decorr.sync_batchnorm) vs one nn.BatchNorm2d on the
    whole batch: one training step (forward + backward), one more forward, then eval mode."""
    tmp = tmp_path_factory.mktemp("dist_bn")
    g = torch.Generator().manual_seed(10)
    world, n, C = 2, 8, 3
    x = torch.randn(n, C, 4, 4, generator=g) * torch.tensor([1.0, 3.0, 0.5]).view(1, C, 1, 1) + 2
    data = dict(
        x=x,
        x2=torch.randn(n, C, 4, 4, generator=g) - 1,
        up=torch.randn(n, C, 4, 4, generator=g),
        weight=torch.rand(C, generator=g) + 0.5,
        bias=torch.randn(C, generator=g),
    )
    torch.save(data, tmp / "inputs.pt")
    mp.spawn(_dist_bn_worker, args=(world, str(tmp)), nprocs=world, join=True)
    res = [torch.load(tmp / f"out{r}.pt") for r in range(world)]

    bn = nn.BatchNorm2d(C).train()
    with torch.no_grad():
        bn.weight.copy_(data["weight"])
        bn.bias.copy_(data["bias"])
    xs = x.clone().requires_grad_()
    y = bn(xs)
    ((y * data["up"]).sum() / world).backward()  # DDP's objective: the mean over ranks
    with torch.no_grad():
        bn(data["x2"])
    bn.eval()
    with torch.no_grad():
        y_eval = bn(x)
    single = dict(
        y=y.detach(),
        gx=xs.grad,
        gweight=bn.weight.grad,
        gbias=bn.bias.grad,
        running_mean=bn.running_mean,
        running_var=bn.running_var,
        num_batches_tracked=bn.num_batches_tracked,
        y_eval=y_eval,
    )
    return res, single, world, n


def test_cpu_sync_batchnorm_training_equals_single_batchnorm(dist_bn):
    res, single, world, n = dist_bn
    tol = 1e-5
    for r, out in enumerate(res):
        assert out["kind"] == "CPUSyncBatchNorm"
        rows = slice(r * n // world, (r + 1) * n // world)
        assert_rel(out["y"], single["y"][rows], tol, f"rank {r} output")
        assert_rel(out["gx"] / world, single["gx"][rows], tol, f"rank {r} input grad / world")
        assert_rel(out["running_mean"], single["running_mean"], tol, f"rank {r} running_mean")
        assert_rel(out["running_var"], single["running_var"], tol, f"rank {r} running_var")
        assert int(out["num_batches_tracked"]) == int(single["num_batches_tracked"]) == 2
    assert_rel(torch.stack([o["gweight"] for o in res]).mean(0), single["gweight"], tol, "mean weight grad")
    assert_rel(torch.stack([o["gbias"] for o in res]).mean(0), single["gbias"], tol, "mean bias grad")


def test_cpu_sync_batchnorm_eval_mode_uses_running_stats(dist_bn):
    res, single, world, n = dist_bn
    for r, out in enumerate(res):
        assert "eval_error" not in out, f"rank {r}: CPUSyncBatchNorm in eval mode raised {out['eval_error']}"
        rows = slice(r * n // world, (r + 1) * n // world)
        assert_rel(out["y_eval"], single["y_eval"][rows], 1e-5, f"rank {r} eval output")


# ----------------------------------------------------------------------------- 7. diagnostics


def test_corr_dist_identity_correlation_is_zero():
    g = torch.Generator().manual_seed(11)
    n, D = 256, 32
    q = whitened_parts(n, D, 1, g)  # correlation exactly I
    h = q * (0.1 + 5 * torch.rand(D, generator=g, dtype=torch.float64)) + 10 * torch.randn(
        D, generator=g, dtype=torch.float64
    )
    assert abs(decorr.corr_dist(h.float())) < 1e-4


def test_corr_dist_matches_direct_computation():
    g = torch.Generator().manual_seed(12)
    n, D = 256, 32
    h = raw_features(n, D, g)
    expected = ((torch.corrcoef(h.T) - torch.eye(D, dtype=torch.float64)).pow(2).sum() / D).item()
    assert expected > 0.5  # non-trivial
    assert decorr.corr_dist(h.float()) == pytest.approx(expected, rel=1e-4)


def test_wp_offdiag():
    """Fig. 3b's measure: the share of W's energy off the diagonal once each row is divided by its
    diagonal entry. Worked by hand: [[2, 1], [0.5, 1]] -> rows [[1, 0.5], [0.5, 1]]: energy 2.5 of
    which 0.5 off the diagonal, 0.2; [[-2, 2, 0], [0, 1, 0], [1, 0, 0.5]] -> [[1, -1, 0], [0, 1, 0],
    [2, 0, 1]]: 5 of 8, 0.625 (a negative diagonal entry divides its row too); a diagonal W: 0."""
    g = torch.Generator().manual_seed(13)
    assert decorr.wp_offdiag(torch.tensor([[2.0, 1.0], [0.5, 1.0]])) == pytest.approx(0.2, rel=1e-6)
    w3 = torch.tensor([[-2.0, 2.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.5]])
    assert decorr.wp_offdiag(w3) == pytest.approx(0.625, rel=1e-6)
    # its transpose: rows [[1, 0, -0.5], [2, 1, 0], [0, 0, 1]], 4.25 of 7.25 (rows, not columns, divided)
    assert decorr.wp_offdiag(w3.T) == pytest.approx(4.25 / 7.25, rel=1e-6)
    D = 16
    assert decorr.wp_offdiag(torch.diag(torch.rand(D, generator=g) + 0.5)) == pytest.approx(0.0, abs=1e-6)


def test_eff_rank_of_rank_r_features():
    g = torch.Generator().manual_seed(14)
    n, D, r = 256, 64, 5
    u = whitened_parts(n, r, 1, g) / math.sqrt(n)  # n x r orthonormal, centred columns
    v, _ = torch.linalg.qr(torch.randn(D, r, generator=g, dtype=torch.float64))
    x = 3.0 * u @ v.T + torch.randn(D, generator=g, dtype=torch.float64)  # equal singular values
    assert decorr.eff_rank(x.float()) == pytest.approx(r, abs=0.05)
    full = torch.randn(n, D, generator=g)
    assert decorr.eff_rank(full) > 0.8 * D


def _feat_std_and_rank(z):
    """As diagnostics() computes them."""
    return z.std(0).mean().item(), decorr.eff_rank(decorr.centred_unit(z))


def test_collapsing():
    g = torch.Generator().manual_seed(15)
    const = torch.randn(1, 64, generator=g).expand(256, 64).contiguous()
    assert decorr.collapsing(*_feat_std_and_rank(const)) is True
    one_dir = torch.randn(256, 1, generator=g) @ torch.randn(1, 64, generator=g)  # dimensional collapse
    assert decorr.collapsing(*_feat_std_and_rank(one_dir)) is True
    healthy = torch.randn(256, 64, generator=g)
    assert decorr.collapsing(*_feat_std_and_rank(healthy)) is False


def test_knn_predict_separated_clusters():
    g = torch.Generator().manual_seed(16)
    classes, D = 6, 16
    centres = torch.randn(classes, D, generator=g) * 10

    def sample(per):
        y = torch.arange(classes).repeat_interleave(per)
        return centres[y] + 0.3 * torch.randn(len(y), D, generator=g), y

    bank, bank_y = sample(50)
    query, query_y = sample(20)
    pred = decorr.knn_predict(bank, bank_y, query, classes)
    assert pred.shape == query_y.shape
    assert (pred == query_y).float().mean().item() >= 0.99


# ----------------------------------------------------------------------------- 8. LARS and schedule


def test_learning_rate_schedule():
    total, warmup, base = 100, 10, 0.6
    lr = [decorr.learning_rate(s, total, warmup, base) for s in range(total + 1)]
    steps = np.diff(lr[:warmup])
    assert lr[0] > 0 and np.allclose(steps, steps[0]) and steps[0] > 0  # linear rise
    assert lr[warmup - 1] == pytest.approx(base) and lr[warmup] == pytest.approx(base)
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(lr[warmup:]))  # then non-increasing
    mid = warmup + (total - warmup) // 2
    assert lr[mid] == pytest.approx(base / 2, rel=1e-6)  # cosine: half way
    assert lr[total] == pytest.approx(0.0, abs=1e-12)  # ends at 0
    assert lr[total - 1] < 1e-3 * base


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 1)
        self.bn = nn.BatchNorm1d(1)
        self.frozen = nn.Parameter(torch.ones(2, 2), requires_grad=False)


PLAIN_LARS = dict(optimizer="lars", fix_pred_lr=False, lars_clip=False)  # the flags' defaults


def test_make_optimizer_groups():
    net = _Net()
    opt = decorr.make_optimizer(net, types.SimpleNamespace(wd=1e-4, lars_eta=0.001, **PLAIN_LARS))
    lars = [gr for gr in opt.param_groups if gr["lars"]]
    plain = [gr for gr in opt.param_groups if not gr["lars"]]
    assert len(lars) == 1 and len(plain) == 1
    ids = lambda ps: {id(p) for p in ps}
    assert ids(lars[0]["params"]) == {id(net.lin.weight)}
    assert lars[0]["weight_decay"] == 1e-4
    assert ids(plain[0]["params"]) == ids([net.lin.bias, net.bn.weight, net.bn.bias])
    assert plain[0]["weight_decay"] == 0.0
    assert id(net.frozen) not in ids(p for gr in opt.param_groups for p in gr["params"])


def test_lars_steps_match_hand_computation():
    net = _Net()
    wd, lr, mom, eta = 0.1, 0.5, 0.9, 0.001
    opt = decorr.make_optimizer(net, types.SimpleNamespace(wd=wd, lars_eta=eta, **PLAIN_LARS))
    for gr in opt.param_groups:
        gr["lr"] = lr
    with torch.no_grad():
        net.lin.weight.copy_(torch.tensor([[3.0, 4.0]]))
        net.lin.bias.fill_(2.0)
    w = np.array([3.0, 4.0])
    b = 2.0
    mu_w, mu_b = np.zeros(2), 0.0
    for gw, gb in (([1.0, -2.0], 0.5), ([-0.25, 0.75], -1.5)):
        gw = np.array(gw)
        net.lin.weight.grad = torch.from_numpy(gw).float().unsqueeze(0)
        net.lin.bias.grad = torch.tensor([gb])
        for p in (net.bn.weight, net.bn.bias):
            p.grad = None  # no grad: left alone
        opt.step()
        d = gw + wd * w  # weight decay, then the trust ratio
        d = d * eta * np.linalg.norm(w) / np.linalg.norm(d)
        mu_w = mom * mu_w + d
        w = w - lr * mu_w
        mu_b = mom * mu_b + gb  # bias: plain momentum SGD
        b = b - lr * mu_b
        np.testing.assert_allclose(net.lin.weight.detach().numpy()[0], w, rtol=1e-6)
        np.testing.assert_allclose(net.lin.bias.item(), b, rtol=1e-6)
    assert torch.equal(net.bn.weight.detach(), torch.ones(1)) and torch.equal(
        net.bn.bias.detach(), torch.zeros(1)
    )


@pytest.mark.parametrize("lr", [0.5, 1e-3])
def test_lars_clip_matches_hand_computation(lr):
    """--lars-clip (apex LARC's clip mode, solo-learn's clip_lr): the trust ratio r becomes
    min(r / lr, 1), so the weight moves by min(r, lr) (g + wd w) (momentum aside); at lr 0.5 the
    ratio is below lr (r = 0.0025), at lr 1e-3 above it (the step is plain lr (g + wd w))."""
    net = _Net()
    wd, mom, eta = 0.1, 0.9, 0.001
    args = types.SimpleNamespace(wd=wd, lars_eta=eta, **dict(PLAIN_LARS, lars_clip=True))
    opt = decorr.make_optimizer(net, args)
    for gr in opt.param_groups:
        gr["lr"] = lr
    with torch.no_grad():
        net.lin.weight.copy_(torch.tensor([[3.0, 4.0]]))
    w = np.array([3.0, 4.0])
    mu_w = np.zeros(2)
    for gw in ([1.0, -2.0], [-0.25, 0.75]):
        gw = np.array(gw)
        net.lin.weight.grad = torch.from_numpy(gw).float().unsqueeze(0)
        opt.step()
        d = gw + wd * w
        trust = eta * np.linalg.norm(w) / np.linalg.norm(d)
        d = d * min(trust / lr, 1.0)
        mu_w = mom * mu_w + d
        w = w - lr * mu_w
        np.testing.assert_allclose(net.lin.weight.detach().numpy()[0], w, rtol=1e-6)


def test_sgd_decays_every_parameter():
    """--optimizer sgd (SimSiam's main_simsiam.py): one group, every trainable parameter (biases and
    BatchNorm included) with weight decay, momentum 0.9; the update is torch's SGD."""
    net = _Net()
    args = types.SimpleNamespace(wd=1e-4, lars_eta=None, **dict(PLAIN_LARS, optimizer="sgd"))
    opt = decorr.make_optimizer(net, args)
    assert isinstance(opt, torch.optim.SGD) and len(opt.param_groups) == 1
    group = opt.param_groups[0]
    ids = {id(p) for p in group["params"]}
    assert ids == {id(p) for p in (net.lin.weight, net.lin.bias, net.bn.weight, net.bn.bias)}
    assert (group["weight_decay"], group["momentum"], group["nesterov"]) == (1e-4, 0.9, False)


def test_fix_pred_lr_keeps_the_predictors_lr():
    """--fix-pred-lr (SimSiam's official flag): the predictor's parameters sit in groups that keep the
    base lr (--lr x batch/256) whatever lr train_step is given; every other parameter takes it."""
    args = decorr.parse_args(["--loss", "simsiam", "--proj", "16-8", "--batch-size", "8", "--amp", "none"])
    args.fix_pred_lr = True
    torch.manual_seed(0)
    model = decorr.Model(args)
    opt = decorr.make_optimizer(model, args)
    base = args.lr * 8 / 256
    predictor = {id(p) for p in model.predictor.parameters()}
    fixed = [g for g in opt.param_groups if "fixed_lr" in g]
    assert {id(p) for g in fixed for p in g["params"]} == predictor
    assert all(g["fixed_lr"] == base for g in fixed)
    x1, x2 = torch.randn(2, 8, 3, 32, 32)
    decorr.train_step(model, opt, torch.amp.GradScaler("cpu", enabled=False), x1, x2, 0.001, None)
    for group in opt.param_groups:
        assert group["lr"] == (base if "fixed_lr" in group else 0.001)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in opt.param_groups for p in g["params"]} == trainable


def test_asymmetric_losses_importable_from_decorr():
    """simsiam_loss and byol_loss are importable from decorr, beside its own and the symmetric ones."""
    assert decorr.simsiam_loss is baselines.simsiam_loss and decorr.byol_loss is baselines.byol_loss
    assert all(callable(f) for f in (decorr.decorr_loss, decorr.barlow_twins_loss, decorr.vicreg_loss))


def test_lars_zero_parameter_uses_unit_trust_ratio():
    p = nn.Parameter(torch.zeros(2, 2))
    opt = decorr.LARS([p], lr=0.1, weight_decay=0.0, momentum=0.0)
    p.grad = torch.ones(2, 2)
    opt.step()
    assert torch.allclose(p.detach(), torch.full((2, 2), -0.1))


def test_train_step_is_forward_backward_update():
    """train_step (the run's step, which bench.py times) returns the loss and terms of the weights it
    was given, then leaves the weights, BatchNorm statistics and LARS state of one update at lr."""
    args = decorr.parse_args(["--proj", "16-8", "--batch-size", "8", "--amp", "none"])
    torch.manual_seed(0)
    nets = [decorr.Model(args), decorr.Model(args)]
    nets[1].load_state_dict(nets[0].state_dict())
    start = {k: v.clone() for k, v in nets[0].state_dict().items()}
    opts = [decorr.make_optimizer(n, args) for n in nets]
    x1, x2 = torch.randn(2, 8, 3, 32, 32)
    out = decorr.train_step(nets[0], opts[0], torch.amp.GradScaler("cpu", enabled=False), x1, x2, 0.5, None)
    ref = nets[1](x1, x2)  # by hand: forward, backward, LARS at lr 0.5
    ref[0].backward()
    for gr in opts[1].param_groups:
        gr["lr"] = 0.5
    opts[1].step()
    assert len(out) == 3 and all(torch.equal(a, b) for a, b in zip(out, ref, strict=True))
    after, by_hand = nets[0].state_dict(), nets[1].state_dict()
    assert all(torch.equal(after[k], by_hand[k]) for k in after)
    assert not torch.equal(after["predictor.weight"], start["predictor.weight"])  # it did update
    assert not torch.equal(after["projector.1.running_mean"], start["projector.1.running_mean"])
    mus = [
        [o.state[p]["mu"] for p in n.parameters() if p.requires_grad] for o, n in zip(opts, nets, strict=True)
    ]
    assert all(torch.equal(a, b) for a, b in zip(*mus, strict=True))


class _ScaledNet(nn.Module):
    """A weight and a bias (both of LARS's groups), returning (loss, term) as Model does."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x1, x2):
        loss = (self.lin(x1) - x2).pow(2).mean()
        return loss, loss


def test_fp16_grad_scaler_checkpoint_round_trip(tmp_path):
    """--amp fp16: train_step runs the loss through the GradScaler (torch allows one on the CPU, and
    fp16 autocast of a Linear): an overflowing step changes no weight and halves the scale, clean
    steps double it every growth_interval. The scaler's state goes through save_checkpoint and
    load_checkpoint (weights_only) with the model and LARS, and a scaler restored from the file (made
    with other settings, as a resumed run makes it) continues exactly as the original: the same
    scales and weights over further clean and overflowing steps. (The whole fp16 run needs CUDA.)"""
    torch.manual_seed(0)
    nets = [_ScaledNet(), _ScaledNet()]
    nets[1].load_state_dict(nets[0].state_dict())
    args = types.SimpleNamespace(wd=1e-4, lars_eta=0.02, **PLAIN_LARS)
    opt = decorr.make_optimizer(nets[0], args)
    scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=2.0**10, growth_interval=2)
    g = torch.Generator().manual_seed(30)
    x, y = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
    bad = x.clone()
    bad[0, 0] = float("inf")

    def step(net, optimizer, s, inputs):
        before = [p.clone() for p in net.parameters()]
        loss, _ = decorr.train_step(net, optimizer, s, inputs, y, 0.5, torch.float16)
        assert loss.dtype == torch.float32
        moved = any(not torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
        return s.get_scale(), s.state_dict()["_growth_tracker"], moved

    seen = [step(nets[0], opt, scaler, inputs) for inputs in (x, x, bad, x)]
    assert seen == [(2.0**10, 1, True), (2.0**11, 0, True), (2.0**10, 0, False), (2.0**10, 1, True)]

    path = tmp_path / "checkpoint.pt"
    decorr.save_checkpoint(str(path), args, 4, nets[0], opt, scaler)
    ckpt = decorr.load_checkpoint(str(path))
    assert ckpt["scaler"] == scaler.state_dict() and ckpt["scaler"]["scale"] == 2.0**10
    restored = torch.amp.GradScaler("cpu", enabled=True)  # default scale 2^16, growth interval 2000
    restored.load_state_dict(ckpt["scaler"])
    nets[1].load_state_dict(ckpt["model"])
    opt1 = decorr.make_optimizer(nets[1], args)
    opt1.load_state_dict(ckpt["optimizer"])
    after = []
    for inputs in (x, bad, x, x):
        after.append(step(nets[1], opt1, restored, inputs))
        assert step(nets[0], opt, scaler, inputs) == after[-1]
        for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
            assert torch.equal(a, b)
    # the restored growth tracker (1) and interval (2): the first clean step grows the scale
    assert after == [(2.0**11, 0, True), (2.0**10, 0, False), (2.0**10, 1, True), (2.0**11, 0, True)]


# ----------------------------------------------------------------------------- the asymmetric methods' model


def tiny_args(*flags):
    return decorr.parse_args(["--proj", "16-8", "--batch-size", "8", "--amp", "none", *flags])


def test_model_heads_per_method():
    """Each --loss gets its heads: SimSiam's projector ends in BatchNorm1d(affine=False) and its MLP
    predictor is the D -> D/4 -> D bottleneck; BYOL's MLP predictor is D -> 4096 -> D and its target a
    frozen copy of backbone + projector; --predictor linear is one D x D layer without bias; the
    symmetric losses have no predictor."""
    simsiam = decorr.Model(tiny_args("--loss", "simsiam", "--proj", "16-16-8"))
    last = simsiam.projector[-1]
    assert isinstance(last, nn.BatchNorm1d) and not last.affine and last.num_features == 8
    assert [m.out_features for m in simsiam.predictor if isinstance(m, nn.Linear)] == [2, 8]
    assert simsiam.target is None and simsiam.linear_weight() is None
    byol = decorr.Model(tiny_args("--loss", "byol"))
    assert [m.out_features for m in byol.predictor if isinstance(m, nn.Linear)] == [4096, 8]
    online = byol.online().state_dict()
    target = byol.target.state_dict()
    assert online.keys() == target.keys() and all(torch.equal(online[k], target[k]) for k in online)
    assert not any(p.requires_grad for p in byol.target.parameters())
    for loss in ("simsiam", "byol"):
        model = decorr.Model(tiny_args("--loss", loss, "--predictor", "linear"))
        assert isinstance(model.predictor, nn.Linear) and model.predictor.bias is None
        assert model.linear_weight() is model.predictor.weight and model.predictor.weight.shape == (8, 8)
    for loss in ("barlowtwins", "vicreg"):
        assert decorr.Model(tiny_args("--loss", loss)).predictor is None


def test_loss_scale_scales_the_loss_not_its_terms():
    """--loss-scale 0.1 (solo-learn's Barlow Twins): the loss optimised is 0.1 x the method's, the
    terms logged are the method's."""
    x1, x2 = torch.randn(2, 8, 3, 32, 32)
    values = []
    for scale in ("1", "0.1"):
        torch.manual_seed(0)
        model = decorr.Model(tiny_args("--loss", "barlowtwins", "--loss-scale", scale))
        values.append([t.item() for t in model(x1, x2)])
    (loss, *terms), (scaled, *scaled_terms) = values
    assert scaled == pytest.approx(0.1 * loss, rel=1e-6) and scaled_terms == terms


def test_bridge_in_diagnostics_by_hand():
    """The diagnostics' bridge_dist and bridge_align are baselines' measures of W and the predictor's
    input on the probe batch in eval mode: decorr's projection standardized over the batch (eq. 33),
    SimSiam's and BYOL's projection as it is; a model with an MLP predictor logs neither."""
    g = torch.Generator().manual_seed(3)
    probe = (torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 4, (16,), generator=g))
    bank = (torch.randn(24, 3, 32, 32, generator=g), torch.randint(0, 4, (24,), generator=g))
    for flags in (["--predictor-init", "random"], ["--loss", "simsiam", "--predictor", "linear"]):
        torch.manual_seed(0)
        model = decorr.Model(tiny_args(*flags))
        out = decorr.diagnostics(model, probe, bank, 4)
        model.eval()
        with torch.no_grad():
            z = model.projector(model.backbone(probe[0]))
        if model.args.loss == "decorr":
            z = (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-5)
        w = model.predictor.weight
        assert out["bridge_dist"] == pytest.approx(baselines.bridge_dist(w, z), rel=1e-5)
        assert out["bridge_align"] == pytest.approx(baselines.bridge_align(w, z), rel=1e-5)
    mlp = decorr.diagnostics(decorr.Model(tiny_args("--loss", "byol")), probe, bank, 4)
    assert not {"bridge_dist", "bridge_align", "wp_offdiag"} & mlp.keys()


def test_sync_batchnorm_keeps_frozen_parameters_frozen():
    """CPU SyncBatchNorm replaces each BatchNorm by a new module: a parameter that did not train (BYOL's
    target) must not start to (DDP would wait for its gradient, the optimiser would decay it)."""
    frozen = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    for parameter in frozen.parameters():
        parameter.requires_grad_(False)
    trained = nn.Sequential(nn.BatchNorm1d(4))
    converted = decorr.sync_batchnorm(nn.ModuleList([frozen, trained]), torch.device("cpu"))
    assert isinstance(converted[0][1], distributed.CPUSyncBatchNorm)
    assert not any(p.requires_grad for p in converted[0].parameters())
    assert all(p.requires_grad for p in converted[1].parameters())
