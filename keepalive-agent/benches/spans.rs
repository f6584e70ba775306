//! Cost of `run`'s span export per record and per span, on the record stream of keep-alive
//! connections probing once a second where 30 % of the episodes need a second probe (what the
//! overloaded bench machine shows at 5,000 connections): each such episode is a problem episode,
//! exported with the healthy episode held before it, and every connection ends with a problem, so
//! its connection span is exported too (the default span policy, `--spans problems`).
//!
//! - `model`: records in, [`SpanData`] out ([`SpanModel`], one model for every pass, as in
//!   `run`), per record.
//! - `json`: one span as a JSON line, written straight into a reused buffer
//!   ([`json::SpanWriter`], what `run` does), per span.
//! - `json_via_value`: the same bytes through a `serde_json::Value` tree ([`json::span_json`], how
//!   the agent wrote spans before: the baseline), per span.
//! - `exporter`: the whole JSON-lines path of `run` ([`Exporter::on_records`]: model, JSON,
//!   write) into a sink, per record; spans per record are printed once for the conversion.
//!
//! `cargo bench -p keepalive-agent --bench spans`.

use std::hint::black_box;
use std::io::Write;
use std::net::SocketAddr;

use criterion::{criterion_group, Criterion, Throughput};
use keepalive_agent::{
    clock::WallClock,
    event::{Process, SockSettings, TcpState},
    export::{
        config::HostFacts,
        json,
        spans::{SpanModel, SpanPolicy},
        ExportArgs, ExportConfig, Exporter,
    },
    timeline::{AckPrecision, ConnView, Episode, EpisodeOutcome, Record, RecordKind, SettingsSource},
};
use opentelemetry::KeyValue;
use opentelemetry_sdk::trace::SpanData;

const CONNS: u64 = 200;
const EPISODES: u32 = 10;
const S: u64 = 1_000_000_000;

fn conn(id: u64) -> ConnView {
    ConnView {
        id,
        sk: 0xffff_8880_0a00_0000 + id * 0x800,
        netns: 4026532316,
        local: SocketAddr::from(([127, 0, 0, 1], 40_000 + id as u16)),
        remote: "127.0.0.1:9000".parse().unwrap(),
        process: Some(Process { pid: 7106, tid: 7106, comm: *b"python3\0\0\0\0\0\0\0\0\0", cgroup_id: 1 }),
        first_seen_ns: S,
    }
}

/// One episode's records: its probes, the answer, the episode.
fn episode(c: ConnView, number: u32, start: u64, probes: u32, out: &mut Vec<Record>) {
    let mut rec = |ts_ns, kind| out.push(Record { ts_ns, conn: c, kind });
    let probe_ts: Vec<u64> = (0..u64::from(probes)).map(|i| start + i * S).collect();
    for (i, ts) in probe_ts.iter().enumerate() {
        rec(*ts, RecordKind::Probe { n: i as u32 + 1 });
    }
    let end = probe_ts[probe_ts.len() - 1] + 70_000;
    rec(end, RecordKind::Ack { probes, precision: AckPrecision::Segment });
    let outcome = EpisodeOutcome::Answered(AckPrecision::Segment);
    let ep = Episode { number, start_ns: start, end_ns: end, probes, outcome, probe_ts_ns: probe_ts.as_slice().into(), first_timed_probe: 1 };
    rec(end, RecordKind::EpisodeEnd(ep));
}

/// Records of `CONNS` connections, interleaved as the engine emits them: settings at start, then
/// `EPISODES` episodes each (every tenth's third and later need a second probe: 30 %), then the
/// close.
fn records() -> Vec<Record> {
    let settings = SockSettings {
        keepalive: true,
        idle_s: Some(1),
        intvl_s: Some(1),
        cnt: Some(9),
        user_timeout_ms: 0,
        idle_default_s: 7200,
        intvl_default_s: 75,
        cnt_default: 9,
    };
    let mut out = Vec::new();
    for id in 0..CONNS {
        let kind = RecordKind::Config { settings, source: SettingsSource::Snapshot, process: None };
        out.push(Record { ts_ns: S, conn: conn(id), kind });
    }
    for e in 0..EPISODES {
        for id in 0..CONNS {
            let probes = if (id + u64::from(e)) % 10 < 3 { 2 } else { 1 };
            episode(conn(id), e + 1, (2 + 3 * u64::from(e)) * S + id, probes, &mut out);
        }
    }
    for id in 0..CONNS {
        let kind = RecordKind::Close { state: TcpState::Established, closed_by: None, idle: None };
        out.push(Record { ts_ns: (3 + 3 * u64::from(EPISODES)) * S, conn: conn(id), kind });
    }
    out
}

fn spans(recs: &[Record], clock: &WallClock) -> Vec<SpanData> {
    let mut model = SpanModel::with_policy(128, SpanPolicy::Problems);
    let mut out = Vec::new();
    model.on_records(recs, clock, &mut out);
    out
}

fn resource() -> Vec<KeyValue> {
    vec![
        KeyValue::new("service.name", "keepalive-agent"),
        KeyValue::new("host.name", "vm"),
        KeyValue::new("host.id", "3d1219c7c4c5404aaa1f6d2a48adfda4"),
        KeyValue::new("os.type", "linux"),
    ]
}

/// The JSON-lines exporter `run` builds with no endpoint configured, writing into `out`.
fn exporter(out: Box<dyn Write + Send>) -> Exporter {
    let host = HostFacts { host_name: Some("vm".into()), host_id: Some("3d1219c7c4c5404aaa1f6d2a48adfda4".into()) };
    let cfg = ExportConfig::resolve(&ExportArgs::default(), &|_| None, &host).expect("default configuration");
    Exporter::with_json_writer(&cfg, out)
}

fn bench(c: &mut Criterion) {
    let recs = records();
    let clock = WallClock::with_offset_ns(1_795_000_000_000_000_000);
    let built = spans(&recs, &clock);
    println!("spans: {} records, {} spans ({:.3} spans per record)", recs.len(), built.len(), built.len() as f64 / recs.len() as f64);

    let mut g = c.benchmark_group("spans");
    g.throughput(Throughput::Elements(recs.len() as u64));
    let mut model = SpanModel::with_policy(128, SpanPolicy::Problems);
    let mut out = Vec::new();
    g.bench_function("model", |b| {
        b.iter(|| {
            out.clear();
            model.on_records(black_box(&recs), &clock, &mut out);
            black_box(out.len())
        })
    });
    let mut ex = exporter(Box::new(std::io::sink()));
    g.bench_function("exporter", |b| b.iter(|| ex.on_records(black_box(&recs), &clock)));

    g.throughput(Throughput::Elements(built.len() as u64));
    let res = resource();
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
    let mut writer = json::SpanWriter::new(&res);
    g.bench_function("json", |b| {
        b.iter(|| {
            buf.clear();
            for s in &built {
                writer.write_line(s, &mut buf).unwrap();
            }
            black_box(buf.len())
        })
    });
    g.bench_function("json_via_value", |b| {
        b.iter(|| {
            buf.clear();
            for s in &built {
                buf.extend_from_slice(json::span_json(s, &res).to_string().as_bytes());
                buf.push(b'\n');
            }
            black_box(buf.len())
        })
    });
    g.finish();
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
