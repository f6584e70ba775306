//! Cost of writing one timeline record as a JSON line (`trace --format json`), per record kind mix
//! of a healthy keep-alive connection (probe, ack, episode) plus a settings record.
//!
//! `json` is the agent's printer ([`write_json_line`]: the bytes written directly, keys in the
//! contract's order). `json_serde` is the printer before it ([`JsonRecord`], serde straight into
//! the buffer), and `json_via_map` the one before that, building a `serde_json::Map` per record
//! (both kept as the baselines the changes were measured against).

use std::{hint::black_box, net::SocketAddr};

use criterion::{criterion_group, Criterion, Throughput};
use keepalive_agent::{
    clock::Rfc3339,
    event::{Process, SockOpt, SockSettings},
    output::{write_json_line, JsonRecord},
    timeline::{AckPrecision, ConnView, Episode, EpisodeOutcome, FieldSink, FieldValue, Record, RecordKind, SettingsSource},
};
use serde_json::{json, Map, Value};

fn records() -> Vec<Record> {
    let conn = ConnView {
        id: 42,
        sk: 0xffff_8880_0a00_0800,
        netns: 4026531840,
        local: "127.0.0.1:46230".parse::<SocketAddr>().unwrap(),
        remote: "127.0.0.1:7001".parse::<SocketAddr>().unwrap(),
        process: Some(Process { pid: 7106, tid: 7106, comm: *b"python3\0\0\0\0\0\0\0\0\0", cgroup_id: 1 }),
        first_seen_ns: 1,
    };
    let settings = SockSettings {
        keepalive: true,
        idle_s: Some(1),
        intvl_s: Some(1),
        cnt: None,
        user_timeout_ms: 0,
        idle_default_s: 7200,
        intvl_default_s: 75,
        cnt_default: 9,
    };
    let ep = Episode {
        number: 3,
        start_ns: 2_000_000_000,
        end_ns: 2_000_070_000,
        probes: 1,
        outcome: EpisodeOutcome::Answered(AckPrecision::Segment),
        probe_ts_ns: [2_000_000_000].as_slice().into(),
        first_timed_probe: 1,
    };
    let kinds = [
        RecordKind::Config { settings, source: SettingsSource::Setsockopt(SockOpt::KeepCnt), process: None },
        RecordKind::Probe { n: 1 },
        RecordKind::Ack { probes: 1, precision: AckPrecision::Segment },
        RecordKind::EpisodeEnd(ep),
    ];
    kinds.into_iter().enumerate().map(|(i, kind)| Record { ts_ns: 2_000_000_000 + i as u64, conn, kind }).collect()
}

/// The former printer: a `serde_json::Map` per record, then serialised.
struct MapOf<'a>(&'a mut Map<String, Value>);

impl FieldSink for MapOf<'_> {
    type Error = ();
    fn field(&mut self, key: &'static str, value: FieldValue<'_>) -> Result<(), ()> {
        self.0.insert(key.into(), serde_json::to_value(value).unwrap());
        Ok(())
    }
}

fn via_map(rec: &Record, unix_ns: i128) -> Value {
    let mut m = Map::new();
    m.insert("ts".into(), json!(Rfc3339(unix_ns).to_string()));
    m.insert("event".into(), json!(rec.kind.name()));
    m.insert("local".into(), json!(rec.conn.local.to_string()));
    m.insert("remote".into(), json!(rec.conn.remote.to_string()));
    if let Some(p) = rec.conn.process {
        m.insert("pid".into(), json!(p.pid));
        m.insert("comm".into(), json!(p.comm_str()));
        m.insert("cgroup_id".into(), json!(p.cgroup_id));
    }
    m.insert("conn".into(), json!(rec.conn.id));
    m.insert("netns".into(), json!(rec.conn.netns));
    m.insert("mono_ns".into(), json!(rec.ts_ns));
    let _ = rec.kind.fields(&mut MapOf(&mut m));
    Value::Object(m)
}

fn bench(c: &mut Criterion) {
    let recs = records();
    let mut g = c.benchmark_group("output");
    g.throughput(Throughput::Elements(recs.len() as u64));
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
    g.bench_function("json", |b| {
        b.iter(|| {
            buf.clear();
            for r in &recs {
                write_json_line(&mut buf, r, 1_795_000_000_000_000_000 + r.ts_ns as i128, None);
                buf.push(b'\n');
            }
            black_box(buf.len())
        })
    });
    g.bench_function("json_serde", |b| {
        b.iter(|| {
            buf.clear();
            for r in &recs {
                let line = JsonRecord { rec: r, unix_ns: 1_795_000_000_000_000_000 + r.ts_ns as i128, cgroup: None };
                serde_json::to_writer(&mut buf, &line).unwrap();
                buf.push(b'\n');
            }
            black_box(buf.len())
        })
    });
    g.bench_function("json_via_map", |b| {
        b.iter(|| {
            buf.clear();
            for r in &recs {
                serde_json::to_writer(&mut buf, &via_map(r, 1_795_000_000_000_000_000 + r.ts_ns as i128)).unwrap();
                buf.push(b'\n');
            }
            black_box(buf.len())
        })
    });
    g.finish();
    let mut g = c.benchmark_group("output_parts");
    g.bench_function("rfc3339", |b| {
        let mut s = String::with_capacity(64);
        b.iter(|| {
            use std::fmt::Write as _;
            s.clear();
            write!(s, "{}", Rfc3339(black_box(1_795_000_000_123_456_789))).unwrap();
            black_box(s.len())
        })
    });
    g.finish();
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
