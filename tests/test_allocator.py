"""Properties of the dirty-quota allocator (policies/allocator.py), driven with a fake clock.

The harness plays the vCPU threads: each writer dirties its whole quota and exits
(DIRTY_QUOTA_EXHAUSTED, count >= quota, sometimes past it as PML batching does), then applies
the Decision as DirtyQuota.handle_exit does: it sleeps `d.sleep` (it cannot exit again before
`ready_at`) and re-arms with quota = count + d.grant. Every writer starts armed with quota 1
(the RFC's start of dirty logging), so its first dirtied page exits and brings its first grant.

Notation (all read from the allocator): I the interval, q = `share` (pages per writer per
interval), L = `limit` (pages/s per writer), c = `interval_at(now)`, f_w the interval of writer
w's first grant, g_w = `state[w].interval` (the interval of its latest fresh grant).

Each of the six invariants is one check (CHECKS below, numbered in the comments) and runs as
its own state-machine test, so a failure names the invariant. Deterministic regressions at the end pin down, step by
step, each way the allocator breaks them.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict

import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from dqmig.policies.allocator import MAX_SLEEP_SHARE, Decision, QuotaAllocator

PAGE = 4096
# A sleeping writer wakes at least this long after its sleep ends: real sleeps overshoot (by
# tens of µs), and waking exactly on a float boundary would only test rounding.
WAKE_EPS = 1e-9
REL = 1e-9  # relative tolerance for float comparisons of sleeps and rate bounds

CHECKS = ("budget", "conservation", "polite", "work", "sleep", "rate")


class Harness:
    """A QuotaAllocator, its writers as the vCPU threads drive them, and a model ledger."""

    def __init__(
        self,
        writers: int,
        *,
        interval: float = 0.010,
        ratio: float = 2.0,
        throughput: float = 125_000_000,
        start: float = 0.0,
        polite: list[bool] | None = None,
        checks: frozenset[str] = frozenset(CHECKS),
    ) -> None:
        self.t = [start]
        t = self.t
        self.alloc = QuotaAllocator(
            writers=writers,
            interval=interval,
            ratio=ratio,
            initial_throughput=throughput,
            initial_ratio=1.0,  # the rate these tests give is the rate L starts from
            page_size=PAGE,
            clock=lambda: t[0],
        )
        self.n = writers
        self.polite = list(polite) if polite is not None else [False] * writers
        self.checks = checks
        # per writer, as its vCPU thread sees it
        self.count = [0] * writers
        self.quota = [1] * writers  # armed: the first dirtied page exits
        self.ready_at = [start] * writers
        self.first: list[int | None] = [None] * writers  # f_w
        self.fresh = [0] * writers  # pages granted as fresh grants (its own share)
        self.claimed = [0] * writers  # pages granted from the pool
        self.overshoot = [0] * writers  # pages dirtied past the quota, over all exits
        self.first_exit: list[int | None] = [None] * writers  # where each writer's entitlement starts
        # ledger
        self.granted_total = 0
        self.from_pool_total = 0
        self.grants_for: dict[int, int] = defaultdict(int)  # interval -> pages granted for it
        self.bump: dict[int, int] = {}  # interval -> highest q when quota for it was handed out
        self.share0 = self.alloc.share
        self.limit0 = self.alloc.limit
        self.events: list[tuple[int, int]] = []  # (interval, new q) at each throughput update
        self.constant = True  # q and L never changed

    # -- time ------------------------------------------------------------------------------

    @property
    def now(self) -> float:
        return self.t[0]

    def advance(self, dt: float) -> None:
        self.t[0] += dt

    def start_of(self, j: int) -> float:
        """The first time the allocator places in interval j."""
        a = self.alloc
        t = a.t0 + j * a.interval
        while a.interval_at(t) < j:
            t = math.nextafter(t, math.inf)
        return t

    def update_throughput(self, bps: float) -> None:
        a = self.alloc
        a.update_throughput(bps)
        if a.share != self.share0 or a.limit != self.limit0:
            self.constant = False
        self.events.append((a.interval_at(self.now), a.share))

    # -- the per-interval budget -----------------------------------------------------------

    def _budget_prefixes(self, queries: set[int]) -> dict[int, int]:
        """P(i) = sum over j = 0..i of budget(j), for each i in `queries`.

        budget(j) = the highest q in force at any time during interval j, or when quota
        attributed to j was handed out (a grant for the next interval uses the q of the moment).
        """
        out: dict[int, int] = {}
        pts = sorted({c for c, _ in self.events} | set(self.bump) | {i for i in queries if i >= 0})
        ev = self.events
        ei, in_force, prev, total = 0, self.share0, -1, 0
        for p in pts:
            total += in_force * (p - 1 - prev)  # intervals prev+1 .. p-1: nothing changed
            budget = in_force
            while ei < len(ev) and ev[ei][0] == p:
                budget = max(budget, ev[ei][1])
                in_force = ev[ei][1]
                ei += 1
            total += max(budget, self.bump.get(p, 0))
            prev = p
            if p in queries:
                out[p] = total
        for i in queries:
            if i < 0:
                out[i] = 0
        return out

    def entitlement(self, upto: int) -> list[int]:
        """Each writer's budget over intervals f_w .. upto (0 before its first grant)."""
        need = {upto} | {f - 1 for f in self.first if f is not None}
        p = self._budget_prefixes(need)
        return [0 if f is None or f > upto else p[upto] - p[f - 1] for f in self.first]

    # -- a DIRTY_QUOTA_EXHAUSTED exit ------------------------------------------------------

    def can_exit(self, w: int) -> float:
        """The earliest time writer w may exit: after its sleep; a polite writer (it dirties at
        most q pages per interval) also not before the interval after its grant's."""
        earliest = self.ready_at[w] + WAKE_EPS
        if self.polite[w] and self.alloc.state[w].interval >= 0:
            earliest = max(earliest, self.start_of(self.alloc.state[w].interval + 1))
        return earliest

    def exit(self, w: int, overshoot: int = 0, jitter: float = 0.0) -> Decision:
        a = self.alloc
        self.t[0] = max(self.now, self.can_exit(w) + jitter)
        now = self.now
        c = a.interval_at(now)
        if self.first_exit[w] is None:
            self.first_exit[w] = c
        count = self.quota[w] + overshoot
        self.count[w] = count
        self.overshoot[w] += overshoot
        if "rate" in self.checks:
            self._check_dirtied(w, c)
        q, lim, pool_before = a.share, a.limit, a.pool
        d = a.on_exit(w, count, self.quota[w])
        wait = d.sleep - d.penalty
        tol = REL * a.interval

        if "sleep" in self.checks:
            # 5. The overshoot penalty is overshoot / L exactly; apart from it no sleep is
            # negative or longer than MAX_SLEEP_SHARE (0.99) of an interval.
            if overshoot:
                assert math.isclose(d.penalty, overshoot / lim, rel_tol=1e-12), (d, overshoot, lim)
            else:
                assert d.penalty == 0.0, d
            assert d.sleep >= 0, f"negative sleep {d}"
            assert -tol <= wait <= MAX_SLEEP_SHARE * a.interval + tol, (
                f"wait {wait} s of a {a.interval} s interval: {d}"
            )
        if "work" in self.checks and wait > 0:
            # 4. Work conservation: the writer waits for the next interval only when the pool
            # held nothing it could claim at this exit.
            assert pool_before == 0, f"writer {w} sleeps {wait} s while the pool holds {pool_before} pages: {d}"
        if "polite" in self.checks and self.polite[w] and overshoot == 0:
            # 3. A writer within its share (it exits only in a later interval than its grant's)
            # is never made to sleep.
            assert d.sleep == 0, f"writer {w}, within its share, sleeps {d.sleep} s: {d}"
        if "conservation" in self.checks:
            # 2. Grants from the pool come out of it, the pool never goes negative and its
            # totals balance.
            assert 0 <= d.from_pool <= pool_before, (d, pool_before)
            assert d.from_pool in (0, d.grant), d
            assert a.pool >= 0
            assert a.pool == a.pool_in - a.pool_out

        # Apply the decision as the vCPU thread does, and attribute the grant to the interval
        # it is for: a pool claim to the interval the writer runs in after its penalty, a fresh
        # grant to the interval the allocator granted it for (now's, or the next one's after a
        # wait, or a later one's after a long penalty).
        if d.from_pool:
            j = a.interval_at(now + d.penalty)
            self.claimed[w] += d.grant
            self.from_pool_total += d.grant
        else:
            j = a.state[w].interval
            assert j in (a.interval_at(now + d.penalty), a.interval_at(now + d.penalty) + 1), (j, d)
            self.fresh[w] += d.grant
        if self.first[w] is None:
            assert not d.from_pool
            self.first[w] = j
        self.grants_for[j] += d.grant
        self.bump[j] = max(self.bump.get(j, 0), q)
        self.granted_total += d.grant
        self.quota[w] = count + d.grant
        self.ready_at[w] = now + d.sleep

        if "budget" in self.checks:
            self.check_budget()
        if "conservation" in self.checks:
            self.check_conservation()
        if "rate" in self.checks:
            self.check_total_granted()
        return d

    # -- checks ----------------------------------------------------------------------------

    def check_budget(self) -> None:
        """1. For every interval i: the pages granted for intervals 0..i never exceed the
        budget of intervals 0..i, i.e. sum over writers of budget(j) for j = f_w..i (q per
        writer per interval, budget() above when q changes).

        Equivalently, quota granted for interval i <= the budget of interval i (writers x q)
        plus the budget earlier intervals left unused (the most the pool can carry into i).
        """
        keys = sorted(k for k, v in self.grants_for.items() if v)
        need = set(keys) | {f - 1 for f in self.first if f is not None}
        p = self._budget_prefixes(need)
        granted = 0
        for i in keys:
            granted += self.grants_for[i]
            budget = sum(p[i] - p[f - 1] for f in self.first if f is not None and f <= i)
            assert granted <= budget, (
                f"{granted} pages granted for intervals <= {i}, whose budget is {budget} "
                f"(q = {self.alloc.share}, pool {self.alloc.pool}, grants per interval {dict(self.grants_for)})"
            )

    def check_conservation(self) -> None:
        """2. Quota is conserved: the pool never goes negative, pool == pool_in - pool_out, and
        every page of entitlement is granted, charged for an overshoot, or in the pool, nothing
        more and nothing less. With q constant, for each writer settled through interval
        a_w - 1: its entitlement is q x (a_w - e_w), e_w the interval of its first exit (from
        then on it is armed, and its share pays for any overshoot), and

            granted + charged overshoot + pool == sum over w of (q x (a_w - e_w) + ahead_w)

        where ahead_w >= 0 is what the writer was granted or charged beyond its settled
        entitlement: at most its shares of intervals a_w .. g_w plus its unpaid overshoot.
        With q changing: granted + pool <= the sum of budget(j) over each writer's intervals
        (nothing appears).
        """
        a = self.alloc
        assert a.pool >= 0, f"pool {a.pool}"
        assert a.pool == a.pool_in - a.pool_out, (a.pool, a.pool_in, a.pool_out)
        assert self.from_pool_total == a.pool_out
        assert self.granted_total == sum(s.total_granted for s in a.state)
        handed = self.granted_total + a.pool
        charged = sum(self.overshoot)
        if self.constant:
            q = self.share0
            settled = 0
            for w, (s, f) in enumerate(zip(a.state, self.first_exit, strict=True)):
                if f is None:
                    continue
                ahead = -s.credit
                assert ahead >= 0, f"writer {w}: credit {s.credit} left unpooled after a settle"
                assert ahead <= q * max(0, s.interval - s.accrued_until + 1) + self.overshoot[w], (
                    f"writer {w} is {ahead} pages ahead of its entitlement (g = {s.interval}, a = {s.accrued_until})"
                )
                settled += q * (s.accrued_until - f) + ahead
            assert handed + charged == settled, (
                f"granted {self.granted_total} + overshoot {charged} + pool {a.pool} != entitlement {settled} "
                f"({'appeared' if handed + charged > settled else 'vanished'}: {abs(handed + charged - settled)})"
            )
        else:
            # Each writer's budget over its intervals e_w .. max(a_w - 1, g_w): those it was
            # settled for and those it was granted ahead; plus the overshoot charged.
            spans = [
                (e, max(s.accrued_until - 1, s.interval))
                for s, e in zip(a.state, self.first_exit, strict=True)
                if e is not None and s.accrued_until is not None
            ]
            p = self._budget_prefixes({u for _, u in spans} | {e - 1 for e, _ in spans})
            entitled = sum(p[u] - p[e - 1] for e, u in spans)
            assert handed <= entitled, f"granted + pool = {handed} > budget {entitled}: quota appeared"

    def check_total_granted(self) -> None:
        """6a. With q and L constant, the pages granted over a run are at most every writer's
        share of every interval begun so far plus one interval ahead, plus one share for each
        writer granted a later interval (after a penalty sleep past the next interval):

            total <= sum over w of q x max(0, c + 2 - f_w) + q x #{w : g_w > c + 1}

        and, as q x c <= L x elapsed when q <= L x I (always, unless q was rounded up to 1),
            total <= writers x (L x elapsed + 2q) + q x #{w : g_w > c + 1}.
        """
        if not self.constant:
            return
        a = self.alloc
        c = a.interval_at(self.now)
        q = self.share0
        ahead = sum(1 for s in a.state if s.interval > c + 1)
        bound = sum(q * max(0, c + 2 - f) for f in self.first if f is not None) + q * ahead
        assert self.granted_total <= bound, (
            f"{self.granted_total} pages granted by interval {c}, bound {bound} (q = {q}, f = {self.first})"
        )
        if q <= self.limit0 * a.interval:
            elapsed = self.now - a.t0
            lbound = self.n * (self.limit0 * elapsed + 2 * q) + q * ahead
            assert self.granted_total <= lbound * (1 + REL), (self.granted_total, lbound)

    def _check_dirtied(self, w: int, c: int) -> None:
        """6b. Pages dirtied (granted and used) by the time of an exit in interval c, leaving
        out the armed first page and the overshoot (which the penalty pays for):
          - per writer, from its own share (pool claims are other writers' unused share):
                count_w - 1 - overshoot_w - claimed_w <= budget of f_w .. c  (= q x (c - f_w + 1)
                with q constant, <= L x elapsed + q);
          - over all writers (pool claims included): sum of the same without claims <= the sum
            of those budgets.
        A grant for interval c + 1 cannot have been used yet: its writer sleeps until then."""
        if self.first[w] is None:
            return
        ent = self.entitlement(c)
        used = self.count[w] - 1 - self.overshoot[w] - self.claimed[w]
        assert used <= ent[w], (
            f"writer {w} used {used} pages of its own share by interval {c}, its budget for intervals "
            f"{self.first[w]}..{c} is {ent[w]} (fresh grants {self.fresh[w]}, claims {self.claimed[w]})"
        )
        if self.constant and self.share0 <= self.limit0 * self.alloc.interval:
            lbound = self.limit0 * (self.now - self.alloc.t0) + self.share0
            assert used <= lbound * (1 + REL), (used, lbound)
        total = sum(self.count[v] - 1 - self.overshoot[v] for v in range(self.n) if self.first[v] is not None)
        assert total <= sum(ent), f"the writers used {total} pages by interval {c}, their budget is {sum(ent)}"


# -- the state machine ---------------------------------------------------------------------

INTERVALS = st.sampled_from([0.010, 0.001, 0.050, 1 / 128])
THROUGHPUTS = st.one_of(st.just(125_000_000.0), st.floats(1e3, 1e11), st.floats(1e7, 1e9))
# In intervals: sub-interval, a few intervals, exact multiples, long idle stretches.
STEPS = st.one_of(
    st.floats(0, 1),
    st.floats(1, 5),
    st.integers(1, 5).map(float),
    st.floats(0, 0.02),
    st.floats(5, 300),
)
JITTER = st.one_of(st.just(0.0), st.floats(0, 0.02), st.floats(0, 2))  # in intervals
OVERSHOOT = st.one_of(st.just(0), st.just(0), st.integers(1, 8), st.integers(9, 511))  # PML: up to 511


class AllocatorMachine(RuleBasedStateMachine):
    """Any number of writers, clock steps of any size, exits with or without overshoot, and
    (in half of the runs) throughput updates. Polite writers dirty at most q pages per
    interval; the others are greedy and exit whenever they have run out of quota."""

    checks: frozenset[str] = frozenset(CHECKS)

    @initialize(
        writers=st.integers(1, 8),
        interval=INTERVALS,
        ratio=st.sampled_from([2.0, 0.5, 3.7]),
        throughput=THROUGHPUTS,
        start=st.sampled_from([0.0, 1.0, 12345.678]),
        data=st.data(),
    )
    def setup(self, writers, interval, ratio, throughput, start, data):
        polite = data.draw(st.lists(st.booleans(), min_size=writers, max_size=writers), label="polite")
        self.vary = data.draw(st.booleans(), label="vary throughput")
        self.h = Harness(
            writers,
            interval=interval,
            ratio=ratio,
            throughput=throughput,
            start=start,
            polite=polite,
            checks=self.checks,
        )

    @rule(step=STEPS)
    def advance(self, step):
        self.h.advance(step * self.h.alloc.interval)

    @rule(data=st.data())
    def exit(self, data):
        h = self.h
        w = data.draw(st.integers(0, h.n - 1), label="writer")
        overshoot = 0 if h.polite[w] else data.draw(OVERSHOOT, label="overshoot")
        jitter = data.draw(JITTER, label="jitter") * h.alloc.interval
        h.exit(w, overshoot, jitter)

    @precondition(lambda self: self.vary)
    @rule(bps=THROUGHPUTS)
    def throughput(self, bps):
        self.h.update_throughput(bps)

    @invariant()
    def pool_balances(self):
        if "conservation" in self.checks:
            a = self.h.alloc
            assert a.pool >= 0 and a.pool == a.pool_in - a.pool_out
        if "rate" in self.checks:
            self.h.check_total_granted()


# No shrinking: the machines are cheap to run but slow to shrink, and the deterministic
# regressions below are the minimal reproductions of every failure they find.
MACHINE_SETTINGS = settings(
    max_examples=50,
    stateful_step_count=40,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=False,
    report_multiple_bugs=False,
    phases=(Phase.explicit, Phase.generate),
)


@pytest.mark.parametrize(
    "check",
    [
        pytest.param("budget", id="1-budget-per-interval"),
        pytest.param("conservation", id="2-pool-conservation"),
        pytest.param("polite", id="3-within-share-never-sleeps"),
        pytest.param("work", id="4-work-conservation"),
        pytest.param("sleep", id="5-sleep-bounds-and-penalty"),
        pytest.param("rate", id="6-long-run-rate"),
    ],
)
def test_allocator_state_machine(check):
    class Machine(AllocatorMachine):
        checks = frozenset({check})

    run_state_machine_as_test(Machine, settings=MACHINE_SETTINGS)


# -- a long run at constant throughput -----------------------------------------------------


@settings(
    max_examples=20,
    deadline=None,
    derandomize=True,
    database=None,
    report_multiple_bugs=False,
    phases=(Phase.explicit, Phase.generate, Phase.shrink),
)
@given(
    writers=st.integers(1, 8),
    interval=INTERVALS,
    seed=st.integers(0, 2**32 - 1),
    polite_share=st.sampled_from([0.0, 0.25, 0.5]),
    overshoot_p=st.sampled_from([0.0, 0.05, 0.3]),
    idle_p=st.sampled_from([0.0, 0.1]),
)
def test_long_run_rate_bound(writers, interval, seed, polite_share, overshoot_p, idle_p):
    """6. Every writer runs as fast as the allocator lets it for 200 intervals: it wakes a
    little after its sleep ends (the timer's latency), dirties its quota and exits again. Some
    are polite, some overshoot (PML batching), some idle now and then. Grants and pages
    dirtied stay within the bounds of Harness.check_total_granted and Harness._check_dirtied."""
    rng = random.Random(seed)
    polite = [rng.random() < polite_share for _ in range(writers)]
    h = Harness(writers, interval=interval, polite=polite, checks=frozenset({"rate"}))
    end = h.alloc.t0 + 200 * interval
    while True:
        w = min(range(writers), key=h.can_exit)
        if h.can_exit(w) > end:
            break
        latency = rng.choice([0.0, rng.uniform(0, 0.005), rng.uniform(0, 0.3)]) * interval
        if rng.random() < idle_p:
            latency += rng.uniform(0, 5) * interval
        overshoot = 0 if polite[w] or rng.random() >= overshoot_p else rng.randint(1, 511)
        h.exit(w, overshoot, latency)
    h.check_total_granted()


# -- deterministic regressions --------------------------------------------------------------


def make(writers: int, q: int, interval: float = 0.010) -> tuple[QuotaAllocator, list[float]]:
    """An allocator whose share is exactly q (L = q / I pages/s per writer), clock at 0."""
    t = [0.0]
    a = QuotaAllocator(
        writers=writers,
        interval=interval,
        ratio=2.0,
        initial_throughput=q / interval * 2.0 * PAGE * writers,
        initial_ratio=1.0,
        page_size=PAGE,
        clock=lambda: t[0],
    )
    assert a.share == q and a.limit == pytest.approx(q / interval)
    return a, t


def test_fresh_grant_then_pool_then_wait():
    """The three branches of on_exit, as ALGORITHMS.md section 4 describes them."""
    a, t = make(2, 100)
    assert a.on_exit(0, 1, 1) == Decision(grant=100, sleep=0.0)  # first exit: interval 0's share
    a.on_exit(1, 1, 1)
    t[0] = 0.025  # writer 1 skipped interval 1: its share goes to the pool
    assert a.on_exit(1, 101, 101) == Decision(grant=100, sleep=0.0)
    assert a.pool == 100
    t[0] = 0.026  # writer 1 used interval 2's share already: it claims the pool and goes on
    assert a.on_exit(1, 201, 201) == Decision(grant=100, sleep=0.0, from_pool=100)
    assert a.pool == 0
    t[0] = 0.027  # and again: the pool is empty, it sleeps to the end of interval 2
    d = a.on_exit(1, 301, 301)
    assert (d.grant, d.from_pool, d.penalty) == (100, 0, 0.0)
    assert d.sleep == pytest.approx(0.003)
    t[0] = 0.031  # overshoot by 50 pages: penalty 50 / L = 5 ms
    d = a.on_exit(1, 451, 401)
    assert d.penalty == pytest.approx(0.005) and d.sleep >= d.penalty


def test_capped_wait_does_not_grant_an_interval_twice():
    """Invariants 1, 2 and 6. A writer that exits at the very start of an interval with its
    share used sleeps only 0.99 of an interval (the cap), so it wakes still in the same
    interval. It must not get the next interval's share before that interval begins, and
    never get any interval's share twice."""
    a, t = make(1, 100)
    a.on_exit(0, 1, 1)  # t = 0: interval 0's share
    t[0] = 0.005
    d = a.on_exit(0, 101, 101)  # used it: sleep to 10 ms, interval 1's share
    assert d.grant == 100 and d.sleep == pytest.approx(0.005)
    t[0] = 0.010 + 1e-6  # wakes (1 µs late) and uses it at once
    d = a.on_exit(0, 201, 201)  # sleep capped at 9.9 ms: it would wake in interval 1
    assert d.grant == 0 and d.sleep == pytest.approx(0.0099)
    t[0] += d.sleep + 1e-6  # 19.9 ms: still in interval 1, asks again
    assert a.interval_at(t[0]) == 1
    d = a.on_exit(0, 201, 201)
    assert d.grant == 100 and t[0] + d.sleep >= 0.020 - 1e-9, "interval 2's share, from its start"
    t[0] += d.sleep + 1e-6
    a.on_exit(0, 301, 301)
    # Grants so far: intervals 0, 1 and 2, once each (300 pages); it is in interval 2.
    assert a.state[0].total_granted <= 300, (
        f"{a.state[0].total_granted} pages granted to one writer for intervals 0..2 (q = 100): "
        "interval 2's share was granted twice"
    )


def test_penalty_does_not_pool_the_penalised_writers_future_share():
    """Invariants 1 and 6. An overshoot penalty long enough to end in a later interval k makes
    on_exit grant a fresh share for k at once, and _fresh puts the writer's entitlement for
    every interval up to k - 1 into the pool, including the intervals of the penalty that have
    not begun. Other writers claim it at once: quota of future intervals is spent now, and
    the penalty no longer pays for the overshoot (the penalised writer's share of those
    intervals is spent by the others)."""
    a, t = make(2, 100)  # L = 10_000 pages/s per writer
    a.on_exit(0, 1, 1)
    a.on_exit(1, 1, 1)  # t = 0: both have interval 0's share
    t[0] = 0.001
    d = a.on_exit(0, 501, 101)  # writer 0 overshoots by 400 pages: 40 ms penalty
    assert d.penalty == pytest.approx(0.04)
    t[0] = 0.002
    d = a.on_exit(1, 101, 101)  # writer 1 used interval 0's share; nothing was carried in
    # Interval 0's budget is 2 x 100 pages, both granted: writer 1 must wait for interval 1.
    assert d.from_pool == 0 and d.sleep > 0, (
        f"writer 1 got {d.from_pool} more pages in interval 0 from a pool of writer 0's shares of "
        f"intervals 1..3 (pool now {a.pool})"
    )


def test_pool_claim_is_not_charged_twice():
    """Invariant 2 (nothing vanishes). A writer's pool claims count in its WriterState.granted,
    so at its next fresh grant they are subtracted from its own unused share: pages taken
    from the pool (another interval's unused share, already subtracted there) are charged a
    second time, and that much of the writer's own unused share never reaches the pool."""
    a, t = make(2, 100)
    a.on_exit(0, 1, 1)
    a.on_exit(1, 1, 1)  # t = 0: interval 0's share each
    t[0] = 0.025  # interval 2: writer 0 skipped interval 1
    a.on_exit(0, 101, 101)
    assert a.pool == 100
    t[0] = 0.026
    assert a.on_exit(0, 201, 201).from_pool == 100  # takes it back (work conservation)
    t[0] = 0.055  # interval 5: writer 0 idled through intervals 3 and 4
    a.on_exit(0, 301, 301)
    granted = sum(s.total_granted for s in a.state)
    # Entitlement so far: writer 0, intervals 0..5 (600 pages); writer 1, interval 0 (100).
    # Writer 0's unused shares of intervals 3 and 4 (200 pages) must have reached the pool.
    assert granted + a.pool == 700, f"granted {granted} + pool {a.pool}: {700 - granted - a.pool} pages vanished"


def test_share_change_does_not_revalue_elapsed_intervals():
    """Invariant 1 with a throughput change. _fresh values every elapsed interval at the share
    of the moment: (k - state.interval) x q. When q has grown since, the pool is credited
    with quota no interval ever had."""
    a, t = make(2, 100)
    a.on_exit(0, 1, 1)
    a.on_exit(1, 1, 1)  # t = 0: interval 0's share each
    t[0] = 0.995  # interval 99
    a.update_throughput(4 * a.throughput)
    assert a.share == 400
    a.on_exit(0, 101, 101)  # writer 0 idled through intervals 1..98, at q = 100 all along
    # Both writers idled through intervals 1..98 at q = 100: their unused shares are pooled at
    # that value, not at the new q.
    assert a.pool <= 2 * 98 * 100, f"pool {a.pool}: intervals 1..98 of 100 pages each were revalued at q = 400"


def test_within_share_writer_never_sleeps():
    """Invariant 3, deterministically: one page short of q per interval, never a sleep."""
    a, t = make(3, 50)
    for w in range(3):
        a.on_exit(w, 1, 1)
    quota = [51] * 3
    for k in range(1, 200):
        for w in range(3):
            t[0] = k * 0.010 + 0.001 * (w + 1)
            d = a.on_exit(w, quota[w], quota[w])
            assert d.sleep == 0 and d.grant == 50
            quota[w] += d.grant


def test_the_rfc_halves_only_the_initial_estimate():
    """The QEMU RFC (dirty quota, "dirtylimit via quota"): before any throughput is measured
    each vCPU's limit is (1 Gbit/s / 2) / vCPUs; from then on it is the measured throughput /
    vCPUs, with no halving. x-dirty-quota-ratio > 1 is dqmig's extension."""
    a = QuotaAllocator(writers=4, page_size=PAGE)
    assert a.limit * PAGE == pytest.approx(125_000_000 / 2 / 4)
    a.update_throughput(80_000_000)
    assert a.limit * PAGE == pytest.approx(80_000_000 / 4), "steady state: the whole throughput"
    headroom = QuotaAllocator(writers=4, page_size=PAGE, ratio=2.0)
    headroom.update_throughput(80_000_000)
    assert headroom.limit * PAGE == pytest.approx(80_000_000 / 2 / 4)
