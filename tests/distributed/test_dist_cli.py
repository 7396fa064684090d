"""ForkIsolation on a cluster started from the command line: ``dask scheduler`` and ``dask worker``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import forkmap_dist_checks as checks
import forkmap_dist_tasks as t
import pytest
from distributed import Client


def _pythonpath() -> str:
    # The scheduler unpickles task graphs and the workers run them: both import the test tasks.
    here = os.path.dirname(os.path.abspath(__file__))
    return os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)


@pytest.fixture
def spawn(tmp_path):
    """Start ``python -m dask ...`` commands; stop them (and their nannies' workers) at the end."""
    procs: list[subprocess.Popen] = []

    def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(tmp_path / f"proc-{len(procs)}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            [sys.executable, "-m", "dask", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": _pythonpath(), **(env or {})},
            start_new_session=True,  # one group per command: the nanny and its worker go together
        )
        log.close()
        procs.append(proc)
        return proc

    yield start
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in reversed(procs):
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        try:  # whatever is left of the group (a worker whose nanny was killed)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _scheduler(spawn, tmp_path, *extra: str, env: dict[str, str] | None = None) -> str:
    scheduler_file = str(tmp_path / "scheduler.json")
    spawn(
        "scheduler",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--no-dashboard",
        "--scheduler-file",
        scheduler_file,
        *extra,
        env=env,
    )
    return scheduler_file


def _worker(spawn, scheduler_file: str, *extra: str, env: dict[str, str] | None = None) -> None:
    spawn(
        "worker",
        "--scheduler-file",
        scheduler_file,
        "--host",
        "127.0.0.1",
        "--nthreads",
        "2",
        "--no-dashboard",
        *extra,
        env=env,
    )


def test_worker_preload_flag_and_config_key(spawn, tmp_path):
    scheduler_file = _scheduler(spawn, tmp_path)
    _worker(spawn, scheduler_file, "--preload", "dask_forkmap.preload")
    _worker(spawn, scheduler_file, env={"DASK_DISTRIBUTED__WORKER__PRELOAD": '["dask_forkmap.preload"]'})
    with Client(scheduler_file=scheduler_file, timeout=t.WAIT) as client:
        client.wait_for_workers(2, timeout=t.WAIT)
        types = client.run(t.executor_type)
        assert [e["default"] for e in types.values()] == ["ForkIsolatedExecutor"] * 2
        checks.check_all(client, 2)


def test_scheduler_preload_isolates_every_worker(spawn, tmp_path):
    # forkmap.distributed.* is read where the plugin is made: here, on the scheduler.
    scheduler_file = _scheduler(
        spawn, tmp_path, "--preload", "dask_forkmap.preload", env={"DASK_FORKMAP__DISTRIBUTED__TIMEOUT": "120"}
    )
    _worker(spawn, scheduler_file)
    with Client(scheduler_file=scheduler_file, timeout=t.WAIT) as client:
        client.wait_for_workers(1, timeout=t.WAIT)
        checks.check_results_and_pids(client)
        checks.check_segfault(client)
        _worker(spawn, scheduler_file)  # a worker that joins later is isolated too
        client.wait_for_workers(2, timeout=t.WAIT)
        types = client.run(t.executor_type)
        assert [e["default"] for e in types.values()] == ["ForkIsolatedExecutor"] * 2
        limits = client.run(lambda dask_worker: dask_worker.executors["default"].limits.timeout)
        assert list(limits.values()) == [120.0, 120.0]
