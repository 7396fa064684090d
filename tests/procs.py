"""Process and descriptor probes shared by the test directories."""

from __future__ import annotations

import os
import select


def child_pids(parent: int | None = None, *, zombies_only: bool = False) -> set[int]:
    """Pids whose parent is ``parent`` (default: this process), read from /proc."""
    parent = os.getpid() if parent is None else parent
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name (field 2) may contain spaces and parentheses: split after its last ')'.
        fields = stat[stat.rindex(b")") + 2 :].split()
        state, ppid = fields[0], int(fields[1])
        if ppid == parent and (not zombies_only or state == b"Z"):
            found.add(int(entry))
    return found


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
