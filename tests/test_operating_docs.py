"""The Python snippets of the README's "Operating it" section and of docs/running.md's
operating sections run as written, each in a fresh interpreter."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SNIPPET = re.compile(r"^( *)```python\n(.*?)^\1```", re.MULTILINE | re.DOTALL)


def snippets(path: str, start: str, end: str | None) -> list[str]:
    """The ``python`` blocks of ``path`` between the headings ``start`` and ``end``."""
    text = (ROOT / path).read_text()
    section = text[text.index(start) :]
    if end is not None:
        section = section[: section.index(end)]
    found = []
    for indent, body in SNIPPET.findall(section):
        found.append("".join(line[len(indent) :] + "\n" for line in body.splitlines()))
    return found


SNIPPETS = [
    *snippets("README.md", "### Operating it", "## Testing your services"),
    *snippets("docs/running.md", "## The status server", None),
]


@pytest.mark.parametrize("code", SNIPPETS, ids=[f"snippet{i}" for i in range(len(SNIPPETS))])
def test_the_snippet_runs_as_written(code: str) -> None:
    finished = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert finished.returncode == 0, finished.stderr


def test_every_operating_section_has_its_snippets() -> None:
    assert len(SNIPPETS) == 4
    assert (
        "status page: http://127.0.0.1:"
        in subprocess.run(
            [sys.executable, "-c", SNIPPETS[0]],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    )
