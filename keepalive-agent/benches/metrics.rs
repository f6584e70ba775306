//! Cost of the metrics on the event path: the timeline engine alone, and the engine with every
//! batch of records counted by [`Metrics::on_records`] (what `run --metrics-listen` adds), on the
//! same decoded events (the stream of benches/engine.rs); and the counting alone, on the records
//! of one pass of the engine, which on a busy machine is the steadier measure of the added cost
//! (`metrics` ÷ `engine`).
//!
//! `cargo bench -p keepalive-agent --bench metrics`; `KEEPALIVE_BENCH_CONNS` as in engine.rs.

use std::hint::black_box;

use criterion::{criterion_group, Criterion, Throughput};
use keepalive_agent::{
    decode::Decoder,
    event::{DecodeTables, Event},
    metrics::Metrics,
    timeline::engine::{Engine, EngineConfig},
};
use keepalive_common::RAW_EVENT_SIZE;

/// The stream generator of the engine benchmark (its `main` and groups are not used here).
#[allow(dead_code)]
#[path = "engine.rs"]
mod engine_bench;

/// Records are handed on every `BATCH` events, as the event loop does.
const BATCH: usize = 4096;

fn bench(c: &mut Criterion) {
    let stream = engine_bench::build_stream(engine_bench::conns_from_env());
    let decoder = Decoder::new(DecodeTables::linux_defaults());
    let decoded: Vec<Event> = stream
        .bytes
        .chunks_exact(RAW_EVENT_SIZE)
        .map(|r| decoder.decode_bytes(r).expect("stream decodes"))
        .collect();
    let mut group = c.benchmark_group("metrics");
    group.throughput(Throughput::Elements(stream.events as u64));

    let mut engine = Engine::new(EngineConfig { max_connections: 65_536 });
    let mut out = Vec::with_capacity(8192);
    group.bench_function("engine", |b| {
        b.iter(|| {
            for (i, ev) in decoded.iter().enumerate() {
                engine.handle(ev, &mut out);
                if i % BATCH == BATCH - 1 {
                    black_box(&out[..]);
                    out.clear();
                }
            }
            black_box(&out[..]);
            out.clear();
        })
    });

    let mut engine = Engine::new(EngineConfig { max_connections: 65_536 });
    let metrics = Metrics::new(2_000, false, None);
    group.bench_function("engine+metrics", |b| {
        b.iter(|| {
            for (i, ev) in decoded.iter().enumerate() {
                engine.handle(ev, &mut out);
                if i % BATCH == BATCH - 1 {
                    metrics.on_records(black_box(&out[..]));
                    out.clear();
                }
            }
            metrics.on_records(black_box(&out[..]));
            out.clear();
        })
    });
    // The records one pass produces, in the event loop's batches.
    let mut engine = Engine::new(EngineConfig { max_connections: 65_536 });
    let mut batches: Vec<Vec<keepalive_agent::timeline::Record>> = Vec::new();
    for (i, ev) in decoded.iter().enumerate() {
        engine.handle(ev, &mut out);
        if i % BATCH == BATCH - 1 {
            batches.push(std::mem::take(&mut out));
        }
    }
    batches.push(std::mem::take(&mut out));
    let counted = Metrics::new(2_000, false, None);
    group.bench_function("metrics", |b| {
        b.iter(|| {
            for batch in &batches {
                counted.on_records(black_box(batch));
            }
        })
    });
    group.finish();
    let mut probes = 0.0;
    metrics.visit(&mut |d, points| {
        if d.name == "keepalive.probes" {
            probes = points.iter().map(|p| p.value).sum();
        }
    });
    assert!(probes > 0.0, "the metrics counted no probe: the stream does not exercise them");
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
