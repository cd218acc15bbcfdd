"""The virtual-time engine (dqmig.sim): its dirtying models against the emulator's programs,
conservation of pages, a clock that never goes backwards, determinism, an end-to-end compare."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dqmig.experiments import compare, runner, scenario
from dqmig.migration.precopy import batch_bytes
from dqmig.policies import base
from dqmig.programs import ProgramSpec
from dqmig.sim.guest import SimVM
from dqmig.sim.migration import SimMigration
from dqmig.units import MiB
from dqmig.vm import VM, VmConfig

PAGES = 512  # 2 MiB of 4 KiB pages


def _emulated_distinct(spec: ProgramSpec) -> int:
    """Pages the emulator's program dirtied (clean-to-dirty transitions, log never cleared)."""
    vm = VM(VmConfig(vcpus=1, memory=PAGES * 4096, programs=[spec]))
    vm.start_dirty_log()
    with vm:
        deadline = time.monotonic() + 30
        while not vm.done[0] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert vm.done[0], "the program did not finish"
        return vm.vcpus[0].dirty_count


def _simulated_distinct(spec: ProgramSpec) -> float:
    vm = SimVM(VmConfig(vcpus=1, memory=PAGES * 4096, programs=[spec]))
    vm.start_dirty_log()
    vm.advance_to(1e6)
    assert vm.done[0]
    return vm.vcpus[0].count


@pytest.mark.parametrize(
    ("kind", "params", "steps", "tolerance"),
    [
        ("sequential", {}, 300, 0),  # exact: min(W, steps)
        ("sequential", {}, 2000, 0),
        ("stress", {}, 700, 0),
        ("uniform", {}, 400, 0.06),  # expectation W (1 - (1 - 1/W)^steps)
        ("uniform", {}, 3000, 0.03),
        ("hot-cold", {"hot_fraction": 0.1, "hot_probability": 0.9}, 1500, 0.06),
        ("read-mostly", {"write_share": 0.2, "compute": 1}, 3000, 0.08),
    ],
)
def test_dirtying_model_matches_the_emulators_programs(kind, params, steps, tolerance):
    spec = ProgramSpec(kind, steps=steps, seed=3, params=params)
    counted, expected = _emulated_distinct(spec), _simulated_distinct(spec)
    if tolerance == 0:
        assert counted == round(expected), (counted, expected)
    else:
        assert abs(counted - expected) <= tolerance * expected, (counted, expected)


class _Throttle(base.ContinueHandler):
    """Auto-converge's cycle (cpu_throttle_thread): after each 10 ms timeslice, sleep
    pct / (1 - pct) of it."""

    wants_timeslices = True

    def __init__(self, pct: float) -> None:
        self.pct = pct

    def handle_exit(self, vm, vcpu, exit):
        if exit.reason == "TIMESLICE":
            vm.throttle_sleep(vcpu, self.pct / (1 - self.pct) * vm.timeslice)
        else:
            super().handle_exit(vm, vcpu, exit)


@pytest.mark.parametrize(("pct", "pace"), [(0.0, 1.0), (0.3, 1.0), (0.5, 1.0), (0.8, 0.4), (0.99, 0.02)])
def test_a_rate_limited_writer_catches_up_after_throttle_sleeps(pct, pace):
    """The emulator's token bucket (rust/src/vcpu.rs, take_token) keeps up to 10 ms of the
    rate while the vCPU sleeps and spends it flat out on waking: throttled to pct, the writer
    keeps its rate while a sleep is at most 10 ms (pct <= 50 %), and beyond gets
    (run + 10 ms) of its rate per cycle of run + sleep."""
    rate = 8192.0
    vm = SimVM(VmConfig(vcpus=1, memory=PAGES * 4096, programs=[ProgramSpec("uniform", rate=rate)]), _Throttle(pct))
    vm.refresh()
    vm.advance_to(100.0)
    w = vm.vcpus[0]
    assert w.progress / (100.0 * rate) == pytest.approx(pace, rel=0.02)
    assert w.sleep_s / 100.0 == pytest.approx(pct, abs=0.01)


def test_prefilled_memory_is_sent_whole_on_both_engines(start_destination):
    """guest.prefill: the first share of memory holds data at boot. An idle guest's bulk pass
    then sends exactly those pages as normal pages and the rest as zero pages, on both."""
    from dqmig.migration.source import Migration

    config = VmConfig(vcpus=1, memory=4 * MiB, prefill=0.25)
    p = _params("none")
    with start_destination() as rx, VM(config) as vm:
        assert not vm.guest.is_zero_page(0) and not vm.guest.is_zero_page(255) and vm.guest.is_zero_page(256)
        m = Migration(vm, rx.uri, p).start()
        assert m.wait(30) == "completed", m.error_desc
        rx.join()
        assert rx.result.digest == vm.guest.digest()
    sim = SimMigration(SimVM(config), p, link=64 * MiB)
    sim.run()
    assert sim.status == "completed"
    assert (m.normal, m.duplicate) == (sim.normal, sim.duplicate) == (256, 768)


def test_sim_speeds_set_a_flat_out_vcpus_pace_and_are_checked():
    programs = [ProgramSpec("read-mostly"), ProgramSpec("uniform", rate=1000.0)]
    vm = SimVM(VmConfig(vcpus=2, memory=PAGES * 4096, programs=programs, sim_speeds=(123456.0, 0.0)))
    vm.advance_to(2.0)
    progress = [c["progress"] for c in vm.counters()]
    assert progress == [pytest.approx(2 * 123456.0, abs=1), pytest.approx(2 * 1000.0, abs=1)]
    with pytest.raises(ValueError, match="sim-speeds"):
        SimVM(VmConfig(vcpus=1, memory=PAGES * 4096, sim_speeds=(1.0, 2.0)))
    with pytest.raises(scenario.ScenarioError, match="sim-speeds"):
        scenario.load("default").with_value("guest.sim-speeds", "fast")


def test_batch_bytes_is_the_emulators_wire_size():
    """stream.rs: a record header and a count per batch, an entry per page, data per normal page."""
    assert batch_bytes(512, 512, 4096) == 16 + 512 * 8 + 512 * 4096
    assert batch_bytes(513, 0, 4096) == 2 * 16 + 513 * 8
    assert batch_bytes(0, 0, 4096) == 0


def _config(workload: str, vcpus: int = 2, memory: int = 16 * MiB, ring: int = 1024, rate: float = 8192) -> VmConfig:
    return VmConfig.with_workload(workload, vcpus=vcpus, memory=memory, writer_rate=rate, dirty_ring=ring)


def _params(policy: str, **extra):
    s = scenario.load("default")
    p = s.migration_parameters(policy)
    p.set("max-bandwidth", 8 * MiB)
    p.set("x-max-time", 8.0)
    for k, v in extra.items():
        p.set(k.replace("_", "-"), v)
    return p


class _Watched(SimMigration):
    """Records every time a policy reads from its clock."""

    seen: list[float]

    def _start_policy(self, policy: base.Policy, reason: str) -> None:
        inner = policy.clock

        def clock() -> float:
            t = inner()
            self.seen.append(t)
            return t

        policy.clock = clock
        super()._start_policy(policy, reason)


@settings(max_examples=15, deadline=None)
@given(
    policy=st.sampled_from(["none", "auto-converge", "dirty-limit", "dirty-quota"]),
    workload=st.sampled_from(["skewed", "uniform", "hot-cold", "sequential", "stress"]),
    ring=st.sampled_from([0, 1024]),
    rate=st.sampled_from([2048.0, 16384.0]),
    multifd=st.booleans(),
)
def test_pages_are_conserved_and_the_clock_never_goes_back(policy, workload, ring, rate, multifd):
    if policy == "dirty-limit" and not ring:
        ring = 1024
    vm = SimVM(_config(workload, ring=ring, rate=rate))
    vm.advance_to(0.5)
    p = _params(policy)
    p.set_capability("multifd", multifd)
    m = _Watched(vm, p, link=16 * MiB)
    m.seen = seen = []
    m.run()
    assert seen or policy == "none", "a throttling policy reads its clock"
    assert m.status in ("completed", "cancelled"), m.error_desc
    assert m.sent_pages + m._dirty_count == m.dirtied_pages, "sent + remaining = dirtied"
    assert m.normal + m.duplicate == m.sent_pages
    assert all(b >= a for a, b in zip(seen, seen[1:], strict=False)), "the policy's clock went backwards"
    ts = [s["_t"] for s in m.samples]
    assert ts == sorted(ts)


def test_same_scenario_and_seed_give_byte_identical_results():
    s = scenario.load("default").with_value("engine", "sim")
    runs = [json.dumps(runner.run(s, policy, seed=4), sort_keys=True) for policy in ("dirty-quota", "dirty-quota")]
    assert runs[0] == runs[1]
    other = json.dumps(runner.run(s, "auto-converge", seed=4), sort_keys=True)
    assert other != runs[0]


def test_compare_on_the_sim_engine_end_to_end():
    """The built-in scenario's shape: plain pre-copy does not converge; the three throttles
    do; dirty quota fastest, and it leaves the reader alone while auto-converge slows it."""
    s = scenario.load("default").with_value("engine", "sim")
    doc = compare.run(s, list(s.policies), argv=["compare", "--engine", "sim"], progress=False)
    runs = {r["policy"]: r for r in doc["runs"]}
    assert all(r["engine"] == "sim" for r in runs.values())
    assert not runs["none"]["converged"]
    assert all(runs[p]["converged"] for p in ("auto-converge", "dirty-limit", "dirty-quota"))
    assert runs["dirty-quota"]["total-time"] < runs["auto-converge"]["total-time"]
    assert runs["dirty-quota"]["slowdown"]["reader"] < 0.02 < runs["auto-converge"]["slowdown"]["reader"]


def test_cli_migrate_on_the_sim_engine(tmp_path, capsys):
    from dqmig.cli import main

    report = tmp_path / "r.json"
    code = main(["migrate", "--engine", "sim", "--memory", "64M", "--policy", "dirty-quota", "--report", str(report)])
    assert code == 0
    assert json.loads(report.read_text())["migration"]["engine"] == "sim"
    assert capsys.readouterr().out.strip().endswith("completed")
    assert main(["migrate", "--engine", "sim", "--to", "tcp:127.0.0.1:1", "--report", str(report)]) == 2
