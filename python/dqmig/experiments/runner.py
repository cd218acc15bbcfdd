"""One scenario under one policy: a baseline without migration, then a real migration.

Phases: the guest runs `warmup` s; for `baseline` s its per-vCPU pace is measured with dirty
logging on (harvested every 100 ms, so the baseline pays the same tracking cost a migration
does); then it migrates over TCP to a `dqmig incoming` process on 127.0.0.1.

The destination is a separate process (LocalDestination), not an in-process thread: the
destination's receive loop would otherwise take the source's GIL and slow the very vCPU
threads whose pace is being measured, and source and destination are separate processes in
the design anyway. Its start (about 0.5 s) overlaps the warmup.

One sampler thread records the guest from the baseline to the end of the migration
(progress, dirty rate, throttle sleep, ms/GiB), on the migration's clock (t = 0 at migrate).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from dqmig.experiments import metrics, results
from dqmig.experiments.scenario import Scenario
from dqmig.migration.local import LocalDestination
from dqmig.migration.source import Migration
from dqmig.sampler import Sample, Sampler
from dqmig.vm import VM

NO_CAP_TIMEOUT_S = 600.0  # a migration without x-max-time is given this long, then cancelled
CAP_MARGIN_S = 60.0  # beyond x-max-time before the harness gives up waiting
CANCEL_WAIT_S = 30.0
PEAK_WINDOW_S = 1.0  # the window of the peak-throttle figure


class RunError(RuntimeError):
    pass


def run(scenario: Scenario, policy: str, *, seed: int | None = None, keep_series: bool = True) -> dict[str, Any]:
    """Migrates the scenario's guest under `policy`; returns the measured result. A scenario
    with `engine = "sim"` runs on the virtual-time engine instead (same result schema)."""
    if scenario.engine == "sim":
        from dqmig.sim import run as sim_run

        return sim_run.run(scenario, policy, seed=seed, keep_series=keep_series)
    seed = scenario.seed if seed is None else seed
    params = scenario.migration_parameters(policy)
    host = results.host_snapshot()  # the baseline and the migration both count
    vm = VM(scenario.vm_config(seed))
    dest = LocalDestination.start(scenario.after)
    try:
        with vm:
            time.sleep(scenario.warmup)
            sampler, t_sampler, baseline = _baseline(vm, scenario.baseline)
            before = GuestClock.read(vm)
            m = Migration(vm, dest.uri, params)
            try:
                m.start()
                _wait(m, params.x_max_time)
            finally:
                _end(m)  # also on Ctrl-C: never leave a migration running
                guest_samples = sampler.stop()
        dest_report = dest.finish()
    finally:
        dest.kill()
    result = _result(scenario, policy, seed, vm, m, baseline, before)
    result["engine"] = "emu"
    result["destination"] = _destination(dest_report)
    result["host"] = results.host_usage(host, results.host_snapshot())
    if keep_series:
        result["series"] = {
            "guest": _guest_series(guest_samples, t_sampler - m.t_start, m.total_time),
            "migration": _migration_series(m),
        }
    return result


# -- phases ------------------------------------------------------------------------------------


@dataclass
class GuestClock:
    """Each writer's progress and where its wall time went (thread CPU, throttle sleep,
    halted in the guest), read at one moment. The rest of the wall time is steal: the host
    ran something else (the migration thread, the destination, other jobs)."""

    t: float
    progress: list[int]
    cpu_ns: list[int]
    sleep_ns: list[int]
    halt_ns: list[int]

    @classmethod
    def read(cls, vm: Any) -> GuestClock:
        """`vm`: an engine.Host with counters() (the emulator's VM or the simulator's)."""
        t, c = vm.clock(), vm.counters()
        return cls(t, *([w[k] for w in c] for k in ("progress", "cpu_ns", "sleep_ns", "halt_ns")))

    @classmethod
    def of_sample(cls, s: dict[str, Any]) -> GuestClock:
        rows = s["vcpus"]
        return cls(s["_t"], *([r[k] for r in rows] for k in ("progress", "cpu-ns", "sleep-ns", "halt-ns")))

    def paces(self, later: GuestClock) -> list[metrics.Pace]:
        wall = later.t - self.t
        return [
            metrics.pace(
                later.progress[i] - self.progress[i],
                wall,
                (later.cpu_ns[i] - self.cpu_ns[i] + later.sleep_ns[i] - self.sleep_ns[i]) / 1e9
                + (later.halt_ns[i] - self.halt_ns[i]) / 1e9,
            )
            for i in range(len(self.progress))
        ]


def _baseline(vm: VM, seconds: float) -> tuple[Sampler, float, list[metrics.Pace]]:
    """Starts the sampler and measures each writer's pace over `seconds`."""
    vm.start_dirty_log()
    t_sampler = time.monotonic()
    sampler = Sampler(vm, clear_log=True).start()
    start = GuestClock.read(vm)
    time.sleep(seconds)
    end = GuestClock.read(vm)
    sampler.pause_clearing()
    vm.stop_dirty_log()  # the migration starts its own log
    return sampler, t_sampler, start.paces(end)


def _wait(m: Migration, cap_s: float) -> None:
    timeout = cap_s + CAP_MARGIN_S if cap_s else NO_CAP_TIMEOUT_S
    m.wait(timeout)
    if m.active:
        m.cancel(f"the experiment harness gave up after {timeout:g} s")


def _end(m: Migration) -> None:
    """Cancels a migration still running and waits (bounded) for it to end."""
    if m.active:
        m.cancel("the experiment harness stopped")
    m.wait(CANCEL_WAIT_S)
    if m.active:
        raise RunError(f"the migration did not end {CANCEL_WAIT_S:g} s after a cancel")


# -- the result --------------------------------------------------------------------------------


def _result(
    scenario: Scenario,
    policy: str,
    seed: int,
    vm: Any,
    m: Any,
    baseline: list[metrics.Pace],
    before: GuestClock,
) -> dict[str, Any]:
    q = m.query()
    ram = q.get("ram", {})
    vcpus = _vcpus(vm, m, baseline, before)
    kept = [v["retained"] for v in vcpus if v["retained"] is not None and v["class"] != "device"]
    return {
        "policy": policy,
        "seed": seed,
        "status": m.status,
        "converged": bool(m.converged),
        "error": m.error_desc,
        "total-time": q.get("total-time"),
        "downtime": q.get("downtime"),  # QEMU's: stop to the last byte sent
        "x-blackout-time": q.get("x-blackout-time"),  # stop to the guest running on the destination
        "setup-time": q.get("setup-time"),
        "transferred": ram.get("transferred", 0),
        "iterations": ram.get("dirty-sync-count", 0),
        "peak-throttle": _peak_throttle(m),
        "peak-cpu-throttle-percentage": max((s.get("cpu-throttle-percentage", 0) for s in m.samples), default=0),
        "vcpus": vcpus,
        "slowdown": metrics.class_means(vcpus, "slowdown"),
        "net-slowdown": metrics.class_means(vcpus, "net-slowdown"),
        "steal": metrics.class_means(vcpus, "steal"),
        "fairness": metrics.jain(kept),
        "policy-changes": m.policy_changes,
        "parameters": m.params.as_qmp(),
        "capabilities": m.params.capabilities_qmp(),
        "query": q,
    }


def _end_sample(m: Migration) -> dict[str, Any]:
    """The sample where the guest stopped counting on the source: switchover or the end."""
    for s in m.samples:
        if s["event"] == "stop":
            return s
    return m.samples[-1]


def _vcpus(vm: Any, m: Any, baseline: list[metrics.Pace], before: GuestClock) -> list[dict[str, Any]]:
    during = before.paces(GuestClock.of_sample(_end_sample(m)))
    names, classes, programs = vm.writer_names(), vm.writer_classes(), vm.writer_programs()
    counters = vm.counters()
    out = []
    for i, name in enumerate(names):
        b, d = baseline[i], during[i]
        kept = metrics.retained(b.rate, d.rate)
        net = metrics.retained(b.net_rate, d.net_rate)
        out.append(
            {
                "name": name,
                "class": classes[i],
                "program": programs[i].kind,
                "baseline-rate": b.rate,
                "migration-rate": d.rate,
                "retained": kept,
                "slowdown": None if kept is None else 1 - kept,
                "net-retained": net,
                "net-slowdown": None if net is None else 1 - net,
                "baseline-steal": b.steal,
                "steal": d.steal,
                "sleep": counters[i]["sleep_ns"] / 1e9,
            }
        )
    return out


def _peak_throttle(m: Any) -> float:
    """Largest share (%) of any 1 s of the migration that one vCPU spent in throttle sleeps.

    From the migration's samples, whose sleep counters include a sleep the switchover cut
    short (the stop wakes sleepers before its sample). Windows are at least 1 s, so one long
    dirty-limit sleep counts for what it is, not as a 100 % spike."""
    samples = [s for s in m.samples if "_t" in s]
    peak, j = 0.0, 0
    for cur in samples[1:]:
        while j + 1 < len(samples) and cur["_t"] - samples[j + 1]["_t"] >= PEAK_WINDOW_S:
            j += 1
        first = samples[j]
        seconds = max(cur["_t"] - first["_t"], PEAK_WINDOW_S)
        for a, b in zip(first["vcpus"], cur["vcpus"], strict=True):
            peak = max(peak, min(1.0, (b["sleep-ns"] - a["sleep-ns"]) / 1e9 / seconds))
    return round(peak * 100, 1)


def _destination(report: dict[str, Any] | None) -> dict[str, Any] | None:
    if report is None:
        return None
    return {
        "verify-time": report.get("verify-time-ms"),
        "run-after": report.get("run-after-s"),
        "progress-after-resume": report.get("progress-after-resume"),
    }


# -- time series -------------------------------------------------------------------------------


def _guest_series(samples: list[Sample], offset: float, total_time: float) -> dict[str, Any]:
    """The sampler's columns, t on the migration clock, cut at the migration's end."""
    kept = [s for s in samples if s.t + offset <= total_time + 0.15]
    return {
        "t": [round(s.t + offset, 3) for s in kept],
        "progress-rate": [[round(x, 1) for x in s.progress_rate] for s in kept],
        "dirty-rate": [[round(x, 1) for x in s.dirty_rate] for s in kept],
        "sleep-share": [[round(x, 4) for x in s.sleep_share] for s in kept],
        "ms-per-gib": [[round(x, 1) for x in s.ms_per_gib] for s in kept],
    }


def _migration_series(m: Any) -> dict[str, Any]:
    """query-migrate over time plus each policy's telemetry, one list per field."""
    cols: dict[str, list[Any]] = {
        k: []
        for k in (
            "t",
            "event",
            "policy",
            "remaining",
            "transferred",
            "bandwidth",
            "dirty-pages-rate",
            "threshold",
            "cpu-throttle-percentage",
            "dirty-limit-sleep-us",
            "dirty-quota-pool",
            "dirty-quota-limit",
            "sleep-ns",
        )
    }
    for s in m.samples:
        ram = s.get("ram", {})
        dq = s.get("dirty-quota") or {}
        cols["t"].append(s["t"])
        cols["event"].append(s["event"])
        cols["policy"].append(s.get("policy", "none"))
        cols["remaining"].append(ram.get("remaining"))
        cols["transferred"].append(ram.get("transferred"))
        cols["bandwidth"].append(int(ram.get("mbps", 0) * 1e6 / 8))
        cols["dirty-pages-rate"].append(ram.get("dirty-pages-rate"))
        cols["threshold"].append(s.get("threshold"))
        cols["cpu-throttle-percentage"].append(s.get("cpu-throttle-percentage"))
        cols["dirty-limit-sleep-us"].append(s.get("vcpu-sleep-per-ring-full-us"))
        cols["dirty-quota-pool"].append(dq.get("pool-pages"))
        cols["dirty-quota-limit"].append(dq.get("limit-pages-per-second"))
        cols["sleep-ns"].append([v["sleep-ns"] for v in s["vcpus"]])
    cols["page-size"] = m.page_size
    return cols
