"""Inputs of any kind reach the child without pickling; nothing the child does reaches back."""

from __future__ import annotations

import gc
import os
import threading
from pathlib import Path

import dask
import numpy as np
import pytest

from dask_forkmap import fork_map, with_limits

MiB = 1024 * 1024
COUNTER = {"calls": 0}
_leaks: list[bytearray] = []


def test_the_rust_crates_example() -> None:
    value = 12
    assert fork_map(lambda: value * 10) == value * 10


def test_arguments_and_keyword_arguments() -> None:
    def f(a: int, b: int, *, c: int = 0) -> tuple[int, int, int]:
        return a, b, c

    assert fork_map(f, 1, 2, c=3) == (1, 2, 3)
    assert fork_map(f, 1, b=2) == (1, 2, 0)


def test_user_keywords_named_like_limits_go_to_the_function() -> None:
    def f(*, timeout: float, memory_limit: str) -> tuple[float, str]:
        return timeout, memory_limit

    assert fork_map(f, timeout=1.5, memory_limit="x") == (1.5, "x")
    assert fork_map(with_limits(f, timeout=30), timeout=2.5, memory_limit="y") == (2.5, "y")


def test_unpicklable_inputs_work() -> None:
    lock = threading.Lock()
    generator = (i for i in range(3))
    local_class = type("Local", (), {"x": 5})
    assert fork_map(lambda: (lock.acquire(timeout=5), next(generator), local_class.x)) == (True, 0, 5)
    assert not lock.locked()  # the child's acquire stayed in the child


def test_open_files_are_inherited(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_text("line one\nline two\n")
    with open(path) as f:
        assert fork_map(lambda: os.pread(f.fileno(), 100, 0)) == b"line one\nline two\n"


def test_large_inputs_are_not_copied() -> None:
    big = np.ones(256 * MiB // 8)
    # A 64 MiB memory limit proves nothing of the 256 MiB input was copied into the child.
    assert fork_map(with_limits(lambda: float(big.sum()), memory_limit="64 MiB")) == big.size


def test_global_mutation_stays_in_the_child() -> None:
    def mutate() -> int:
        COUNTER["calls"] += 1
        return COUNTER["calls"]

    assert [fork_map(mutate) for _ in range(3)] == [1, 1, 1]
    assert COUNTER["calls"] == 0


def test_closing_a_parent_file_stays_in_the_child(tmp_path: Path) -> None:
    path = tmp_path / "keep-open.txt"
    with open(path, "w+") as f:
        fork_map(f.close)
        fork_map(os.close, f.fileno())
        f.write("still open")
        f.flush()
    assert path.read_text() == "still open"


def test_dask_config_changes_stay_in_the_child() -> None:
    fork_map(lambda: dask.config.set({"forkmap-test-key": 1}))
    assert dask.config.get("forkmap-test-key", None) is None


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_leaks_stay_in_the_child() -> None:
    def leak_100_mb() -> int:
        block = bytearray(100 * MiB)
        block[::4096] = b"x" * len(block[::4096])  # touch every page
        _leaks.append(block)
        return len(_leaks)

    gc.collect()
    before = _rss()
    counts = [fork_map(leak_100_mb) for _ in range(50)]
    gc.collect()
    after = _rss()
    assert counts == [1] * 50
    assert _leaks == []
    assert after - before < 50 * MiB, f"parent RSS grew by {(after - before) / MiB:.0f} MiB"


@pytest.mark.parametrize("n", [1, 2])
def test_nested_fork_map(n: int) -> None:
    # A task may itself use fork_map: the child starts with fresh dask_forkmap state.
    def outer() -> list[int]:
        return [fork_map(lambda i=i: os.getpid() * 0 + i) for i in range(n)]

    assert fork_map(outer) == list(range(n))


def test_a_task_can_use_the_threads_scheduler_the_parent_used() -> None:
    # The child inherits dask's thread pool objects but not their threads; without the reset in the
    # after-fork hook this compute would wait forever (bounded here by the child's timeout).
    total = dask.delayed(sum)([1, 2, 3])
    assert total.compute(scheduler="threads") == 6
    assert total.compute(scheduler="threads", num_workers=2) == 6
    assert fork_map(with_limits(lambda: total.compute(scheduler="threads"), timeout=60)) == 6
    assert fork_map(with_limits(lambda: total.compute(scheduler="threads", num_workers=2), timeout=60)) == 6


def _tokenize_lock() -> threading.RLock:
    from dask import tokenize

    return tokenize.tokenize_lock  # type: ignore[attr-defined, no-any-return]


def _dask_array_random_lock() -> threading.Lock:
    import dask.array.random

    return dask.array.random._cached_states_lock  # type: ignore[attr-defined, no-any-return]


@pytest.mark.parametrize(
    ("lock", "use"),
    [
        pytest.param(
            lambda: np.random.mtrand._rand._bit_generator.lock,
            lambda: len(np.random.choice(np.arange(10), size=5)),
            id="numpy-global-random",
        ),
        pytest.param(
            lambda: dask.config.config_lock,
            lambda: len(dask.config.set({"forkmap-test-key": 1}).config),
            id="dask-config",
        ),
        pytest.param(_tokenize_lock, lambda: len(dask.base.tokenize(np.arange(5))), id="dask-tokenize"),
        pytest.param(
            _dask_array_random_lock,
            lambda: int(dask.array.random.random(5, chunks=5).compute(scheduler="sync").size),  # module-level API
            id="dask-array-random",
        ),
    ],
)
def test_a_library_lock_another_thread_holds_at_the_fork_is_free_in_the_child(lock, use) -> None:  # type: ignore[no-untyped-def]
    # A distributed worker's own threads take numpy's global random lock (dask's sizeof samples with
    # np.random.choice) while tasks fork; the child used to wait forever on the first call taking it.
    held, done = threading.Event(), threading.Event()
    the_lock = lock()

    def hold() -> None:
        with the_lock:
            held.set()
            done.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(60)
        assert fork_map(with_limits(use, timeout=30)) > 0
    finally:
        done.set()
        holder.join(60)
    assert not holder.is_alive()
