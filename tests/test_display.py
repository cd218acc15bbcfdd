"""The live progress line: every policy's throttle as the share of time each vCPU class
slept, the policy's own figure, and a hint, once, when pre-copy stops converging."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest

from dqmig.display import Progress, Watch, progress_line, sleep_shares
from dqmig.migration.params import MigrationParameters
from dqmig.units import MiB

CLASSES = ["writer", "reader"]


def query(**extra) -> dict:
    ram = {"transferred": 64 * MiB, "remaining": 30 * MiB, "dirty-pages-rate": 8000, "mbps": 268.0}
    return {"status": "active", "total-time": 4200, "ram": {**ram, "dirty-sync-count": 7}, **extra}


def sample(t: float, sleep_s: list[float], event: str = "tick", left: int = 30 * MiB) -> dict:
    return {
        "t": t,
        "event": event,
        "ram": {"remaining": left},
        "threshold": 9 * MiB,
        "vcpus": [{"sleep-ns": int(s * 1e9)} for s in sleep_s],
    }


def test_line_shows_sleep_shares_and_the_dirty_quota_pool():
    q = query(**{"dirty-quota": {"pool-pages": 37, "limit-pages-per-second": 2048}})
    line = progress_line(q, {"writer": 0.85, "reader": 0.0})
    assert "asleep writer  85% reader   0%" in line
    assert "pool 37 pg" in line
    assert "throttle" not in line and "not converging" not in line


def test_line_keeps_auto_converges_percentage_beside_the_shares():
    line = progress_line(query(**{"cpu-throttle-percentage": 30}), {"writer": 0.3, "reader": 0.29})
    assert "asleep writer  30% reader  29%" in line and "throttle 30%" in line


def test_line_before_a_second_of_samples_and_when_stalled():
    line = progress_line(query(), None, stalled=True)
    assert "asleep -" in line and "pool" not in line and "throttle" not in line
    assert line.endswith("not converging")
    assert progress_line({"status": "none"}).startswith("none")


def test_a_narrow_terminal_loses_the_spare_fields_first():
    q = query(**{"dirty-quota": {"pool-pages": 37}})
    asleep = {"writer": 0.85, "reader": 0.0}
    full = progress_line(q, asleep)
    assert progress_line(q, asleep, width=len(full)) == full
    fitted = progress_line(q, asleep, width=len(full) - 1)
    assert "sent " not in fitted and "dirty " in fitted and "pool 37 pg" in fitted
    narrow = progress_line(q, asleep, width=100)
    assert len(narrow) <= 100
    for kept in ("iter   7", "left   30.0 MiB", "asleep writer  85%", "pool 37 pg", "4.2 s"):
        assert kept in narrow
    assert len(progress_line(q, asleep, width=20)) == 20, "cut when dropping is not enough"


def test_sleep_shares_average_each_class():
    before = sample(1.0, [0.0, 0.0, 0.0])
    after = sample(2.0, [0.9, 0.5, 0.0])
    assert sleep_shares(before, after, ["writer", "writer", "reader"]) == pytest.approx({"writer": 0.7, "reader": 0.0})
    assert sleep_shares(after, after, ["writer", "writer", "reader"]) == {"writer": 0.0, "reader": 0.0}


def test_watch_reads_new_samples_and_keeps_the_last_second():
    w = Watch(CLASSES)
    samples = [sample(0.1 * i, [0.1 * i * 0.5, 0.0]) for i in range(5)]  # writer asleep half the time
    w.feed(samples)
    assert w.asleep() == pytest.approx({"writer": 0.5, "reader": 0.0})
    samples += [sample(0.5 + 0.1 * i, [0.2 + 0.1 * i, 0.0]) for i in range(1, 21)]  # then all the time
    samples.append(sample(2.6, [2.3, 0.0], event="sync", left=20 * MiB))
    w.feed(samples)
    assert w.asleep()["writer"] == pytest.approx(1.0), "only the last second counts"
    assert w.syncs == [(2.6, 20 * MiB)] and w.threshold == 9 * MiB
    assert w.asleep() is not None and Watch(CLASSES).asleep() is None


class FakeMigration:
    """What Progress reads of a Migration."""

    def __init__(self) -> None:
        self.samples: list[dict] = []
        self.vm = SimpleNamespace(writer_classes=lambda: CLASSES, dma=None)
        self.params = MigrationParameters(max_bandwidth=32 * MiB)
        self.policy = SimpleNamespace(name="dirty-limit")

    def sync(self, t: float, left_mib: float) -> None:
        self.samples.append(sample(t, [0.0, 0.0], event="sync", left=int(left_mib * MiB)))

    def query(self) -> dict:
        return query()


def test_progress_hints_once_per_stall_and_marks_the_line():
    m, out = FakeMigration(), io.StringIO()
    progress = Progress(m, out=out, every=0)  # type: ignore[arg-type]
    for i, left in enumerate([30, 31, 30.5, 32, 31]):  # no new low after the first, 5 s apart
        m.sync(5.0 * i, left)
        progress.update()
    m.sync(25.0, 12)  # a new low: it moves again
    progress.update()
    for i, left in enumerate([13, 12.5, 14]):
        m.sync(30.0 + 5 * i, left)
        progress.update()
    lines = out.getvalue().splitlines()
    hints = [line for line in lines if line.startswith("hint: ")]
    assert len(hints) == 2, "once per stall"
    assert "no dirty sync has left less than 30.0 MiB for 3 iterations (15 s)" in hints[0]
    assert "less than 12.0 MiB" in hints[1]
    assert "a higher max-bandwidth (now 32.0 MiB/s)" in hints[0] and "dirty-limit leaves a vCPU" in hints[0]
    marked = [line.endswith("not converging") for line in lines if not line.startswith("hint: ")]
    assert marked == [False, False, False, True, True, False, False, False, True]
