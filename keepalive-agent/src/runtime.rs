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

use keepalive_common::{EventKind, LOST_SLOTS};
use log::{debug, info, warn};

use crate::{
    attach::Probes,
    clock::WallClock,
    decode::Decoder,
    reconcile::Reconciler,
    timeline::{engine::Engine, ConnView, Record},
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
    pub decode_errors: u64,
    pub records: u64,
    /// Events lost because the ring buffer was full, per event kind (index = kind value).
    pub lost: [u64; LOST_SLOTS as usize],
    pub snapshot_sockets: u64,
}

impl LoopSummary {
    pub fn lost_total(&self) -> u64 {
        self.lost.iter().sum()
    }
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
/// Least time between two looks at whether answers are awaited (the look is O(tracked)).
const ON_DEMAND_CHECK: Duration = Duration::from_millis(20);
/// After a failed attach of the on-demand hooks, when to try again.
const ON_DEMAND_RETRY: Duration = Duration::from_secs(10);

/// State of the on-demand hooks' steering.
#[derive(Debug, Default)]
struct OnDemand {
    last_check: Option<Instant>,
    last_wanted: Option<Instant>,
    retry_after: Option<Instant>,
    /// Times attached, for the debug log.
    attaches: u64,
}

/// Told of each turn of the event loop (at least every 100 ms while it drains the ring buffer):
/// the metrics' heartbeat and gauges (see [`crate::metrics::Recorder`]).
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

impl EventLoop<'_> {
    /// Feeds the start-up snapshot (raw records from [`Probes::snapshot`], taken after the programs
    /// were attached), then streams events. `sink` receives the records of each batch that pass the
    /// filter.
    pub fn run(
        &mut self,
        snapshot: Vec<Vec<u8>>,
        stop: &AtomicBool,
        until: Option<Instant>,
        sink: &mut dyn FnMut(&[Record], &WallClock, &Engine) -> std::io::Result<()>,
    ) -> Result<LoopSummary, RunError> {
        let mut summary = LoopSummary::default();
        let mut records: Vec<Record> = Vec::with_capacity(1024);
        let mut passed: Vec<Record> = Vec::with_capacity(1024);

        for raw in snapshot {
            // Owner records (the sockets' processes, see `owners`) precede their sockets.
            if crate::decode::raw_from_bytes(&raw).is_ok_and(|r| r.kind == EventKind::Snapshot as u8) {
                summary.snapshot_sockets += 1;
            }
            self.feed(&raw, &mut records, &mut summary);
        }
        if summary.snapshot_sockets > 0 {
            info!("start-up snapshot: {} existing keep-alive sockets", summary.snapshot_sockets);
        }
        self.flush(&mut records, &mut passed, &mut summary, sink)?;

        let fd = self.probes.events.as_raw_fd();
        let mut on_demand = OnDemand::default();
        self.steer_on_demand(&mut on_demand);
        let mut last_report = Instant::now();
        let mut last_lost = [0u64; LOST_SLOTS as usize];
        let mut reconciler = Reconciler::new(self.filter.netns);
        loop {
            if stop.load(Ordering::Relaxed) || until.is_some_and(|t| Instant::now() >= t) {
                break;
            }
            let timeout_ms = match until {
                Some(t) => t.saturating_duration_since(Instant::now()).as_millis().min(100) as i32,
                None => 100,
            };
            let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
            if n < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() != std::io::ErrorKind::Interrupted {
                    return Err(RunError::Poll(err));
                }
            }
            // Drain in bounded batches so the sink sees records promptly.
            loop {
                let mut batch = 0;
                while batch < 4096 {
                    let Some(item) = self.probes.events.next() else { break };
                    let bytes: &[u8] = &item;
                    match self.decoder.decode_bytes(bytes) {
                        Ok(ev) => {
                            summary.events += 1;
                            if self.filter.wants_netns(ev.netns) {
                                self.engine.handle(&ev, &mut records);
                            }
                        }
                        Err(e) => {
                            summary.decode_errors += 1;
                            if summary.decode_errors <= 10 {
                                warn!("undecodable kernel event: {e}");
                            }
                        }
                    }
                    batch += 1;
                }
                self.flush(&mut records, &mut passed, &mut summary, sink)?;
                self.steer_on_demand(&mut on_demand);
                if batch < 4096 {
                    break;
                }
            }
            // The ring buffer is drained: a walk taken before is applied now.
            reconciler.apply(self.engine, &mut records);
            if let Some(observer) = self.observer.as_deref_mut() {
                observer.tick(self.engine, &summary);
            }
            if last_report.elapsed() >= Duration::from_secs(1) {
                last_report = Instant::now();
                self.report(&mut last_lost, &mut summary);
                self.clock.refresh();
                // Events held for a timer record that a full ring buffer swallowed.
                self.engine.release_stale_held(crate::clock::monotonic_now_ns(), 1_000_000_000, &mut records);
                self.flush(&mut records, &mut passed, &mut summary, sink)?;
                // Connections whose close and destruction were both missed.
                reconciler.maybe_walk(self.probes, self.decoder, self.engine, summary.lost_total());
            }
        }
        // Drain what is left, then the final report.
        while let Some(item) = self.probes.events.next() {
            if let Ok(ev) = self.decoder.decode_bytes(&item) {
                summary.events += 1;
                if self.filter.wants_netns(ev.netns) {
                    self.engine.handle(&ev, &mut records);
                }
            }
        }
        // Every connection still followed ends now: its open episode (`incomplete`), then
        // `untracked` with reason `shutdown`.
        self.engine.shutdown(crate::clock::monotonic_now_ns(), &mut records);
        self.flush(&mut records, &mut passed, &mut summary, sink)?;
        self.report(&mut last_lost, &mut summary);
        Ok(summary)
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
        let awaiting = self.engine.awaiting_answer();
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
                    debug!("probe answers: watching received segments ({awaiting} connections await an answer; attach #{})", st.attaches);
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

    fn feed(&mut self, raw: &[u8], records: &mut Vec<Record>, summary: &mut LoopSummary) {
        match self.decoder.decode_bytes(raw) {
            Ok(ev) => {
                summary.events += 1;
                if self.filter.wants_netns(ev.netns) {
                    self.engine.handle(&ev, records);
                }
            }
            Err(e) => {
                summary.decode_errors += 1;
                warn!("undecodable snapshot record: {e}");
            }
        }
    }

    fn flush(
        &mut self,
        records: &mut Vec<Record>,
        passed: &mut Vec<Record>,
        summary: &mut LoopSummary,
        sink: &mut dyn FnMut(&[Record], &WallClock, &Engine) -> std::io::Result<()>,
    ) -> Result<(), RunError> {
        if records.is_empty() {
            return Ok(());
        }
        passed.clear();
        passed.extend(records.drain(..).filter(|r| self.filter.matches(&r.conn)));
        summary.records += passed.len() as u64;
        if !passed.is_empty() {
            sink(passed, &self.clock, self.engine).map_err(RunError::Sink)?;
        }
        Ok(())
    }

    /// Reports lost events and the connection cap, once a second at most.
    fn report(&mut self, last_lost: &mut [u64; LOST_SLOTS as usize], summary: &mut LoopSummary) {
        let lost = self.probes.lost_counts();
        let new: Vec<u64> = lost.iter().zip(last_lost.iter()).map(|(a, b)| a.saturating_sub(*b)).collect();
        let new_total: u64 = new.iter().sum();
        if new_total > 0 {
            warn!(
                "lost {new_total} kernel events (ring buffer full; raise --ringbuf-size): {} (total {})",
                lost_breakdown(&new),
                lost.iter().sum::<u64>()
            );
        }
        *last_lost = lost;
        summary.lost = lost;
        let refused = self.engine.cap_hit_since_last_check();
        if refused > 0 {
            warn!(
                "connection cap reached: {refused} connections not tracked (raise --max-connections; {} tracked)",
                self.engine.tracked()
            );
        }
        debug!("engine: {:?}", self.engine.stats());
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
        let mut lost = [0u64; LOST_SLOTS as usize];
        lost[EventKind::Timer as usize] = 3;
        lost[EventKind::Setsockopt as usize] = 1;
        assert_eq!(lost_breakdown(&lost), "Timer=3 Setsockopt=1");
        assert_eq!(lost_breakdown(&[0; 4]), "");
    }
}
