"""Shared by the test files: a gloo process group for the tests that spawn processes."""

import datetime
import os
import signal

import torch
import torch.distributed as dist

import decorr


def init_gloo(rank, world, folder, seconds=120):
    """Join a gloo group of `world` processes that meet through a file in `folder`, one thread each."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method="file://" + os.path.join(folder, "store"),
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=seconds),
    )


def run_main(argv):
    """decorr.main(argv) in this process, its preemption signal handlers removed afterwards."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        decorr.main([str(a) for a in argv])
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
