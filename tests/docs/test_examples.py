"""Every Python example in README.md and docs/ runs, each as a program of its own.

An example is a fenced block whose language is Python (```python, and the look-alikes in
``PYTHON_FENCES``) in a Markdown page, or a ``.. code-block:: python`` in a reStructuredText page.
Each one becomes a test case named by file and line. It is written to a script of its own, padded
with blank lines so that a traceback gives the line in the page, and run in a fresh interpreter
with a timeout. When it has finished, the interpreter waits for dask_forkmap's reaper and fails if
the example left any child process behind.

A block that cannot run on its own must say so right before it, with a reason a reader can check:
``<!-- not executed: REASON -->`` in Markdown, ``.. not executed: REASON`` in reStructuredText.
Such blocks are reported as skipped, with their reason; any other block that fails fails the test.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
TESTS = ROOT / "tests"

PYTHON_FENCES = {"python", "python3", "py", "pycon", "ipython", "ipython3"}
EXAMPLE_TIMEOUT = 120  # seconds for one example's interpreter; the slowest starts a LocalCluster

_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
_MD_SKIP = re.compile(r"^\s*<!--\s*not executed:\s*(?P<reason>.*?)\s*-->\s*$")
_RST_BLOCK = re.compile(r"^(?P<indent>\s*)\.\.\s+(?:code-block|code|sourcecode)::\s*(?P<lang>\S+)\s*$")
_RST_SKIP = re.compile(r"^\s*\.\.\s+not executed:\s*(?P<reason>.*?)\s*$")


@dataclass(frozen=True)
class Example:
    path: Path
    line: int  # 1-based line of the block's first line of code
    code: str
    skip_reason: str | None

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def _previous_text_line(lines: list[str], index: int) -> str:
    for line in reversed(lines[:index]):
        if line.strip():
            return line
    return ""


def markdown_examples(path: Path) -> list[Example]:
    lines = path.read_text(encoding="utf-8").splitlines()
    found = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, indent = match["fence"], len(match["indent"])
        words = match["info"].split()
        language = words[0].lower() if words else ""
        body = []
        j = i + 1
        while j < len(lines):
            stripped = lines[j].strip()
            if stripped.startswith(fence[0] * len(fence)) and set(stripped) == {fence[0]}:
                break
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j].lstrip())
            j += 1
        if language in PYTHON_FENCES:
            skip = _MD_SKIP.match(_previous_text_line(lines, i))
            found.append(Example(path, i + 2, "\n".join(body) + "\n", skip["reason"] if skip else None))
        i = j + 1
    return found


def rst_examples(path: Path) -> list[Example]:
    lines = path.read_text(encoding="utf-8").splitlines()
    found = []
    for i, line in enumerate(lines):
        match = _RST_BLOCK.match(line)
        if not match or match["lang"].lower() not in PYTHON_FENCES:
            continue
        j = i + 1
        while j < len(lines) and lines[j].strip().startswith(":"):  # the directive's options
            j += 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        start = j
        base = len(match["indent"])
        while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > base):
            j += 1
        code = textwrap.dedent("\n".join(lines[start:j])).strip("\n") + "\n"
        skip = _RST_SKIP.match(_previous_text_line(lines, i))
        found.append(Example(path, start + 1, code, skip["reason"] if skip else None))
    return found


def all_examples() -> list[Example]:
    pages = [ROOT / "README.md", *sorted(DOCS.rglob("*.md")), *sorted(DOCS.rglob("*.rst"))]
    found = []
    for page in pages:
        if "_build" in page.relative_to(ROOT).parts:
            continue
        found += rst_examples(page) if page.suffix == ".rst" else markdown_examples(page)
    return found


EXAMPLES = all_examples()

# Runs the example as __main__ (as `python script.py` would), then checks that nothing is left.
_RUNNER = """
import runpy, sys
script, tests = sys.argv[1], sys.argv[2]
runpy.run_path(script, run_name="__main__")
sys.path.insert(0, tests)
from procs import child_pids
core = sys.modules.get("dask_forkmap._core")
if core is not None and not core._reaper.wait(timeout=30):
    sys.exit(f"dask_forkmap's children are still unreaped: {core._reaper.pending()}")
left = child_pids()
if left:
    sys.exit(f"the example left child processes behind: {sorted(left)}")
"""


def test_examples_are_found():
    """Guard against a parser that silently finds nothing."""
    pages = {example.path.name for example in EXAMPLES}
    assert {"README.md", "quickstart.md", "core.md", "scheduler.md", "distributed.md"} <= pages
    assert all(example.code.strip() for example in EXAMPLES), "an empty Python block"


def test_parsers_find_blocks_lines_and_markers(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "text\n\n```python\nx = 1\n```\n\n<!-- not executed: needs hardware we lack -->\n\n"
        "```python\nimport gpu\n```\n\n````markdown\n```python\nshown = 'not run'\n```\n````\n\n"
        "```console\n$ ls\n```\n\n- item\n\n  ```py\n  y = 2\n  ```\n"
    )
    found = [(e.line, e.code, e.skip_reason) for e in markdown_examples(page)]
    assert found == [(4, "x = 1\n", None), (10, "import gpu\n", "needs hardware we lack"), (26, "y = 2\n", None)]

    rst = tmp_path / "page.rst"
    rst.write_text(
        "Title\n=====\n\n.. code-block:: python\n   :caption: one\n\n   a = 1\n\n   b = 2\n\ntext\n\n"
        ".. not executed: shown, never run\n\n.. code-block:: python\n\n   c = 3\n"
    )
    found = [(e.line, e.code, e.skip_reason) for e in rst_examples(rst)]
    assert found == [(7, "a = 1\n\nb = 2\n", None), (17, "c = 3\n", "shown, never run")]


def test_skip_markers_give_a_reason():
    for example in EXAMPLES:
        assert example.skip_reason is None or len(example.skip_reason) >= 10, (
            f"{example.id}: 'not executed' needs a reason a reader can check"
        )


@pytest.mark.timeout(EXAMPLE_TIMEOUT + 60)
@pytest.mark.usefixtures("no_children_left")
@pytest.mark.parametrize("example", EXAMPLES, ids=[example.id for example in EXAMPLES])
def test_example(example: Example, tmp_path: Path) -> None:
    if example.skip_reason is not None:
        pytest.skip(f"{example.id} not executed: {example.skip_reason}")
    name = re.sub(r"[^A-Za-z0-9]+", "_", example.id)
    script = tmp_path / f"{name}.py"
    # Padded so that the interpreter's line numbers are the page's.
    script.write_text("\n" * (example.line - 1) + example.code, encoding="utf-8")
    env = dict(os.environ, PYTHONFAULTHANDLER="1")
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _RUNNER, str(script), str(TESTS)],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=EXAMPLE_TIMEOUT,
        )
    except subprocess.TimeoutExpired as exc:
        out, err = (s.decode(errors="replace") if isinstance(s, bytes) else s or "" for s in (exc.stdout, exc.stderr))
        pytest.fail(
            f"{example.id} still running after {EXAMPLE_TIMEOUT} s\n--- stdout ---\n{out}\n--- stderr ---\n{err}"
        )
    assert proc.returncode == 0, (
        f"{example.id} failed (exit code {proc.returncode})\n"
        f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
    )
