//! `trace` output: timeline records as JSON lines or aligned text.

use std::io::{self, Write};

use serde_json::{json, Map, Value};

use crate::{
    clock::{rfc3339, WallClock},
    container::{CgroupInfo, CgroupResolver},
    event::comm_str,
    timeline::{AckPrecision, EpisodeOutcome, Record, RecordKind},
};

/// Output format of `trace`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned, readable columns (colour on a terminal).
    Text,
    /// One JSON object per line (the stable, scriptable contract).
    Json,
}

/// Symbolic name of an errno value (`ETIMEDOUT`), or the number as text.
pub fn errno_name(errno: i32) -> String {
    let name = match errno {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EINTR => "EINTR",
        libc::EIO => "EIO",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EINVAL => "EINVAL",
        libc::EPIPE => "EPIPE",
        libc::ENETDOWN => "ENETDOWN",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::ENETRESET => "ENETRESET",
        libc::ECONNABORTED => "ECONNABORTED",
        libc::ECONNRESET => "ECONNRESET",
        libc::ENOBUFS => "ENOBUFS",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::EHOSTDOWN => "EHOSTDOWN",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        libc::EPROTO => "EPROTO",
        libc::EMSGSIZE => "EMSGSIZE",
        _ => return errno.to_string(),
    };
    name.to_string()
}

fn outcome_name(o: &EpisodeOutcome) -> &'static str {
    match o {
        EpisodeOutcome::Answered => "answered",
        EpisodeOutcome::TimedOut(_) => "timeout",
        EpisodeOutcome::Reset => "reset",
        EpisodeOutcome::Closed => "closed",
    }
}

/// The record's kind-specific fields.
fn details(kind: &RecordKind) -> Map<String, Value> {
    let mut m = Map::new();
    match kind {
        RecordKind::Opened { state, established } => {
            m.insert("state".into(), json!(state.name()));
            m.insert("established".into(), json!(established));
        }
        RecordKind::Config { settings, source, process: _ } => {
            m.insert("keepalive".into(), json!(settings.keepalive));
            m.insert("idle_s".into(), json!(settings.effective_idle_s()));
            m.insert("intvl_s".into(), json!(settings.effective_intvl_s()));
            m.insert("cnt".into(), json!(settings.effective_cnt()));
            m.insert("user_timeout_ms".into(), json!(settings.user_timeout_ms));
            m.insert("source".into(), json!(source.name()));
            if let crate::timeline::SettingsSource::Setsockopt(opt) = source {
                m.insert("option".into(), json!(opt.name()));
            }
            // Which values are the namespace's sysctl defaults rather than set on the socket.
            let defaults: Vec<&str> = [
                ("idle_s", settings.idle_s.is_none()),
                ("intvl_s", settings.intvl_s.is_none()),
                ("cnt", settings.cnt.is_none()),
            ]
            .iter()
            .filter(|(_, d)| *d)
            .map(|(n, _)| *n)
            .collect();
            m.insert("defaults".into(), json!(defaults));
        }
        RecordKind::Probe { n } => {
            m.insert("probe".into(), json!(n));
        }
        RecordKind::Ack { probes, precision } => {
            m.insert("probes".into(), json!(probes));
            m.insert(
                "precision".into(),
                json!(match precision {
                    AckPrecision::Segment => "segment",
                    AckPrecision::NextFiring => "next_firing",
                }),
            );
        }
        RecordKind::Suppressed { packets_out, unsent } => {
            m.insert("packets_out".into(), json!(packets_out));
            m.insert("unsent".into(), json!(unsent));
        }
        RecordKind::Idle { idle_ms, next_in_ms } => {
            m.insert("idle_ms".into(), json!(idle_ms));
            m.insert("next_in_ms".into(), json!(next_in_ms));
        }
        RecordKind::Busy | RecordKind::FinWait2 | RecordKind::PeerReset => {}
        RecordKind::Timeout { reason, probes } => {
            m.insert("reason".into(), json!(reason.name()));
            m.insert("probes".into(), json!(probes));
        }
        RecordKind::Reset { reason, active } => {
            m.insert("reason".into(), json!(reason));
            m.insert("active".into(), json!(active));
        }
        RecordKind::Error { errno } => {
            m.insert("errno".into(), json!(errno_name(*errno)));
            m.insert("errno_num".into(), json!(errno));
        }
        RecordKind::Close { state } => {
            m.insert("state".into(), json!(state.name()));
        }
        RecordKind::EpisodeEnd(ep) => {
            m.insert("outcome".into(), json!(outcome_name(&ep.outcome)));
            m.insert("probes".into(), json!(ep.probes));
            m.insert(
                "duration_ms".into(),
                json!(ep.end_ns.saturating_sub(ep.start_ns) as f64 / 1e6),
            );
        }
    }
    m
}

/// The process a record is attributed to: the caller for settings changes, else the connection's.
pub fn record_process(rec: &Record) -> Option<crate::event::Process> {
    match &rec.kind {
        RecordKind::Config { process: Some(p), .. } => Some(*p),
        _ => rec.conn.process,
    }
}

/// The JSON object for one record; `cgroup` is the resolved cgroup of its process, if any.
pub fn to_json(rec: &Record, clock: &WallClock, cgroup: Option<&CgroupInfo>) -> Value {
    let mut m = Map::new();
    m.insert("ts".into(), json!(rfc3339(clock.to_unix_ns(rec.ts_ns))));
    m.insert("event".into(), json!(rec.kind.name()));
    m.insert("local".into(), json!(rec.conn.local.to_string()));
    m.insert("remote".into(), json!(rec.conn.remote.to_string()));
    if let Some(p) = record_process(rec) {
        m.insert("pid".into(), json!(p.pid));
        m.insert("comm".into(), json!(comm_str(&p.comm)));
        m.insert("cgroup_id".into(), json!(p.cgroup_id));
    }
    if let Some(cg) = cgroup {
        m.insert("cgroup".into(), json!(cg.path));
        if let Some(id) = &cg.container_id {
            m.insert("container_id".into(), json!(id));
        }
    }
    m.insert("conn".into(), json!(rec.conn.id));
    m.insert("netns".into(), json!(rec.conn.netns));
    m.insert("mono_ns".into(), json!(rec.ts_ns));
    m.extend(details(&rec.kind));
    Value::Object(m)
}

/// Writes records in the chosen format.
pub struct Printer<W: Write> {
    out: W,
    format: Format,
    color: bool,
    cgroups: CgroupResolver,
}

impl<W: Write> Printer<W> {
    pub fn new(out: W, format: Format, color: bool, cgroups: CgroupResolver) -> Self {
        Printer { out, format, color, cgroups }
    }

    pub fn write(&mut self, rec: &Record, clock: &WallClock) -> io::Result<()> {
        match self.format {
            Format::Json => {
                let cg = record_process(rec).and_then(|p| self.cgroups.resolve(p.cgroup_id));
                serde_json::to_writer(&mut self.out, &to_json(rec, clock, cg.as_ref()))?;
                self.out.write_all(b"\n")
            }
            Format::Text => {
                let line = text_line(rec, clock, self.color);
                self.out.write_all(line.as_bytes())?;
                self.out.write_all(b"\n")
            }
        }
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

fn color_of(kind: &RecordKind) -> &'static str {
    match kind {
        RecordKind::Timeout { .. }
        | RecordKind::Reset { .. }
        | RecordKind::PeerReset
        | RecordKind::Error { .. } => "\x1b[31m",
        RecordKind::Probe { .. } | RecordKind::Suppressed { .. } => "\x1b[33m",
        RecordKind::Ack { .. } => "\x1b[32m",
        RecordKind::Config { .. } | RecordKind::Opened { .. } => "\x1b[36m",
        _ => "\x1b[2m",
    }
}

/// One aligned text line: time, event, local → remote, pid/comm, details.
pub fn text_line(rec: &Record, clock: &WallClock, color: bool) -> String {
    let ts = rfc3339(clock.to_unix_ns(rec.ts_ns));
    // HH:MM:SS.uuuuuu from the RFC 3339 form.
    let time = ts.get(11..26).unwrap_or(&ts);
    let who = match rec.conn.process {
        Some(p) => format!("{}/{}", p.pid, comm_str(&p.comm)),
        None => "-".to_string(),
    };
    let mut det = String::new();
    for (k, v) in details(&rec.kind) {
        if !det.is_empty() {
            det.push(' ');
        }
        match v {
            Value::String(s) => det.push_str(&format!("{k}={s}")),
            Value::Array(a) if a.is_empty() => continue,
            other => det.push_str(&format!("{k}={other}")),
        }
    }
    let name = rec.kind.name();
    let (c0, c1) = if color { (color_of(&rec.kind), "\x1b[0m") } else { ("", "") };
    format!(
        "{time} {c0}{name:<10}{c1} {:>22} -> {:<22} {who:<20} {det}",
        rec.conn.local.to_string(),
        rec.conn.remote.to_string()
    )
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::{
        event::{Process, SockSettings},
        timeline::{ConnView, SettingsSource, TimeoutReason},
    };

    fn conn() -> ConnView {
        ConnView {
            id: 7,
            sk: 0xffff_8880_0000_1000,
            netns: 4026531840,
            local: "127.0.0.1:40000".parse::<SocketAddr>().unwrap(),
            remote: "[::1]:5432".parse::<SocketAddr>().unwrap(),
            process: Some(Process { pid: 42, tid: 42, comm: *b"psql\0\0\0\0\0\0\0\0\0\0\0\0", cgroup_id: 1 }),
            first_seen_ns: 1,
        }
    }

    #[test]
    fn json_has_the_contract_keys() {
        let clock = WallClock::with_offset_ns(1_700_000_000_000_000_000);
        let rec = Record {
            ts_ns: 1_500_000_000,
            conn: conn(),
            kind: RecordKind::Timeout { reason: TimeoutReason::Keepalive, probes: 3 },
        };
        let v = to_json(&rec, &clock, None);
        assert_eq!(v["ts"], "2023-11-14T22:13:21.500000Z");
        assert_eq!(v["event"], "timeout");
        assert_eq!(v["local"], "127.0.0.1:40000");
        assert_eq!(v["remote"], "[::1]:5432");
        assert_eq!(v["pid"], 42);
        assert_eq!(v["comm"], "psql");
        assert_eq!(v["reason"], "keepalive");
        assert_eq!(v["probes"], 3);
    }

    #[test]
    fn config_reports_effective_values_and_defaults() {
        let clock = WallClock::with_offset_ns(0);
        let settings = SockSettings {
            keepalive: true,
            idle_s: Some(1),
            intvl_s: None,
            cnt: Some(3),
            user_timeout_ms: 0,
            idle_default_s: 7200,
            intvl_default_s: 75,
            cnt_default: 9,
        };
        let rec = Record {
            ts_ns: 0,
            conn: conn(),
            kind: RecordKind::Config {
                settings,
                source: SettingsSource::Setsockopt(crate::event::SockOpt::KeepCnt),
                process: None,
            },
        };
        let v = to_json(&rec, &clock, None);
        assert_eq!(v["idle_s"], 1);
        assert_eq!(v["intvl_s"], 75);
        assert_eq!(v["cnt"], 3);
        assert_eq!(v["user_timeout_ms"], 0);
        assert_eq!(v["source"], "setsockopt");
        assert_eq!(v["option"], "TCP_KEEPCNT");
        assert_eq!(v["defaults"], json!(["intvl_s"]));
        assert_eq!(v["keepalive"], true);
    }

    #[test]
    fn errno_names() {
        assert_eq!(errno_name(libc::ETIMEDOUT), "ETIMEDOUT");
        assert_eq!(errno_name(9999), "9999");
    }

    #[test]
    fn text_line_is_aligned_and_plain_without_color() {
        let clock = WallClock::with_offset_ns(0);
        let rec = Record { ts_ns: 0, conn: conn(), kind: RecordKind::Probe { n: 2 } };
        let line = text_line(&rec, &clock, false);
        assert!(line.starts_with("00:00:00.000000 probe "), "{line}");
        assert!(line.contains("127.0.0.1:40000 -> [::1]:5432"), "{line}");
        assert!(line.contains("42/psql"));
        assert!(line.ends_with("probe=2"));
        assert!(!line.contains('\x1b'));
    }
}
