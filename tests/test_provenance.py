"""Which commit results record, and how it is known: from a checkout tracking the package,
or from what the build recorded, checked against the installed Python files."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from dqmig import _native, provenance
from dqmig.provenance import blob_id, build_facts, checkout_facts, describe, python_differs

COMMIT = "0123456789abcdef0123456789abcdef01234567"
GIT_S = 10.0

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def git(where, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, timeout=GIT_S, check=True)
    return out.stdout.strip()


def tree_of(files: dict[str, bytes]) -> str:
    """A `git ls-tree -r COMMIT python` listing of `files` (paths below python/dqmig/)."""
    return "\n".join(f"100644 blob {blob_id(data)}\tpython/dqmig/{path}" for path, data in files.items())


@pytest.fixture
def package(tmp_path):
    files = {"__init__.py": b"x = 1\n", "sub/mod.py": b"y = 2\n", "scenarios/a.toml": b"name = 'a'\n"}
    for path, data in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(data)
    (tmp_path / "_native.cpython-311-x86_64-linux-gnu.so").write_bytes(b"\x7fELF")  # built, not committed
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"cache")
    return tmp_path, tree_of(files)


def test_blob_id_is_gits():
    assert blob_id(b"") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"  # `git hash-object /dev/null`
    assert blob_id(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"


def test_installed_files_as_committed_are_clean(package):
    path, tree = package
    assert not python_differs(tree, path)
    assert build_facts((COMMIT, False, tree), path) == {"commit": COMMIT, "dirty": False, "source": "build"}


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda p: (p / "sub/mod.py").write_bytes(b"y = 3\n"), id="edited"),
        pytest.param(lambda p: (p / "sub/mod.py").unlink(), id="removed"),
        pytest.param(lambda p: (p / "new.py").write_bytes(b""), id="added"),
    ],
)
def test_python_edits_after_the_build_make_it_dirty(package, change):
    path, tree = package
    change(path)
    assert python_differs(tree, path)
    assert build_facts((COMMIT, False, tree), path)["dirty"] is True
    assert build_facts((COMMIT, None, tree), path)["dirty"] is True


def test_rust_changes_at_build_time_count(package):
    path, tree = package
    assert build_facts((COMMIT, True, tree), path)["dirty"] is True
    assert build_facts((COMMIT, None, tree), path)["dirty"] is None, "unknown stays unknown"
    assert build_facts(None, path) is None


@needs_git
def test_a_checkout_counts_only_when_it_tracks_the_package(tmp_path):
    git(tmp_path, "init", "-q")
    pkg = tmp_path / "python" / "dqmig"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("x = 1\n")
    assert checkout_facts(pkg) is None, "an untracked folder inside a repository is no checkout of it"
    git(tmp_path, "add", ".")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "c")
    facts = checkout_facts(pkg)
    assert facts is not None
    assert facts["commit"] == git(tmp_path, "rev-parse", "HEAD")
    assert (facts["dirty"], facts["source"]) == (False, "checkout")
    (pkg / "__init__.py").write_text("x = 2\n")
    assert checkout_facts(pkg)["dirty"] is True


def test_the_running_dqmig_names_its_commit_and_source():
    facts = provenance.commit_facts()
    built = _native.build_commit()
    if facts is None:
        assert built is None, "a build that recorded a commit is never 'unknown'"
        return
    assert re.fullmatch(r"[0-9a-f]{40}", facts["commit"])
    assert facts["source"] in ("checkout", "build")
    if facts["source"] == "build":
        assert facts["commit"] == built[0]


def test_describe():
    assert describe(None).startswith("commit unknown")
    assert describe({"commit": COMMIT, "dirty": False, "source": "build"}) == "commit 0123456789ab recorded at build"
    checkout = describe({"commit": COMMIT, "dirty": True, "source": "checkout"})
    assert checkout == "commit 0123456789ab of this checkout, with local changes"
