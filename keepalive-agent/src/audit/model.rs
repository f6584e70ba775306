//! What the audit knows about one socket: the kernel's [`AuditRecord`] turned into seconds,
//! effective settings with their sources, the pending timer by name, and the owner.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use keepalive_common::{AuditRecord, AUDIT_DEAD, AUDIT_KEEPALIVE_TIMER_PENDING, AUDIT_KEEPOPEN};
use serde::Serialize;

use crate::{event::TcpState, owners::Holder};

/// `icsk_pending` values (`ICSK_TIME_*` in include/net/inet_connection_sock.h). These are
/// preprocessor constants, absent from BTF, unchanged since Linux 2.6 (LOSS_PROBE 3.10,
/// REO_TIMEOUT 4.10); the same numbers `ss` relies on through inet_diag.
const ICSK_TIME_RETRANS: u8 = 1;
const ICSK_TIME_PROBE0: u8 = 3;
const ICSK_TIME_LOSS_PROBE: u8 = 5;
const ICSK_TIME_REO_TIMEOUT: u8 = 6;

/// Where an effective keep-alive value comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// Set on this socket (setsockopt, bpf_setsockopt, an in-kernel user).
    Socket,
    /// Set on the listening socket this one was accepted from, and copied at accept.
    Inherited,
    /// Not set on the socket: the namespace's `net.ipv4.tcp_keepalive_*` sysctl.
    Sysctl,
}

/// One effective keep-alive value and its source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Setting {
    /// Seconds (idle, interval) or a count.
    pub value: u32,
    pub source: Source,
}

/// The timer pending on the socket, as `ss -o` names it (same precedence as inet_diag).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TimerKind {
    /// Retransmission timeout (`ss`: `on`).
    Retransmit,
    /// Tail loss probe (`ss`: `on`).
    LossProbe,
    /// RACK reordering timeout (`ss`: `on`).
    ReorderTimeout,
    /// Zero-window probe: the peer advertised no window (`ss`: `persist`).
    ZeroWindowProbe,
    /// The keep-alive timer (`ss`: `keepalive`): the next probe or idle check.
    Keepalive,
    /// Nothing pending.
    None,
}

impl TimerKind {
    /// The JSON and text spelling.
    pub fn name(self) -> &'static str {
        match self {
            TimerKind::Retransmit => "retransmit",
            TimerKind::LossProbe => "loss_probe",
            TimerKind::ReorderTimeout => "reorder_timeout",
            TimerKind::ZeroWindowProbe => "zero_window_probe",
            TimerKind::Keepalive => "keepalive",
            TimerKind::None => "none",
        }
    }
}

/// One audited socket.
#[derive(Clone, Debug, PartialEq)]
pub struct AuditedSocket {
    /// Kernel address of the socket.
    pub sk: u64,
    /// Network namespace inode number.
    pub netns: u32,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// ESTABLISHED or CLOSE_WAIT.
    pub state: TcpState,
    /// Inode of the socket's file (0: none).
    pub inode: u64,
    /// The process holding the socket (lowest pid), if one was found.
    pub owner: Option<Holder>,
    /// `SO_KEEPALIVE`, and whether it was inherited from the listener.
    pub keepalive: bool,
    pub keepalive_source: Source,
    /// Effective `TCP_KEEPIDLE` (s), `TCP_KEEPINTVL` (s), `TCP_KEEPCNT`.
    pub idle: Setting,
    pub intvl: Setting,
    pub cnt: Setting,
    /// `TCP_USER_TIMEOUT`, ms (0: unset).
    pub user_timeout_ms: u32,
    /// Since the last data segment sent (`lastsnd` of `ss -i`), ms; `None` when unknown.
    pub idle_send_ms: Option<u64>,
    /// Since the last segment received, data or ACK (`min(lastrcv, lastack)` of `ss -i`; what
    /// keep-alive counts as idle), ms.
    pub idle_recv_ms: u64,
    pub timer: TimerKind,
    /// When the pending timer fires, ms from now (negative: overdue); `None` with no timer.
    pub timer_in_ms: Option<i64>,
    /// `icsk_probes_out`: keep-alive or zero-window probes unanswered.
    pub probes_out: u8,
    /// Retransmissions of the oldest unacknowledged segment.
    pub retransmits: u8,
    /// Segments in flight.
    pub packets_out: u32,
    pub unacked_bytes: u32,
    pub unsent_bytes: u32,
    /// `net.ipv4.tcp_retries2` of the namespace.
    pub retries2: u8,
    /// Orphaned (no process can close it any more).
    pub orphan: bool,
}

impl AuditedSocket {
    /// Seconds since the last segment in either direction: what a middlebox sees as idle.
    pub fn idle_ms(&self) -> u64 {
        self.idle_send_ms.map_or(self.idle_recv_ms, |s| s.min(self.idle_recv_ms))
    }

    /// Time a dead peer would take to be detected by keep-alive once the connection goes idle,
    /// seconds (`None` with keep-alive off): the firing at which `tcp_keepalive_timer` gives up.
    /// It fires after idle, then every interval. Without `TCP_USER_TIMEOUT` it gives up once
    /// `count` probes are out: idle + interval × count. With it, the count does not matter: it gives
    /// up at the first firing with a probe out at which the time since the last segment received
    /// reaches the user timeout: idle + interval × k, k ≥ 1 the fewest intervals that reach it.
    pub fn dead_peer_detection_s(&self) -> Option<u64> {
        let (idle, intvl) = (u64::from(self.idle.value), u64::from(self.intvl.value));
        self.keepalive.then(|| idle + intvl * self.probes_to_give_up())
    }

    /// The probes `tcp_keepalive_timer` sends to a dead peer before it gives up (see
    /// [`Self::dead_peer_detection_s`]).
    pub fn probes_to_give_up(&self) -> u64 {
        let (idle_ms, intvl_ms) = (u64::from(self.idle.value) * 1000, u64::from(self.intvl.value) * 1000);
        if self.user_timeout_ms == 0 {
            return u64::from(self.cnt.value);
        }
        let ut = u64::from(self.user_timeout_ms);
        ut.saturating_sub(idle_ms).div_ceil(intvl_ms.max(1)).max(1)
    }

    /// Whether `TCP_USER_TIMEOUT` is set.
    pub fn has_user_timeout(&self) -> bool {
        self.user_timeout_ms > 0
    }
}

/// Keep-alive settings of one listening socket, to tell what accepted sockets inherited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Listener {
    addr: IpAddr,
    keepopen: bool,
    time: u32,
    intvl: u32,
    probes: u8,
}

/// Converts the records of one walk. `states` maps kernel state values, `hz` converts jiffies.
pub struct Converter<'a> {
    /// CONFIG_HZ, to convert jiffies.
    pub hz: u32,
    /// Kernel TCP state values (from BTF).
    pub states: &'a [(u8, TcpState)],
    /// `AF_INET6`.
    pub af_inet6: u8,
    listeners: HashMap<(u32, u16), Vec<Listener>>,
}

impl<'a> Converter<'a> {
    /// A converter for one walk.
    pub fn new(hz: u32, states: &'a [(u8, TcpState)], af_inet6: u8) -> Converter<'a> {
        Converter { hz, states, af_inet6, listeners: HashMap::new() }
    }

    /// Remembers the keep-alive settings of the listener `r`.
    fn learn_listener(&mut self, r: &AuditRecord) {
        let l = Listener {
            addr: self.addrs(r).0.ip(),
            keepopen: r.flags & AUDIT_KEEPOPEN != 0,
            time: r.keepalive_time,
            intvl: r.keepalive_intvl,
            probes: r.keepalive_probes,
        };
        self.listeners.entry((r.netns, r.sport)).or_default().push(l);
    }

    fn state(&self, v: u8) -> TcpState {
        self.states.iter().find(|(k, _)| *k == v).map_or(TcpState::Unknown(v), |(_, s)| *s)
    }

    fn addrs(&self, r: &AuditRecord) -> (SocketAddr, SocketAddr) {
        if r.family == self.af_inet6 {
            let v6 = |a: &[u8; 16], p| SocketAddr::new(IpAddr::V6(Ipv6Addr::from(*a)), p);
            (v6(&r.saddr, r.sport), v6(&r.daddr, r.dport))
        } else {
            let v4 = |a: &[u8; 16], p| SocketAddr::new(IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3])), p);
            (v4(&r.saddr, r.sport), v4(&r.daddr, r.dport))
        }
    }

    fn ms(&self, jiffies: u64) -> u64 {
        jiffies.saturating_mul(1000) / u64::from(self.hz.max(1))
    }

    fn secs(&self, jiffies: u32) -> u32 {
        jiffies / self.hz.max(1)
    }

    /// The listener `r` was accepted from, if any: same namespace and local port, and the same
    /// or a wildcard address.
    fn listener_of(&self, r: &AuditRecord, local: IpAddr) -> Option<&Listener> {
        self.listeners
            .get(&(r.netns, r.sport))?
            .iter()
            .find(|l| l.addr == local || l.addr.is_unspecified())
    }

    /// The audited socket of record `r`; `None` for listeners, which are remembered to tell what
    /// the sockets accepted from them inherited (the kernel's walk gives a namespace's listeners
    /// before its established sockets).
    pub fn convert(&mut self, r: &AuditRecord, owner: Option<Holder>) -> Option<AuditedSocket> {
        let state = self.state(r.state);
        if state == TcpState::Listen {
            self.learn_listener(r);
            return None;
        }
        let (local, remote) = self.addrs(r);
        let listener = self.listener_of(r, local.ip());
        let source = |own: u32, inherited: Option<u32>| match (own, inherited) {
            (0, _) => Source::Sysctl,
            (v, Some(l)) if v == l => Source::Inherited,
            _ => Source::Socket,
        };
        let setting = |own: u32, sysctl: u32, inherited: Option<u32>, jiffies: bool| {
            let conv = |v| if jiffies { self.secs(v) } else { v };
            Setting { value: conv(if own == 0 { sysctl } else { own }), source: source(own, inherited) }
        };
        let keepopen = r.flags & AUDIT_KEEPOPEN != 0;
        let now32 = r.jiffies as u32;
        let since = |t: u32| self.ms(u64::from(now32.wrapping_sub(t)));
        let (timer, expires) = timer_of(r);
        Some(AuditedSocket {
            sk: r.sk,
            netns: r.netns,
            local,
            remote,
            state,
            inode: r.sock_ino,
            owner,
            keepalive: keepopen,
            keepalive_source: if keepopen && listener.is_some_and(|l| l.keepopen) { Source::Inherited } else { Source::Socket },
            idle: setting(r.keepalive_time, r.sysctl_time, listener.map(|l| l.time), true),
            intvl: setting(r.keepalive_intvl, r.sysctl_intvl, listener.map(|l| l.intvl), true),
            cnt: setting(
                u32::from(r.keepalive_probes),
                u32::from(r.sysctl_probes),
                listener.map(|l| u32::from(l.probes)),
                false,
            ),
            user_timeout_ms: r.user_timeout_ms,
            idle_send_ms: (r.lsndtime != 0).then(|| since(r.lsndtime)),
            idle_recv_ms: since(r.lrcvtime).min(since(r.rcv_tstamp)),
            timer,
            timer_in_ms: expires.map(|e| {
                let delta = e.wrapping_sub(r.jiffies) as i64;
                delta.signum() * self.ms(delta.unsigned_abs()) as i64
            }),
            probes_out: r.probes_out,
            retransmits: r.retransmits,
            packets_out: r.packets_out,
            unacked_bytes: r.unacked,
            unsent_bytes: r.unsent,
            retries2: if r.sysctl_retries2 == 0 { 15 } else { r.sysctl_retries2 },
            orphan: r.flags & AUDIT_DEAD != 0,
        })
    }
}

/// The pending timer and its expiry (jiffies), with inet_diag's precedence: the retransmit
/// timer's event first, then the keep-alive timer.
fn timer_of(r: &AuditRecord) -> (TimerKind, Option<u64>) {
    let retransmit = |k| (k, Some(r.retransmit_expires));
    match r.icsk_pending {
        ICSK_TIME_RETRANS => retransmit(TimerKind::Retransmit),
        ICSK_TIME_LOSS_PROBE => retransmit(TimerKind::LossProbe),
        ICSK_TIME_REO_TIMEOUT => retransmit(TimerKind::ReorderTimeout),
        ICSK_TIME_PROBE0 => retransmit(TimerKind::ZeroWindowProbe),
        _ if r.flags & AUDIT_KEEPALIVE_TIMER_PENDING != 0 => (TimerKind::Keepalive, Some(r.keepalive_expires)),
        _ => (TimerKind::None, None),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::event::DecodeTables;

    /// A record of an ESTABLISHED IPv4 socket 127.0.0.1:40000 -> 127.0.0.1:8080 at HZ 250,
    /// namespace defaults 7200/75/9, idle 10 s both ways.
    pub(crate) fn record() -> AuditRecord {
        let mut r = AuditRecord::zeroed();
        r.sk = 0xffff_0000_0000_1000;
        r.family = 2;
        r.state = 1;
        r.saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        r.daddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        r.sport = 40000;
        r.dport = 8080;
        r.netns = 4026531840;
        r.jiffies = 1_000_000;
        r.sysctl_time = 7200 * 250;
        r.sysctl_intvl = 75 * 250;
        r.sysctl_probes = 9;
        r.sysctl_retries2 = 15;
        r.lsndtime = 1_000_000 - 2500;
        r.lrcvtime = 1_000_000 - 2500;
        r.rcv_tstamp = 1_000_000 - 2500;
        r
    }

    pub(crate) fn convert_all(records: &[AuditRecord]) -> Vec<AuditedSocket> {
        let t = DecodeTables::linux_defaults();
        let mut c = Converter::new(250, &t.tcp_states, 10);
        records.iter().filter_map(|r| c.convert(r, None)).collect()
    }

    #[test]
    fn sysctl_defaults_and_idle_times() {
        let s = &convert_all(&[record()])[0];
        assert_eq!(s.local, "127.0.0.1:40000".parse().unwrap());
        assert_eq!(s.state, TcpState::Established);
        assert_eq!(s.idle, Setting { value: 7200, source: Source::Sysctl });
        assert_eq!(s.intvl, Setting { value: 75, source: Source::Sysctl });
        assert_eq!(s.cnt, Setting { value: 9, source: Source::Sysctl });
        assert_eq!((s.idle_send_ms, s.idle_recv_ms), (Some(10_000), 10_000));
        assert_eq!(s.dead_peer_detection_s(), None);
        assert_eq!(s.timer, TimerKind::None);
    }

    #[test]
    fn socket_values_inheritance_and_timers() {
        let mut listener = record();
        listener.state = 10;
        listener.sport = 8080;
        listener.dport = 0;
        listener.daddr = [0; 16];
        listener.saddr = [0; 16];
        listener.flags = AUDIT_KEEPOPEN;
        listener.keepalive_time = 30 * 250;
        let mut accepted = record();
        accepted.sport = 8080;
        accepted.dport = 40000;
        accepted.flags = AUDIT_KEEPOPEN | AUDIT_KEEPALIVE_TIMER_PENDING;
        accepted.keepalive_time = 30 * 250;
        accepted.keepalive_intvl = 5 * 250;
        accepted.keepalive_expires = 1_000_000 + 500;
        let mut client = record();
        client.flags = AUDIT_KEEPOPEN;
        client.keepalive_time = 30 * 250;
        client.icsk_pending = ICSK_TIME_RETRANS;
        client.retransmit_expires = 1_000_000 - 25;
        let all = convert_all(&[listener, accepted, client]);
        assert_eq!(all.len(), 2, "the listener is not reported");
        let (a, c) = (&all[0], &all[1]);
        assert_eq!(a.keepalive_source, Source::Inherited);
        assert_eq!(a.idle, Setting { value: 30, source: Source::Inherited });
        assert_eq!(a.intvl, Setting { value: 5, source: Source::Socket });
        assert_eq!(a.cnt.source, Source::Sysctl);
        assert_eq!((a.timer, a.timer_in_ms), (TimerKind::Keepalive, Some(2000)));
        assert_eq!(a.dead_peer_detection_s(), Some(30 + 5 * 9));
        // TCP_USER_TIMEOUT replaces the count: the first firing with a probe out past it.
        let mut ut = a.clone();
        ut.user_timeout_ms = 36_000;
        assert_eq!(ut.dead_peer_detection_s(), Some(30 + 5 * 2));
        ut.user_timeout_ms = 35_000;
        assert_eq!(ut.dead_peer_detection_s(), Some(30 + 5));
        ut.user_timeout_ms = 1_000;
        assert_eq!(ut.dead_peer_detection_s(), Some(30 + 5), "one probe out at least");
        assert_eq!(c.keepalive_source, Source::Socket);
        assert_eq!(c.idle.source, Source::Socket);
        assert_eq!((c.timer, c.timer_in_ms), (TimerKind::Retransmit, Some(-100)));
    }

    #[test]
    fn jiffies_wrap() {
        let mut r = record();
        r.jiffies = (1u64 << 32) + 100;
        r.lsndtime = u32::MAX - 149;
        r.lrcvtime = u32::MAX - 149;
        r.rcv_tstamp = 50;
        let s = &convert_all(&[r])[0];
        assert_eq!(s.idle_send_ms, Some(1000));
        assert_eq!(s.idle_recv_ms, 200);
        assert_eq!(s.idle_ms(), 200);
    }
}
