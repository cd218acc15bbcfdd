"""Whether pre-copy is converging, and which parameter would help when it is not.

Pre-copy switches over when the bytes left after a dirty sync fit in bandwidth x
downtime-limit. QEMU keeps iterating when they never do, and so does dqmig without
--max-time or --max-iterations; the progress line shows `hint` instead, once `stalled`
says the bytes left after a dirty sync have stopped reaching new lows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dqmig.migration.params import PARAMS
from dqmig.policies.dirtylimit import TOLERANCE_MBPS
from dqmig.units import format_size

STALL_ITERATIONS = 3
STALL_S = 10.0  # iterations can be a fraction of a second: a throttle ramping up is no stall


@dataclass(frozen=True)
class Stall:
    lowest: int  # the fewest bytes left after any dirty sync so far
    iterations: int  # dirty syncs since the one that left that
    seconds: float  # time since then


def since_lowest(syncs: Sequence[tuple[float, int]]) -> Stall | None:
    """How long the bytes left have not reached a new low. `syncs`: (seconds, bytes left)
    after each dirty sync, oldest first."""
    if not syncs:
        return None
    best = min(range(len(syncs)), key=lambda i: (syncs[i][1], i))  # the first time it was that low
    return Stall(syncs[best][1], len(syncs) - 1 - best, syncs[-1][0] - syncs[best][0])


def stalled(syncs: Sequence[tuple[float, int]], iterations: int = STALL_ITERATIONS, seconds: float = STALL_S) -> bool:
    """True when no dirty sync has left fewer bytes than the lowest so far for `iterations`
    syncs and `seconds`: pre-copy is not getting closer to switchover."""
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, not {iterations}")
    s = since_lowest(syncs)
    return s is not None and s.iterations >= iterations and s.seconds >= seconds


def hint(
    policy: str, params: dict[str, Any], stall: Stall, *, threshold: float, throttle: int = 0, has_dma: bool = False
) -> str:
    """What to tell the user: how far off switchover is and which parameters (QEMU's names,
    current values) would help under `policy`. `params` is query-migrate-parameters;
    `throttle` auto-converge's cpu-throttle-percentage."""
    head = (
        f"not converging: no dirty sync has left less than {format_size(stall.lowest)} for {stall.iterations} "
        f"iterations ({stall.seconds:.0f} s); switchover needs <= {format_size(threshold)} "
        "(bandwidth x downtime-limit)"
    )
    tries = _policy_tries(policy, params, throttle, has_dma)
    if params["max-bandwidth"]:
        tries.append(f"a higher max-bandwidth (now {format_size(params['max-bandwidth'])}/s)")
    tries.append(f"a higher downtime-limit (now {params['downtime-limit']} ms)")
    return f"{head}. Try {', '.join(tries)}.{_policy_note(policy, params, has_dma)}"


def _policy_tries(policy: str, p: dict[str, Any], throttle: int, has_dma: bool) -> list[str]:
    if policy == "auto-converge":
        tries = []
        if throttle < p["max-cpu-throttle"]:
            tries.append(
                f"a higher cpu-throttle-increment (now {p['cpu-throttle-increment']}) "
                f"or cpu-throttle-initial (now {p['cpu-throttle-initial']})"
            )
        if p["max-cpu-throttle"] < 99:
            tries.append(f"a higher max-cpu-throttle (now {p['max-cpu-throttle']})")
        return tries
    if policy == "dirty-limit":
        low = p["vcpu-dirty-limit"] > PARAMS["vcpu-dirty-limit"].lo
        return [f"a lower vcpu-dirty-limit (now {p['vcpu-dirty-limit']} MB/s)"] if low else []
    if policy == "dirty-quota":
        tries = [f"a higher x-dirty-quota-ratio (now {p['x-dirty-quota-ratio']:g}; budget = throughput / ratio)"]
        if has_dma and not p["x-dirty-quota-dma"]:
            tries.append("x-dirty-quota-dma=on (the DMA writer runs unthrottled)")
        return tries
    return ["a throttling policy (auto-converge, dirty-limit or dirty-quota)"]


def _policy_note(policy: str, p: dict[str, Any], has_dma: bool) -> str:
    notes = []
    if policy == "dirty-limit":
        notes.append(
            f"dirty-limit leaves a vCPU within {TOLERANCE_MBPS} MB/s of vcpu-dirty-limit unslowed (now: under "
            f"{p['vcpu-dirty-limit'] + TOLERANCE_MBPS} MB/s), and sleeps a vCPU at most 99 x its ring-full time "
            "per full ring, that time taken at the highest rate it has seen."
        )
    if has_dma and policy in ("auto-converge", "dirty-limit"):
        notes.append(f"{policy} does not throttle the DMA writer.")
    return "".join(" " + n for n in notes)
