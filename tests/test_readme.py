"""The README's example program: it runs, and it is ``docs/readme_example.py`` verbatim.

README.md shows the example as the first ```python block after the line
``<!-- readme-example -->``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
EXAMPLE = ROOT / "docs" / "readme_example.py"
MARKER = "<!-- readme-example -->"
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


def check_output(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("completion: ")
    assert len(lines) == 3 and all(line.startswith("log P(") for line in lines[1:])


def test_docs_example_runs(tmp_path: Path) -> None:
    check_output(run_example(EXAMPLE.read_text(encoding="utf-8"), tmp_path))


def test_readme_embeds_the_docs_example_verbatim() -> None:
    assert readme_example() == EXAMPLE.read_text(encoding="utf-8").replace("\r\n", "\n")


def test_readme_example_runs(tmp_path: Path) -> None:
    check_output(run_example(readme_example(), tmp_path))
