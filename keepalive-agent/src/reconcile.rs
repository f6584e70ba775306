//! Reconciling the engine with the kernel's sockets: a walk of every keep-alive socket (the
//! snapshot iterator, `iter/tcp`) ends the connections whose close and destruction were both
//! missed (runs the kernel skipped, a full ring buffer), so that no connection outlives its socket
//! in the engine or in any consumer.
//!
//! The walk runs on the event thread: soon after kernel events were lost or skipped (a missed
//! close is likely then), and otherwise every [`Reconciler::PERIOD`]. It is applied after the next
//! drain of the ring buffer, so that a close the kernel reported before the walk is seen as a
//! close, not as a socket gone.

use std::{
    collections::HashSet,
    path::PathBuf,
    time::{Duration, Instant},
};

use log::{debug, warn};

use crate::{attach::Probes, decode::Decoder, timeline::engine::Engine, timeline::Record};

/// A walk taken, waiting for the ring buffer to be drained before it is applied.
#[derive(Debug)]
struct Walk {
    start_ns: u64,
    sockets: HashSet<u64>,
    namespaces: HashSet<u32>,
}

/// When to walk, and the walk waiting to be applied.
#[derive(Debug)]
pub struct Reconciler {
    /// `--netns`: walk only the namespace with this inode.
    only: Option<u32>,
    last: Instant,
    losses_seen: u64,
    pending: Option<Walk>,
    /// Walks done, for the debug log.
    pub walks: u64,
}

impl Reconciler {
    /// Walk at least this often.
    pub const PERIOD: Duration = Duration::from_secs(60);
    /// After losses, walk once this long has passed since the last walk.
    pub const AFTER_LOSS: Duration = Duration::from_secs(2);

    pub fn new(only: Option<u32>) -> Self {
        Reconciler { only, last: Instant::now(), losses_seen: 0, pending: None, walks: 0 }
    }

    /// Walks the sockets now if it is time (`losses`: kernel events lost or skipped so far).
    pub fn maybe_walk(&mut self, probes: &mut Probes, decoder: &Decoder, engine: &Engine, losses: u64) {
        if self.pending.is_some() || !probes.can_walk() || engine.tracked() == 0 {
            self.losses_seen = losses;
            return;
        }
        let since = self.last.elapsed();
        let lost_more = losses > self.losses_seen;
        if !(since >= Self::PERIOD || lost_more && since >= Self::AFTER_LOSS) {
            return;
        }
        self.last = Instant::now();
        self.losses_seen = losses;
        let start_ns = crate::clock::monotonic_now_ns();
        let namespaces = self.namespaces();
        match probes.walk(&namespaces) {
            Ok((records, walked)) => {
                let sockets = records.iter().filter_map(|r| decoder.decode_bytes(r).ok()).map(|e| e.sk).collect();
                self.pending = Some(Walk { start_ns, sockets, namespaces: walked.into_iter().collect() });
                self.walks += 1;
            }
            Err(e) => warn!("socket walk for reconciliation failed: {e}"),
        }
    }

    /// The namespaces to walk: every one, or the one `--netns` names (found again by its inode).
    fn namespaces(&self) -> Vec<PathBuf> {
        use std::os::unix::fs::MetadataExt as _;
        let all = crate::attach::netns_paths(None);
        match self.only {
            None => all,
            Some(ino) => all
                .into_iter()
                .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.ino() as u32 == ino))
                .take(1)
                .collect(),
        }
    }

    /// Applies a pending walk (call right after the ring buffer was drained): connections of a
    /// walked namespace, first seen before the walk and not found by it, end as `gone`.
    pub fn apply(&mut self, engine: &mut Engine, out: &mut Vec<Record>) {
        let Some(w) = self.pending.take() else { return };
        let before = out.len();
        engine.reconcile(w.start_ns, |c| w.sockets.contains(&c.sk) || !w.namespaces.contains(&c.netns), out);
        let gone = out[before..].iter().filter(|r| r.kind.is_last()).count();
        if gone > 0 {
            warn!("{gone} connections no longer exist in the kernel (their close was missed): ended as `gone`");
        } else {
            debug!("socket walk #{}: {} keep-alive sockets, nothing missed", self.walks, w.sockets.len());
        }
    }
}
