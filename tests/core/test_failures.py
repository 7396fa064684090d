"""Every way a task can fail, driven from one table.

Each row runs a task through ``fork_map`` and checks the error type, its fields, that the error
survives pickling (it crosses distributed later), and that the parent carries on afterwards.
"""

from __future__ import annotations

import os
import pickle
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from crash_cases import (
    HoldsALock,
    allocate_512_mib,
    kill_self,
    raise_keyboard_interrupt,
    raise_memory_error,
    raise_system_exit,
    raise_unpicklable,
    raise_value_error,
    return_lock,
    segfault,
)
from procs import wait_gone

from dask_forkmap import (
    ChildCrashed,
    ChildTraceback,
    ExecutorShutdown,
    ForkExecutor,
    ForkFailed,
    ForkMapError,
    ForkUnavailable,
    MemoryLimitExceeded,
    ResultPicklingError,
    ResultUnpicklingError,
    TaskError,
    TaskInterrupted,
    TaskTimeoutError,
    fork_map,
    with_limits,
)

MiB = 1024 * 1024


def raise_needs_args() -> None:
    # Defined in the task, so that the class is pickled by value: a class that exists before
    # distributed is imported gets tblib's reducer, which re-creates it without calling __init__.
    class NeedsTwoArgs(Exception):
        def __init__(self, path: str, code: int) -> None:
            super().__init__(f"{path} failed with {code}")
            self.path = path
            self.code = code

    raise NeedsTwoArgs("/data/x", 7)


def recurse(n: int = 0) -> int:
    return recurse(n + 1) + 1


def fork_a_grandchild_and_hang() -> None:
    if os.fork() == 0:
        time.sleep(600)
        os._exit(0)
    time.sleep(600)


@dataclass
class Case:
    task: Callable[[], Any]
    error: type[BaseException]
    fields: dict[str, Any] = field(default_factory=dict)
    message: str = ""  # a substring the message must contain


CASES = {
    "segfault": Case(segfault, ChildCrashed, {"signal": "SIGSEGV", "exitcode": -signal.SIGSEGV}, "SIGSEGV"),
    "abort": Case(os.abort, ChildCrashed, {"signal": "SIGABRT", "exitcode": -signal.SIGABRT}, "SIGABRT"),
    "os._exit(3)": Case(lambda: os._exit(3), ChildCrashed, {"signal": None, "exitcode": 3}, "exited with code 3"),
    "SIGKILL of itself": Case(kill_self, ChildCrashed, {"signal": "SIGKILL", "exitcode": -signal.SIGKILL}, "SIGKILL"),
    "MemoryError": Case(raise_memory_error, MemoryError, {}, "simulated"),
    "memory limit": Case(
        with_limits(allocate_512_mib, memory_limit="64 MiB"), MemoryLimitExceeded, {"limit": 64 * MiB}, "memory limit"
    ),
    "timeout": Case(
        with_limits(lambda: time.sleep(60), timeout=0.5), TaskTimeoutError, {"timeout": 0.5}, "0.5 s timeout"
    ),
    "unpicklable result": Case(return_lock, ResultPicklingError, {"type_name": "_thread.lock"}, "_thread.lock"),
    "unpicklable exception": Case(
        raise_unpicklable, TaskError, {"type_name": f"{HoldsALock.__module__}.HoldsALock", "message": "carries a lock"}
    ),
    "exception needing init args": Case(
        raise_needs_args,
        TaskError,
        {"type_name": f"{__name__}.raise_needs_args.<locals>.NeedsTwoArgs", "message": "/data/x failed with 7"},
    ),
    "KeyboardInterrupt in the task": Case(
        raise_keyboard_interrupt, TaskInterrupted, {"exc_type": "KeyboardInterrupt", "code": None}
    ),
    "SystemExit in the task": Case(
        raise_system_exit, TaskInterrupted, {"exc_type": "SystemExit", "code": 4}, "SystemExit(4)"
    ),
    "deep recursion": Case(recurse, RecursionError, {}, "recursion"),
    "a grandchild, then a timeout": Case(
        with_limits(fork_a_grandchild_and_hang, timeout=0.5), TaskTimeoutError, {"timeout": 0.5}, "process group"
    ),
    "ordinary exception": Case(raise_value_error, ValueError, {}, "bad value 17"),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_failure(case: Case) -> None:
    with pytest.raises(case.error) as info:
        fork_map(case.task)
    err = info.value
    assert type(err) is case.error or case.error in (MemoryError, RecursionError)
    for name, expected in case.fields.items():
        assert getattr(err, name) == expected, name
    assert case.message in str(err)
    if isinstance(err, ChildCrashed):
        assert err.pid != os.getpid()
        assert str(err.pid) in str(err)
    # The error survives pickling with its type and fields.
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is type(err)
    assert str(again) == str(err)
    for name in case.fields:
        assert getattr(again, name) == getattr(err, name)
    # The parent carries on.
    assert fork_map(lambda: 21 * 2) == 42


def test_task_exception_keeps_type_and_child_traceback() -> None:
    with pytest.raises(ValueError, match="bad value 17") as info:
        fork_map(raise_value_error)
    cause = info.value.__cause__
    assert isinstance(cause, ChildTraceback)
    assert "raise_value_error" in cause.text
    assert 'raise ValueError("bad value 17")' in cause.text


def test_unrecreatable_exception_keeps_text() -> None:
    with pytest.raises(TaskError) as info:
        fork_map(raise_needs_args)
    assert "NeedsTwoArgs" in info.value.child_traceback
    assert "raise_needs_args" in info.value.child_traceback


def test_segfault_reports_the_python_stack_at_the_crash_site() -> None:
    with pytest.raises(ChildCrashed) as info:
        fork_map(segfault)
    stack = info.value.crash_stack
    assert stack is not None
    assert "Segmentation fault" in stack
    assert "in segfault" in stack
    assert "string_at" in stack
    # Trimmed: no loaded-module list, no machinery or parent frames below the task.
    assert "Extension modules" not in stack
    assert "_child.py" not in stack
    assert "test_segfault_reports" not in stack


def test_crash_report_does_not_reach_the_terminal(capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ChildCrashed):
        fork_map(segfault)
    out, err = capfd.readouterr()
    assert "Segmentation fault" not in out + err


def test_memory_within_the_limit_is_fine() -> None:
    assert fork_map(with_limits(lambda: len(bytearray(16 * MiB)), memory_limit="128 MiB")) == 16 * MiB


def test_memory_limit_does_not_count_inherited_memory() -> None:
    # 256 MiB the parent already holds are mapped in the child too; a 64 MiB limit must still allow
    # a 16 MiB allocation.
    inherited = bytearray(256 * MiB)
    assert fork_map(with_limits(lambda: len(inherited) + len(bytearray(16 * MiB)), memory_limit="64 MiB")) == 272 * MiB


def test_timeout_kills_grandchildren(tmp_path: Any) -> None:
    r, w = os.pipe()

    def fork_grandchild_and_hang() -> None:
        pid = os.fork()
        if pid == 0:
            time.sleep(600)
            os._exit(0)
        os.write(w, f"{pid}\n".encode())
        time.sleep(600)

    with pytest.raises(TaskTimeoutError):
        fork_map(with_limits(fork_grandchild_and_hang, timeout=1))
    os.close(w)
    grandchild = int(os.read(r, 100).decode())
    os.close(r)
    assert wait_gone(grandchild, timeout=10), "the grandchild outlived its parent's timeout"


def test_all_errors_derive_from_forkmaperror() -> None:
    for cls in (ChildCrashed, TaskTimeoutError, MemoryLimitExceeded, ResultPicklingError, TaskError, TaskInterrupted):
        assert issubclass(cls, ForkMapError)
    assert issubclass(TaskTimeoutError, TimeoutError)
    assert issubclass(MemoryLimitExceeded, MemoryError)


def test_a_task_that_closes_the_result_pipe_is_reported() -> None:
    def close_everything() -> int:
        os.closerange(3, 65536)
        return 1

    with pytest.raises(ChildCrashed, match=r"close file descriptors") as info:
        fork_map(close_everything)
    assert info.value.signal is None
    assert fork_map(lambda: 2) == 2


def test_memory_limit_does_not_block_sending_a_big_result() -> None:
    # The task stays within 64 MiB; pickling and sending its 48 MiB result must not count against it.
    assert len(fork_map(with_limits(lambda: bytes(48 * MiB), memory_limit="64 MiB"))) == 48 * MiB


@pytest.mark.parametrize(
    "err",
    [
        ForkFailed(12, "could not fork"),
        ForkUnavailable("no fork here"),
        ExecutorShutdown("after shutdown"),
        TaskError("boom", type_name="x.Y", message="m", child_traceback="tb"),
        ChildCrashed("crash", pid=1, exitcode=-11, signal="SIGSEGV", crash_stack="stack", task="k"),
        ResultPicklingError("no pickle", type_name="_thread.lock", reason="TypeError: no"),
        ResultUnpicklingError("no unpickle", type_name="app.Table", reason="AttributeError: no Table"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_every_error_pickles_with_its_fields(err: ForkMapError) -> None:
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is type(err)
    assert again.args == err.args
    assert again.__dict__ == err.__dict__
    if isinstance(err, OSError):
        assert again.errno == err.errno


def test_a_crash_far_below_the_memory_limit_does_not_blame_it() -> None:
    with pytest.raises(ChildCrashed) as info:
        fork_map(with_limits(segfault, memory_limit="1 GiB"))
    assert "memory limit" not in str(info.value)


def test_a_crash_near_the_memory_limit_mentions_it() -> None:
    def fill_then_abort() -> None:
        block = bytearray(48 * MiB)
        block[::4096] = b"x" * len(block[::4096])  # make it resident
        os.abort()

    with pytest.raises(ChildCrashed, match="memory limit of 67108864 bytes"):
        fork_map(with_limits(fill_then_abort, memory_limit="64 MiB"))


def test_defaults_survive_a_replaced_configuration() -> None:
    import dask

    from dask_forkmap import _config

    saved = dict(dask.config.config)
    try:
        dask.config.config.pop("forkmap", None)  # as a Nanny's config snapshot may do
        assert _config.get("timeout") is None
        assert fork_map(lambda: 3) == 3
    finally:
        dask.config.config.clear()
        dask.config.config.update(saved)


def test_wrapper_frames_are_trimmed_from_the_outer_end_of_crash_stacks() -> None:
    from types import SimpleNamespace

    from dask_forkmap import _core

    wrapper = SimpleNamespace(__file__="/lib/wrapper.py")
    text = (
        "Fatal Python error: Segmentation fault\n\nStack (most recent call first):\n"
        '  File "/lib/ctypes.py", line 519 in string_at\n'
        '  File "/app/task.py", line 3 in task\n'
        '  File "/lib/wrapper.py", line 9 in call_task\n'
        f'  File "{_core._CHILD_FILE}", line 1 in _run\n'
        '  File "/app/parent.py", line 1 in <module>\n'
        "\nExtension modules: numpy._core._multiarray_umath (total: 1)\n"
    )
    _core.register_wrappers(wrapper)
    try:
        trimmed = _core._trim_crash_text(text)
    finally:
        _core._wrapper_files.discard('"/lib/wrapper.py"')
    assert trimmed.splitlines()[-1] == '  File "/app/task.py", line 3 in task'
    assert "string_at" in trimmed
    assert "parent.py" not in trimmed
    assert "Extension modules" not in trimmed


def _fork_a_helper_that_segfaults() -> int:
    pid = os.fork()
    if pid == 0:
        segfault()  # faulthandler, as the task's child had it, dumps here
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _use_a_fork_pool_whose_worker_aborts() -> str:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
        try:
            pool.submit(os.abort).result(timeout=60)
        except BrokenProcessPool:
            return "handled"
    return "not broken"


@pytest.mark.parametrize(
    ("task", "expected"),
    [(_fork_a_helper_that_segfaults, -signal.SIGSEGV), (_use_a_fork_pool_whose_worker_aborts, "handled")],
    ids=["os.fork helper segfaults", "fork ProcessPoolExecutor worker aborts"],
)
def test_a_tasks_own_forks_do_not_reach_its_result(task: Callable[[], Any], expected: Any) -> None:
    # The task's own children used to inherit its result pipe with faulthandler writing into it: the
    # helper's crash dump became the task's "report", and the parent raised ChildCrashed.
    assert fork_map(with_limits(task, timeout=60)) == expected
    with ForkExecutor(1) as executor:
        assert executor.submit(task).result(timeout=60) == expected
