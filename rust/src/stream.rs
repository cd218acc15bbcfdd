//! The migration stream: framed, versioned records over TCP.
//!
//! Every record is an 8-byte header — type (u8), three zero bytes, payload length (u32 LE)
//! — then the payload. The receiver checks the header before reading the payload, and every
//! field of a page batch before it touches guest memory.
//!
//! A page batch (`PAGES`) is `count u32, 0 u32, count x entry u64` then the data of each
//! non-zero page in entry order. An entry is the page number, with bit 63 set for a zero
//! page (sent as the flag alone, QEMU's `duplicate`). The sender hands the kernel pointers
//! straight into guest memory (`writev`), and the receiver reads page data straight into
//! the destination's guest memory (`read`): no user-space copy on either side.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use crate::memory::{GuestMemory, PREFETCH_AHEAD};

pub const MAGIC: [u8; 8] = *b"DQMIGSTR";
pub const VERSION: u32 = 2;
pub const HEADER_LEN: usize = 8;
/// Largest control payload (handshake, device state, ...).
pub const MAX_CONTROL_LEN: usize = 16 << 20;
/// Largest page batch, in pages (also bounds the `writev` vector below IOV_MAX).
pub const MAX_BATCH_PAGES: usize = 1000;
pub const ZERO_PAGE: u64 = 1 << 63;
/// A record must arrive (or leave) at this average rate or faster: a record of `len` bytes
/// has `timeout + len / MIN_RECORD_RATE` from its first byte. Slower counts as a stalled
/// peer (a trickle of a byte a second never holds a migration open).
pub const MIN_RECORD_RATE: f64 = (1 << 20) as f64;

/// Record types. Numbers are part of the wire format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordType {
    Handshake = 1,
    HandshakeAck = 2,
    ChannelHello = 3,
    Pages = 4,
    /// End of a dirty-sync round on a channel (multifd barrier); payload: round u64.
    Sync = 5,
    DeviceState = 6,
    /// Switchover done; payload: memory digest u64 and counts.
    Complete = 7,
    /// Destination to source: the guest runs on the destination.
    Resumed = 8,
    /// Either side: a reason, UTF-8.
    Error = 9,
    /// Sender is done with this channel.
    End = 10,
    /// Source: an iteration (dirty sync) began; payload: JSON telemetry.
    Iteration = 11,
}

impl RecordType {
    pub fn from_u8(t: u8) -> Option<Self> {
        use RecordType::*;
        [
            Handshake,
            HandshakeAck,
            ChannelHello,
            Pages,
            Sync,
            DeviceState,
            Complete,
            Resumed,
            Error,
            End,
            Iteration,
        ]
        .into_iter()
        .find(|r| *r as u8 == t)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("connection closed by peer")]
    Closed,
    #[error("timed out waiting for the peer")]
    Timeout,
    #[error("{0}")]
    Deadline(String),
    #[error("bad stream: {0}")]
    Protocol(String),
    #[error("{0}")]
    Io(io::Error),
}

impl From<io::Error> for StreamError {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => StreamError::Timeout,
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted => StreamError::Closed,
            _ => StreamError::Io(e),
        }
    }
}

fn protocol<T>(msg: impl Into<String>) -> Result<T, StreamError> {
    Err(StreamError::Protocol(msg.into()))
}

/// The time one record may take, from its first byte to its last. Socket timeouts alone
/// bound each system call, so a peer that sends a byte now and then would hold a record
/// open forever; before every call the socket's timeout is set to what is left of this.
#[derive(Clone, Copy, Debug)]
pub struct Deadline {
    start: Instant,
    budget: Duration,
}

impl Deadline {
    /// `timeout` plus the time `len` bytes take at MIN_RECORD_RATE.
    pub fn for_record(timeout: Duration, len: usize) -> Self {
        Self {
            start: Instant::now(),
            budget: timeout + Duration::from_secs_f64(len as f64 / MIN_RECORD_RATE),
        }
    }

    /// Allows `len` more bytes (once a header has told the payload's length).
    fn extend(&mut self, len: usize) {
        self.budget += Duration::from_secs_f64(len as f64 / MIN_RECORD_RATE);
    }

    fn left(&self) -> Result<Duration, StreamError> {
        match self.budget.checked_sub(self.start.elapsed()) {
            Some(left) if !left.is_zero() => Ok(left),
            _ => Err(self.missed()),
        }
    }

    fn missed(&self) -> StreamError {
        StreamError::Deadline(format!(
            "record not complete within {:.1} s: the peer stalled or sends slower than {} KiB/s",
            self.budget.as_secs_f64(),
            MIN_RECORD_RATE as u64 >> 10
        ))
    }

    /// Sets the socket's timeout for the next call in `dir` to what is left.
    fn arm(&self, stream: &TcpStream, dir: Direction) -> Result<(), StreamError> {
        let left = Some(self.left()?);
        match dir {
            Direction::Send => stream.set_write_timeout(left)?,
            Direction::Receive => stream.set_read_timeout(left)?,
        }
        Ok(())
    }

    /// A timeout of the call armed last means the record's time is up.
    fn check(&self, e: io::Error) -> StreamError {
        match StreamError::from(e) {
            StreamError::Timeout => self.missed(),
            other => other,
        }
    }
}

pub fn header(t: RecordType, len: usize) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0] = t as u8;
    h[4..].copy_from_slice(&(len as u32).to_le_bytes());
    h
}

/// What the source says first and the destination checks before anything else.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Handshake {
    pub version: u32,
    pub page_size: u32,
    pub pages: u64,
    pub vcpus: u32,
    pub dirty_ring: u32,
    pub channels: u32,
    pub capabilities: u64,
    /// Guest properties beyond the geometry: `FLAG_PML`.
    pub flags: u32,
}

/// Handshake flag: the dirty rings reserve the PML buffer (see `ring::PML_ENTRIES`).
pub const FLAG_PML: u32 = 1;

impl Handshake {
    pub const LEN: usize = 8 + 4 + 4 + 8 + 4 + 4 + 4 + 8 + 4;

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(Self::LEN);
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&self.version.to_le_bytes());
        b.extend_from_slice(&self.page_size.to_le_bytes());
        b.extend_from_slice(&self.pages.to_le_bytes());
        b.extend_from_slice(&self.vcpus.to_le_bytes());
        b.extend_from_slice(&self.dirty_ring.to_le_bytes());
        b.extend_from_slice(&self.channels.to_le_bytes());
        b.extend_from_slice(&self.capabilities.to_le_bytes());
        b.extend_from_slice(&self.flags.to_le_bytes());
        b
    }

    /// Parses and checks magic and version; the caller checks the geometry it can host.
    pub fn decode(b: &[u8]) -> Result<Self, StreamError> {
        if b.len() != Self::LEN {
            return protocol(format!(
                "handshake is {} bytes, expected {}",
                b.len(),
                Self::LEN
            ));
        }
        if b[..8] != MAGIC {
            return protocol(format!(
                "wrong magic {:?}: not a dqmig migration stream",
                &b[..8]
            ));
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let h = Handshake {
            version: u32_at(8),
            page_size: u32_at(12),
            pages: u64_at(16),
            vcpus: u32_at(24),
            dirty_ring: u32_at(28),
            channels: u32_at(32),
            capabilities: u64_at(36),
            flags: u32_at(44),
        };
        if h.version != VERSION {
            return protocol(format!(
                "stream version {} is not supported (this dqmig speaks {VERSION})",
                h.version
            ));
        }
        Ok(h)
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageStats {
    pub bytes: u64,
    pub zero: u64,
    pub normal: u64,
}

impl PageStats {
    fn add(&mut self, o: PageStats) {
        self.bytes += o.bytes;
        self.zero += o.zero;
        self.normal += o.normal;
    }
}

/// Pages per batch for `page_size`: MAX_BATCH_PAGES, but never more than the header's u32
/// length can describe (3 pages of 1 GiB).
pub fn max_batch_pages(page_size: usize) -> usize {
    let fits = (u32::MAX as usize - 8) / (page_size + 8);
    MAX_BATCH_PAGES.min(fits).max(1)
}

/// Writes a control record within its deadline (`timeout` plus its length at the minimum rate).
pub fn send_record(
    stream: &TcpStream,
    t: RecordType,
    payload: &[u8],
    timeout: Duration,
) -> Result<(), StreamError> {
    if payload.len() > MAX_CONTROL_LEN {
        return protocol(format!(
            "{t:?} payload of {} bytes exceeds {MAX_CONTROL_LEN}",
            payload.len()
        ));
    }
    let mut rec = Vec::with_capacity(HEADER_LEN + payload.len());
    rec.extend_from_slice(&header(t, payload.len()));
    rec.extend_from_slice(payload);
    let d = Deadline::for_record(timeout, rec.len());
    let mut sent = 0;
    while sent < rec.len() {
        d.arm(stream, Direction::Send)?;
        match (&mut &*stream).write(&rec[sent..]) {
            Ok(0) => return Err(StreamError::Closed),
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(d.check(e)),
        }
    }
    Ok(())
}

/// Sends `pages` as page batches of at most `batch` pages, zero pages as flags; each batch
/// is a record with its own deadline.
pub fn send_pages(
    stream: &TcpStream,
    mem: &GuestMemory,
    pages: &[u64],
    batch: usize,
    timeout: Duration,
) -> Result<PageStats, StreamError> {
    let batch = batch.clamp(1, max_batch_pages(mem.page_size()));
    let mut total = PageStats::default();
    for chunk in pages.chunks(batch) {
        total.add(send_batch(stream, mem, chunk, timeout)?);
    }
    Ok(total)
}

fn send_batch(
    stream: &TcpStream,
    mem: &GuestMemory,
    pages: &[u64],
    timeout: Duration,
) -> Result<PageStats, StreamError> {
    let page_size = mem.page_size();
    let mut stats = PageStats::default();
    let mut meta = Vec::with_capacity(HEADER_LEN + 8 + 8 * pages.len());
    meta.extend_from_slice(&[0u8; HEADER_LEN]);
    meta.extend_from_slice(&(pages.len() as u32).to_le_bytes());
    meta.extend_from_slice(&0u32.to_le_bytes());
    // (pointer, length) runs of page data; adjacent pages merge into one run.
    let mut runs: Vec<(*const u8, usize)> = Vec::new();
    let unbacked = mem.unbacked(pages);
    for (i, (&p, unbacked)) in pages.iter().zip(unbacked).enumerate() {
        if let Some(&ahead) = pages.get(i + PREFETCH_AHEAD) {
            mem.prefetch_page(ahead as usize); // the zero check below reads each page's start
        }
        let page = mem
            .check_page(p)
            .map_err(|e| StreamError::Protocol(e.to_string()))?;
        if unbacked || mem.is_zero_page(page) {
            meta.extend_from_slice(&(p | ZERO_PAGE).to_le_bytes());
            stats.zero += 1;
            continue;
        }
        meta.extend_from_slice(&p.to_le_bytes());
        stats.normal += 1;
        push_run(
            &mut runs,
            mem.page_words(page).as_ptr() as *const u8,
            page_size,
        );
    }
    let payload = meta.len() - HEADER_LEN + stats.normal as usize * page_size;
    meta[..HEADER_LEN].copy_from_slice(&header(RecordType::Pages, payload));
    let mut iov = Vec::with_capacity(runs.len() + 1);
    iov.push((meta.as_ptr(), meta.len()));
    iov.extend(runs);
    let d = Deadline::for_record(timeout, HEADER_LEN + payload);
    vectored_all(stream, &mut iov, Direction::Send, &d)?;
    stats.bytes = (HEADER_LEN + payload) as u64;
    Ok(stats)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Send,
    Receive,
}

/// `writev` (or `readv`) until every byte of every run is transferred, within `d`.
fn vectored_all(
    stream: &TcpStream,
    runs: &mut [(*const u8, usize)],
    dir: Direction,
    d: &Deadline,
) -> Result<(), StreamError> {
    let fd = stream.as_raw_fd();
    let mut first = 0;
    while first < runs.len() {
        let iov: Vec<libc::iovec> = runs[first..]
            .iter()
            .take(1024)
            .map(|&(ptr, len)| libc::iovec {
                iov_base: ptr as *mut libc::c_void,
                iov_len: len,
            })
            .collect();
        d.arm(stream, dir)?;
        let n = match dir {
            // SAFETY: each iovec describes memory that stays valid for the call: `meta`, a Vec
            // owned by the caller, or whole pages of the guest mapping, which the caller's
            // `&GuestMemory` keeps alive. The kernel only reads these bytes. vCPUs may store
            // to a page while the kernel copies it; those stores are atomic word writes
            // followed by a dirty mark, so such a page is sent again in a later round (or the
            // vCPUs are stopped, at switchover): a torn copy never survives. No Rust
            // reference to the page bytes is created.
            Direction::Send => unsafe { libc::writev(fd, iov.as_ptr(), iov.len() as libc::c_int) },
            // SAFETY: each iovec is a run of whole pages of the destination's guest mapping,
            // checked in range by the caller and kept alive by its `&GuestMemory`. The kernel
            // writes plain bytes there and no Rust reference to them is created; every Rust
            // access to guest memory goes through atomics on the same words. (The destination
            // also starts no vCPU until every channel has finished, so in practice nothing
            // even reads these pages meanwhile.)
            Direction::Receive => unsafe {
                libc::readv(fd, iov.as_ptr(), iov.len() as libc::c_int)
            },
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(d.check(e));
        }
        if n == 0 && dir == Direction::Receive {
            return protocol("stream truncated inside page data");
        }
        let mut n = n as usize;
        while n > 0 {
            let (ptr, len) = &mut runs[first];
            if n >= *len {
                n -= *len;
                first += 1;
            } else {
                *ptr = ptr.wrapping_add(n);
                *len -= n;
                n = 0;
            }
        }
        while first < runs.len() && runs[first].1 == 0 {
            first += 1;
        }
    }
    Ok(())
}

/// Adds one page to a list of (pointer, length) runs, merging it with the previous run when
/// the two are adjacent in memory.
fn push_run(runs: &mut Vec<(*const u8, usize)>, ptr: *const u8, len: usize) {
    match runs.last_mut() {
        Some((start, run_len)) if start.wrapping_add(*run_len) == ptr => *run_len += len,
        _ => runs.push((ptr, len)),
    }
}

/// What the receiver got.
#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    /// A page batch, already applied to guest memory.
    Pages(PageStats),
    Control(RecordType, Vec<u8>),
}

/// Reads the next record; page batches are checked and applied to `mem`. The wait for the
/// record's first byte is bounded by `timeout`; from that byte on, the whole record has its
/// deadline (`timeout` plus its length at MIN_RECORD_RATE).
pub fn receive(
    stream: &TcpStream,
    mem: Option<&GuestMemory>,
    timeout: Duration,
) -> Result<Received, StreamError> {
    let mut h = [0u8; HEADER_LEN];
    stream.set_read_timeout(Some(timeout))?;
    loop {
        match (&mut &*stream).read(&mut h[..1]) {
            Ok(0) => return Err(StreamError::Closed),
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let mut d = Deadline::for_record(timeout, HEADER_LEN);
    read_exact_by(stream, &mut h[1..], &d, "a record header")?;
    let Some(t) = RecordType::from_u8(h[0]) else {
        return protocol(format!("unknown record type {}", h[0]));
    };
    if h[1..4] != [0, 0, 0] {
        return protocol(format!(
            "reserved header bytes are not zero: {:?}",
            &h[1..4]
        ));
    }
    let len = u32::from_le_bytes(h[4..].try_into().expect("4 bytes")) as usize;
    d.extend(len);
    if t == RecordType::Pages {
        let Some(mem) = mem else {
            return protocol(
                "page batch out of place (before the handshake or after the last page)",
            );
        };
        return receive_pages(stream, mem, len, &d).map(Received::Pages);
    }
    if len > MAX_CONTROL_LEN {
        return protocol(format!(
            "{t:?} record of {len} bytes exceeds the {MAX_CONTROL_LEN}-byte limit"
        ));
    }
    let mut payload = vec![0u8; len];
    read_exact_by(stream, &mut payload, &d, &format!("a {t:?} record"))?;
    Ok(Received::Control(t, payload))
}

/// Fills `buf`, part of `what`, within `d`: the stream ending first is a truncated record.
fn read_exact_by(
    stream: &TcpStream,
    buf: &mut [u8],
    d: &Deadline,
    what: &str,
) -> Result<(), StreamError> {
    let mut got = 0;
    while got < buf.len() {
        d.arm(stream, Direction::Receive)?;
        match (&mut &*stream).read(&mut buf[got..]) {
            Ok(0) => return protocol(format!("stream truncated inside {what}")),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(d.check(e)),
        }
    }
    Ok(())
}

fn receive_pages(
    stream: &TcpStream,
    mem: &GuestMemory,
    len: usize,
    d: &Deadline,
) -> Result<PageStats, StreamError> {
    let page_size = mem.page_size();
    if len < 8 {
        return protocol(format!(
            "page batch of {len} bytes is shorter than its count"
        ));
    }
    let mut head = [0u8; 8];
    read_exact_by(stream, &mut head, d, "a page batch")?;
    let count = u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) as usize;
    if head[4..] != [0, 0, 0, 0] {
        return protocol("page batch reserved field is not zero");
    }
    if count == 0 || count > MAX_BATCH_PAGES {
        return protocol(format!(
            "page batch of {count} pages (allowed 1..={MAX_BATCH_PAGES})"
        ));
    }
    if len < 8 + 8 * count {
        return protocol(format!(
            "page batch of {len} bytes cannot hold {count} entries"
        ));
    }
    let mut index = vec![0u8; 8 * count];
    read_exact_by(stream, &mut index, d, "a page batch")?;
    let entries: Vec<u64> = index
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8")))
        .collect();
    let mut stats = PageStats::default();
    for &e in &entries {
        mem.check_page(e & !ZERO_PAGE)
            .map_err(|err| StreamError::Protocol(err.to_string()))?;
        if e & ZERO_PAGE != 0 {
            stats.zero += 1;
        } else {
            stats.normal += 1;
        }
    }
    let expected = 8 + 8 * count + stats.normal as usize * page_size;
    if len != expected {
        return protocol(format!(
            "page batch length {len} does not match its {count} entries ({expected})"
        ));
    }
    let mut runs = Vec::new();
    let pages: Vec<u64> = entries.iter().map(|e| e & !ZERO_PAGE).collect();
    let unbacked = if stats.zero > 0 {
        mem.unbacked(&pages)
    } else {
        vec![false; pages.len()]
    };
    for (&e, unbacked) in entries.iter().zip(unbacked) {
        let page = (e & !ZERO_PAGE) as usize;
        if e & ZERO_PAGE != 0 {
            if !unbacked {
                zero_page(mem, page);
            }
        } else {
            push_run(
                &mut runs,
                mem.page_words(page).as_ptr() as *const u8,
                page_size,
            );
        }
    }
    vectored_all(stream, &mut runs, Direction::Receive, d)?;
    stats.bytes = (HEADER_LEN + len) as u64;
    Ok(stats)
}

/// Clears a page, skipping one that is already zero: a fresh destination is all zero, and
/// writing zeros would only allocate memory for them (QEMU checks the same way).
fn zero_page(mem: &GuestMemory, page: usize) {
    if mem.is_zero_page(page) {
        return;
    }
    for w in mem.page_words(page) {
        w.store(0, std::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::time::Duration;

    const T: Duration = Duration::from_secs(5);

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        for s in [&a, &b] {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        }
        (a, b)
    }

    #[test]
    fn batches_of_huge_pages_fit_the_length_field() {
        assert_eq!(max_batch_pages(4096), MAX_BATCH_PAGES);
        assert_eq!(max_batch_pages(1 << 30), 3);
        assert!(max_batch_pages(1 << 30) * ((1 << 30) + 8) + 8 <= u32::MAX as usize);
    }

    #[test]
    fn handshake_roundtrip_and_checks() {
        let h = Handshake {
            version: VERSION,
            page_size: 4096,
            pages: 10,
            vcpus: 2,
            dirty_ring: 0,
            channels: 1,
            capabilities: 5,
            flags: FLAG_PML,
        };
        assert_eq!(Handshake::decode(&h.encode()).unwrap(), h);
        let mut bad = h.encode();
        bad[0] = b'X';
        assert!(Handshake::decode(&bad)
            .unwrap_err()
            .to_string()
            .contains("magic"));
        let v2 = Handshake {
            version: VERSION + 1,
            ..h.clone()
        }
        .encode();
        assert!(Handshake::decode(&v2)
            .unwrap_err()
            .to_string()
            .contains("version"));
        assert!(Handshake::decode(&h.encode()[..10]).is_err());
    }

    #[test]
    fn pages_roundtrip_with_zero_pages() {
        let src = GuestMemory::new(64, 4096).unwrap();
        let dst = GuestMemory::new(64, 4096).unwrap();
        for p in [1usize, 2, 3, 10, 63] {
            src.write_words(p, 0, 512, p as u64 * 7 + 1);
        }
        dst.write_words(5, 0, 1, 99); // stale data the zero page must clear
        let (a, b) = pair();
        let pages: Vec<u64> = (0..64).collect();
        let sent = std::thread::scope(|s| {
            let h = s.spawn(|| send_pages(&a, &src, &pages, 7, T).unwrap());
            let mut got = PageStats::default();
            while got.zero + got.normal < 64 {
                match receive(&b, Some(&dst), T).unwrap() {
                    Received::Pages(st) => got.add(st),
                    other => panic!("{other:?}"),
                }
            }
            let sent = h.join().unwrap();
            assert_eq!(got, sent);
            sent
        });
        assert_eq!((sent.normal, sent.zero), (5, 59));
        assert_eq!(src.digest(), dst.digest());
        send_record(&a, RecordType::End, b"", T).unwrap();
        assert_eq!(
            receive(&b, Some(&dst), T).unwrap(),
            Received::Control(RecordType::End, vec![])
        );
        drop(a);
        assert!(matches!(
            receive(&b, Some(&dst), T),
            Err(StreamError::Closed)
        ));
    }

    fn feed(bytes: &[u8]) -> Result<Received, StreamError> {
        let mem = GuestMemory::new(4, 4096).unwrap();
        let (mut a, b) = pair();
        a.write_all(bytes).unwrap();
        drop(a);
        receive(&b, Some(&mem), T)
    }

    #[test]
    fn rejects_bad_records() {
        let err = |b: &[u8]| feed(b).unwrap_err().to_string();
        assert!(err(&[99, 0, 0, 0, 0, 0, 0, 0]).contains("unknown record type"));
        assert!(err(&[1, 1, 0, 0, 0, 0, 0, 0]).contains("reserved"));
        assert!(err(&header(RecordType::Error, MAX_CONTROL_LEN + 1)).contains("exceeds"));
        assert!(err(&[1, 0, 0]).contains("truncated"));
        let mut batch = header(RecordType::Pages, 16).to_vec();
        batch.extend_from_slice(&1u32.to_le_bytes());
        batch.extend_from_slice(&0u32.to_le_bytes());
        batch.extend_from_slice(&(4u64 | ZERO_PAGE).to_le_bytes());
        assert!(err(&batch).contains("out of range"), "page beyond memory");
        let mut batch = header(RecordType::Pages, 16).to_vec();
        batch.extend_from_slice(&1u32.to_le_bytes());
        batch.extend_from_slice(&0u32.to_le_bytes());
        batch.extend_from_slice(&2u64.to_le_bytes());
        assert!(
            err(&batch).contains("does not match"),
            "normal page without data"
        );
        let mut batch = header(RecordType::Pages, 8).to_vec();
        batch.extend_from_slice(&5000u32.to_le_bytes());
        batch.extend_from_slice(&0u32.to_le_bytes());
        assert!(err(&batch).contains("allowed"));
        assert!(err(&header(RecordType::End, 10)).contains("truncated inside a End record"));
    }

    const SHORT: Duration = Duration::from_millis(300);

    #[test]
    fn a_trickling_peer_misses_the_record_deadline() {
        let (mut a, b) = pair();
        let mut rec = header(RecordType::Error, 64).to_vec();
        rec.extend_from_slice(&[b'x'; 64]);
        let t0 = Instant::now();
        let got = std::thread::scope(|s| {
            s.spawn(move || {
                // A byte every 50 ms: each read returns well inside SHORT, the record never.
                for byte in rec {
                    if a.write_all(&[byte]).is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            });
            let got = receive(&b, None, SHORT);
            b.shutdown(std::net::Shutdown::Both).unwrap();
            got
        });
        let waited = t0.elapsed();
        let err = got.unwrap_err();
        assert!(matches!(err, StreamError::Deadline(_)), "{err}");
        assert!(err.to_string().contains("stalled"), "{err}");
        // First byte at ~0, then SHORT plus 72 bytes at the minimum rate (about 0 s).
        assert!(waited < SHORT + Duration::from_secs(1), "{waited:?}"); // not the 5 s of `pair`
    }

    #[test]
    fn a_stalled_receiver_fails_the_sender_within_one_deadline() {
        let (a, _b) = pair(); // _b never reads: the socket buffers fill, then writes block
        let mem = GuestMemory::new(4096, 4096).unwrap();
        for p in 0..4096 {
            mem.write_words(p, 0, 512, p as u64 + 1);
        }
        let pages: Vec<u64> = (0..4096).collect();
        let t0 = Instant::now();
        let err = loop {
            // Each call sends batches until the buffers are full; the blocked one fails.
            if let Err(e) = send_pages(&a, &mem, &pages, 16, SHORT) {
                break e;
            }
            assert!(t0.elapsed() < Duration::from_secs(5), "never blocked");
        };
        assert!(matches!(err, StreamError::Deadline(_)), "{err}");
        let batch_bytes = 16 * (4096 + 8);
        let bound = SHORT + Duration::from_secs_f64(batch_bytes as f64 / MIN_RECORD_RATE);
        // One batch's deadline after the buffers filled (sending until then takes little).
        assert!(
            t0.elapsed() < bound + Duration::from_millis(500),
            "{:?}",
            t0.elapsed()
        );
    }
}
