"""Forking one child per call, collecting its result, and reaping it.

Data flow of one call::

    caller thread                           child (pid, own process group)
    -------------                           ------------------------------
    spawn():  under _fork_lock
      pipe(), memfd_create()
      flush stdout/stderr
      fork() ----------------------------->  _child.main(): run fn, write one frame, os._exit
      close the pipe's write end
      setpgid(pid, pid), pidfd_open(pid)
    Child.collect():
      poll(pipe, pidfd[, wake])
        frame complete  -> hand pid to the reaper, unpickle, return / raise
        pidfd readable, no frame -> killpg, waitpid  -> ChildCrashed
        deadline passed -> killpg, waitpid          -> TaskTimeoutError
    _Reaper thread (one per process):
      poll(pidfds) -> killpg(pid) (grandchildren), waitpid(pid)

Why it is shaped this way:

* ``_fork_lock`` covers everything from creating a child's pipe to closing the parent's copy of its
  write end, so no other child can inherit that write end. A crashed child is still detected through
  its pidfd, not EOF, because the task may have forked grandchildren that hold the pipe.
* The caller gets the result as soon as the frame is complete; the child's address-space teardown
  (tens of ms for a big parent) and ``waitpid`` happen on the reaper thread. Only our own pids are
  ever waited for (never ``waitpid(-1)``), so ``subprocess`` and ``multiprocessing`` keep their
  children's exit statuses.
* ``killpg`` is only sent while the child is unreaped, so its pid (and thus its process group id)
  cannot have been reused by an unrelated process.
* Descriptors the parent holds for in-flight children are registered in ``_parent_fds`` and closed
  in each new child; registration and closing both happen under ``_fork_lock``, so the child never
  closes a number the user has since reused for a file of their own.
* Our own threads (executor slots, the reaper) block process-directed signals (``QuietThread``).
  The kernel hands such a signal to any thread that does not block it; taken by a thread asleep in
  ``poll``, a Ctrl-C would leave the main thread asleep in a lock, its ``KeyboardInterrupt`` pending
  until something else woke it. A child forked from such a thread gets the mask its thread started
  with back, so it receives signals as the user's own code would.
"""

from __future__ import annotations

import errno
import os
import pickle
import select
import signal
import sys
import threading
import time
import warnings
from _thread import RLock as _CRLock
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NoReturn, ParamSpec, TypeVar

from . import _child, _transport
from ._errors import (
    ChildCrashed,
    ChildTraceback,
    ForkFailed,
    ForkUnavailable,
    ResultUnpicklingError,
    TaskError,
    TaskTimeoutError,
)
from ._limits import NO_LIMITS, Limits, check_callable, resolve, split

__all__ = ["Child", "Job", "close_ours", "fork_map", "open_pipe", "spawn"]

P = ParamSpec("P")
R = TypeVar("R")

HAS_FORK = hasattr(os, "fork")
_HAS_PIDFD = hasattr(os, "pidfd_open")
_HAS_MEMFD = hasattr(os, "memfd_create")
_MFD_ALLOW_SEALING = getattr(os, "MFD_ALLOW_SEALING", 0)  # the child seals the file (see _transport)
# Without pidfds (macOS, Linux < 5.3) a child's death is noticed by polling at this interval.
_EXIT_POLL_S = 0.01
_REAPER_LINGER_S = 1.0
# The main thread waits in slices of this length. CPython runs a Python signal handler (Ctrl-C's
# KeyboardInterrupt) only when the main thread is awake: a signal taken by another thread that does
# not block it (any thread the program started itself), or one landing just before the main
# thread enters poll(), would leave it asleep until the child finishes.
_MAIN_POLL_S = 0.2
# poll() takes an int of milliseconds: a long timeout (30 days is 2.6e9 ms) is waited for in slices.
_LONGEST_POLL_MS = 3_600_000


class SignalSafeLock(_CRLock):  # type: ignore[misc]  # typeshed calls it final; CPython 3.10-3.15 do not
    """A re-entrant lock that a ``KeyboardInterrupt`` cannot leave held: use it with ``with``.

    An exception a signal handler raises (Ctrl-C's ``KeyboardInterrupt``, in the main thread) can
    land between a C lock's ``__enter__`` and the start of the ``with`` block: CPython 3.14 checks for
    pending signals right after that call returns, outside the block's handler, so ``__exit__``
    never runs and the lock stays held for good. Here ``__enter__`` is Python code whose ``try``
    covers the acquire, so such an exception releases what it acquired. ``__exit__`` stays the C
    release: a Python ``__exit__`` could be interrupted on entry, before releasing. If the acquire
    itself was interrupted nothing is owned, and the release refuses with ``RuntimeError``.

    Re-entrant because the scheduler's lock must be; the lock's owner is also what tells the
    release above whether there is anything to release.
    """

    __slots__ = ()

    def __enter__(self) -> bool:  # type: ignore[override]  # typeshed: __enter__ = acquire
        try:
            return self.acquire()
        except BaseException:
            try:
                self.release()
            except RuntimeError:
                pass
            raise


_fork_lock = SignalSafeLock()
_parent_fds: set[int] = set()

# Everything but the signals the kernel raises for a faulting instruction (blocking those turns a
# crash into a hang) and the two that cannot be blocked anyway.
_ASYNC_SIGNALS = (
    frozenset(signal.valid_signals())
    - {
        getattr(signal, name)
        for name in ("SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL", "SIGTRAP", "SIGSYS", "SIGABRT", "SIGKILL", "SIGSTOP")
        if hasattr(signal, name)
    }
    if hasattr(signal, "pthread_sigmask")
    else frozenset()
)


class QuietThread(threading.Thread):
    """One of our own threads: process-directed signals stay blocked in it from its first instruction.

    The mask is set around ``start()``, so the new thread is born with it (setting it from inside
    the thread would leave a window in which a Ctrl-C could land there). Children forked from the
    thread get back the mask of the thread that started it.
    """

    _child_sigmask: set[int] | None = None

    def start(self) -> None:
        if not _ASYNC_SIGNALS:
            super().start()
            return
        mask = self._child_sigmask = _child.pthread_sigmask(signal.SIG_BLOCK, _ASYNC_SIGNALS)
        try:
            super().start()
        finally:
            _child.pthread_sigmask(signal.SIG_SETMASK, mask)


def _check_platform() -> None:
    if not HAS_FORK:
        raise ForkUnavailable(
            f"dask_forkmap needs os.fork(), which {sys.platform} does not have; it runs on Linux and "
            "other POSIX systems. Use dask's 'threads' or 'processes' scheduler here instead."
        )


# CPython 3.12+ warns (DeprecationWarning) on every fork() in a multi-threaded process. A Dask worker
# is always multi-threaded and forks once per task, so the warning would repeat for every task, and
# it says nothing we do not already act on: we fork from threads that hold none of our locks, the
# child runs only the task and then os._exit, and the docs list what a task must not rely on. The
# filter below matches only fork() calls made from this module; forks by user code and by
# multiprocessing still warn. It is re-inserted if something (pytest does, per test) puts a broader
# filter in front of it.
_FORK_WARNING = (
    r"This process \(pid=\d+\) is multi-threaded, use of fork\(\) may lead to deadlocks",
    r"dask_forkmap\._core\Z",
)
_fork_filter: Any = None


def _quiet_fork_warning() -> None:
    global _fork_filter
    if warnings.filters and warnings.filters[0] is _fork_filter:
        return
    warnings.filterwarnings("ignore", message=_FORK_WARNING[0], category=DeprecationWarning, module=_FORK_WARNING[1])
    _fork_filter = warnings.filters[0]


def _flush_stdio() -> None:
    # A parent's pending output would otherwise be written again by the child's final flush.
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except Exception:
            pass


def close_ours(*fds: int) -> None:
    """Close descriptors of our machinery (negative numbers are skipped) and forget them."""
    with _fork_lock:
        for fd in fds:
            if fd >= 0:
                _parent_fds.discard(fd)
                os.close(fd)


def open_pipe() -> tuple[int, int]:
    """A non-blocking pipe for our own wake-ups, closed in every child we fork (see ``_parent_fds``)."""
    with _fork_lock:
        r, w = os.pipe()
        _parent_fds.update((r, w))
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    return r, w


def _describe_task(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__


@dataclass(frozen=True, slots=True)
class Job:
    """One child's work as every layer hands it to :func:`spawn`: resolved, checked, named.

    ``limits`` are final (put together by :func:`dask_forkmap._limits.resolve`); ``task`` names the
    work in error messages (a Dask key), default: the function's name.
    """

    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] | None = None
    limits: Limits = NO_LIMITS
    task: str | None = None

    @classmethod
    def of(cls, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], layer: Limits, what: str) -> Job:
        """The job of a call ``fn(*args, **kwargs)`` made through a layer whose own limits are ``layer``."""
        check_callable(fn, what)
        inner, own = split(fn)
        check_callable(inner, what)
        return cls(inner, args, kwargs, resolve(own, layer=layer))


def spawn(job: Job, sigmask: Iterable[int] | None = None) -> Child:
    """Fork a child running ``job``.

    ``sigmask``: the signal mask the child restores, for a caller that blocked signals around the
    call (default: that of the thread that started a :class:`QuietThread`, or the current one).
    """
    _check_platform()
    fn, args, kwargs, limits, task = job.fn, job.args, job.kwargs or {}, job.limits, job.task
    if sys.version_info >= (3, 12):
        _quiet_fork_warning()
    # To tell, if the child dies, whether it came near its memory limit. Read before the fork: every
    # page the parent writes while the child lives is copied.
    rss_at_fork = _anonymous_rss() if limits.memory_limit is not None else 0
    with _fork_lock:
        rfd, wfd = os.pipe()
        shm_fd = -1
        try:
            if _HAS_MEMFD:
                shm_fd = os.memfd_create("dask-forkmap-result", os.MFD_CLOEXEC | _MFD_ALLOW_SEALING)
            close_in_child = tuple(_parent_fds)
            forking = threading.current_thread()
            if sigmask is None and isinstance(forking, QuietThread):
                sigmask = forking._child_sigmask
            parent_pid = os.getpid()
            _flush_stdio()
            started = time.monotonic()
            try:
                pid = os.fork()
            except Warning:
                # CPython 3.15+ raises the multi-threaded fork warning out of os.fork() when a
                # filter makes it an error, in the parent, once the child exists. Our filter is
                # in front of any such one, but another thread (pytest, catch_warnings) may have
                # swapped the filter list since: the child runs all the same, so find it.
                pid = _child_just_forked(wfd)
        except OSError as exc:
            for fd in (rfd, wfd, shm_fd):
                if fd >= 0:
                    os.close(fd)
            if isinstance(exc, ForkFailed):  # from _child_just_forked, which says what happened
                raise
            raise ForkFailed(
                exc.errno,
                f"could not fork a child for {task or _describe_task(fn)}: {exc.strerror}. The system is out "
                "of memory or process slots; lower max_workers/num_workers, or check vm.overcommit_memory "
                "and `ulimit -u`",
            ) from exc
        if pid == 0:  # pragma: no cover - runs in the child, which reports through the pipe
            try:
                os.close(rfd)
                _child.main(
                    fn,
                    args,
                    kwargs,
                    wfd=wfd,
                    shm_fd=shm_fd,
                    close_fds=close_in_child,
                    memory_limit=limits.memory_limit,
                    parent_pid=parent_pid,
                    sigmask=sigmask,
                )
            finally:
                os._exit(_child.EXIT_INTERNAL)
        # Until the Child below exists, nobody else could kill or reap this child: an exception on
        # the way (a Ctrl-C whose handler runs here) must take it down before propagating.
        pidfd = -1
        try:
            # -1 first: the handler may run as close() returns, and a second close could hit a
            # descriptor another thread has opened since.
            fd, wfd = wfd, -1
            os.close(fd)
            try:
                # Also done by the child; doing it here too closes the race where we killpg first.
                os.setpgid(pid, pid)
            except OSError:
                pass
            if _HAS_PIDFD:
                try:
                    pidfd = os.pidfd_open(pid)
                except OSError:  # kernel without pidfd support: fall back to polling
                    pidfd = -1
            _parent_fds.update(fd for fd in (rfd, shm_fd, pidfd) if fd >= 0)
            os.set_blocking(rfd, False)
            deadline = started + limits.timeout if limits.timeout is not None else None
            child = Child(pid, rfd, shm_fd, pidfd, limits, deadline, task or _describe_task(fn), rss_at_fork)
        except BaseException:
            _parent_fds.difference_update((rfd, shm_fd, pidfd))  # we hold _fork_lock here
            _abandon(pid, rfd, wfd, shm_fd, pidfd)
            raise
    return child


def _child_just_forked(wfd: int) -> int:
    """The pid of the child this thread has just forked, which holds ``wfd`` (the result pipe)."""
    pipe = f"pipe:[{os.fstat(wfd).st_ino}]"
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/children") as f:
            pids = [int(pid) for pid in f.read().split()]
    except OSError:
        pids = []
    for pid in reversed(pids):
        try:
            if os.readlink(f"/proc/{pid}/fd/{wfd}") == pipe:
                return pid
        except OSError:
            continue
    raise ForkFailed(
        errno.ESRCH,
        "os.fork() raised its multi-threaded DeprecationWarning as an error after forking, and the "
        "child it made could not be found (it ends when it finds its result pipe closed). Something "
        "replaced the warning filters while dask_forkmap forked: its own filter matches only its forks",
    )


def _abandon(pid: int, *fds: int) -> None:
    """Kill and reap a child that has no Child yet, and close its channels (not in _parent_fds)."""
    _killpg(pid)
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
    for fd in fds:
        if fd >= 0:
            os.close(fd)


def _anonymous_rss() -> int:
    # A new child starts with the parent's anonymous pages resident (fork copies their page table
    # entries) but not necessarily its file-backed ones: resident minus shared is its baseline.
    sizes = _child.statm()
    return sizes[1] - sizes[2] if sizes is not None else 0


class Woken(Exception):
    """Internal: ``Child.collect`` was interrupted through its wake descriptor."""


class Child:
    """The parent's handle on one forked child; owned by one thread at a time."""

    __slots__ = ("_done", "_reader", "deadline", "limits", "pid", "pidfd", "rfd", "rss_at_fork", "shm_fd", "task")

    def __init__(
        self,
        pid: int,
        rfd: int,
        shm_fd: int,
        pidfd: int,
        limits: Limits,
        deadline: float | None,
        task: str,
        rss_at_fork: int = 0,
    ) -> None:
        self.pid = pid
        self.rfd = rfd
        self.shm_fd = shm_fd
        self.pidfd = pidfd
        self.limits = limits
        self.deadline = deadline
        self.task = task
        self.rss_at_fork = rss_at_fork  # the parent's anonymous RSS at the fork; 0: not measured
        self._done = False
        # What has arrived so far. It outlives one _wait: a wake-up (Woken) can come in the same poll
        # as part of the frame, and the owner then calls collect() again for the rest.
        self._reader = _transport.FrameReader()

    def collect(self, wake_fd: int = -1, *, release: Iterable[int] | None = None) -> Any:
        """Wait for the child's outcome; return the task's value or raise its error.

        If ``wake_fd`` becomes readable first, raise :class:`Woken` with the child still running; the
        owner then decides (``kill``, or ``collect`` again). Any other exception before the outcome
        is in hand (``KeyboardInterrupt``) kills and reaps the child before it propagates.
        ``release``: the signal mask to restore once that guard is in place (see :func:`fork_map`).
        """
        try:
            if release is not None:
                _child.pthread_sigmask(signal.SIG_SETMASK, release)
            return self._finish(self._wait(wake_fd))
        except Woken:
            raise
        except BaseException:
            self.kill()  # no-op once _finish has taken the outcome
            raise

    def _wait(self, wake_fd: int) -> _transport.FrameReader:
        poller = select.poll()
        poller.register(self.rfd, select.POLLIN)
        if self.pidfd >= 0:
            poller.register(self.pidfd, select.POLLIN)
        if wake_fd >= 0:
            poller.register(wake_fd, select.POLLIN)
        reader = self._reader
        pipe_open = True
        exited = False
        # The longest single poll: short without a pidfd (exits are polled for), and on the main thread.
        slice_ms: float | None = None
        if self.pidfd < 0:
            slice_ms = _EXIT_POLL_S * 1000
        elif threading.current_thread() is threading.main_thread():
            slice_ms = _MAIN_POLL_S * 1000
        while True:
            timeout_ms = slice_ms
            if self.deadline is not None:
                left = max(0.0, (self.deadline - time.monotonic()) * 1000)
                timeout_ms = min(left, _LONGEST_POLL_MS) if timeout_ms is None else min(timeout_ms, left)
            events = poller.poll(None if timeout_ms is None else int(timeout_ms + 0.999))
            for fd, _ in events:
                if fd == self.rfd:
                    if not reader.read_from(fd):
                        # EOF: the child closed its end (exited, or the task closed it). Its exit
                        # status, through the pidfd, decides what happened.
                        poller.unregister(fd)
                        pipe_open = False
                elif fd == self.pidfd:
                    exited = True
                elif fd == wake_fd:
                    raise Woken
            if reader.done():
                return reader
            if self.pidfd < 0 and not exited:
                exited = _has_exited(self.pid)
            if exited:
                if pipe_open:
                    # The child is gone; whatever it wrote is already in the pipe. Do not wait for
                    # EOF: a grandchild may hold the write end open.
                    reader.read_from(self.rfd)
                if reader.done():
                    return reader
                self._crashed(reader)
            if self.deadline is not None and time.monotonic() >= self.deadline:
                self._timed_out()

    def _finish(self, reader: _transport.FrameReader) -> Any:
        self._done = True
        kind = reader.kind()
        try:
            try:
                payload = reader.loads(self.shm_fd)
            except BaseException as exc:
                # Unpickling runs the result's own code in this process: whatever it raises, SystemExit
                # included, is a result that cannot arrive, never an end of the caller.
                type_name = reader.type_name()
                of_type = f" (of type{'s' if ', ' in (type_name or '') else ''} {type_name})" if type_name else ""
                raise ResultUnpicklingError(
                    f"the result of {self.task}{of_type} arrived but cannot be unpickled in this process "
                    f"({type(exc).__name__}: {exc}); return types this process can import",
                    type_name=type_name,
                    reason=f"{type(exc).__name__}: {exc}",
                ) from exc
        finally:
            self._release()
            _reaper.add(self.pid, self.pidfd)
        if kind == _child.KIND_VALUE:
            value, warns = payload
            _child.reemit_warnings(warns)
            return value
        if kind == _child.KIND_ERROR:
            err, warns = payload
            _child.reemit_warnings(warns)
            _name_task(err, self.task)
            text = getattr(err, "child_traceback", None)
            if text:
                raise err from ChildTraceback(text)
            raise err
        type_name, message, tb_text, blob, warns = payload
        _child.reemit_warnings(warns)
        task_exc: BaseException | None = None
        if blob is not None:
            try:
                task_exc = pickle.loads(blob)
            except Exception:
                task_exc = None
        if not isinstance(task_exc, BaseException):
            task_exc = TaskError.standing_in_for(type_name, message, tb_text)
        raise task_exc from ChildTraceback(tb_text)

    def _release(self) -> None:
        # The pidfd stays open: the reaper owns it from here on.
        close_ours(self.rfd, self.shm_fd)
        self.rfd = self.shm_fd = -1

    def _reap_now(self) -> tuple[int | None, int | None]:
        """Kill what is left of the child's process group and wait for the child.

        Returns its wait status and peak RSS in bytes (None when unknown).
        """
        _killpg(self.pid)
        status: int | None = None
        peak: int | None = None
        try:
            _, status, usage = os.wait4(self.pid, 0)
            peak = usage.ru_maxrss * 1024
        except ChildProcessError:  # reaped by someone else (SIGCHLD set to SIG_IGN)
            pass
        if self.pidfd >= 0:
            close_ours(self.pidfd)
            self.pidfd = -1
        return status, peak

    def kill(self) -> None:
        """Kill the child and its process group, and reap it (blocking until it is gone)."""
        if self._done:
            return
        self._done = True
        self._release()
        self._reap_now()

    def _crashed(self, reader: _transport.FrameReader) -> NoReturn:
        self._done = True
        self._release()
        status, peak = self._reap_now()
        grown = peak - self.rss_at_fork if peak is not None and self.rss_at_fork else None
        raise crash_error(self.pid, status, reader.text() if reader.not_a_frame else "", self.task, self.limits, grown)

    def _timed_out(self) -> NoReturn:
        self.kill()
        raise TaskTimeoutError(
            f"{self.task} did not finish within its {self.limits.timeout:g} s timeout; the child "
            f"(pid {self.pid}) and its process group were killed",
            pid=self.pid,
            timeout=self.limits.timeout or 0.0,
            task=self.task,
        )


def _name_task(err: BaseException, task: str) -> None:
    """Name the task in an error the child built, which knew only "the task" (see _child)."""
    if getattr(err, "task", "") is None:
        err.task = task  # type: ignore[attr-defined]
        if err.args and isinstance(err.args[0], str) and err.args[0].startswith("the task"):
            err.args = (task + err.args[0][len("the task") :], *err.args[1:])


def _has_exited(pid: int) -> bool:
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None


def _killpg(pid: int) -> None:
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


_SIGNAL_HINTS = {
    "SIGSEGV": "a segmentation fault, usually in a C extension",
    "SIGBUS": "a bus error, usually in a C extension or a truncated memory-mapped file",
    "SIGABRT": "abort(), usually a failed assertion in C code or an out-of-memory abort",
    "SIGKILL": "killed: by the kernel's OOM killer, a user, or the task itself",
    "SIGFPE": "an arithmetic fault in C code",
    "SIGILL": "an illegal instruction, often a binary built for another CPU",
}


def crash_error(
    pid: int, status: int | None, crash_text: str, task: str | None, limits: Limits, grown: int | None = None
) -> ChildCrashed:
    """Build the :class:`ChildCrashed` for a child that ended without a frame.

    ``grown`` is how much the child's resident memory grew beyond its parent's (None if unknown).
    """
    exitcode: int | None = os.waitstatus_to_exitcode(status) if status is not None else None
    signame: str | None = None
    if exitcode is not None and exitcode < 0:
        try:
            signame = signal.Signals(-exitcode).name
        except ValueError:
            signame = f"signal {-exitcode}"
    what = f"{task} " if task else ""
    if signame is not None:
        how = f"was killed by {signame} ({_SIGNAL_HINTS.get(signame, 'a fatal signal')})"
    elif exitcode is None:
        how = "ended with an unknown status (was SIGCHLD set to SIG_IGN?)"
    elif exitcode == _child.EXIT_PARENT_GONE:
        how = "could not report back (its result pipe was closed)"
    elif exitcode == _child.EXIT_INTERNAL:
        how = (
            f"exited with code {exitcode}: dask_forkmap's code in the child failed to report the outcome "
            "(did the task close file descriptors it did not open?)"
        )
    else:
        how = f"exited with code {exitcode} (os._exit or a C-level exit in the task)"
    message = f"the child running {what}(pid {pid}) {how} before sending a result"
    limit = limits.memory_limit
    if limit is not None and signame in ("SIGKILL", "SIGABRT", "SIGSEGV") and (grown is None or grown >= limit // 2):
        # Only when it came near the limit: ForkIsolation always sets one, and a plain segfault
        # should not read as a memory problem.
        message += f"; it ran under a memory limit of {limit} bytes, which it may have hit"
    stack = _trim_crash_text(crash_text) or None
    if stack and exitcode == _child.EXIT_INTERNAL:
        message += "\n\n" + stack
    elif stack:
        message += "\n\nPython stack at the crash site:\n" + stack
    return ChildCrashed(message, pid=pid, exitcode=exitcode, signal=signame, crash_stack=stack, task=task)


_CHILD_FILE = _child.__file__
# Files whose frames only lead into the task (a layer's wrapper, dask's Task.__call__): trailing
# frames from them are dropped from crash stacks. Layers add theirs with register_wrappers().
_wrapper_files: set[str] = set()


def register_wrappers(*modules: Any) -> None:
    """Drop frames of these modules from the outer end of crash stacks (they only call the task)."""
    _wrapper_files.update(f'"{m.__file__}"' for m in modules)


def _trim_crash_text(text: str) -> str:
    # faulthandler lists frames most recent first; from dask_forkmap's own child frame on, the stack
    # is our machinery and then the parent's stack at the time of the fork: neither is the task's.
    # It ends with a long list of loaded extension modules, which is no use in an error either, nor
    # is a C stack (3.14+, should anything turn it back on).
    lines: list[str] = []
    skipping = False
    for line in text.strip().splitlines():
        if line.startswith(("Extension modules:", "Current thread's C stack")):
            break
        if line.startswith("  File "):
            skipping = skipping or f'"{_CHILD_FILE}"' in line
            if skipping:
                continue
        else:
            skipping = False
        lines.append(line)
    while lines and (not lines[-1].strip() or lines[-1][7:].split(",")[0] in _wrapper_files):
        lines.pop()
    return "\n".join(lines).strip()


class _Reaper:
    """A daemon thread that reaps children whose result has already been collected.

    Waiting for a finished child's exit is off the caller's path: the child's teardown takes
    milliseconds to tens of milliseconds after its frame is complete. The thread ends after
    ``_REAPER_LINGER_S`` with nothing to reap; lingering that long keeps calls in a row from paying
    for a thread start each.
    """

    def __init__(self) -> None:
        # Entered through the lock, never the Condition: Condition.__exit__ is Python code that a
        # KeyboardInterrupt could interrupt before it releases (see SignalSafeLock).
        self._lock = SignalSafeLock()
        self._cond = threading.Condition(self._lock)
        self._pending: dict[int, int] = {}  # pid -> pidfd (-1: poll)
        self._thread: threading.Thread | None = None
        self._wake_r = self._wake_w = -1

    def add(self, pid: int, pidfd: int) -> None:
        with self._lock:
            self._pending[pid] = pidfd
            if self._thread is None:
                self._wake_r, self._wake_w = open_pipe()
                self._thread = QuietThread(target=self._run, name="dask-forkmap-reaper", daemon=True)
                self._thread.start()
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:  # pragma: no cover - the pipe is full of wake-ups already
            pass

    def wait(self, *, pids: set[int] | None = None, timeout: float | None = None) -> bool:
        """Wait until ``pids`` (default: all pending) are reaped; False on timeout."""
        with self._lock:
            return self._cond.wait_for(
                lambda: not (self._pending.keys() & pids if pids is not None else self._pending), timeout
            )

    def pending(self) -> set[int]:
        with self._lock:
            return set(self._pending)

    def _run(self) -> None:
        while True:
            with self._lock:
                items = list(self._pending.items())
            poller = select.poll()
            poller.register(self._wake_r, select.POLLIN)
            for _, pidfd in items:
                if pidfd >= 0:
                    poller.register(pidfd, select.POLLIN)
            polling = any(pidfd < 0 for _, pidfd in items)
            timeout = int(_EXIT_POLL_S * 1000) if polling else None if items else int(_REAPER_LINGER_S * 1000)
            ready = {fd for fd, _ in poller.poll(timeout)}
            if not items and not ready:
                with self._lock:
                    if not self._pending:
                        # Idle: end, so that no thread of ours outlives the work (a test's thread-leak
                        # check sees none); the next child starts another.
                        self._thread = None
                        return
                continue
            if self._wake_r in ready:
                try:
                    while os.read(self._wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
            for pid, pidfd in items:
                if (pidfd >= 0 and pidfd in ready) or (pidfd < 0 and _has_exited(pid)):
                    self._reap(pid, pidfd)

    def _reap(self, pid: int, pidfd: int) -> None:
        _killpg(pid)  # grandchildren left in the group; the zombie still holds the pid
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        if pidfd >= 0:
            close_ours(pidfd)
        with self._lock:
            self._pending.pop(pid, None)
            self._cond.notify_all()


_reaper = _Reaper()


def _after_fork_in_child() -> None:
    # Whatever forked us (dask_forkmap or anyone else) may have held the lock, and the reaper thread
    # does not exist here. Forget the parent's descriptors without closing them: they may be in use
    # by whoever forked, and our own children close the ones they inherit.
    global _fork_lock, _reaper
    _child.forget_channel()  # forked by a task in one of our children: its channel is not ours
    _fork_lock = SignalSafeLock()
    _parent_fds.clear()
    _reaper = _Reaper()
    _forget_dask_thread_pools()


def _forget_dask_thread_pools() -> None:
    """Let dask's threaded scheduler start afresh in a child.

    It keeps its thread pools in module globals; a child inherits the pool objects but not their
    threads, so a task that calls ``.compute()`` with the threads scheduler would queue its work
    on a pool nobody serves and hang. The pools' lock may also have been held at the fork.
    """
    threaded: Any = sys.modules.get("dask.threaded")  # its globals, not a typed API
    if threaded is None or not hasattr(threaded, "pools"):
        return
    threaded.default_pool = None
    threaded.pools = type(threaded.pools)(dict)
    threaded.pools_lock = threading.Lock()


if HAS_FORK:
    os.register_at_fork(after_in_child=_after_fork_in_child)


def fork_map(fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
    """Run ``fn(*args, **kwargs)`` in a forked child and return its result.

    ``fn`` and its arguments are never pickled: the child sees the parent's memory copy-on-write,
    so lambdas, closures, locks, open files and large arrays all work as inputs. Only the result comes
    back, pickled with protocol 5 (cloudpickle when plain pickle refuses it); large buffers arrive
    through shared memory, without a copy in the parent. Whatever the call leaks, corrupts or
    mutates dies with the child.

    Parameters
    ----------
    fn : callable
        The function to run in the child; a :class:`Limited` (from :func:`with_limits`) brings its
        limits along.
    *args, **kwargs
        Passed to ``fn``, all of them: limits (a timeout, a memory limit) come from
        :func:`with_limits` or ``dask.config`` (``forkmap.timeout``, ``forkmap.memory-limit``),
        never from keyword arguments.

    Returns
    -------
    object
        What ``fn`` returned, unpickled in the parent. The call returns as soon as the result has
        arrived; the child's exit is reaped in the background.

    Raises
    ------
    Exception
        Whatever ``fn`` raised, with its original type and the child's traceback as ``__cause__``.
    ChildCrashed
        The child died without a result (segfault, abort, ``os._exit``, OOM kill).
    TaskTimeoutError
        The task ran past its timeout.
    MemoryLimitExceeded
        The task tried to allocate past its memory limit.
    TaskInterrupted
        The task raised ``KeyboardInterrupt`` or ``SystemExit``, which end the child only.
    TaskError
        The task's exception could not be re-created in the parent.
    ResultPicklingError, ResultUnpicklingError
        The result could not be pickled in the child, or unpickled in the parent.
    ForkFailed, ForkUnavailable
        No child could be forked. All of these are listed in :ref:`failures`.
    KeyboardInterrupt
        Ctrl-C while waiting: the child and its process group are killed and reaped first.

    See Also
    --------
    ForkExecutor : many calls, several children at once.

    Examples
    --------
    >>> from dask_forkmap import fork_map
    >>> value = 4
    >>> fork_map(lambda: value * 10)
    40
    """
    # A Ctrl-C handled between the fork and collect()'s guard would leave the child running and
    # unreaped. Signals sent to this (the main) thread are held from before the fork until
    # collect() is ready to kill the child; one taken by another thread is flagged for this one
    # all the same, and spawn() and the guard below catch what it raises. What remains is the
    # instant between a call returning and its result being stored, which Python cannot close.
    held = _hold_signals()
    child: Child | None = None
    try:
        child = spawn(Job.of(fn, args, kwargs, Limits(), "fork_map's first argument"), sigmask=held)
        result: R = child.collect(release=held)
    except BaseException:
        if held is not None:
            _child.pthread_sigmask(signal.SIG_SETMASK, held)
        if child is not None:
            child.kill()  # no-op if collect() already killed it or took its outcome
        raise
    return result


def _hold_signals() -> set[int] | None:
    """Block asynchronous signals on the main thread; return the mask to restore (None: nothing held)."""
    if not _ASYNC_SIGNALS or threading.current_thread() is not threading.main_thread():
        return None
    return _child.pthread_sigmask(signal.SIG_BLOCK, _ASYNC_SIGNALS)
