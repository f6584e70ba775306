//! Diagnoses: what will go wrong with a socket, judged against the middlebox idle timeout and
//! the dead-peer detection target. Pure functions of an [`AuditedSocket`] and a [`Policy`].

use std::fmt::Write as _;

use serde::Serialize;

use super::{
    middlebox::Middlebox,
    model::{AuditedSocket, Source},
};
use crate::event::TcpState;

/// What the audit judges against.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    pub middlebox: Middlebox,
    /// `--detect-within`: longest acceptable dead-peer detection, seconds.
    pub detect_within_s: u64,
}

/// Default `--detect-within`: 15 minutes, the retransmission budget people already suffer.
pub const DEFAULT_DETECT_WITHIN_S: u64 = 900;

/// Stable diagnosis ids (JSON, scripts, metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DiagnosisId {
    KeepaliveOffIdle,
    KeepaliveTooLate,
    StuckWithoutUserTimeout,
    ProbesUnanswered,
    CloseWaitIdle,
    SlowDeadPeerDetection,
}

impl DiagnosisId {
    /// Every diagnosis, in the order diagnoses are listed.
    pub const ALL: [DiagnosisId; 6] = [
        DiagnosisId::KeepaliveOffIdle,
        DiagnosisId::KeepaliveTooLate,
        DiagnosisId::StuckWithoutUserTimeout,
        DiagnosisId::ProbesUnanswered,
        DiagnosisId::CloseWaitIdle,
        DiagnosisId::SlowDeadPeerDetection,
    ];

    /// The stable id (JSON, scripts, the metric's `keepalive.diagnosis`).
    pub fn name(self) -> &'static str {
        match self {
            DiagnosisId::KeepaliveOffIdle => "keepalive_off_idle",
            DiagnosisId::KeepaliveTooLate => "keepalive_too_late",
            DiagnosisId::StuckWithoutUserTimeout => "stuck_without_user_timeout",
            DiagnosisId::ProbesUnanswered => "probes_unanswered",
            DiagnosisId::CloseWaitIdle => "close_wait_idle",
            DiagnosisId::SlowDeadPeerDetection => "slow_dead_peer_detection",
        }
    }

    /// Errors: the connection is failing now. Warnings: it will fail silently when the path or
    /// the peer does.
    pub fn severity(self) -> Severity {
        match self {
            DiagnosisId::StuckWithoutUserTimeout | DiagnosisId::ProbesUnanswered => Severity::Error,
            _ => Severity::Warning,
        }
    }
}

/// How bad a diagnosis is (`--fail-on`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Warning,
    Error,
}

impl Severity {
    /// The JSON and text spelling.
    pub fn name(self) -> &'static str {
        match self {
            Severity::Warning => "warning",
            Severity::Error => "error",
        }
    }
}

/// One diagnosis with its explanation and fix (JSON keys in this order).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Diagnosis {
    pub id: DiagnosisId,
    pub severity: Severity,
    /// One line: what will go wrong and why, with this socket's numbers.
    pub message: String,
    /// What to change, naming the knob of the owner's software where it can be told.
    pub fix: String,
}

/// Software whose keep-alive knob the fix can name, told from the owner's process name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Software {
    Redis,
    Nginx,
    Postgres,
    Libpq,
    Node,
    Java,
    Python,
    Unknown,
}

impl Software {
    /// From a process name (`comm`).
    pub fn from_comm(comm: &str) -> Software {
        match comm {
            c if c.starts_with("redis") => Software::Redis,
            c if c.starts_with("nginx") => Software::Nginx,
            "postgres" | "postmaster" => Software::Postgres,
            "psql" | "pg_dump" | "pgbench" | "pg_basebackup" => Software::Libpq,
            "node" | "nodejs" => Software::Node,
            "java" => Software::Java,
            c if c.starts_with("python") => Software::Python,
            _ => Software::Unknown,
        }
    }
}

/// The diagnoses of `s`, in [`DiagnosisId`] order (cheap: no text).
pub fn findings(s: &AuditedSocket, p: &Policy) -> Vec<DiagnosisId> {
    let timeout_ms = (p.middlebox.timeout_s * 1000.0) as u64;
    let established = s.state == TcpState::Established;
    let idle_ms = s.idle_ms();
    let mut out = Vec::new();
    if established && !s.keepalive && idle_ms * 2 >= timeout_ms {
        out.push(DiagnosisId::KeepaliveOffIdle);
    }
    if established && s.keepalive && u64::from(s.idle.value) * 1000 >= timeout_ms {
        out.push(DiagnosisId::KeepaliveTooLate);
    }
    if stuck(s) && !s.has_user_timeout() {
        out.push(DiagnosisId::StuckWithoutUserTimeout);
    }
    if keepalive_probing(s) {
        out.push(DiagnosisId::ProbesUnanswered);
    }
    if s.state == TcpState::CloseWait && idle_ms >= timeout_ms {
        out.push(DiagnosisId::CloseWaitIdle);
    }
    if established && s.dead_peer_detection_s().is_some_and(|d| d > p.detect_within_s) {
        out.push(DiagnosisId::SlowDeadPeerDetection);
    }
    out
}

/// Data unacknowledged and retransmitting, or zero-window probes unanswered: keep-alive cannot
/// fire while either lasts.
fn stuck(s: &AuditedSocket) -> bool {
    use super::model::TimerKind;
    (s.packets_out > 0 && s.retransmits > 0) || (s.timer == TimerKind::ZeroWindowProbe && s.probes_out > 0)
}

/// Keep-alive probes (not zero-window probes) out and unanswered.
fn keepalive_probing(s: &AuditedSocket) -> bool {
    s.keepalive && s.probes_out > 0 && s.packets_out == 0 && s.unsent_bytes == 0
}

/// Keep-alive settings that satisfy the policy: idle at half the middlebox timeout (at least
/// 1 s), then up to 3 probes, detection within the target.
fn recommended(p: &Policy) -> (u64, u64, u64) {
    let cnt = 3;
    let mut idle = ((p.middlebox.timeout_s / 2.0) as u64).max(1);
    let mut intvl = (idle / 4).clamp(1, 75);
    if idle + intvl * cnt > p.detect_within_s {
        idle = (p.detect_within_s / 2).max(1);
        intvl = (p.detect_within_s / (2 * cnt)).max(1);
    }
    (idle, intvl, cnt)
}

/// The diagnoses of `s` with their messages and fixes; `software` names the knob.
pub fn diagnose(s: &AuditedSocket, software: Software, p: &Policy) -> Vec<Diagnosis> {
    explain(&findings(s, p), s, software, p)
}

/// The diagnoses `ids` of `s` (from [`findings`]) with their messages and fixes.
pub fn explain(ids: &[DiagnosisId], s: &AuditedSocket, software: Software, p: &Policy) -> Vec<Diagnosis> {
    ids.iter()
        .map(|&id| Diagnosis { id, severity: id.severity(), message: message(id, s, p), fix: fix(id, s, software, p) })
        .collect()
}

fn secs(ms: u64) -> String {
    format!("{:.1}", ms as f64 / 1000.0)
}

/// The one-line explanation of `id` on `s`.
pub fn message(id: DiagnosisId, s: &AuditedSocket, p: &Policy) -> String {
    let t = p.middlebox.timeout_s;
    match id {
        DiagnosisId::KeepaliveOffIdle => format!(
            "keep-alive off and idle {} s, at least half the {t} s middlebox idle timeout: the middlebox will forget the flow and nothing will notice",
            secs(s.idle_ms())
        ),
        DiagnosisId::KeepaliveTooLate => format!(
            "keep-alive on, but the first probe comes after {} s idle ({}), not before the {t} s middlebox idle timeout",
            s.idle.value,
            source_words(s.idle.source)
        ),
        DiagnosisId::StuckWithoutUserTimeout => format!(
            "{} bytes unacknowledged after {} retransmissions and no TCP_USER_TIMEOUT: keep-alive cannot fire; the connection can hang ~{} s (tcp_retries2={})",
            s.unacked_bytes,
            s.retransmits,
            retransmission_budget_s(s.retries2),
            s.retries2
        ),
        DiagnosisId::ProbesUnanswered => format!(
            "{} of {} keep-alive probes unanswered: the peer is not answering (half-open suspect); declared dead in ~{} s unless it answers",
            s.probes_out,
            probes_allowed(s),
            secs(death_in_ms(s))
        ),
        DiagnosisId::CloseWaitIdle => format!(
            "CLOSE_WAIT and idle {} s (middlebox idle timeout {t} s): the peer closed and the application never did (a descriptor leak)",
            secs(s.idle_ms())
        ),
        DiagnosisId::SlowDeadPeerDetection => format!(
            "a dead peer takes {} + {} × {} = {} s to detect{}, more than --detect-within {} s",
            s.idle.value,
            s.intvl.value,
            s.probes_to_give_up(),
            s.dead_peer_detection_s().unwrap_or(0),
            if s.has_user_timeout() {
                format!(" (TCP_USER_TIMEOUT {} ms: the probe count does not apply)", s.user_timeout_ms)
            } else {
                String::new()
            },
            p.detect_within_s
        ),
    }
}

fn source_words(src: Source) -> &'static str {
    match src {
        Source::Socket => "set on the socket",
        Source::Inherited => "inherited from the listening socket",
        Source::Sysctl => "the namespace's net.ipv4.tcp_keepalive_time",
    }
}

/// The probes the kernel sends before it gives up, as said to the user: the count, or with
/// `TCP_USER_TIMEOUT` those that fit in it (see [`AuditedSocket::probes_to_give_up`]).
fn probes_allowed(s: &AuditedSocket) -> String {
    if s.has_user_timeout() {
        format!("~{} (TCP_USER_TIMEOUT {} ms)", s.probes_to_give_up(), s.user_timeout_ms)
    } else {
        s.cnt.value.to_string()
    }
}

/// When the peer is declared dead if no probe is answered: the next firing, then one interval
/// per probe still allowed. With `TCP_USER_TIMEOUT` (the count does not apply), the first firing
/// at which the time since the last segment received reaches it.
pub fn death_in_ms(s: &AuditedSocket) -> u64 {
    let next = s.timer_in_ms.unwrap_or(0).max(0) as u64;
    let intvl_ms = u64::from(s.intvl.value) * 1000;
    let more = if s.has_user_timeout() {
        let idle_at_next = s.idle_recv_ms + next;
        let k = u64::from(s.user_timeout_ms).saturating_sub(idle_at_next).div_ceil(intvl_ms.max(1));
        // The firing gives up only with a probe out.
        if s.probes_out == 0 { k.max(1) } else { k }
    } else {
        u64::from(s.cnt.value.saturating_sub(u32::from(s.probes_out)))
    };
    next + more * intvl_ms
}

/// How long retransmissions last before the kernel gives up (`tcp_model_timeout` with
/// `TCP_RTO_MIN` 200 ms and `TCP_RTO_MAX` 120 s, the kernel's defaults), seconds.
pub fn retransmission_budget_s(retries2: u8) -> u64 {
    let (rto_min_ms, rto_max_ms) = (200u64, 120_000u64);
    let thresh = (rto_max_ms / rto_min_ms).ilog2() as u64;
    let b = u64::from(retries2);
    let ms = if b <= thresh {
        ((2u64 << b) - 1) * rto_min_ms
    } else {
        ((2u64 << thresh) - 1) * rto_min_ms + (b - thresh) * rto_max_ms
    };
    ms.div_ceil(1000)
}

/// The concrete fix for `id` on `s`, naming `software`'s knob where known.
pub fn fix(id: DiagnosisId, s: &AuditedSocket, software: Software, p: &Policy) -> String {
    let (i, v, c) = recommended(p);
    match id {
        DiagnosisId::KeepaliveOffIdle | DiagnosisId::KeepaliveTooLate | DiagnosisId::SlowDeadPeerDetection => {
            let mut out = keepalive_knob(software, i, v, c);
            let sysctl_enough = id != DiagnosisId::KeepaliveOffIdle
                && [s.idle.source, s.intvl.source, s.cnt.source].iter().all(|src| *src == Source::Sysctl);
            if sysctl_enough {
                let _ = write!(
                    out,
                    "; or, for every keep-alive socket of the namespace: sysctl net.ipv4.tcp_keepalive_time={i} net.ipv4.tcp_keepalive_intvl={v} net.ipv4.tcp_keepalive_probes={c}"
                );
            }
            out
        }
        DiagnosisId::StuckWithoutUserTimeout => user_timeout_knob(software, (i + v * c) * 1000),
        DiagnosisId::ProbesUnanswered => {
            let path =
                format!("check the path to {} (a NAT or load balancer that forgot the flow, a crashed or partitioned peer)", s.remote);
            if i < u64::from(s.idle.value) {
                format!("{path}; if a middlebox forgot it, keep-alive must fire sooner: {}", keepalive_knob(software, i, v, c))
            } else {
                format!(
                    "{path}; keep-alive already fires after {} s idle, within the {} s middlebox idle timeout assumed here: if a middlebox forgot the flow, its timeout is shorter (give it with --idle-timeout)",
                    s.idle.value, p.middlebox.timeout_s
                )
            }
        }
        DiagnosisId::CloseWaitIdle => format!(
            "close the socket when a read returns end of file (0 bytes){}; until then the descriptor and its buffers leak",
            s.owner.map(|o| format!(" in pid {}", o.pid)).unwrap_or_default()
        ),
    }
}

/// How to set keep-alive idle `i` s, interval `v` s and `c` probes in `software`.
fn keepalive_knob(software: Software, i: u64, v: u64, c: u64) -> String {
    match software {
        Software::Redis => format!("redis.conf: tcp-keepalive {i} (Redis probes every {i}/3 s after that, 3 times)"),
        Software::Nginx => format!("nginx: listen ... so_keepalive={i}s:{v}s:{c} (and proxy_socket_keepalive on for upstreams)"),
        Software::Postgres => format!("postgresql.conf: tcp_keepalives_idle = {i}, tcp_keepalives_interval = {v}, tcp_keepalives_count = {c}"),
        Software::Libpq => format!("libpq connection string: keepalives=1 keepalives_idle={i} keepalives_interval={v} keepalives_count={c}"),
        Software::Node => format!(
            "Node.js: socket.setKeepAlive(true, {}) (it sets the idle time only; the interval and count are libuv's: 1 s and 10 in recent releases, the namespace's sysctls in older ones, as this socket's keepalive_intvl_source/keepalive_cnt_source say)",
            i * 1000
        ),
        Software::Java => format!(
            "Java: socket.setKeepAlive(true) and socket.setOption(jdk.net.ExtendedSocketOptions.TCP_KEEPIDLE, {i}), TCP_KEEPINTERVAL {v}, TCP_KEEPCOUNT {c}"
        ),
        Software::Python => format!(
            "Python: sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1), then socket.IPPROTO_TCP options TCP_KEEPIDLE {i}, TCP_KEEPINTVL {v}, TCP_KEEPCNT {c}"
        ),
        Software::Unknown => format!(
            "in the application: setsockopt SO_KEEPALIVE=1, TCP_KEEPIDLE={i}, TCP_KEEPINTVL={v}, TCP_KEEPCNT={c} (Go: net.Dialer{{KeepAlive: {i}*time.Second}} or KeepAliveConfig{{Enable: true, Idle: {i}s, Interval: {v}s, Count: {c}}}; Java: jdk.net.ExtendedSocketOptions.TCP_KEEPIDLE; Node.js: socket.setKeepAlive(true, {}); libpq: keepalives_idle={i})",
            i * 1000
        ),
    }
}

/// How to set `TCP_USER_TIMEOUT` to `ms` in `software`.
fn user_timeout_knob(software: Software, ms: u64) -> String {
    let generic = format!(
        "setsockopt(IPPROTO_TCP, TCP_USER_TIMEOUT, {ms}) on the socket, or lower net.ipv4.tcp_retries2 in the namespace (every socket)"
    );
    match software {
        Software::Postgres => format!("postgresql.conf: tcp_user_timeout = {ms}"),
        Software::Libpq => format!("libpq connection string: tcp_user_timeout={ms}"),
        Software::Java | Software::Node | Software::Redis | Software::Nginx | Software::Python | Software::Unknown => {
            format!("{generic} (Go: a net.Dialer Control function setting TCP_USER_TIMEOUT)")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::model::{tests::record, Setting, TimerKind};

    fn policy(timeout_s: f64) -> Policy {
        Policy { middlebox: Middlebox { timeout_s, origin: "test".into() }, detect_within_s: DEFAULT_DETECT_WITHIN_S }
    }

    /// Healthy idle socket: keep-alive on at 60/10/3, idle 10 s, nothing in flight.
    fn healthy() -> AuditedSocket {
        let mut s = crate::audit::model::tests::convert_all(&[record()]).remove(0);
        s.keepalive = true;
        s.idle = Setting { value: 60, source: Source::Socket };
        s.intvl = Setting { value: 10, source: Source::Socket };
        s.cnt = Setting { value: 3, source: Source::Socket };
        s
    }

    #[test]
    fn healthy_socket_has_no_diagnosis() {
        assert!(findings(&healthy(), &policy(240.0)).is_empty());
    }

    #[test]
    fn keepalive_off_idle_from_half_the_timeout() {
        let mut s = healthy();
        s.keepalive = false;
        s.idle_send_ms = Some(119_000);
        s.idle_recv_ms = 200_000;
        assert!(findings(&s, &policy(240.0)).is_empty(), "119 s < 120 s");
        s.idle_send_ms = Some(120_000);
        assert_eq!(findings(&s, &policy(240.0)), [DiagnosisId::KeepaliveOffIdle]);
        s.state = TcpState::CloseWait;
        assert!(!findings(&s, &policy(240.0)).contains(&DiagnosisId::KeepaliveOffIdle));
    }

    #[test]
    fn keepalive_too_late_and_slow_detection() {
        let mut s = healthy();
        s.idle = Setting { value: 7200, source: Source::Sysctl };
        s.intvl = Setting { value: 75, source: Source::Sysctl };
        s.cnt = Setting { value: 9, source: Source::Sysctl };
        let d = diagnose(&s, Software::Unknown, &policy(350.0));
        let ids: Vec<_> = d.iter().map(|d| d.id).collect();
        assert_eq!(ids, [DiagnosisId::KeepaliveTooLate, DiagnosisId::SlowDeadPeerDetection]);
        assert!(d[0].message.contains("7200 s idle (the namespace's net.ipv4.tcp_keepalive_time)"), "{}", d[0].message);
        assert!(d[0].fix.contains("sysctl net.ipv4.tcp_keepalive_time=175"), "{}", d[0].fix);
        assert!(d[1].message.contains("7200 + 75 × 9 = 7875 s"), "{}", d[1].message);
        s.idle.value = 349;
        s.idle.source = Source::Socket;
        assert_eq!(findings(&s, &policy(350.0)), [DiagnosisId::SlowDeadPeerDetection]);
        let mut strict = policy(350.0);
        strict.detect_within_s = 10_000;
        assert!(findings(&s, &strict).is_empty());
        let d = diagnose(&s, Software::Redis, &policy(350.0));
        assert!(d[0].fix.starts_with("redis.conf: tcp-keepalive 175"), "{}", d[0].fix);
        assert!(!d[0].fix.contains("sysctl"), "set on the socket: the sysctl would not help: {}", d[0].fix);
    }

    #[test]
    fn stuck_only_without_user_timeout() {
        let mut s = healthy();
        s.packets_out = 2;
        s.unacked_bytes = 100;
        s.retransmits = 3;
        s.timer = TimerKind::Retransmit;
        let d = diagnose(&s, Software::Libpq, &policy(240.0));
        assert_eq!(d.len(), 1);
        assert_eq!((d[0].id, d[0].severity), (DiagnosisId::StuckWithoutUserTimeout, Severity::Error));
        assert!(d[0].message.contains("~925 s (tcp_retries2=15)"), "{}", d[0].message);
        assert!(d[0].fix.contains("tcp_user_timeout="), "{}", d[0].fix);
        s.user_timeout_ms = 30_000;
        assert!(findings(&s, &policy(240.0)).is_empty());
        s.user_timeout_ms = 0;
        s.retransmits = 0;
        assert!(findings(&s, &policy(240.0)).is_empty(), "in flight but not retransmitting yet");
    }

    #[test]
    fn probes_unanswered_says_when_the_peer_is_declared_dead() {
        let mut s = healthy();
        s.probes_out = 1;
        s.timer = TimerKind::Keepalive;
        s.timer_in_ms = Some(4_000);
        let d = diagnose(&s, Software::Unknown, &policy(240.0));
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].id, DiagnosisId::ProbesUnanswered);
        // Next firing in 4 s, then 2 more intervals of 10 s.
        assert!(d[0].message.contains("1 of 3 keep-alive probes unanswered") && d[0].message.contains("~24.0 s"), "{}", d[0].message);
        // The policy's idle (120 s) is later than this socket's 60 s: not offered as "sooner".
        assert!(d[0].fix.contains("already fires after 60 s idle") && !d[0].fix.contains("120"), "{}", d[0].fix);
        let sooner = diagnose(&s, Software::Unknown, &policy(100.0));
        assert!(sooner[0].fix.contains("fire sooner: ") && sooner[0].fix.contains("TCP_KEEPIDLE=50"), "50 s < 60 s: {}", sooner[0].fix);
        // TCP_USER_TIMEOUT 75 s, idle 60 s so far plus 4 s to the next firing: that firing (64 s)
        // does not reach it, the one after (74 s) does not either, the third (84 s) does.
        s.user_timeout_ms = 75_000;
        s.idle_recv_ms = 60_000;
        let d = diagnose(&s, Software::Unknown, &policy(240.0));
        assert!(d[0].message.contains("1 of ~2 (TCP_USER_TIMEOUT 75000 ms)") && d[0].message.contains("~24.0 s"), "{}", d[0].message);
        s.user_timeout_ms = 64_000;
        assert!(diagnose(&s, Software::Unknown, &policy(240.0))[0].message.contains("~4.0 s"), "the next firing reaches it");
        s.user_timeout_ms = 0;
        s.packets_out = 1;
        assert!(!findings(&s, &policy(240.0)).contains(&DiagnosisId::ProbesUnanswered), "zero-window probes are not keep-alive probes");
    }

    /// With `TCP_USER_TIMEOUT` the count does not apply: the kernel gives up at the first firing
    /// with a probe out past the user timeout (an application saw ETIMEDOUT after 4 s with idle 2,
    /// interval 2, count 6 and a 3 s user timeout, where idle + interval × count says 14).
    #[test]
    fn slow_detection_follows_the_user_timeout() {
        let mut s = healthy();
        s.idle.value = 2;
        s.intvl.value = 2;
        s.cnt.value = 6;
        s.user_timeout_ms = 3_000;
        assert_eq!(s.dead_peer_detection_s(), Some(4));
        s.idle.value = 60;
        s.intvl.value = 60;
        s.cnt.value = 20;
        s.user_timeout_ms = 120_000;
        assert_eq!(s.dead_peer_detection_s(), Some(120));
        assert!(!findings(&s, &policy(240.0)).contains(&DiagnosisId::SlowDeadPeerDetection), "120 s, not 1260 s");
        s.user_timeout_ms = 1_000_000;
        let d = diagnose(&s, Software::Unknown, &policy(240.0));
        let slow = d.iter().find(|d| d.id == DiagnosisId::SlowDeadPeerDetection).expect("slow");
        assert!(slow.message.contains("60 + 60 × 16 = 1020 s to detect (TCP_USER_TIMEOUT 1000000 ms"), "{}", slow.message);
    }

    #[test]
    fn close_wait_idle_after_the_timeout() {
        let mut s = healthy();
        s.state = TcpState::CloseWait;
        s.idle_send_ms = Some(1_000);
        assert!(findings(&s, &policy(2.0)).is_empty());
        s.idle_send_ms = Some(2_000);
        s.idle_recv_ms = 2_500;
        let d = diagnose(&s, Software::Unknown, &policy(2.0));
        assert_eq!(d.iter().map(|d| d.id).collect::<Vec<_>>(), [DiagnosisId::CloseWaitIdle]);
        assert!(d[0].fix.contains("end of file"));
    }

    #[test]
    fn fixes_name_each_softwares_knob() {
        let mut s = healthy();
        s.keepalive = false;
        s.idle_send_ms = Some(300_000);
        s.idle_recv_ms = 300_000;
        let want = [
            (Software::Redis, "tcp-keepalive 120"),
            (Software::Nginx, "so_keepalive=120s:30s:3"),
            (Software::Postgres, "tcp_keepalives_idle = 120"),
            (Software::Libpq, "keepalives_idle=120"),
            (Software::Node, "socket.setKeepAlive(true, 120000)"),
            (Software::Java, "jdk.net.ExtendedSocketOptions.TCP_KEEPIDLE, 120"),
            (Software::Python, "TCP_KEEPIDLE 120"),
            (Software::Unknown, "KeepAliveConfig"),
        ];
        for (sw, knob) in want {
            let d = diagnose(&s, sw, &policy(240.0));
            assert!(d[0].fix.contains(knob), "{sw:?}: {}", d[0].fix);
            assert!(!d[0].fix.contains("sysctl net.ipv4"), "keep-alive off: a sysctl alone cannot help: {}", d[0].fix);
        }
        assert_eq!(Software::from_comm("redis-server"), Software::Redis);
        assert_eq!(Software::from_comm("nginx"), Software::Nginx);
        assert_eq!(Software::from_comm("python3"), Software::Python);
        assert_eq!(Software::from_comm("bash"), Software::Unknown);
    }

    #[test]
    fn retransmission_budget_matches_the_kernel_model() {
        assert_eq!(retransmission_budget_s(15), 925); // 924.6 s, the documented ~15 minutes
        assert_eq!(retransmission_budget_s(8), 103); // (2^9 - 1) × 0.2 = 102.2 s
        assert_eq!(retransmission_budget_s(3), 3);
    }

    #[test]
    fn ids_and_json_shape_are_stable() {
        let names: Vec<_> = DiagnosisId::ALL.iter().map(|d| d.name()).collect();
        assert_eq!(
            names,
            ["keepalive_off_idle", "keepalive_too_late", "stuck_without_user_timeout", "probes_unanswered", "close_wait_idle", "slow_dead_peer_detection"]
        );
        for id in DiagnosisId::ALL {
            assert_eq!(serde_json::to_value(id).unwrap(), id.name());
        }
        let d = Diagnosis { id: DiagnosisId::CloseWaitIdle, severity: Severity::Warning, message: "m".into(), fix: "f".into() };
        assert_eq!(serde_json::to_string(&d).unwrap(), r#"{"id":"close_wait_idle","severity":"warning","message":"m","fix":"f"}"#);
    }
}
