"""
bench.py -- how fast and how lean is decorr.py: its loss, a training step, its data path, and
partitions that span processes.

    python bench.py loss  [--dims 2048,4096] [--parts 1,8,32] [--rows 1024]
    python bench.py train [--projs 4096-256,2048-2048-2048,8192-8192-8192] [--arch resnet18]
                          [--img-size 32] [--batch 64] [--parts 1] [--amp bf16|fp16|none]
    python bench.py data  [--batch 256] [--threads N] [--workers N] [--folder-size 224]
    python bench.py parts [--world 8] [--batch 2048] [--dims 2048] [--parts 1,2,8]
    each: [--warmup N] [--repeats N] [--json PATH]; loss, train, data: [--max-time S], on CUDA if any

loss   decorr_loss against algorithm1() (the paper's Algorithm 1, part by part) and the matmul
       bound (the bare products decorr_loss cannot avoid): forward + backward time, peak memory,
       and how far apart their values are, per D x parts.
train  training steps of decorr.Model per projector, in one process with k = --parts: the model
       as decorr.py trains it ("decorr"), with algorithm1() as its head, and with no head.
data   the augmentation alone: data.batches on 32-px images in memory against torchvision's
       per-sample pipeline, data.batches on a folder of generated JPEGs, and the default run's
       training step beside them. The last line of stdout is a JSON object with speedup_32px.
parts  --world gloo processes, forward + backward of decorr_loss with k parts of the global
       batch: time, and bytes sent by each rank (computed from the layout, and counted).

Each function is run --warmup times untimed, then the functions measured together take turns, one
timed run each per round, for --repeats rounds or until --max-time seconds are spent (at least one
round). loss and train first measure peak memory, in two more runs of each (see peak_bytes).
Output: a markdown table and notes on stdout, progress on stderr, all of it as JSON with --json.
"""

import argparse
import contextlib
import functools
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from torchvision.transforms import v2

import config
import data
import decorr
from decorr import UsageError

MiB = 2**20
PAPER = dict(batch=2048, world=8, dims=(2048, 8192), parts=(1, 2, 8))  # sec. 5.1, Table 5


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the reference


def algorithm1(f1, f2, w, parts=1, inv_coef=1.0, cov_coef=1.0):
    """REFERENCE: the paper's Algorithm 1 (appendix F) written out part by part in one process;
    returns (loss, inv, cov) normalised as decorr.decorr_loss. Part j (rows j m:(j+1) m) plays one
    GPU of Algorithm 1 and data-parallel training averages the GPUs' losses, so inv and cov are
    means over parts. W^T W is the same for every part and is computed once (k GPUs compute it k
    times): the stricter comparison. Float32 with autocast off, like decorr_loss."""
    with torch.autocast(f1.device.type, enabled=False):
        f1, f2, w = f1.float(), f2.float(), w.float()
        (n, D), wtw = f1.shape, w.T @ w
        m, inv, cov = n // parts, 0.0, 0.0
        for j in range(parts):
            a, b = f1[j * m : (j + 1) * m], f2[j * m : (j + 1) * m]
            p1, p2 = a @ w.T, b @ w.T
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
    t = time.perf_counter()
    r = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return r if isinstance(r, float) else time.perf_counter() - t


def measure(fns, device, warmup, repeats, max_time):
    """Times the functions of fns ({name: fn}) alike: `warmup` untimed runs of each, then rounds of
    one timed run of each, until `repeats` rounds or until the rounds have taken max_time seconds
    (at least one round), so that a shared machine's changing load hits them all. Returns
    {name: [seconds of each timed run]}."""
    for fn in fns.values():
        for _ in range(warmup):
            run_timed(fn, device)
    times, start = {k: [] for k in fns}, time.perf_counter()
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(run_timed(fn, device))
        if time.perf_counter() - start >= max_time:
            break
    return times


def glibc_mmap_threshold(nbytes):
    """Makes glibc map every new block of nbytes or more when allocated and unmap it when freed, and
    give back free heap memory (mallopt, malloc_trim). False where that is not possible."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        ok = libc.mallopt(-3, nbytes) == 1 and libc.mallopt(-1, 2 * nbytes) == 1  # M_MMAP_, M_TRIM_THRESHOLD
        libc.malloc_trim(0)
        return ok
    except (OSError, AttributeError):
        return False


@contextlib.contextmanager
def live_memory(device):
    """Where peak memory is measured: yields whether peak_bytes can be trusted. On a CPU, glibc maps
    every block from 64 KiB up and unmaps it when freed, so that the resident set follows the live
    tensors (by default it keeps freed blocks of up to 32 MiB for reuse: RSS then counts blocks no
    longer in use, and a run that reuses them shows little growth). Measure before any timed run,
    whose freed blocks would stay in the heap. Afterwards blocks from 32 MiB up are mapped (where
    glibc's own threshold settles), for the timed runs: mapping every block made them 18-32 % slower."""
    live = device.type == "cuda" or glibc_mmap_threshold(64 * 1024)
    try:
        yield live and (device.type == "cuda" or os.access("/proc/self/clear_refs", os.W_OK))
    finally:
        if device.type == "cpu":
            glibc_mmap_threshold(32 * MiB)


def proc_status(key):  # VmRSS, VmHWM: bytes
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(key + ":"))


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
    """The matrix products of decorr_loss's Gram form (parts of m < D rows) that no implementation
    can avoid, forward and backward, as (count, op, shape a, shape b): p = f W^T and q = p W^T for
    both views (forward, and the backward G W and G^T x of each), the parts' Gram matrices P P^T
    (forward, and autograd's two backward products), W^T W (forward, and decorr.GramSquare's one
    backward product 4 W (W^T W))."""
    m = n // parts
    return [
        (8, "mm", (n, D), (D, D)),
        (4, "mm", (D, n), (n, D)),
        (2, "mm", (D, D), (D, D)),
        (2, "bmm", (parts, m, D), (parts, D, m)),
        (2, "bmm", (parts, m, m), (parts, m, D)),
        (2, "bmm", (parts, D, m), (parts, m, m)),
    ]


def matmul_bound(n, D, parts, device):
    """A function that times each product of bound_products once, on random operands, and returns
    sum(count x seconds): the time decorr_loss would take if it did nothing else."""
    products = bound_products(n, D, parts)
    operands = [
        (torch.randn(*sa, device=device), torch.randn(*sb, device=device)) for _, _, sa, sb in products
    ]

    def bound():
        return sum(
            count * run_timed(lambda: (torch.bmm if op == "bmm" else torch.mm)(a, b), device)
            for (count, op, _, _), (a, b) in zip(products, operands)
        )

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
        decorr_loss=step_of("decorr_loss", decorr.decorr_loss), algorithm1=step_of("algorithm1", algorithm1)
    )


def cmd_loss(a, device):
    sizes, results, table = [(D, k) for D in a.dims for k in a.parts], [], []
    with live_memory(device) as live:  # peak memory first
        peaks = {
            (D, k): {
                name: peak_bytes(fn, device) if live else None
                for name, fn in loss_steps(a, D, k, device, {}).items()
            }
            for D, k in sizes
        }
    for D, k in sizes:
        log(f"loss: D {D}, {k} parts, {a.rows} rows")
        values, row = {}, dict(D=D, parts=k, rows=a.rows, decorr_loss={}, algorithm1={}, bound={})
        fns = loss_steps(a, D, k, device, values)
        if a.rows // k < D:  # the bound counts the Gram form's products
            fns["bound"] = matmul_bound(a.rows, D, k, device)
        for name, times in measure(fns, device, a.warmup, a.repeats, a.max_time).items():
            row[name].update(values.get(name, {}), times=times, seconds=statistics.median(times))
        for name in peaks[D, k]:
            row[name]["peak_bytes"] = peaks[D, k][name]
        ours, ref, bound = row["decorr_loss"], row["algorithm1"], row["bound"].get("seconds")
        mem = ours["peak_bytes"], ref["peak_bytes"]
        row.update(
            speedup=ref["seconds"] / ours["seconds"],
            ours_over_bound=bound and ours["seconds"] / bound,
            ref_over_bound=bound and ref["seconds"] / bound,
            memory_ratio=mem[1] / mem[0] if all(mem) else None,
            rel_diff=max(abs(ours[q] - ref[q]) / abs(ref[q]) for q in ("loss", "inv", "cov")),
        )
        results.append(row)
        table.append(
            [
                D,
                k,
                ms(ours["seconds"]),
                ms(ref["seconds"]),
                f"{row['speedup']:.2f}",
                ms(bound),
                num(row["ours_over_bound"], ".2f"),
                num(row["ref_over_bound"], ".2f"),
                mib(mem[0]),
                mib(mem[1]),
                num(row["memory_ratio"], ".1f"),
                f"{row['rel_diff']:.1e}",
            ]
        )
        del fns
    headers = [
        "D",
        "parts",
        "decorr_loss ms",
        "Algorithm 1 ms",
        "speed-up",
        "matmul bound ms",
        "ours / bound",
        "Alg. 1 / bound",
        "ours peak MiB",
        "Alg. 1 peak MiB",
        "memory ratio",
        "rel. diff",
    ]
    notes = [
        f"{a.rows} rows, float32, forward + backward, {device.type}; median of up to {a.repeats} rounds after "
        f"{a.warmup} warm-up (none after {a.max_time:g} s); peak: memory growth in a run (peak_bytes). rel. "
        "diff: of loss, inv and cov between decorr_loss and algorithm1 on the row's inputs (gradients: tests).",
        "matmul bound: the bare float32 products of decorr_loss's Gram form (rows per part < D; '-' for the "
        "D x D form), forward and backward, timed in the same rounds; ours / bound = 1 is the limit.",
    ]
    return dict(results=results), md_table(headers, table), notes


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
    opt, scaler = decorr.make_optimizer(model, args), torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    g = torch.Generator().manual_seed(0)
    x1, x2 = (
        torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g).to(
            device, memory_format=torch.channels_last
        )
        for _ in range(2)
    )

    def forward(variant):  # as model(x1, x2): (loss, ...)
        if variant == "decorr":
            return model

        def head(x1, x2):
            f1, f2 = (model.projector(model.backbone(x)) for x in (x1, x2))
            if variant == "nohead":
                return (f1.float().sum() + f2.float().sum(),)
            f1, f2 = decorr.standardize(f1), decorr.standardize(f2)
            return algorithm1(f1, f2, model.predictor.weight, args.partitions, args.inv_coef, args.cov_coef)

        return head

    dtype = dict(bf16=torch.bfloat16, fp16=torch.float16).get(amp)
    return {
        v: functools.partial(decorr.train_step, forward(v), opt, scaler, x1, x2, 1e-5, dtype)
        for v in variants
    }


def cmd_train(a, device):
    names = dict(decorr="decorr", algorithm1="algorithm1", nohead="no head")
    results, table = [], []
    args = {
        proj: decorr.parse_args(
            [
                "--arch",
                a.arch,
                "--img-size",
                str(a.img_size),
                "--proj",
                proj,
                "--batch-size",
                str(a.batch),
                "--partitions",
                str(a.parts),
            ]
        )
        for proj in a.projs
    }
    with live_memory(device) as live:  # peak memory first
        peaks = {
            proj: {
                v: peak_bytes(step, device) if live else None
                for v, step in train_steps(args[proj], names, device, a.amp).items()
            }
            for proj in a.projs
        }
    for proj in a.projs:
        log(f"train: {a.arch} {proj}, {a.img_size} px, batch {a.batch}, {a.parts} parts")
        steps = train_steps(args[proj], names, device, a.amp)
        times = measure(steps, device, a.warmup, a.repeats, a.max_time)
        t0 = statistics.median(times["nohead"])
        for v, name in names.items():
            t = statistics.median(times[v])
            share = (t - t0) / t if v != "nohead" else None
            results.append(
                dict(
                    proj=proj,
                    variant=v,
                    seconds=t,
                    times=times[v],
                    img_per_s=a.batch / t,
                    peak_bytes=peaks[proj][v],
                    head_share=share,
                )
            )
            table.append(
                [
                    proj,
                    name,
                    f"{a.batch / t:.1f}",
                    ms(t),
                    mib(peaks[proj][v]),
                    "-" if share is None else f"{100 * share:.0f}%",
                    len(times[v]),
                ]
            )
        del steps
    headers = ["projector", "variant", "images/s", "step ms", "peak MiB", "head share", "timed steps"]
    notes = [
        f"{a.arch}, {a.img_size} px, {a.batch} images (pairs of views) per step, partitions k = {a.parts}, amp "
        f"{a.amp}, {device.type}; a step is decorr.train_step (forward, backward, LARS update); the three variants "
        f"share one model and take turns; median of up to {a.repeats} steps after {a.warmup} warm-up (none after "
        f"{a.max_time:g} s); peak: memory growth in a step (peak_bytes), gradients included. head = standardize + "
        "predictor + loss; head share = (t - t_no_head) / t."
    ]
    return dict(results=results), md_table(headers, table), notes


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
    probabilities; endless, so that one iterator serves all batches."""

    def __init__(self, images):
        self.images, self.views = images, [torchvision_view(solarize_p) for _, solarize_p in data.VIEWS]

    def __len__(self):
        return 10**9

    def __getitem__(self, i):
        return tuple(view(self.images[i % len(self.images)]) for view in self.views)


def write_jpegs(root, n, seed=0):
    """n JPEGs of 400 x 300 and 300 x 400 px (smooth random colours, noise) in class folders a/, b/."""
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        size = (300, 400) if i % 2 else (400, 300)
        x = F.interpolate(torch.rand(1, 3, 6, 8, generator=g), size, mode="bicubic")[0]
        x = (x + 0.05 * torch.randn(3, *size, generator=g)).clamp(0, 1)
        os.makedirs(os.path.join(root, "ab"[i % 2]), exist_ok=True)
        v2.functional.to_pil_image(x).save(os.path.join(root, "ab"[i % 2], f"{i}.jpg"), quality=90)


def data_times(batches, device, a):
    """{name: seconds of each of up to --repeats consecutive batches} for the iterables of batches
    in `batches` ({name: iterable}), after --warmup batches, in rounds; their iterators are ended
    after, and with them any loader processes."""
    its = {name: iter(b) for name, b in batches.items()}
    try:
        return measure(
            {name: it.__next__ for name, it in its.items()}, device, a.warmup, a.repeats, a.max_time
        )
    finally:
        for it in its.values():
            if hasattr(it, "close"):  # a generator (data.batches)
                it.close()
        its.clear()  # a DataLoader iterator shuts its workers down


def cmd_data(a, device):
    torch.set_num_threads(a.threads)
    B, T, W = a.batch, a.threads, a.workers
    images, labels = data.synthetic_images(max(data.SYNTH_TRAIN, B), 0)
    args32 = decorr.parse_args(["--batch-size", str(B)])  # the default run: 32 px, resnet18 4096-256

    def row(pipeline, px, where, times, k=1):  # k batches per timed call
        sec = sum(times) / len(times) / k
        log(f"data: {pipeline}, {px} px, {where}: {B / sec:.0f} images/s")
        return dict(
            pipeline=pipeline, px=px, where=where, seconds_per_batch=sec, img_per_s=B / sec, times=times
        )

    # the two pipelines of this process take turns, under the same load; loader processes are timed
    # alone, as they work ahead while anything else runs
    k, batched = (
        max(1, data.AHEAD.get(device.type, 0) // B),
        data.batches(TensorDataset(images, labels), True, args32, device, 0, 10**9),
    )
    t = data_times(
        dict(
            batched=iter(lambda: [next(batched) for _ in range(k)], None),  # k batches at a time
            per_sample=DataLoader(PerSample(images), batch_size=B),
        ),
        device,
        a,
    )
    batched.close()
    rows = [
        row("data.batches, batched", 32, f"this process, {T} threads, {device.type}", t["batched"], k),
        row("torchvision v2, per sample", 32, f"this process, {T} threads", t["per_sample"]),
    ]
    t = data_times(dict(loaders=DataLoader(PerSample(images), batch_size=B, num_workers=T)), device, a)
    rows.append(row("torchvision v2, per sample", 32, f"{T} loader process(es), 1 thread each", t["loaders"]))
    with tempfile.TemporaryDirectory() as tmp:
        write_jpegs(tmp, B)
        args = decorr.parse_args(
            ["--data", tmp, "--batch-size", str(B), "--img-size", str(a.folder_size), "--workers", str(W)]
        )
        t = data_times(dict(folder=data.batches(data.Folder(tmp), False, args, device, 0, 10**9)), device, a)
        rows.append(
            row(
                "data.batches, JPEG folder",
                a.folder_size,
                f"{W} loader process(es), 1 thread each "
                f"(decode, crop) + this process (colour, {T} threads, {device.type})",
                t["folder"],
            )
        )

    log(f"data: training step of decorr.Model, resnet18 4096-256, 32 px, batch {B}, amp {a.amp}")
    times = measure(train_steps(args32, ["decorr"], device, a.amp), device, a.warmup, a.repeats, a.max_time)[
        "decorr"
    ]
    step = statistics.median(times)
    batched, per_sample = rows[0], max(rows[1:3], key=lambda r: r["img_per_s"])
    summary = dict(
        speedup_32px=batched["img_per_s"] / per_sample["img_per_s"],
        batched_img_per_s=batched["img_per_s"],
        per_sample_img_per_s=per_sample["img_per_s"],
        per_sample_where=per_sample["where"],
        folder_img_per_s=rows[3]["img_per_s"],
        folder_px=a.folder_size,
        train_img_per_s=B / step,
        step_s=step,
        batched_data_over_step=batched["seconds_per_batch"] / step,
        batch=B,
        threads=T,
        workers=W,
        amp=a.amp,
        device=device.type,
    )
    table = [
        [
            r["pipeline"],
            r["px"],
            r["where"],
            f"{r['img_per_s']:.0f}",
            ms(r["seconds_per_batch"]),
            f"{r['seconds_per_batch'] / step:.3f}" if r["px"] == 32 else "-",
        ]
        for r in rows
    ]
    table.append(
        [
            "training step: decorr.Model resnet18 4096-256",
            32,
            f"this process, {T} threads, {device.type}",
            f"{B / step:.1f}",
            ms(step),
            "1",
        ]
    )
    headers = ["pipeline", "px", "where", "images/s", f"ms per batch of {B}", "data / step"]
    notes = [
        f"An image is a pair of views; {os.cpu_count()} CPUs. Data: mean over up to {a.repeats} consecutive batches "
        f"after {a.warmup} warm-up (none after {a.max_time:g} s); step (decorr.train_step: forward, backward, LARS): "
        f"median, amp {a.amp}. data / step: decorr.py makes in-memory views between steps, in the training process, for "
        f"{k * B} images at a time ({k} batch(es): a timed run), so this is the share they add to a step; "
        "loader processes work beside it (on the same cores), above 1 it waits.",
        f"speedup_32px = batched images/s over the faster per-sample row: {summary['speedup_32px']:.1f} (target 4). "
        f"JPEG folder: {B} generated 400 x 300 and 300 x 400 images, view 1 blurred; its step is another model's.",
    ]
    return (
        dict(results=rows, train_step=dict(seconds=step, times=times), summary=summary),
        md_table(headers, table),
        notes,
    )


# ----------------------------------------------------------------------------- parts


def parts_bytes(B, W, D, k):
    """What decorr_loss sends per step and rank with k partitions of a global batch of B rows on W
    processes, float32, if the collectives are ring algorithms (an all-gather or a reduce-scatter
    of S bytes over g ranks sends (g-1)/g S from each, an all-reduce twice that). Returns
    (g: ranks per group holding whole parts, form, bytes).
    Gram form (part of m < D rows) over g > 1 ranks: per view, the forward all-gathers the group's
    g n x D predictions, the backward reduce-scatters their gradient. D x D form (m >= D): per view
    and part of the group, an all-reduce of its D x D matrix forward and of its gradient backward.
    g = 1 (k a multiple of W; k = W is Algorithm 1's layout): nothing."""
    n, m = B // W, B // k
    g = math.lcm(n, m) // n
    if m < D:
        return g, "Gram", 2 * 2 * (g - 1) * n * D * 4
    return g, "D x D", 2 * (g * n // m) * 2 * 2 * (g - 1) * D * D * 4 // g


def count_collectives(sent):
    """Makes the collectives decorr_loss calls (as dist.<name>) add to sent[0] the bytes this rank
    sends in them, by the ring rule of parts_bytes: a count independent of parts_bytes' layout."""
    size = lambda t: t.numel() * t.element_size()
    rules = dict(
        all_reduce=lambda g, t: 2 * (g - 1) * size(t) / g,
        all_gather_single=lambda g, out, x: (g - 1) * size(x),
        reduce_scatter_single=lambda g, out, x: (g - 1) * size(out),
    )
    for name, rule in rules.items():

        def counted(*args, _fn=getattr(dist, name), _rule=rule, **kw):
            sent[0] += _rule(dist.get_world_size(kw.get("group")), *args)
            return _fn(*args, **kw)

        setattr(dist, name, counted)


def parts_worker(rank, world, tmp, s):
    """One of `world` gloo processes: rows [rank n, (rank+1) n) of standardized features, the same W
    on every rank; per D and k: warm-up, one counted step, then timed steps between barriers (the
    slowest rank's time). Rank 0 writes the results to tmp/result.json."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(
        "gloo", init_method="file://" + os.path.join(tmp, "store"), rank=rank, world_size=world
    )
    sent, n, out = [0.0], s["batch"] // world, []
    count_collectives(sent)
    for D in s["dims"]:
        g = torch.Generator().manual_seed(rank)
        f1, f2 = (decorr.standardize(torch.randn(n, D, generator=g)).requires_grad_() for _ in range(2))
        w = torch.eye(D) + torch.randn(D, D, generator=torch.Generator().manual_seed(0)) / (10 * math.sqrt(D))
        w.requires_grad_()
        for k in s["parts"]:

            def step():  # between barriers: the slowest rank's time
                for t in (f1, f2, w):
                    t.grad = None
                dist.barrier()
                decorr.decorr_loss(f1, f2, w, parts=k)[0].backward()
                dist.barrier()

            for _ in range(s["warmup"]):
                step()
            sent[0], counted = 0.0, [None] * world
            step()
            dist.all_gather_object(counted, sent[0])
            times = measure(dict(step=step), torch.device("cpu"), 0, s["repeats"], math.inf)["step"]
            out.append(
                dict(D=D, parts=k, seconds=statistics.median(times), times=times, counted_bytes=max(counted))
            )
            if rank == 0:
                log(f"parts: D {D}, k {k}: {1e3 * out[-1]['seconds']:.0f} ms")
        del f1, f2, w
    if rank == 0:
        with open(os.path.join(tmp, "result.json"), "w") as fh:
            json.dump(out, fh)
    dist.barrier()
    dist.destroy_process_group()


def cmd_parts(a, device):
    log(f"parts: {a.world} gloo processes, global batch {a.batch}, D {a.dims}, k {a.parts}")
    spec = dict(batch=a.batch, dims=a.dims, parts=a.parts, warmup=a.warmup, repeats=a.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(parts_worker, args=(a.world, tmp, spec), nprocs=a.world, join=True)
        with open(os.path.join(tmp, "result.json")) as fh:
            measured = {(r["D"], r["parts"]): r for r in json.load(fh)}
    sizes = [(a.world, a.batch, D, k) for D in a.dims for k in a.parts]
    sizes += [
        s
        for s in ((PAPER["world"], PAPER["batch"], D, k) for D in PAPER["dims"] for k in PAPER["parts"])
        if s not in sizes
    ]
    results, table = [], []
    for W, B, D, k in sizes:
        g, form, nbytes = parts_bytes(B, W, D, k)
        r = measured.get((D, k)) if (W, B) == (a.world, a.batch) else None
        at_w = measured.get((D, W)) if r else None
        ddp = 2 * (W - 1) * D * D * 4 // W
        results.append(
            dict(
                r or {},
                world=W,
                batch=B,
                D=D,
                parts=k,
                ranks_per_part_group=g,
                form=form,
                bytes=nbytes,
                ddp_predictor_bytes=ddp,
            )
        )
        table.append(
            [
                W,
                B,
                B // W,
                D,
                k,
                B // k,
                g,
                form,
                f"{nbytes / MiB:.4g}",
                num(r and r["counted_bytes"] / MiB, ".4g"),
                f"{ddp / MiB:.4g}",
                ms(r and r["seconds"]),
                num(at_w and r["seconds"] / at_w["seconds"], ".2f"),
            ]
        )
    headers = [
        "W",
        "B",
        "n = B/W",
        "D",
        "k",
        "m = B/k",
        "ranks per part",
        "form",
        "MiB sent / rank / step",
        "counted",
        "DDP grad of W, MiB",
        "ms fwd+bwd",
        "time / time at k=W",
    ]
    cpus, threads = os.cpu_count() or 1, max(1, (os.cpu_count() or 1) // a.world)
    notes = [
        f"Rows with a time: {a.world} gloo processes of {threads} thread(s) on this machine's {cpus} CPUs"
        + (" (sharing them: a time includes waiting for a core)" if a.world * threads > cpus else "")
        + f", over loopback; forward + backward of decorr_loss alone, median of {a.repeats} steps after {a.warmup} "
        f"warm-up, between barriers. Other rows: computed only, the paper's batch {PAPER['batch']} on "
        f"{PAPER['world']} GPUs. MiB sent: by decorr_loss's collectives (parts_bytes: float32, ring algorithms); "
        "counted: that rule applied to the calls decorr_loss made in one step (largest over ranks).",
        "The same for every k, not in decorr_loss: DDP's all-reduce of the gradients (the predictor's in the "
        "table; the backbone's and projector's), standardize's all-reduce of 2 x 2 x D floats.",
    ]
    return dict(results=results), md_table(headers, table), notes


# ----------------------------------------------------------------------------- output and command line


def md_table(headers, rows):
    """A GitHub markdown table, columns padded; cells are str()-ed."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join(
        [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows]
    )


def num(x, spec):
    return "-" if x is None else format(x, spec)


def ms(seconds):
    return "-" if seconds is None else f"{seconds * 1e3:.1f}" if seconds < 10 else f"{seconds * 1e3:.0f}"


def mib(nbytes):
    return "-" if nbytes is None else f"{nbytes / MiB:.0f}"


def machine(device):
    with open("/proc/cpuinfo") as fh:
        cpu = next(
            (line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")),
            platform.machine(),
        )
    return dict(
        device=device.type,
        cpu=cpu,
        cpu_count=os.cpu_count(),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        python=platform.python_version(),
        load_average=os.getloadavg(),
        ram_bytes=os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"),
        gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    )


def positive(s):
    if not s.isdigit() or int(s) <= 0:
        raise argparse.ArgumentTypeError(f"{s!r} is not a positive integer")
    return int(s)


def positives(s):  # "1,8,32" -> [1, 8, 32]
    return [positive(x) for x in s.split(",")]


def projectors(s):
    for p in s.split(","):
        config.parse_proj(p)
    return s.split(",")


def splits(n, ks, name):
    for k in ks:
        if n % k:
            raise UsageError(f"{name} {n} does not split into {k} equal parts")


def parse_args(argv):
    p = config.Parser(
        prog="bench.py",
        description=__doc__.split("\n\n")[0].strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{loss,train,data,parts}")
    q = {name: sub.add_parser(name) for name in ("loss", "train", "data", "parts")}
    for name, s in q.items():
        s.add_argument("--json", metavar="PATH", help="also write settings, machine and results here")
        s.add_argument("--warmup", type=positive, help="untimed runs (default: CPU 1, GPU 3)")
        s.add_argument(
            "--repeats",
            "--steps",
            type=positive,
            help="timed rounds (default: CPU 3, data 10; GPU 10, train 20)",
        )
        if name != "parts":
            s.add_argument(
                "--max-time", type=float, help="seconds, then no new round (default: CPU 10, GPU 30)"
            )
        if name in ("train", "data"):
            s.add_argument(
                "--amp", choices=("bf16", "fp16", "none"), help="default: decorr.py's (bf16 where supported)"
            )
    add = lambda name, *opt, **kw: q[name].add_argument(*opt, **kw)
    add("loss", "--dims", type=positives, help="D values (default: CPU 2048,4096; GPU 2048,4096,8192)")
    add("loss", "--parts", type=positives, default=[1, 8, 32], help="partition counts (default 1,8,32)")
    add("loss", "--rows", type=positive, default=1024, help="rows (default 1024)")
    add("train", "--projs", type=projectors, default=["4096-256", "2048-2048-2048", "8192-8192-8192"])
    add("train", "--arch", choices=config.ARCHS, help="default: CPU resnet18, GPU resnet50")
    add("train", "--img-size", type=positive, help="default: CPU 32, GPU 224")
    add("train", "--batch", type=positive, help="images per step (default: CPU 64, GPU 256)")
    add("train", "--parts", type=positive, default=1, help="k, partitions of the batch (default 1)")
    add("data", "--batch", type=positive, default=256, help="images per batch (default 256, as decorr.py)")
    add(
        "data",
        "--threads",
        type=positive,
        default=torch.get_num_threads(),
        help=f"threads here, and per-sample loader processes (default {torch.get_num_threads()})",
    )
    add(
        "data",
        "--workers",
        type=int,
        default=max(0, min(10, (os.cpu_count() or 1) - 1)),
        help="data.batches' loader processes for the folder (default as decorr.py: CPUs - 1, at most 10)",
    )
    add("data", "--folder-size", type=positive, default=224, help="crop size for the folder (default 224)")
    add("parts", "--world", type=positive, default=PAPER["world"], help="processes W (default 8)")
    add("parts", "--batch", type=positive, default=PAPER["batch"], help="global batch B (default 2048)")
    add("parts", "--dims", type=positives, default=[2048], help="D values (default 2048)")
    add("parts", "--parts", type=positives, default=list(PAPER["parts"]), help="k values (default 1,2,8)")
    a = p.parse_args(argv)

    a.device = "cuda" if torch.cuda.is_available() and a.cmd != "parts" else "cpu"  # parts: gloo on CPUs
    gpu = a.device == "cuda"
    a.warmup = a.warmup or (3 if gpu else 1)
    a.repeats = a.repeats or ((20 if a.cmd == "train" else 10) if gpu else 10 if a.cmd == "data" else 3)
    if a.cmd != "parts":
        a.max_time = (30.0 if gpu else 10.0) if a.max_time is None else a.max_time
        if a.max_time <= 0:
            raise UsageError(f"--max-time must be positive, got {a.max_time:g}")
    if a.cmd in ("train", "data") and a.amp is None:  # decorr.py's default: bf16 where supported
        bf16 = (
            torch.cuda.is_bf16_supported()
            if gpu
            else getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        )
        a.amp = "bf16" if bf16 else "none"
    if a.cmd == "loss":
        a.dims = a.dims or ([2048, 4096, 8192] if gpu else [2048, 4096])
        splits(a.rows, a.parts, "--rows")
    if a.cmd == "train":
        a.arch = a.arch or ("resnet50" if gpu else "resnet18")
        a.img_size = a.img_size or (224 if gpu else 32)
        a.batch = a.batch or (256 if gpu else 64)
        splits(a.batch, [a.parts], "--batch")
    if a.cmd == "data" and a.workers < 0:
        raise UsageError(f"--workers must be 0 or more, got {a.workers}")
    if a.cmd == "parts":
        splits(a.batch, [a.world] + a.parts, "--batch")
    if a.json and not os.path.isdir(os.path.dirname(os.path.abspath(a.json))):
        raise UsageError(f"--json {a.json!r}: no such directory")
    return a


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parse_args(argv)
    device = torch.device(a.device)
    log(f"bench.py {a.cmd} on {device.type}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    t0 = time.time()
    data, table, notes = dict(loss=cmd_loss, train=cmd_train, data=cmd_data, parts=cmd_parts)[a.cmd](
        a, device
    )
    wall = time.time() - t0
    print(
        f"## bench.py {a.cmd}\n\n{table}\n\n"
        + "".join(f"- {n}\n" for n in notes)
        + f"- wall time {wall:.0f} s"
    )
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(
                dict(
                    command=a.cmd,
                    argv=argv,
                    settings=vars(a),
                    machine=machine(device),
                    wall_s=wall,
                    markdown=table,
                    notes=notes,
                    **data,
                ),
                fh,
                indent=1,
            )
    if "summary" in data:
        print(json.dumps(data["summary"]))
    return 0


def cli(argv=None):
    """main() with bad input reported as one line on stderr and exit code 2."""
    try:
        return main(argv)
    except UsageError as e:
        lines = str(e).strip().splitlines()
        print(f"bench.py: error: {lines[-1] if lines else 'bad input'}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
