"""One scenario under one policy on the virtual-time engine, with the emulator runner's
result schema (experiments/runner.py): the guest runs `warmup` s, its pace is measured for
`baseline` s with dirty logging on, then it migrates over the modelled link.

Deterministic: the model has no randomness of its own (random programs are taken by their
expectation), so the same scenario and seed give the same result, byte for byte.
"""

from __future__ import annotations

from typing import Any

from dqmig.experiments import runner
from dqmig.experiments.scenario import Scenario
from dqmig.sim.guest import SimVM
from dqmig.sim.migration import DEFAULT_LINK, SimMigration


def migrate(scenario: Scenario, policy: str, seed: int | None = None) -> tuple[SimVM, SimMigration, Any, Any]:
    """Runs the phases; returns the VM, the migration, the baseline paces and the guest's
    counters when the migration began."""
    seed = scenario.seed if seed is None else seed
    vm = SimVM(scenario.vm_config(seed))
    vm.advance_to(scenario.warmup)
    vm.start_dirty_log()
    start = runner.GuestClock.read(vm)
    t = vm.now
    while vm.now < t + scenario.baseline:  # the sampler's 100 ms harvests, as the emulator's baseline
        vm.advance_to(min(vm.now + 0.1, t + scenario.baseline))
        vm.harvest(lambda i: 1.0)
    end = runner.GuestClock.read(vm)
    vm.stop_dirty_log()
    for atom in vm.guest.atoms:  # the baseline's harvests are not the migration's
        atom.ahead = atom.behind = 0
    baseline = start.paces(end)
    before = runner.GuestClock.read(vm)
    m = SimMigration(
        vm, scenario.migration_parameters(policy), link=scenario.link or DEFAULT_LINK, latency=scenario.latency / 1000
    )
    m.run()
    return vm, m, baseline, before


def run(scenario: Scenario, policy: str, *, seed: int | None = None, keep_series: bool = True) -> dict[str, Any]:
    seed = scenario.seed if seed is None else seed
    vm, m, baseline, before = migrate(scenario, policy, seed)
    result = runner._result(scenario, policy, seed, vm, m, baseline, before)
    result["engine"] = "sim"
    result["link"] = m.link
    result["destination"] = None
    if keep_series:
        result["series"] = {"guest": _guest_series(m), "migration": runner._migration_series(m)}
    return result


def _guest_series(m: SimMigration) -> dict[str, Any]:
    """The sampler's columns from the migration's samples (the simulator has no sampler
    thread): per writer, progress and dirty rates and the share of time asleep."""
    cols: dict[str, list[Any]] = {"t": [], "progress-rate": [], "dirty-rate": [], "sleep-share": [], "ms-per-gib": []}
    prev = None
    for s in m.samples:
        if prev is not None and s["_t"] > prev["_t"]:
            dt = s["_t"] - prev["_t"]
            rows = list(zip(prev["vcpus"], s["vcpus"], strict=True))
            cols["t"].append(round(s["t"], 3))
            cols["progress-rate"].append([round((b["progress"] - a["progress"]) / dt, 1) for a, b in rows])
            cols["dirty-rate"].append([round((b["pages-dirtied"] - a["pages-dirtied"]) / dt, 1) for a, b in rows])
            cols["sleep-share"].append(
                [round(min(1.0, (b["sleep-ns"] - a["sleep-ns"]) / 1e9 / dt), 4) for a, b in rows]
            )
            cols["ms-per-gib"].append([0.0 for _ in rows])
        prev = s
    return cols


__all__ = ["migrate", "run"]
