"""Type stubs for the Rust extension (rust/src/bindings.rs)."""

import numpy as np
import numpy.typing as npt

EXIT_REASONS: list[str]

class Guest:
    """Guest memory (N pages of real memory) and its dirty tracker (bitmap or rings)."""

    def __init__(
        self, pages: int, page_size: int = 4096, vcpus: int = 1, dirty_ring: int = 0, pml: bool = True
    ) -> None: ...
    @property
    def pages(self) -> int: ...
    @property
    def page_size(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def vcpus(self) -> int: ...
    @property
    def dirty_ring(self) -> int:
        """Dirty ring entries per vCPU; 0 in bitmap mode."""
    @property
    def pml(self) -> bool:
        """Whether the rings reserve the 512-entry PML buffer (Intel VMX); False in bitmap mode."""
    @property
    def ring_soft_limit(self) -> int:
        """Entries a ring holds before DIRTY_RING_FULL: size - 64 - (512 with PML); 0 in bitmap mode."""
    def read_page(self, page: int) -> bytes: ...
    def write_page(self, page: int, data: bytes) -> None:
        """Loads a page without marking it dirty."""
    def write_and_mark(self, page: int, value: int, vcpu: int | None = None) -> bool:
        """A guest write by `vcpu` (None = a device); True on a clean-to-dirty transition."""
    def fill(self, first: int, count: int) -> None:
        """Writes non-zero data to pages first..first+count, not marked dirty."""
    def is_zero_page(self, page: int) -> bool: ...
    def page_digest(self, page: int) -> int: ...
    def page_digests(self, pages: list[int]) -> list[int]: ...
    def prealloc(self) -> bool:
        """Backs every page now (QEMU's -mem-prealloc); False if the kernel refused."""
    def digest(self, threads: int | None = None) -> int:
        """xxh3-64 over every page's xxh3-64, in page order."""
    def start_dirty_log(self) -> None: ...
    def stop_dirty_log(self) -> None: ...
    @property
    def dirty_logging(self) -> bool: ...
    def harvest(self) -> npt.NDArray[np.uint64]:
        """Takes and clears the dirty set (ascending page numbers)."""
    def harvest_lazy(self) -> npt.NDArray[np.uint64]:
        """Bitmap mode: the dirty pages, left set (not re-protected) until clear_dirty, as
        QEMU's manual dirty-log protect; ring mode: harvest()."""
    def clear_dirty(self, pages: npt.NDArray[np.uint64]) -> None:
        """Re-protects pages harvest_lazy reported (KVM_CLEAR_DIRTY_LOG); no-op with rings."""
    def dirty_count(self) -> int: ...
    def reap(self) -> list[int]:
        """Ring mode: reaps every ring; entries reaped per vCPU."""
    def reap_vcpu(self, vcpu: int) -> int:
        """Ring mode: reaps only `vcpu`'s ring; entries reaped."""
    def ring_len(self, vcpu: int) -> int: ...

class Exit:
    reason: str
    """DIRTY_QUOTA_EXHAUSTED, DIRTY_RING_FULL, TIMESLICE, KICKED or DONE."""
    count: int
    quota: int

class Vcpu:
    """An emulated vCPU; `Vcpu.device` builds the DMA writer."""

    def __init__(self, guest: Guest, index: int, program: str, pml_batch: int = 1) -> None: ...
    @staticmethod
    def device(guest: Guest, program: str) -> Vcpu: ...
    @property
    def index(self) -> int | None: ...
    @property
    def is_device(self) -> bool: ...
    def run(self, timeslice: float) -> Exit:
        """Runs the guest program (GIL released) until an exit or `timeslice` seconds."""
    def kick(self) -> None: ...
    def sync(self) -> None:
        """Kicks and waits until no run() is in progress."""
    @staticmethod
    def sync_all(vcpus: list[Vcpu]) -> None:
        """sync() on every vCPU given: kicked together, waited for in one call."""
    quota: int
    @property
    def dirty_count(self) -> int: ...
    @property
    def progress(self) -> int: ...
    def counters(self) -> dict: ...
    def export_state(self) -> str: ...
    def import_state(self, state: str) -> None: ...

def bench_mark_rate(pages: int, marks: int) -> float: ...
def bench_fetch_or_rate(pages: int, marks: int) -> float: ...
def build_commit() -> tuple[str, bool | None, str] | None:
    """(commit, Rust inputs had local changes, `git ls-tree -r` of python/ at the commit) of the
    checkout the extension was built from; None if it was not built from one."""

RECORD_TYPES: dict[str, int]
MAX_BATCH_PAGES: int
MIN_RECORD_RATE: float
"""Bytes/s: a record of `len` bytes must complete within the channel's timeout + len / this."""

class MigrationStreamError(Exception): ...
class StreamClosed(MigrationStreamError): ...
class StreamTimeout(MigrationStreamError): ...
class ProtocolError(MigrationStreamError): ...

class Channel:
    """One TCP connection of a migration, owned by Rust (from `socket.detach()`)."""

    def __init__(self, fd: int, timeout: float) -> None: ...
    def set_timeout(self, timeout: float) -> None:
        """Bounds the wait for a record and, plus its length at MIN_RECORD_RATE, each record."""
    def send_record(self, record_type: int, payload: bytes) -> None: ...
    def send_pages(self, guest: Guest, pages: npt.NDArray[np.uint64], batch: int = 512) -> tuple[int, int, int]:
        """Sends page batches; returns (bytes, zero pages, normal pages)."""
    def receive(self, guest: Guest | None = None) -> tuple[int, bytes | None, tuple[int, int, int] | None]:
        """The next record: (PAGES, None, stats) for an applied page batch, else (type, payload, None)."""
    def shutdown(self, read_only: bool = False) -> None: ...

def encode_handshake(
    page_size: int, pages: int, vcpus: int, dirty_ring: int, channels: int, capabilities: int, flags: int
) -> bytes: ...
def decode_handshake(data: bytes) -> dict[str, int]: ...
