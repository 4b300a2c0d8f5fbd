"""Shared by the test files: a gloo process group for the tests that spawn processes, and the signals
of the pytest process. SIGTERM stops the suite as Ctrl-C does (pytest reports the interruption, a
test's child processes are killed); decorr.main run in this process catches SIGUSR1 only, so that
SIGTERM and Ctrl-C stay pytest's and no test result depends on a signal meant for pytest."""

import datetime
import os
import signal

import pytest
import torch
import torch.distributed as dist

import decorr


def stop_the_suite(number, frame):
    raise KeyboardInterrupt(f"signal {number}: the test suite stops")


signal.signal(signal.SIGTERM, stop_the_suite)
CATCH_STOP_SIGNALS = decorr.catch_stop_signals


@pytest.fixture(autouse=True)
def runs_in_pytest_catch_sigusr1_only(monkeypatch):
    """decorr.main in this process stops on SIGUSR1, which the tests send themselves; the tests of
    SIGTERM and Ctrl-C run decorr.py in a process of its own."""
    monkeypatch.setattr(decorr, "catch_stop_signals", lambda: CATCH_STOP_SIGNALS((signal.SIGUSR1,)))


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
    """decorr.main(argv) in this process, its signal handlers removed afterwards even if it raises."""
    handlers = {s: signal.getsignal(s) for s in decorr.STOP_SIGNALS}
    try:
        decorr.main([str(a) for a in argv])
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
