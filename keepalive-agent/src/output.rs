//! `trace` output: timeline records as JSON lines or aligned text.
//!
//! Both formats come from the same typed [`Record`]: [`write_json_line`] writes its JSON line
//! straight into the output buffer ([`JsonRecord`], its serde form, is the reference it is tested
//! against), and [`text_line`] writes the same fields as `key=value`. The fields of each kind and
//! their order are defined once, by [`RecordKind::fields`].

use std::{
    fmt::{self, Write as _},
    io::{self, Write},
};

use serde::{ser::SerializeMap, Serialize, Serializer};

use crate::{
    clock::{Rfc3339, WallClock},
    container::{CgroupInfo, CgroupResolver},
    event::{comm_str, Process},
    json_text,
    timeline::{FieldSink, FieldValue, Record, RecordKind},
};

/// Output format of `trace`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned, readable columns (colour on a terminal).
    Text,
    /// One JSON object per line (the stable, scriptable contract).
    Json,
}

/// The process a record is attributed to: the caller for settings changes, else the connection's.
pub fn record_process(rec: &Record) -> Option<Process> {
    match &rec.kind {
        RecordKind::Config { process: Some(p), .. } => Some(*p),
        _ => rec.conn.process,
    }
}

/// Serialises a socket address as `a.b.c.d:port` (IPv4, written with `itoa` into a stack buffer:
/// `Display` goes through the formatting machinery per octet, a tenth of a record's cost in
/// `trace`) or by its `Display` form (IPv6).
struct Addr<'a>(&'a std::net::SocketAddr);

impl Addr<'_> {
    /// Writes the IPv4 text through `put` (`false` for IPv6: nothing written). Octets by hand
    /// (at most three digits), the port with `itoa`.
    fn write_v4(&self, mut put: impl FnMut(&[u8])) -> bool {
        let std::net::SocketAddr::V4(v4) = self.0 else { return false };
        for (i, octet) in v4.ip().octets().into_iter().enumerate() {
            if i > 0 {
                put(b".");
            }
            let digits = [b'0' + octet / 100, b'0' + octet / 10 % 10, b'0' + octet % 10];
            let skip = if octet >= 100 { 0 } else if octet >= 10 { 1 } else { 2 };
            put(&digits[skip..]);
        }
        put(b":");
        put(itoa::Buffer::new().format(v4.port()).as_bytes());
        true
    }

    /// The IPv4 text in `buf` (`None` for IPv6).
    fn v4_text<'b>(&self, buf: &'b mut [u8; 21]) -> Option<&'b str> {
        let mut len = 0;
        let v4 = self.write_v4(|bytes| {
            buf[len..len + bytes.len()].copy_from_slice(bytes);
            len += bytes.len();
        });
        // Digits, dots and a colon only.
        v4.then(|| std::str::from_utf8(&buf[..len]).ok()).flatten()
    }
}

impl Serialize for Addr<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.v4_text(&mut [0; 21]) {
            Some(text) => s.serialize_str(text),
            None => s.collect_str(self.0),
        }
    }
}

/// Writes the JSON line of one record (without its newline) into `buf`: the bytes [`JsonRecord`]
/// serialises, written directly. Keys are the contract's identifiers (nothing to escape); values
/// go through [`json_text`], as the span lines' do. About a third cheaper than the serde map,
/// which `trace` pays once per line.
pub fn write_json_line(buf: &mut Vec<u8>, rec: &Record, unix_ns: i128, cgroup: Option<&CgroupInfo>) {
    // Room for a whole line at once (most are under 400 bytes): no growth check per field.
    buf.reserve(512);
    let mut w = JsonLine(buf);
    w.0.extend_from_slice(b"{\"ts\":");
    json_text::time(w.0, unix_ns);
    w.key("event");
    json_text::plain(w.0, rec.kind.name());
    w.key("local");
    w.addr(&rec.conn.local);
    w.key("remote");
    w.addr(&rec.conn.remote);
    let process = record_process(rec);
    if let Some(p) = &process {
        w.key("pid");
        w.int(p.pid);
        w.key("comm");
        w.str(comm_str(&p.comm));
    }
    let Ok(()) = rec.kind.fields(&mut w);
    w.key("conn");
    w.int(rec.conn.id);
    w.key("netns");
    w.int(rec.conn.netns);
    if let Some(p) = &process {
        w.key("cgroup_id");
        w.int(p.cgroup_id);
    }
    if let Some(cg) = cgroup {
        w.key("cgroup");
        w.str(&cg.path);
        if let Some(id) = &cg.container_id {
            w.key("container_id");
            w.str(id);
        }
        if let Some(pod) = &cg.pod {
            w.key("pod_uid");
            w.str(&pod.uid);
            w.key("pod_qos");
            w.str(pod.qos.name());
        }
    }
    w.key("mono_ns");
    w.int(rec.ts_ns);
    w.0.push(b'}');
}

/// The JSON object being written by [`write_json_line`] (its first key already written).
struct JsonLine<'b>(&'b mut Vec<u8>);

impl JsonLine<'_> {
    /// `,"key":` — keys are fixed identifiers of the contract (no escaping needed).
    fn key(&mut self, key: &str) {
        debug_assert!(key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'), "{key}");
        self.0.extend_from_slice(b",\"");
        self.0.extend_from_slice(key.as_bytes());
        self.0.extend_from_slice(b"\":");
    }

    fn str(&mut self, s: &str) {
        json_text::string(self.0, s);
    }

    fn int(&mut self, i: impl itoa::Integer) {
        json_text::int(self.0, i);
    }

    /// Written straight into the line (IPv4), not through a text buffer.
    fn addr(&mut self, a: &std::net::SocketAddr) {
        if a.is_ipv4() {
            self.0.push(b'"');
            Addr(a).write_v4(|bytes| self.0.extend_from_slice(bytes));
            self.0.push(b'"');
        } else {
            json_text::serde(self.0, &Addr(a));
        }
    }
}

impl FieldSink for JsonLine<'_> {
    type Error = std::convert::Infallible;
    fn field(&mut self, key: &'static str, value: FieldValue<'_>) -> Result<(), Self::Error> {
        self.key(key);
        match value {
            FieldValue::U64(v) => self.int(v),
            FieldValue::I64(v) => self.int(v),
            FieldValue::F64(v) => json_text::serde(self.0, &v),
            FieldValue::Bool(v) => self.0.extend_from_slice(if v { b"true" } else { b"false" }),
            FieldValue::Str(v) => self.str(v),
            FieldValue::Strs(v) => {
                self.0.push(b'[');
                for (i, s) in v.iter().enumerate() {
                    if i > 0 {
                        self.0.push(b',');
                    }
                    self.str(s);
                }
                self.0.push(b']');
            }
            FieldValue::OptU64(Some(v)) => self.int(v),
            FieldValue::OptU64(None) => self.0.extend_from_slice(b"null"),
        }
        Ok(())
    }
}

impl Serialize for FieldValue<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match *self {
            FieldValue::U64(v) => s.serialize_u64(v),
            FieldValue::I64(v) => s.serialize_i64(v),
            FieldValue::F64(v) => s.serialize_f64(v),
            FieldValue::Bool(v) => s.serialize_bool(v),
            FieldValue::Str(v) => s.serialize_str(v),
            FieldValue::Strs(v) => v.serialize(s),
            FieldValue::OptU64(v) => v.serialize(s),
        }
    }
}

/// Adds a record's kind fields to a serde map.
struct MapFields<'m, M>(&'m mut M);

impl<M: SerializeMap> FieldSink for MapFields<'_, M> {
    type Error = M::Error;
    fn field(&mut self, key: &'static str, value: FieldValue<'_>) -> Result<(), M::Error> {
        self.0.serialize_entry(key, &value)
    }
}

/// The JSON line of one record (the README's contract), as serde serialises it: the reference
/// [`write_json_line`] is tested against. Keys in a stable order: `ts`, `event`,
/// `local`, `remote`, `pid`, `comm`, the kind's keys, then `conn`, `netns`, `cgroup_id`,
/// `cgroup`, `container_id`, `pod_uid`, `pod_qos`, `mono_ns`.
pub struct JsonRecord<'a> {
    pub rec: &'a Record,
    /// The record's time as Unix ns.
    pub unix_ns: i128,
    /// The resolved cgroup of the record's process, if any.
    pub cgroup: Option<&'a CgroupInfo>,
}

impl Serialize for JsonRecord<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let rec = self.rec;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("ts", &Rfc3339(self.unix_ns))?;
        m.serialize_entry("event", rec.kind.name())?;
        m.serialize_entry("local", &Addr(&rec.conn.local))?;
        m.serialize_entry("remote", &Addr(&rec.conn.remote))?;
        let process = record_process(rec);
        if let Some(p) = &process {
            m.serialize_entry("pid", &p.pid)?;
            m.serialize_entry("comm", comm_str(&p.comm))?;
        }
        rec.kind.fields(&mut MapFields(&mut m))?;
        m.serialize_entry("conn", &rec.conn.id)?;
        m.serialize_entry("netns", &rec.conn.netns)?;
        if let Some(p) = &process {
            m.serialize_entry("cgroup_id", &p.cgroup_id)?;
        }
        if let Some(cg) = self.cgroup {
            m.serialize_entry("cgroup", &cg.path)?;
            if let Some(id) = &cg.container_id {
                m.serialize_entry("container_id", id)?;
            }
            if let Some(pod) = &cg.pod {
                m.serialize_entry("pod_uid", &pod.uid)?;
                m.serialize_entry("pod_qos", pod.qos.name())?;
            }
        }
        m.serialize_entry("mono_ns", &rec.ts_ns)?;
        m.end()
    }
}

/// Writes records in the chosen format.
pub struct Printer<W: Write> {
    out: W,
    format: Format,
    color: bool,
    cgroups: CgroupResolver,
    line: String,
    /// One JSON line, serialised here and written with one call (cheaper than many small writes
    /// into the output's buffer).
    json: Vec<u8>,
}

impl<W: Write> Printer<W> {
    pub fn new(out: W, format: Format, color: bool, cgroups: CgroupResolver) -> Self {
        Printer { out, format, color, cgroups, line: String::with_capacity(256), json: Vec::with_capacity(512) }
    }

    pub fn write(&mut self, rec: &Record, clock: &WallClock) -> io::Result<()> {
        let unix_ns = clock.to_unix_ns(rec.ts_ns);
        match self.format {
            Format::Json => {
                let cgroup = record_process(rec).and_then(|p| self.cgroups.resolve_ref(p.cgroup_id));
                self.json.clear();
                write_json_line(&mut self.json, rec, unix_ns, cgroup);
                self.json.push(b'\n');
                self.out.write_all(&self.json)
            }
            Format::Text => {
                self.line.clear();
                write_text_line(&mut self.line, rec, unix_ns, self.color);
                self.line.push('\n');
                self.out.write_all(self.line.as_bytes())
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
        | RecordKind::PeerReset { .. }
        | RecordKind::ReuseRace { .. }
        | RecordKind::Error { .. } => "\x1b[31m",
        RecordKind::Probe { .. } | RecordKind::UnseenProbes { .. } | RecordKind::Suppressed { .. } => "\x1b[33m",
        RecordKind::Ack { .. } => "\x1b[32m",
        RecordKind::Config { .. } | RecordKind::Opened { .. } => "\x1b[36m",
        _ => "\x1b[2m",
    }
}

/// Writes a record's kind fields as ` key=value` (lists comma-separated; empty lists and absent
/// values left out).
struct TextFields<'s>(&'s mut String);

impl FieldSink for TextFields<'_> {
    type Error = fmt::Error;
    fn field(&mut self, key: &'static str, value: FieldValue<'_>) -> fmt::Result {
        let out = &mut *self.0;
        match value {
            FieldValue::Strs([]) | FieldValue::OptU64(None) => Ok(()),
            FieldValue::U64(v) | FieldValue::OptU64(Some(v)) => write!(out, " {key}={v}"),
            FieldValue::I64(v) => write!(out, " {key}={v}"),
            FieldValue::F64(v) => write!(out, " {key}={v}"),
            FieldValue::Bool(v) => write!(out, " {key}={v}"),
            FieldValue::Str(v) => write!(out, " {key}={v}"),
            FieldValue::Strs(v) => write!(out, " {key}={}", v.join(",")),
        }
    }
}

/// One aligned text line (no newline): time, event, local -> remote, pid/comm, then the kind's
/// fields as `key=value`. No trailing space.
pub fn text_line(rec: &Record, clock: &WallClock, color: bool) -> String {
    let mut line = String::new();
    write_text_line(&mut line, rec, clock.to_unix_ns(rec.ts_ns), color);
    line
}

fn write_text_line(line: &mut String, rec: &Record, unix_ns: i128, color: bool) {
    let ts = Rfc3339(unix_ns).to_string();
    // HH:MM:SS.uuuuuu from the RFC 3339 form.
    let time = ts.get(11..26).unwrap_or(&ts);
    let who = match record_process(rec) {
        Some(p) => format!("{}/{}", p.pid, comm_str(&p.comm)),
        None => "-".to_string(),
    };
    let name = rec.kind.name();
    let (c0, c1) = if color { (color_of(&rec.kind), "\x1b[0m") } else { ("", "") };
    let _ = write!(
        line,
        "{time} {c0}{name:<10}{c1} {:>22} -> {:<22} {who:<20}",
        rec.conn.local.to_string(),
        rec.conn.remote.to_string(),
    );
    let _ = rec.kind.fields(&mut TextFields(line));
    let end = line.trim_end().len();
    line.truncate(end);
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use serde_json::{json, Value};

    use super::*;
    use crate::{
        event::{Process, SockSettings},
        timeline::{ConnView, Episode, EpisodeOutcome, SettingsSource, TimeoutReason, UntrackReason},
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

    fn json_of(rec: &Record, clock: &WallClock) -> (String, Value) {
        let line = JsonRecord { rec, unix_ns: clock.to_unix_ns(rec.ts_ns), cgroup: None };
        let text = serde_json::to_string(&line).unwrap();
        let v = serde_json::from_str(&text).unwrap();
        (text, v)
    }

    fn keys(text: &str) -> Vec<String> {
        // serde_json keeps insertion order only with `preserve_order`; read the keys off the text.
        let v: serde_json::Map<String, Value> = serde_json::from_str(text).unwrap();
        let mut ks: Vec<(usize, String)> = v.keys().map(|k| (text.find(&format!("\"{k}\":")).unwrap(), k.clone())).collect();
        ks.sort();
        ks.into_iter().map(|(_, k)| k).collect()
    }

    /// One record of every kind, with the values that take each path of the writer (floats,
    /// lists, nulls, strings that need escapes, IPv6).
    fn every_kind() -> Vec<RecordKind> {
        use crate::event::{SockOpt, TcpState};
        use crate::timeline::{AckPrecision, ClosedBy, Idle};
        let settings = SockSettings { keepalive: true, idle_s: Some(1), cnt: None, ..SockSettings::default() };
        let idle = Some(Idle { idle_ms: 3, since_received_ms: 4, since_sent_ms: 5 });
        let ep = Episode {
            number: 2,
            start_ns: 1_000_000_000,
            end_ns: 1_000_123_457,
            probes: 3,
            outcome: EpisodeOutcome::Answered(AckPrecision::NextFiring),
            probe_ts_ns: smallvec::smallvec![1_000_000_000],
            first_timed_probe: 1,
        };
        let p = Process { pid: 9, tid: 10, comm: *b"a\"b\\c\x01d\0\0\0\0\0\0\0\0\0", cgroup_id: 3 };
        vec![
            RecordKind::Opened { state: TcpState::Established, established: false },
            RecordKind::Config { settings, source: SettingsSource::Setsockopt(SockOpt::KeepIdle), process: Some(p) },
            RecordKind::Config { settings, source: SettingsSource::Default, process: None },
            RecordKind::Probe { n: 4_000_000_000 },
            RecordKind::UnseenProbes { first: 1, last: 2 },
            RecordKind::Ack { probes: 1, precision: AckPrecision::Segment },
            RecordKind::Suppressed { packets_out: 1, unsent: 2 },
            RecordKind::Idle { idle_ms: 5, next_in_ms: None },
            RecordKind::Idle { idle_ms: 5, next_in_ms: Some(6) },
            RecordKind::Busy,
            RecordKind::FinWait2,
            RecordKind::Timeout { reason: TimeoutReason::Retransmit, probes: 15, idle },
            RecordKind::Timeout { reason: TimeoutReason::UserTimeout, probes: 2, idle: None },
            RecordKind::Reset { reason: "weird \"reason\"\n".into(), active: true, death: true },
            RecordKind::Reset { reason: "tcp_keepalive_timeout".into(), active: false, death: false },
            RecordKind::PeerReset { idle },
            RecordKind::ReuseRace { peer_idle_ms: 1, write_after_ms: 2, bytes: 3 },
            RecordKind::Error { errno: -5, death: true },
            RecordKind::Error { errno: 110, death: false },
            RecordKind::Close { state: TcpState::CloseWait, closed_by: Some(ClosedBy::Peer), idle },
            RecordKind::Close { state: TcpState::Established, closed_by: None, idle: None },
            RecordKind::Untracked { reason: UntrackReason::Gone, state: TcpState::FinWait1 },
            RecordKind::EpisodeEnd(ep),
        ]
    }

    #[test]
    fn the_direct_writer_prints_what_serde_prints() {
        use crate::k8s::{Pod, QosClass};
        let plain = CgroupInfo { path: "/system.slice/x.service".into(), container_id: None, pod: None };
        let pod = CgroupInfo {
            path: "/kubepods/burstable/pod\u{e9}\"x".into(),
            container_id: Some("ab".repeat(32)),
            pod: Some(Pod { uid: "1-2".into(), qos: QosClass::Burstable }),
        };
        let mut v6 = conn();
        (v6.local, v6.remote) = ("[fe80::1]:5".parse().unwrap(), "[::1]:80".parse().unwrap());
        let mut anonymous = conn();
        anonymous.process = None;
        let mut n = 0;
        for kind in every_kind() {
            for c in [conn(), v6, anonymous] {
                for cgroup in [None, Some(&plain), Some(&pod)] {
                    for unix_ns in [1_700_000_000_123_456_789i128, -1, i128::from(i64::MAX) * 1_000_000_000] {
                        let rec = Record { ts_ns: 1_500_000_000, conn: c, kind: kind.clone() };
                        let want = serde_json::to_vec(&JsonRecord { rec: &rec, unix_ns, cgroup }).unwrap();
                        let mut got = Vec::new();
                        write_json_line(&mut got, &rec, unix_ns, cgroup);
                        assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(&want));
                        n += 1;
                    }
                }
            }
        }
        assert_eq!(n, every_kind().len() * 27);
    }

    #[test]
    fn json_lines_write_addresses_as_display_does() {
        for a in ["0.0.0.0:0", "127.0.0.1:8080", "255.255.255.255:65535", "10.1.22.3:443", "9.99.100.109:1", "[::1]:80"] {
            let addr: std::net::SocketAddr = a.parse().unwrap();
            let mut line = Vec::new();
            super::JsonLine(&mut line).addr(&addr);
            assert_eq!(String::from_utf8(line).unwrap(), format!("\"{addr}\""));
        }
    }

    #[test]
    fn addresses_serialise_as_display_does() {
        for a in ["0.0.0.0:0", "127.0.0.1:8080", "255.255.255.255:65535", "10.1.22.3:443", "[::1]:80", "[fe80::1]:5"] {
            let addr: std::net::SocketAddr = a.parse().unwrap();
            assert_eq!(serde_json::to_string(&super::Addr(&addr)).unwrap(), format!("\"{addr}\""));
        }
    }

    #[test]
    fn json_has_the_contract_keys_in_order() {
        let clock = WallClock::with_offset_ns(1_700_000_000_000_000_000);
        let rec = Record {
            ts_ns: 1_500_000_000,
            conn: conn(),
            kind: RecordKind::Timeout { reason: TimeoutReason::Keepalive, probes: 3, idle: None },
        };
        let (text, v) = json_of(&rec, &clock);
        assert_eq!(v["ts"], "2023-11-14T22:13:21.500000Z");
        assert_eq!(v["event"], "timeout");
        assert_eq!(v["local"], "127.0.0.1:40000");
        assert_eq!(v["remote"], "[::1]:5432");
        assert_eq!(v["pid"], 42);
        assert_eq!(v["comm"], "psql");
        assert_eq!(v["reason"], "keepalive");
        assert_eq!(v["probes"], 3);
        assert!(v["idle_ms"].is_null(), "a keep-alive timer death reads no idle times from the socket");
        assert_eq!(
            keys(&text),
            [
                "ts", "event", "local", "remote", "pid", "comm", "reason", "probes", "idle_ms", "since_received_ms",
                "since_sent_ms", "conn", "netns", "cgroup_id", "mono_ns"
            ]
        );
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
        let (_, v) = json_of(&rec, &clock);
        assert_eq!(v["idle_s"], 1);
        assert_eq!(v["intvl_s"], 75);
        assert_eq!(v["cnt"], 3);
        assert_eq!(v["user_timeout_ms"], 0);
        assert_eq!(v["source"], "setsockopt");
        assert_eq!(v["option"], "TCP_KEEPCNT");
        assert_eq!(v["defaults"], json!(["intvl_s"]));
        assert_eq!(v["keepalive"], true);
        let line = text_line(&rec, &clock, false);
        assert!(line.ends_with("source=setsockopt option=TCP_KEEPCNT defaults=intvl_s"), "{line}");
    }

    #[test]
    fn error_untracked_and_episode_fields() {
        let clock = WallClock::with_offset_ns(0);
        let mk = |kind| Record { ts_ns: 0, conn: conn(), kind };
        let (_, v) = json_of(&mk(RecordKind::Error { errno: libc::ETIMEDOUT, death: false }), &clock);
        assert_eq!((v["errno"].as_str(), v["errno_num"].as_i64()), (Some("ETIMEDOUT"), Some(110)));
        let (_, v) = json_of(&mk(RecordKind::Error { errno: 9999, death: false }), &clock);
        assert_eq!(v["errno"], "9999");
        let untracked = RecordKind::Untracked { reason: UntrackReason::Destroyed, state: crate::event::TcpState::Established };
        let (_, v) = json_of(&mk(untracked), &clock);
        assert_eq!((v["event"].as_str(), v["reason"].as_str(), v["state"].as_str()), (Some("untracked"), Some("destroyed"), Some("ESTABLISHED")));
        let ep = Episode {
            number: 2,
            start_ns: 0,
            end_ns: 1_500_000,
            probes: 1,
            outcome: EpisodeOutcome::Answered(crate::timeline::AckPrecision::Segment),
            probe_ts_ns: smallvec::smallvec![0],
            first_timed_probe: 1,
        };
        let (_, v) = json_of(&mk(RecordKind::EpisodeEnd(ep)), &clock);
        assert_eq!(v["outcome"], "answered");
        assert_eq!(v["episode"], 2);
        assert_eq!(v["duration_ms"], 1.5);
    }

    #[test]
    fn text_line_is_aligned_and_plain_without_color() {
        let clock = WallClock::with_offset_ns(0);
        let rec = Record { ts_ns: 0, conn: conn(), kind: RecordKind::Probe { n: 2 } };
        let line = text_line(&rec, &clock, false);
        assert!(line.starts_with("00:00:00.000000 probe "), "{line}");
        assert!(line.contains("127.0.0.1:40000 -> [::1]:5432"), "{line}");
        assert!(line.contains("42/psql"));
        assert!(line.ends_with(" probe=2"), "{line}");
        assert!(!line.contains('\x1b'));
        // No stray trailing spaces when a kind has no fields; absent values are left out.
        let busy = text_line(&Record { ts_ns: 0, conn: conn(), kind: RecordKind::Busy }, &clock, false);
        assert_eq!(busy, busy.trim_end());
        let idle = RecordKind::Idle { idle_ms: 5, next_in_ms: None };
        let idle = text_line(&Record { ts_ns: 0, conn: conn(), kind: idle }, &clock, false);
        assert!(idle.ends_with(" idle_ms=5"), "{idle}");
    }
}
