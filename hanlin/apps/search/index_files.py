"""Which files an `add` looks at: named files, and folders walked recursively (hidden entries left out)."""

from __future__ import annotations

import os
from pathlib import Path

from hanlin.apps.search.errors import SearchError


def resolve_source(path: str | Path) -> str:
    """The `source` a file is stored under: its absolute path with symlinks resolved; URLs as given."""
    text = str(path)
    if "://" in text:
        return text
    return str(Path(text).expanduser().resolve())


def collect_files(paths: list[str | Path]) -> list[Path]:
    """Every file under `paths`, each once, in a stable order; SearchError naming paths that do not exist."""
    missing = [str(path) for path in paths if not Path(path).expanduser().exists()]
    if missing:
        raise SearchError(f"no such file or folder: {', '.join(missing)}")
    files: dict[str, Path] = {}
    for path in paths:
        path = Path(resolve_source(path))
        if path.is_dir():
            for file in _walk(path):
                files.setdefault(str(file), file)
        else:
            files.setdefault(str(path), path)
    return list(files.values())


def _walk(folder: Path) -> list[Path]:
    found: list[Path] = []
    for root, dirs, names in os.walk(folder, followlinks=False):
        dirs[:] = sorted(name for name in dirs if not name.startswith("."))
        for name in sorted(names):
            if not name.startswith("."):
                file = Path(root) / name
                if file.is_file():
                    found.append(file.resolve())
    return found
