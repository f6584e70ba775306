//! Part `engine`: runs the criterion benchmark `keepalive-agent/benches/engine.rs` and reads its
//! estimates.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{anyhow, bail, Context as _, Result};
use log::info;
use serde_json::Value;

use super::report::{bytes, Section, Verdict};
use super::{Ctx, Part};

/// Target: events per second through decoder + engine on one core (≤ 100 ns per event).
const TARGET_EPS: f64 = 10e6;
/// Target: engine heap per tracked connection, worst case over table fill.
const TARGET_BYTES_PER_CONN: f64 = 256.0;

struct Estimate {
    name: String,
    elements: f64,
    mean_ns: f64,
    lo_ns: f64,
    hi_ns: f64,
    median_ns: f64,
}

impl Estimate {
    fn eps(&self, ns: f64) -> f64 {
        self.elements / (ns / 1e9)
    }
}

fn read_estimate(dir: &Path, name: &str) -> Result<Estimate> {
    let d = dir.join("engine").join(name);
    let est: Value = serde_json::from_slice(&std::fs::read(d.join("new/estimates.json")).with_context(|| format!("{}", d.display()))?)?;
    let bm: Value = serde_json::from_slice(&std::fs::read(d.join("new/benchmark.json"))?)?;
    let f = |v: &Value| v.as_f64().ok_or_else(|| anyhow!("bad estimate in {}", d.display()));
    Ok(Estimate {
        name: name.to_string(),
        elements: f(&bm["throughput"]["Elements"])?,
        mean_ns: f(&est["mean"]["point_estimate"])?,
        lo_ns: f(&est["mean"]["confidence_interval"]["lower_bound"])?,
        hi_ns: f(&est["mean"]["confidence_interval"]["upper_bound"])?,
        median_ns: f(&est["median"]["point_estimate"])?,
    })
}

pub fn run(ctx: &Ctx) -> Result<Section> {
    let a = ctx.args;
    let crit_home = super::target_dir(ctx.workspace).join("bench/criterion");
    // Fresh estimates only: a stale directory must not be read as this run's result.
    let _ = std::fs::remove_dir_all(crit_home.join("engine"));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let measure = a.engine_measure_s.to_string();
    info!("cargo bench -p keepalive-agent --bench engine ({} connections)", a.engine_connections);
    let out = Command::new(cargo)
        .current_dir(ctx.workspace)
        .env("CRITERION_HOME", &crit_home)
        .env("KEEPALIVE_BENCH_CONNS", a.engine_connections.to_string())
        .args(["bench", "-p", "keepalive-agent", "--bench", "engine", "--"])
        .args(["--warm-up-time", "2", "--measurement-time", &measure, "--noplot"])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo bench")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    print!("{stdout}");
    if !out.status.success() {
        bail!("cargo bench failed ({})", out.status);
    }
    let mix = stdout.lines().find(|l| l.starts_with("MIX ")).map(|l| l[4..].to_string()).unwrap_or_default();
    let mem: Vec<&str> = stdout.lines().filter(|l| l.starts_with("MEM ")).map(|l| &l[4..]).collect();
    let records = stdout.lines().find(|l| l.starts_with("RECORDS per pass: ")).map(|l| l[18..].to_string()).unwrap_or_default();
    let sizes = stdout.lines().find(|l| l.starts_with("SIZES ")).map(|l| l[6..].to_string()).unwrap_or_default();

    let mut s = Section::new(Part::Engine, "1. Timeline engine throughput (decoder + engine, one core)");
    s.line("The user-space event path without the ring buffer: 176-byte kernel records → `Decoder::decode_bytes` →");
    s.line("`Engine::handle` → records, handed on in batches of 4096 as the agent's event loop does. Criterion,");
    s.line("single thread. The stream interleaves the lives of many connections that are open at once, so the");
    s.line("engine works on a table of that many connections (realistic cache behaviour, not one hot socket):");
    s.line("pre-connect setsockopts, connect, establishment, then eight happenings per connection drawn from");
    s.line("idle re-arms 30 %, probes answered by a segment 35 %, two probes answered at the next firing 10 %,");
    s.line("suppressed by data in flight 15 %, owner busy 5 %, live setsockopt 5 %; then a close (70 %), a");
    s.line("keep-alive timeout with reset, error and close inside the timer run (15 %) or a peer reset (15 %),");
    s.line("and the socket destroyed.\n");
    if !mix.is_empty() {
        s.line(format!("Stream (kernel records per pass): `{mix}`.\n"));
    }
    if !records.is_empty() {
        s.line(format!(
            "Timeline records per pass (checked before measuring: every connection tracked and closed, every kind \
             present, a second pass identical to the first): `{records}`.\n"
        ));
    }
    s.line("| Benchmark | Mean time per pass (95 % CI) | Events/s (mean) | Events/s (median) | ns/event (median) |");
    s.line("|---|---|---|---|---|");
    let mut headline = None;
    for name in ["decode", "timeline", "decode+timeline"] {
        let e = read_estimate(&crit_home, name)?;
        s.line(format!(
            "| {} | {:.2} ms ({:.2}–{:.2}) | {:.2} M | {:.2} M | {:.0} |",
            e.name,
            e.mean_ns / 1e6,
            e.lo_ns / 1e6,
            e.hi_ns / 1e6,
            e.eps(e.mean_ns) / 1e6,
            e.eps(e.median_ns) / 1e6,
            e.median_ns / e.elements
        ));
        if name == "decode+timeline" {
            headline = Some(e);
        }
    }
    s.line("");
    let e = headline.ok_or_else(|| anyhow!("no decode+timeline estimate"))?;
    let eps = e.eps(e.median_ns);
    s.verdict(Verdict::new(
        "decoder + engine throughput, one core (median)",
        "≥ 10 M events/s",
        format!("{:.2} M events/s (mean {:.2} M)", eps / 1e6, e.eps(e.mean_ns) / 1e6),
        Some(eps >= TARGET_EPS),
    ));
    if !mem.is_empty() {
        s.line("Engine heap per tracked connection, counted by a global allocator in the benchmark binary");
        s.line("(connections opened with pre-connect settings; then each with one unanswered probe, i.e. an open episode):\n");
        s.line("| Connections | Heap, idle | Per connection, idle | Heap, probing | Per connection, probing |");
        s.line("|---|---|---|---|---|");
        let mut worst: f64 = 0.0;
        let mut typical = f64::NAN;
        for l in &mem {
            let kv = |k: &str| {
                l.split_whitespace()
                    .find_map(|f| f.strip_prefix(k)?.strip_prefix('='))
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(f64::NAN)
            };
            s.line(format!(
                "| {} | {} | {:.0} B | {} | {:.0} B |",
                kv("connections"),
                bytes(kv("heap_idle_bytes")),
                kv("per_conn_idle"),
                bytes(kv("heap_probing_bytes")),
                kv("per_conn_probing")
            ));
            if kv("connections") >= 1_000.0 {
                worst = worst.max(kv("per_conn_probing"));
            }
            if kv("connections") == 20_000.0 {
                typical = kv("per_conn_probing");
            }
        }
        s.line("");
        s.line("The connection table is a hash index (socket → position, 16-byte buckets) over a dense array of packed");
        s.line("connections that grows by an eighth at a time. The index grows by doubling (and holds at most 7/8 of its");
        s.line("buckets), so the per-connection figure swings with how full it is: highest just after a doubling (14,336 →");
        s.line("14,337 connections), lowest just before the next. The largest figure is the one to plan with.");
        if !sizes.is_empty() {
            s.line(format!("Sizes of the types that are copied per event and per record: `{sizes}` (bytes).\n"));
        } else {
            s.line("");
        }
        s.verdict(Verdict::new(
            "engine heap per tracked connection, worst case over table fill (counting allocator)",
            format!("≤ {TARGET_BYTES_PER_CONN:.0} B"),
            format!("{worst:.0} B (at 20,000 connections: {typical:.0} B)"),
            Some(worst <= TARGET_BYTES_PER_CONN),
        ));
    }
    Ok(s)
}
