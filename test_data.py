"""Tests for data.py: the augmentation and the data path.

The reference is torchvision.transforms.v2 (the BYOL / Barlow Twins pipeline of the paper's sec. 5.1):
  1. each batched op, given per-image parameters, equals the v2.functional op applied image by
     image (float images in [0, 1]); the evaluation transform is Resize(size * 256 / 224) +
     CenterCrop(size) for large images (the paper's val protocol), normalisation alone for small ones;
  2. the parameters drawn from NU uniforms per view follow v2's distributions (rates within
     5 binomial sigma, continuous draws by a two-sample Kolmogorov-Smirnov test at alpha 0.001
     against torchvision's own samplers) and the crop sampler is torchvision's loop, exactly;
  3. the views are a function of (seed, epoch, image): the same on 1 or 2 processes and after a
     resume, different between images and between epochs; the images' order is a new permutation
     every epoch, drawn from (seed, epoch);
  4. unreadable images in a folder are replaced, reported once and counted;
  5. the CIFAR path through torchvision's reader (and its MD5 check).
Tiny sizes throughout: the file runs in well under a minute on a 2-core CPU.

    python -m pytest -q test_data.py
"""

import functools
import io
import itertools
import json
import math
import os
import pickle
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision
from PIL import Image
from torchvision.transforms import v2

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import decorr  # noqa: E402
from conftest import init_gloo, run_main  # noqa: E402

TF = v2.functional
NU = data.NU
# Float32 ops on values in [0, 1] agree with torchvision's to a few float32 ulps (~1e-6 seen);
# 1e-5 leaves a 5x margin while any wrong formula or parameter is off by far more.
ATOL = 1e-5
# the paper's ImageNet normalization
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
THRESHOLD = 128 / 255  # solarize at 128 of 255
# columns of u (data.py's comment above crop_boxes)
FLIP, JIT_ON, GRAY, BLUR_ON, SIGMA, SOLAR_ON = 22, 23, 32, 33, 34, 35  # 24-27 factors, 28-31 order

# ----------------------------------------------------------------------------- helpers


def uniforms(n, seed):
    return torch.rand(n, NU, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def all_off(n):
    """Uniforms that switch every op of colour() off (no jitter, grayscale, blur, solarize)."""
    u = torch.full((n, NU), 0.5, dtype=torch.float64)
    u[:, [JIT_ON, GRAY, BLUR_ON, SOLAR_ON]] = 1.0  # 'on' is u < p with p <= 1
    return u


def set_order(u, row, order):
    """Columns 28-31 of u[row] such that their argsort is `order` (order[turn] = op)."""
    for turn, op in enumerate(order):
        u[row, 28 + op] = (turn + 0.5) / 4


def unnormalise(y):
    """colour()'s output back in pixel units ([0, 1] scale), so that one tolerance fits all."""
    mean, std = (torch.tensor(v, dtype=y.dtype).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    return y * std + mean


def ks_2samp(a, b, alpha=1e-3):
    """Two-sample Kolmogorov-Smirnov: (sup |F_a - F_b|, the asymptotic critical value at alpha).
    With ties (discrete data) the asymptotic test is conservative."""
    a, b = np.sort(np.asarray(a, dtype=np.float64)), np.sort(np.asarray(b, dtype=np.float64))
    v = np.concatenate([a, b])
    d = np.abs(
        np.searchsorted(a, v, side="right") / len(a) - np.searchsorted(b, v, side="right") / len(b)
    ).max()
    n, m = len(a), len(b)
    return d, math.sqrt(-math.log(alpha / 2) / 2) * math.sqrt((n + m) / (n * m))


def assert_same_distribution(a, b, what):
    d, crit = ks_2samp(a, b)
    assert d < crit, f"{what}: KS statistic {d:.4f} >= critical value {crit:.4f} (alpha 0.001)"


def assert_rate(hits, p, what, sigmas=5):
    n = len(hits)
    rate = float(np.mean(np.asarray(hits, dtype=np.float64)))
    bound = sigmas * math.sqrt(p * (1 - p) / n)
    assert abs(rate - p) <= bound, f"{what}: rate {rate:.4f}, expected {p} +- {bound:.4f} ({n} draws)"


def torchvision_box(u, H, W, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params loop, written out with the uniforms u (one row)
    in place of its random draws: try k uses u[k] (area) and u[10 + k] (log ratio), the first
    fitting box is placed by u[20], u[21]; after ten misses the centred whole-image fallback."""
    area = H * W
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for k in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * u[k])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[10 + k])
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= W and 0 < h <= H:
            return math.floor(u[20] * (H - h + 1)), math.floor(u[21] * (W - w + 1)), h, w, False
    if W / H < min(ratio):
        w, h = W, round(W / min(ratio))
    elif W / H > max(ratio):
        h, w = H, round(H * max(ratio))
    else:
        h, w = H, W
    return (H - h) // 2, (W - w) // 2, h, w, True


def v2_colour(x, u, blur_p, solarize_p, small):
    """colour() for one image x (3 x S x S) done with v2.functional, the parameters read from
    u (one row) as documented in data.py."""
    u = u.tolist()
    factors = (0.6 + 0.8 * u[24], 0.6 + 0.8 * u[25], 0.8 + 0.4 * u[26], 0.2 * u[27] - 0.1)
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    if u[JIT_ON] < 0.8:
        for op in np.argsort(u[28:32], kind="stable"):
            x = ops[op](x, factors[op])
    if u[GRAY] < 0.2:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if u[BLUR_ON] < blur_p and not small:
        s = 0.1 + 1.9 * u[SIGMA]
        x = TF.gaussian_blur(x, [23, 23], [s, s])
    pre_solarize = x
    if u[SOLAR_ON] < solarize_p:
        x = TF.solarize(x, THRESHOLD)
    return TF.normalize(x, list(IMAGENET_MEAN), list(IMAGENET_STD)), pre_solarize


def png_bytes(seed, size=16):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 256, (size, size, 3), dtype=torch.uint8, generator=g).numpy()
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def write_png(path, seed, size=16):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(seed, size))


def write_truncated_png(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    data = png_bytes(seed)
    path.write_bytes(data[: len(data) // 2])


def run_cli(args, timeout=300):
    cmd = [sys.executable, "decorr.py", *[str(a) for a in args]]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def log_rows(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- 1. ops vs v2.functional


def test_normalisation_constants_are_imagenet():
    """The normalisation is ImageNet's (the paper's sec. 5.1), as the pipeline's v2.Normalize."""
    assert data.MEAN == IMAGENET_MEAN and data.STD == IMAGENET_STD
    assert data.VIEWS == ((1.0, 0.0), (0.1, 0.2))  # blur p 1.0 / 0.1, solarize p 0.0 / 0.2


def _crop_cases(H, W):
    """Uniform rows for chosen boxes: random ones, the whole image, the smallest area at both
    extreme ratios, boxes in the top-left and bottom-right corners, and the fallback."""
    u = uniforms(24, seed=H * 100 + W)
    special = u[:8]
    special[0, :10], special[0, 10:20] = 1.0, 0.5  # scale 1, ratio 1 (fits if square)
    special[1, :10], special[1, 10:20] = 0.0, 0.0  # smallest, ratio 3/4
    special[2, :10], special[2, 10:20] = 0.0, 1.0  # smallest, ratio 4/3
    special[3, 20:22] = 0.0  # top-left corner
    special[4, 20:22] = 1 - 1e-12  # bottom-right corner
    special[5, :10], special[5, 10:20], special[5, 20:22] = 0.3, 0.2, 1 - 1e-12
    special[6, :10], special[6, 10:20] = 1.0, 0.0  # no try fits: fallback
    special[7, :10], special[7, 10:20] = 1.0, 1.0  # no try fits: fallback
    u[:, FLIP] = torch.arange(24) % 2 * 0.6 + 0.2  # flip every other image (0.2 < 0.5)
    return u


@pytest.mark.parametrize("H, W, size", [(20, 20, 20), (20, 20, 37), (20, 30, 32), (30, 18, 31)])
def test_resized_crops_equal_v2_resized_crop_and_hflip(H, W, size):
    """resized_crops = v2.functional.resized_crop(BILINEAR) of crop_boxes' box, then hflip where
    u[:, 22] < 0.5, for random, corner, extreme-ratio and fallback boxes; size == H == W (the
    training case) and upsampling of square and non-square images. Tolerance ATOL: the crop is
    resampled through grid_sample's float32 normalised coordinates."""
    torch.manual_seed(0)
    x = torch.rand(24, 3, H, W)
    u = _crop_cases(H, W)
    out = data.resized_crops(x, u, size)
    boxes = data.crop_boxes(u, H, W)
    assert out.shape == (24, 3, size, size) and out.dtype == torch.float32
    assert torch.equal(boxes, boxes.round())
    if H == W:
        assert boxes[0].tolist() == [0, 0, H, W]  # the whole image
    assert boxes[3, :2].tolist() == [0, 0]
    assert (boxes[4, :2] == torch.tensor([H, W]) - boxes[4, 2:]).all()  # flush bottom-right
    for i in range(24):
        top, left, h, w = boxes[i].long().tolist()
        ref = TF.resized_crop(x[i], top, left, h, w, [size, size], v2.InterpolationMode.BILINEAR)
        if u[i, FLIP] < 0.5:
            ref = TF.horizontal_flip(ref)
        err = (out[i] - ref).abs().max().item()
        assert err <= ATOL, (
            f"image {i}, box {(top, left, h, w)}, flip {bool(u[i, FLIP] < 0.5)}: max error {err:.2e}"
        )


def _jitter_images(n=6, size=10):
    """Images of very different brightness (a batch-wide mean would show), with saturated,
    black, white and gray pixels."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 3, size, size, generator=g) * torch.linspace(0.1, 1.0, n).view(n, 1, 1, 1)
    x[:, :, 0, :3] = torch.tensor([0.0, 1.0, 0.5]).view(1, 1, 3)  # black, white, gray pixels
    x[:, :, 1, 0] = torch.tensor([1.0, 0.0, 0.0])  # pure red
    return x


@pytest.mark.parametrize(
    "op, v2_op, factors",
    [
        (0, TF.adjust_brightness, [0.6, 0.8, 1.0, 1.2, 1.4, 1.37]),
        (1, TF.adjust_contrast, [0.6, 0.8, 1.0, 1.2, 1.4, 1.05]),
        (2, TF.adjust_saturation, [0.8, 0.9, 1.0, 1.1, 1.2, 0.85]),
    ],
    ids=["brightness", "contrast", "saturation"],
)
def test_jitter_ops_equal_v2(op, v2_op, factors):
    """JITTER's brightness, contrast and saturation with one factor per image equal
    v2.functional's adjust_* applied image by image (incl. clamping at 0 and 1; contrast blends
    with each image's own mean gray level). Tolerance ATOL (float32 rounding)."""
    x = _jitter_images()
    f = torch.tensor(factors)
    out = data.JITTER[op](x, f)
    ref = torch.stack([v2_op(xi, fi) for xi, fi in zip(x, factors, strict=True)])
    err = (out - ref).abs().max().item()
    assert err <= ATOL, f"max error {err:.2e}"
    assert (out - x).abs().amax((1, 2, 3))[torch.tensor(factors) != 1].min() > 1e-3  # the op did act


def test_hue_shift_equals_v2_adjust_hue():
    """hue_shift (JITTER[3]) = v2.functional.adjust_hue per image, for shifts over the whole
    [-0.5, 0.5] range, on random pixels, gray pixels (all three channels tie: no hue), black and
    white, and pixels where two channels tie for the maximum (every pair) or for the minimum.
    Tolerance ATOL: the HSV round trip in float32 (~1e-6)."""
    g = torch.Generator().manual_seed(2)
    x = torch.rand(7, 3, 8, 8, generator=g)
    hi, lo = 0.7, 0.2
    ties = torch.tensor([[hi, hi, lo], [hi, lo, hi], [lo, hi, hi], [hi, lo, lo], [lo, hi, lo], [lo, lo, hi]])
    x[:, :, 1, :6] = ties.T[None] * (0.5 + 0.5 * torch.rand(7, 1, 1, generator=g))  # per-image level
    x[:, :, 2, :4] = torch.tensor([0.0, 1.0, 0.3, 0.8]).view(1, 1, 4)  # gray levels incl. black, white
    shifts = [-0.5, -0.1, -0.03, 0.0, 0.05, 0.1, 0.5]
    out = data.JITTER[3](x, torch.tensor(shifts))
    ref = torch.stack([TF.adjust_hue(xi, s) for xi, s in zip(x, shifts, strict=True)])
    err = (out - ref).abs().max().item()
    assert err <= ATOL, f"max error {err:.2e}"
    assert (out[:, :, 2, :4] - x[:, :, 2, :4]).abs().max() <= ATOL  # gray stays gray
    assert (out[1] - x[1]).abs().max() > 0.05  # a shift does act


def test_gray_and_grayscale_in_colour_equal_v2():
    """gray() = v2.functional.rgb_to_grayscale (ITU-R 601-2); in colour(), grayscale on (u[:, 32]
    < 0.2) gives rgb_to_grayscale(x, num_output_channels=3), off leaves the image as it is."""
    torch.manual_seed(3)
    x = torch.rand(4, 3, 9, 9)
    assert (data.gray(x) - torch.stack([TF.rgb_to_grayscale(xi) for xi in x])).abs().max() <= ATOL
    u = all_off(4)
    u[[0, 2], GRAY] = 0.1
    out = unnormalise(data.colour(x, u, 0.0, 0.0, small=True))
    for i in range(4):
        ref = TF.rgb_to_grayscale(x[i], num_output_channels=3) if i in (0, 2) else x[i]
        assert (out[i] - ref).abs().max() <= ATOL, i


def test_normalisation_equals_v2_normalize():
    """colour() with every op off is v2.functional.normalize with ImageNet's mean and std."""
    torch.manual_seed(4)
    x = torch.rand(3, 3, 12, 12)
    out = data.colour(x, all_off(3), 1.0, 1.0, small=False)
    ref = torch.stack([TF.normalize(xi, list(IMAGENET_MEAN), list(IMAGENET_STD)) for xi in x])
    assert (out - ref).abs().max() <= ATOL


def test_gaussian_blur_equals_v2():
    """gaussian_blur with one sigma per image = v2.functional.gaussian_blur(x, [23, 23],
    [sigma, sigma]) per image (reflect padding), at the ends of the sigma range [0.1, 2] and
    between, on 40 x 40 px images. Tolerance ATOL (float32 sums of 23 x 23 taps)."""
    torch.manual_seed(5)
    x = torch.rand(5, 3, 40, 40)
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.7, 2.0])
    out = data.gaussian_blur(x, sigma)
    ref = torch.stack(
        [TF.gaussian_blur(xi, [23, 23], [s, s]) for xi, s in zip(x, sigma.tolist(), strict=True)]
    )
    err = (out - ref).abs().max().item()
    assert err <= ATOL, f"max error {err:.2e}"
    assert (out[-1] - x[-1]).abs().max() > 0.1  # sigma 2 does blur


def test_solarize_in_colour_equals_v2():
    """Solarize on (u[:, 35] < solarize_p) = v2.functional.solarize(x, 128/255): pixels at or above
    the threshold inverted, including a pixel exactly at it and one just below."""
    torch.manual_seed(6)
    x = torch.rand(4, 3, 6, 6)
    t = torch.tensor(THRESHOLD, dtype=torch.float32)
    x[:, 0, 0, 0], x[:, 0, 0, 1] = t, torch.nextafter(t, torch.tensor(0.0))
    u = all_off(4)
    u[[1, 3], SOLAR_ON] = 0.1
    out = unnormalise(data.colour(x, u, 0.0, 0.2, small=True))
    for i in range(4):
        ref = TF.solarize(x[i], THRESHOLD) if i in (1, 3) else x[i]
        assert (out[i] - ref).abs().max() <= ATOL, i
    assert out[1, 0, 0, 0] < 0.5 < out[1, 0, 0, 1]  # at: inverted; just below: kept


def test_colour_order_and_pipeline_equal_v2():
    """colour() = v2 ops image by image, for all 24 jitter orders (u[:, 28:32] chosen so that its
    argsort is the order), jitter off for some images, with grayscale, blur (large images) and
    solarize on some, in views 1 and 2 and with small=True (no blur). Compared in pixel units with
    ATOL; pixels within 1e-4 of the solarize threshold before solarizing are left out (a 1-ulp
    difference there may flip the pixel, which is not an error of the op)."""
    orders = list(itertools.permutations(range(4)))
    n = len(orders) + 2
    torch.manual_seed(7)
    x = torch.rand(n, 3, 16, 16)
    u = uniforms(n, seed=8)
    for row, order in enumerate(orders):
        set_order(u, row, order)
    u[:, JIT_ON] = 0.5  # jitter on ...
    u[-2:, JIT_ON] = 0.9  # ... except for the last two
    u[:, GRAY] = torch.tensor([0.1 if i % 4 == 0 else 0.5 for i in range(n)], dtype=torch.float64)
    u[:, BLUR_ON] = torch.tensor([0.05 if i % 3 == 0 else 0.5 for i in range(n)], dtype=torch.float64)
    u[:, SOLAR_ON] = torch.tensor([0.1 if i % 2 == 0 else 0.5 for i in range(n)], dtype=torch.float64)
    for (blur_p, solarize_p), small in [
        (data.VIEWS[0], False),
        (data.VIEWS[1], False),
        (data.VIEWS[1], True),
    ]:
        out = unnormalise(data.colour(x, u, blur_p, solarize_p, small))
        for i in range(n):
            ref, pre = v2_colour(x[i], u[i], blur_p, solarize_p, small)
            keep = (pre - THRESHOLD).abs() > 1e-4
            assert keep.float().mean() > 0.98
            err = ((out[i] - unnormalise(ref[None])[0]).abs() * keep).max().item()
            assert err <= ATOL, f"view {(blur_p, solarize_p)}, small {small}, image {i}: max error {err:.2e}"


def _normalised(x):
    """A uint8 image in [0, 1], normalised with ImageNet's mean and std, by v2.functional."""
    return TF.normalize(TF.to_dtype(x, torch.float32, scale=True), list(IMAGENET_MEAN), list(IMAGENET_STD))


# (size, the shorter side after the resize): size * 256 / 224, the paper's 256 at 224
@pytest.mark.parametrize("size, resized", [(224, 256), (112, 128)])
def test_eval_transform_resizes_to_size_times_256_224_then_crops_the_centre(size, resized):
    """eval_transform of large images (image folders) is the paper's val protocol: the shorter side
    resized to size * 256 / 224 (antialiased), then the central size x size crop, then [0, 1] and
    ImageNet's normalisation. Random pixels, PIL images as the folders give: square and oblong images
    equal v2.functional's resize + center_crop; images whose shorter side already is the resize's
    (nothing to resize) give the middle of the image, cut by hand."""
    evaluate = data.eval_transform(size, small=False)
    g = torch.Generator().manual_seed(12)
    for H, W in [(448, 448), (300, 500), (500, 300)]:
        x = torch.randint(0, 256, (3, H, W), dtype=torch.uint8, generator=g)
        out = evaluate(TF.to_pil_image(x))
        assert out.shape == (3, size, size) and out.dtype == torch.float32
        ref = _normalised(TF.center_crop(TF.resize(x, [resized], antialias=True), [size, size]))
        err = (out - ref).abs().max().item()
        assert err <= ATOL, f"{H} x {W} image: max error {err:.2e}"
    for H, W in [(resized, resized + 40), (resized + 40, resized)]:
        x = torch.randint(0, 256, (3, H, W), dtype=torch.uint8, generator=g)
        out = evaluate(TF.to_pil_image(x))
        top, left = (H - size) // 2, (W - size) // 2  # even margins: the middle is exact
        ref = _normalised(x[:, top : top + size, left : left + size])
        err = (out - ref).abs().max().item()
        assert err <= ATOL, f"{H} x {W} image: max error {err:.2e}"


def test_eval_transform_of_small_images_only_normalises():
    """Small images (the built-in data, CIFAR) keep their size, whatever the size asked: no resize,
    no crop, only [0, 1] and ImageNet's normalisation, from a uint8 tensor or a PIL image alike."""
    x = torch.randint(0, 256, (3, 32, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(13))
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    ref = (x.float() / 255 - mean) / std
    for size in (32, 224):
        evaluate = data.eval_transform(size, small=True)
        for img in (x, TF.to_pil_image(x)):
            out = evaluate(img)
            assert out.shape == (3, 32, 20) and out.dtype == torch.float32
            assert (out - ref).abs().max() <= ATOL, f"size {size}, {type(img).__name__}"


# ----------------------------------------------------------------------------- 2. the drawn parameters


def test_crop_boxes_equal_torchvision_loop_exactly():
    """crop_boxes = torchvision's RandomResizedCrop sampler (torchvision_box, its loop over ten
    tries written out with the same uniforms), box for box, on square, wide, very wide and very
    tall images, where the fallback (centred crop at the nearest allowed ratio) is frequent; also
    with per-image sizes given as vectors."""
    shapes = [(32, 32), (48, 80), (12, 80), (80, 12)]
    u = uniforms(4000, seed=9)
    fallbacks = {}
    for H, W in shapes:
        boxes = data.crop_boxes(u, H, W)
        assert boxes.dtype == torch.float64 and boxes.shape == (len(u), 4)
        ref = [torchvision_box(row, H, W) for row in u.tolist()]
        fallbacks[(H, W)] = sum(r[4] for r in ref)
        mismatch = [i for i, r in enumerate(ref) if boxes[i].tolist() != list(r[:4])]
        assert not mismatch, (
            f"{H}x{W}: {len(mismatch)} boxes differ, e.g. row {mismatch[0]}: "
            f"{boxes[mismatch[0]].tolist()} vs {ref[mismatch[0]][:4]}"
        )
    assert fallbacks[(12, 80)] > 100 and fallbacks[(80, 12)] > 100, fallbacks  # both fallback branches ran
    Hs = torch.tensor([s[0] for s in shapes]).repeat(1000)
    Ws = torch.tensor([s[1] for s in shapes]).repeat(1000)
    per_image = data.crop_boxes(u, Hs, Ws)
    for k, (H, W) in enumerate(shapes):
        assert torch.equal(per_image[k::4], data.crop_boxes(u[k::4], H, W))


@functools.cache
def torchvision_crops(H, W, n=20000, seed=11):
    """n boxes (top, left, h, w) from torchvision's own RandomResizedCrop.get_params (scale
    0.08-1, ratio 3/4-4/3) for an H x W image, seeded, without touching the global RNG."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return np.array(
            [
                torchvision.transforms.RandomResizedCrop.get_params(
                    torch.empty(3, H, W), [0.08, 1.0], [3 / 4, 4 / 3]
                )
                for _ in range(n)
            ],
            dtype=np.float64,
        )


@pytest.mark.parametrize("H, W", [(32, 32), (48, 80), (80, 12)])
def test_crop_distribution_matches_torchvision_sampler(H, W):
    """crop_boxes on 20000 rows of torch.rand has the distribution of torchvision's own
    RandomResizedCrop.get_params (20000 seeded draws): area fraction, aspect ratio, top and left
    by two-sample KS at alpha 0.001; square, wide and (fallback-heavy) tall images."""
    n = 20000
    u = torch.rand(n, NU, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    boxes, ref = data.crop_boxes(u, H, W).numpy(), torchvision_crops(H, W, n)
    for name, f in [
        ("area fraction", lambda b: b[:, 2] * b[:, 3] / (H * W)),
        ("aspect ratio", lambda b: b[:, 3] / b[:, 2]),
        ("top", lambda b: b[:, 0]),
        ("left", lambda b: b[:, 1]),
    ]:
        assert_same_distribution(f(boxes), f(ref), f"{H}x{W} {name}")


def test_ks_helper_detects_a_different_crop_sampler():
    """The KS check has power: crop_boxes with scale (0.16, 1) instead of (0.08, 1), or with a
    uniform instead of a log-uniform ratio, is rejected against torchvision's sampler on the
    same number of draws."""
    n, H, W = 20000, 32, 32
    u = torch.rand(n, NU, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    ref = torchvision_crops(H, W, n)
    boxes = data.crop_boxes(u, H, W, scale=(0.16, 1.0)).numpy()
    d, crit = ks_2samp(boxes[:, 2] * boxes[:, 3], ref[:, 2] * ref[:, 3])
    assert d > crit
    v = u.clone()
    v[:, 10:20] = torch.log(3 / 4 + (4 / 3 - 3 / 4) * u[:, 10:20]).sub(math.log(3 / 4)).div(math.log(16 / 9))
    boxes = data.crop_boxes(v, H, W).numpy()  # the ratio uniform in [3/4, 4/3]
    d, crit = ks_2samp(boxes[:, 3] / boxes[:, 2], ref[:, 3] / ref[:, 2])
    assert d > crit


def test_flip_rate():
    """resized_crops flips an image with probability 0.5 (v2.RandomHorizontalFlip): 20000
    horizontal ramps, each cropped by its own box; a flipped crop decreases left to right."""
    n, S = 20000, 16
    ramp = torch.arange(S, dtype=torch.float32).view(1, 1, 1, S).expand(n, 1, S, S).contiguous()
    u = torch.rand(n, NU, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    y = data.resized_crops(ramp, u, S)
    slope = y[:, 0, 0, -1] - y[:, 0, 0, 0]
    assert (slope.abs() > 0.5).all()  # every crop is at least 4 px wide
    flipped = (slope < 0).numpy()
    assert np.array_equal(flipped, (u[:, FLIP] < 0.5).numpy())
    assert_rate(flipped, 0.5, "flip")


def _recording_colour(monkeypatch, u, blur_p, solarize_p, small=False):
    """colour() on 1 x 1 px images with JITTER and gaussian_blur replaced by recorders: each
    jitter op k multiplies by 5 and adds k + 1 (so the pixel spells out the ops applied, in
    order) and records its factors; blur records its sigmas and leaves the image as it is.
    Returns (the ops applied per image as lists, factors per op, sigmas, the output)."""
    factors, sigmas = {k: [] for k in range(4)}, []

    def recorder(k):
        def fn(x, f):
            factors[k].append(f.double())
            return x * 5 + (k + 1)

        return fn

    def blur(x, sigma, k=23):
        sigmas.append(sigma.double())
        return x

    monkeypatch.setattr(data, "JITTER", tuple(recorder(k) for k in range(4)))
    monkeypatch.setattr(data, "gaussian_blur", blur)
    x = torch.zeros(len(u), 3, 1, 1, dtype=torch.float64)
    y = unnormalise(data.colour(x, u, blur_p, solarize_p, small))
    codes = y[:, 0, 0, 0].round().long().tolist()
    applied = []
    for c in codes:
        ops = []
        while c:
            ops.append(c % 5 - 1)
            c //= 5
        applied.append(ops[::-1])
    cat = lambda t: torch.cat(t).numpy() if t else np.zeros(0)
    return applied, {k: cat(v) for k, v in factors.items()}, cat(sigmas), y


def test_jitter_rate_order_and_factors(monkeypatch):
    """ColorJitter(0.4, 0.4, 0.2, 0.1) with p 0.8, in 20000 draws: jitter is on at rate 0.8 and
    then applies each of the four ops exactly once, in an order that takes each of the 24
    permutations with frequency 1/24 (5 sigma); the factors have the distributions of v2's
    ColorJitter.make_params (seeded, 20000 draws; KS at alpha 0.001) and lie in its ranges."""
    n = 20000
    u = torch.rand(n, NU, generator=torch.Generator().manual_seed(15), dtype=torch.float64)
    u[:, [GRAY, SOLAR_ON]] = 1.0
    applied, factors, _, _ = _recording_colour(monkeypatch, u, 0.0, 0.0)
    on = np.array([len(a) > 0 for a in applied])
    assert np.array_equal(on, (u[:, JIT_ON] < 0.8).numpy())
    assert_rate(on, 0.8, "jitter on")
    perms = [tuple(a) for a in applied if a]
    assert all(sorted(p) == [0, 1, 2, 3] for p in perms)
    for perm in itertools.permutations(range(4)):
        assert_rate([p == perm for p in perms], 1 / 24, f"order {perm}")
    jitter = v2.ColorJitter(0.4, 0.4, 0.2, 0.1)
    with torch.random.fork_rng():
        torch.manual_seed(16)
        ref = [jitter.make_params([torch.empty(3, 1, 1)]) for _ in range(n)]
    for k, name in enumerate(["brightness", "contrast", "saturation", "hue"]):
        lo, hi = getattr(jitter, name)
        f = factors[k]
        assert len(f) == on.sum()
        assert lo <= f.min() and f.max() <= hi, (name, f.min(), f.max())
        assert f.min() < lo + 0.01 * (hi - lo) and f.max() > hi - 0.01 * (hi - lo), name  # fills the range
        assert_same_distribution(f, [r[f"{name}_factor"] for r in ref], name)


@pytest.mark.parametrize("view", [0, 1])
def test_grayscale_blur_solarize_rates(monkeypatch, view):
    """Per view (blur p, solarize p) = VIEWS[view] = (1.0, 0.0) / (0.1, 0.2), in 20000 draws:
    grayscale at rate 0.2 (a colour pixel turns gray), solarize at the view's rate (a pixel of
    0.75 turns 0.25), blur at the view's rate (p 1 and p 0 exactly: no binomial spread), never
    for small images, its sigma distributed as v2.GaussianBlur(23, (0.1, 2.0)).make_params
    (seeded, 20000 draws; KS at alpha 0.001) and within its range."""
    n = 20000
    blur_p, solarize_p = data.VIEWS[view]
    u = torch.rand(n, NU, generator=torch.Generator().manual_seed(17 + view), dtype=torch.float64)
    u[:, JIT_ON] = 1.0  # jitter off
    colour_pixel = torch.tensor([0.9, 0.2, 0.6]).view(1, 3, 1, 1).expand(n, 3, 1, 1)
    y = unnormalise(data.colour(colour_pixel, u, blur_p, 0.0, small=True))
    grayed = ((y - y[:, :1]).abs().amax((1, 2, 3)) < 1e-5).numpy()
    assert np.array_equal(grayed, (u[:, GRAY] < 0.2).numpy())
    assert_rate(grayed, 0.2, "grayscale")

    u_sol = u.clone()
    u_sol[:, GRAY] = 1.0  # (gray() of a gray pixel is 0.9999 of it, as torchvision's)
    y = unnormalise(data.colour(torch.full((n, 3, 1, 1), 0.75), u_sol, blur_p, solarize_p, small=True))
    solarized = ((y - 0.25).abs().amax((1, 2, 3)) < 1e-5).numpy()
    kept = ((y - 0.75).abs().amax((1, 2, 3)) < 1e-5).numpy()
    assert (solarized ^ kept).all()
    assert np.array_equal(solarized, (u[:, SOLAR_ON] < solarize_p).numpy())
    assert_rate(solarized, solarize_p, "solarize")

    _, _, sigmas, _ = _recording_colour(monkeypatch, u, blur_p, solarize_p)
    assert len(sigmas) == (u[:, BLUR_ON] < blur_p).sum()
    assert_rate(np.arange(n) < len(sigmas), blur_p, "blur")
    blur = v2.GaussianBlur(23, sigma=(0.1, 2.0))
    assert blur.sigma[0] <= sigmas.min() and sigmas.max() <= blur.sigma[1]
    with torch.random.fork_rng():
        torch.manual_seed(19)
        ref = [blur.make_params([torch.empty(3, 1, 1)])["sigma"][0] for _ in range(n)]
    assert_same_distribution(sigmas, ref, "blur sigma")
    _, _, sigmas_small, _ = _recording_colour(monkeypatch, u, blur_p, solarize_p, small=True)
    assert len(sigmas_small) == 0  # no blur for small images


# --------------------------------------------------------------------------- 3. views of (seed, epoch, image)


def _args(batch_size=8, seed=5, img_size=16, workers=0):
    return types.SimpleNamespace(batch_size=batch_size, seed=seed, img_size=img_size, workers=workers)


def _dataset(n=24, size=16, same=False):
    g = torch.Generator().manual_seed(20)
    x = torch.randint(0, 256, (1 if same else n, 3, size, size), dtype=torch.uint8, generator=g).expand(
        n, 3, size, size
    )
    return torch.utils.data.TensorDataset(x.contiguous(), torch.arange(n) % 3)


def _collect(train, first, last, small=False, **kw):
    return [
        (x1.clone(), x2.clone(), bad)
        for x1, x2, bad in data.batches(train, small, _args(**kw), torch.device("cpu"), first, last)
    ]


def _batches_worker(rank, world, tmp):
    init_gloo(rank, world, tmp)
    try:
        got = _collect(_dataset(), 0, 7)
        torch.save([(x1, x2) for x1, x2, _ in got], os.path.join(tmp, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_views_are_the_same_on_one_and_two_processes(tmp_path):
    """The views are a function of (seed, epoch, image), not of the process count: under
    2 gloo processes rank r yields rows [4 r, 4 r + 4) of each global batch of 8 of the
    single-process run (7 steps over 3 epochs of 3 steps, blur on). Tolerance 1e-6: the same
    per-image float32 arithmetic on smaller batches."""
    single = _collect(_dataset(), 0, 7)
    mp.spawn(_batches_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert len(got) == len(single) == 7
        for step, ((a1, a2), (b1, b2, _)) in enumerate(zip(got, single, strict=True)):
            rows = slice(4 * rank, 4 * rank + 4)
            assert a1.shape == (4, 3, 16, 16)
            for a, b in ((a1, b1[rows]), (a2, b2[rows])):
                err = (a - b).abs().max().item()
                assert err <= 1e-6, f"rank {rank}, step {step + 1}: max error {err:.2e}"


def test_views_differ_between_images_views_and_epochs():
    """Every image gets its own parameters: with 8 copies of one image in a batch (one step per
    epoch), all 16 views of a step are different, and no view of epoch 2 or 3 repeats a view of
    epoch 1 (so the views depend on the epoch, not only on the image or the batch position)."""
    steps = _collect(_dataset(n=8, same=True), 0, 3)
    views = [torch.cat([x1, x2]).flatten(1) for x1, x2, _ in steps]
    for v in views:
        d = torch.cdist(v, v) + torch.eye(16) * 1e9
        assert d.min() > 1e-3
    for later in views[1:]:
        assert torch.cdist(later, views[0]).min() > 1e-3


def test_resume_yields_the_same_batches():
    """batches() started at step s (a resume) yields what the uninterrupted generator yields from
    step s on, bitwise; mid-epoch and at an epoch boundary."""
    full = _collect(_dataset(), 0, 7)
    for first in (3, 4):
        resumed = _collect(_dataset(), first, 7)
        assert len(resumed) == 7 - first
        for (a1, a2, _), (b1, b2, _) in zip(resumed, full[first:], strict=True):
            assert torch.equal(a1, b1) and torch.equal(a2, b2)


def test_views_do_not_depend_on_how_many_steps_are_made_at_once(monkeypatch):
    """data.AHEAD only sets how many images' views one call makes (on a GPU 4096; here 7 steps
    of 8 at once, across epochs of 3 steps): one step at a time gives the same views, bitwise."""
    monkeypatch.setattr(data, "AHEAD", dict(cpu=56))
    full = _collect(_dataset(), 0, 7)
    monkeypatch.setattr(data, "AHEAD", {})
    one = _collect(_dataset(), 0, 7)
    assert len(one) == len(full) == 7
    for (a1, a2, _), (b1, b2, _) in zip(one, full, strict=True):
        assert torch.equal(a1, b1) and torch.equal(a2, b2)


@pytest.mark.parametrize("img_size", [20, 28])
def test_batches_in_memory_crops_equal_v2(monkeypatch, img_size):
    """The crops batches() makes of in-memory images (captured at colour(), which is replaced by a
    recorder) are v2.functional.resized_crop(BILINEAR, default antialias) + hflip of each image by
    the box of its uniforms, for both views, and each view gets its VIEWS (blur p, solarize p).
    8 copies of one 20 x 20 image, so the image index does not matter. img_size 20 (= the images',
    as the defaults) and 28 (upsampling) hold; decorr.py refuses sizes other than the images' (next test)."""
    seen = []
    monkeypatch.setattr(data, "AHEAD", dict(cpu=16))  # both steps in one call, as on a GPU
    monkeypatch.setattr(data, "colour", lambda c, u, *p: seen.append((c.clone(), u.clone(), p)) or c)
    ds = _dataset(n=8, size=20, same=True)
    _collect(ds, 0, 2, img_size=img_size)
    img = ds.tensors[0][0].float() / 255
    assert len(seen) == 2  # one call per view
    for k, (crops, u, params) in enumerate(seen):
        assert params == (*data.VIEWS[k % 2], False)
        assert crops.shape == (16, 3, img_size, img_size)
        for i, (top, left, h, w) in enumerate(data.crop_boxes(u, 20, 20).long().tolist()):
            ref = TF.resized_crop(img, top, left, h, w, [img_size] * 2, v2.InterpolationMode.BILINEAR)
            ref = TF.horizontal_flip(ref) if u[i, FLIP] < 0.5 else ref
            err = (crops[i] - ref).abs().max().item()
            assert err <= ATOL, f"call {k}, image {i}, box {(top, left, h, w)}: max error {err:.2e}"
    assert not torch.equal(seen[0][1], seen[1][1])  # the two views' uniforms differ


@pytest.mark.parametrize("img_size", [16, 64])
def test_in_memory_data_trains_at_its_images_size(tmp_path, img_size):
    """Smaller crops of in-memory images would be shrunk without antialiasing, larger ones would not
    match the diagnostics' images: decorr.py refuses --img-size other than the images' (32 px) before
    it writes anything."""
    out = tmp_path / "out"
    with pytest.raises(decorr.UsageError, match="--img-size"):
        decorr.main(["--img-size", str(img_size), "--steps", "1", "--out", str(out)])
    assert not out.exists()


def test_same_seed_same_views_other_seed_other_views():
    """The same seed gives the same batches; another seed other ones."""
    a, b, c = (_collect(_dataset(), 0, 2, seed=s) for s in (5, 5, 6))
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b, strict=True))
    assert all((p[0] - q[0]).abs().max() > 1e-3 for p, q in zip(a, c, strict=True))


def _image_indices(steps):
    """Which images each step used, read from views of images whose every pixel is their index."""
    indices = []
    for x1, x2, _ in steps:
        pixels = torch.cat([x1, x2], 1).flatten(1) * 255  # both views of an image in one row
        index = pixels.round()
        assert (pixels - index).abs().max() < 1e-3  # a crop of a uniform image is that image's value
        assert (index == index[:, :1]).all()  # both views of a row are of the same image
        indices.append(index[:, 0].long())
    return indices


@pytest.mark.parametrize("n", [24, 27])
def test_order_is_a_new_permutation_every_epoch_from_seed_and_epoch(monkeypatch, n):
    """The images' order of epoch e is torch.randperm(n, generator=data.seeded(seed, e)), B images per
    step: each image at most once per epoch, every one when B divides n (else the last n mod B of the
    order are left out), another order every epoch and for another seed; a resume, mid-epoch or at an
    epoch boundary, continues the same order. The images are uniform, of their index, and colour() is
    the identity, so that each view shows which image it is. 3 epochs of 3 steps of 8."""
    monkeypatch.setattr(data, "colour", lambda crop, u, *params: crop)
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 8, 8).contiguous()
    train = torch.utils.data.TensorDataset(images, torch.zeros(n, dtype=torch.long))
    B, steps, epochs = 8, 3, 3  # steps per epoch: n // B

    def order(seed, first=0):
        return _image_indices(_collect(train, first, steps * epochs, batch_size=B, img_size=8, seed=seed))

    got = order(5)
    assert [len(i) for i in got] == [B] * steps * epochs
    per_epoch = [torch.cat(got[e * steps : (e + 1) * steps]) for e in range(epochs)]
    for e, seen in enumerate(per_epoch):
        assert len(seen.unique()) == len(seen) == B * steps, f"epoch {e}: an image twice"
        if n == B * steps:
            assert sorted(seen.tolist()) == list(range(n)), f"epoch {e}: not every image"
        want = torch.randperm(n, generator=data.seeded(5, e))[: B * steps]
        assert torch.equal(seen, want), f"epoch {e}: {seen.tolist()} != {want.tolist()}"
    assert not torch.equal(per_epoch[0], per_epoch[1]) and not torch.equal(per_epoch[1], per_epoch[2])
    other = order(6)
    assert all(not torch.equal(a, b) for a, b in zip(got, other, strict=True))
    for first in (4, 3):
        assert all(torch.equal(a, b) for a, b in zip(order(5, first), got[first:], strict=True)), first


# ----------------------------------------------------------------------------- 4. unreadable images


def make_folder(root, n_good=11, val=2):
    """train/a: b0.png (truncated PNG), b1.png (zero bytes), then 10 good; train/b: 11 good, then
    z.png (truncated): 24 files (3 batches of 8), of which 3 unreadable. The replacement of the
    last file wraps around past both bad files of a/. val/: `val` good images per class.
    Returns the unreadable paths."""
    train = root / "train"
    write_truncated_png(train / "a" / "b0.png", 0)
    (train / "a" / "b1.png").write_bytes(b"")
    for i in range(n_good - 1):
        write_png(train / "a" / f"g{i:02d}.png", 100 + i)
    for i in range(n_good):
        write_png(train / "b" / f"g{i:02d}.png", 200 + i)
    write_truncated_png(train / "b" / "z.png", 1)
    for c in "ab":
        for i in range(val):
            write_png(root / "val" / c / f"v{i}.png", 300 + 10 * ord(c) + i)
    return [str(train / "a" / "b0.png"), str(train / "a" / "b1.png"), str(train / "b" / "z.png")]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder") / "data"
    return root, make_folder(root)


def test_folder_read_replaces_unreadable_images(folder):
    """Folder.read(i) of an unreadable image returns the next readable one (image and label)
    and names every path it skipped; past the last file it wraps around to the first."""
    root, bad = folder
    ds = data.Folder(str(root / "train"))
    assert len(ds) == 24
    paths = [p for p, _ in ds.samples]
    assert [paths.index(b) for b in bad] == [0, 1, 23]
    good = ds.read(2)
    assert good[2] == [] and good[1] == 0
    for i, skipped in [(0, bad[:2]), (1, bad[1:2]), (23, [bad[2], *bad[:2]])]:
        img, label, names = ds.read(i)
        assert names == skipped
        assert label == 0 and np.array_equal(np.asarray(img), np.asarray(good[0]))
        assert ds[i][1] == label
    img, label, names = ds.read(15)
    assert names == [] and label == 1 and img.size == (16, 16) and img.mode == "RGB"


def test_fixed_batch_over_folder_with_unreadable_images(folder):
    """The diagnostics bank (fixed_batch) over a folder with unreadable images works; an
    unreadable image's row is its replacement's."""
    root, _ = folder
    ds = data.Folder(str(root / "train"))
    x, y = decorr.fixed_batch(ds, 384, 32, False, torch.device("cpu"))
    assert x.shape == (24, 3, 32, 32) and torch.isfinite(x).all()
    assert torch.equal(x[0], x[2]) and torch.equal(x[1], x[2]) and torch.equal(x[23], x[2])
    assert y.tolist() == [0] * 12 + [1] * 11 + [0]


def test_folder_batches_in_a_persistent_worker_equal_in_process(folder):
    """batches() over a folder with unreadable images gives the same views and the same skipped
    paths with the loader in one persistent worker as in-process (bitwise), for all 3 steps of
    an epoch and into the next; over an epoch the skipped paths are those of Folder.read over
    every index (each index read once)."""
    root, bad = folder
    ds = data.Folder(str(root / "train"))
    runs = [_collect(ds, 0, 4, workers=w) for w in (0, 1)]
    for (a1, a2, abad), (b1, b2, bbad) in zip(*runs, strict=True):
        assert a1.shape == (8, 3, 16, 16) and torch.isfinite(a1).all()
        assert torch.equal(a1, b1) and torch.equal(a2, b2) and abad == bbad
    epoch = sorted(p for _, _, names in runs[0][:3] for p in names)
    assert epoch == sorted(p for i in range(len(ds)) for p in ds.read(i)[2])
    assert set(epoch) == set(bad)


def test_folder_views_equal_v2_bicubic_antialiased_crop_and_flip(tmp_path):
    """The image-folder views (Folder[i, u, size], what a loader worker makes) are torchvision's: for
    each view, v2.functional.resized_crop(BICUBIC, antialias=True) of the decoded image by the box
    crop_boxes gives for its uniforms, then a horizontal flip where u[22] < 0.5, bitwise. Images of
    several shapes larger and smaller than the crop (antialiasing matters when shrinking), random
    boxes with both flip outcomes in both views. BILINEAR, or the flip the other way round, would
    differ by many grey levels (checked)."""
    shapes = [(40, 56), (64, 30), (12, 20), (48, 48)]
    for k, (H, W) in enumerate(shapes):
        rgb = np.random.default_rng(k).integers(0, 256, (H, W, 3), dtype=np.uint8)
        path = tmp_path / "train" / f"c{k % 2}" / f"{k}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(path)
    ds = data.Folder(str(tmp_path / "train"))
    size, flips = 24, [(0.2, 0.7), (0.9, 0.1), (0.3, 0.4), (0.6, 0.8)]
    for i, (path, _) in enumerate(ds.samples):
        u = uniforms(2, seed=40 + i)
        u[:, FLIP] = torch.tensor(flips[i], dtype=torch.float64)
        views = ds[i, u.tolist(), size][:2]
        with Image.open(path) as img:
            x = TF.pil_to_tensor(img.convert("RGB"))
        boxes = data.crop_boxes(u, *x.shape[1:]).long().tolist()
        for v, (top, left, h, w) in enumerate(boxes):
            crop = {
                mode: TF.resized_crop(x, top, left, h, w, [size, size], mode, antialias=True)
                for mode in (v2.InterpolationMode.BICUBIC, v2.InterpolationMode.BILINEAR)
            }
            flip = TF.horizontal_flip if u[v, FLIP] < 0.5 else lambda t: t
            no_flip = TF.horizontal_flip if u[v, FLIP] >= 0.5 else lambda t: t
            ref = flip(crop[v2.InterpolationMode.BICUBIC])
            assert views[v].dtype == torch.uint8 and views[v].shape == (3, size, size)
            assert torch.equal(views[v], ref), (path, v, (top, left, h, w))
            wrong = (no_flip(crop[v2.InterpolationMode.BICUBIC]), flip(crop[v2.InterpolationMode.BILINEAR]))
            assert all((views[v].int() - t.int()).abs().max() > 8 for t in wrong), (path, v)


def test_training_on_folder_with_unreadable_images(folder, tmp_path):
    """The CLI trains two epochs of one batch of 24 (all the files) over a folder with 3 unreadable
    files to the end (exit 0, backbone.pt); each unreadable path is reported exactly once on stdout,
    though read again in epoch 2, and log.jsonl counts every replacement: the sum over the epoch of
    Folder.read's skipped paths (6: b1.png is skipped three times within the one batch, when reading
    b0.png, b1.png and z.png), not the distinct paths of a batch (3)."""
    root, bad = folder
    out = tmp_path / "out"
    p = run_cli(
        [
            "--data",
            root,
            "--arch",
            "resnet18",
            "--img-size",
            "16",
            "--batch-size",
            "24",
            "--proj",
            "32-32",
            "--amp",
            "none",
            "--workers",
            "0",
            "--epochs",
            "2",
            "--steps",
            "2",
            "--log-every",
            "1",
            "--out",
            out,
        ]
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Traceback" not in p.stderr and "Warning" not in p.stderr, p.stderr[-3000:]
    assert (out / "backbone.pt").is_file()
    reports = [line for line in p.stdout.splitlines() if "cannot read image" in line]
    for path in bad:
        assert sum(path in line for line in reports) == 1, (path, reports)
    assert len(reports) == len(bad)
    ds = data.Folder(str(root / "train"))
    skipped = [name for i in range(len(ds)) for name in ds.read(i)[2]]
    assert len(skipped) == 6 and len(set(skipped)) == 3  # one batch holds every index
    rows = [r for r in log_rows(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in rows)
    diagnostics = len(skipped)  # the diagnostics' bank reads every training image once
    assert [r["bad_images"] for r in rows] == [diagnostics + len(skipped), diagnostics + 2 * len(skipped)]


def test_an_unreadable_val_image_is_reported(tmp_path):
    """A val image that cannot be read, which the diagnostics' fixed batch uses, is named once on
    stdout and counted in log.jsonl's bad_images, as a training image is; the run goes on."""
    root = tmp_path / "data"
    make_folder(root)
    bad = root / "val" / "a" / "v0.png"
    write_truncated_png(bad, 7)
    out = tmp_path / "out"
    args = ["--data", root, "--arch", "resnet18", "--img-size", "16", "--batch-size", "24", "--proj", "32-32"]
    p = run_cli(args + ["--amp", "none", "--workers", "0", "--steps", "1", "--log-every", "1", "--out", out])
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    reports = [line for line in p.stdout.splitlines() if f"cannot read image {bad}" in line]
    assert reports == [
        f"decorr.py: cannot read image {bad}: replaced by the next readable one in the diagnostics' batch "
        "(log.jsonl: bad_images)"
    ]
    train = data.Folder(str(root / "train"))
    val = data.Folder(str(root / "val"))
    replaced = sum(len(ds.read(i)[2]) for ds in (train, val) for i in range(len(ds)))
    in_the_step = sum(len(train.read(i)[2]) for i in range(len(train)))  # one batch of every image
    assert [r["bad_images"] for r in log_rows(out) if "loss" in r] == [replaced + in_the_step]


def test_folder_with_tiny_img_size_trains(folder, tmp_path):
    """--img-size 8 on an image folder: images of 64 px or less get no blur (as CIFAR recipes), so
    the 23-tap kernel, which needs more than 11 px, never meets them; one step trains."""
    root, _ = folder
    out = tmp_path / "out"
    run_main(
        [
            "--data",
            root,
            "--img-size",
            "8",
            "--batch-size",
            "8",
            "--proj",
            "32-32",
            "--arch",
            "resnet18",
            "--amp",
            "none",
            "--workers",
            "0",
            "--steps",
            "1",
            "--out",
            out,
        ]
    )
    assert (out / "backbone.pt").is_file()


def test_folder_without_readable_images_is_a_usage_error(tmp_path):
    """A training folder whose every image is unreadable: one line on stderr
    ("decorr.py: error: ..."), exit code 2, no output folder."""
    root = tmp_path / "data"
    write_truncated_png(root / "train" / "a" / "x.png", 2)
    (root / "train" / "b").mkdir(parents=True)
    (root / "train" / "b" / "y.jpg").write_bytes(b"not a jpeg")
    write_png(root / "val" / "a" / "v.png", 3)
    with pytest.raises(decorr.UsageError):
        data.Folder(str(root / "train"))
    out = tmp_path / "out"
    p = run_cli(["--data", root, "--workers", "0", "--amp", "none", "--out", out], timeout=120)
    assert p.returncode == 2, (p.stdout[-2000:], p.stderr[-2000:])
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("decorr.py: error: "), p.stderr
    assert not out.exists()


# ----------------------------------------------------------------------------- 5. CIFAR


def write_cifar10(root, n_per_batch=4, n_test=10):
    """A tiny CIFAR-10 in the python-pickle layout torchvision's CIFAR10 reads: data_batch_1..5
    and test_batch ({'data': uint8 N x 3072 (R, G, B planes of 32 x 32), 'labels': list}) and
    batches.meta ({'label_names': ...}). Returns the paths written; all 10 classes in train."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    g = np.random.default_rng(21)
    labels = np.arange(5 * n_per_batch) % 10
    written = []

    def dump(name, obj):
        with open(folder / name, "wb") as fh:
            pickle.dump(obj, fh)
        written.append(os.path.realpath(folder / name))

    for i in range(5):
        dump(
            f"data_batch_{i + 1}",
            {
                "data": g.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
                "labels": labels[i * n_per_batch : (i + 1) * n_per_batch].tolist(),
            },
        )
    dump(
        "test_batch",
        {
            "data": g.integers(0, 256, (n_test, 3072), dtype=np.uint8),
            "labels": (np.arange(n_test) % 10).tolist(),
        },
    )
    dump("batches.meta", {"label_names": [f"class{i}" for i in range(10)]})
    return set(written)


@pytest.fixture
def cifar(tmp_path):
    return tmp_path / "cifar", write_cifar10(tmp_path / "cifar")


def test_cifar_without_md5_match_is_a_usage_error(cifar, tmp_path):
    """torchvision's MD5 check refuses files that are not the real CIFAR-10: load_data raises
    UsageError (exit 2 on the command line), and main() stops before writing anything."""
    root, _ = cifar
    with pytest.raises(decorr.UsageError, match="cifar10"):
        data.load_data("cifar10", str(root))
    out = tmp_path / "out"
    with pytest.raises(decorr.UsageError):
        run_main(["--data", "cifar10", "--data-root", root, "--out", out])
    assert not out.exists()


def test_cifar_reader_and_two_training_steps(cifar, tmp_path, monkeypatch):
    """With the MD5 check accepting the files the test wrote (and deferring to torchvision
    otherwise), load_data reads them through torchvision's CIFAR10 (images equal to the pickled
    planes, labels, 10 classes) and main() trains two steps: 2 finite training rows, backbone.pt."""
    root, written = cifar
    original = torchvision.datasets.cifar.check_integrity
    monkeypatch.setattr(
        torchvision.datasets.cifar,
        "check_integrity",
        lambda fpath, md5=None: os.path.realpath(fpath) in written or original(fpath, md5),
    )
    train, val, num_classes, small = data.load_data("cifar10", str(root))
    assert (len(train), len(val), num_classes, small) == (20, 10, 10, True)
    with open(root / "cifar-10-batches-py" / "data_batch_2", "rb") as fh:
        raw = pickle.load(fh)
    x, y = train[4 + 3]
    assert x.dtype == torch.uint8 and x.shape == (3, 32, 32)
    assert np.array_equal(x.numpy().reshape(3072), raw["data"][3]) and y.item() == raw["labels"][3]
    out = tmp_path / "out"
    flags = "--batch-size 16 --proj 32-32 --amp none --steps 2 --log-every 1".split()
    run_main(["--data", "cifar10", "--data-root", root, *flags, "--out", out])
    rows = [r for r in log_rows(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r[k]) for r in rows for k in ("loss", "inv", "cov"))
    assert (out / "backbone.pt").is_file()
