"""
bench.py -- how fast and how lean is decorr.py's loss, and what share of a training step is it?

    python bench.py loss  [--dims 2048,4096[,8192]] [--parts 1,8,32] [--rows 1024] [--json PATH]
    python bench.py train [--projs 4096-256,2048-2048-2048,8192-8192-8192] [--arch resnet18]
                          [--img-size 32] [--batch 64] [--amp bf16|fp16|none] [--compile] [--json PATH]

loss   decorr.decorr_loss against algorithm1() below, a transcription of the paper's Algorithm 1
       (appendix F), for every D x parts: forward + backward time (median of repeats after a
       warm-up), peak memory, and the matmul bound, the time of the bare float32 products that
       decorr_loss cannot avoid, timed on the same machine in the same run (time / bound = 1 is
       the limit). Both losses are also evaluated on the same inputs and their values compared.
train  images/s (an image = a pair of views) and peak memory of a training step (forward,
       backward, plain SGD step, no momentum) per projector, in three variants: "decorr" (the
       model as decorr.py trains it), "algorithm1" (the head replaced by algorithm1()) and
       "no head" (backbone + projector, loss = sum of the outputs). head share =
       (t_variant - t_nohead) / t_variant.

Each loss configuration, and each projector of `train` (its three variants together), runs in a
fresh subprocess (`python bench.py _one SPEC`). Functions measured together are timed in rounds
(decorr_loss and its bound; the three training variants), so that a shared machine's changing
load hits them alike. A measurement is the median of up to --repeats / --steps runs after
--warmup runs, and stops early once --max-time seconds of runs are spent (at least one run); a
warm-up of --max-time or more is itself the one run (JSON: warmup_counted).

Peak memory is measured in a function's first run: torch.cuda.max_memory_allocated on a GPU; on a
CPU the peak resident set size (VmHWM, reset just before) minus the resident size then, with glibc
mapping every block of 64 KiB or more on allocation and unmapping it on free, so that RSS follows
the live tensors (mmap_threshold()); later runs use the 32 MiB threshold where glibc's default
settles. On a CPU a configuration whose predicted peak exceeds --mem-cap is not run and is
reported as OOM* (predicted); a child also gets an address-space limit of what it has + --mem-cap,
so that a wrong prediction ends in OOM, not in a machine out of memory. The load average before
and after a run is in the notes and the JSON: timings are only as good as the machine's idleness.

Defaults: on a CPU ResNet-18 at 32 px, 64 images per step; on a GPU the paper's ResNet-50 at
224 px, 256 images per GPU. Output: a markdown table on stdout, progress on stderr, and with
--json PATH a JSON file with the settings, the machine and every measurement.
"""
import argparse, json, math, os, platform, resource, signal, statistics, subprocess, sys, time

import torch
import torch.nn as nn

import decorr
from decorr import Parser, UsageError

GiB, MiB = 2**30, 2**20


# ----------------------------------------------------------------------------- the reference

def algorithm1(f1, f2, w, parts=1, inv_coef=1.0, cov_coef=1.0, wtw_per_part=False):
    """REFERENCE: Algorithm 1 of the paper (appendix F), part by part, as plain autograd code;
    returns (loss, inv, cov) normalised as decorr.decorr_loss. Part j (rows j*m:(j+1)*m) plays
    one GPU of Algorithm 1; data-parallel training averages the parts' losses, so inv and cov
    are means over parts (the mean of the per-part inv means is the whole batch's inv). W^T W is
    the same for every part and is computed once (wtw_per_part=True recomputes it per part, as
    k GPUs would: parts x D^3 more work, the same values). Float32, autocast off, like decorr_loss."""
    with torch.autocast(f1.device.type, enabled=False):
        f1, f2, w = f1.float(), f2.float(), w.float()
        n, D = f1.shape
        if n % parts:
            raise UsageError(f"{n} rows do not split into {parts} equal parts")
        m = n // parts
        wtw = None if wtw_per_part else w.T @ w
        inv = cov = 0.0
        for j in range(parts):
            a, b = f1[j * m:(j + 1) * m], f2[j * m:(j + 1) * m]
            p1, p2 = a @ w.T, b @ w.T
            inv_j = (p1 - b).pow(2).mean() + (p2 - a).pow(2).mean()
            wtw_j = w.T @ w if wtw_per_part else wtw
            cov1 = p1.T @ p1 / m
            cov2 = p2.T @ p2 / m
            cov_j = (cov1 - wtw_j).pow(2).sum() + (cov2 - wtw_j).pow(2).sum()
            inv, cov = inv + inv_j / parts, cov + cov_j / parts
        loss = inv_coef * inv + cov_coef / D * cov
    return loss, inv, cov


def check_reference(n=64, D=48, parts=4, inv_coef=25.0, cov_coef=2.0):
    """decorr_loss and algorithm1 agree (values and gradients) at a small size, so that the
    reference is trustworthy. Returns the largest relative difference."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, D, generator=g)
    f1 = decorr.standardize(x)
    f2 = decorr.standardize(x + 0.7 * torch.randn(n, D, generator=g))
    w0 = (torch.rand(D, D, generator=g) * 2 - 1) / math.sqrt(D)
    outs = []
    for fn in (decorr.decorr_loss, algorithm1):
        a, b, w = [t.clone().requires_grad_() for t in (f1, f2, w0)]
        loss, inv, cov = fn(a, b, w, parts, inv_coef, cov_coef)
        loss.backward()
        outs.append([loss, inv, cov, a.grad, b.grad, w.grad])
    err = max(((x - y).abs().max() / y.abs().max().clamp_min(1e-12)).item() for x, y in zip(*outs))
    return dict(rows=n, D=D, parts=parts, max_rel_err=err, ok=err < 1e-4)

# ----------------------------------------------------------------------------- measuring

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    """Seconds of fn(), or what fn returns where it times itself (a float)."""
    sync(device)
    t = time.perf_counter()
    r = fn()
    sync(device)
    return r if isinstance(r, float) else time.perf_counter() - t


def measure(fn, device, warmup, repeats, max_time):
    """Median seconds of fn() over up to `repeats` runs after `warmup` runs; stops repeating once
    max_time seconds are spent (at least one run); a warm-up run of max_time or more is used as
    the measurement. Returns (median, times, warmup_counted)."""
    r = measure_rounds(dict(fn=fn), device, warmup, repeats, max_time)["fn"]
    return r["seconds"], r["times"], r["warmup_counted"]


def measure_rounds(fns, device, warmup, repeats, max_time, before_first=None, after_first=None,
                   compiling=False, lockstep=False):
    """measure() for several functions {name: fn} at once: the warm-ups of each in turn, then
    timed runs in rounds (one run of each function per round), so that all see the same load on
    a shared machine. before_first(name) / after_first(name) bracket each function's first run
    (to read its peak memory). A function that runs out of memory is dropped with status oom.
    compiling=True: the first run compiles; it is never the measurement, and memory is read in the
    second run. lockstep=True: the rounds end for all as soon as one function is done, so that
    the functions timed in rounds have as many runs each (for per-round ratios).
    Returns {name: dict(status, seconds, times, warmup_counted)}."""
    out = {k: dict(status="ok", times=[], warmup_counted=False, runs=0) for k in fns}

    def run(k):
        first = out[k]["runs"] == (1 if compiling else 0)      # the run that measures memory
        if first and before_first:
            before_first(k)
        try:
            t = timed(fns[k], device)
        except Exception as e:
            if not is_oom(e):
                raise
            out[k].update(status="oom", error=str(e).strip().splitlines()[0][:200])
            return None
        finally:
            if first and after_first:
                after_first(k)
        out[k]["runs"] += 1
        return t

    for k in fns:
        for i in range(max(warmup, 1 if compiling else 0)):
            t = run(k)
            if t is None:
                break
            if t >= max_time and not (compiling and i == 0):
                out[k].update(times=[t], warmup_counted=True)
                break

    def active(k):
        r = out[k]
        return (r["status"] == "ok" and not r["warmup_counted"] and len(r["times"]) < max(1, repeats)
                and (not r["times"] or sum(r["times"]) < max_time))
    timed_ = [k for k in fns if out[k]["status"] == "ok" and not out[k]["warmup_counted"]]
    while any(active(k) for k in fns) and not (lockstep and not all(active(k) for k in timed_)):
        for k in fns:
            if active(k):
                t = run(k)
                if t is not None:
                    out[k]["times"].append(t)
    for r in out.values():
        r["seconds"] = statistics.median(r["times"]) if r["status"] == "ok" else None
        r["first_run_timed"] = r["warmup_counted"] or (warmup == 0 and not compiling)   # the memory run is timed
        del r["runs"]
    return out


def rss_bytes():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def vm_bytes():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def mmap_threshold(nbytes):
    """glibc: blocks of nbytes or more are mapped when allocated and unmapped when freed
    (mallopt M_MMAP_THRESHOLD, which also ends glibc's self-raising threshold), and free heap
    memory goes back to the system (malloc_trim). True where it took effect.

    By default glibc raises its threshold up to 32 MiB as mapped blocks are freed, and keeps freed
    blocks below it in the heap: RSS then overstates what a process holds (2.7x for Algorithm 1 at
    D = 2048, whose 16 MiB D x D matrices come and go). With 64 KiB, RSS follows the live tensors,
    like torch.cuda.max_memory_allocated; 32 MiB is where glibc's default settles, used to time."""
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        ok = libc.mallopt(-3, int(nbytes)) == 1 and libc.mallopt(-1, 2 * int(nbytes)) == 1   # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
        libc.malloc_trim(0)
        return ok
    except (OSError, AttributeError):
        return False


class Peak:
    """Peak memory from now on, in bytes beyond what is in use now: CUDA max allocated on a GPU;
    on a CPU VmHWM (peak RSS, reset here; ru_maxrss where the reset is refused) with live-memory
    allocation (mmap_threshold(64 KiB)) until done(), which sets glibc's default-like 32 MiB."""

    def __init__(self, device):
        self.device, self.value = device, None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.base = torch.cuda.memory_allocated(device)
            return
        self.live = mmap_threshold(64 * 1024)
        self.base = rss_bytes()
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self.hwm = True
        except OSError:
            self.hwm = False

    def done(self):
        """Reads the peak and ends live-memory allocation; returns the peak."""
        self.value = self.bytes()
        if self.device.type == "cpu":
            mmap_threshold(32 * MiB)
        return self.value

    def bytes(self):
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.base
        if self.hwm:
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024 - self.base
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base


def is_oom(e):
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    s = str(e).lower()
    return isinstance(e, RuntimeError) and ("can't allocate memory" in s or "out of memory" in s
                                            or "cannot allocate memory" in s)

# ----------------------------------------------------------------------------- one measurement (child)

def loss_inputs(n, D, device, seed=0):
    """Standardized features of two correlated views and a predictor weight with nn.Linear's
    default range (uniform +-1/sqrt(D)); all three require gradients, as in training."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g)
    f1 = decorr.standardize(x)
    f2 = decorr.standardize(x + 0.7 * torch.randn(n, D, generator=g))
    w = (torch.rand(D, D, generator=g) * 2 - 1) / math.sqrt(D)
    del x
    return [t.to(device).requires_grad_() for t in (f1, f2, w)]


def bound_products(n, D, parts):
    """The matrix products decorr_loss cannot avoid, forward and backward, as
    (name, count, op, operand shapes): p = f W^T and q = p W^T for both views (forward, and the
    backward products G W and G^T x), the per-part Gram P P^T (forward, and its two backward
    products), W^T W (forward, and one backward product: decorr.GramSquare's 4 W (W^T W))."""
    m = n // parts
    return [
        ("f W^T, p W^T, their grad-input G W", 8, "mm", (n, D), (D, D)),
        ("grad-weight G^T f, G^T p", 4, "mm", (D, n), (n, D)),
        ("W^T W and its backward W (W^T W)", 2, "mm", (D, D), (D, D)),
        ("Gram P P^T", 2, "bmm", (parts, m, D), (parts, D, m)),
        ("Gram backward G P", 2, "bmm", (parts, m, m), (parts, m, D)),
        ("Gram backward P^T G", 2, "bmm", (parts, D, m), (parts, m, m)),
    ]


class Bound:
    """The matmul bound: calling it times each distinct bare float32 product once and returns
    sum(count x seconds); self.last holds the products and their times. Operands are made on the
    first call."""

    def __init__(self, n, D, parts, device):
        self.products, self.device, self.operands, self.last = bound_products(n, D, parts), device, None, None

    def __call__(self):
        if self.operands is None:
            self.operands = {(op, sa, sb): (torch.randn(*sa, device=self.device), torch.randn(*sb, device=self.device))
                             for _, _, op, sa, sb in self.products}
        total, self.last = 0.0, []
        for name, count, op, sa, sb in self.products:
            a, b = self.operands[op, sa, sb]
            t = timed(lambda: (torch.bmm if op == "bmm" else torch.matmul)(a, b), self.device)
            total += count * t
            self.last.append(dict(product=name, count=count, shapes=[sa, sb], seconds_each=t))
        return total


def child_loss(s, device):
    """Forward + backward of one loss; for decorr_loss the matmul bound is timed in the same
    process, in alternation with the loss (ratio per round, median over rounds). Peak memory is
    that of the loss's first run, before any bound operand exists."""
    f1, f2, w = loss_inputs(s["rows"], s["D"], device)
    if s["method"] == "decorr_loss":
        fn = lambda: decorr.decorr_loss(f1, f2, w, s["parts"], s["inv_coef"], s["cov_coef"])
    else:
        fn = lambda: algorithm1(f1, f2, w, s["parts"], s["inv_coef"], s["cov_coef"], s["wtw_per_part"])
    out, peak = {}, {}

    def step():
        for t in (f1, f2, w):
            t.grad = None
        loss, inv, cov = fn()
        loss.backward()
        out.update(loss=loss.item(), inv=inv.item(), cov=cov.item())

    fns = dict(loss=step)
    if s["method"] == "decorr_loss":
        fns["bound"] = bound = Bound(s["rows"], s["D"], s["parts"], device)
    r = measure_rounds(fns, device, s["warmup"], s["repeats"], s["max_time"],
                       before_first=lambda k: k == "loss" and peak.setdefault(k, Peak(device)),
                       after_first=lambda k: k == "loss" and peak[k].done(), lockstep=True)
    if r["loss"]["status"] != "ok":
        return dict(r["loss"], peak_bytes=None)
    res = dict(r["loss"], peak_bytes=peak["loss"].value, live_memory=getattr(peak["loss"], "live", None),
               **out)
    if "bound" in r:
        b = r["bound"]
        res.update(bound_s=b["seconds"], bound_times=b["times"], bound_products=bound.last,
                   over_bound=statistics.median(x / y for x, y in zip(res["times"], b["times"])))
    return res


class Step(nn.Module):
    """One training-step loss for a decorr.Decorr model: variant decorr | algorithm1 | nohead."""

    def __init__(self, model, variant):
        super().__init__()
        self.model, self.variant = model, variant

    def forward(self, x1, x2):
        m, a = self.model, self.model.args
        if self.variant == "decorr":
            return m(x1, x2)[0]
        f1, f2 = m.projector(m.backbone(x1)), m.projector(m.backbone(x2))
        if self.variant == "nohead":
            return f1.float().sum() + f2.float().sum()
        f1, f2 = decorr.standardize(f1), decorr.standardize(f2)
        return algorithm1(f1, f2, m.predictor.weight, a.parts_per_device, a.inv_coef, a.cov_coef)[0]


def child_train(s, device):
    """Training steps of one decorr.Decorr model with each variant of the loss in turn (timed in
    rounds, see measure_rounds). A variant's peak memory is that of its first step, from a
    baseline of model, optimizer and inputs without gradients."""
    torch.manual_seed(0)
    args = decorr.parse_args(["--arch", s["arch"], "--img-size", str(s["img_size"]), "--proj", s["proj"],
                              "--batch-size", str(s["batch"]), "--partitions", str(s["parts"])])
    model = decorr.Decorr(args).to(device)
    model.backbone.to(memory_format=torch.channels_last)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-5)                  # plain SGD, no momentum: no state
    amp = dict(bf16=torch.bfloat16, fp16=torch.float16).get(s["amp"])
    scaler = torch.amp.GradScaler(device.type, enabled=s["amp"] == "fp16")
    g = torch.Generator().manual_seed(0)
    x1, x2 = [torch.randn(s["batch"], 3, s["img_size"], s["img_size"], generator=g)
              .to(device, memory_format=torch.channels_last) for _ in range(2)]

    def make_step(variant):
        mod = Step(model, variant)
        run = torch.compile(mod) if s["compile"] else mod

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss = run(x1, x2)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        return step

    peak = {}

    def before_first(k):
        opt.zero_grad(set_to_none=True)
        peak[k] = Peak(device)
    r = measure_rounds({v: make_step(v) for v in s["variants"]}, device, s["warmup"], s["steps"],
                       s["max_time"], before_first, lambda k: peak[k].done(), compiling=s["compile"])
    for k, v in r.items():
        v.update(peak_bytes=peak[k].value if v["status"] == "ok" else None,
                 live_memory=getattr(peak[k], "live", None),
                 img_per_s=s["batch"] / v["seconds"] if v["status"] == "ok" else None)
    return dict(variants=r)


def child_main(spec):
    """`bench.py _one SPEC`: one measurement; prints one JSON line (status ok | oom)."""
    s = json.loads(spec)
    device = torch.device(s["device"])
    if device.type == "cpu" and s.get("mem_cap"):
        torch.randn(512, 512) @ torch.randn(512, 512)   # start the thread pools before the limit
        torch.randn(1 << 20).exp().sum()
        limit = vm_bytes() + int(s["mem_cap"]) + 64 * MiB   # what exists + the cap + slack for stacks
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    run = dict(loss=child_loss, train=child_train)[s["kind"]]
    try:
        out = dict(dict(status="ok"), **run(s, device))
    except Exception as e:
        if not is_oom(e):
            raise
        out = dict(status="oom", error=str(e).strip().splitlines()[0][:200])
    out["threads"] = torch.get_num_threads()
    print(json.dumps(out), flush=True)

# ----------------------------------------------------------------------------- running children

def run_child(spec, log):
    """Runs one measurement in a fresh process; a child killed by the kernel (SIGKILL) counts as
    OOM, any other failure as an error with the child's last line of stderr."""
    log(f"  {spec['kind']}: " + ", ".join(f"{k}={spec[k]}" for k in ("method", "variants", "proj", "D", "parts")
                                         if k in spec))
    t = time.time()
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "_one", json.dumps(spec)],
                       capture_output=True, text=True)
    wall = time.time() - t
    lines = p.stdout.strip().splitlines()
    if p.returncode == 0 and lines:
        out = json.loads(lines[-1])
    elif p.returncode in (-signal.SIGKILL, 137):
        out = dict(status="oom", error="killed (out of memory?)")
    else:
        err = (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
        out = dict(status="error", error=err[:300])
    out["wall_s"] = round(wall, 2)
    if out["status"] != "ok":
        log(f"    -> {out['status']}: {out.get('error', '')}")
    return out


def predict_loss_bytes(method, n, D, parts):
    """Predicted peak bytes of one forward + backward beyond its inputs (fp32). Algorithm 1 keeps,
    for autograd, cov_v - W^T W (D x D) of both views for every part until the backward pass;
    decorr_loss keeps no D x D matrix per part, only W^T W and its gradients. Fitted to live-memory
    measurements at D = 2048, 4096 (JSON: predicted_peak_bytes next to peak_bytes)."""
    m = n // parts
    if method == "algorithm1":
        return 4 * ((2 * parts + 3) * D * D + 8 * n * D)
    return 4 * (4 * D * D + 8 * n * D + 4 * parts * m * m)


def input_bytes(n, D):
    return 4 * (D * D + 2 * n * D)


def predict_train_bytes(s):
    """Model, gradients, the head's D x D work; activations left to the address-space limit."""
    dims = decorr.parse_proj(s["proj"])
    D = dims[-1]
    params = 25e6 + sum(a * b for a, b in zip([2048] + dims, dims)) + D * D
    head = predict_loss_bytes("algorithm1" if s["variant"] == "algorithm1" else "decorr_loss",
                              s["batch"], D, s["parts"]) if s["variant"] != "nohead" else 0
    return int(4 * 2 * params + head)

# ----------------------------------------------------------------------------- output

def md_table(headers, rows):
    """A GitHub markdown table; cells are str()-ed."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def fmt_s(x):
    return "-" if x is None else f"{x * 1e3:.1f}" if x < 10 else f"{x * 1e3:.0f}"


def fmt_mib(r):
    if r is None:
        return "-"
    if r["status"] == "oom":
        return "OOM*" if r.get("predicted") else "OOM"
    if r["status"] != "ok":
        return "error"
    return f"{max(r['peak_bytes'], 0) / MiB:.0f}"


def cpu_model():
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def meminfo(key):
    """A /proc/meminfo field in bytes (None where there is none)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def machine(device):
    m = dict(device=device.type, cpu=cpu_model(), cpu_count=os.cpu_count(), ram_bytes=meminfo("MemTotal"),
             torch=torch.__version__, threads=torch.get_num_threads(), python=platform.python_version(),
             float32_matmul_precision=torch.get_float32_matmul_precision())
    if device.type == "cuda":
        m.update(gpu=torch.cuda.get_device_name(device),
                 gpu_memory_bytes=torch.cuda.get_device_properties(device).total_memory,
                 cuda=torch.version.cuda)
    return m

# ----------------------------------------------------------------------------- sub-commands

def not_run(need, cap):
    return dict(status="oom", predicted=True,
                error=f"predicted {need / GiB:.1f} GiB > --mem-cap {cap / GiB:.1f} GiB; not run")


def cmd_loss(a, device, log):
    check = check_reference()
    log(f"reference check (rows {check['rows']}, D {check['D']}, parts {check['parts']}): "
        f"max relative difference {check['max_rel_err']:.2e}")
    if not check["ok"]:
        raise RuntimeError(f"algorithm1 and decorr_loss disagree (relative difference "
                           f"{check['max_rel_err']:.2e}); the reference cannot be trusted")
    common = dict(kind="loss", device=str(device), rows=a.rows, warmup=a.warmup, repeats=a.repeats,
                  max_time=a.max_time, mem_cap=a.mem_cap if device.type == "cpu" else None,
                  inv_coef=a.inv_coef, cov_coef=a.cov_coef, wtw_per_part=a.ref_wtw == "per-part")
    results, table = [], []
    for D in a.dims or ([2048, 4096] if device.type == "cpu" else [2048, 4096, 8192]):
        for parts in a.parts:
            row = dict(D=D, parts=parts, rows=a.rows)
            for method in ("decorr_loss", "algorithm1"):
                pred = predict_loss_bytes(method, a.rows, D, parts)
                need = pred + input_bytes(a.rows, D)
                if device.type == "cpu" and need > a.mem_cap:
                    r = not_run(need, a.mem_cap)
                    log(f"  loss: method={method}, D={D}, parts={parts}\n    -> OOM*: {r['error']}")
                else:
                    r = run_child(dict(common, method=method, D=D, parts=parts), log)
                r["predicted_peak_bytes"] = pred
                row[method] = r
            ours, ref = row["decorr_loss"], row["algorithm1"]
            ok_o, ok_r = ours["status"] == "ok", ref["status"] == "ok"
            b = ours.get("bound_s")
            row.update(bound_s=b, ours_over_bound=ours.get("over_bound"),
                       ref_over_bound=ref["seconds"] / b if ok_r and b else None,
                       speedup=ref["seconds"] / ours["seconds"] if ok_o and ok_r else None,
                       memory_ratio=ref["peak_bytes"] / max(ours["peak_bytes"], 1) if ok_o and ok_r else None,
                       rel_diff=max(abs(ours[k] - ref[k]) / abs(ref[k]) for k in ("loss", "inv", "cov"))
                       if ok_o and ok_r else None)
            results.append(row)
            f = lambda x, spec: "-" if x is None else format(x, spec)
            table.append([D, parts, fmt_s(ours["seconds"]) if ok_o else fmt_mib(ours),
                          fmt_s(ref["seconds"]) if ok_r else fmt_mib(ref), f(row["speedup"], ".2f"),
                          fmt_s(b), f(row["ours_over_bound"], ".2f"), f(row["ref_over_bound"], ".2f"),
                          fmt_mib(ours), fmt_mib(ref), f(row["memory_ratio"], ".1f"), f(row["rel_diff"], ".1e")])
    headers = ["D", "parts", "decorr_loss ms", "Algorithm 1 ms", "speed-up", "matmul bound ms",
               "ours / bound", "Alg. 1 / bound", "ours peak MiB", "Alg. 1 peak MiB", "memory ratio",
               "rel. diff"]
    notes = [f"{a.rows} rows, forward + backward, float32, {device.type}; median of up to {a.repeats} runs after "
             f"{a.warmup} warm-up (at most {a.max_time:g} s of runs per measurement; a longer warm-up is the run). "
             f"Reference check (algorithm1 vs decorr_loss, values and gradients): max relative difference "
             f"{check['max_rel_err']:.1e}; rel. diff: the largest relative difference of loss, inv and cov "
             f"between the two on this row's inputs. Algorithm 1's W^T W: {a.ref_wtw}.",
             "matmul bound: the bare float32 products decorr_loss cannot avoid (forward and backward), timed in "
             "alternation with decorr_loss in its process; ours / bound is the median of the per-round ratios."]
    if device.type == "cpu":
        notes.append("peak: RSS above the inputs in the first run, allocated so that RSS follows the live "
                     "tensors (see mmap_threshold).")
    if any(r[m]["status"] == "oom" and r[m].get("predicted") for r in results for m in ("decorr_loss", "algorithm1")):
        notes.append(f"OOM*: predicted peak above --mem-cap {a.mem_cap / GiB:.1f} GiB (this machine: "
                     f"{(meminfo('MemTotal') or 0) / GiB:.1f} GiB RAM); not run. Predicted bytes are in the JSON.")
    return dict(reference_check=check, results=results), md_table(headers, table), notes


def cmd_train(a, device, log):
    common = dict(device=str(device), kind="train", arch=a.arch, img_size=a.img_size, batch=a.batch,
                  parts=a.parts, amp=a.amp, compile=a.compile, warmup=a.warmup, steps=a.steps,
                  max_time=a.max_time, mem_cap=a.mem_cap if device.type == "cpu" else None)
    names = dict(decorr="decorr", algorithm1="algorithm1", nohead="no head")
    results, table = [], []
    for proj in a.projs:
        by, run = {}, []
        for variant in names:
            need = predict_train_bytes(dict(common, proj=proj, variant=variant))
            if device.type == "cpu" and need > a.mem_cap:
                by[variant] = not_run(need, a.mem_cap)
                log(f"  train: variant={variant}, proj={proj}\n    -> OOM*: {by[variant]['error']}")
            else:
                run.append(variant)
        if run:
            r = run_child(dict(common, proj=proj, variants=run), log)
            for v in run:
                by[v] = dict(r["variants"][v], wall_s=r["wall_s"], threads=r["threads"]) if r["status"] == "ok" else r
        t0 = by["nohead"]["seconds"] if by["nohead"]["status"] == "ok" else None
        for variant, name in names.items():
            r = by[variant]
            t = r.get("seconds") if r["status"] == "ok" else None
            share = (t - t0) / t if t and t0 and variant != "nohead" else None
            results.append(dict(proj=proj, variant=variant, head_share=share, **r))
            table.append([proj, name, f"{r['img_per_s']:.1f}" if t else fmt_mib(r), fmt_s(t), fmt_mib(r),
                          "-" if share is None else f"{100 * share:.0f}%",
                          "-" if not t else f"{len(r['times'])}{' (warm-up)' if r['warmup_counted'] else ''}"])
    headers = ["projector", "variant", "images/s", "step ms", "peak MiB", "head share", "timed steps"]
    notes = [f"{a.arch}, {a.img_size} px, {a.batch} images (pairs of views) per step, partitions {a.parts}, "
             f"amp {a.amp}, compile {'on' if a.compile else 'off'}, {device.type}; a step is forward, backward "
             f"and a plain SGD update (no momentum); the variants of one projector share one process and "
             f"are timed in rounds; median of up to {a.steps} steps after {a.warmup} warm-up (at most "
             f"{a.max_time:g} s of steps each; a longer warm-up is the step). head share = (t - t_no_head) / t."]
    if device.type == "cpu":
        notes.append("peak: RSS above model, optimizer and inputs (no gradients) in a variant's first step, "
                     "allocated so that RSS follows the live tensors (see mmap_threshold).")
    return dict(results=results), md_table(headers, table), notes

# ----------------------------------------------------------------------------- command line

def int_list(name):
    def parse(s):
        try:
            v = [int(x) for x in s.split(",")]
        except ValueError:
            v = []
        if not v or min(v) <= 0:
            raise argparse.ArgumentTypeError(f"{s!r} is not a comma-separated list of positive integers")
        return v
    parse.__name__ = name
    return parse


def proj_list(s):
    v = [p.strip() for p in s.split(",") if p.strip()]
    if not v:
        raise UsageError(f"--projs {s!r}: no projector given")
    for p in v:
        decorr.parse_proj(p)
    return v


def parse_args(argv):
    p = Parser(prog="bench.py", description=__doc__.split("\n\n")[0].strip(),
               formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="cmd", metavar="{loss,train}")
    sub.required = True

    def common(q):
        q.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
        q.add_argument("--json", metavar="PATH", help="also write the results and the machine here")
        q.add_argument("--warmup", type=int, default=None, help="warm-up runs (default: CPU 1, GPU 3)")
        q.add_argument("--max-time", type=float, default=None,
                       help="seconds per measurement before repeats stop (default: CPU 10, GPU 30)")
        q.add_argument("--mem-cap", type=float, default=None,
                       help="CPU only: GiB one configuration may use, its inputs included "
                            "(default: min(16, 70%% of available RAM))")

    q = sub.add_parser("loss", help="decorr_loss vs Algorithm 1 vs the matmul bound")
    common(q)
    q.add_argument("--dims", type=int_list("dims"), default=None, help="D values (default: CPU 2048,4096; GPU 2048,4096,8192)")
    q.add_argument("--parts", type=int_list("parts"), default=[1, 8, 32], help="partitions per device (default 1,8,32)")
    q.add_argument("--rows", type=int, default=1024, help="rows (samples) per device (default 1024)")
    q.add_argument("--repeats", type=int, default=None, help="timed runs (default: CPU 3, GPU 10)")
    q.add_argument("--inv-coef", type=float, default=1.0, help="C_inv (default 1)")
    q.add_argument("--cov-coef", type=float, default=1.0, help="C_cov (default 1)")
    q.add_argument("--ref-wtw", choices=("once", "per-part"), default="once",
                   help="Algorithm 1's W^T W: once per step, or once per part as k GPUs compute it")

    q = sub.add_parser("train", help="training-step throughput: decorr, Algorithm 1 head, no head")
    common(q)
    q.add_argument("--projs", type=proj_list, default=None,
                   help="comma-separated projectors (default: 4096-256,2048-2048-2048,8192-8192-8192)")
    q.add_argument("--arch", default=None, help=f"{' | '.join(decorr.ARCHS)} (default: CPU resnet18, GPU resnet50)")
    q.add_argument("--img-size", type=int, default=None, help="default: CPU 32, GPU 224")
    q.add_argument("--batch", type=int, default=None, help="images per device and step (default: CPU 64, GPU 256)")
    q.add_argument("--parts", type=int, default=1, help="partitions per device (default 1)")
    q.add_argument("--amp", choices=("bf16", "fp16", "none"), default=None,
                   help="default: bf16 where supported, as decorr.py")
    q.add_argument("--compile", action="store_true", help="torch.compile the step")
    q.add_argument("--steps", type=int, default=None, help="timed steps (default: CPU 3, GPU 20)")

    a = p.parse_args(argv)
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device here")
    gpu = a.device == "cuda"
    a.warmup = (3 if gpu else 1) if a.warmup is None else a.warmup
    a.max_time = (30.0 if gpu else 10.0) if a.max_time is None else a.max_time
    if a.warmup < 0 or a.max_time <= 0:
        raise UsageError("--warmup must be >= 0 and --max-time > 0")
    if a.mem_cap is None:
        a.mem_cap = min(16 * GiB, 0.7 * (meminfo("MemAvailable") or 16 * GiB))
    elif a.mem_cap <= 0:
        raise UsageError(f"--mem-cap must be positive, got {a.mem_cap}")
    else:
        a.mem_cap *= GiB
    if a.cmd == "loss":
        a.repeats = (10 if gpu else 3) if a.repeats is None else a.repeats
        if a.rows <= 0 or a.repeats <= 0:
            raise UsageError("--rows and --repeats must be positive")
        bad = [k for k in a.parts if a.rows % k]
        if bad:
            raise UsageError(f"--rows {a.rows} does not split into {bad[0]} equal parts")
    else:
        a.projs = a.projs or ["4096-256", "2048-2048-2048", "8192-8192-8192"]
        a.arch = a.arch or ("resnet50" if gpu else "resnet18")
        a.img_size = a.img_size or (224 if gpu else 32)
        a.batch = a.batch or (256 if gpu else 64)
        a.steps = a.steps or (20 if gpu else 3)
        if a.arch not in decorr.ARCHS:
            raise UsageError(f"unknown --arch {a.arch!r}; choose one of {', '.join(decorr.ARCHS)}")
        for k in ("img_size", "batch", "parts", "steps"):
            if getattr(a, k) <= 0:
                raise UsageError(f"--{k.replace('_', '-')} must be positive, got {getattr(a, k)}")
        if a.batch % a.parts:
            raise UsageError(f"--batch {a.batch} does not split into --parts {a.parts} equal parts")
        if a.amp is None:
            bf16 = (torch.cuda.is_bf16_supported() if gpu else
                    getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
            a.amp = "bf16" if bf16 else "none"
    if a.json:
        folder = os.path.dirname(os.path.abspath(a.json))
        if not os.path.isdir(folder):
            raise UsageError(f"--json {a.json!r}: no such directory {folder!r}")
    return a


def main(argv=None):
    a = parse_args(sys.argv[1:] if argv is None else argv)
    device = torch.device(a.device)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    t0 = time.time()
    log(f"bench.py {a.cmd} on {device.type} ({cpu_model()}{', ' + torch.cuda.get_device_name() if device.type == 'cuda' else ''}), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    load0 = os.getloadavg()
    data, table, notes = (cmd_loss if a.cmd == "loss" else cmd_train)(a, device, log)
    wall = time.time() - t0
    load = dict(before=load0, after=os.getloadavg())
    notes.append(f"{torch.get_num_threads()} threads; load average (1 min) before {load0[0]:.1f}, after "
                 f"{load['after'][0]:.1f} on {os.cpu_count()} CPUs")
    settings = {k: v for k, v in vars(a).items() if k not in ("json",)}
    print(f"## bench.py {a.cmd}\n\n{table}\n\n" + "\n".join(f"- {n}" for n in notes) + f"\n- wall time {wall:.0f} s")
    if a.json:
        doc = dict(command=a.cmd, argv=sys.argv[1:] if argv is None else list(argv), settings=settings,
                   machine=machine(device), load_average=load, wall_s=wall, markdown=table, **data)
        tmp = a.json + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(doc, fh, indent=1)
        os.replace(tmp, a.json)
    errors = [r for r in data["results"] if r.get("status") == "error" or
              any(isinstance(r.get(m), dict) and r[m].get("status") == "error" for m in ("decorr_loss", "algorithm1"))]
    return 1 if errors else 0


def cli(argv=None):
    """main() with bad input as one line on stderr and exit code 2."""
    try:
        return main(argv)
    except UsageError as e:
        msg = str(e).strip().splitlines()
        print(f"bench.py: error: {msg[-1] if msg else 'bad input'}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "_one":
        child_main(sys.argv[2])
        sys.exit(0)
    sys.exit(cli())
