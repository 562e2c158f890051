"""The README's example program: it runs, and it is ``docs/readme_example.py`` verbatim.

README.md shows the example as the first ```python block after the line
``<!-- readme-example -->``. Its library sketch (the first ```python block under
``## The library``) is ``tests/typing/user_readme.py`` verbatim, which mypy
--strict checks (nox's typecheck session).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
EXAMPLE = ROOT / "docs" / "readme_example.py"
MARKER = "<!-- readme-example -->"
SKETCH_PROGRAM = ROOT / "tests" / "typing" / "user_readme.py"
TIMEOUT = 60


def readme_example() -> str:
    """The code of the first ```python block after the marker in README.md."""
    text = README.read_text(encoding="utf-8").replace("\r\n", "\n")
    if MARKER not in text:
        pytest.fail(
            f"README.md has no {MARKER!r} line: add it, followed by a ```python block "
            f"holding {EXAMPLE.relative_to(ROOT)} verbatim"
        )
    after = text.split(MARKER, 1)[1]
    m = re.search(r"^```python[ \t]*\n(.*?)^```[ \t]*$", after, re.DOTALL | re.MULTILINE)
    if m is None:
        pytest.fail(f"README.md has no ```python block after {MARKER!r}")
    return m.group(1)


def run_example(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POC_")}
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def readme_example_output() -> str:
    """The text of the first ``` block after the example's ```python block: the
    output the README shows for it."""
    after = README.read_text(encoding="utf-8").replace("\r\n", "\n").split(MARKER, 1)[1]
    blocks = re.findall(r"^```(\w*)[ \t]*\n(.*?)^```[ \t]*$", after, re.DOTALL | re.MULTILINE)
    assert len(blocks) >= 2 and blocks[0][0] == "python" and blocks[1][0] == "", blocks[:2]
    return str(blocks[1][1])


def check_output(result: subprocess.CompletedProcess[str]) -> None:
    # The output shown, exactly: it was checked line by line for its form only,
    # so a change of the reference model's output would have left the README
    # showing numbers the example no longer prints.
    assert result.returncode == 0, result.stderr
    assert result.stdout == readme_example_output()


def test_docs_example_runs(tmp_path: Path) -> None:
    check_output(run_example(EXAMPLE.read_text(encoding="utf-8"), tmp_path))


def test_readme_embeds_the_docs_example_verbatim() -> None:
    assert readme_example() == EXAMPLE.read_text(encoding="utf-8").replace("\r\n", "\n")


def test_readme_example_runs(tmp_path: Path) -> None:
    check_output(run_example(readme_example(), tmp_path))


def test_the_library_sketch_is_the_type_checked_program_verbatim() -> None:
    # The sketch passed manifest.shape (ReadoutManifest | None) on unchecked, and
    # reused one loop variable for three event types: pasted into a program,
    # mypy --strict refused it. tests/typing/user_readme.py holds it as is.
    text = README.read_text(encoding="utf-8").replace("\r\n", "\n")
    after = text.split("\n## The library\n", 1)[1]
    m = re.search(r"^```python[ \t]*\n(.*?)^```[ \t]*$", after, re.DOTALL | re.MULTILINE)
    assert m is not None, "no ```python block under ## The library"
    program = SKETCH_PROGRAM.read_text(encoding="utf-8")
    begin, end = "    # README sketch begins\n", "    # README sketch ends\n"
    embedded = program.split(begin, 1)[1].split(end, 1)[0]
    assert textwrap.dedent(embedded) == m.group(1)
    assert "readout_shape=manifest.shape" not in m.group(1)  # the None check is shown
