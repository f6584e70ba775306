//! `audit` output: a summary grouped by owner, then one line per socket (text, the column
//! conventions of `trace`: fixed columns, then `key=value`), or one JSON object per socket.

use std::{
    collections::HashMap,
    fmt::Write as _,
    io::{self, Write},
};

use serde::Serialize;

use super::{
    diagnose::{self, Diagnosis, DiagnosisId, Policy, Severity, Software},
    model::{AuditedSocket, Setting, Source, TimerKind},
    Audit,
};
use crate::{
    container::{CgroupInfo, CgroupResolver},
    event::comm_str,
    output::Format,
};

/// Which sockets are reported (`--pid`, `--port`, `--container`, `--only-problems`; `--netns`
/// chooses what is walked).
#[derive(Clone, Debug, Default)]
pub struct ReportFilter {
    /// Sockets held by these processes (none: any).
    pub pids: Vec<u32>,
    /// Sockets with one of these local or remote ports (none: any).
    pub ports: Vec<u16>,
    /// A container id or a prefix of one (as `docker ps` shortens them).
    pub container: Option<String>,
    pub only_problems: bool,
}

/// A socket ready to print: its owner's cgroup resolved and its diagnoses found (explained only
/// when printed: the text of 100,000 diagnoses would outweigh the sockets).
struct Row<'a> {
    s: &'a AuditedSocket,
    cgroup: Option<&'a CgroupInfo>,
    findings: Vec<DiagnosisId>,
    software: Software,
}

impl Row<'_> {
    fn container(&self) -> Option<&str> {
        self.cgroup?.container_id.as_deref()
    }

    fn worst(&self) -> Option<Severity> {
        self.findings.iter().map(|d| d.severity()).max()
    }

    fn diagnoses(&self, policy: &Policy) -> Vec<Diagnosis> {
        diagnose::explain(&self.findings, self.s, self.software, policy)
    }
}

/// The JSON object of one socket (the README's contract; keys in this order, every key always
/// present, `null` when unknown). The fields are those of [`AuditedSocket`] under their JSON names.
#[derive(Serialize)]
pub struct SocketJson<'a> {
    pub netns: u32,
    pub local: String,
    pub remote: String,
    pub state: &'static str,
    pub pid: Option<u32>,
    pub comm: Option<&'a str>,
    pub cgroup: Option<&'a str>,
    pub container_id: Option<&'a str>,
    /// The Kubernetes pod's UID and QoS class, when the cgroup follows the kubelet's naming.
    pub pod_uid: Option<&'a str>,
    pub pod_qos: Option<&'static str>,
    pub keepalive: bool,
    pub keepalive_source: Option<Source>,
    pub keepalive_idle_s: u32,
    pub keepalive_idle_source: Source,
    pub keepalive_intvl_s: u32,
    pub keepalive_intvl_source: Source,
    pub keepalive_cnt: u32,
    pub keepalive_cnt_source: Source,
    pub user_timeout_ms: u32,
    pub idle_send_ms: Option<u64>,
    pub idle_recv_ms: u64,
    pub timer: TimerKind,
    pub timer_expires_ms: Option<i64>,
    pub probes_out: u8,
    pub retransmits: u8,
    pub packets_out: u32,
    pub unacked_bytes: u32,
    pub unsent_bytes: u32,
    pub dead_peer_detection_s: Option<u64>,
    pub orphan: bool,
    pub inode: u64,
    pub idle_timeout_s: f64,
    pub diagnoses: &'a [Diagnosis],
}

fn json_of<'a>(row: &'a Row<'a>, policy: &Policy, diagnoses: &'a [Diagnosis]) -> SocketJson<'a> {
    let s = row.s;
    SocketJson {
        netns: s.netns,
        local: s.local.to_string(),
        remote: s.remote.to_string(),
        state: s.state.name(),
        pid: s.owner.map(|o| o.pid),
        comm: s.owner.as_ref().map(|o| comm_str(&o.comm)),
        cgroup: row.cgroup.map(|c| c.path.as_str()),
        container_id: row.container(),
        pod_uid: row.cgroup.and_then(|c| c.pod.as_ref()).map(|p| p.uid.as_str()),
        pod_qos: row.cgroup.and_then(|c| c.pod.as_ref()).map(|p| p.qos.name()),
        keepalive: s.keepalive,
        keepalive_source: s.keepalive.then_some(s.keepalive_source),
        keepalive_idle_s: s.idle.value,
        keepalive_idle_source: s.idle.source,
        keepalive_intvl_s: s.intvl.value,
        keepalive_intvl_source: s.intvl.source,
        keepalive_cnt: s.cnt.value,
        keepalive_cnt_source: s.cnt.source,
        user_timeout_ms: s.user_timeout_ms,
        idle_send_ms: s.idle_send_ms,
        idle_recv_ms: s.idle_recv_ms,
        timer: s.timer,
        timer_expires_ms: s.timer_in_ms,
        probes_out: s.probes_out,
        retransmits: s.retransmits,
        packets_out: s.packets_out,
        unacked_bytes: s.unacked_bytes,
        unsent_bytes: s.unsent_bytes,
        dead_peer_detection_s: s.dead_peer_detection_s(),
        orphan: s.orphan,
        inode: s.inode,
        idle_timeout_s: policy.middlebox.timeout_s,
        diagnoses,
    }
}

/// What a report found, for `--fail-on`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Sockets printed.
    pub reported: usize,
    /// Of those, sockets with at least one diagnosis.
    pub problems: usize,
    /// The worst severity among the reported sockets' diagnoses.
    pub worst: Option<Severity>,
}

/// Prints `audit` in `format` to `out`, with `filter` applied; `color`: ANSI colours (text).
pub fn write_report<W: Write>(
    out: &mut W,
    audit: &Audit,
    policy: &Policy,
    filter: &ReportFilter,
    format: Format,
    color: bool,
    cgroups: &mut CgroupResolver,
) -> io::Result<Outcome> {
    let cgroups = resolve_cgroups(audit, cgroups);
    let rows = rows(audit, policy, filter, &cgroups);
    let outcome = Outcome {
        reported: rows.len(),
        problems: rows.iter().filter(|r| !r.findings.is_empty()).count(),
        worst: rows.iter().filter_map(Row::worst).max(),
    };
    match format {
        Format::Json => {
            for row in &rows {
                let diagnoses = row.diagnoses(policy);
                serde_json::to_writer(&mut *out, &json_of(row, policy, &diagnoses))?;
                out.write_all(b"\n")?;
            }
        }
        Format::Text => {
            write_summary(out, audit, policy, &rows, color)?;
            let mut line = String::with_capacity(512);
            for row in &rows {
                line.clear();
                text_row(&mut line, row, policy, color);
                out.write_all(line.as_bytes())?;
            }
        }
    }
    Ok(outcome)
}

/// Each owner's cgroup, resolved once per cgroup id.
fn resolve_cgroups(audit: &Audit, resolver: &mut CgroupResolver) -> HashMap<u64, CgroupInfo> {
    let mut out = HashMap::new();
    for id in audit.sockets.iter().filter_map(|s| s.owner.map(|o| o.cgroup_id)) {
        if let std::collections::hash_map::Entry::Vacant(e) = out.entry(id) {
            if let Some(info) = resolver.resolve(id) {
                e.insert(info);
            }
        }
    }
    out
}

/// The reported rows, problems first (errors, then warnings), then by idle time, longest first.
fn rows<'a>(
    audit: &'a Audit,
    policy: &Policy,
    filter: &ReportFilter,
    cgroups: &'a HashMap<u64, CgroupInfo>,
) -> Vec<Row<'a>> {
    let mut rows: Vec<Row<'a>> = Vec::new();
    for s in &audit.sockets {
        if !filter.pids.is_empty() && !s.owner.is_some_and(|o| filter.pids.contains(&o.pid)) {
            continue;
        }
        if !filter.ports.is_empty() && !filter.ports.iter().any(|&p| p == s.local.port() || p == s.remote.port()) {
            continue;
        }
        let findings = diagnose::findings(s, policy);
        if filter.only_problems && findings.is_empty() {
            continue;
        }
        let cgroup = s.owner.and_then(|o| cgroups.get(&o.cgroup_id));
        if let Some(want) = &filter.container {
            let id = cgroup.and_then(|c| c.container_id.as_deref());
            if !id.is_some_and(|id| id.starts_with(want.as_str())) {
                continue;
            }
        }
        let software = s.owner.map_or(Software::Unknown, |o| Software::from_comm(comm_str(&o.comm)));
        rows.push(Row { s, cgroup, findings, software });
    }
    rows.sort_by(|a, b| b.worst().cmp(&a.worst()).then(b.s.idle_ms().cmp(&a.s.idle_ms())));
    rows
}

/// `pid/comm`, or `-` without an owner.
fn who(s: &AuditedSocket) -> String {
    s.owner.map_or_else(|| "-".to_string(), |o| format!("{}/{}", o.pid, comm_str(&o.comm)))
}

fn short_container(id: Option<&str>) -> &str {
    id.map_or("-", |id| &id[..id.len().min(12)])
}

/// Per owner (process and container): sockets, sockets with problems, the worst idle time and
/// the count of each diagnosis.
#[derive(Default)]
struct OwnerSummary {
    sockets: usize,
    problems: usize,
    worst_idle_ms: u64,
    counts: HashMap<DiagnosisId, usize>,
}

fn write_summary<W: Write>(out: &mut W, audit: &Audit, policy: &Policy, rows: &[Row<'_>], color: bool) -> io::Result<()> {
    let mut owners: HashMap<(String, String), OwnerSummary> = HashMap::new();
    for row in rows {
        let key = (who(row.s), short_container(row.container()).to_string());
        let o = owners.entry(key).or_default();
        o.sockets += 1;
        o.problems += usize::from(!row.findings.is_empty());
        o.worst_idle_ms = o.worst_idle_ms.max(row.s.idle_ms());
        for id in &row.findings {
            *o.counts.entry(*id).or_default() += 1;
        }
    }
    let mut owners: Vec<_> = owners.into_iter().collect();
    owners.sort_by(|a, b| b.1.problems.cmp(&a.1.problems).then(b.1.sockets.cmp(&a.1.sockets)).then(a.0.cmp(&b.0)));
    let problems = rows.iter().filter(|r| !r.findings.is_empty()).count();
    let mut text = format!(
        "audit: {} sockets reported ({} audited in {} network namespaces, walk {:.1} ms, owners {:.1} ms), {problems} with problems\n",
        rows.len(),
        audit.sockets.len(),
        audit.namespaces,
        audit.walk_time.as_secs_f64() * 1000.0,
        audit.owner_time.as_secs_f64() * 1000.0,
    );
    if audit.over_limit > 0 {
        let _ = writeln!(text, "NOT AUDITED: {} sockets past --max-sockets", audit.over_limit);
    }
    let _ = writeln!(text, "middlebox idle timeout: {}", policy.middlebox);
    let _ = writeln!(text, "dead-peer detection target: {} s (--detect-within)\n", policy.detect_within_s);
    let _ = writeln!(text, "{:<28} {:<12} {:>7} {:>8} {:>11}  DIAGNOSES", "OWNER", "CONTAINER", "SOCKETS", "PROBLEMS", "WORST_IDLE");
    for ((who, container), o) in &owners {
        let mut counts: Vec<_> = o.counts.iter().collect();
        counts.sort();
        let diag = if counts.is_empty() {
            "-".to_string()
        } else {
            counts.iter().map(|(id, n)| format!("{}={n}", id.name())).collect::<Vec<_>>().join(" ")
        };
        let (c0, c1) = paint(color, if o.problems > 0 { Some(Severity::Warning) } else { None });
        let _ = writeln!(
            text,
            "{who:<28} {container:<12} {:>7} {c0}{:>8}{c1} {:>10.1}s  {diag}",
            o.sockets,
            o.problems,
            o.worst_idle_ms as f64 / 1000.0
        );
    }
    text.push('\n');
    out.write_all(text.as_bytes())
}

/// The colour codes for a severity (none: healthy, green).
fn paint(color: bool, severity: Option<Severity>) -> (&'static str, &'static str) {
    if !color {
        return ("", "");
    }
    let c0 = match severity {
        Some(Severity::Error) => "\x1b[31m",
        Some(Severity::Warning) => "\x1b[33m",
        None => "\x1b[32m",
    };
    (c0, "\x1b[0m")
}

fn source_tag(src: Source) -> &'static str {
    match src {
        Source::Socket => "socket",
        Source::Inherited => "inherited",
        Source::Sysctl => "sysctl",
    }
}

fn setting(line: &mut String, key: &str, s: Setting, unit: &str) {
    let _ = write!(line, " {key}={}{unit}({})", s.value, source_tag(s.source));
}

/// One socket: state, local -> remote, owner, then `key=value` fields; its diagnoses follow on
/// indented lines (`! severity id: message`, `  fix: ...`).
fn text_row(line: &mut String, row: &Row<'_>, policy: &Policy, color: bool) {
    let s = row.s;
    let (c0, c1) = paint(color, row.worst());
    let _ = write!(
        line,
        "{c0}{:<11}{c1} {:>22} -> {:<22} {:<20} container={}",
        s.state.name(),
        s.local.to_string(),
        s.remote.to_string(),
        who(s),
        short_container(row.container())
    );
    let ka = if s.keepalive { format!("on({})", source_tag(s.keepalive_source)) } else { "off".into() };
    let _ = write!(line, " keepalive={ka}");
    setting(line, "idle", s.idle, "s");
    setting(line, "intvl", s.intvl, "s");
    setting(line, "cnt", s.cnt, "");
    if s.user_timeout_ms > 0 {
        let _ = write!(line, " user_timeout={}ms", s.user_timeout_ms);
    }
    if let Some(ms) = s.idle_send_ms {
        let _ = write!(line, " idle_send={:.1}s", ms as f64 / 1000.0);
    }
    let _ = write!(line, " idle_recv={:.1}s timer={}", s.idle_recv_ms as f64 / 1000.0, s.timer.name());
    if let Some(ms) = s.timer_in_ms {
        let _ = write!(line, "({:.1}s)", ms as f64 / 1000.0);
    }
    let _ = write!(line, " probes={} unacked={} unsent={}", s.probes_out, s.unacked_bytes, s.unsent_bytes);
    if s.retransmits > 0 {
        let _ = write!(line, " retrans={}", s.retransmits);
    }
    if let Some(d) = s.dead_peer_detection_s() {
        let _ = write!(line, " detect={d}s");
    }
    line.push_str(" netns=");
    let _ = write!(line, "{}", s.netns);
    line.push('\n');
    for d in row.diagnoses(policy) {
        let (c0, c1) = paint(color, Some(d.severity));
        let _ = writeln!(line, "    {c0}! {} {}{c1}: {}", d.severity.name(), d.id.name(), d.message);
        let _ = writeln!(line, "      fix: {}", d.fix);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{
        middlebox::Middlebox,
        model::tests::{convert_all, record},
    };

    fn audit_of_two() -> Audit {
        let mut idle = record();
        idle.sport = 40001;
        idle.lsndtime = 1_000_000 - 250 * 200;
        idle.lrcvtime = idle.lsndtime;
        idle.rcv_tstamp = idle.lsndtime;
        Audit { sockets: convert_all(&[record(), idle]), namespaces: 1, ..Audit::default() }
    }

    fn policy() -> Policy {
        Policy { middlebox: Middlebox::default_preset(), detect_within_s: 900 }
    }

    fn report(filter: &ReportFilter, format: Format) -> (String, Outcome) {
        let mut out = Vec::new();
        let mut cg = CgroupResolver::new(None);
        let o = write_report(&mut out, &audit_of_two(), &policy(), filter, format, false, &mut cg).unwrap();
        (String::from_utf8(out).unwrap(), o)
    }

    #[test]
    fn text_has_summary_then_rows_problems_first() {
        let (text, o) = report(&ReportFilter::default(), Format::Text);
        assert_eq!(o, Outcome { reported: 2, problems: 1, worst: Some(Severity::Warning) });
        assert!(text.starts_with("audit: 2 sockets reported"), "{text}");
        assert!(text.contains("middlebox idle timeout: 240 s (default: Azure Load Balancer"), "{text}");
        assert!(text.contains("keepalive_off_idle=1"), "{text}");
        let first = text.lines().position(|l| l.starts_with("ESTABLISHED")).unwrap();
        assert!(text.lines().nth(first).unwrap().contains(":40001"), "{text}");
        assert!(text.lines().nth(first + 1).unwrap().contains("! warning keepalive_off_idle"), "{text}");
        assert!(text.lines().nth(first + 2).unwrap().trim_start().starts_with("fix: "), "{text}");
    }

    #[test]
    fn json_keys_in_stable_order() {
        let (text, _) = report(&ReportFilter { only_problems: true, ..ReportFilter::default() }, Format::Json);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1, "{text}");
        let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        let mut by_pos: Vec<(usize, &str)> = keys.iter().map(|k| (lines[0].find(&format!("\"{k}\":")).unwrap(), *k)).collect();
        by_pos.sort();
        let order: Vec<&str> = by_pos.into_iter().map(|(_, k)| k).collect();
        assert_eq!(order[..5], ["netns", "local", "remote", "state", "pid"]);
        assert_eq!(*order.last().unwrap(), "diagnoses");
        assert_eq!(v["diagnoses"][0]["id"], "keepalive_off_idle");
        assert_eq!(v["keepalive_idle_source"], "sysctl");
        assert_eq!(v["pid"], serde_json::Value::Null);
    }

    #[test]
    fn filters() {
        let (text, o) = report(&ReportFilter { ports: vec![40000], ..ReportFilter::default() }, Format::Json);
        assert_eq!((o.reported, o.problems), (1, 0), "{text}");
        let (_, o) = report(&ReportFilter { pids: vec![1], ..ReportFilter::default() }, Format::Json);
        assert_eq!(o.reported, 0);
        let (_, o) = report(&ReportFilter { container: Some("ab".into()), ..ReportFilter::default() }, Format::Json);
        assert_eq!(o.reported, 0);
    }
}
