"""ForkExecutor: the concurrent.futures contract, plus killing what is left."""

from __future__ import annotations

import fcntl
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import CancelledError, wait
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import pytest
from procs import open_fds, wait_gone

from dask_forkmap import ChildCrashed, ExecutorShutdown, ForkExecutor, TaskTimeoutError, _core, fork_map, with_limits


def test_submit_and_result() -> None:
    with ForkExecutor(2) as ex:
        assert ex.submit(pow, 2, 10).result(timeout=60) == 1024
        assert ex.submit(lambda *, k: k * 2, k=21).result(timeout=60) == 42
        assert ex._max_workers == ex.max_workers == 2


def test_map_keeps_order_with_and_without_chunks() -> None:
    with ForkExecutor(2) as ex:
        assert list(ex.map(pow, range(20), [2] * 20, timeout=60)) == [i**2 for i in range(20)]
        assert list(ex.map(pow, range(20), [2] * 20, chunksize=6, timeout=60)) == [i**2 for i in range(20)]


def test_a_chunk_runs_in_one_child() -> None:
    with ForkExecutor(2) as ex:
        pids = list(ex.map(lambda _: os.getpid(), range(12), chunksize=4, timeout=60))
    assert [len(set(pids[i : i + 4])) for i in range(0, 12, 4)] == [1, 1, 1]
    assert len(set(pids)) == 3
    assert os.getpid() not in pids


def test_map_raises_the_failing_items_error_in_order() -> None:
    with ForkExecutor(2) as ex:
        results = ex.map(lambda x: 10 // x, [5, 2, 0, 1], chunksize=2, timeout=60)
        assert next(results) == 2
        assert next(results) == 5
        with pytest.raises(ZeroDivisionError):
            next(results)


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="max_workers must be a positive int, not 0"):
        ForkExecutor(0)
    with pytest.raises(TypeError, match=r"max_workers must be a positive int, not float \(2.5\)"):
        ForkExecutor(2.5)  # type: ignore[arg-type]
    with ForkExecutor(1) as ex, pytest.raises(ValueError, match="chunksize"):
        ex.map(abs, [1], chunksize=0)


def test_never_more_children_than_max_workers(tmp_path: Path) -> None:
    counter = tmp_path / "counter"
    counter.write_text("0 0")

    def count(delta: int) -> None:
        # Count live tasks in a file, under a file lock: the children share no memory.
        with open(counter, "r+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            now, peak = map(int, f.read().split())
            f.seek(0)
            f.truncate()
            f.write(f"{now + delta} {max(peak, now + delta)}")

    def task(_: int) -> None:
        count(+1)
        for _ in range(200_000):  # a little work, so the tasks overlap
            pass
        count(-1)

    with ForkExecutor(3) as ex:
        list(ex.map(task, range(60), timeout=120))
    now, peak = map(int, counter.read_text().split())
    assert now == 0
    assert 1 <= peak <= 3


def test_submitting_from_many_threads() -> None:
    results: dict[int, int] = {}
    with ForkExecutor(2) as ex:

        def submitter(base: int) -> None:
            futures = {base + i: ex.submit(abs, -(base + i)) for i in range(25)}
            for key, fut in futures.items():
                results[key] = fut.result(timeout=120)

        threads = [threading.Thread(target=submitter, args=(100 * t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert results == {100 * t + i: 100 * t + i for t in range(8) for i in range(25)}


def _started_blocked_task(pid_w: int, go_r: int):  # type: ignore[no-untyped-def]
    def task() -> str:
        os.write(pid_w, f"{os.getpid()}\n".encode())
        os.read(go_r, 1)
        return "finished"

    return task


def _read_pids(pid_r: int, n: int) -> list[int]:
    data = b""
    while data.count(b"\n") < n:
        assert select.select([pid_r], [], [], 60)[0], "tasks did not start"
        data += os.read(pid_r, 100)
    return [int(x) for x in data.split()]


def test_cancel_kills_a_running_child() -> None:
    pid_r, pid_w = os.pipe()
    go_r, go_w = os.pipe()
    with ForkExecutor(1) as ex:
        future = ex.submit(_started_blocked_task(pid_w, go_r))
        (pid,) = _read_pids(pid_r, 1)
        assert future.cancel()
        with pytest.raises(CancelledError):
            future.result(timeout=60)
        assert ex.submit(abs, -3).result(timeout=60) == 3  # the slot carries on
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    for fd in (pid_r, pid_w, go_r, go_w):
        os.close(fd)


def _start_a_grandchild_and_block(pid_w: int, go_r: int):  # type: ignore[no-untyped-def]
    def task() -> str:
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        os.write(pid_w, f"{grandchild.pid}\n".encode())
        os.read(go_r, 1)
        return "finished"

    return task


def _assert_gone_then_clean_up(grandchildren: list[int]) -> None:
    try:
        # Killed with the child's process group; a mere kill of the child would leave them to init.
        deadline = time.monotonic() + 30
        left = [pid for pid in grandchildren if not wait_gone(pid, max(0.0, deadline - time.monotonic()))]
        assert not left, f"grandchildren outlived their killed child: {left}"
    finally:
        for pid in grandchildren:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_cancel_kills_the_childs_process_group() -> None:
    pid_r, pid_w = os.pipe()
    go_r, go_w = os.pipe()
    with ForkExecutor(1) as ex:
        future = ex.submit(_start_a_grandchild_and_block(pid_w, go_r))
        grandchildren = _read_pids(pid_r, 1)
        assert future.cancel()
        _assert_gone_then_clean_up(grandchildren)
    for fd in (pid_r, pid_w, go_r, go_w):
        os.close(fd)


def test_shutdown_with_cancel_futures_kills_the_process_groups() -> None:
    pid_r, pid_w = os.pipe()
    go_r, go_w = os.pipe()
    ex = ForkExecutor(2)
    futures = [ex.submit(_start_a_grandchild_and_block(pid_w, go_r)) for _ in range(2)]
    grandchildren = _read_pids(pid_r, 2)
    ex.shutdown(wait=True, cancel_futures=True)
    assert all(f.cancelled() for f in futures)
    _assert_gone_then_clean_up(grandchildren)
    for fd in (pid_r, pid_w, go_r, go_w):
        os.close(fd)


def test_shutdown_with_cancel_futures_kills_and_reaps_everything() -> None:
    pid_r, pid_w = os.pipe()
    go_r, go_w = os.pipe()
    ex = ForkExecutor(2)
    running = [ex.submit(_started_blocked_task(pid_w, go_r)) for _ in range(2)]
    queued = [ex.submit(abs, 1) for _ in range(5)]
    pids = _read_pids(pid_r, 2)
    ex.shutdown(wait=True, cancel_futures=True)
    assert all(f.cancelled() for f in running + queued)
    for pid in pids:
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
    with pytest.raises(ExecutorShutdown, match="after shutdown"):
        ex.submit(abs, 1)
    for fd in (pid_r, pid_w, go_r, go_w):
        os.close(fd)


def test_context_manager_kills_what_is_left_on_keyboard_interrupt() -> None:
    pid_r, pid_w = os.pipe()
    go_r, go_w = os.pipe()
    with pytest.raises(KeyboardInterrupt), ForkExecutor(2) as ex:  # noqa: PT012
        futures = [ex.submit(_started_blocked_task(pid_w, go_r)) for _ in range(2)]
        pids = _read_pids(pid_r, 2)
        raise KeyboardInterrupt
    assert all(f.cancelled() for f in futures)
    for pid in pids:
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
    for fd in (pid_r, pid_w, go_r, go_w):
        os.close(fd)


def test_context_manager_waits_for_work_on_normal_exit() -> None:
    with ForkExecutor(2) as ex:
        futures = [ex.submit(sum, range(i)) for i in range(10)]
    _, not_done = wait(futures, timeout=0)
    assert not not_done
    assert [f.result() for f in futures] == [sum(range(i)) for i in range(10)]


def test_crash_fails_only_its_own_future() -> None:
    with ForkExecutor(2) as ex:
        futures = [ex.submit(os._exit, 1) if i == 3 else ex.submit(abs, -i) for i in range(8)]
        for i, fut in enumerate(futures):
            if i == 3:
                with pytest.raises(ChildCrashed):
                    fut.result(timeout=60)
            else:
                assert fut.result(timeout=60) == i


def test_executor_limits_and_with_limits_override() -> None:
    with ForkExecutor(1, timeout=0.5) as ex:
        with pytest.raises(TaskTimeoutError) as info:
            ex.submit(time.sleep, 30).result(timeout=60)
        assert info.value.timeout == 0.5
        assert ex.submit(with_limits(lambda: "long enough", timeout=30)).result(timeout=60) == "long enough"


def test_dask_accepts_it_as_a_scheduler() -> None:
    x = da.arange(1000, chunks=100)
    with ForkExecutor(2) as ex:
        (total,) = dask.compute((x * 2).sum(), scheduler=ex)
    assert total == np.arange(1000).sum() * 2


def _blocked_signals(status: str) -> set[int]:
    """The signal numbers a /proc ``status`` file lists as blocked (SigBlk, bit n-1 is signal n)."""
    with open(status) as f:
        mask = int(next(line for line in f if line.startswith("SigBlk:")).split()[1], 16)
    return {n for n in range(1, 65) if mask >> (n - 1) & 1}


def test_slot_threads_leave_signals_to_the_main_thread() -> None:
    # A Ctrl-C taken by a slot thread asleep in poll() would never wake a main thread asleep in
    # Future.result(): slots block process-directed signals. Their children get the user's mask back.
    main_mask = _blocked_signals("/proc/thread-self/status")
    assert signal.SIGINT not in main_mask
    with ForkExecutor(1, thread_name_prefix="sigmask-probe") as ex:
        child_mask = ex.submit(_blocked_signals, "/proc/thread-self/status").result(timeout=60)
        (slot,) = [t for t in threading.enumerate() if t.name.startswith("sigmask-probe")]
        slot_mask = _blocked_signals(f"/proc/self/task/{slot.native_id}/status")
    assert {signal.SIGINT, signal.SIGTERM, signal.SIGALRM, signal.SIGCHLD} <= slot_mask
    assert signal.SIGSEGV not in slot_mask  # a fault in a blocked thread would hang, not crash
    assert child_mask == main_mask


def test_fork_map_on_the_main_thread_gives_its_signal_mask_back() -> None:
    # fork_map holds signals on the main thread from before the fork until it can kill the child on
    # a Ctrl-C; the child and the caller both end up with the caller's own mask, whatever it is.
    assert threading.current_thread() is threading.main_thread()
    extra = {signal.SIGUSR2}
    before = signal.pthread_sigmask(signal.SIG_BLOCK, extra)
    try:
        mine = _blocked_signals("/proc/thread-self/status")
        child_mask = fork_map(_blocked_signals, "/proc/thread-self/status")
        after = _blocked_signals("/proc/thread-self/status")
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
    assert signal.SIGUSR2 in mine
    assert signal.SIGINT not in mine
    assert child_mask == mine
    assert after == mine


def test_ctrl_c_never_leaves_a_lock_held() -> None:
    # CPython 3.14 runs a pending signal handler right after a C lock's __enter__ returns, before
    # the with block's handler is set up: a KeyboardInterrupt there left a plain Lock held and the
    # next fork or submit hung for good (about 1 Ctrl-C in 20 in a loop like the one below).
    from dask_forkmap._scheduler import _Options, _Run

    run = _Run(_Options(1, None, None, None, None), {}, rerun=False)
    try:
        locks = [_core._fork_lock, _core._reaper._lock, run.lock, run.executor._lock]
    finally:
        run.close(failed=False)
    assert all(isinstance(lock, _core.SignalSafeLock) for lock in locks)
    lock = _core._fork_lock

    main = threading.get_ident()
    ask_r, ask_w = os.pipe()

    def press_ctrl_c() -> None:
        jitter = random.Random(0)
        while os.read(ask_r, 1):
            # Not a wait for anything: it spreads where the signal lands over the loop below,
            # which it would otherwise mostly reach on the os.write that asked for it.
            time.sleep(jitter.uniform(0, 0.001))
            signal.pthread_kill(main, signal.SIGINT)

    def on_sigint(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    presser = threading.Thread(target=press_ctrl_c, daemon=True)
    previous = signal.signal(signal.SIGINT, on_sigint)
    presser.start()
    interrupts = 0
    try:
        for _ in range(300):
            try:
                os.write(ask_w, b"x")  # the Ctrl-C may land as soon as this returns
                while True:
                    with lock:
                        pass
            except KeyboardInterrupt:
                interrupts += 1
            assert not lock._is_owned(), f"a KeyboardInterrupt left the lock held (after {interrupts})"
    finally:
        os.close(ask_w)
        presser.join(timeout=30)
        signal.signal(signal.SIGINT, previous)
        os.close(ask_r)
    assert interrupts == 300
    # And the fork lock works for everyone else: a fork from another thread goes through.
    with ForkExecutor(1) as ex:
        assert ex.submit(os.getpid).result(timeout=60) != os.getpid()


def _drop_executors(futures: list[Any]) -> None:
    import gc

    for i in range(5):
        executor = ForkExecutor(2, thread_name_prefix=f"dropped-{i}")
        assert list(executor.map(abs, [-1, -2, -3])) == [1, 2, 3]
        futures.append(executor.submit(sum, [1, 2]))  # still queued or running as it is dropped
        del executor
    gc.collect()


def test_an_executor_dropped_without_shutdown_releases_its_threads_and_descriptors() -> None:
    fork_map(int)  # the reaper's own pipe opens at the first fork
    before = open_fds()
    futures: list[Any] = []
    with pytest.warns(ResourceWarning, match="collected without shutdown"):
        _drop_executors(futures)
    assert [f.result(timeout=60) for f in futures] == [3] * 5  # nothing submitted is lost
    slots = [t for t in threading.enumerate() if t.name.startswith("dropped-")]
    for thread in slots:
        thread.join(60)
    assert not any(thread.is_alive() for thread in slots)
    _core._reaper.wait()  # the last children's pidfds close once they are reaped
    assert open_fds() <= before


def _own_descriptors() -> set[int]:
    return open_fds()


def test_a_child_holds_no_descriptor_of_the_parents_machinery() -> None:
    # While another child runs, the parent holds that child's channels and every slot's wake pipe;
    # none of them may reach a new child, which holds only what it inherits from the user.
    started_r, started_w = os.pipe()
    release_r, release_w = os.pipe()

    def block() -> bytes:
        os.write(started_w, b"s")
        return os.read(release_r, 1)

    try:
        with ForkExecutor(2) as executor:
            blocker = executor.submit(block)
            assert select.select([started_r], [], [], 60)[0], "the first child did not start"
            machinery = set(_core._parent_fds)
            user = open_fds() - machinery
            assert machinery, "the parent holds no channel for the running child"
            held = executor.submit(_own_descriptors).result(timeout=60)
            os.write(release_w, b"r")
            assert blocker.result(timeout=60) == b"r"
    finally:
        for fd in (started_r, started_w, release_r, release_w):
            os.close(fd)
    assert not held & machinery, f"the child holds the parent's {sorted(held & machinery)}"
    assert len(held - user) <= 2, f"besides its result pipe and memory file: {sorted(held - user)}"
