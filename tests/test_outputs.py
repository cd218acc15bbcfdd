"""Output paths are checked before the work: a path the run could not write fails at once,
exit 2, with one line naming the option and the path."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from test_experiments_results import fake_compare

from dqmig.cli import main
from dqmig.experiments import results
from dqmig.outputs import OutputError, check_dir, check_file

RUN_S = 60.0
UNWRITABLE = "/proc/x"  # /proc takes no new files, even for root
needs_proc = pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc")


def test_writable_paths_pass_and_nothing_is_left_behind(tmp_path):
    check_file(tmp_path / "r.json", "--report")
    (tmp_path / "old.json").write_text("kept")
    check_file(tmp_path / "old.json", "--report")
    check_dir(tmp_path / "new" / "deeper", "--out")
    check_dir(tmp_path, "--out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.json"]
    assert (tmp_path / "old.json").read_text() == "kept"


@pytest.mark.parametrize(
    ("check", "path", "message"),
    [
        (check_file, "/nonexistent/dir/r.json", "--x /nonexistent/dir/r.json: directory /nonexistent/dir does not"),
        (check_file, "{tmp}", "--x {tmp}: is a directory"),
        (check_file, "{tmp}/f/r.json", "--x {tmp}/f/r.json: directory {tmp}/f is not a directory"),
        (check_dir, "{tmp}/f", "--x {tmp}/f: exists and is not a directory"),
        (check_dir, "{tmp}/f/sub", "--x {tmp}/f/sub: {tmp}/f is not a directory"),
        pytest.param(check_file, "/proc/r.json", "cannot create files in /proc", marks=needs_proc),
        pytest.param(check_dir, UNWRITABLE, f"--x {UNWRITABLE}: cannot create files in /proc", marks=needs_proc),
    ],
)
def test_unwritable_paths_name_the_option_and_the_path(tmp_path, check, path, message):
    (tmp_path / "f").write_text("a file")
    with pytest.raises(OutputError) as e:
        check(path.format(tmp=tmp_path), "--x")
    assert message.format(tmp=tmp_path) in str(e.value)


def saved_results(tmp_path):
    out = tmp_path / "saved"
    out.mkdir()
    results.save(fake_compare(), out / "results.json")
    return str(out)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "--seconds", "0.2", "--json", "/nonexistent/dir/r.json"], "--json /nonexistent/dir/r.json: directory"),
        (["migrate", "--report", "/nonexistent/dir/r.json"], "--report /nonexistent/dir/r.json: directory"),
        (["incoming", "tcp:127.0.0.1:0", "--report", "/nonexistent/r.json"], "--report /nonexistent/r.json"),
        pytest.param(["compare", "--out", UNWRITABLE], f"--out {UNWRITABLE}: cannot create", marks=needs_proc),
        pytest.param(["sweep", "bandwidth", "--out", UNWRITABLE], f"--out {UNWRITABLE}", marks=needs_proc),
        pytest.param(["report", "{saved}", "--out", UNWRITABLE], f"--out {UNWRITABLE}", marks=needs_proc),
        (["migrate", "--qmp", "unix:/nonexistent/q.sock", "--report", "{tmp}/r.json"], "/nonexistent/q.sock"),
    ],
)
def test_commands_check_their_outputs_before_the_work(tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path, saved=saved_results(tmp_path) if "{saved}" in a else "") for a in argv]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "", "nothing ran: no banner, no table"
    err = captured.err.strip()
    assert err.startswith("dqmig: error: ") and "\n" not in err
    assert message in err


def test_qmp_does_not_replace_a_file_that_is_not_a_socket(tmp_path, capsys):
    precious = tmp_path / "notes.txt"
    precious.write_text("mine")
    assert main(["migrate", "--qmp", f"unix:{precious}", "--report", str(tmp_path / "r.json")]) == 2
    assert f"{precious} exists and is not a socket" in capsys.readouterr().err
    assert precious.read_text() == "mine"


def test_the_console_exits_2_with_one_line():
    p = subprocess.run(
        [sys.executable, "-m", "dqmig", "migrate", "--report", "/nonexistent/dir/r.json"],
        capture_output=True,
        text=True,
        timeout=RUN_S,
    )
    assert p.returncode == 2
    assert p.stdout == ""
    assert p.stderr == "dqmig: error: --report /nonexistent/dir/r.json: directory /nonexistent/dir does not exist\n"
