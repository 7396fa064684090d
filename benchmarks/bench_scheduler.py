"""forkmap_get against dask's threads and processes schedulers: cases 2, 4, 5 and 6 of ``report.py``.

    python benchmarks/bench_scheduler.py [--quick] [--rounds N] [--cases 2,4,5,6]

2. a big graph input shared by 16 reduction tasks;
4. GIL-bound pure Python tasks;
5. many small items in bag partitions (map_partitions);
6. leaky tasks: how much the computing process's memory grows.

All on 2 workers. Prints a Markdown table of medians and ratios to the threads scheduler;
``report.py`` runs these with the other cases.
"""

from __future__ import annotations

import functools
import gc
import mmap
import sys
from collections.abc import Callable

import dask
import dask.bag as db
import numpy as np
from _common import CaseResult, Config, MiB, Progress, cli, interleaved, raw_forks_in_pairs, rss, timed
from dask import delayed

from dask_forkmap import forkmap_get

THREADS = "dask threads"
FORKMAP = "forkmap_get"
PROCESSES = "dask processes"
CEILING = "2 raw forked children, half the tasks each (ceiling)"
CEILING_NOTE = (
    "ceiling: 2 children forked once each (raw fork + pipe + waitpid, from 2 threads), each running half "
    "the tasks one after another, with nothing scheduled: the best any design running the tasks in "
    "forked children can do on this host"
)


def computes(*collections: object) -> dict[str, Callable[[], float]]:
    """The three schedulers computing the same collections on 2 workers, as timed contenders."""

    def compute(scheduler: object) -> Callable[[], float]:
        return timed(lambda: dask.compute(*collections, scheduler=scheduler, num_workers=2))

    return {THREADS: compute("threads"), FORKMAP: compute(forkmap_get), PROCESSES: compute("processes")}


def shared_contenders(nbytes: int, tasks: int = 16) -> dict[str, Callable[[], float]]:
    """``tasks`` reductions over strided slices of one array held in the graph, and the best 2 forked
    children can do with them: forked once each, with half the reductions each, nothing scheduled."""
    big = np.random.default_rng(0).random(nbytes // 8)
    x = delayed(big, traverse=False)
    contenders = computes(*[delayed(np.sum)(x[i::tasks]) for i in range(tasks)])
    halves = [functools.partial(_sums, big, range(k, tasks, 2), tasks) for k in (0, 1)]
    contenders[CEILING] = timed(lambda: raw_forks_in_pairs(halves))
    return contenders


def _sums(big: np.ndarray, which: range, step: int) -> list[float]:
    return [float(np.sum(big[i::step])) for i in which]


def shared_input(cfg: Config, progress: Progress) -> CaseResult:
    """A big graph input shared by 16 reduction tasks."""
    result = CaseResult("dask threads")
    # dask's processes scheduler pickles the input into a worker for every task: 4-7 s per compute at
    # 64 MiB on the 2-core VM, 47 s at 0.5 GiB, and at 1 GiB it ran a 24 GiB machine out of memory.
    # So it runs at the small size only.
    small, big = cfg.size((64, 512), (4, 16))
    contenders = shared_contenders(small * MiB)
    result.add(f"{small} MiB input", interleaved(contenders, cfg.rounds(3), progress), THREADS)
    del contenders
    contenders = shared_contenders(big * MiB)
    del contenders[PROCESSES]
    result.add(f"{big} MiB input", interleaved(contenders, cfg.rounds(5), progress), THREADS)
    result.notes.append(f"dask processes is not run at {big} MiB: it pickles the whole input for every task")
    result.notes.append(CEILING_NOTE)
    return result


def spin(n: int) -> int:
    """Pure Python that holds the GIL throughout."""
    total = 0
    for i in range(n):
        total += i * i % 7
    return total


def gil_bound(cfg: Config, progress: Progress) -> CaseResult:
    """GIL-bound pure Python tasks."""
    count, n = cfg.size((8, 1_500_000), (4, 100_000))
    work = [delayed(spin)(n, dask_key_name=f"spin-{i}") for i in range(count)]
    contenders = computes(*work)
    halves = [functools.partial(_spins, n, len(range(k, count, 2))) for k in (0, 1)]
    contenders[CEILING] = timed(lambda: raw_forks_in_pairs(halves))
    result = CaseResult("dask threads")
    result.add(f"{count} x spin({n:_})", interleaved(contenders, cfg.rounds(5), progress), THREADS)
    result.notes.append(CEILING_NOTE)
    return result


def _spins(n: int, times: int) -> list[int]:
    return [spin(n) for _ in range(times)]


def bump_partition(items: list[int]) -> list[int]:
    return [x + 1 for x in items]


def bag_partitions(cfg: Config, progress: Progress) -> CaseResult:
    """Many small items via bag partitions."""
    n = cfg.size(200_000, 20_000)
    bag = db.from_sequence(range(n), partition_size=512).map_partitions(bump_partition)
    result = CaseResult("dask threads")
    group = f"{n:_} items, partition_size=512 ({bag.npartitions} partitions), map_partitions"
    result.add(group, interleaved(computes(bag), cfg.rounds(7), progress), THREADS)
    return result


# What leaky tasks leave behind, as a C extension's leak would: memory nobody frees.
_LEAKED: list[mmap.mmap] = []


def leak(nbytes: int) -> int:
    # An anonymous mapping rather than a Python object: freeing it at the end of a round returns it to
    # the system at once, while malloc would keep freed blocks and hide the next round's leak.
    m = mmap.mmap(-1, nbytes)
    for offset in range(0, nbytes, mmap.PAGESIZE):
        m[offset] = 1
    _LEAKED.append(m)
    return nbytes


def forget_leaks() -> None:
    for m in _LEAKED:
        m.close()
    _LEAKED.clear()
    gc.collect()


def leaky_tasks(cfg: Config, progress: Progress) -> CaseResult:
    """Leaky tasks: growth of the computing process's RSS."""
    count, mib = cfg.size((32, 8), (8, 4))
    tasks = [delayed(leak)(mib * MiB, dask_key_name=f"leak-{i}") for i in range(count)]

    def growth(compute: Callable[[], float]) -> Callable[[], float]:
        def run() -> float:
            before = rss()
            compute()
            return (rss() - before) / MiB

        return run

    contenders = {name: growth(fn) for name, fn in computes(*tasks).items()}
    result = CaseResult("dask threads")
    samples = interleaved(contenders, cfg.rounds(3), progress, between=forget_leaks)
    result.add(f"{count} tasks leaking {mib} MiB each", samples, THREADS, unit="MiB")
    result.notes.append(
        "the leaks are forgotten between measurements; with dask processes they stay in the pool's "
        "workers, which exit at the end of the compute"
    )
    return result


CASES = {2: shared_input, 4: gil_bound, 5: bag_partitions, 6: leaky_tasks}


def main(argv: list[str] | None = None) -> int:
    return cli(CASES, __file__, __doc__ or "", argv)


if __name__ == "__main__":
    sys.exit(main())
