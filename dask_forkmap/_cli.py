"""The ``dask forkmap`` command line, also reachable as ``python -m dask_forkmap``.

Without a subcommand it runs ``demo``: ``python -m dask_forkmap`` alone is the demo.

dask's own CLI (``dask``) loads every ``dask_cli`` entry point and adds it as a subcommand, so
this module is imported by every ``dask ...`` invocation (``dask worker`` included): it imports
nothing heavy at module level, and each command imports what it needs when it runs.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click

__all__ = ["forkmap"]

_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(name="forkmap", context_settings=_CONTEXT, invoke_without_command=True)
@click.version_option(package_name="dask_forkmap", prog_name="dask_forkmap")
@click.pass_context
def forkmap(ctx: click.Context) -> None:
    """dask_forkmap: run Dask tasks in copy-on-write fork() children.

    Without a command, runs `demo` (with its defaults): a segfault, a leak and a global change,
    isolated, and a report.
    """
    if ctx.invoked_subcommand is None:
        ctx.invoke(demo)


@forkmap.command()
@click.option(
    "--local-only",
    is_flag=True,
    help="Run only part 1 (forkmap_get in this process), not the distributed cluster.",
)
@click.option(
    "--workers",
    "num_workers",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Children at a time in part 1.",
)
def demo(local_only: bool, num_workers: int) -> None:
    """Run misbehaving tasks, each in a forked child, and report what got through.

    Tasks that keep 100 MB in a module global, bump a module-global counter or segfault run first
    through forkmap_get (the local scheduler) with a progress bar, then on a 2-worker LocalCluster
    with the ForkIsolation plugin. The report shows the results, each crash (signal, exit code,
    where), and the RSS, globals, pids and restarts of this process and of the workers.

    Exits 0 if isolation held everywhere, 1 if anything reached this process or a worker.
    Takes 10 to 40 s; part 2 needs the distributed extra.
    """
    from ._demo import main

    sys.exit(main(distributed=not local_only, num_workers=num_workers))


def report_path() -> Path:
    """Where a source checkout keeps the benchmark report: next to the package directory."""
    import dask_forkmap

    return Path(dask_forkmap.__file__).resolve().parent.parent / "benchmarks" / "report.py"


@forkmap.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(args: tuple[str, ...]) -> None:
    """Run the benchmark report (benchmarks/report.py of a source checkout).

    ARGS go to the report unchanged, e.g. `bench --quick`; `bench -- --help` lists its options.
    It runs with this Python, and its exit status is this command's.
    """
    path = report_path()
    if not path.is_file():
        raise click.ClickException(
            f"{path} not found: the benchmark report runs from a source checkout of dask_forkmap"
            f" (this dask_forkmap is imported from {path.parent.parent / 'dask_forkmap'})."
            "\nTo run it: git clone the dask_forkmap repository; in the clone,"
            " pip install -e '.[bench]' && dask forkmap bench"
        )
    code = subprocess.run([sys.executable, str(path), *args], check=False).returncode
    # subprocess reports a report killed by signal N as -N; exit as a shell would show it, 128 + N.
    sys.exit(128 - code if code < 0 else code)
