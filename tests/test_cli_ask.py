"""`hanlin ask` as a subprocess over a small real index."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _hanlin(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("HANLIN_")}
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), child_env.get("PYTHONPATH")]))
    child_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "hanlin.cli", *args], cwd=REPO_ROOT, env=child_env, text=True,
                          capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def index_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hanlin.apps.search.index import SearchIndex

    folder = tmp_path_factory.mktemp("docs")
    (folder / "viaweb.txt").write_text(
        "Viaweb was a startup founded in 1995 by Robert Morris and Paul Graham.\n"
        "The Viaweb software was written primarily in a programming language called Lisp.\n", encoding="utf-8")
    (folder / "tea.md").write_text("# Green tea\n\nGreen tea leaves are steamed soon after picking.\n", encoding="utf-8")
    path = tmp_path_factory.mktemp("index") / "index.db"
    with SearchIndex(path) as index:
        index.add([folder])
    return path


def test_ask_prints_the_answer_and_numbered_sources(index_file: Path) -> None:
    done = _hanlin("ask", "What language was the Viaweb software written in?", "--index", str(index_file),
                   "--max-queries", "1", "-k", "2", "--max-tokens", "40", "--writer", "per-source")
    assert done.returncode == 0, done.stderr
    assert "plan" in done.stderr and "search" in done.stderr and "read" in done.stderr
    assert "Sources" in done.stdout
    lines = done.stdout.splitlines()
    numbered = [line for line in lines if line.startswith("[1] ") or line.startswith("[2] ")]
    assert numbered and any("viaweb.txt" in line for line in lines)
    # the per-source writer cites the Lisp passage (the check keeps it: the passage says Lisp)
    assert "Lisp" in done.stdout and "[1]" in done.stdout.split("Sources")[0]


def test_ask_errors_are_one_line(tmp_path: Path) -> None:
    missing = _hanlin("ask", "anything", env={"HANLIN_INDEX": str(tmp_path / "none.db")})
    assert missing.returncode == 1
    assert "hanlin index add PATH" in missing.stderr and "Traceback" not in missing.stderr
    empty = _hanlin("ask", "  ", "--index", str(tmp_path / "none.db"))
    assert empty.returncode == 1 and "question is empty" in empty.stderr
    for option, value in [("--writer", "fancy"), ("--max-queries", "9"), ("--max-queries", "some")]:
        bad = _hanlin("ask", "anything", option, value, "--index", str(tmp_path / "none.db"))
        assert bad.returncode == 1 and option in bad.stderr and "Traceback" not in bad.stderr
