//! The event loop's watchdog: a thread that logs when the loop has not turned for
//! [`STALL_AFTER`], naming the step it is in, and logs again when it turns. While the loop stands
//! still, records wait in the ring buffer (and are lost, and counted, once it fills), and `trace`
//! prints nothing: without this, a stuck agent and a quiet host look the same.
//!
//! The loop marks each step with [`Pulse::enter`]: a clock read and two relaxed stores, a few per
//! turn (a turn per batch drained, at least one every 100 ms), never per record.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use log::{info, warn};

/// How long the loop may go without turning before the watchdog says so. It turns at least every
/// 100 ms (its poll timeout); its slowest steps (a walk of the sockets, the lookup of a death's
/// owner in `/proc`) take well under a second.
pub const STALL_AFTER: Duration = Duration::from_secs(5);

/// How often the watchdog looks.
const LOOK_EVERY: Duration = Duration::from_secs(1);

/// A step of the event loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Step {
    Wait = 0,
    Drain,
    Output,
    OnDemand,
    Report,
    Walk,
}

impl Step {
    const ALL: [Step; 6] = [Step::Wait, Step::Drain, Step::Output, Step::OnDemand, Step::Report, Step::Walk];

    /// What the loop does in this step, for the log.
    pub fn describe(self) -> &'static str {
        match self {
            Step::Wait => "waiting for the ring buffer (poll)",
            Step::Drain => "reading and handling ring-buffer records",
            Step::Output => "writing records to the output",
            Step::OnDemand => "attaching or detaching the on-demand hooks",
            Step::Report => "the once-a-second report (counters, clock, held records)",
            Step::Walk => "walking the kernel's sockets (reconciliation)",
        }
    }
}

/// The loop's last mark: when, and in which step. Shared with the watchdog.
#[derive(Debug)]
pub struct Pulse {
    start: Instant,
    beat_ms: AtomicU64,
    step: AtomicU8,
    done: AtomicBool,
}

impl Pulse {
    fn new() -> Self {
        Pulse { start: Instant::now(), beat_ms: AtomicU64::new(0), step: AtomicU8::new(Step::Wait as u8), done: AtomicBool::new(false) }
    }

    /// The loop enters `step` now.
    pub fn enter(&self, step: Step) {
        self.step.store(step as u8, Ordering::Relaxed);
        self.beat_ms.store(self.ms_now(), Ordering::Relaxed);
    }

    fn ms_now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn step(&self) -> Step {
        let v = self.step.load(Ordering::Relaxed);
        Step::ALL.into_iter().find(|s| *s as u8 == v).unwrap_or(Step::Wait)
    }
}

/// What a look concludes.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Fine,
    /// No mark for `for_ms` (a stall not said yet).
    Stalled { for_ms: u64 },
    /// The loop marked again, `after_ms` after the mark of the stall said.
    Turned { after_ms: u64 },
}

/// One look at mark `beat_ms` at `now_ms`; `said`: the mark of the stall already logged.
fn judge(beat_ms: u64, now_ms: u64, said: Option<u64>, stall_ms: u64) -> Verdict {
    match said {
        Some(b) if beat_ms != b => Verdict::Turned { after_ms: beat_ms.saturating_sub(b) },
        Some(_) => Verdict::Fine,
        None if now_ms.saturating_sub(beat_ms) >= stall_ms => Verdict::Stalled { for_ms: now_ms - beat_ms },
        None => Verdict::Fine,
    }
}

/// The watchdog thread; stopped and joined on drop.
#[derive(Debug)]
pub struct Watchdog {
    pulse: Arc<Pulse>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// Starts the thread. If it cannot be started, says so once: the pulse still works, unwatched.
    pub fn start() -> Watchdog {
        let pulse = Arc::new(Pulse::new());
        let p = Arc::clone(&pulse);
        let thread = std::thread::Builder::new()
            .name("ka-watchdog".into())
            .spawn(move || watch(&p))
            .map_err(|e| warn!("event loop watchdog not started ({e}): a stalled loop will not be reported"))
            .ok();
        Watchdog { pulse, thread }
    }

    /// The pulse the loop marks.
    pub fn pulse(&self) -> &Pulse {
        &self.pulse
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.pulse.done.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

fn watch(pulse: &Pulse) {
    let stall_ms = u64::try_from(STALL_AFTER.as_millis()).unwrap_or(u64::MAX);
    let mut said = None;
    while !pulse.done.load(Ordering::Relaxed) {
        std::thread::park_timeout(LOOK_EVERY);
        let beat = pulse.beat_ms.load(Ordering::Relaxed);
        match judge(beat, pulse.ms_now(), said, stall_ms) {
            Verdict::Fine => {}
            Verdict::Stalled { for_ms } => {
                said = Some(beat);
                warn!(
                    "event loop stalled: no turn for {:.1} s, in step: {}; records wait in the ring buffer meanwhile",
                    for_ms as f64 / 1000.0,
                    pulse.step().describe()
                );
            }
            Verdict::Turned { after_ms } => {
                said = None;
                info!("event loop turned again after {:.1} s", after_ms as f64 / 1000.0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stall_is_said_once_then_its_end() {
        let s = 5_000;
        assert_eq!(judge(1_000, 5_999, None, s), Verdict::Fine, "under the bound");
        assert_eq!(judge(1_000, 6_000, None, s), Verdict::Stalled { for_ms: 5_000 });
        assert_eq!(judge(1_000, 9_000, Some(1_000), s), Verdict::Fine, "said already");
        assert_eq!(judge(12_500, 13_000, Some(1_000), s), Verdict::Turned { after_ms: 11_500 });
        assert_eq!(judge(12_500, 13_000, None, s), Verdict::Fine, "turning again, nothing more to say");
    }

    #[test]
    fn pulse_records_step_and_time() {
        let p = Pulse::new();
        p.enter(Step::Walk);
        assert_eq!(p.step(), Step::Walk);
        assert!(p.beat_ms.load(Ordering::Relaxed) <= p.ms_now());
        assert!(Step::ALL.iter().enumerate().all(|(i, s)| *s as usize == i), "ALL in discriminant order");
    }

    #[test]
    fn watchdog_stops_at_drop() {
        let w = Watchdog::start();
        w.pulse().enter(Step::Drain);
        assert!(w.thread.is_some());
        drop(w); // unparks and joins the thread: the test would hang otherwise
    }
}
