//! The event path: ring buffer → decoder → timeline engine → sink, on one thread.
//!
//! The loop never blocks on its sink's I/O beyond what the sink itself does (the OTLP exporter's
//! sink only enqueues). It polls the ring buffer with a short timeout so that it can stop, report
//! lost events and refresh the wall clock.

use std::{
    net::SocketAddr,
    os::fd::AsRawFd,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use keepalive_common::{EventKind, EVENT_KINDS, LOST_SLOT_AWAIT_OWNER, LOST_SLOT_INFLIGHT, LOST_SLOT_TIMER_UNPAIRED};
use log::{debug, info, trace, warn};

use crate::{
    attach::Probes,
    clock::WallClock,
    decode::Decoder,
    kernel::progstats::KindCounts,
    owners::{DeathOwnerStats, DeathOwners, DEATH_HOLD},
    reconcile::Reconciler,
    timeline::{engine::Engine, ConnView, Record, RecordKind},
    watchdog::{Pulse, Step, Watchdog},
};

/// Which connections' records reach the sink.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only these processes (empty: all).
    pub pids: Vec<u32>,
    /// Only connections with one of these ports, local or remote (empty: all).
    pub ports: Vec<u16>,
    /// Only this network namespace (inode).
    pub netns: Option<u32>,
}

impl Filter {
    /// Whether events of network namespace `netns` concern us at all. Applied before the engine, so
    /// that connections of other namespaces neither cost memory nor count against the cap.
    pub fn wants_netns(&self, netns: u32) -> bool {
        self.netns.is_none_or(|ns| ns == netns)
    }

    pub fn matches(&self, c: &ConnView) -> bool {
        if let Some(ns) = self.netns {
            if c.netns != ns {
                return false;
            }
        }
        if !self.ports.is_empty() && !self.ports.iter().any(|p| port_of(&c.local) == *p || port_of(&c.remote) == *p) {
            return false;
        }
        if !self.pids.is_empty() {
            match c.process {
                Some(p) if self.pids.contains(&p.pid) => {}
                _ => return false,
            }
        }
        true
    }
}

fn port_of(a: &SocketAddr) -> u16 {
    a.port()
}

/// What the loop saw, for the final report.
#[derive(Debug, Clone, Default)]
pub struct LoopSummary {
    pub events: u64,
    /// Records that could not be decoded (dropped, counted on every path: live, snapshot, final
    /// drain).
    pub decode_errors: u64,
    pub records: u64,
    /// Events lost because the ring buffer was full, per event kind (index = kind value).
    pub lost: KindCounts,
    /// Program runs the kernel skipped (a program re-entered on the same CPU), per event kind;
    /// `None` when the kernel does not count them (before Linux 5.12).
    pub skipped: Option<KindCounts>,
    /// Keep-alive settings the kprobe strategy's in-flight map lost (`Setsockopt` events).
    pub inflight_lost: u64,
    /// Keep-alive timer runs seen by only one of the two timer programs: their events are lost.
    pub timer_unpaired: u64,
    /// Deaths not followed whose socket the kernel side could not remember for its owner's close
    /// (its bounded table full).
    pub death_owners_unawaited: u64,
    /// Times the records held for deaths' owner lookups reached their bound (`MAX_HELD`) and
    /// the loop waited for the lookup instead of draining the ring buffer.
    pub held_full: u64,
    pub snapshot_sockets: u64,
    /// Lookups of the owners of deaths of connections not followed.
    pub death_owners: DeathOwnerStats,
}

impl LoopSummary {
    /// Events lost for any cause: ring buffer full, skipped program runs, the kprobe path's
    /// in-flight map and unpaired timer runs.
    pub fn lost_total(&self) -> u64 {
        self.ringbuf_full_total() + self.skipped_total() + self.inflight_lost + self.timer_unpaired
    }

    /// Events lost because the ring buffer was full.
    pub fn ringbuf_full_total(&self) -> u64 {
        self.lost.iter().sum()
    }

    /// Program runs the kernel skipped (0 when it does not count them).
    pub fn skipped_total(&self) -> u64 {
        self.skipped.map_or(0, |s| s.iter().sum())
    }

    /// Losses by cause and event kind, e.g. `ringbuf_full: Setsockopt=3; skipped_run: State=5`
    /// (causes with nothing lost are left out; `skipped_run: not counted on this kernel` when
    /// skipped runs are not counted).
    pub fn loss_breakdown(&self) -> String {
        let mut parts = Vec::new();
        if self.ringbuf_full_total() > 0 {
            parts.push(format!("ringbuf_full: {}", lost_breakdown(&self.lost)));
        }
        match &self.skipped {
            Some(s) if s.iter().any(|n| *n > 0) => parts.push(format!("skipped_run: {}", lost_breakdown(s))),
            Some(_) => {}
            None => parts.push("skipped_run: not counted on this kernel".to_string()),
        }
        if self.inflight_lost > 0 {
            parts.push(format!("inflight_map: Setsockopt={}", self.inflight_lost));
        }
        if self.timer_unpaired > 0 {
            parts.push(format!("unpaired_timer_run: Timer={}", self.timer_unpaired));
        }
        parts.join("; ")
    }

    /// `R ring buffer full, S skipped runs` (S is `uncounted` when the kernel does not count them).
    pub fn loss_causes(&self) -> String {
        let skipped = match self.skipped {
            Some(_) => self.skipped_total().to_string(),
            None => "uncounted".to_string(),
        };
        let mut s = format!("{} ring buffer full, {skipped} skipped runs", self.ringbuf_full_total());
        if self.inflight_lost > 0 {
            s.push_str(&format!(", {} in-flight map", self.inflight_lost));
        }
        if self.timer_unpaired > 0 {
            s.push_str(&format!(", {} timer runs unpaired", self.timer_unpaired));
        }
        s
    }
}

/// The final line on the owners of deaths of connections not followed, when any was looked up.
fn report_death_owners(s: &DeathOwnerStats) {
    if s.scans == 0 && s.closed == 0 && s.dropped == 0 {
        return;
    }
    info!(
        "owners of deaths not followed: {} closed the socket, {} found in /proc, {} not found, {} not looked up (over {} in one scan); {} scans",
        s.closed,
        s.found,
        s.not_found,
        s.dropped,
        crate::owners::MAX_DEATH_INODES,
        s.scans
    );
}

/// Human-readable per-kind breakdown of lost counts.
pub fn lost_breakdown(lost: &[u64]) -> String {
    lost.iter()
        .enumerate()
        .filter(|(_, n)| **n > 0)
        .map(|(i, n)| {
            let name = EventKind::from_u8(i as u8).map(|k| format!("{k:?}")).unwrap_or_else(|| i.to_string());
            format!("{name}={n}")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Warns with `message(increase, total)` when the counter `now` grew past `*last`, which then
/// takes its value.
fn warn_on_growth(now: u64, last: &mut u64, message: impl FnOnce(u64, u64) -> String) {
    if now > *last {
        warn!("{}", message(now - *last, now));
        *last = now;
    }
}

/// When some count grew from `before` to `now`: the increase, its per-kind breakdown and the
/// new total.
fn growth(now: &KindCounts, before: &KindCounts) -> Option<(u64, String, u64)> {
    let new = increase(now, before);
    let n: u64 = new.iter().sum();
    (n > 0).then(|| (n, lost_breakdown(&new), now.iter().sum()))
}

/// The increase from `before` to `now`, per slot.
fn increase(now: &KindCounts, before: &KindCounts) -> KindCounts {
    let mut out = [0u64; EVENT_KINDS];
    for (o, (a, b)) in out.iter_mut().zip(now.iter().zip(before.iter())) {
        *o = a.saturating_sub(*b);
    }
    out
}

/// Errors of the event loop.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("poll on the ring buffer: {0}")]
    Poll(std::io::Error),
    #[error("writing output: {0}")]
    Sink(std::io::Error),
    #[error(transparent)]
    Attach(#[from] crate::attach::AttachError),
}

/// How long the on-demand hooks stay attached after the last unanswered probe was answered.
const ON_DEMAND_LINGER: Duration = Duration::from_secs(2);
/// Least time between two looks at whether answers are awaited. The look is O(tracked): at 20 ms
/// (every batch) it was 5 % of `trace`'s CPU at 5,000 connections. A probe then waits up to this
/// long for the hook; its answer is dated at the next firing meanwhile (`next_firing`), and slow or
/// missing answers, the ones worth a segment-precise time, come later than this.
const ON_DEMAND_CHECK: Duration = Duration::from_millis(250);
/// After a failed attach of the on-demand hooks, when to try again.
const ON_DEMAND_RETRY: Duration = Duration::from_secs(10);

/// State of the on-demand hooks' steering.
#[derive(Debug, Default)]
struct OnDemand {
    last_check: Option<Instant>,
    last_wanted: Option<Instant>,
    /// A probe record came since the last look: answers were awaited meanwhile, whatever the
    /// connections hold at the look, so the O(tracked) count is skipped.
    probe_seen: bool,
    retry_after: Option<Instant>,
    /// Times attached, for the debug log.
    attaches: u64,
}

/// Told of each turn of the event loop (every batch drained from the ring buffer, at least every
/// 100 ms): the metrics' heartbeat and gauges (see [`crate::metrics::Recorder`]).
pub trait LoopObserver {
    fn tick(&mut self, engine: &Engine, summary: &LoopSummary);
}

/// Drives the pipeline until `stop` is set or `until` passes.
pub struct EventLoop<'a> {
    pub probes: &'a mut Probes,
    pub decoder: &'a Decoder,
    pub engine: &'a mut Engine,
    pub filter: &'a Filter,
    pub clock: WallClock,
    /// Told of every turn of the loop, if any.
    pub observer: Option<&'a mut dyn LoopObserver>,
}

/// The sink of an [`EventLoop`]: receives the records of each batch that pass the filter.
pub type Sink<'s> = dyn FnMut(&[Record], &WallClock, &Engine) -> std::io::Result<()> + 's;

/// Most ring-buffer records handled between two flushes to the sink.
const BATCH: usize = 4096;

/// Counters as of the last once-a-second report, to warn about what is new.
#[derive(Debug, Default)]
struct Reported {
    lost: KindCounts,
    skipped: KindCounts,
    decode_errors: u64,
    /// A skipped-run counter could not be read (warned once).
    skipped_unreadable: bool,
    /// Probes only the kernel's counter showed (engine), as last warned.
    unreported_probes: u64,
    /// Times the held records for owner lookups filled, and deaths not looked up, as last warned.
    held_full: u64,
    owners_dropped: u64,
    /// Events the engine handled out of order (its hold for timer runs was full), as last warned.
    unordered: u64,
}

/// Buffers and counters of one [`EventLoop::run`].
struct RunState {
    summary: LoopSummary,
    records: Vec<Record>,
    reported: Reported,
    /// Walks of the kernel's sockets that end connections whose close was missed.
    reconciler: Reconciler,
    /// Raw records from the first death awaiting its owner's lookup on, in ring-buffer order (at
    /// most [`MAX_HELD`]).
    held: Vec<Vec<u8>>,
    /// When the first of `held` was drained.
    held_since: Option<Instant>,
    death_owners: DeathOwners,
    /// Raw records drained but not handled yet (see [`Staged`]).
    staged: Staged,
}

/// Raw records copied out of the ring buffer, up to [`crate::prefetch::BATCH`], and handed to the engine together:
/// their connections are looked up and fetched into cache first, so that the cache misses of a
/// batch overlap instead of coming one after the other (each connection's record comes once a
/// keep-alive interval, long after its state left the cache).
#[derive(Default)]
struct Staged {
    bytes: Vec<u8>,
    /// End of each record in `bytes`.
    ends: Vec<usize>,
}

impl Staged {
    fn push(&mut self, raw: &[u8]) {
        self.bytes.extend_from_slice(raw);
        self.ends.push(self.bytes.len());
    }

    fn len(&self) -> usize {
        self.ends.len()
    }

    fn records(&self) -> impl Iterator<Item = &[u8]> {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts.zip(self.ends.iter().copied()).map(|(a, b)| &self.bytes[a..b])
    }

    fn clear(&mut self) {
        self.bytes.clear();
        self.ends.clear();
    }
}

/// Most raw records held while deaths await the lookup of their owners: past it, the loop waits
/// for the next scan and releases them.
const MAX_HELD: usize = 4 * BATCH;

/// The one path of a raw record, whatever its source (live ring buffer, start-up snapshot, final
/// drain): decode, count (events or decode errors), namespace filter, engine. Undecodable records
/// are counted; the first few are logged with the reason.
fn ingest(decoder: &Decoder, filter: &Filter, engine: &mut Engine, raw: &[u8], records: &mut Vec<Record>, summary: &mut LoopSummary) {
    match decoder.decode_bytes(raw) {
        Ok(ev) => {
            summary.events += 1;
            trace!("kernel event: {ev:?}");
            if filter.wants_netns(ev.netns) {
                engine.handle(&ev, records);
            }
        }
        Err(e) => {
            summary.decode_errors += 1;
            if summary.decode_errors <= 10 {
                warn!("undecodable kernel event (dropped): {e}");
            }
        }
    }
}

impl<'a> EventLoop<'a> {
    /// An event loop over attached `probes`, with the wall clock measured now.
    pub fn new(probes: &'a mut Probes, decoder: &'a Decoder, engine: &'a mut Engine, filter: &'a Filter) -> Self {
        EventLoop { probes, decoder, engine, filter, clock: WallClock::measure(), observer: None }
    }

    /// Feeds the start-up snapshot (raw records from [`Probes::snapshot`], taken after the programs
    /// were attached), then streams events. `sink` receives the records of each batch that pass the
    /// filter.
    pub fn run(
        &mut self,
        snapshot: Vec<Vec<u8>>,
        stop: &AtomicBool,
        until: Option<Instant>,
        sink: &mut Sink<'_>,
    ) -> Result<LoopSummary, RunError> {
        let mut st = RunState {
            summary: LoopSummary::default(),
            records: Vec::with_capacity(1024),
            reported: Reported::default(),
            reconciler: Reconciler::new(self.filter.netns),
            held: Vec::new(),
            held_since: None,
            death_owners: DeathOwners::new("/proc".into(), crate::attach::cgroup2_mount()).only_netns(self.filter.netns),
            staged: Staged::default(),
        };
        for raw in snapshot {
            // Owner records (the sockets' processes, see `owners`) precede their sockets.
            if crate::decode::raw_from_bytes(&raw).is_ok_and(|r| r.kind == EventKind::Snapshot as u8) {
                st.summary.snapshot_sockets += 1;
            }
            ingest(self.decoder, self.filter, self.engine, &raw, &mut st.records, &mut st.summary);
        }
        if st.summary.snapshot_sockets > 0 {
            info!("start-up snapshot: {} existing keep-alive sockets", st.summary.snapshot_sockets);
        }
        self.flush(&mut st, sink)?;

        let mut on_demand = OnDemand::default();
        self.steer_on_demand(&mut on_demand);
        let mut last_report = Instant::now();
        let watchdog = Watchdog::start();
        let pulse = watchdog.pulse();
        while !(stop.load(Ordering::Relaxed) || until.is_some_and(|t| Instant::now() >= t)) {
            pulse.enter(Step::Wait);
            self.wait_readable(until)?;
            // Drain in bounded batches so the sink sees records promptly, and the once-a-second
            // work happens even while the ring buffer never runs dry.
            loop {
                pulse.enter(Step::Drain);
                let n = self.drain(&mut st, Some(BATCH));
                on_demand.probe_seen = on_demand.probe_seen || st.records.iter().any(|r| matches!(r.kind, RecordKind::Probe { .. }));
                pulse.enter(Step::Output);
                self.flush(&mut st, sink)?;
                if let Some(observer) = self.observer.as_deref_mut() {
                    observer.tick(self.engine, &st.summary);
                }
                pulse.enter(Step::OnDemand);
                self.steer_on_demand(&mut on_demand);
                if last_report.elapsed() >= Duration::from_secs(1) {
                    last_report = Instant::now();
                    pulse.enter(Step::Report);
                    self.every_second(&mut st, sink, pulse)?;
                }
                if n < BATCH {
                    break;
                }
            }
            // The ring buffer is drained: a walk taken before is applied now (not while records
            // are held: the engine has not seen them yet).
            if st.held.is_empty() {
                st.reconciler.apply(self.engine, &mut st.records);
            }
        }
        // Drain what is left, then the final report.
        pulse.enter(Step::Drain);
        self.drain(&mut st, None);
        self.flush(&mut st, sink)?;
        self.report(&mut st);
        report_death_owners(&st.summary.death_owners);
        Ok(st.summary)
    }

    /// Once a second: report losses, refresh the wall clock, release stale held events.
    fn every_second(&mut self, st: &mut RunState, sink: &mut Sink<'_>, pulse: &Pulse) -> Result<(), RunError> {
        self.report(st);
        self.clock.refresh();
        // Events held for a timer record that a full ring buffer swallowed.
        self.engine.release_stale_held(crate::clock::monotonic_now_ns(), 1_000_000_000, &mut st.records);
        self.flush(st, sink)?;
        // Connections whose close and destruction were both missed.
        let losses = st.summary.lost_total();
        pulse.enter(Step::Walk);
        st.reconciler.maybe_walk(self.probes, self.decoder, self.engine, losses);
        Ok(())
    }

    /// Ends every connection still followed (an open episode `incomplete`, then `untracked` with
    /// reason `shutdown`) and returns the records that pass the filter. Call once, after
    /// [`EventLoop::run`]: the caller hands them to its sink (the exporter builds their spans
    /// outside its bounded queue, so that a stop never drops them).
    pub fn end_all(&mut self) -> Vec<Record> {
        let mut records = Vec::new();
        self.engine.shutdown(crate::clock::monotonic_now_ns(), &mut records);
        records.retain(|r| self.filter.matches(&r.conn));
        records
    }

    /// Waits up to 100 ms (or until `until`) for the ring buffer to have data.
    fn wait_readable(&self, until: Option<Instant>) -> Result<(), RunError> {
        let timeout_ms = match until {
            Some(t) => t.saturating_duration_since(Instant::now()).as_millis().min(100) as i32,
            None => 100,
        };
        let mut pfd = libc::pollfd { fd: self.probes.events.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(RunError::Poll(err));
            }
        }
        Ok(())
    }

    /// Feeds up to `max` ring-buffer records (all that are there with `None`) through [`ingest`];
    /// returns how many it took. From a death that awaits the lookup of its owner on, records are
    /// held in order and fed once the lookup ran ([`Self::release_held`]); `max == None` (the
    /// final drain) releases them all.
    fn drain(&mut self, st: &mut RunState, max: Option<usize>) -> usize {
        let mut n = 0;
        while max.is_none_or(|m| n < m) {
            {
                let Some(item) = self.probes.events.next() else { break };
                if st.held.is_empty() && st.death_owners.wanted(&item).is_none() {
                    st.staged.push(&item);
                } else {
                    st.held_since.get_or_insert_with(Instant::now);
                    st.held.push(item.to_vec());
                }
            }
            n += 1;
            // Staged records came before any held one: they are handled first.
            if st.staged.len() >= crate::prefetch::BATCH || !st.held.is_empty() {
                self.ingest_staged(st);
            }
            if st.held.len() >= MAX_HELD {
                st.summary.held_full += 1;
                self.release_held(st, true);
            }
        }
        self.ingest_staged(st);
        self.release_held(st, max.is_none());
        n
    }

    /// Hands the staged records to the engine, their connections fetched into cache first.
    fn ingest_staged(&mut self, st: &mut RunState) {
        for raw in st.staged.records() {
            if let Some(sk) = crate::decode::raw_sk(raw) {
                self.engine.prefetch(sk);
            }
        }
        for raw in st.staged.records() {
            ingest(self.decoder, self.filter, self.engine, raw, &mut st.records, &mut st.summary);
        }
        st.staged.clear();
    }

    /// Names the owners of the held deaths and feeds the held records, once the first was held
    /// [`DEATH_HOLD`] and a scan is allowed, or, with `wait`, after waiting for both (at most
    /// [`DEATH_HOLD`] plus [`crate::owners::DEATH_SCAN_INTERVAL`]). What the ring buffer holds
    /// then is taken first: the closes that came before the lookup name their sockets' owners.
    fn release_held(&mut self, st: &mut RunState, wait: bool) {
        let Some(since) = st.held_since else { return };
        let now = Instant::now();
        let ready = (since + DEATH_HOLD).max(now + st.death_owners.wait_before_scan(now));
        if ready > now {
            if !wait {
                return;
            }
            std::thread::sleep(ready - now);
        }
        while st.held.len() < MAX_HELD {
            let Some(item) = self.probes.events.next() else { break };
            st.held.push(item.to_vec());
        }
        let held = std::mem::take(&mut st.held);
        st.held_since = None;
        for raw in st.death_owners.attribute(held, Instant::now()) {
            ingest(self.decoder, self.filter, self.engine, &raw, &mut st.records, &mut st.summary);
        }
        st.summary.death_owners = st.death_owners.stats();
    }

    /// Attaches the on-demand hooks (the probe answer program on every received segment) while some
    /// connection waits for an answer to a keep-alive probe, and detaches them
    /// [`ON_DEMAND_LINGER`] after the last one was answered or ended.
    fn steer_on_demand(&mut self, st: &mut OnDemand) {
        if !self.probes.has_on_demand() {
            return;
        }
        let now = Instant::now();
        if st.last_check.is_some_and(|t| now.duration_since(t) < ON_DEMAND_CHECK) {
            return;
        }
        st.last_check = Some(now);
        let probe_seen = std::mem::take(&mut st.probe_seen);
        let awaiting = if probe_seen { 1 } else { self.engine.awaiting_answer() };
        if awaiting > 0 {
            st.last_wanted = Some(now);
        }
        let attached = self.probes.on_demand_attached();
        if awaiting > 0 && !attached {
            if st.retry_after.is_some_and(|t| now < t) {
                return;
            }
            match self.probes.set_on_demand(true) {
                Ok(()) => {
                    st.attaches += 1;
                    let why = if probe_seen { "a probe went out".to_string() } else { format!("{awaiting} connections await an answer") };
                    debug!("probe answers: watching received segments ({why}; attach #{})", st.attaches);
                }
                Err(e) => {
                    st.retry_after = Some(now + ON_DEMAND_RETRY);
                    warn!("cannot attach the probe_answer hook ({e}); answers are inferred at the next timer firing until it attaches");
                }
            }
        } else if awaiting == 0 && attached && st.last_wanted.is_none_or(|t| now.duration_since(t) >= ON_DEMAND_LINGER) {
            let _ = self.probes.set_on_demand(false);
            debug!("probe answers: no probe outstanding, segment watch detached");
        }
    }

    fn flush(&mut self, st: &mut RunState, sink: &mut Sink<'_>) -> Result<(), RunError> {
        if st.records.is_empty() {
            return Ok(());
        }
        // Filtered in place: records (~230 bytes each) move only when one before them is dropped.
        let filter = &self.filter;
        st.records.retain(|r| filter.matches(&r.conn));
        st.summary.records += st.records.len() as u64;
        let sent = if st.records.is_empty() { Ok(()) } else { sink(&st.records, &self.clock, self.engine) };
        st.records.clear();
        sent.map_err(RunError::Sink)
    }

    /// Reports what was lost since the last report (ring buffer full, skipped program runs,
    /// undecodable records) and the connection cap, once a second at most; updates the summary.
    fn report(&mut self, st: &mut RunState) {
        let slots = self.probes.lost_counts();
        let mut lost: KindCounts = [0; EVENT_KINDS];
        lost.copy_from_slice(&slots[..EVENT_KINDS]);
        if let Some((n, kinds, total)) = growth(&lost, &st.reported.lost) {
            warn!("lost {n} kernel events (ring buffer full; raise --ringbuf-size): {kinds} (total {total})");
        }
        st.reported.lost = lost;
        st.summary.lost = lost;
        warn_on_growth(slots[LOST_SLOT_INFLIGHT as usize], &mut st.summary.inflight_lost, |n, total| {
            format!("lost {n} keep-alive settings (kprobe path: in-flight setsockopt map lost the call; total {total})")
        });
        warn_on_growth(slots[LOST_SLOT_TIMER_UNPAIRED as usize], &mut st.summary.timer_unpaired, |n, total| {
            format!("lost {n} keep-alive timer events (a timer run was seen at its entry or its exit only; total {total})")
        });
        warn_on_growth(slots[LOST_SLOT_AWAIT_OWNER as usize], &mut st.summary.death_owners_unawaited, |n, total| {
            format!(
                "{n} deaths not followed could not wait in the kernel for their owner's close (table of {} full; looked up in /proc only; total {total})",
                keepalive_common::AWAIT_OWNER_MAX
            )
        });
        self.report_skipped(st);
        warn_on_growth(st.summary.decode_errors, &mut st.reported.decode_errors, |n, total| {
            format!("dropped {n} undecodable kernel events (total {total})")
        });
        warn_on_growth(self.engine.stats().unreported_probes, &mut st.reported.unreported_probes, |n, total| {
            format!("{n} keep-alive probes were seen only by the kernel's probe counter: the timer runs that sent them reached no record (total {total})")
        });
        warn_on_growth(self.engine.stats().unordered, &mut st.reported.unordered, |n, total| {
            format!(
                "{n} events handled out of order: holding them until their timer run's event would have passed a bound ({} per socket, --max-connections sockets; total {total})",
                crate::timeline::engine::MAX_HELD_PER_SOCKET
            )
        });
        warn_on_growth(st.summary.held_full, &mut st.reported.held_full, |n, total| {
            format!("{n} times the records held for deaths' owner lookups reached {MAX_HELD}: the loop waited for the lookup instead of draining the ring buffer (total {total})")
        });
        warn_on_growth(st.summary.death_owners.dropped, &mut st.reported.owners_dropped, |n, total| {
            format!(
                "{n} deaths not followed reported without their owner: more than {} sockets for one /proc scan (total {total})",
                crate::owners::MAX_DEATH_INODES
            )
        });
        let refused = self.engine.cap_hit_since_last_check();
        if refused > 0 {
            warn!(
                "connection cap reached: {refused} connections not tracked (raise --max-connections; {} tracked)",
                self.engine.tracked()
            );
        }
        debug!("engine: {:?}", self.engine.stats());
    }

    /// The skipped-run part of [`EventLoop::report`].
    fn report_skipped(&mut self, st: &mut RunState) {
        let skipped = match self.probes.skipped_runs() {
            Ok(Some(s)) => s,
            Ok(None) => return,
            Err(e) => {
                if !std::mem::replace(&mut st.reported.skipped_unreadable, true) {
                    warn!("cannot read skipped program runs: {}", crate::attach::error_chain(&e));
                }
                return;
            }
        };
        if let Some((n, kinds, total)) = growth(&skipped, &st.reported.skipped) {
            warn!(
                "skipped {n} kernel program runs (a BPF program re-entered on the same CPU is not run; each may be a lost event): {kinds} (total {total})"
            );
        }
        st.reported.skipped = skipped;
        st.summary.skipped = Some(skipped);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Process;

    fn conn(pid: Option<u32>, local: &str, remote: &str, netns: u32) -> ConnView {
        ConnView {
            id: 1,
            sk: 0x1000,
            netns,
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
            process: pid.map(|pid| Process { pid, tid: pid, comm: [0; 16], cgroup_id: 0 }),
            first_seen_ns: 0,
        }
    }

    #[test]
    fn filter_by_port_pid_and_namespace() {
        let c = conn(Some(42), "127.0.0.1:40000", "127.0.0.1:5432", 7);
        assert!(Filter::default().matches(&c));
        assert!(Filter { ports: vec![5432], ..Filter::default() }.matches(&c));
        assert!(Filter { ports: vec![40000], ..Filter::default() }.matches(&c));
        assert!(!Filter { ports: vec![80], ..Filter::default() }.matches(&c));
        assert!(Filter { pids: vec![42], ..Filter::default() }.matches(&c));
        assert!(!Filter { pids: vec![43], ..Filter::default() }.matches(&c));
        // A connection whose process is unknown does not match a pid filter.
        assert!(!Filter { pids: vec![42], ..Filter::default() }.matches(&conn(None, "127.0.0.1:1", "127.0.0.1:2", 7)));
        let ns = Filter { netns: Some(7), ..Filter::default() };
        assert!(ns.matches(&c) && ns.wants_netns(7) && !ns.wants_netns(8));
        assert!(Filter::default().wants_netns(8));
    }

    #[test]
    fn lost_breakdown_names_kinds() {
        let mut lost = [0u64; EVENT_KINDS];
        lost[EventKind::Timer as usize] = 3;
        lost[EventKind::Setsockopt as usize] = 1;
        assert_eq!(lost_breakdown(&lost), "Timer=3 Setsockopt=1");
        assert_eq!(lost_breakdown(&[0; 4]), "");
    }

    #[test]
    fn loss_breakdown_by_cause_and_kind() {
        let mut s = LoopSummary::default();
        assert_eq!(s.loss_breakdown(), "skipped_run: not counted on this kernel");
        assert_eq!(s.loss_causes(), "0 ring buffer full, uncounted skipped runs");
        s.skipped = Some([0; EVENT_KINDS]);
        assert_eq!((s.loss_breakdown().as_str(), s.lost_total()), ("", 0));
        assert_eq!(s.loss_causes(), "0 ring buffer full, 0 skipped runs");
        s.lost[EventKind::Setsockopt as usize] = 3;
        let mut skipped = [0; EVENT_KINDS];
        skipped[EventKind::State as usize] = 5848;
        skipped[EventKind::Destroy as usize] = 2;
        s.skipped = Some(skipped);
        assert_eq!(s.loss_breakdown(), "ringbuf_full: Setsockopt=3; skipped_run: State=5848 Destroy=2");
        assert_eq!(s.loss_causes(), "3 ring buffer full, 5850 skipped runs");
        s.inflight_lost = 4;
        assert_eq!(s.lost_total(), 3 + 5850 + 4);
        assert!(s.loss_breakdown().ends_with("; inflight_map: Setsockopt=4"), "{}", s.loss_breakdown());
        assert_eq!(s.loss_causes(), "3 ring buffer full, 5850 skipped runs, 4 in-flight map");
    }

    #[test]
    fn increase_saturates_per_kind() {
        let mut now = [0; EVENT_KINDS];
        let mut before = [0; EVENT_KINDS];
        now[6] = 10;
        before[6] = 4;
        before[1] = 7; // a counter that went down (program reloaded) does not underflow
        let d = increase(&now, &before);
        assert_eq!((d[6], d[1]), (6, 0));
    }

    #[test]
    fn staged_records_come_back_whole_and_in_order() {
        let mut st = Staged::default();
        st.push(&[1, 2, 3]);
        st.push(&[]);
        st.push(&[4]);
        assert_eq!(st.len(), 3);
        assert_eq!(st.records().collect::<Vec<_>>(), vec![&[1u8, 2, 3][..], &[][..], &[4][..]]);
        st.clear();
        assert_eq!((st.len(), st.records().count()), (0, 0));
        st.push(&[5, 6]);
        assert_eq!(st.records().collect::<Vec<_>>(), vec![&[5u8, 6][..]]);
    }

    #[test]
    fn ingest_counts_decode_errors_and_filters_namespaces() {
        use crate::{event::DecodeTables, timeline::engine::EngineConfig};
        use keepalive_common::{RawEvent, RAW_EVENT_SIZE};
        let decoder = Decoder::new(DecodeTables::linux_defaults());
        let mut engine = Engine::new(EngineConfig { max_connections: 16 });
        let filter = Filter { netns: Some(7), ..Filter::default() };
        let (mut records, mut summary) = (Vec::new(), LoopSummary::default());
        let mut raw = RawEvent::zeroed();
        raw.kind = EventKind::Destroy as u8;
        raw.netns = 8;
        // SAFETY: RawEvent is plain data.
        let bytes = unsafe { std::slice::from_raw_parts((&raw as *const RawEvent).cast::<u8>(), RAW_EVENT_SIZE) };
        ingest(&decoder, &filter, &mut engine, bytes, &mut records, &mut summary);
        ingest(&decoder, &filter, &mut engine, &bytes[..10], &mut records, &mut summary);
        let mut bad_kind = bytes.to_vec();
        bad_kind[std::mem::offset_of!(RawEvent, kind)] = 200;
        ingest(&decoder, &filter, &mut engine, &bad_kind, &mut records, &mut summary);
        assert_eq!((summary.events, summary.decode_errors), (1, 2));
        assert!(records.is_empty());
    }
}
