//! The emulated `KVM_RUN`: a vCPU executes its guest program against guest memory until an
//! exit, counting what it does. The DMA writer is the same engine with no dirty ring and no
//! vCPU index: a device whose writes vCPU throttles cannot see.
//!
//! Dirty quota (the KVM patch series): `quota` is a lifetime budget in pages, 0 = off.
//! Before every write the vCPU checks `count >= quota` and exits with
//! `DIRTY_QUOTA_EXHAUSTED {count, quota}`; user space re-arms with `quota = count + grant`.
//! With `pml_batch = 1` (default) the check sees every dirtied page, so the vCPU never
//! dirties a page past its quota: overshoot 0. Real hardware logs writes in a 512-entry PML
//! buffer and KVM only counts them when it drains; `pml_batch = B` emulates that (the count
//! the check sees advances in steps of B) and the worst-case overshoot is B - 1 pages
//! (511 for B = 512, the figure given in the KVM review).

use std::sync::atomic::{
    AtomicBool, AtomicU64, AtomicUsize,
    Ordering::{AcqRel, Acquire, Relaxed, Release},
};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::program::{Program, ProgramSpec, GOLDEN};
use crate::tracker::Writer;
use crate::{Error, Guest};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReason {
    DirtyQuotaExhausted = 0,
    DirtyRingFull = 1,
    Timeslice = 2,
    Kicked = 3,
    Done = 4,
}

impl ExitReason {
    pub const ALL: [ExitReason; 5] = [
        ExitReason::DirtyQuotaExhausted,
        ExitReason::DirtyRingFull,
        ExitReason::Timeslice,
        ExitReason::Kicked,
        ExitReason::Done,
    ];

    /// The name user space sees (KVM's spelling where KVM has one).
    pub fn name(self) -> &'static str {
        match self {
            ExitReason::DirtyQuotaExhausted => "DIRTY_QUOTA_EXHAUSTED",
            ExitReason::DirtyRingFull => "DIRTY_RING_FULL",
            ExitReason::Timeslice => "TIMESLICE",
            ExitReason::Kicked => "KICKED",
            ExitReason::Done => "DONE",
        }
    }
}

/// What `run` returns. `count` and `quota` are the dirty counter and quota at the exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exit {
    pub reason: ExitReason,
    pub count: u64,
    pub quota: u64,
}

/// Counters readable from any thread while the vCPU runs. Each is written only by the
/// vCPU's own `run` (plain load + store, no read-modify-write on the hot path).
#[derive(Default)]
pub struct Counters {
    pub pages_dirtied: AtomicU64,
    pub bytes_written: AtomicU64,
    pub progress: AtomicU64,
    pub exits: [AtomicU64; 5],
    pub run_ns: AtomicU64,
    pub halt_ns: AtomicU64,
    pub stress_gib: AtomicU64,
    pub stress_last_ms_per_gib: AtomicU64,
}

#[inline]
fn bump(c: &AtomicU64, by: u64) {
    c.store(c.load(Relaxed).wrapping_add(by), Relaxed);
}

/// A point-in-time copy of the counters.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CounterSnapshot {
    pub pages_dirtied: u64,
    pub bytes_written: u64,
    pub progress: u64,
    pub exits: [u64; 5],
    pub run_ns: u64,
    pub halt_ns: u64,
    pub quota: u64,
    pub stress_gib: u64,
    pub stress_last_ms_per_gib: f64,
}

/// State only the running thread touches; the mutex makes `run` single-entry and lets
/// `sync()` wait for a run in progress to end.
struct RunState {
    program: Program,
    /// Token bucket for the open-loop rate limit (steps).
    tokens: f64,
    refilled: Option<Instant>,
    /// Stress: bytes written towards the current GiB and when that GiB started.
    gib_bytes: u64,
    gib_started: Option<Instant>,
}

pub struct Vcpu {
    index: usize,
    writer: Writer,
    guest: Arc<Guest>,
    state: Mutex<RunState>,
    counters: Counters,
    quota: AtomicU64,
    pml_batch: u64,
    kicked: AtomicBool,
    /// Threads inside `sync`: `run` waits for them to finish before it starts again.
    syncing: AtomicUsize,
    wake_lock: Mutex<()>,
    wake: Condvar,
}

/// Time budget between clock reads, in words touched (about a microsecond of work).
const CLOCK_CHECK_WORK: u64 = 2048;
/// Largest burst the rate limiter allows after a pause, in seconds of rate.
const RATE_BURST_S: f64 = 0.01;

impl Vcpu {
    /// A vCPU with index `index` (its dirty ring, in ring mode).
    pub fn new(guest: Arc<Guest>, index: usize, spec: ProgramSpec) -> Result<Self, Error> {
        if index >= guest.vcpus {
            return Err(Error::Config(format!(
                "vcpu index {index} out of range: the guest has {} vCPUs",
                guest.vcpus
            )));
        }
        Self::build(guest, index, Writer::Vcpu(index), spec)
    }

    /// A DMA writer: a device running `spec` with its own counter and quota.
    pub fn new_device(guest: Arc<Guest>, spec: ProgramSpec) -> Result<Self, Error> {
        Self::build(guest, usize::MAX, Writer::Device, spec)
    }

    fn build(
        guest: Arc<Guest>,
        index: usize,
        writer: Writer,
        spec: ProgramSpec,
    ) -> Result<Self, Error> {
        let mem = &guest.memory;
        let spec = spec.validated(mem.pages() as u64, mem.page_size() as u64)?;
        Ok(Self {
            index,
            writer,
            state: Mutex::new(RunState {
                program: Program::new(spec),
                tokens: 0.0,
                refilled: None,
                gib_bytes: 0,
                gib_started: None,
            }),
            guest,
            counters: Counters::default(),
            quota: AtomicU64::new(0),
            pml_batch: 1,
            kicked: AtomicBool::new(false),
            syncing: AtomicUsize::new(0),
            wake_lock: Mutex::new(()),
            wake: Condvar::new(),
        })
    }

    /// Emulate PML-batched quota accounting (see the module doc). `batch >= 1`.
    pub fn with_pml_batch(mut self, batch: u64) -> Self {
        self.pml_batch = batch.max(1);
        self
    }

    pub fn index(&self) -> usize {
        self.index
    }

    pub fn is_device(&self) -> bool {
        matches!(self.writer, Writer::Device)
    }

    pub fn guest(&self) -> &Arc<Guest> {
        &self.guest
    }

    pub fn quota(&self) -> u64 {
        self.quota.load(Relaxed)
    }

    pub fn set_quota(&self, quota: u64) {
        self.quota.store(quota, Relaxed);
    }

    pub fn dirty_count(&self) -> u64 {
        self.counters.pages_dirtied.load(Relaxed)
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    pub fn snapshot(&self) -> CounterSnapshot {
        let c = &self.counters;
        CounterSnapshot {
            pages_dirtied: c.pages_dirtied.load(Relaxed),
            bytes_written: c.bytes_written.load(Relaxed),
            progress: c.progress.load(Relaxed),
            exits: std::array::from_fn(|i| c.exits[i].load(Relaxed)),
            run_ns: c.run_ns.load(Relaxed),
            halt_ns: c.halt_ns.load(Relaxed),
            quota: self.quota(),
            stress_gib: c.stress_gib.load(Relaxed),
            stress_last_ms_per_gib: f64::from_bits(c.stress_last_ms_per_gib.load(Relaxed)),
        }
    }

    /// Makes a `run` in progress return `KICKED` promptly (or the next one, if none is).
    pub fn kick(&self) {
        self.kicked.store(true, Release);
        let _g = self.wake_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.wake.notify_all();
    }

    /// Kicks and waits until no `run` is in progress: every write made before this returns
    /// is visible to the caller, and every later run sees what the caller did before
    /// (used when dirty logging starts, as KVM makes vCPUs exit on a memslot change).
    pub fn sync(&self) {
        Self::sync_all(&[self]);
    }

    /// `sync` on every vCPU in `vcpus`: all are kicked at once, then each is waited for.
    /// A vCPU whose run ended does not start another until the sync is over, so a busy
    /// vCPU thread cannot take the lock back before a descheduled syncer gets it (on an
    /// overcommitted host that cost a whole timeslice per vCPU).
    pub fn sync_all(vcpus: &[&Vcpu]) {
        for v in vcpus {
            v.syncing.fetch_add(1, AcqRel);
            v.kick();
        }
        for v in vcpus {
            drop(v.lock_state());
        }
        for v in vcpus {
            if v.syncing.fetch_sub(1, AcqRel) == 1 {
                let _g = v.wake_lock.lock().unwrap_or_else(|e| e.into_inner());
                v.wake.notify_all();
            }
        }
    }

    /// Holds a `run` back while a `sync` is in progress.
    fn wait_for_sync(&self) {
        if self.syncing.load(Acquire) == 0 {
            return;
        }
        let mut g = self.wake_lock.lock().unwrap_or_else(|e| e.into_inner());
        while self.syncing.load(Acquire) > 0 {
            // The syncer takes this lock to notify after its count drops, so a count seen
            // above zero here is followed by a notify; the timeout is only a backstop.
            g = self
                .wake
                .wait_timeout(g, Duration::from_millis(1))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn lock_state(&self) -> MutexGuard<'_, RunState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn export_state(&self) -> String {
        self.lock_state().program.to_json()
    }

    /// Replaces the program and its position (a migrated guest resuming).
    pub fn import_state(&self, json: &str) -> Result<(), Error> {
        let mem = &self.guest.memory;
        let program = Program::from_json(json, mem.pages() as u64, mem.page_size() as u64)?;
        let mut st = self.lock_state();
        self.counters.progress.store(program.progress, Relaxed);
        st.program = program;
        Ok(())
    }

    /// Sleeps until `until` or a kick; true if kicked. Counted as halted time.
    fn halt_until(&self, until: Instant) -> bool {
        let start = Instant::now();
        let mut g = self.wake_lock.lock().unwrap_or_else(|e| e.into_inner());
        let kicked = loop {
            if self.kicked.load(Acquire) {
                break true;
            }
            let now = Instant::now();
            if now >= until {
                break false;
            }
            g = self
                .wake
                .wait_timeout(g, until - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        };
        drop(g);
        bump(&self.counters.halt_ns, start.elapsed().as_nanos() as u64);
        kicked
    }

    /// Counts the exit; `count` is the dirty count it reports (for a quota exit, the count
    /// the check saw, which PML batching can leave behind the true one).
    fn exit(&self, reason: ExitReason, count: u64) -> Exit {
        bump(&self.counters.exits[reason as usize], 1);
        Exit {
            reason,
            count,
            quota: self.quota(),
        }
    }

    /// Runs the guest program for at most `timeslice`, until an exit.
    pub fn run(&self, timeslice: Duration) -> Exit {
        self.wait_for_sync();
        let mut st = self.lock_state();
        let start = Instant::now();
        let halt_before = self.counters.halt_ns.load(Relaxed);
        let exit = self.run_locked(&mut st, start + timeslice);
        let halted = self.counters.halt_ns.load(Relaxed) - halt_before;
        bump(
            &self.counters.run_ns,
            (start.elapsed().as_nanos() as u64).saturating_sub(halted),
        );
        exit
    }

    fn run_locked(&self, st: &mut RunState, deadline: Instant) -> Exit {
        let guest = &*self.guest;
        let mem = &guest.memory;
        let ring = match self.writer {
            Writer::Vcpu(i) => guest.tracker.ring(i),
            Writer::Device => None,
        };
        let wpp = mem.words_per_page();
        let page_bytes = mem.page_size() as u64;
        let c = &self.counters;
        // Fixed for the whole run: the program cannot change while the state lock is held.
        let rate = st.program.spec.rate;
        let compute = st.program.compute();
        let idle = st.program.is_idle();
        let stress = st.program.is_stress();
        // Dirtied pages the quota check has not seen yet (PML emulation).
        let mut unflushed = 0u64;
        let mut work = 0u64;
        loop {
            if self.kicked.load(Relaxed) && self.kicked.swap(false, Acquire) {
                return self.exit(ExitReason::Kicked, self.dirty_count());
            }
            if st.program.is_done() {
                return self.exit(ExitReason::Done, self.dirty_count());
            }
            if work >= CLOCK_CHECK_WORK || idle {
                work = 0;
                if Instant::now() >= deadline {
                    return self.exit(ExitReason::Timeslice, self.dirty_count());
                }
            }
            if idle {
                self.halt_until(deadline);
                continue;
            }
            if rate > 0.0 && !self.take_token(st, rate, deadline) {
                work = CLOCK_CHECK_WORK; // halted: re-read the clock before the next step
                continue;
            }
            // Decide the step before checking the quota (reads never exit for quota); an
            // exit rewinds the cursor so the step runs when the vCPU is re-entered.
            let cursor = st.program.cursor();
            let access = st
                .program
                .next_access(wpp)
                .expect("non-idle program has a next access");
            if access.write {
                let seen = self.dirty_count() - unflushed;
                let quota = self.quota();
                let reason = if quota != 0 && seen >= quota {
                    Some(ExitReason::DirtyQuotaExhausted)
                } else if ring.is_some_and(|r| r.is_soft_full()) {
                    Some(ExitReason::DirtyRingFull)
                } else {
                    None
                };
                if let Some(reason) = reason {
                    st.program.rewind(cursor);
                    return self.exit(reason, seen);
                }
            }
            work += access.words as u64 + compute as u64 / 4 + 1;
            if access.write {
                mem.write_words(access.page, access.word_offset, access.words, access.value);
                if guest.tracker.mark(access.page, self.writer) {
                    bump(&c.pages_dirtied, 1);
                    unflushed += 1;
                    if unflushed >= self.pml_batch {
                        unflushed = 0;
                    }
                }
                bump(&c.bytes_written, access.words as u64 * 8);
            } else {
                let mut v = mem.read_words(access.page, access.word_offset, access.words);
                for _ in 0..compute {
                    v = std::hint::black_box(v.rotate_left(7).wrapping_mul(GOLDEN) ^ 0x5bd1);
                }
                std::hint::black_box(v);
            }
            st.program.complete();
            bump(&c.progress, 1);
            if stress {
                self.account_stress(st, page_bytes);
            }
        }
    }

    /// Rate limit: true if a step may run now; otherwise it halted until the next token,
    /// the deadline or a kick, and the caller loops to re-check exits.
    fn take_token(&self, st: &mut RunState, rate: f64, deadline: Instant) -> bool {
        if st.tokens < 1.0 {
            let now = Instant::now();
            let last = st.refilled.unwrap_or(now);
            let burst = (rate * RATE_BURST_S).max(1.0);
            st.tokens = (st.tokens + (now - last).as_secs_f64() * rate).min(burst);
            st.refilled = Some(now);
            if st.tokens < 1.0 {
                // No later than the deadline, which also bounds the Duration for any rate.
                let left = deadline.saturating_duration_since(now).as_secs_f64();
                let wait = Duration::from_secs_f64(((1.0 - st.tokens) / rate).min(left));
                self.halt_until(now + wait);
                return false;
            }
        }
        st.tokens -= 1.0;
        true
    }

    /// guestperf's figure: wall-clock milliseconds per GiB written, throttling included.
    fn account_stress(&self, st: &mut RunState, page_bytes: u64) {
        let started = *st.gib_started.get_or_insert_with(Instant::now);
        st.gib_bytes += page_bytes;
        if st.gib_bytes >= 1 << 30 {
            let now = Instant::now();
            let ms = (now - started).as_secs_f64() * 1e3;
            self.counters
                .stress_last_ms_per_gib
                .store(ms.to_bits(), Relaxed);
            bump(&self.counters.stress_gib, 1);
            st.gib_bytes -= 1 << 30;
            st.gib_started = Some(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::program::Workload;
    use crate::tracker::TrackMode;

    fn guest(pages: usize, mode: TrackMode, vcpus: usize) -> Arc<Guest> {
        Arc::new(Guest::new(pages, 4096, mode, vcpus).unwrap())
    }

    fn spec(workload: Workload, steps: u64) -> ProgramSpec {
        ProgramSpec {
            steps,
            seed: 1,
            ..ProgramSpec::new(workload)
        }
    }

    const LONG: Duration = Duration::from_secs(10);

    #[test]
    fn runs_to_done_and_counts() {
        let g = guest(64, TrackMode::Bitmap, 1);
        g.tracker.start_logging();
        let v = Vcpu::new(g.clone(), 0, spec(Workload::Sequential, 100)).unwrap();
        let e = v.run(LONG);
        assert_eq!(e.reason, ExitReason::Done);
        let s = v.snapshot();
        assert_eq!(s.progress, 100);
        assert_eq!(
            s.pages_dirtied, 64,
            "each page dirtied once until harvested"
        );
        assert_eq!(s.bytes_written, 800);
        assert_eq!(s.exits[ExitReason::Done as usize], 1);
        assert_eq!(g.tracker.harvest().len(), 64);
    }

    #[test]
    fn quota_exit_exactly_at_quota_and_rearm() {
        let g = guest(1024, TrackMode::Bitmap, 1);
        g.tracker.start_logging();
        let v = Vcpu::new(g.clone(), 0, spec(Workload::Sequential, 0)).unwrap();
        v.set_quota(10);
        let e = v.run(LONG);
        assert_eq!(
            (e.reason, e.count, e.quota),
            (ExitReason::DirtyQuotaExhausted, 10, 10)
        );
        assert_eq!(v.dirty_count(), 10, "no page dirtied past the quota");
        // Still exhausted: exits again at once without dirtying.
        assert_eq!(v.run(LONG).reason, ExitReason::DirtyQuotaExhausted);
        v.set_quota(e.count + 25);
        let e = v.run(LONG);
        assert_eq!((e.count, e.quota), (35, 35));
    }

    #[test]
    fn pml_batch_overshoot_is_bounded() {
        let g = guest(4096, TrackMode::Bitmap, 1);
        g.tracker.start_logging();
        let v = Vcpu::new(g, 0, spec(Workload::Sequential, 0))
            .unwrap()
            .with_pml_batch(512);
        v.set_quota(100);
        let e = v.run(LONG);
        assert_eq!(e.reason, ExitReason::DirtyQuotaExhausted);
        assert!(
            v.dirty_count() >= 100 && v.dirty_count() <= 100 + 511,
            "{}",
            v.dirty_count()
        );
    }

    #[test]
    fn reads_never_exit_for_quota() {
        let g = guest(64, TrackMode::Bitmap, 1);
        g.tracker.start_logging();
        let w = Workload::ReadMostly {
            write_share: 0.0,
            compute: 1,
        };
        let v = Vcpu::new(g, 0, spec(w, 1000)).unwrap();
        v.set_quota(1);
        assert_eq!(v.run(LONG).reason, ExitReason::Done);
    }

    #[test]
    fn ring_full_exit() {
        let g = guest(
            4096,
            TrackMode::Ring {
                size: 256,
                pml: false,
            },
            1,
        );
        g.tracker.start_logging();
        let v = Vcpu::new(g.clone(), 0, spec(Workload::Sequential, 0)).unwrap();
        assert_eq!(v.run(LONG).reason, ExitReason::DirtyRingFull);
        assert_eq!(v.dirty_count(), 256 - 64);
        assert_eq!(g.tracker.reap(), vec![192]);
        assert_eq!(v.run(LONG).reason, ExitReason::DirtyRingFull);
        assert_eq!(v.dirty_count(), 384);
    }

    #[test]
    fn timeslice_and_kick() {
        let g = guest(64, TrackMode::Bitmap, 1);
        let v = Vcpu::new(g, 0, spec(Workload::Uniform, 0)).unwrap();
        assert_eq!(
            v.run(Duration::from_millis(5)).reason,
            ExitReason::Timeslice
        );
        v.kick();
        assert_eq!(
            v.run(LONG).reason,
            ExitReason::Kicked,
            "a kick before run is kept"
        );
        let idle = Vcpu::new(v.guest().clone(), 0, ProgramSpec::idle()).unwrap();
        std::thread::scope(|s| {
            let h = s.spawn(|| {
                let t = Instant::now();
                (idle.run(LONG), t.elapsed())
            });
            std::thread::sleep(Duration::from_millis(20));
            idle.kick();
            let (e, took) = h.join().unwrap();
            assert_eq!(e.reason, ExitReason::Kicked);
            assert!(took < Duration::from_secs(5));
        });
    }

    #[test]
    fn rate_limit_is_respected() {
        let g = guest(64, TrackMode::Bitmap, 1);
        let s = ProgramSpec {
            rate: 2000.0,
            ..spec(Workload::Uniform, 0)
        };
        let v = Vcpu::new(g, 0, s).unwrap();
        let e = v.run(Duration::from_millis(200));
        assert_eq!(e.reason, ExitReason::Timeslice);
        let n = v.snapshot().progress;
        assert!((300..=450).contains(&n), "{n} steps in 200 ms at 2000/s");
    }

    #[test]
    fn device_writer_has_own_counter_and_no_ring() {
        let g = guest(
            64,
            TrackMode::Ring {
                size: 256,
                pml: false,
            },
            1,
        );
        g.tracker.start_logging();
        let d = Vcpu::new_device(g.clone(), spec(Workload::Sequential, 10)).unwrap();
        assert!(d.is_device());
        assert_eq!(d.run(LONG).reason, ExitReason::Done);
        assert_eq!(d.dirty_count(), 10);
        assert!(g.tracker.ring(0).unwrap().is_empty());
        assert_eq!(g.tracker.harvest().len(), 10);
    }

    #[test]
    fn export_import_and_same_memory() {
        // Run 300 steps straight vs 120 + migrate state + 180: same memory digest.
        let straight = guest(32, TrackMode::Bitmap, 1);
        let a = Vcpu::new(straight.clone(), 0, spec(Workload::Uniform, 300)).unwrap();
        a.run(LONG);
        let split = guest(32, TrackMode::Bitmap, 1);
        let b = Vcpu::new(split.clone(), 0, spec(Workload::Uniform, 120)).unwrap();
        b.run(LONG);
        let mut st: serde_json::Value = serde_json::from_str(&b.export_state()).unwrap();
        st["spec"]["steps"] = 300.into();
        let c = Vcpu::new(split.clone(), 0, ProgramSpec::idle()).unwrap();
        c.import_state(&st.to_string()).unwrap();
        assert_eq!(c.run(LONG).reason, ExitReason::Done);
        assert_eq!(c.snapshot().progress, 300);
        assert_eq!(straight.memory.digest(), split.memory.digest());
        assert!(c.import_state("{\"nope\":1}").is_err());
    }

    #[test]
    fn stress_reports_ms_per_gib() {
        let g = guest(1024, TrackMode::Bitmap, 1); // 4 MiB: a GiB is 256 passes
        let v = Vcpu::new(g, 0, spec(Workload::Stress, 262_144 + 1)).unwrap();
        assert_eq!(v.run(LONG * 6).reason, ExitReason::Done);
        let s = v.snapshot();
        assert_eq!(s.stress_gib, 1);
        assert!(s.stress_last_ms_per_gib > 0.0);
    }

    #[test]
    fn sync_all_returns_while_vcpu_threads_keep_running() {
        let g = guest(64, TrackMode::Bitmap, 2);
        let a = Vcpu::new(g.clone(), 0, spec(Workload::Uniform, 0)).unwrap();
        let b = Vcpu::new(g, 1, spec(Workload::Uniform, 0)).unwrap();
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            for v in [&a, &b] {
                let stop = &stop;
                s.spawn(move || {
                    while !stop.load(Acquire) {
                        v.run(Duration::from_millis(1)); // a vCPU thread's loop
                    }
                });
            }
            for _ in 0..50 {
                Vcpu::sync_all(&[&a, &b]);
            }
            stop.store(true, Release);
        });
        assert_eq!(a.syncing.load(Acquire) + b.syncing.load(Acquire), 0);
    }

    #[test]
    fn sync_all_ends_the_runs_in_progress_even_with_a_vcpu_listed_twice() {
        let g = guest(64, TrackMode::Bitmap, 2);
        let a = Vcpu::new(g.clone(), 0, spec(Workload::Uniform, 0)).unwrap();
        let b = Vcpu::new(g, 1, spec(Workload::Uniform, 0)).unwrap();
        std::thread::scope(|s| {
            let ha = s.spawn(|| a.run(LONG));
            let hb = s.spawn(|| b.run(LONG));
            while a.snapshot().progress == 0 || b.snapshot().progress == 0 {
                std::thread::yield_now(); // both runs are in progress
            }
            Vcpu::sync_all(&[&a, &b, &a]);
            // Each run counted its kicked exit under the state lock sync_all then took.
            let kicked = |v: &Vcpu| v.snapshot().exits[ExitReason::Kicked as usize];
            assert_eq!((kicked(&a), kicked(&b)), (1, 1));
            assert_eq!(ha.join().unwrap().reason, ExitReason::Kicked);
            assert_eq!(hb.join().unwrap().reason, ExitReason::Kicked);
        });
        assert_eq!(a.syncing.load(Acquire) + b.syncing.load(Acquire), 0);
    }

    #[test]
    fn run_does_not_start_while_a_sync_is_in_progress() {
        let g = guest(64, TrackMode::Bitmap, 1);
        let v = Vcpu::new(g, 0, spec(Workload::Uniform, 0)).unwrap();
        v.syncing.fetch_add(1, AcqRel); // a syncer that has not taken the lock yet
        std::thread::scope(|s| {
            let h = s.spawn(|| v.run(LONG));
            std::thread::sleep(Duration::from_millis(20));
            assert_eq!(v.snapshot().progress, 0, "run started during a sync");
            v.syncing.fetch_sub(1, AcqRel);
            v.kick(); // wakes the held-back run, which then exits on the kick
            assert_eq!(h.join().unwrap().reason, ExitReason::Kicked);
        });
    }

    #[test]
    fn sync_waits_for_running_vcpu() {
        let g = guest(64, TrackMode::Bitmap, 1);
        let v = Vcpu::new(g, 0, spec(Workload::Uniform, 0)).unwrap();
        std::thread::scope(|s| {
            let h = s.spawn(|| v.run(LONG));
            std::thread::sleep(Duration::from_millis(10));
            v.sync();
            assert_eq!(h.join().unwrap().reason, ExitReason::Kicked);
        });
    }
}
