"""Output paths checked before the work starts, so a long run does not fail at its end.

Each check tries what the run will do later (create a file in the folder) and removes it,
since permission bits alone do not tell (root, read-only mounts, /proc).
"""

from __future__ import annotations

import tempfile
from pathlib import Path


class OutputError(ValueError):
    """An output path the run could not write; the message names the option and the path."""


def check_file(path: str | Path, option: str) -> None:
    """`path` can be written as a file (its folder exists and takes new files)."""
    p = Path(path)
    if p.is_dir():
        raise OutputError(f"{option} {path}: is a directory")
    folder = p.parent
    if not folder.is_dir():
        reason = "is not a directory" if folder.exists() else "does not exist"
        raise OutputError(f"{option} {path}: directory {folder} {reason}")
    _probe(folder, f"{option} {path}")


def check_dir(path: str | Path, option: str) -> None:
    """`path` is a folder that takes new files, or can be made one (with its parents)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputError(f"{option} {path}: exists and is not a directory")
    existing = p
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{option} {path}: {existing} is not a directory")
    _probe(existing, f"{option} {path}")


def _probe(folder: Path, what: str) -> None:
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".dqmig-probe-"):
            pass
    except OSError as e:
        raise OutputError(f"{what}: cannot create files in {folder}: {e.strerror or e}") from None
