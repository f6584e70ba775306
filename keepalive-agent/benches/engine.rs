//! Throughput of the user-space event path: kernel records (bytes, as read from the ring buffer) →
//! [`Decoder`] → timeline [`Engine`] → records, on one thread.
//!
//! The stream is a realistic keep-alive mix over many connections that are open at the same time:
//! pre-connect `setsockopt`s, connect and establishment, timer firings that re-arm (idle), probe,
//! are suppressed by data in flight or find the socket busy, answers seen as segments or inferred at
//! the next firing, and three endings: application close, keep-alive timeout (reset, error and
//! close inside the timer run, held back until the timer event) and peer reset. Every connection
//! ends with its socket destroyed, so replaying the stream on the same engine finds it in the same
//! state each time (socket addresses are reused, as the kernel does).
//!
//! Besides the criterion groups, the binary prints (as `MEM ...` lines on stdout) the engine's heap
//! use per tracked connection, measured with a counting allocator, and the stream's event mix
//! (`MIX ...`). `cargo xtask bench` collects both into BENCHMARKS.md.
//!
//! Environment: `KEEPALIVE_BENCH_CONNS` (default 10000) connections in the stream.
//! `KEEPALIVE_BENCH_PASSES=N` (with `KEEPALIVE_BENCH_PART` = `decode`, `timeline` or
//! `decode+timeline`, the default) runs exactly N passes of that part and nothing else: a fixed
//! amount of work for `perf stat -e instructions`, whose count does not swing with the machine's
//! load as wall time does (subtract a run with N=0 and divide by N × events).

use std::{
    alloc::{GlobalAlloc, Layout, System},
    hint::black_box,
    sync::atomic::{AtomicIsize, Ordering},
};

use criterion::{criterion_group, Criterion, Throughput};
use keepalive_agent::{
    decode::Decoder,
    event::{DecodeTables, Event},
    timeline::{
        engine::{Engine, EngineConfig},
        Record,
    },
};
use keepalive_common::{
    EventKind, RawEvent, FLAG_ACTIVE, FLAG_HAS_REASON, FLAG_IN_TIMER, FLAG_KEEPOPEN,
    FLAG_KEEPOPEN_AFTER, FLAG_OWNED, FLAG_PROCESS, FLAG_TIMER_PENDING, RAW_EVENT_SIZE, SOL_SOCKET,
    SOL_TCP, SO_KEEPALIVE, TCP_KEEPCNT, TCP_KEEPIDLE, TCP_KEEPINTVL,
};

/// Counts live heap bytes, to measure the engine's memory per tracked connection.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator; only adds bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as isize - layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const HZ: u32 = 250;
const NETNS: u32 = 4026531840;
/// Kernel `tcp_sock` objects sit in a slab; consecutive sockets are a slab object apart.
const SK_BASE: u64 = 0xffff_8880_1000_0000;
const SK_STRIDE: u64 = 0x980;
const S: u64 = 1_000_000_000;

const TCP_ESTABLISHED: u8 = 1;
const TCP_SYN_SENT: u8 = 2;
const TCP_CLOSE: u8 = 7;

/// Small deterministic generator (xorshift64*), so every run benchmarks the same stream.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in 0..n.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Builds the records of one connection.
struct ConnGen {
    sk: u64,
    sport: u16,
    dport: u16,
    pid: u32,
}

impl ConnGen {
    fn base(&self, kind: EventKind, ts_ns: u64) -> RawEvent {
        let mut r = RawEvent::zeroed();
        r.kind = kind as u8;
        r.ts_ns = ts_ns;
        r.sk = self.sk;
        r.netns = NETNS;
        r.family = 2;
        r.saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        r.daddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        r.sport = self.sport;
        r.dport = self.dport;
        r.sysctl_time = 7200 * HZ;
        r.sysctl_intvl = 75 * HZ;
        r.sysctl_probes = 9;
        r
    }

    fn settings(&self, r: &mut RawEvent) {
        r.flags |= FLAG_KEEPOPEN;
        r.keepalive_time = 30 * HZ;
        r.keepalive_intvl = 5 * HZ;
        r.keepalive_probes = 3;
    }

    fn process(&self, r: &mut RawEvent) {
        r.flags |= FLAG_PROCESS;
        r.pid = self.pid;
        r.tid = self.pid;
        r.cgroup_id = 4242;
        r.comm[..6].copy_from_slice(b"client");
    }

    fn setsockopt(&self, ts: u64, level: i32, optname: i32, value: i32) -> RawEvent {
        let mut r = self.base(EventKind::Setsockopt, ts);
        // Before connect(): no ports yet.
        r.sport = 0;
        r.dport = 0;
        r.family = 2;
        r.state = TCP_CLOSE;
        r.level = level;
        r.optname = optname;
        r.optval = value;
        self.process(&mut r);
        r
    }

    fn state(&self, ts: u64, old: u8, new: u8, err: i32) -> RawEvent {
        let mut r = self.base(EventKind::State, ts);
        self.settings(&mut r);
        r.state = old;
        r.new_state = new;
        r.err = err;
        if new == TCP_SYN_SENT {
            self.process(&mut r);
        }
        r
    }

    /// One run of the keep-alive timer.
    #[allow(clippy::too_many_arguments)]
    fn timer(
        &self,
        ts: u64,
        before: u8,
        after: u8,
        idle_s: u32,
        packets_out: u32,
        owned: bool,
        killed: bool,
    ) -> RawEvent {
        let mut r = self.base(EventKind::Timer, ts);
        self.settings(&mut r);
        r.state = TCP_ESTABLISHED;
        r.new_state = if killed { TCP_CLOSE } else { TCP_ESTABLISHED };
        r.probes_out = before;
        r.probes_out_after = after;
        r.packets_out = packets_out;
        r.idle_jiffies = idle_s * HZ;
        r.jiffies = 4_295_000_000 + ts / (S / u64::from(HZ));
        if owned {
            r.flags |= FLAG_OWNED;
        }
        if killed {
            r.err = 110;
        } else {
            r.flags |= FLAG_TIMER_PENDING | FLAG_KEEPOPEN_AFTER;
            r.timer_expires = r.jiffies + u64::from(5 * HZ);
        }
        r
    }

    fn simple(&self, kind: EventKind, ts: u64, f: impl FnOnce(&mut RawEvent)) -> RawEvent {
        let mut r = self.base(kind, ts);
        self.settings(&mut r);
        r.state = TCP_ESTABLISHED;
        f(&mut r);
        r
    }
}

/// The stream: connections' steps interleaved round-robin. A step is the records the kernel emits
/// for one happening (a timer run with what it caused is one step: the records stay together).
pub(crate) struct Stream {
    pub(crate) bytes: Vec<u8>,
    pub(crate) events: usize,
    /// Records per kind (index = kind value).
    mix: [usize; 10],
    conns: usize,
}

fn push(step: &mut Vec<RawEvent>, r: RawEvent) {
    step.push(r);
}

fn connection_steps(i: usize, rng: &mut Rng) -> Vec<Vec<RawEvent>> {
    let c = ConnGen {
        sk: SK_BASE + i as u64 * SK_STRIDE,
        sport: 20_000 + (i % 40_000) as u16,
        dport: 8080 + (i % 4) as u16,
        pid: 1000 + (i % 64) as u32,
    };
    let mut t = (i as u64 % 1000) * 1_000_000; // spread over the first second
    let mut tick = || {
        t += S;
        t
    };
    let mut steps: Vec<Vec<RawEvent>> = Vec::new();
    // Pre-connect settings, by the process, then connect and establishment.
    let ts = tick();
    steps.push(vec![
        c.setsockopt(ts, SOL_SOCKET, SO_KEEPALIVE, 1),
        c.setsockopt(ts + 1_000, SOL_TCP, TCP_KEEPIDLE, 30),
        c.setsockopt(ts + 2_000, SOL_TCP, TCP_KEEPINTVL, 5),
        c.setsockopt(ts + 3_000, SOL_TCP, TCP_KEEPCNT, 3),
        c.state(ts + 4_000, TCP_CLOSE, TCP_SYN_SENT, 0),
    ]);
    steps.push(vec![c.state(tick(), TCP_SYN_SENT, TCP_ESTABLISHED, 0)]);
    // Life: eight happenings, drawn from the mix below.
    for _ in 0..8 {
        let ts = tick();
        let mut step = Vec::new();
        match rng.below(100) {
            // Idle time not reached (traffic since): the timer re-arms.
            0..=29 => push(&mut step, c.timer(ts, 0, 0, 12, 0, false, false)),
            // A probe, answered: the answering segment is seen.
            30..=64 => {
                push(&mut step, c.timer(ts, 0, 1, 30, 0, false, false));
                push(&mut step, c.simple(EventKind::Ack, ts + 60_000, |r| r.probes_out = 1));
            }
            // Two probes; the answer is only inferred at the next firing.
            65..=74 => {
                push(&mut step, c.timer(ts, 0, 1, 30, 0, false, false));
                steps.push(std::mem::take(&mut step));
                push(&mut step, c.timer(tick(), 1, 2, 35, 0, false, false));
                steps.push(std::mem::take(&mut step));
                push(&mut step, c.timer(tick(), 0, 0, 3, 0, false, false));
            }
            // Data in flight: keep-alive is silent.
            75..=89 => push(&mut step, c.timer(ts, 0, 0, 30, 2, false, false)),
            // The owner holds the socket lock: the timer retries 50 ms later.
            90..=94 => {
                push(&mut step, c.timer(ts, 0, 0, 30, 0, true, false));
                push(&mut step, c.timer(ts + 50_000_000, 0, 0, 12, 0, false, false));
            }
            // A keep-alive option changed on the live connection.
            _ => {
                let mut r = c.setsockopt(ts, SOL_TCP, TCP_KEEPIDLE, 60);
                r.sport = c.sport;
                r.dport = c.dport;
                r.state = TCP_ESTABLISHED;
                push(&mut step, r);
            }
        }
        steps.push(step);
    }
    // Ending.
    let ts = tick();
    let mut step = Vec::new();
    match rng.below(100) {
        0..=69 => push(&mut step, c.state(ts, TCP_ESTABLISHED, TCP_CLOSE, 0)),
        70..=84 => {
            // The peer vanished: three unanswered probes, then the timer kills the connection.
            push(&mut step, c.timer(ts, 0, 1, 30, 0, false, false));
            steps.push(std::mem::take(&mut step));
            push(&mut step, c.timer(tick(), 1, 2, 35, 0, false, false));
            steps.push(std::mem::take(&mut step));
            push(&mut step, c.timer(tick(), 2, 3, 40, 0, false, false));
            steps.push(std::mem::take(&mut step));
            let ts = tick();
            push(
                &mut step,
                c.simple(EventKind::ResetSent, ts + 1_000, |r| {
                    r.flags |= FLAG_ACTIVE | FLAG_HAS_REASON | FLAG_IN_TIMER;
                    r.reason = 15;
                }),
            );
            let mut close = c.state(ts + 2_000, TCP_ESTABLISHED, TCP_CLOSE, 110);
            close.flags |= FLAG_IN_TIMER;
            push(&mut step, close);
            push(
                &mut step,
                c.simple(EventKind::Error, ts + 2_500, |r| {
                    r.flags |= FLAG_IN_TIMER;
                    r.err = 110;
                    r.state = TCP_CLOSE;
                }),
            );
            push(&mut step, c.timer(ts, 3, 3, 45, 0, false, true));
        }
        _ => {
            push(&mut step, c.simple(EventKind::ResetReceived, ts, |_| {}));
            push(&mut step, c.state(ts + 1_000, TCP_ESTABLISHED, TCP_CLOSE, 104));
            push(
                &mut step,
                c.simple(EventKind::Error, ts + 2_000, |r| {
                    r.err = 104;
                    r.state = TCP_CLOSE;
                }),
            );
        }
    }
    steps.push(step);
    steps.push(vec![c.simple(EventKind::Destroy, tick() + 1_000, |r| r.state = TCP_CLOSE)]);
    steps
}

fn as_bytes(r: &RawEvent) -> &[u8] {
    // SAFETY: RawEvent is plain integers and byte arrays without padding.
    unsafe { std::slice::from_raw_parts((r as *const RawEvent).cast::<u8>(), RAW_EVENT_SIZE) }
}

pub(crate) fn build_stream(conns: usize) -> Stream {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let per_conn: Vec<Vec<Vec<RawEvent>>> =
        (0..conns).map(|i| connection_steps(i, &mut rng)).collect();
    let max_steps = per_conn.iter().map(Vec::len).max().unwrap_or(0);
    let mut bytes = Vec::new();
    let mut mix = [0usize; 10];
    let mut events = 0;
    for step in 0..max_steps {
        for c in &per_conn {
            if let Some(records) = c.get(step) {
                for r in records {
                    bytes.extend_from_slice(as_bytes(r));
                    mix[usize::from(r.kind)] += 1;
                    events += 1;
                }
            }
        }
    }
    Stream { bytes, events, mix, conns }
}

/// The decoder alone over the stream.
fn decode_pass(decoder: &Decoder, bytes: &[u8]) {
    for rec in bytes.chunks_exact(RAW_EVENT_SIZE) {
        black_box(decoder.decode_bytes(black_box(rec)).ok());
    }
}

/// The engine alone over decoded events, records handed on in batches.
fn timeline_pass(engine: &mut Engine, decoded: &[Event], out: &mut Vec<Record>) {
    for (i, ev) in decoded.iter().enumerate() {
        engine.handle(ev, out);
        if i % 4096 == 4095 {
            black_box(&out[..]);
            out.clear();
        }
    }
    out.clear();
}

/// The agent's event loop, minus the ring buffer: decode, handle, hand records on in batches.
fn run_pipeline(decoder: &Decoder, engine: &mut Engine, bytes: &[u8], out: &mut Vec<Record>) {
    for (i, rec) in bytes.chunks_exact(RAW_EVENT_SIZE).enumerate() {
        match &decoder.decode_bytes(rec) {
            Ok(ev) => engine.handle(ev, out),
            Err(e) => panic!("bench stream does not decode: {e}"),
        }
        if i % 4096 == 4095 {
            black_box(&out[..]);
            out.clear();
        }
    }
    black_box(&out[..]);
    out.clear();
}

pub(crate) fn conns_from_env() -> usize {
    std::env::var("KEEPALIVE_BENCH_CONNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n: &usize| n > 0)
        .unwrap_or(10_000)
}

fn bench(c: &mut Criterion) {
    let stream = build_stream(conns_from_env());
    let decoder = Decoder::new(DecodeTables::linux_defaults());
    let mut group = c.benchmark_group("engine");
    group.throughput(Throughput::Elements(stream.events as u64));

    group.bench_function("decode", |b| b.iter(|| decode_pass(&decoder, &stream.bytes)));

    let decoded: Vec<Event> = stream
        .bytes
        .chunks_exact(RAW_EVENT_SIZE)
        .map(|r| decoder.decode_bytes(r).expect("stream decodes"))
        .collect();
    let mut engine = Engine::new(EngineConfig { max_connections: 65_536 });
    let mut out = Vec::with_capacity(8192);
    group.bench_function("timeline", |b| b.iter(|| timeline_pass(&mut engine, &decoded, &mut out)));
    drop(decoded);

    let mut engine = Engine::new(EngineConfig { max_connections: 65_536 });
    group.bench_function("decode+timeline", |b| {
        b.iter(|| run_pipeline(&decoder, &mut engine, &stream.bytes, &mut out))
    });
    group.finish();
}

/// Heap bytes the engine holds per tracked connection: `n` connections opened (settings before
/// connect, connect, established), then each with one unanswered probe (an open episode).
fn memory_report(n: usize) {
    let decoder = Decoder::new(DecodeTables::linux_defaults());
    let mut rng = Rng(1);
    let gens: Vec<Vec<Vec<RawEvent>>> = (0..n).map(|i| connection_steps(i, &mut rng)).collect();
    let mut out = Vec::new();
    let before = LIVE.load(Ordering::Relaxed);
    let mut engine = Engine::new(EngineConfig { max_connections: 1 << 20 });
    for steps in &gens {
        for r in steps[0].iter().chain(steps[1].iter()) {
            let ev = decoder.decode(r).expect("decodes");
            engine.handle(&ev, &mut out);
            out.clear();
        }
    }
    let tracked = engine.tracked();
    let idle = LIVE.load(Ordering::Relaxed) - before;
    for (i, steps) in gens.iter().enumerate() {
        let c = ConnGen { sk: SK_BASE + i as u64 * SK_STRIDE, sport: 0, dport: 0, pid: 0 };
        let ts = steps[1][0].ts_ns + S;
        let ev = decoder.decode(&c.timer(ts, 0, 1, 30, 0, false, false)).expect("decodes");
        engine.handle(&ev, &mut out);
        out.clear();
    }
    let probing = LIVE.load(Ordering::Relaxed) - before;
    assert_eq!(tracked, n, "every generated connection is tracked");
    println!(
        "MEM connections={n} tracked={tracked} heap_idle_bytes={idle} per_conn_idle={:.1} heap_probing_bytes={probing} per_conn_probing={:.1}",
        idle as f64 / n as f64,
        probing as f64 / n as f64
    );
    black_box(&engine);
}

/// Feeds the stream twice through one engine and checks that it does the work the benchmark claims
/// to measure: every connection tracked and closed, probes, answers, timeouts, episodes, and the
/// same records on the second pass (the engine is back in its starting state after each pass).
fn check_records(stream: &Stream) {
    let decoder = Decoder::new(DecodeTables::linux_defaults());
    let mut engine = Engine::new(EngineConfig { max_connections: 65_536 });
    let mut passes = Vec::new();
    for _ in 0..2 {
        let mut counts = std::collections::BTreeMap::<&'static str, usize>::new();
        let mut out = Vec::new();
        for rec in stream.bytes.chunks_exact(RAW_EVENT_SIZE) {
            let ev = decoder.decode_bytes(rec).expect("stream decodes");
            engine.handle(&ev, &mut out);
            for r in out.drain(..) {
                *counts.entry(r.kind.name()).or_default() += 1;
            }
        }
        assert_eq!(engine.tracked(), 0, "every connection closed at the end of a pass");
        passes.push(counts);
    }
    let c = &passes[0];
    let n = |k: &str| c.get(k).copied().unwrap_or(0);
    assert_eq!(n("open"), stream.conns, "every connection tracked");
    assert_eq!(n("close"), stream.conns, "every connection closed");
    for k in ["probe", "ack", "idle", "suppressed", "busy", "timeout", "reset", "peer_reset", "episode", "config"] {
        assert!(n(k) > 0, "no {k} records: the stream does not exercise the engine as intended");
    }
    assert_eq!(passes[0], passes[1], "a second pass behaves like the first");
    let list: Vec<String> = c.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("RECORDS per pass: {}", list.join(" "));
}

criterion_group!(benches, bench);

/// `KEEPALIVE_BENCH_PASSES` mode: exactly `passes` passes of `part`, no criterion, no reports.
fn fixed_passes(stream: &Stream, passes: usize, part: &str) {
    let decoder = Decoder::new(DecodeTables::linux_defaults());
    let mut engine = Engine::new(EngineConfig { max_connections: 65_536 });
    let mut out = Vec::with_capacity(8192);
    match part {
        "decode" => (0..passes).for_each(|_| decode_pass(&decoder, &stream.bytes)),
        "timeline" => {
            let decoded: Vec<Event> = stream
                .bytes
                .chunks_exact(RAW_EVENT_SIZE)
                .map(|r| decoder.decode_bytes(r).expect("stream decodes"))
                .collect();
            (0..passes).for_each(|_| timeline_pass(&mut engine, &decoded, &mut out));
        }
        "decode+timeline" => {
            for _ in 0..passes {
                run_pipeline(&decoder, &mut engine, &stream.bytes, &mut out);
            }
        }
        other => panic!("KEEPALIVE_BENCH_PART={other}: expected decode, timeline or decode+timeline"),
    }
    println!("PASSES {passes} of {part}, {} events each", stream.events);
}

fn main() {
    let conns = conns_from_env();
    let stream = build_stream(conns);
    if let Ok(passes) = std::env::var("KEEPALIVE_BENCH_PASSES") {
        let passes = passes
            .parse()
            .unwrap_or_else(|_| panic!("KEEPALIVE_BENCH_PASSES={passes}: expected a number of passes"));
        let part = std::env::var("KEEPALIVE_BENCH_PART").unwrap_or_else(|_| "decode+timeline".into());
        fixed_passes(&stream, passes, &part);
        return;
    }
    let names = [
        "", "timer", "ack", "reset_sent", "reset_received", "error", "state", "setsockopt",
        "snapshot", "destroy",
    ];
    let mix: Vec<String> = stream
        .mix
        .iter()
        .enumerate()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| format!("{}={n}", names[k]))
        .collect();
    println!(
        "MIX connections={} events={} bytes={} {}",
        stream.conns,
        stream.events,
        stream.bytes.len(),
        mix.join(" ")
    );
    check_records(&stream);
    drop(stream);
    println!(
        "SIZES event={} record={} conn_view={}",
        std::mem::size_of::<Event>(),
        std::mem::size_of::<Record>(),
        std::mem::size_of::<keepalive_agent::timeline::ConnView>()
    );
    let mut sizes = vec![1_000, 10_000, 14_000, 14_337, 15_000, 20_000, 50_000, conns];
    sizes.sort_unstable();
    sizes.dedup();
    for n in sizes {
        memory_report(n);
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
