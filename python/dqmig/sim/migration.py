"""Pre-copy over a modelled link, in virtual time: the shared loop (migration/precopy.py)
on the modelled guest (sim/guest.py).

The link carries `link` bytes/s (network.link; the rate limit, max-bandwidth, is the loop's
own, as on the emulator) with a one-way `latency`; a send of N bytes takes N / link seconds,
during which the guest runs on. Pages go in the emulator's wire format (batches of 512, zero
pages as flags, a batch header per channel part), so transferred bytes compare. The cursor
walks the atoms in address order and wraps; pages newly dirty at a sync land ahead of or
behind it in proportion to where it is in their atom.
"""

from __future__ import annotations

import json
import math
from typing import Any

from dqmig.migration.params import MigrationParameters
from dqmig.migration.precopy import BATCH_PAGES, RECORD_HEADER, Cancelled, NotConverged, PreCopy, batch_bytes
from dqmig.policies import Policy
from dqmig.sim.guest import SimError, SimVM

DEFAULT_LINK = 125_000_000  # bytes/s: 1 Gbit/s
SIM_CAP_PASSES = 20  # without x-max-time/-iterations: give up after this many full passes' time (+60 s)
MAX_TICK_SAMPLES = 1500  # tick samples kept; past it every other is dropped and the spacing doubles


class SimMigration(PreCopy):
    """One outgoing migration of a SimVM; `run()` returns when it has ended (virtual time)."""

    def __init__(
        self,
        vm: SimVM,
        params: MigrationParameters | None = None,
        *,
        link: float = DEFAULT_LINK,
        latency: float = 0.0,
    ) -> None:
        g = vm.guest
        super().__init__(params, g.page_size, g.pages)
        if not link > 0 or not math.isfinite(link):
            raise ValueError(f"link capacity must be > 0 bytes/s, not {link}")
        self.vm = vm
        self.uri = "sim"
        self.link = float(link)
        self.latency = float(latency)
        self._ci = 0  # the cursor's atom
        self._frac = 0.0  # share of that atom the cursor has passed
        self._zero_carry = 0.0
        self._tick_every = 0.0  # s between kept tick samples (0: every tick)
        self._last_tick_kept = -math.inf
        self._ticks_kept = 0
        self.verify_time: float | None = None
        self.digest_time: float | None = None
        self.sent_pages = 0  # pages sent (each page every time it goes)
        self.dirtied_pages = 0  # pages that entered the bitmap: all at setup, then each sync's new

    def clock(self) -> float:
        return self.vm.now

    def _check_caps(self) -> None:
        """The loop's caps, and one of its own: a virtual migration with no cap would run
        forever, so past SIM_CAP_PASSES times the time a full pass over memory takes on the
        link (plus 60 s), it is cancelled as not converging."""
        super()._check_caps()
        p = self.params
        if not p.x_max_time and not p.x_max_iterations:
            cap = SIM_CAP_PASSES * self._pages * self.page_size / self.link + 60
            if self.vm.now - self.t_start > cap:
                raise NotConverged(f"did not converge within {cap:.0f} s (the simulator's cap without x-max-time)")

    # -- the run ---------------------------------------------------------------------------

    def run(self) -> SimMigration:
        vm = self.vm
        self.status = "setup"
        self.t_start = vm.now
        try:
            vm.advance_to(vm.now + 2 * self.latency)  # handshake and its ack
            for atom in vm.guest.atoms:
                atom.settle(vm.now)
                atom.ahead, atom.behind, atom.mig_zero, atom.carry = atom.pages, 0, atom.zero, 0.0
            self._dirty_count = self.dirtied_pages = self._pages
            vm.start_dirty_log()
            self._begin()
            self.status = "active"
            self._iterate()
            self._complete()
        except NotConverged as e:
            self.converged = False
            self._fail("cancelled", str(e))
        except (Cancelled, SimError) as e:
            self._fail("failed", str(e) or type(e).__name__)
        finally:
            if self.status != "completed":
                self.total_time = vm.now - self.t_start
        return self

    def _fail(self, status: str, reason: str) -> None:
        self._stop_policy()
        self.vm.stop_dirty_log()
        if self.vm.paused:
            self.vm.resume()
        self.error_desc = reason
        self.status = status
        self._sample("end")

    def _complete(self) -> None:
        vm = self.vm
        self.status = "device"
        self.t_stop = vm.now
        self.stop_latency = vm.pause()  # dirty-limit's sleeps are waited for, downtime running
        self._stop_policy()
        vm.refresh()
        self._sample("stop")
        self._merge_harvest(final=True)
        self.dirty_sync_count += 1
        self._drain()
        self._transmit(self._device_state_bytes())
        sent_all = vm.now
        vm.stop_dirty_log()
        vm.advance_to(vm.now + 2 * self.latency)  # the completion record, the destination's "resumed"
        self.downtime = sent_all - self.t_stop
        self.blackout_time = vm.now - self.t_stop
        self.converged = True
        self.status = "completed"
        self.total_time = vm.now - self.t_start
        self._sample("complete")

    def _device_state_bytes(self) -> int:
        """The device-state record: every writer's program state, as the emulator's JSON."""
        state = [
            {"spec": w.spec.to_json(), "position": 0, "rng": 0, "progress": int(w.progress)}
            for w in self.vm.all_writers
        ]
        return RECORD_HEADER + len(json.dumps(state))

    # -- what the loop asks of the engine --------------------------------------------------

    def _wait(self, seconds: float) -> None:
        # At least one step of the clock: a wait to a window's end must reach it despite rounding.
        now = self.vm.now
        self.vm.advance_to(max(now + seconds, math.nextafter(now, math.inf)))

    def _transmit(self, nbytes: int) -> None:
        self.vm.advance_to(self.vm.now + nbytes / self.link)

    def _send_dirty(self, limit: int, *, precopy: bool) -> None:
        n = min(limit, self._dirty_count)
        taken, zero = self._take(n)
        if not taken:
            return
        zero_pages = min(taken, int(zero + self._zero_carry))
        self._zero_carry = zero + self._zero_carry - zero_pages
        nbytes = self._wire_bytes(taken, taken - zero_pages)
        self._dirty_count -= taken
        self.sent_pages += taken
        self._transmit(nbytes)
        self._account(nbytes, zero_pages, taken - zero_pages, taken, precopy=precopy)

    def _wire_bytes(self, pages: int, normal: int) -> int:
        """The page batches of `pages` split over the channels as the emulator splits them."""
        channels = min(self._channel_count, pages)
        base, extra = divmod(pages, channels)
        total = 0
        left_normal = normal
        for i in range(channels):
            part = base + (1 if i < extra else 0)
            part_normal = min(left_normal, round(normal * part / pages))
            left_normal -= part_normal
            if i == channels - 1:
                part_normal += left_normal
            total += batch_bytes(part, part_normal, self.page_size, BATCH_PAGES)
        return total

    def _take(self, n: int) -> tuple[int, float]:
        """Up to n dirty pages from the cursor on (wrapping); returns (pages, zero pages)."""
        atoms = self.vm.guest.atoms
        taken, zero = 0, 0.0
        wrapped = False
        while taken < n:
            atom = atoms[self._ci]
            if atom.ahead > 0:
                atom.settle(self.vm.now)
                k = min(n - taken, atom.ahead)
                mig = atom.mig
                z = k * atom.mig_zero / mig if mig else 0.0
                atom.mig_zero -= z
                self._frac += (1.0 - self._frac) * k / atom.ahead
                atom.ahead -= k
                taken += k
                zero += z
                if atom.ahead:
                    continue
            self._ci += 1
            self._frac = 0.0
            if self._ci == len(atoms):
                if wrapped:
                    break  # nothing left anywhere
                wrapped = True
                self._ci = 0
                for a in atoms:
                    a.ahead += a.behind
                    a.behind = 0
        return taken, zero

    def _ahead_fraction(self, i: int) -> float:
        if i == self._ci:
            return 1.0 - self._frac
        return 1.0 if i > self._ci else 0.0

    def _merge_harvest(self, final: bool = False) -> int:
        new = self.vm.harvest(self._ahead_fraction)
        self._dirty_count += new
        self.dirtied_pages += new
        return new

    # -- policy hooks: the guest learns whether a policy wants timeslice exits ------------

    def _start_policy(self, policy: Policy, reason: str) -> None:
        super()._start_policy(policy, reason)
        self.vm.refresh()

    def _tick(self) -> None:
        super()._tick()
        self.vm.refresh()

    def _sync(self) -> None:
        super()._sync()
        self.vm.refresh()

    # -- telemetry -------------------------------------------------------------------------

    def _sample(self, event: str) -> None:
        """As the emulator's, but tick samples thin out on long runs (at most
        MAX_TICK_SAMPLES kept: then every other goes and their spacing doubles)."""
        if event == "tick":
            if self.vm.now - self._last_tick_kept < self._tick_every - 1e-9:
                return
            self._last_tick_kept = self.vm.now
        super()._sample(event)

    def _keep_sample(self, sample: dict[str, Any]) -> None:
        self.samples.append(sample)
        if sample["event"] != "tick":
            return
        self._ticks_kept += 1
        if self._ticks_kept > MAX_TICK_SAMPLES:
            ticks = [i for i, s in enumerate(self.samples) if s["event"] == "tick"]
            drop = set(ticks[1::2])
            self.samples = [s for i, s in enumerate(self.samples) if i not in drop]
            self._ticks_kept = len(ticks) - len(drop)
            self._tick_every = max(self._tick_every * 2, 0.2)

    def report(self) -> dict[str, Any]:
        samples = [{k: v for k, v in s.items() if k != "_t"} for s in self.samples]
        return {
            "engine": "sim",
            "uri": self.uri,
            "link": self.link,
            "latency": self.latency,
            "parameters": self.params.as_qmp(),
            "capabilities": self.params.capabilities_qmp(),
            "result": self.query(),
            "converged": self.converged,
            "policy-changes": self.policy_changes,
            "samples": samples,
        }
