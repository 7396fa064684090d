"""fork_map and ForkExecutor against the raw fork floor and an in-process copy, in one run.

    python benchmarks/bench_core.py [--rounds N] [--calls N] [--mib N]

Cases (medians over rounds; each round times all contenders back to back, so drift in machine load
hits them alike):

1. tiny task, per call: a raw ``fork`` + pipe + ``pickle`` + ``waitpid`` written inline (the floor),
   ``fork_map``, and ``ForkExecutor(2)`` throughput;
2. a big array result: an in-process ``copy()`` of it (the reference), ``fork_map`` returning it,
   and a raw fork that pickles it through a pipe (what a pipe-only transport costs).

Prints a Markdown table of medians and ratios to each case's reference.
"""

from __future__ import annotations

import argparse
import os
import pickle
import platform
import statistics
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

import dask  # noqa: F401  - the floor is measured with the same modules loaded as fork_map
import numpy as np

from dask_forkmap import ForkExecutor, fork_map
from dask_forkmap._core import _reaper

MiB = 1024 * 1024


def raw_fork(fn: Callable[[], Any]) -> Any:
    """The floor: fork, pickle the result into a pipe with a length prefix, read it, waitpid."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            data = pickle.dumps(fn(), protocol=5)
            os.write(w, struct.pack("<Q", len(data)))
            view = memoryview(data)
            while view:
                view = view[os.write(w, view) :]
        finally:
            os._exit(0)
    os.close(w)
    (n,) = struct.unpack("<Q", os.read(r, 8))
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = os.readv(r, [view[got:]])
        got += k
    os.close(r)
    os.waitpid(pid, 0)
    return pickle.loads(buf)


def per_call(fn: Callable[[], Any], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def once(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def executor_per_task(ex: ForkExecutor, calls: int) -> float:
    start = time.perf_counter()
    for _ in ex.map(abs, range(calls)):
        pass
    return (time.perf_counter() - start) / calls


def run(rounds: int, calls: int, mib: int) -> list[tuple[str, str, float, float]]:
    tiny: dict[str, list[float]] = {"raw": [], "fork_map": [], "ForkExecutor(2)": []}
    big: dict[str, list[float]] = {"copy": [], "fork_map": [], "raw pipe": []}
    with ForkExecutor(2) as ex:
        executor_per_task(ex, 20)  # start the slot threads
        for _ in range(rounds):
            tiny["raw"].append(per_call(lambda: raw_fork(lambda: 42), calls))
            tiny["fork_map"].append(per_call(lambda: fork_map(lambda: 42), calls))
            tiny["ForkExecutor(2)"].append(executor_per_task(ex, calls))
            _reaper.wait(timeout=60)
    # Only now: a big array in the parent makes every fork copy more page tables.
    source = np.random.default_rng(0).random(mib * MiB // 8)
    for _ in range(rounds):
        big["copy"].append(once(lambda: source.copy()))
        big["fork_map"].append(once(lambda: fork_map(lambda: source)))
        _reaper.wait(timeout=60)
        big["raw pipe"].append(once(lambda: raw_fork(lambda: source)))
    rows = []
    floor = statistics.median(tiny["raw"])
    for name, times in tiny.items():
        med = statistics.median(times)
        rows.append(("tiny task, per call", name, med, med / floor))
    ref = statistics.median(big["copy"])
    for name, times in big.items():
        med = statistics.median(times)
        rows.append((f"{mib} MiB array result", name, med, med / ref))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=200, help="tiny calls per round and contender")
    parser.add_argument("--mib", type=int, default=256, help="size of the big result")
    args = parser.parse_args()
    rows = run(args.rounds, args.calls, args.mib)
    print(
        f"{platform.node()}: {os.cpu_count()} CPUs, Linux {platform.release()}, "
        f"CPython {platform.python_version()}, numpy {np.__version__}, {args.rounds} rounds\n"
    )
    print("| case | contender | median | ratio to the case's first row |")
    print("|---|---|---|---|")
    for case, name, med, ratio in rows:
        print(f"| {case} | {name} | {med * 1000:.2f} ms | {ratio:.2f}x |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
