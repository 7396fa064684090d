"""Platform checks, limit validation and configuration."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import dask
import pytest

from dask_forkmap import Limits, TaskTimeoutError, fork_map, with_limits

# What Windows CPython lacks that dask_forkmap touches at import time. On 3.10-3.12 ctypes.CDLL(None)
# raises TypeError there (dlopen(NULL) has no Windows equivalent), which once made the import fail.
_AS_ON_WINDOWS = """
import ctypes, os, signal

class WindowsCDLL(ctypes.CDLL):
    def __init__(self, name, *args, **kwargs):
        if name is None:
            raise TypeError("LoadLibrary() argument 1 must be str, not None")
        super().__init__(name, *args, **kwargs)

ctypes.CDLL = WindowsCDLL
for module, names in ((os, ("register_at_fork", "memfd_create", "pidfd_open")), (signal, ("pthread_sigmask",))):
    for name in names:
        if hasattr(module, name):
            delattr(module, name)
"""


@pytest.mark.parametrize("setup", ["", _AS_ON_WINDOWS], ids=["without-os.fork", "as-on-windows"])
def test_without_fork_import_works_and_calls_fail_clearly(setup: str) -> None:
    code = setup + textwrap.dedent(
        """
        import os
        del os.fork  # as on Windows
        import dask_forkmap
        for call in (lambda: dask_forkmap.fork_map(int), lambda: dask_forkmap.ForkExecutor(1)):
            try:
                call()
            except dask_forkmap.ForkUnavailable as exc:
                assert isinstance(exc, dask_forkmap.ForkMapError)
                print("ForkUnavailable:", exc)
            else:
                raise SystemExit("no error")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("ForkUnavailable:") == 2
    assert "needs os.fork()" in proc.stdout


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"timeout": 0}, ValueError, "positive"),
        ({"timeout": -1}, ValueError, "positive"),
        ({"timeout": float("inf")}, ValueError, "finite"),
        ({"timeout": "5"}, TypeError, "number of seconds"),
        ({"memory_limit": 0}, ValueError, "positive"),
        ({"memory_limit": "lots"}, ValueError, "not a size"),
        ({"memory_limit": [1]}, TypeError, "number of bytes"),
    ],
)
def test_bad_limits_are_rejected(kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        Limits(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(error, match=match):
        with_limits(abs, **kwargs)  # type: ignore[arg-type]


def test_limits_parse_sizes() -> None:
    assert Limits(memory_limit="2 GiB").memory_limit == 2 * 1024**3
    assert Limits(memory_limit=1e6).memory_limit == 1_000_000


def test_with_limits_wraps_transparently() -> None:
    limited = with_limits(abs, timeout=3)
    assert limited(-4) == 4
    assert limited.__name__ == "abs"
    again = with_limits(limited, memory_limit="1 MiB")
    assert again.limits == Limits(timeout=3, memory_limit="1 MiB")
    with pytest.raises(TypeError, match="the function given to with_limits must be callable, not int"):
        with_limits(3)  # type: ignore[arg-type]


def test_config_sets_the_default_timeout() -> None:
    assert dask.config.get("forkmap.timeout") is None
    with dask.config.set({"forkmap.timeout": 0.5}), pytest.raises(TaskTimeoutError):
        fork_map(time.sleep, 30)
    # with_limits wins over the configuration.
    with dask.config.set({"forkmap.timeout": 0.5}):
        assert fork_map(with_limits(lambda: "ok", timeout=30)) == "ok"


def test_the_core_works_without_distributed() -> None:
    code = textwrap.dedent(
        """
        import sys
        sys.modules["distributed"] = None  # as if it were not installed
        import dask_forkmap
        assert dask_forkmap.fork_map(lambda: 6 * 7) == 42
        try:
            dask_forkmap.ForkIsolation
        except ImportError:
            print("ForkIsolation needs distributed")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ForkIsolation needs distributed"
