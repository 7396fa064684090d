"""The child's life: how it starts, what it inherits, how it ends, and what it leaves behind."""

from __future__ import annotations

import ast
import os
import random
import select
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
import warnings
import weakref

import numpy as np
import pytest
from procs import child_pids, open_fds, wait_gone

from dask_forkmap import ChildCrashed, ForkExecutor, _core, fork_map

PY = sys.executable


def run_script(code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout, check=False
    )


def test_child_ends_with_os_exit_and_writes_nothing_twice() -> None:
    # stdout is a pipe here, so block-buffered: "pending" is still in the parent's buffer at fork.
    proc = run_script(
        """
        import atexit, sys, weakref
        from dask_forkmap import fork_map

        atexit.register(lambda: print("atexit ran"))
        class Thing: pass
        thing = Thing()
        weakref.finalize(thing, print, "finalizer ran")
        print("pending")
        def task():
            print("printed by the task")
            return 7
        print("result", fork_map(task))
        """
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines.count("pending") == 1
    assert lines.count("printed by the task") == 1
    assert lines.count("result 7") == 1
    assert lines.count("atexit ran") == 1
    assert lines.count("finalizer ran") == 1
    assert lines.index("printed by the task") < lines.index("result 7")


def test_parents_garbage_is_not_finalized_in_the_child(tmp_path) -> None:
    # Uncollected cyclic garbage at the fork belongs to the parent: its finalizers (here one that
    # deletes a file, as tempfile's do) must run there, once, and never in a child, even when the
    # task runs the collector.
    import gc

    target = tmp_path / "parent-owned"
    target.write_text("x")

    class Cycle:
        pass

    gc.disable()
    try:
        garbage = Cycle()
        garbage.me = garbage
        weakref.finalize(garbage, target.unlink, missing_ok=True)
        del garbage
        assert fork_map(gc.collect) >= 0
        assert target.exists()
    finally:
        gc.enable()
    gc.collect()
    assert not target.exists()


def test_child_has_its_own_process_group() -> None:
    pid, pgid = fork_map(lambda: (os.getpid(), os.getpgid(0)))
    assert pid == pgid
    assert pgid != os.getpgid(0)


def test_child_dies_with_its_parent() -> None:
    script = textwrap.dedent(
        """
        import os, sys, time
        from dask_forkmap import fork_map
        def task():
            print(os.getpid(), flush=True)
            time.sleep(600)
        fork_map(task)
        """
    )
    parent = subprocess.Popen([PY, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([parent.stdout], [], [], 60)
        assert ready, "the child never started"
        child = int(parent.stdout.readline())
        assert child in child_pids(parent.pid)
        parent.kill()
        parent.wait(timeout=30)
        assert wait_gone(child, timeout=10), "the child outlived its parent"
    finally:
        parent.kill()
        parent.wait(timeout=30)
        parent.stdout.close()


def test_fast_result_does_not_wait_for_a_slow_sibling() -> None:
    go_r, go_w = os.pipe()

    def slow() -> str:
        os.read(go_r, 1)  # blocks until the test lets it finish
        return "slow"

    with ForkExecutor(2) as ex:
        slow_future = ex.submit(slow)
        fast_future = ex.submit(lambda: "fast")
        assert fast_future.result(timeout=30) == "fast"
        assert not slow_future.done()
        crash = ex.submit(os._exit, 9)
        with pytest.raises(ChildCrashed):
            crash.result(timeout=30)
        assert not slow_future.done()
        os.write(go_w, b"x")
        assert slow_future.result(timeout=30) == "slow"
    os.close(go_r)
    os.close(go_w)


def _open_files() -> dict[tuple[int, int], int]:
    """What this process's descriptors point to: (device, inode) -> file mode."""
    files = {}
    for fd in open_fds():
        try:
            st = os.fstat(fd)
        except OSError:
            continue
        files[(st.st_dev, st.st_ino)] = st.st_mode
    return files


def _read_line(fd: int, timeout: float) -> str:
    data = b""
    while not data.endswith(b"\n"):
        assert select.select([fd], [], [], timeout)[0], "the task did not report"
        data += os.read(fd, 65536)
    return data.decode()


def test_a_crash_is_reported_while_a_sibling_forked_after_it_runs() -> None:
    # The crashing child is forked first, the slow one after it, from another slot thread: the slow
    # one must hold none of the first one's channels, and the crash must be reported while it runs.
    report_r, report_w = os.pipe()
    crash_r, crash_w = os.pipe()
    go_r, go_w = os.pipe()
    parent_files = _open_files()

    def crash_when_told() -> None:
        os.write(report_w, f"{sorted(_open_files().items())!r}\n".encode())
        os.read(crash_r, 1)
        os._exit(3)

    def slow() -> dict[tuple[int, int], int]:
        held = _open_files()
        os.write(report_w, f"{os.getpid()}\n".encode())
        os.read(go_r, 1)  # blocks until the test lets it finish
        return held

    with ForkExecutor(2) as ex:
        crashing = ex.submit(crash_when_told)
        first = dict(ast.literal_eval(_read_line(report_r, 60)))
        slow_future = ex.submit(slow)
        slow_pid = int(_read_line(report_r, 60))
        os.write(crash_w, b"x")
        err = crashing.exception(timeout=60)
        assert isinstance(err, ChildCrashed)
        assert err.exitcode == 3
        # Reported while the sibling is still blocked, alive and unreaped.
        assert not slow_future.done()
        assert slow_pid in child_pids() - child_pids(zombies_only=True)
        os.write(go_w, b"x")
        held = slow_future.result(timeout=60)
    # The first child's own channels: its result pipe and (with memfd) its memory file.
    channels = {f: mode for f, mode in first.items() if f not in parent_files}
    channels = {f: mode for f, mode in channels.items() if stat.S_ISFIFO(mode) or stat.S_ISREG(mode)}
    assert any(stat.S_ISFIFO(mode) for mode in channels.values()), first
    if _core._HAS_MEMFD:
        assert any(stat.S_ISREG(mode) for mode in channels.values()), first
    assert not channels.keys() & held.keys(), "the sibling holds the crashed child's channels"
    for fd in (report_r, report_w, crash_r, crash_w, go_r, go_w):
        os.close(fd)


def test_result_does_not_wait_for_eof() -> None:
    # The task forks a grandchild that inherits the result pipe and keeps it open. EOF would come
    # only when the grandchild exits; the framed result must not wait for it.
    pid_r, pid_w = os.pipe()
    hold_r, hold_w = os.pipe()

    def leave_a_grandchild_holding_the_pipe() -> int:
        pid = os.fork()
        if pid == 0:
            os.read(hold_r, 1)  # never written: only death ends this
            os._exit(0)
        os.write(pid_w, f"{pid}\n".encode())
        return 42

    assert fork_map(leave_a_grandchild_holding_the_pipe) == 42
    grandchild = int(os.read(pid_r, 100))
    # Once the child has exited, its process group goes with it: no orphan is left.
    assert wait_gone(grandchild, timeout=10)
    for fd in (pid_r, pid_w, hold_r, hold_w):
        os.close(fd)


def test_crash_is_seen_while_a_grandchild_holds_the_pipe() -> None:
    hold_r, hold_w = os.pipe()

    def crash_leaving_a_grandchild() -> None:
        if os.fork() == 0:
            os.read(hold_r, 1)
            os._exit(0)
        os._exit(5)

    with pytest.raises(ChildCrashed) as info:
        fork_map(crash_leaving_a_grandchild)
    assert info.value.exitcode == 5
    os.close(hold_r)
    os.close(hold_w)


def test_children_get_different_random_numbers() -> None:
    # An odd number of legacy normal draws leaves the second of a pair cached in the global state:
    # children must not all return that one first either.
    np.random.standard_normal()
    parent_state = np.random.get_state()
    draws = [
        fork_map(lambda: (random.random(), float(np.random.random()), float(np.random.standard_normal())))
        for _ in range(4)
    ]
    assert len({d[0] for d in draws}) == 4
    assert len({d[1] for d in draws}) == 4
    assert len({d[2] for d in draws}) == 4
    state = np.random.get_state()  # the parent's own stream is left as it was
    assert (state[1] == parent_state[1]).all()
    assert state[2:] == parent_state[2:]


@pytest.mark.skipif(not hasattr(np.random, "set_bit_generator"), reason="numpy < 1.25 has no set_bit_generator")
def test_children_get_different_random_numbers_from_another_bit_generator() -> None:
    legacy = np.random.get_bit_generator()
    np.random.set_bit_generator(np.random.PCG64(0))
    try:
        draws = [fork_map(lambda: float(np.random.random())) for _ in range(4)]
    finally:
        np.random.set_bit_generator(legacy)
    assert len(set(draws)) == 4


def test_numpy_random_is_not_imported_for_the_child() -> None:
    proc = run_script(
        """
        import sys, numpy
        sys.modules.pop("numpy.random", None)
        from dask_forkmap import fork_map
        print(fork_map(lambda: "numpy.random" in sys.modules))
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


@pytest.mark.slow
def test_no_zombies_and_no_leaked_fds_after_10000_calls() -> None:
    fork_map(int)  # start the reaper thread and its pipe before counting
    assert _core._reaper.wait(timeout=60)
    fds_before = open_fds()
    with ForkExecutor(2) as ex:
        assert sum(ex.map(abs, range(-5000, 5000))) == 25_000_000
    for i in range(200):
        assert fork_map(abs, -i) == i
    assert _core._reaper.wait(timeout=60)
    assert not child_pids(zombies_only=True)
    assert not child_pids()
    assert open_fds() == fds_before


@pytest.fixture
def ctrl_c_raises():
    # A shell starts a background job with SIGINT ignored, and CPython then leaves it ignored: these
    # tests need Ctrl-C's usual handler, whatever started pytest.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.usefixtures("ctrl_c_raises")
def test_keyboard_interrupt_while_waiting_kills_and_reaps_the_child() -> None:
    pid_r, pid_w = os.pipe()
    main = threading.get_ident()

    def interrupt_once_started() -> None:
        select.select([pid_r], [], [], 60)
        signal.pthread_kill(main, signal.SIGINT)

    def task() -> None:
        os.write(pid_w, f"{os.getpid()}\n".encode())
        time.sleep(600)

    interrupter = threading.Thread(target=interrupt_once_started)
    interrupter.start()
    with pytest.raises(KeyboardInterrupt):
        fork_map(task)
    interrupter.join(timeout=60)
    child = int(os.read(pid_r, 100))
    with pytest.raises(ChildProcessError):
        os.waitpid(child, os.WNOHANG)  # already reaped
    assert not os.path.exists(f"/proc/{child}") or child not in child_pids()
    os.close(pid_r)
    os.close(pid_w)


@pytest.mark.usefixtures("ctrl_c_raises")
def test_ctrl_c_taken_by_another_thread_still_interrupts_the_wait() -> None:
    # A Ctrl-C (process-directed) may go to any thread that does not block SIGINT: one of the
    # program's own threads, say. CPython's handler then only flags the signal for the main thread,
    # which must still wake up from its wait and kill the child, not sleep until the task is done.
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()

    def takes_the_signal() -> None:
        select.select([ready_r], [], [], 60)
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)

    def task() -> None:
        os.write(ready_w, b"started")
        time.sleep(20)
        os.write(done_w, b"done")  # only if nobody killed it

    taker = threading.Thread(target=takes_the_signal)
    taker.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            fork_map(task)
        os.set_blocking(done_r, False)
        with pytest.raises(BlockingIOError):
            os.read(done_r, 10)  # the task was killed mid-way
    finally:
        taker.join(timeout=60)
        for fd in (ready_r, ready_w, done_r, done_w):
            os.close(fd)


_INTERRUPT_AFTER_FORK: list[int] = []  # the thread to signal right after our next fork, if any


def _interrupt_after_fork() -> None:
    if _INTERRUPT_AFTER_FORK:
        signal.pthread_kill(_INTERRUPT_AFTER_FORK.pop(), signal.SIGINT)


os.register_at_fork(after_in_parent=_interrupt_after_fork)


@pytest.mark.usefixtures("ctrl_c_raises")
def test_ctrl_c_right_after_the_fork_still_kills_and_reaps_the_child() -> None:
    # The interrupt arrives while fork_map is still setting the child up, before it waits for it:
    # it must still reach the wait, kill the child and reap it, not leave it running.
    done_r, done_w = os.pipe()

    def task() -> None:
        time.sleep(20)
        os.write(done_w, b"done")  # only if nobody killed it

    before = child_pids()
    _INTERRUPT_AFTER_FORK.append(threading.get_ident())
    try:
        with pytest.raises(KeyboardInterrupt):
            fork_map(task)
        assert not (child_pids() - before), "the interrupted child was left behind"
        os.set_blocking(done_r, False)
        with pytest.raises(BlockingIOError):
            os.read(done_r, 10)
    finally:
        _INTERRUPT_AFTER_FORK.clear()
        os.close(done_r)
        os.close(done_w)


def test_forking_from_a_multithreaded_parent_does_not_warn_but_others_still_do() -> None:
    stop = threading.Event()
    worker = threading.Thread(target=stop.wait)
    worker.start()
    try:
        with warnings.catch_warnings(record=True) as log:
            warnings.simplefilter("always")
            assert fork_map(lambda: 5) == 5
            with ForkExecutor(2) as ex:
                assert list(ex.map(abs, [-1, -2])) == [1, 2]
            ours = [w for w in log if "multi-threaded" in str(w.message)]
            assert ours == []
            # A fork made by anyone else still gets CPython's warning (3.12 and later).
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
        theirs = [w for w in log if "multi-threaded" in str(w.message)]
        if sys.version_info >= (3, 12):
            assert len(theirs) == 1
            assert theirs[0].category is DeprecationWarning
        else:
            assert theirs == []
    finally:
        stop.set()
        worker.join(timeout=30)


def test_an_error_filter_on_the_fork_warning_leaves_our_forks_alone() -> None:
    # `python -W error` and pytest's `filterwarnings = error`. Since 3.15 os.fork() raises the
    # warning such a filter makes an error, in the parent, once the child exists; a user's own
    # fork still gets it.
    stop = threading.Event()
    worker = threading.Thread(target=stop.wait)
    worker.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert fork_map(lambda: 5) == 5
            with ForkExecutor(2) as ex:
                assert list(ex.map(abs, [-1, -2], timeout=60)) == [1, 2]
            if sys.version_info >= (3, 15):
                hold_r, hold_w = os.pipe()
                try:
                    with pytest.raises(DeprecationWarning, match="multi-threaded"):  # noqa: PT012
                        if os.fork() == 0:  # only the child gets here: the parent raised
                            os.close(hold_w)
                            os.read(hold_r, 1)  # until the parent has found it
                            os._exit(0)
                    pid = _core._child_just_forked(hold_r)  # to reap it
                finally:
                    os.close(hold_r)
                    os.close(hold_w)
                assert os.waitpid(pid, 0) == (pid, 0)
    finally:
        stop.set()
        worker.join(timeout=30)


def test_a_fork_warning_raised_after_the_fork_loses_no_child(monkeypatch: pytest.MonkeyPatch) -> None:
    # Another thread may swap the warning filters between ours going in and the fork: on 3.15 the
    # error then comes out of os.fork() with our child running. It is found, and runs as any other.
    monkeypatch.setattr(_core, "_quiet_fork_warning", lambda: None)
    stop = threading.Event()
    worker = threading.Thread(target=stop.wait)
    worker.start()
    before = child_pids()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert fork_map(os.getppid) == os.getpid()
            with pytest.raises(ZeroDivisionError):
                fork_map(lambda: 1 / 0)
            with ForkExecutor(2) as ex:
                assert list(ex.map(abs, range(-20, 0), timeout=60)) == list(range(20, 0, -1))
    finally:
        stop.set()
        worker.join(timeout=30)
    assert _core._reaper.wait(timeout=30)
    assert not (child_pids() - before), "a child was left behind"


def test_subprocess_and_multiprocessing_keep_their_exit_statuses() -> None:
    import multiprocessing

    with ForkExecutor(2) as ex:
        futures = [ex.submit(abs, -i) for i in range(20)]
        for code in range(5):
            proc = subprocess.run([PY, "-c", f"raise SystemExit({code})"], check=False, timeout=60)
            assert proc.returncode == code
        ctx = multiprocessing.get_context("fork")
        process = ctx.Process(target=os._exit, args=(3,))
        with warnings.catch_warnings():
            # multiprocessing's own fork in this threaded process warns on 3.12+, as it should.
            warnings.simplefilter("ignore", DeprecationWarning)
            process.start()
        process.join(timeout=60)
        assert process.exitcode == 3
        assert [f.result(timeout=60) for f in futures] == list(range(20))
