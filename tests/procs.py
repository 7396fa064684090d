"""Process and descriptor probes shared by the test directories."""

from __future__ import annotations

import os
import select
from collections.abc import Iterator


def _stats() -> Iterator[tuple[int, list[bytes]]]:
    """(pid, the fields of /proc/pid/stat after the command name) for every live pid."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name (field 2) may contain spaces and parentheses: split after its last ')'.
        yield int(entry), stat[stat.rindex(b")") + 2 :].split()


def child_pids(parent: int | None = None, *, zombies_only: bool = False) -> set[int]:
    """Pids whose parent is ``parent`` (default: this process), read from /proc."""
    parent = os.getpid() if parent is None else parent
    return {pid for pid, fields in _stats() if int(fields[1]) == parent and (not zombies_only or fields[0] == b"Z")}


def session_pids(sid: int) -> set[int]:
    """Processes of session ``sid`` that are not zombies (forked children keep their session)."""
    return {pid for pid, fields in _stats() if int(fields[3]) == sid and fields[0] != b"Z"}


def open_fds() -> set[int]:
    """This process's open descriptors (not counting the one used to list them)."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            os.fstat(int(name))
        except OSError:  # the directory listing's own descriptor, closed by now
            continue
        found.add(int(name))
    return found


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait until process ``pid`` (any process, not only a child) has exited; False on timeout."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([pidfd], [], [], timeout)[0])
    finally:
        os.close(pidfd)


def threads_left(before: set[int | None], within: float) -> set[int | None]:
    """Threads not in ``before`` that are still alive after waiting up to ``within`` seconds for them.

    dask_forkmap's reaper thread ends on its own a moment after its last child: polled, never slept on
    blindly.
    """
    import threading
    import time

    deadline = time.monotonic() + within
    while True:
        extra = {t.ident for t in threading.enumerate()} - before
        if not extra or time.monotonic() > deadline:
            return extra
        time.sleep(0.05)
