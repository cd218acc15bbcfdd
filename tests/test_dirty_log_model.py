"""Model-based tests of the dirty log (bitmap and per-vCPU dirty rings) and of guest memory
contents, against plain Python models.

The tracker model:

* ``armed`` is the set of pages whose write-protection is off (KVM: the page has faulted
  since it was last collected). A logged write to a page not in ``armed`` is a clean-to-dirty
  transition: ``write_and_mark`` returns True and the page is armed.
* Bitmap mode: the dirty set *is* ``armed``; a harvest takes and clears it.
* Ring mode: a vCPU's transition is pushed to its ring (RING entries; past that, the backup
  bitmap ``collected``); a device's transition goes straight to ``collected``. A reap moves
  ring entries into ``collected`` and re-protects (disarms) those pages, so a later write is a
  transition again even though the page is still in the dirty set. A harvest reaps, then takes
  ``collected`` and disarms its pages.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from dqmig import _native

PAGES = 320  # more than a ring holds, so a burst can overflow into the backup bitmap
VCPUS = 3
RING = 256  # the smallest ring: 192 entries to the soft limit, 64 reserved (PML off)

pages_st = st.integers(0, PAGES - 1)
values_st = st.integers(0, 2**64 - 1)
writer_st = st.none() | st.integers(0, VCPUS - 1)


class DirtyLogMachine(RuleBasedStateMachine):
    dirty_ring = 0  # overridden per mode

    @initialize()
    def setup(self):
        self.g = _native.Guest(PAGES, vcpus=VCPUS, dirty_ring=self.dirty_ring, pml=False)
        self.logging = False
        self.armed: set[int] = set()
        self.collected: set[int] = set()
        self.rings: list[list[int]] = [[] for _ in range(VCPUS)]

    @property
    def ring_mode(self) -> bool:
        return self.dirty_ring > 0

    def model_dirty(self) -> set[int]:
        if self.ring_mode:
            return self.armed | self.collected
        return set(self.armed)

    def model_reap(self) -> list[int]:
        counts = []
        for ring in self.rings:
            counts.append(len(ring))
            for p in ring:
                self.armed.discard(p)
                self.collected.add(p)
            ring.clear()
        return counts

    def mark(self, page: int, value: int, vcpu: int | None) -> None:
        expected = self.logging and page not in self.armed
        if expected:
            self.armed.add(page)
            if self.ring_mode:
                if vcpu is not None and len(self.rings[vcpu]) < RING:
                    self.rings[vcpu].append(page)
                else:
                    self.collected.add(page)  # device write or full ring: backup bitmap
        got = self.g.write_and_mark(page, value, vcpu)
        assert got is expected, f"write_and_mark({page}, vcpu={vcpu}) returned {got}"

    @rule()
    def start_dirty_log(self):
        self.g.start_dirty_log()
        self.logging = True
        self.armed.clear()
        self.collected.clear()
        for ring in self.rings:
            ring.clear()

    @rule()
    def stop_dirty_log(self):
        self.g.stop_dirty_log()
        self.logging = False

    @rule(page=pages_st, value=values_st, vcpu=writer_st)
    def write_and_mark(self, page, value, vcpu):
        self.mark(page, value, vcpu)

    @rule(start=pages_st, count=st.integers(1, PAGES), vcpu=writer_st)
    def write_burst(self, start, count, vcpu):
        """Many pages at once by one writer: enough to fill (and overflow) a dirty ring."""
        for page in range(start, min(PAGES, start + count)):
            self.mark(page, page + 1, vcpu)

    @rule()
    def harvest(self):
        got = self.g.harvest()
        assert isinstance(got, np.ndarray) and got.dtype == np.uint64 and got.ndim == 1
        if self.ring_mode:
            self.model_reap()
            expected = sorted(self.collected)
            self.armed -= self.collected
            self.collected.clear()
        else:
            expected = sorted(self.armed)
            self.armed.clear()
        assert got.tolist() == expected

    @rule()
    def reap(self):
        got = self.g.reap()
        if self.ring_mode:
            assert got == self.model_reap()
        else:
            assert got == []

    @invariant()
    def dirty_count_matches(self):
        if not hasattr(self, "g"):
            return
        assert self.g.dirty_count() == len(self.model_dirty())

    @invariant()
    def rings_match(self):
        if not hasattr(self, "g"):
            return
        for v in range(VCPUS):
            assert self.g.ring_len(v) == len(self.rings[v])

    @invariant()
    def logging_flag_matches(self):
        if not hasattr(self, "g"):
            return
        assert self.g.dirty_logging is self.logging


class BitmapMachine(DirtyLogMachine):
    dirty_ring = 0


class RingMachine(DirtyLogMachine):
    dirty_ring = RING


SETTINGS = settings(max_examples=60, stateful_step_count=40, deadline=None)

TestBitmapDirtyLog = BitmapMachine.TestCase
TestBitmapDirtyLog.settings = SETTINGS
TestRingDirtyLog = RingMachine.TestCase
TestRingDirtyLog.settings = SETTINGS


# -- page contents -------------------------------------------------------------------------------

CPAGES = 24
PAGE_SIZE = 4096


def _page_bytes(pattern: bytes) -> bytes:
    return (pattern * (PAGE_SIZE // len(pattern) + 1))[:PAGE_SIZE]


class ContentsMachine(RuleBasedStateMachine):
    """read_page/is_zero_page/page_digest/the numpy view against the last values written.
    write_and_mark stores its value in the page's first word (little-endian); write_page
    replaces the whole page and is not a guest write, so it never dirties the page."""

    def __init__(self):
        super().__init__()
        self.g = _native.Guest(CPAGES, vcpus=2)
        self.g.start_dirty_log()
        self.pages = [bytes(PAGE_SIZE)] * CPAGES
        self.dirty: set[int] = set()
        self.view = np.frombuffer(self.g, dtype=np.uint8).reshape(CPAGES, PAGE_SIZE)

    @rule(page=st.integers(0, CPAGES - 1), value=values_st, vcpu=st.none() | st.integers(0, 1))
    def write_and_mark(self, page, value, vcpu):
        self.g.write_and_mark(page, value, vcpu)
        self.pages[page] = value.to_bytes(8, "little") + self.pages[page][8:]
        self.dirty.add(page)

    @rule(page=st.integers(0, CPAGES - 1), pattern=st.binary(min_size=1, max_size=16))
    def write_page(self, page, pattern):
        data = _page_bytes(pattern)
        self.g.write_page(page, data)
        self.pages[page] = data

    @rule(page=st.integers(0, CPAGES - 1))
    def zero_page(self, page):
        self.g.write_page(page, bytes(PAGE_SIZE))
        self.pages[page] = bytes(PAGE_SIZE)

    @rule(page=st.integers(0, CPAGES - 1))
    def read_page(self, page):
        assert self.g.read_page(page) == self.pages[page]
        assert self.g.is_zero_page(page) == (self.pages[page] == bytes(PAGE_SIZE))

    @rule()
    def harvest(self):
        assert self.g.harvest().tolist() == sorted(self.dirty), "write_page never dirties a page"
        self.dirty.clear()

    @invariant()
    def all_pages_match(self):
        for p in range(CPAGES):
            assert self.g.read_page(p) == self.pages[p]
            assert self.view[p].tobytes() == self.pages[p]

    @invariant()
    def digests_agree_with_contents(self):
        digests = self.g.page_digests(list(range(CPAGES)))
        assert digests == [self.g.page_digest(p) for p in range(CPAGES)]
        by_content: dict[bytes, int] = {}
        for p, d in enumerate(digests):
            # Equal contents give equal digests (and, for these few pages, different ones differ).
            assert by_content.setdefault(self.pages[p], d) == d
        assert len(set(digests)) == len(by_content)


TestPageContents = ContentsMachine.TestCase
TestPageContents.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)


# -- direct checks ------------------------------------------------------------------------------


@pytest.mark.parametrize("ring", [0, RING])
def test_nothing_is_logged_before_start(ring):
    g = _native.Guest(64, vcpus=2, dirty_ring=ring, pml=False)
    assert not g.dirty_logging
    assert g.write_and_mark(3, 1, 0) is False
    assert g.write_and_mark(4, 1, None) is False
    assert g.dirty_count() == 0
    assert g.harvest().tolist() == []
    assert g.read_page(3)[:8] == (1).to_bytes(8, "little"), "the data is written all the same"


@pytest.mark.parametrize("ring", [0, RING])
def test_start_dirty_log_clears_everything(ring):
    g = _native.Guest(64, vcpus=2, dirty_ring=ring, pml=False)
    g.start_dirty_log()
    for p in range(10):
        g.write_and_mark(p, 1, p % 2)
    g.write_and_mark(20, 1, None)
    assert g.dirty_count() == 11
    g.start_dirty_log()
    assert g.dirty_count() == 0
    assert [g.ring_len(v) for v in range(2)] == [0, 0]
    assert g.harvest().tolist() == []
    assert g.write_and_mark(3, 2, 0) is True


def test_ring_overflow_goes_to_backup_bitmap():
    g = _native.Guest(PAGES, vcpus=1, dirty_ring=RING, pml=False)
    g.start_dirty_log()
    for p in range(PAGES):
        assert g.write_and_mark(p, 1, 0) is True
    assert g.ring_len(0) == RING
    assert g.dirty_count() == PAGES
    assert g.harvest().tolist() == list(range(PAGES))
    assert g.ring_len(0) == 0


def test_reaped_pages_are_reprotected_but_stay_dirty():
    g = _native.Guest(64, vcpus=2, dirty_ring=RING, pml=False)
    g.start_dirty_log()
    assert g.write_and_mark(5, 1, 0)
    assert not g.write_and_mark(5, 2, 1), "already dirty: no transition"
    assert g.reap() == [1, 0]
    assert g.dirty_count() == 1
    assert g.write_and_mark(5, 3, 1), "re-protected by the reap: a new transition"
    assert g.reap() == [0, 1]
    assert g.harvest().tolist() == [5]
    assert g.write_and_mark(5, 4, None), "clean after the harvest"


def test_bitmap_mode_ring_queries():
    g = _native.Guest(64, vcpus=2)
    assert g.dirty_ring == 0
    g.start_dirty_log()
    g.write_and_mark(1, 1, 0)
    assert g.reap() == []
    assert g.ring_len(0) == 0
    with pytest.raises(IndexError, match="out of range"):
        g.ring_len(5)


def test_guest_attributes():
    g = _native.Guest(100, page_size=8192, vcpus=3, dirty_ring=512, pml=False)
    assert (g.pages, g.page_size, g.size, g.vcpus, g.dirty_ring) == (100, 8192, 100 * 8192, 3, 512)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"pages": 0},
        {"pages": 8, "page_size": 1000},
        {"pages": 8, "page_size": 2048},
        {"pages": 8, "vcpus": 0},
        {"pages": 8, "dirty_ring": 100},
        {"pages": 8, "dirty_ring": 128},
        {"pages": 8, "dirty_ring": 1 << 17},
    ],
)
def test_bad_guest_geometry(kwargs):
    with pytest.raises(ValueError):
        _native.Guest(**kwargs)


def test_out_of_range_pages_and_vcpus():
    g = _native.Guest(16, vcpus=2, dirty_ring=RING, pml=False)
    with pytest.raises(IndexError, match="page 16"):
        g.write_and_mark(16, 1, 0)
    with pytest.raises(IndexError, match="vcpu 2"):
        g.write_and_mark(0, 1, 2)
    for f in (g.read_page, g.page_digest, g.is_zero_page):
        with pytest.raises(IndexError):
            f(16)
    with pytest.raises(IndexError):
        g.page_digests([0, 99])
    with pytest.raises(IndexError):
        g.write_page(16, bytes(4096))
    with pytest.raises(ValueError, match="4096"):
        g.write_page(0, bytes(10))


def test_memory_view_is_read_only():
    g = _native.Guest(4)
    view = np.frombuffer(g, dtype=np.uint8)
    assert view.shape == (4 * 4096,)
    assert not view.flags.writeable
    with pytest.raises(ValueError):
        view[0] = 1
    m = memoryview(g)
    assert m.readonly and m.nbytes == g.size
    with pytest.raises(TypeError):
        m[0] = 1
