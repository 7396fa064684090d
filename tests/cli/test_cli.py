"""The command line: ``dask forkmap`` (dask's ``dask_cli`` entry point) and ``python -m dask_forkmap``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from procs import session_pids, wait_gone

from dask_forkmap import _cli

pytestmark = pytest.mark.usefixtures("no_children_left")
# The demo tests read /proc to find what a run left behind.
needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")

# Seconds for one command; pytest-timeout (a few seconds above it) ends anything that ignores it.
HELP_WAIT = 60
DEMO_WAIT = 200


def _run(*argv: str, wait: float = HELP_WAIT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=wait, check=False)


def _run_in_session(*argv: str, wait: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command in a session of its own; fail if any process of that session outlives it."""
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, env=env
    )
    try:
        out, err = proc.communicate(timeout=wait)
        left = {pid for pid in session_pids(proc.pid) if not wait_gone(pid, 30)}
        assert not left, f"processes of the command still running after it exited: {sorted(left)}"
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        for pid in session_pids(proc.pid):  # whatever a failed run left: workers, nannies, children
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.timeout(HELP_WAIT + 30)
def test_dask_forkmap_is_a_dask_subcommand():
    # The `dask` console script of this interpreter's environment, which loads the dask_cli entry points.
    dask = Path(sys.executable).parent / "dask"
    assert dask.exists(), f"no dask console script next to {sys.executable}"
    listing = _run(str(dask), "--help")
    assert listing.returncode == 0, listing.stderr
    assert "forkmap" in listing.stdout
    assert "While registering" not in listing.stderr  # dask warns when an entry point fails to load
    result = _run(str(dask), "forkmap", "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage: dask forkmap" in result.stdout
    assert "demo" in result.stdout
    assert "bench" in result.stdout


@pytest.mark.timeout(HELP_WAIT + 30)
@pytest.mark.parametrize("args", [["--help"], ["-h"]], ids=["--help", "-h"])
def test_python_m_shows_the_commands(args):
    result = _run(sys.executable, "-m", "dask_forkmap", *args)
    assert result.returncode == 0, result.stderr
    assert "Usage: python -m dask_forkmap" in result.stdout
    assert "demo" in result.stdout
    assert "bench" in result.stdout
    assert "Without a command, runs `demo`" in result.stdout


# Runs `python -m dask_forkmap ARGS` (the package's __main__) with the demo replaced by a stub that
# prints how it was called, so that what the command line chose shows without a 10-40 s demo run.
_STUB_DEMO = """\
import runpy, sys
import dask_forkmap._demo as demo
def main(**kwargs):
    print("demo ran with", sorted(kwargs.items()))
    return 0
demo.main = main
sys.argv = ["python -m dask_forkmap", *sys.argv[1:]]
runpy.run_module("dask_forkmap", run_name="__main__", alter_sys=True)
"""


@pytest.mark.timeout(HELP_WAIT + 30)
@pytest.mark.parametrize(
    ("args", "called"),
    [
        ([], "[('distributed', True), ('num_workers', 2)]"),  # alone, it is the demo with its defaults
        (["demo"], "[('distributed', True), ('num_workers', 2)]"),
        (["demo", "--local-only", "--workers", "3"], "[('distributed', False), ('num_workers', 3)]"),
    ],
    ids=["no-subcommand", "demo", "demo-with-options"],
)
def test_python_m_without_a_subcommand_runs_the_demo(args, called):
    result = _run(sys.executable, "-c", _STUB_DEMO, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [f"demo ran with {called}"]


def test_the_group_alone_invokes_the_demo_and_help_does_not(monkeypatch):
    from dask_forkmap import _demo

    calls = []
    monkeypatch.setattr(_demo, "main", lambda **kwargs: calls.append(kwargs) or 0)
    result = CliRunner().invoke(_cli.forkmap, [])
    assert result.exit_code == 0, result.output
    assert calls == [{"distributed": True, "num_workers": 2}]
    result = CliRunner().invoke(_cli.forkmap, ["--help"])
    assert result.exit_code == 0, result.output
    assert "Commands:" in result.output
    assert calls == [{"distributed": True, "num_workers": 2}]  # not run again


@needs_proc
@pytest.mark.timeout(DEMO_WAIT + 60)
def test_demo_end_to_end():
    pytest.importorskip("distributed")
    result = _run_in_session(sys.executable, "-m", "dask_forkmap", "demo", wait=DEMO_WAIT)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "FAILED" not in out
    assert "Isolation held" in out
    # The local crash names its key; each worker's crash fails alone, with the signal.
    assert "task 'segfault-local' failed the compute with ChildCrashed: killed by SIGSEGV" in out
    assert "task 'segfault-0' failed alone with ChildCrashed: killed by SIGSEGV" in out
    assert "task 'segfault-1' failed alone with ChildCrashed: killed by SIGSEGV" in out
    assert "in string_at (ctypes/__init__.py" in out  # the crash site from the child's stack
    assert "worker restarts: 0 " in out
    assert "(unchanged)" in out  # worker pids
    assert "100% Completed" in out  # both progress bars ran to the end


@needs_proc
@pytest.mark.timeout(DEMO_WAIT + 60)
def test_demo_exits_1_when_a_cluster_is_not_isolated():
    # Part 2 with a do-nothing plugin in place of ForkIsolation (the base class, which the spawned
    # workers can unpickle): the segfaults kill the workers, and the report must say so. With
    # allowed-failures 0 a worker's first death fails its tasks at once instead of retrying them.
    pytest.importorskip("distributed")
    code = (
        "import dask_forkmap._plugin as p; from distributed import WorkerPlugin; p.ForkIsolation = WorkerPlugin; "
        "from dask_forkmap._cli import forkmap; forkmap(['demo'], prog_name='python -m dask_forkmap')"
    )
    env = {**os.environ, "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"}
    result = _run_in_session(sys.executable, "-c", code, wait=DEMO_WAIT, env=env)
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    report = out.split("\nReport\n", 1)[1]
    local, cluster = report.split("ForkIsolation on a LocalCluster", 1)
    assert "FAILED" not in local  # part 1 is still isolated
    assert "FAILED  crash: task 'segfault-0' ended with KilledWorker" in cluster
    assert "FAILED  worker restarts: " in cluster
    assert "FAILED  worker pids: " in cluster
    assert "Isolation FAILED" in out


@needs_proc
@pytest.mark.timeout(DEMO_WAIT + 60)
def test_demo_without_distributed_runs_the_local_part():
    # None in sys.modules makes `import distributed` raise ImportError, as if it were not installed.
    code = (
        "import sys; sys.modules['distributed'] = None; "
        "from dask_forkmap._cli import forkmap; forkmap(['demo'], prog_name='python -m dask_forkmap')"
    )
    result = _run_in_session(sys.executable, "-c", code, wait=DEMO_WAIT)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "distributed is not installed" in out
    assert "pip install 'dask_forkmap[distributed]'" in out
    assert "killed by SIGSEGV" in out
    assert "worker" not in out.split("\nReport\n", 1)[1]
    assert "Isolation held" in out


def test_bench_without_a_report_says_where_it_runs(tmp_path, monkeypatch):
    missing = tmp_path / "benchmarks" / "report.py"
    monkeypatch.setattr(_cli, "report_path", lambda: missing)
    result = CliRunner().invoke(_cli.forkmap, ["bench", "--quick"])
    assert result.exit_code == 1
    assert f"{missing} not found" in result.output
    assert "runs from a source checkout" in result.output
    assert "pip install -e '.[bench]'" in result.output


def test_report_path_is_next_to_the_package():
    import dask_forkmap

    package = Path(dask_forkmap.__file__).resolve().parent
    assert _cli.report_path() == package.parent / "benchmarks" / "report.py"


_FAKE_REPORT = """\
import json, os, signal, sys
with open(os.environ["FAKE_REPORT_OUT"], "w") as f:
    json.dump({"executable": sys.executable, "argv": sys.argv[1:]}, f)
if "--die" in sys.argv:
    os.kill(os.getpid(), signal.SIGTERM)
sys.exit(3)
"""


@pytest.mark.timeout(HELP_WAIT + 30)
@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["--quick", "--repeat", "2", "extra"], 3),
        (["--", "--help"], 3),  # after "--", even --help goes to the report
        (["--die"], 128 + signal.SIGTERM),  # killed by a signal: exit like a shell reports it
    ],
)
def test_bench_runs_the_report_with_this_python(tmp_path, monkeypatch, capfd, args, code):
    import json

    report = tmp_path / "benchmarks" / "report.py"
    report.parent.mkdir()
    report.write_text(_FAKE_REPORT)
    out = tmp_path / "ran.json"
    monkeypatch.setattr(_cli, "report_path", lambda: report)
    monkeypatch.setenv("FAKE_REPORT_OUT", str(out))
    result = CliRunner().invoke(_cli.forkmap, ["bench", *args])
    assert result.exit_code == code, result.output + capfd.readouterr().err
    ran = json.loads(out.read_text())
    assert ran["executable"] == sys.executable
    assert ran["argv"] == [a for a in args if a != "--"]
