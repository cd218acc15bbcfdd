"""Which dqmig is running: the git commit it comes from, and how that is known.

- "checkout": the package's own files are tracked by a git checkout (run from the source,
  or `pip install -e .`): that checkout's HEAD and whether it has local changes.
- "build": an installed copy (`pip install .`): the commit rust/build.rs recorded when the
  extension was built. Its Rust inputs were checked for local changes then; the installed
  Python files are compared here with that commit's, so edits made after the build count.
- None: neither (an sdist, no git).
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import Any

from dqmig import __version__, _native

PACKAGE = Path(__file__).resolve().parent
GIT_TIMEOUT_S = 5.0
TREE_PREFIX = "python/dqmig/"  # where the package lives in the repository
NOT_SOURCE = (".so", ".pyc")  # installed files that no commit holds


def commit_facts(package: Path = PACKAGE) -> dict[str, Any] | None:
    """{"commit", "dirty", "source": "checkout" | "build"}, or None when unknown."""
    return checkout_facts(package) or build_facts(_native.build_commit(), package)


def describe(facts: dict[str, Any] | None) -> str:
    """One line for `dqmig --version`."""
    if facts is None:
        return "commit unknown: not a checkout, and not built from one"
    dirty = {True: ", with local changes", False: "", None: ", local changes unknown"}[facts["dirty"]]
    where = "of this checkout" if facts["source"] == "checkout" else "recorded at build"
    return f"commit {facts['commit'][:12]} {where}{dirty}"


def version() -> str:
    return f"dqmig {__version__} ({describe(commit_facts())})"


def checkout_facts(package: Path) -> dict[str, Any] | None:
    """HEAD of the checkout that tracks `package` (not merely a folder inside some repository)."""
    try:
        _git(package, "ls-files", "--error-unmatch", "__init__.py")
        commit = _git(package, "rev-parse", "--verify", "HEAD")
        dirty = bool(_git(package, "status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    facts: dict[str, Any] = {"commit": commit, "dirty": dirty, "source": "checkout"}
    built = _native.build_commit()
    if built is not None and built[0] != commit:
        facts["build-commit"] = built[0]  # the extension was built at another commit
    return facts


def build_facts(built: tuple[str, bool | None, str] | None, package: Path) -> dict[str, Any] | None:
    """What the build recorded, `built` = _native.build_commit(), checked against `package`."""
    if built is None:
        return None
    commit, rust_dirty, tree = built
    dirty = True if python_differs(tree, package) else rust_dirty
    return {"commit": commit, "dirty": dirty, "source": "build"}


def python_differs(tree: str, package: Path) -> bool:
    """Whether the files in `package` differ from `tree` (`git ls-tree -r COMMIT python`)."""
    expected: dict[str, str] = {}
    for line in tree.splitlines():
        meta, _, path = line.partition("\t")
        if path.startswith(TREE_PREFIX):
            expected[path[len(TREE_PREFIX) :]] = meta.split()[-1]
    installed = {
        p.relative_to(package).as_posix(): p
        for p in package.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in NOT_SOURCE
    }
    if set(installed) != set(expected):
        return True
    return any(blob_id(installed[rel].read_bytes(), len(oid)) != oid for rel, oid in expected.items())


def blob_id(data: bytes, hex_digits: int = 40) -> str:
    """git's object id of a blob: SHA-1, or SHA-256 in a sha256 repository."""
    h = hashlib.sha256() if hex_digits == 64 else hashlib.sha1()
    h.update(b"blob %d\0" % len(data) + data)
    return h.hexdigest()


def _git(where: Path, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, timeout=GIT_TIMEOUT_S, check=True)
    return out.stdout.strip()
