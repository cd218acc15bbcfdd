"""A `dqmig incoming` process on 127.0.0.1, for a migration with no destination given."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile


class LocalDestination:
    """A `dqmig incoming` process on 127.0.0.1, started for `dqmig migrate` with no --to."""

    START_TIMEOUT_S = 30.0

    def __init__(self, proc: subprocess.Popen, uri: str, report: str) -> None:
        self.proc, self.uri, self.report = proc, uri, report
        self.error: str | None = None

    @classmethod
    def start(cls, run_after: float, mem_prealloc: bool = False) -> LocalDestination:
        fd, report = tempfile.mkstemp(prefix="dqmig-incoming-", suffix=".json")
        os.close(fd)
        cmd = [sys.executable, "-m", "dqmig", "incoming", "tcp:127.0.0.1:0", "--accept-timeout", "60"]
        cmd += ["--run-after", str(run_after), "--report", report] + (["--mem-prealloc"] if mem_prealloc else [])
        # Its own process group: a Ctrl-C at the terminal is the source's to handle (it cancels
        # the migration), not a second signal that kills the destination under it.
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, process_group=0)
        ready, _, _ = select.select([proc.stdout], [], [], cls.START_TIMEOUT_S)
        line = proc.stdout.readline() if ready else ""  # type: ignore[union-attr]
        if "listening on " not in line:
            proc.kill()
            err = proc.communicate(timeout=5)[1]
            raise OSError(f"local destination did not start: {line.strip() or err.strip()}")
        return cls(proc, line.rsplit("listening on ", 1)[1].strip(), report)

    def finish(self) -> dict | None:
        """Waits for the destination to end and returns its report; None if it failed, with
        its reason in `self.error` (the caller decides whether that is worth showing)."""
        try:
            out, err = self.proc.communicate(timeout=self.START_TIMEOUT_S + 60)
        except subprocess.TimeoutExpired:
            self.kill()
            self.error = "the destination did not end in time"
            return None
        if self.proc.returncode != 0:
            self.error = err.strip() or out.strip()
            return None
        with open(self.report) as f:
            return json.load(f)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if os.path.exists(self.report):
            os.unlink(self.report)
