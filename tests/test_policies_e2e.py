"""End to end: each throttling policy migrates a skewed guest over a bandwidth cap.

One heavy writer (uniform random writes at about 2x the bandwidth) and one read-mostly
vCPU. Plain pre-copy cannot converge; the three policies do. Dirty quota throttles only the
writer, so the reader keeps its pace; auto-converge slows every vCPU alike.

The reader's pace is its progress per second it was either running or put to sleep by the
policy (thread CPU time + throttle sleep; the runner's GuestClock), not per wall-clock second: a busy host takes CPU
from the reader under every policy alike, and on a 2-core machine shared with other jobs
that alone moved the wall-clock pace by 35 %. What the policy takes, the sleeps, still counts.
"""

from __future__ import annotations

import threading
import time

import pytest

from dqmig import policies
from dqmig.display import Watch, progress_line
from dqmig.experiments.runner import GuestClock
from dqmig.migration.destination import Incoming, IncomingError
from dqmig.migration.params import MigrationParameters
from dqmig.migration.source import Migration
from dqmig.programs import ProgramSpec, own_regions
from dqmig.units import MiB
from dqmig.vm import VM, VmConfig

MEMORY = 64 * MiB
BANDWIDTH = 32 * MiB
WRITER_RATE = 16384  # steps/s of 8-byte random writes: about 64 MiB/s of newly dirty pages
NONE_CAP_S = 6.0
POLICY_CAP_S = 60.0
BASELINE_S = 1.5


def skewed_config() -> VmConfig:
    pages = MEMORY // 4096
    (w_start, w_pages), (r_start, r_pages) = own_regions(pages, 2)
    writer = ProgramSpec("uniform", region_start=w_start, region_pages=w_pages, rate=WRITER_RATE, seed=1)
    reader = ProgramSpec("read-mostly", region_start=r_start, region_pages=r_pages, seed=2)
    return VmConfig(vcpus=2, memory=MEMORY, dirty_ring=4096, programs=[writer, reader])


def migrate(policy: str) -> dict:
    """Runs one migration with `policy`; returns its outcome and the reader's pace."""
    incoming = Incoming("tcp:127.0.0.1:0", accept_timeout=30, io_timeout=30)
    received: dict = {}

    def receive() -> None:
        try:
            received["r"] = incoming.run()
        except IncomingError as e:  # expected when the source gives up (policy "none")
            received["error"] = e

    dest = threading.Thread(target=receive, daemon=True)
    dest.start()
    params = MigrationParameters(max_bandwidth=BANDWIDTH, x_max_time=NONE_CAP_S if policy == "none" else POLICY_CAP_S)
    policies.select(params, policy)
    vm = VM(skewed_config()).start()
    try:
        start = GuestClock.read(vm)
        time.sleep(BASELINE_S)
        baseline = start.paces(GuestClock.read(vm))[1]
        m = Migration(vm, incoming.address, params)
        start = GuestClock.read(vm)
        m.start()
        assert m.wait(POLICY_CAP_S + 30) in ("completed", "cancelled", "failed")
        # The reader ran until the switchover stopped it (or until now, if the source kept it).
        stop = next((s for s in m.samples if s["event"] == "stop"), None)
        during = start.paces(GuestClock.of_sample(stop) if stop else GuestClock.read(vm))[1]
        dest.join(30)
        if "r" in received:
            received["r"].vm.stop()
        return {
            "migration": m,
            "baseline": baseline.net_rate,
            "during": during.net_rate,
            "ratio": during.net_rate / baseline.net_rate,
            "wall_ratio": during.rate / baseline.rate,
            "received": received,
        }
    finally:
        if not vm.running:
            vm.resume()
        vm.stop()


@pytest.fixture(scope="module")
def outcomes() -> dict[str, dict]:
    return {p: migrate(p) for p in ("none", "dirty-quota", "auto-converge", "dirty-limit")}


def test_plain_precopy_does_not_converge_and_says_so(outcomes):
    m = outcomes["none"]["migration"]
    assert m.status == "cancelled"
    assert m.converged is False
    assert "did not converge" in m.error_desc
    assert "error" in outcomes["none"]["received"], "the destination must not resume"


@pytest.mark.parametrize("policy", ["dirty-quota", "auto-converge", "dirty-limit"])
def test_each_policy_converges(outcomes, policy):
    m = outcomes[policy]["migration"]
    assert m.status == "completed", m.error_desc
    assert m.converged is True
    assert m.policy_changes[0]["policy"] == policy


def test_dirty_quota_spares_the_reader(outcomes):
    dq = outcomes["dirty-quota"]
    assert dq["ratio"] >= 0.95, f"reader kept {dq['ratio']:.1%} of its pace (wall clock {dq['wall_ratio']:.1%})"


def test_auto_converge_slows_the_reader_clearly_more(outcomes):
    ac, dq = outcomes["auto-converge"], outcomes["dirty-quota"]
    assert ac["ratio"] < dq["ratio"] - 0.1, (
        f"auto-converge {ac['ratio']:.1%} vs dirty quota {dq['ratio']:.1%} "
        f"(wall clock {ac['wall_ratio']:.1%} vs {dq['wall_ratio']:.1%})"
    )


def test_throttle_telemetry_is_recorded(outcomes):
    ac = outcomes["auto-converge"]["migration"].samples
    assert max(s.get("cpu-throttle-percentage", 0) for s in ac) >= 20
    dq = outcomes["dirty-quota"]["migration"].samples
    assert any(s.get("quota-exits") and sum(s["quota-exits"]) > 0 for s in dq)
    assert all(s["dirty-quota"]["pool-pages"] >= 0 for s in dq if "dirty-quota" in s)
    dl = outcomes["dirty-limit"]["migration"].samples
    assert any(s.get("dirty-limit-throttle-time-per-round", 0) > 0 for s in dl)


def test_only_dirty_limit_sleeps_delay_the_switchover(outcomes):
    # Auto-converge's and dirty quota's sleeps end at the stop (QEMU's cpu_throttle_thread
    # checks cpu->stop). Dirty-limit puts the writer to sleep for seconds per ring-full with
    # g_usleep, which the stop waits out: that wait is x-stop-latency, inside the downtime.
    for policy in ("dirty-quota", "auto-converge", "dirty-limit"):
        q = outcomes[policy]["migration"].query()
        assert 0 <= q["x-stop-latency"] <= q["downtime"], f"{policy}: {q}"
        assert q["downtime"] - q["x-stop-latency"] < 1000, f"{policy}: downtime {q['downtime']} ms"
        if policy != "dirty-limit":
            assert q["x-stop-latency"] < 1000, f"{policy}: the stop waited {q['x-stop-latency']} ms"


@pytest.mark.parametrize("policy", ["dirty-quota", "auto-converge", "dirty-limit"])
def test_the_live_line_shows_each_policys_throttle(outcomes, policy):
    # The line reads the samples as they come; at some point it shows the writer asleep.
    m = outcomes[policy]["migration"]
    watch, lines, peak = Watch(m.vm.writer_classes()), [], {"writer": 0.0, "reader": 0.0}
    running = [s for s in m.samples if s["event"] in ("setup", "tick", "sync")]
    for i in range(1, len(running) + 1):
        watch.feed(running[:i])
        asleep = watch.asleep()
        lines.append(progress_line(running[i - 1], asleep))
        if asleep and asleep["writer"] > peak["writer"]:
            peak = asleep
    assert peak["writer"] > 0.2, f"{policy}: the writer's sleep share peaked at {peak['writer']:.0%}"
    if policy == "dirty-quota":
        assert peak["reader"] < peak["writer"] / 2, "dirty quota sleeps the writer, not the reader"
        assert all("pool " in line for line in lines[1:])
    if policy == "auto-converge":
        assert all("throttle " in line for line in lines)
