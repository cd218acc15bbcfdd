//! The one PyO3 layer: converts arguments, releases the GIL around anything that touches
//! guest memory at scale or may block, and maps core errors to Python exceptions.

use std::ffi::{c_int, c_void};
use std::sync::Arc;
use std::time::Duration;

use numpy::{IntoPyArray, PyArray1};
use pyo3::exceptions::{PyBufferError, PyIndexError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use std::net::TcpStream;
use std::os::fd::FromRawFd;
use std::sync::Mutex;

use numpy::PyReadonlyArray1;
use pyo3::create_exception;
use pyo3::exceptions::PyException;

use crate::program::ProgramSpec;
use crate::stream::{self, Handshake, Received, RecordType, StreamError};
use crate::tracker::{TrackMode, Writer};
use crate::vcpu::{self, ExitReason};
use crate::Error;

fn to_py(e: Error) -> PyErr {
    match e {
        Error::PageOutOfRange { .. } => PyIndexError::new_err(e.to_string()),
        _ => PyValueError::new_err(e.to_string()),
    }
}

/// Guest memory and its dirty tracker.
#[pyclass(frozen, module = "dqmig._native")]
struct Guest {
    inner: Arc<crate::Guest>,
}

#[pymethods]
impl Guest {
    #[new]
    #[pyo3(signature = (pages, page_size=crate::memory::DEFAULT_PAGE_SIZE, vcpus=1, dirty_ring=0, pml=true))]
    fn new(
        py: Python<'_>,
        pages: usize,
        page_size: usize,
        vcpus: usize,
        dirty_ring: usize,
        pml: bool,
    ) -> PyResult<Self> {
        let mode = if dirty_ring == 0 {
            TrackMode::Bitmap
        } else {
            TrackMode::Ring {
                size: dirty_ring,
                pml,
            }
        };
        let inner = py
            .detach(|| crate::Guest::new(pages, page_size, mode, vcpus))
            .map_err(to_py)?;
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    #[getter]
    fn pages(&self) -> usize {
        self.inner.memory.pages()
    }

    #[getter]
    fn page_size(&self) -> usize {
        self.inner.memory.page_size()
    }

    #[getter]
    fn size(&self) -> usize {
        self.inner.memory.size()
    }

    #[getter]
    fn vcpus(&self) -> usize {
        self.inner.vcpus
    }

    /// Dirty ring entries per vCPU; 0 in bitmap mode.
    #[getter]
    fn dirty_ring(&self) -> usize {
        match self.inner.tracker.mode() {
            TrackMode::Bitmap => 0,
            TrackMode::Ring { size, .. } => size,
        }
    }

    /// Whether the dirty rings reserve the PML buffer (Intel VMX); false in bitmap mode.
    #[getter]
    fn pml(&self) -> bool {
        matches!(self.inner.tracker.mode(), TrackMode::Ring { pml: true, .. })
    }

    /// Entries a dirty ring holds before its vCPU exits with DIRTY_RING_FULL; 0 in bitmap mode.
    #[getter]
    fn ring_soft_limit(&self) -> usize {
        match self.inner.tracker.mode() {
            TrackMode::Bitmap => 0,
            TrackMode::Ring { size, pml } => size - crate::ring::DirtyRing::reserved_entries(pml),
        }
    }

    fn read_page<'py>(
        &self,
        py: Python<'py>,
        page: u64,
    ) -> PyResult<Bound<'py, pyo3::types::PyBytes>> {
        let data = self.inner.memory.read_page(page).map_err(to_py)?;
        Ok(pyo3::types::PyBytes::new(py, &data))
    }

    /// Loads a page without marking it dirty (not a guest write).
    fn write_page(&self, page: u64, data: &[u8]) -> PyResult<()> {
        self.inner.memory.write_page(page, data).map_err(to_py)
    }

    /// A guest write: stores `value` in the page's first word, then marks the page for
    /// `vcpu` (None = a device). True on a clean-to-dirty transition. For tests and
    /// benchmarks: a dirty ring has one producer, so do not write for a vCPU whose run() is
    /// in progress.
    #[pyo3(signature = (page, value, vcpu=None))]
    fn write_and_mark(&self, page: u64, value: u64, vcpu: Option<usize>) -> PyResult<bool> {
        let p = self.inner.memory.check_page(page).map_err(to_py)?;
        let writer = match vcpu {
            Some(i) if i >= self.inner.vcpus => {
                return Err(PyIndexError::new_err(format!("vcpu {i} out of range")));
            }
            Some(i) => Writer::Vcpu(i),
            None => Writer::Device,
        };
        self.inner.memory.write_words(p, 0, 1, value);
        Ok(self.inner.tracker.mark(p, writer))
    }

    /// Fills pages `first..first + count` with non-zero data, not marked dirty (a guest
    /// that has used that memory before migrating).
    fn fill(&self, py: Python<'_>, first: u64, count: u64) -> PyResult<()> {
        py.detach(|| self.inner.memory.fill(first, count))
            .map_err(to_py)
    }

    fn is_zero_page(&self, page: u64) -> PyResult<bool> {
        let p = self.inner.memory.check_page(page).map_err(to_py)?;
        Ok(self.inner.memory.is_zero_page(p))
    }

    fn page_digest(&self, page: u64) -> PyResult<u64> {
        self.inner.memory.page_digest(page).map_err(to_py)
    }

    /// Digests of the given pages (page-sampling dirty-rate measurement).
    fn page_digests(&self, py: Python<'_>, pages: Vec<u64>) -> PyResult<Vec<u64>> {
        let g = self.inner.clone();
        py.detach(move || {
            pages
                .iter()
                .map(|&p| g.memory.page_digest(p))
                .collect::<Result<_, _>>()
        })
        .map_err(to_py)
    }

    /// Backs every page now (QEMU's -mem-prealloc); False if the kernel refused.
    fn prealloc(&self, py: Python<'_>) -> bool {
        let g = self.inner.clone();
        py.detach(move || g.memory.prealloc())
    }

    /// The memory digest: xxh3-64 over every page's xxh3-64, in page order.
    /// `threads`: how many threads hash (default: every core).
    #[pyo3(signature = (threads=None))]
    fn digest(&self, py: Python<'_>, threads: Option<usize>) -> u64 {
        let g = self.inner.clone();
        py.detach(move || match threads {
            Some(n) => g.memory.digest_with(n),
            None => g.memory.digest(),
        })
    }

    fn start_dirty_log(&self) {
        self.inner.tracker.start_logging();
    }

    fn stop_dirty_log(&self) {
        self.inner.tracker.stop_logging();
    }

    #[getter]
    fn dirty_logging(&self) -> bool {
        self.inner.tracker.is_logging()
    }

    /// Takes and clears the dirty set: page numbers, ascending, as a numpy uint64 array.
    fn harvest<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<u64>> {
        let g = self.inner.clone();
        py.detach(move || g.tracker.harvest()).into_pyarray(py)
    }

    /// Bitmap mode: the dirty pages, left set until `clear_dirty` (QEMU's manual dirty-log
    /// protect); ring mode: `harvest`.
    fn harvest_lazy<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<u64>> {
        let g = self.inner.clone();
        py.detach(move || g.tracker.harvest_lazy()).into_pyarray(py)
    }

    /// Re-protects pages a `harvest_lazy` reported (KVM_CLEAR_DIRTY_LOG).
    fn clear_dirty(&self, py: Python<'_>, pages: PyReadonlyArray1<'_, u64>) -> PyResult<()> {
        let pages = pages.as_slice()?.to_vec();
        let g = self.inner.clone();
        py.detach(move || g.tracker.clear_dirty(&pages))
            .map_err(to_py)
    }

    /// Pages dirty now, without clearing.
    fn dirty_count(&self, py: Python<'_>) -> usize {
        let g = self.inner.clone();
        py.detach(move || g.tracker.count())
    }

    /// Ring mode: reaps every vCPU's ring; entries reaped per vCPU.
    fn reap(&self, py: Python<'_>) -> Vec<usize> {
        let g = self.inner.clone();
        py.detach(move || g.tracker.reap())
    }

    /// Ring mode: reaps only `vcpu`'s ring (QEMU's reap at a ring-full exit while dirty-limit
    /// is in service); entries reaped.
    fn reap_vcpu(&self, py: Python<'_>, vcpu: usize) -> PyResult<usize> {
        if vcpu >= self.inner.vcpus {
            return Err(PyIndexError::new_err(format!("vcpu {vcpu} out of range")));
        }
        let g = self.inner.clone();
        py.detach(move || g.tracker.reap_vcpu(vcpu))
            .ok_or_else(|| PyValueError::new_err("reap_vcpu needs the dirty ring"))
    }

    /// Entries waiting in a vCPU's dirty ring (0 in bitmap mode).
    fn ring_len(&self, vcpu: usize) -> PyResult<usize> {
        if vcpu >= self.inner.vcpus {
            return Err(PyIndexError::new_err(format!("vcpu {vcpu} out of range")));
        }
        Ok(self.inner.tracker.ring(vcpu).map_or(0, |r| r.len()))
    }

    /// Read-only buffer over the whole guest memory (for `numpy.frombuffer`).
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut pyo3::ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        if flags & pyo3::ffi::PyBUF_WRITABLE != 0 {
            return Err(PyBufferError::new_err("guest memory views are read-only"));
        }
        let mem = &slf.get().inner.memory;
        // SAFETY: `view` is the Py_buffer CPython passed to this slot. The pointer and length
        // describe the live guest mapping; PyBuffer_FillInfo takes a reference to `slf`, which
        // keeps the Arc (and so the mapping) alive until the buffer is released. The buffer is
        // read-only, so no Python code writes through it; vCPUs keep storing to the words
        // with atomic stores meanwhile, which a reader (numpy, in C) sees as bytes of some
        // recent state, the same as a hardware snapshot of running guest memory.
        let rc = unsafe {
            pyo3::ffi::PyBuffer_FillInfo(
                view,
                slf.as_ptr(),
                mem.as_ptr() as *mut c_void,
                mem.size() as isize,
                1,
                flags,
            )
        };
        if rc == -1 {
            return Err(PyErr::fetch(slf.py()));
        }
        Ok(())
    }

    unsafe fn __releasebuffer__(&self, _view: *mut pyo3::ffi::Py_buffer) {}
}

/// Why `Vcpu.run` returned.
#[pyclass(frozen, module = "dqmig._native", get_all)]
struct Exit {
    /// DIRTY_QUOTA_EXHAUSTED, DIRTY_RING_FULL, TIMESLICE, KICKED or DONE.
    reason: &'static str,
    /// The vCPU's dirty counter (pages) at the exit.
    count: u64,
    /// Its quota at the exit (0 = off).
    quota: u64,
}

#[pymethods]
impl Exit {
    fn __repr__(&self) -> String {
        format!(
            "Exit(reason={:?}, count={}, quota={})",
            self.reason, self.count, self.quota
        )
    }
}

/// An emulated vCPU (or, built with `Vcpu.device`, the DMA writer).
#[pyclass(frozen, module = "dqmig._native")]
struct Vcpu {
    inner: Arc<vcpu::Vcpu>,
}

fn parse_spec(program: &str) -> PyResult<ProgramSpec> {
    serde_json::from_str(program)
        .map_err(|e| PyValueError::new_err(format!("bad guest program: {e}")))
}

#[pymethods]
impl Vcpu {
    #[new]
    #[pyo3(signature = (guest, index, program, pml_batch=1))]
    fn new(guest: &Guest, index: usize, program: &str, pml_batch: u64) -> PyResult<Self> {
        let v = vcpu::Vcpu::new(guest.inner.clone(), index, parse_spec(program)?).map_err(to_py)?;
        Ok(Self {
            inner: Arc::new(v.with_pml_batch(pml_batch)),
        })
    }

    /// A DMA writer: a device running `program`, with its own dirty counter and quota.
    #[staticmethod]
    fn device(guest: &Guest, program: &str) -> PyResult<Self> {
        let v = vcpu::Vcpu::new_device(guest.inner.clone(), parse_spec(program)?).map_err(to_py)?;
        Ok(Self { inner: Arc::new(v) })
    }

    #[getter]
    fn index(&self) -> Option<usize> {
        (!self.inner.is_device()).then(|| self.inner.index())
    }

    #[getter]
    fn is_device(&self) -> bool {
        self.inner.is_device()
    }

    /// Runs the guest program with the GIL released for at most `timeslice` seconds.
    fn run(&self, py: Python<'_>, timeslice: f64) -> PyResult<Exit> {
        let slice = Duration::try_from_secs_f64(timeslice)
            .map_err(|_| PyValueError::new_err(format!("bad timeslice {timeslice}")))?;
        let v = self.inner.clone();
        let e = py.detach(move || v.run(slice));
        Ok(Exit {
            reason: e.reason.name(),
            count: e.count,
            quota: e.quota,
        })
    }

    fn kick(&self) {
        self.inner.kick();
    }

    /// Kicks and waits until no run is in progress (GIL released while waiting).
    fn sync(&self, py: Python<'_>) {
        let v = self.inner.clone();
        py.detach(move || v.sync());
    }

    /// `sync` on many vCPUs in one call: kicked together, waited for with the GIL released
    /// once (each separate call would queue for the GIL behind busy vCPU threads).
    #[staticmethod]
    fn sync_all(py: Python<'_>, vcpus: Vec<PyRef<'_, Vcpu>>) {
        let inner: Vec<_> = vcpus.iter().map(|v| v.inner.clone()).collect();
        py.detach(move || {
            let refs: Vec<&vcpu::Vcpu> = inner.iter().map(|v| &**v).collect();
            vcpu::Vcpu::sync_all(&refs);
        });
    }

    #[getter]
    fn quota(&self) -> u64 {
        self.inner.quota()
    }

    #[setter]
    fn set_quota(&self, quota: u64) {
        self.inner.set_quota(quota);
    }

    #[getter]
    fn dirty_count(&self) -> u64 {
        self.inner.dirty_count()
    }

    #[getter]
    fn progress(&self) -> u64 {
        self.inner.snapshot().progress
    }

    /// All counters: pages_dirtied, bytes_written, progress, run_ns, halt_ns, quota,
    /// stress_gib, stress_last_ms_per_gib and exits (by reason).
    fn counters<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.snapshot();
        let d = PyDict::new(py);
        d.set_item("pages_dirtied", s.pages_dirtied)?;
        d.set_item("bytes_written", s.bytes_written)?;
        d.set_item("progress", s.progress)?;
        d.set_item("run_ns", s.run_ns)?;
        d.set_item("halt_ns", s.halt_ns)?;
        d.set_item("quota", s.quota)?;
        d.set_item("stress_gib", s.stress_gib)?;
        d.set_item("stress_last_ms_per_gib", s.stress_last_ms_per_gib)?;
        let exits = PyDict::new(py);
        for r in ExitReason::ALL {
            exits.set_item(r.name(), s.exits[r as usize])?;
        }
        d.set_item("exits", exits)?;
        Ok(d)
    }

    /// The program and its position, as JSON, to resume elsewhere.
    fn export_state(&self, py: Python<'_>) -> String {
        let v = self.inner.clone();
        py.detach(move || v.export_state())
    }

    fn import_state(&self, py: Python<'_>, state: &str) -> PyResult<()> {
        let v = self.inner.clone();
        let state = state.to_owned();
        py.detach(move || v.import_state(&state)).map_err(to_py)
    }
}

/// Marks per second through the dirty tracker (bitmap mode, logging on).
#[pyfunction]
fn bench_mark_rate(py: Python<'_>, pages: usize, marks: usize) -> f64 {
    py.detach(|| crate::bench::mark_rate(pages, marks))
}

/// Baseline: plain atomic `fetch_or` per page, same page order.
#[pyfunction]
fn bench_fetch_or_rate(py: Python<'_>, pages: usize, marks: usize) -> f64 {
    py.detach(|| crate::bench::fetch_or_rate(pages, marks))
}

create_exception!(
    _native,
    MigrationStreamError,
    PyException,
    "The migration stream failed."
);
create_exception!(
    _native,
    StreamClosed,
    MigrationStreamError,
    "The peer closed the connection."
);
create_exception!(
    _native,
    StreamTimeout,
    MigrationStreamError,
    "The peer did not answer in time."
);
create_exception!(
    _native,
    ProtocolError,
    MigrationStreamError,
    "The peer sent a malformed stream."
);

fn stream_err(e: StreamError) -> PyErr {
    match e {
        StreamError::Closed => StreamClosed::new_err(e.to_string()),
        StreamError::Timeout | StreamError::Deadline(_) => StreamTimeout::new_err(e.to_string()),
        StreamError::Protocol(_) => ProtocolError::new_err(e.to_string()),
        StreamError::Io(_) => MigrationStreamError::new_err(e.to_string()),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One TCP connection of a migration, owned by Rust. Reads and writes may run on different
/// threads; `shutdown` from any thread unblocks both.
#[pyclass(frozen, module = "dqmig._native")]
struct Channel {
    reader: Mutex<TcpStream>,
    writer: Mutex<TcpStream>,
    control: TcpStream,
    /// The idle bound and each record's base deadline (stream::Deadline).
    timeout: Mutex<Duration>,
}

#[pymethods]
impl Channel {
    /// Takes ownership of `fd` (from `socket.detach()`). `timeout` bounds the wait for a
    /// record and, plus the record's length at stream::MIN_RECORD_RATE, each record whole.
    #[new]
    fn new(fd: i32, timeout: f64) -> PyResult<Self> {
        if fd < 0 {
            return Err(PyValueError::new_err("bad file descriptor"));
        }
        // SAFETY: the caller hands over an open socket it no longer owns (socket.detach()),
        // so this TcpStream becomes its only owner and closes it exactly once.
        let stream = unsafe { TcpStream::from_raw_fd(fd) };
        let ch = Self {
            reader: Mutex::new(stream.try_clone().map_err(|e| stream_err(e.into()))?),
            writer: Mutex::new(stream.try_clone().map_err(|e| stream_err(e.into()))?),
            control: stream,
            timeout: Mutex::new(Duration::ZERO),
        };
        ch.set_timeout(timeout)?;
        Ok(ch)
    }

    fn set_timeout(&self, timeout: f64) -> PyResult<()> {
        let t = Duration::try_from_secs_f64(timeout)
            .ok()
            .filter(|t| !t.is_zero())
            .ok_or_else(|| PyValueError::new_err(format!("bad timeout {timeout}")))?;
        *lock(&self.timeout) = t;
        Ok(())
    }

    fn send_record(&self, py: Python<'_>, record_type: u8, payload: Vec<u8>) -> PyResult<()> {
        let t = RecordType::from_u8(record_type)
            .ok_or_else(|| PyValueError::new_err(format!("unknown record type {record_type}")))?;
        let timeout = *lock(&self.timeout);
        py.detach(|| stream::send_record(&lock(&self.writer), t, &payload, timeout))
            .map_err(stream_err)
    }

    /// Sends `pages` of `guest` as page batches; returns (bytes, zero pages, normal pages).
    #[pyo3(signature = (guest, pages, batch=512))]
    fn send_pages(
        &self,
        py: Python<'_>,
        guest: &Guest,
        pages: PyReadonlyArray1<'_, u64>,
        batch: usize,
    ) -> PyResult<(u64, u64, u64)> {
        let pages = pages.as_slice()?.to_vec();
        let g = guest.inner.clone();
        let timeout = *lock(&self.timeout);
        let st = py
            .detach(|| stream::send_pages(&lock(&self.writer), &g.memory, &pages, batch, timeout))
            .map_err(stream_err)?;
        Ok((st.bytes, st.zero, st.normal))
    }

    /// Reads the next record. A page batch is checked and applied to `guest` and returned as
    /// (PAGES, None, (bytes, zero, normal)); anything else as (type, payload, None). Without
    /// a guest (before the handshake, or after the last page) a page batch is a protocol error.
    #[allow(clippy::type_complexity)]
    #[pyo3(signature = (guest=None))]
    fn receive<'py>(
        &self,
        py: Python<'py>,
        guest: Option<&Guest>,
    ) -> PyResult<(
        u8,
        Option<Bound<'py, pyo3::types::PyBytes>>,
        Option<(u64, u64, u64)>,
    )> {
        let g = guest.map(|g| g.inner.clone());
        let timeout = *lock(&self.timeout);
        let got = py
            .detach(|| stream::receive(&lock(&self.reader), g.as_ref().map(|g| &g.memory), timeout))
            .map_err(stream_err)?;
        Ok(match got {
            Received::Pages(st) => (
                RecordType::Pages as u8,
                None,
                Some((st.bytes, st.zero, st.normal)),
            ),
            Received::Control(t, payload) => {
                (t as u8, Some(pyo3::types::PyBytes::new(py, &payload)), None)
            }
        })
    }

    /// Shuts the connection down (both ways, or only reading with `read_only`): blocked
    /// reads (and writes) return at once.
    #[pyo3(signature = (read_only=false))]
    fn shutdown(&self, read_only: bool) {
        let how = if read_only {
            std::net::Shutdown::Read
        } else {
            std::net::Shutdown::Both
        };
        let _ = self.control.shutdown(how);
    }
}

#[pyfunction]
#[allow(clippy::too_many_arguments)] // one argument per handshake field, as Python passes them
fn encode_handshake<'py>(
    py: Python<'py>,
    page_size: u32,
    pages: u64,
    vcpus: u32,
    dirty_ring: u32,
    channels: u32,
    capabilities: u64,
    flags: u32,
) -> Bound<'py, pyo3::types::PyBytes> {
    let h = Handshake {
        version: stream::VERSION,
        page_size,
        pages,
        vcpus,
        dirty_ring,
        channels,
        capabilities,
        flags,
    };
    pyo3::types::PyBytes::new(py, &h.encode())
}

/// Checks magic and version; returns the handshake's fields.
#[pyfunction]
fn decode_handshake<'py>(py: Python<'py>, data: &[u8]) -> PyResult<Bound<'py, PyDict>> {
    let h = Handshake::decode(data).map_err(stream_err)?;
    let d = PyDict::new(py);
    d.set_item("version", h.version)?;
    d.set_item("page_size", h.page_size)?;
    d.set_item("pages", h.pages)?;
    d.set_item("vcpus", h.vcpus)?;
    d.set_item("dirty_ring", h.dirty_ring)?;
    d.set_item("channels", h.channels)?;
    d.set_item("capabilities", h.capabilities)?;
    d.set_item("pml", h.flags & stream::FLAG_PML != 0)?;
    Ok(d)
}

/// (commit, Rust inputs dirty, ls-tree of python/) of the checkout the extension was built
/// from, or None (rust/build.rs).
#[pyfunction]
fn build_commit() -> Option<(&'static str, Option<bool>, &'static str)> {
    crate::build_commit()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Channel>()?;
    m.add_function(wrap_pyfunction!(encode_handshake, m)?)?;
    m.add_function(wrap_pyfunction!(decode_handshake, m)?)?;
    let py = m.py();
    m.add(
        "MigrationStreamError",
        py.get_type::<MigrationStreamError>(),
    )?;
    m.add("StreamClosed", py.get_type::<StreamClosed>())?;
    m.add("StreamTimeout", py.get_type::<StreamTimeout>())?;
    m.add("ProtocolError", py.get_type::<ProtocolError>())?;
    let records = PyDict::new(py);
    for t in 1..=u8::MAX {
        if let Some(r) = RecordType::from_u8(t) {
            records.set_item(format!("{r:?}"), t)?;
        }
    }
    m.add("RECORD_TYPES", records)?;
    m.add("MAX_BATCH_PAGES", stream::MAX_BATCH_PAGES)?;
    m.add("MIN_RECORD_RATE", stream::MIN_RECORD_RATE)?;
    m.add_class::<Guest>()?;
    m.add_class::<Vcpu>()?;
    m.add_class::<Exit>()?;
    m.add_function(wrap_pyfunction!(bench_mark_rate, m)?)?;
    m.add_function(wrap_pyfunction!(bench_fetch_or_rate, m)?)?;
    m.add_function(wrap_pyfunction!(build_commit, m)?)?;
    m.add("EXIT_REASONS", ExitReason::ALL.map(|r| r.name()).to_vec())?;
    Ok(())
}
