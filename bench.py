"""
bench.py -- how fast and how lean is decorr.py: its loss, a training step and its data path.

    python bench.py loss  [--dims 2048,4096] [--parts 1,8,32] [--rows 1024]
    python bench.py train [--projs 4096-256,2048-2048-2048,8192-8192-8192] [--arch resnet18]
                          [--img-size 32] [--batch 64] [--parts 1] [--amp bf16|fp16|none]
    python bench.py data  [--batch 256] [--threads N] [--workers N] [--folder-size 224]
    each: [--warmup N] [--repeats N] [--max-time S] [--json PATH]; on CUDA if there is one

loss   decorr_loss against algorithm1() (the paper's Algorithm 1, part by part) and the matmul
       bound (the bare products decorr_loss cannot avoid): forward + backward time, peak memory,
       and how far apart their values are, per D x parts.
train  training steps of decorr.Model per projector, in one process with k = --parts: the model
       as decorr.py trains it ("decorr"), with algorithm1() as its head, and with no head.
data   the augmentation alone: data.batches on 32-px images in memory against torchvision's
       per-sample pipeline, data.batches on a folder of generated JPEGs, and the default run's
       training step beside them. The last line of stdout is a JSON object with speedup_32px.

Each function is run --warmup times untimed (0: none), then the functions measured together take
turns, one timed run each per round, for --repeats rounds or until --max-time seconds are spent (at
least one round). loss and train first measure peak memory, in two more runs of each (peak_bytes).
Loader processes are timed in steady state (see loader). A figure that the timing cannot support
(below the noise, or outside what is possible) is printed as a note in its place.
Output: a markdown table and notes on stdout, progress on stderr, all of it as JSON with --json.
"""

import argparse
import contextlib
import ctypes
import functools
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from torchvision.transforms import v2

import config
import data
import decorr
from data import UsageError

MiB = 2**20


def log(message):
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the reference


def algorithm1(f1, f2, w, parts=1, inv_coef=1.0, cov_coef=1.0):
    """REFERENCE: the paper's Algorithm 1 (appendix F) part by part in one process; (loss, inv, cov)
    normalised as decorr.decorr_loss. Part j (rows j m:(j+1) m) plays one GPU, and data-parallel
    training averages the GPUs' losses: inv and cov are means over parts. W^T W is computed once (k
    GPUs compute it k times): the stricter comparison. Float32 with autocast off, as decorr_loss."""
    with torch.autocast(f1.device.type, enabled=False):
        f1 = f1.float()
        f2 = f2.float()
        w = w.float()
        n, D = f1.shape
        wtw = w.T @ w
        m = n // parts
        inv = 0.0
        cov = 0.0
        for j in range(parts):
            a = f1[j * m : (j + 1) * m]
            b = f2[j * m : (j + 1) * m]
            p1 = a @ w.T
            p2 = b @ w.T
            inv = inv + ((p1 - b).pow(2).mean() + (p2 - a).pow(2).mean()) / parts
            cov = cov + ((p1.T @ p1 / m - wtw).pow(2).sum() + (p2.T @ p2 / m - wtw).pow(2).sum()) / parts
        return inv_coef * inv + cov_coef / D * cov, inv, cov


def loss_inputs(n, D, device, seed=0):
    """Standardized features of two correlated views, and a predictor weight in nn.Linear's
    default range (uniform +-1/sqrt(D)); all three require gradients, as in training."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g)
    f1 = decorr.standardize(x)
    f2 = decorr.standardize(x + 0.7 * torch.randn(n, D, generator=g))
    w = (torch.rand(D, D, generator=g) * 2 - 1) / math.sqrt(D)
    return [t.to(device).requires_grad_() for t in (f1, f2, w)]


# ----------------------------------------------------------------------------- measuring


def run_timed(fn, device):
    """Seconds of one fn(); a function that times itself returns its seconds (a float)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if isinstance(result, float):
        return result
    return time.perf_counter() - start


def measure(fns, device, warmup, repeats, max_time):
    """Times the functions of fns ({name: fn}) alike: `warmup` untimed runs of each, then rounds of
    one timed run of each, until `repeats` rounds or until the rounds have taken max_time seconds
    (at least one round), so that a shared machine's changing load hits them all. Returns
    {name: [seconds of each timed run]}."""
    for fn in fns.values():
        for _ in range(warmup):
            run_timed(fn, device)
    times = {name: [] for name in fns}
    start = time.perf_counter()
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(run_timed(fn, device))
        if time.perf_counter() - start >= max_time:
            break
    return times


def glibc_mmap_threshold(nbytes):
    """Makes glibc map every new block of nbytes or more when allocated and unmap it when freed, and
    give back free heap memory (mallopt, malloc_trim). False where that is not possible."""
    try:
        libc = ctypes.CDLL(None)
        mapped = libc.mallopt(-3, nbytes) == 1  # M_MMAP_THRESHOLD
        trimmed = libc.mallopt(-1, 2 * nbytes) == 1  # M_TRIM_THRESHOLD
        libc.malloc_trim(0)
        return mapped and trimmed
    except (OSError, AttributeError):
        return False


@contextlib.contextmanager
def live_memory(device):
    """Where peak memory is measured (before any timed run): yields whether peak_bytes can be trusted.
    On a CPU glibc maps every block from 64 KiB up and unmaps it when freed, so that RSS follows the
    live tensors (by default it keeps freed blocks up to 32 MiB for reuse, which RSS counts). After,
    blocks from 32 MiB up are mapped, glibc's own setting: mapping all made timed runs 18-32 % slower."""
    if device.type == "cuda":
        yield True
        return
    live = glibc_mmap_threshold(64 * 1024)
    try:
        yield live and os.access("/proc/self/clear_refs", os.W_OK)
    finally:
        glibc_mmap_threshold(32 * MiB)


def proc_status(key):
    """A /proc/self/status entry in kB (VmRSS, VmHWM), in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_bytes(fn, device):
    """Runs fn() twice, inside live_memory, and returns the peak memory of the second run beyond what
    was in use before it (the first run allocates what stays: library buffers and caches, 50-60 MiB
    on a CPU): on a GPU torch.cuda.max_memory_allocated, on a CPU the growth of VmHWM, the peak RSS."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # VmHWM := VmRSS
    base = proc_status("VmRSS")
    fn()
    return max(0, proc_status("VmHWM") - base)


# ----------------------------------------------------------------------------- loss


def bound_products(n, D, parts):
    """The products of decorr_loss's Gram form (parts of m < D rows) that no implementation avoids,
    forward and backward, as (count, op, shape a, shape b): p = f W^T and q = p W^T per view (and the
    backward G W and G^T x of each), the parts' P P^T (and its two backward products), W^T W (and
    decorr.GramSquare's one backward product)."""
    m = n // parts
    return [
        (8, torch.mm, (n, D), (D, D)),
        (4, torch.mm, (D, n), (n, D)),
        (2, torch.mm, (D, D), (D, D)),
        (2, torch.bmm, (parts, m, D), (parts, D, m)),
        (2, torch.bmm, (parts, m, m), (parts, m, D)),
        (2, torch.bmm, (parts, D, m), (parts, m, m)),
    ]


def matmul_bound(n, D, parts, device):
    """A function that times each product of bound_products once, on random operands, and returns
    sum(count x seconds): the time decorr_loss would take if it did nothing else."""
    products = []
    for count, op, shape_a, shape_b in bound_products(n, D, parts):
        a = torch.randn(*shape_a, device=device)
        b = torch.randn(*shape_b, device=device)
        products.append((count, functools.partial(op, a, b)))

    def bound():
        return sum(count * run_timed(product, device) for count, product in products)

    return bound


def loss_steps(a, D, k, device, values):
    """{decorr_loss, algorithm1: forward + backward on fresh inputs, a.rows x D, k parts}; each run
    leaves loss, inv and cov in values[name]."""
    f1, f2, w = loss_inputs(a.rows, D, device)

    def step_of(name, fn):
        def step():
            for t in (f1, f2, w):
                t.grad = None
            loss, inv, cov = fn(f1, f2, w, k)
            loss.backward()
            values[name] = dict(loss=loss.item(), inv=inv.item(), cov=cov.item())

        return step

    return dict(
        decorr_loss=step_of("decorr_loss", decorr.decorr_loss),
        algorithm1=step_of("algorithm1", algorithm1),
    )


def over_bound(seconds, bound):
    """seconds / bound, at least 1 where the timing holds (the bound is the bare products alone);
    under 0.9 a note."""
    if bound is None:
        return None
    ratio = seconds / bound
    if ratio < 0.9:
        return "under the bound: noise"
    return ratio


def loss_row(a, D, k, device, peaks):
    """decorr_loss, algorithm1 and (Gram form) the matmul bound, timed in the same rounds."""
    log(f"loss: D {D}, {k} parts, {a.rows} rows")
    values = {}
    row = dict(D=D, parts=k, rows=a.rows, decorr_loss={}, algorithm1={}, bound={})
    fns = loss_steps(a, D, k, device, values)
    if a.rows // k < D:  # the bound counts the Gram form's products
        fns["bound"] = matmul_bound(a.rows, D, k, device)
    for name, times in measure(fns, device, a.warmup, a.repeats, a.max_time).items():
        row[name].update(values.get(name, {}), times=times, seconds=statistics.median(times))
    for name, peak in peaks.items():
        row[name]["peak_bytes"] = peak
    ours = row["decorr_loss"]
    ref = row["algorithm1"]
    bound = row["bound"].get("seconds")
    row["speedup"] = ref["seconds"] / ours["seconds"]
    row["ours_over_bound"] = over_bound(ours["seconds"], bound)
    row["ref_over_bound"] = over_bound(ref["seconds"], bound)
    row["memory_ratio"] = None
    if ours["peak_bytes"] and ref["peak_bytes"]:
        row["memory_ratio"] = ref["peak_bytes"] / ours["peak_bytes"]
    row["rel_diff"] = max(abs(ours[q] - ref[q]) / abs(ref[q]) for q in ("loss", "inv", "cov"))
    return row


LOSS_COLUMNS = [
    ("D", lambda r: r["D"]),
    ("parts", lambda r: r["parts"]),
    ("decorr_loss ms", lambda r: ms(r["decorr_loss"]["seconds"])),
    ("Algorithm 1 ms", lambda r: ms(r["algorithm1"]["seconds"])),
    ("speed-up", lambda r: f"{r['speedup']:.2f}"),
    ("matmul bound ms", lambda r: ms(r["bound"].get("seconds"))),
    ("ours / bound", lambda r: num(r["ours_over_bound"], ".2f")),
    ("Alg. 1 / bound", lambda r: num(r["ref_over_bound"], ".2f")),
    ("ours peak MiB", lambda r: mib(r["decorr_loss"]["peak_bytes"])),
    ("Alg. 1 peak MiB", lambda r: mib(r["algorithm1"]["peak_bytes"])),
    ("memory ratio", lambda r: num(r["memory_ratio"], ".1f")),
    ("rel. diff", lambda r: f"{r['rel_diff']:.1e}"),
]


def cmd_loss(a, device):
    sizes = [(D, k) for D in a.dims for k in a.parts]
    peaks = {}
    with live_memory(device) as live:  # peak memory first
        for D, k in sizes:
            steps = loss_steps(a, D, k, device, {})
            peaks[D, k] = {name: peak_bytes(step, device) if live else None for name, step in steps.items()}
    results = [loss_row(a, D, k, device, peaks[D, k]) for D, k in sizes]
    notes = [
        f"{a.rows} rows, float32, forward + backward, {device.type}; median of up to {a.repeats} rounds "
        f"after {a.warmup} warm-up (none after {a.max_time:g} s); peak: memory growth in a run. rel. diff: "
        "of loss, inv and cov between decorr_loss and algorithm1 (gradients: tests).",
        "matmul bound: the bare float32 products of decorr_loss's Gram form (rows per part < D), forward "
        "and backward, timed in the same rounds; ours / bound = 1 is the limit, under 0.9 it is noise.",
    ]
    return dict(results=results), table(LOSS_COLUMNS, results), notes


# ----------------------------------------------------------------------------- train


def train_steps(args, variants, device, amp):
    """{variant: one training step} of a decorr.Model made from decorr.py's args, on fixed random
    images: decorr.train_step, the run's own (forward under autocast(amp), backward, LARS), at a tiny
    learning rate (timing, not training). Variants: decorr (the model's loss), algorithm1 (standardize
    + algorithm1 with args.partitions), nohead (the sum of the projector's outputs)."""
    torch.manual_seed(0)
    model = decorr.Model(args).to(device)
    model.backbone.to(memory_format=torch.channels_last)
    model.train()
    opt = decorr.make_optimizer(model, args)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    g = torch.Generator().manual_seed(0)
    shape = (args.batch_size, 3, args.img_size, args.img_size)
    x1 = torch.randn(shape, generator=g).to(device, memory_format=torch.channels_last)
    x2 = torch.randn(shape, generator=g).to(device, memory_format=torch.channels_last)

    def algorithm1_head(x1, x2):
        f1 = decorr.standardize(model.projector(model.backbone(x1)))
        f2 = decorr.standardize(model.projector(model.backbone(x2)))
        return algorithm1(f1, f2, model.predictor.weight, args.partitions, args.inv_coef, args.cov_coef)

    def no_head(x1, x2):
        f1 = model.projector(model.backbone(x1))
        f2 = model.projector(model.backbone(x2))
        return (f1.float().sum() + f2.float().sum(),)

    forward = dict(decorr=model, algorithm1=algorithm1_head, nohead=no_head)
    dtype = dict(bf16=torch.bfloat16, fp16=torch.float16).get(amp)
    steps = {}
    for variant in variants:
        steps[variant] = functools.partial(
            decorr.train_step, forward[variant], opt, scaler, x1, x2, 1e-5, dtype
        )
    return steps


def head_share(times, no_head_times):
    """(t - t_no_head) / t of the medians, or a note where the difference does not clear the noise
    (the spread of either's timed runs; with one run each, a difference not above 0)."""
    t = statistics.median(times)
    difference = t - statistics.median(no_head_times)
    noise = max(max(runs) - min(runs) for runs in (times, no_head_times)) / 2
    if difference <= noise:
        return "below noise"
    return difference / t


TRAIN_VARIANTS = dict(decorr="decorr", algorithm1="algorithm1", nohead="no head")
TRAIN_COLUMNS = [
    ("projector", lambda r: r["proj"]),
    ("variant", lambda r: TRAIN_VARIANTS[r["variant"]]),
    ("images/s", lambda r: f"{r['img_per_s']:.1f}"),
    ("step ms", lambda r: ms(r["seconds"])),
    ("peak MiB", lambda r: mib(r["peak_bytes"])),
    ("head share", lambda r: num(r["head_share"], ".0%")),
    ("timed steps", lambda r: len(r["times"])),
]


def train_args(a, proj):
    """decorr.py's arguments for a model of the bench's settings."""
    argv = ["--arch", a.arch, "--img-size", a.img_size, "--proj", proj, "--batch-size", a.batch]
    argv += ["--partitions", a.parts]
    return config.parse_args([str(value) for value in argv])


def cmd_train(a, device):
    args = {proj: train_args(a, proj) for proj in a.projs}
    peaks = {}
    with live_memory(device) as live:  # peak memory first
        for proj in a.projs:
            steps = train_steps(args[proj], TRAIN_VARIANTS, device, a.amp)
            peaks[proj] = {v: peak_bytes(step, device) if live else None for v, step in steps.items()}
    results = []
    for proj in a.projs:
        log(f"train: {a.arch} {proj}, {a.img_size} px, batch {a.batch}, {a.parts} parts")
        steps = train_steps(args[proj], TRAIN_VARIANTS, device, a.amp)
        times = measure(steps, device, a.warmup, a.repeats, a.max_time)
        for variant in TRAIN_VARIANTS:
            seconds = statistics.median(times[variant])
            share = None
            if variant != "nohead":
                share = head_share(times[variant], times["nohead"])
            results.append(
                dict(
                    proj=proj,
                    variant=variant,
                    seconds=seconds,
                    times=times[variant],
                    img_per_s=a.batch / seconds,
                    peak_bytes=peaks[proj][variant],
                    head_share=share,
                )
            )
        del steps
    notes = [
        f"{a.arch}, {a.img_size} px, {a.batch} images (pairs of views) a step, k = {a.parts}, amp {a.amp}, "
        f"{device.type}; decorr.train_step (forward, backward, LARS), the variants of one model in turns; "
        f"median of up to {a.repeats} steps after {a.warmup} warm-up (none after {a.max_time:g} s); peak: "
        "memory growth in a step. head share = (t - t_no_head) / t, the head being standardize + predictor "
        "+ loss; 'below noise' where t - t_no_head is within half the range of the timed steps.",
    ]
    return dict(results=results), table(TRAIN_COLUMNS, results), notes


# ----------------------------------------------------------------------------- data


def torchvision_view(solarize_p):
    """One view by torchvision's per-sample reference pipeline on a uint8 image (BYOL / Barlow Twins
    values, no blur at 32 px): the work data.resized_crops and data.colour do on batches."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(32, scale=(0.08, 1.0), interpolation=v2.InterpolationMode.BICUBIC),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            v2.RandomGrayscale(0.2),
            v2.RandomSolarize(128, p=solarize_p),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(data.MEAN, data.STD),
        ]
    )


class PerSample(torch.utils.data.Dataset):
    """Item i: image i % len(images) in two views, by torchvision_view with data.VIEWS' solarize
    probabilities, and the seconds they took to make; endless, so that one iterator serves all
    batches."""

    def __init__(self, images):
        self.images = images
        self.views = [torchvision_view(solarize_p) for _, solarize_p in data.VIEWS]

    def __len__(self):
        return 10**9

    def __getitem__(self, i):
        start = time.perf_counter()
        image = self.images[i % len(self.images)]
        views = [view(image) for view in self.views]
        return *views, time.perf_counter() - start


def with_work(batches, work):
    """The batches of PerSample items, each one's seconds of work appended to work."""
    for batch in batches:
        work.append(batch[-1].sum().item())
        yield batch


def write_jpegs(root, n, seed=0):
    """n JPEGs of 400 x 300 and 300 x 400 px (smooth random colours, noise) in class folders a/, b/."""
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        size = (300, 400) if i % 2 else (400, 300)
        x = F.interpolate(torch.rand(1, 3, 6, 8, generator=g), size, mode="bicubic")[0]
        x = (x + 0.05 * torch.randn(3, *size, generator=g)).clamp(0, 1)
        folder = os.path.join(root, "ab"[i % 2])
        os.makedirs(folder, exist_ok=True)
        v2.functional.to_pil_image(x).save(os.path.join(folder, f"{i}.jpg"), quality=90)


def data_times(pipelines, device, a):
    """{name: seconds per batch of each timed run} for pipelines, {name: (iterable of batches,
    batches per timed run, batches taken untimed after the warm-up)}, timed in rounds as measure()
    does. The iterators are ended after, and with them any loader processes."""
    iterators = {name: iter(batches) for name, (batches, _, _) in pipelines.items()}
    takes = {}
    for name, (_, per_run, _) in pipelines.items():
        takes[name] = functools.partial(take, iterators[name], per_run)
    try:
        for name, (_, _, skipped) in pipelines.items():
            for _ in range(a.warmup):
                run_timed(takes[name], device)
            take(iterators[name], skipped)
        times = measure(takes, device, 0, a.repeats, a.max_time)
    finally:
        for it in iterators.values():
            if hasattr(it, "close"):  # a generator (data.batches)
                it.close()
        iterators.clear()  # a DataLoader iterator shuts its workers down
    return {name: [t / pipelines[name][1] for t in times[name]] for name in times}


def take(iterator, n):
    for _ in range(n):
        next(iterator)


def loader(batches, processes):
    """(batches, per timed run, untimed after warm-up) for an iterable fed by loader processes: a
    timed run takes one batch from each process, after the batches they prepare ahead (two each,
    DataLoader's prefetch_factor), which would have been ready at once."""
    if processes == 0:
        return batches, 1, 0
    return batches, processes, 2 * processes


def data_row(pipeline, px, where, times, batch):
    seconds = sum(times) / len(times)
    log(f"data: {pipeline}, {px} px, {where}: {batch / seconds:.0f} images/s")
    return dict(
        pipeline=pipeline,
        px=px,
        where=where,
        seconds_per_batch=seconds,
        img_per_s=batch / seconds,
        times=times,
    )


def plausible(seconds_per_batch, work, processes):
    """Whether `processes` loader processes, whose batches took `work` seconds each to make, can have
    delivered one every seconds_per_batch (with 20 % to spare for the noise)."""
    return seconds_per_batch >= 0.8 * statistics.mean(work) / processes


def in_process_rows(images, labels, args32, k, device, a):
    """data.batches on the images in memory, k batches a call as decorr.py makes them, and torchvision
    per sample, both in this process, taking turns under the same load."""
    batched = data.batches(TensorDataset(images, labels), True, args32, device, 0, 10**9)
    per_sample = DataLoader(PerSample(images), batch_size=a.batch)
    t = data_times(dict(batched=(batched, k, 0), per_sample=(per_sample, 1, 0)), device, a)
    batched.close()
    where = f"this process, {a.threads} threads"
    return [
        data_row("data.batches, batched", 32, f"{where}, {device.type}", t["batched"], a.batch),
        data_row("torchvision v2, per sample", 32, where, t["per_sample"], a.batch),
    ]


def loaders_row(images, device, a):
    """torchvision per sample in --threads loader processes of one thread each, timed alone (they work
    ahead while anything else runs); "possible": whether they can have delivered at that rate."""
    work = []
    loaders = DataLoader(PerSample(images), batch_size=a.batch, num_workers=a.threads)
    t = data_times(dict(loaders=loader(with_work(loaders, work), a.threads)), device, a)
    where = f"{a.threads} loader process(es), 1 thread each"
    row = data_row("torchvision v2, per sample", 32, where, t["loaders"], a.batch)
    timed_work = work[-len(t["loaders"]) * a.threads :]
    row["possible"] = plausible(row["seconds_per_batch"], timed_work, a.threads)
    return row


def folder_row(device, a):
    """data.batches on a folder of generated JPEGs: --workers loader processes decode and crop."""
    with tempfile.TemporaryDirectory() as tmp:
        write_jpegs(tmp, a.batch)
        argv = ["--data", tmp, "--batch-size", a.batch, "--img-size", a.folder_size, "--workers", a.workers]
        args = config.parse_args([str(value) for value in argv])
        folder = data.batches(data.Folder(tmp), False, args, device, 0, 10**9)
        t = data_times(dict(folder=loader(folder, a.workers)), device, a)
    where = f"{a.workers} loader process(es), 1 thread each (decode, crop) + this process (colour, "
    where += f"{a.threads} threads, {device.type})"
    return data_row("data.batches, JPEG folder", a.folder_size, where, t["folder"], a.batch)


def cmd_data(a, device):
    torch.set_num_threads(a.threads)
    images, labels = data.synthetic_images(max(data.SYNTH_TRAIN, a.batch), 0)
    k = max(1, data.AHEAD.get(device.type, 0) // a.batch)  # batches data.batches makes at a time
    args32 = config.parse_args(["--batch-size", str(a.batch)])  # the default run: 32 px, resnet18 4096-256
    rows = in_process_rows(images, labels, args32, k, device, a)
    rows.append(loaders_row(images, device, a))
    rows.append(folder_row(device, a))

    log(f"data: training step of decorr.Model, resnet18 4096-256, 32 px, batch {a.batch}, amp {a.amp}")
    steps = train_steps(args32, ["decorr"], device, a.amp)
    times = measure(steps, device, a.warmup, a.repeats, a.max_time)["decorr"]
    step = statistics.median(times)
    for row in rows:
        row["data_over_step"] = row["seconds_per_batch"] / step if row["px"] == 32 else None
    rows.append(
        dict(
            pipeline="training step: decorr.Model resnet18 4096-256",
            px=32,
            where=f"this process, {a.threads} threads, {device.type}",
            seconds_per_batch=step,
            img_per_s=a.batch / step,
            data_over_step=1,
        )
    )
    summary = data_summary(rows, a, device, step)
    notes = [
        f"An image is a pair of views; {os.cpu_count()} CPUs. Data: mean over up to {a.repeats} timed "
        f"runs after {a.warmup} warm-up (none after {a.max_time:g} s); a timed run of loader processes "
        "takes a batch from each, after the batches they prepared ahead. Step (decorr.train_step, amp "
        f"{a.amp}): median. "
        f"data / step: the share in-memory views, made {k * a.batch} images at a time in the training "
        "process, add to a step; loader processes work beside it (on the same cores), above 1 it waits.",
        "speedup_32px = batched images/s over the faster per-sample row: "
        f"{num(summary['speedup_32px'], '.1f')} (target 4). JPEG folder: {a.batch} generated 400 x 300 "
        "and 300 x 400 images, view 1 blurred.",
    ]
    results = dict(results=rows[:4], train_step=dict(seconds=step, times=times), summary=summary)
    return results, table(data_columns(a.batch), rows), notes


def data_columns(batch):
    return [
        ("pipeline", lambda r: r["pipeline"]),
        ("px", lambda r: r["px"]),
        ("where", lambda r: r["where"]),
        ("images/s", rate_cell),
        (f"ms per batch of {batch}", lambda r: ms(r["seconds_per_batch"])),
        ("data / step", lambda r: num(r["data_over_step"], ".3f")),
    ]


def rate_cell(row):
    if row.get("possible") is False:
        return "faster than made: not steady"
    return num(row["img_per_s"], ".0f" if row["img_per_s"] >= 10 else ".1f")


def data_summary(rows, a, device, step):
    """The headline figures: speedup_32px, the batched views against the faster per-sample row,
    is a note where the loader processes' timing cannot be right."""
    batched, in_process, loaders, folder = rows[:4]
    per_sample = max(in_process, loaders, key=lambda r: r["img_per_s"])
    speedup = batched["img_per_s"] / per_sample["img_per_s"]
    if not loaders["possible"]:
        speedup = f"not measured: {a.threads} loader processes timed faster than they work"
    return dict(
        speedup_32px=speedup,
        batched_img_per_s=batched["img_per_s"],
        per_sample_img_per_s=per_sample["img_per_s"],
        per_sample_where=per_sample["where"],
        folder_img_per_s=folder["img_per_s"],
        folder_px=a.folder_size,
        train_img_per_s=a.batch / step,
        step_s=step,
        batched_data_over_step=batched["seconds_per_batch"] / step,
        batch=a.batch,
        threads=a.threads,
        workers=a.workers,
        amp=a.amp,
        device=device.type,
    )


# ----------------------------------------------------------------------------- output and command line


def md_table(headers, rows):
    """A GitHub markdown table, columns padded; cells are str()-ed."""
    rows = [[str(cell) for cell in row] for row in rows]
    widths = [max([len(header)] + [len(row[i]) for row in rows]) for i, header in enumerate(headers)]

    def line(cells):
        return "| " + " | ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
    return "\n".join([line(headers), rule] + [line(row) for row in rows])


def table(columns, results):
    """md_table of results, one row each: columns is [(header, cell of a result)]."""
    headers = [header for header, _ in columns]
    return md_table(headers, [[cell(result) for _, cell in columns] for result in results])


def num(x, spec):
    """x formatted by spec; '-' for None; a note (a string) as it is."""
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    return format(x, spec)


def ms(seconds):
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds * 1e3:.1f}"
    return f"{seconds * 1e3:.0f}"


def mib(nbytes):
    return "-" if nbytes is None else f"{nbytes / MiB:.0f}"


def machine(device):
    with open("/proc/cpuinfo") as fh:
        cpu = re.search(r"model name\s*:\s*(.*)", fh.read())
    return dict(
        device=device.type,
        cpu=cpu.group(1) if cpu else platform.machine(),
        cpu_count=os.cpu_count(),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        python=platform.python_version(),
        load_average=os.getloadavg(),
        ram_bytes=os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"),
        gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    )


def at_least(low):
    """An argparse type: an integer of at least low."""

    def integer(s):
        if not s.isdecimal() or int(s) < low:
            raise argparse.ArgumentTypeError(f"{s!r} is not an integer >= {low}")
        return int(s)

    return integer


positive = at_least(1)
not_negative = at_least(0)


def seconds(s):
    """An argparse type: a finite number above 0 (not nan, not inf)."""
    try:
        value = float(s)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{s!r} is not a finite number > 0")
    return value


def positives(s):  # "1,8,32" -> [1, 8, 32]
    if not all(x.isdecimal() and int(x) >= 1 for x in s.split(",")):
        raise argparse.ArgumentTypeError(f"{s!r} is not a list of integers >= 1 like 1,8,32")
    return [int(x) for x in s.split(",")]


def projectors(s):  # "4096-256,2048-2048-2048" -> ["4096-256", "2048-2048-2048"]
    try:
        for proj in s.split(","):
            config.parse_proj(proj)
    except (UsageError, ValueError):
        message = f"{s!r} is not a list of projectors like 4096-256,2048-2048-2048 (widths > 0)"
        raise argparse.ArgumentTypeError(message) from None
    return s.split(",")


def splits(n, ks, name):
    for k in ks:
        if n % k:
            raise UsageError(f"{name} {n} does not split into --parts {k} equal parts")


def on_device(cpu, gpu, description):
    """The default and help of an option whose default depends on the device: CPU cpu, GPU gpu, as
    command-line text (argparse reads a text default with the option's type)."""
    default = gpu if torch.cuda.is_available() else cpu
    return dict(default=default, help=f"{description} (default: CPU {cpu}; GPU {gpu})")


REPEATS = dict(loss=("3", "10"), train=("3", "20"), data=("10", "10"))  # timed rounds on a CPU, a GPU


def add_arguments(commands):
    """The options of each sub-command ({name: its parser})."""
    for name, s in commands.items():
        help_json = "also write settings, machine and results here (default: none)"
        s.add_argument("--json", metavar="PATH", help=help_json)
        s.add_argument("--warmup", type=not_negative, **on_device("1", "3", "untimed runs of each, 0: none"))
        s.add_argument("--repeats", "--steps", type=positive, **on_device(*REPEATS[name], "timed rounds"))
        s.add_argument("--max-time", type=seconds, **on_device("10", "30", "seconds, then no new round"))
        if name in ("train", "data"):
            help_amp = "autocast (default: decorr.py's: bf16 where the machine supports it, else none)"
            s.add_argument("--amp", choices=("bf16", "fp16", "none"), help=help_amp)
    loss = commands["loss"].add_argument
    loss("--dims", type=positives, **on_device("2048,4096", "2048,4096,8192", "D values, comma-separated"))
    help_parts = "partition counts, comma-separated (default: %(default)s)"
    loss("--parts", type=positives, default="1,8,32", help=help_parts)
    loss("--rows", type=at_least(2), default=1024, help="rows, at least 2 (default: %(default)s)")
    train = commands["train"].add_argument
    help_projs = "projectors, comma-separated: widths joined by -, the last is D (default: %(default)s)"
    train("--projs", type=projectors, default="4096-256,2048-2048-2048,8192-8192-8192", help=help_projs)
    train("--arch", choices=config.ARCHS, **on_device("resnet18", "resnet50", "backbone"))
    train("--img-size", type=positive, **on_device("32", "224", "image size in px"))
    train("--batch", type=at_least(2), **on_device("64", "256", "images per step, at least 2"))
    train("--parts", type=positive, default=1, help="k, partitions of the batch (default: %(default)s)")
    threads = torch.get_num_threads()
    workers = max(0, min(10, (os.cpu_count() or 1) - 1))
    data_ = commands["data"].add_argument
    data_("--batch", type=at_least(2), default=256, help="images a batch, at least 2 (default: %(default)s)")
    help_threads = "threads here, and per-sample loader processes (default: %(default)s, torch's threads)"
    data_("--threads", type=positive, default=threads, help=help_threads)
    help_workers = "the folder's loader processes, 0: none (default: %(default)s = CPUs - 1, at most 10)"
    data_("--workers", type=not_negative, default=workers, help=help_workers)
    data_("--folder-size", type=positive, default=224, help="crop size in px (default: %(default)s)")


def parse_args(argv):
    p = config.Parser(
        prog="bench.py",
        description=__doc__.split("\n\n")[0].strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{loss,train,data}")
    add_arguments({name: sub.add_parser(name) for name in ("loss", "train", "data")})
    a = p.parse_args(argv)
    a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.cmd in ("train", "data") and a.amp is None:  # decorr.py's default: bf16 where supported
        a.amp = config.parse_args([]).amp
    if a.cmd == "loss":
        splits(a.rows, a.parts, "--rows")
    if a.cmd == "train":
        splits(a.batch, [a.parts], "--batch")
    if a.json and (os.path.isdir(a.json) or not os.path.isdir(os.path.dirname(os.path.abspath(a.json)))):
        raise UsageError(f"--json {a.json!r}: not a file in an existing directory")
    return a


COMMANDS = dict(loss=cmd_loss, train=cmd_train, data=cmd_data)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parse_args(argv)
    device = torch.device(a.device)
    log(f"bench.py {a.cmd} on {device.type}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    t0 = time.time()
    results, markdown, notes = COMMANDS[a.cmd](a, device)
    wall = time.time() - t0
    note_lines = "".join(f"- {note}\n" for note in notes)
    print(f"## bench.py {a.cmd}\n\n{markdown}\n\n{note_lines}- wall time {wall:.0f} s")
    if a.json:
        document = dict(
            command=a.cmd,
            argv=argv,
            settings=vars(a),
            machine=machine(device),
            wall_s=wall,
            markdown=markdown,
            notes=notes,
            **results,
        )
        with open(a.json, "w") as fh:
            json.dump(document, fh, indent=1)
    if "summary" in results:
        print(json.dumps(results["summary"]))
    return 0


def cli(argv=None):
    """main() with bad input reported as one line on stderr and exit code 2."""
    try:
        return main(argv)
    except UsageError as e:
        lines = str(e).strip().splitlines()
        message = lines[-1] if lines else "bad input"
        print(f"bench.py: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
