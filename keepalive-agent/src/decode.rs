//! Kernel records ([`RawEvent`]) → typed [`Event`]s.
//!
//! The decoder knows the kernel's numbering (TCP states, reset reasons, address families, HZ) through
//! [`DecodeTables`], built from BTF at start-up; it assumes nothing about which program produced a
//! record. Bytes come from a BPF ring buffer or from an iterator's seq file: one record is exactly
//! [`RAW_EVENT_SIZE`] bytes, with no alignment guarantee.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};

use keepalive_common::{
    EventKind, RawAck, RawEvent, FLAG_ACTIVE, FLAG_DEAD, FLAG_HAS_REASON, FLAG_IN_TIMER, FLAG_KEEPOPEN,
    FLAG_OWNED, FLAG_PROCESS, FLAG_TIMER_PENDING, RAW_ACK_SIZE, RAW_EVENT_SIZE, SOL_SOCKET, SOL_TCP,
    SO_KEEPALIVE, TCP_KEEPCNT, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_USER_TIMEOUT,
};

use crate::event::{
    DecodeTables, Event, EventBody, Process, SockOpt, SockSettings, SockTimes, TcpState, TimerFiring,
};

/// Why a kernel record could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The record does not have the size of a [`RawEvent`] (truncated read, or the agent and the
    /// eBPF object disagree on the layout).
    #[error("event record is {got} bytes, expected {expected} (or {ack} for an answer's short record)", ack = RAW_ACK_SIZE)]
    BadLength { got: usize, expected: usize },
    /// The `kind` byte is not an [`EventKind`].
    #[error("unknown event kind {kind} (socket {sk:#x})")]
    UnknownKind { kind: u8, sk: u64 },
    /// The socket has ports but its family is neither `AF_INET` nor `AF_INET6`.
    #[error("unknown address family {family} in {kind:?} event (socket {sk:#x})")]
    UnknownFamily {
        family: u8,
        kind: EventKind,
        sk: u64,
    },
    /// A setsockopt event for an option that is not a keep-alive option.
    #[error(
        "setsockopt level {level} option {optname} is not a keep-alive option (socket {sk:#x})"
    )]
    UnknownSockOpt { level: i32, optname: i32, sk: u64 },
    /// An event that always happens in process context came without `FLAG_PROCESS`.
    #[error("{kind:?} event without process information (socket {sk:#x})")]
    MissingProcess { kind: EventKind, sk: u64 },
}

/// Division of any `u32` by a divisor fixed at start-up (HZ), by a multiplication: Lemire, Kaser
/// and Kurz, "Faster remainder by direct computation" (2019), `fastdiv` for 32-bit operands:
/// `M = ⌊(2⁶⁴ − 1) / d⌋ + 1`, `n / d = ⌊n · M / 2⁶⁴⌋`, exact for every `u32` `n` and `d ≥ 2`. A
/// hardware division's latency sits on the path of every event that carries settings.
#[derive(Clone, Copy, Debug)]
struct DivU32 {
    /// `M`, or 0 for `d == 1`.
    m: u64,
}

impl DivU32 {
    fn new(d: u32) -> Self {
        let d = d.max(1);
        DivU32 { m: if d == 1 { 0 } else { u64::MAX / u64::from(d) + 1 } }
    }

    #[inline]
    fn div(self, n: u32) -> u32 {
        if self.m == 0 {
            return n;
        }
        ((u128::from(self.m) * u128::from(n)) >> 64) as u32
    }
}

/// Turns raw kernel records into [`Event`]s.
#[derive(Clone, Debug)]
pub struct Decoder {
    tables: DecodeTables,
    /// `tables.hz`, at least 1.
    hz: u64,
    /// Division by `hz`.
    per_hz: DivU32,
    /// Kernel state value → state, for every possible byte.
    states: [TcpState; 256],
}

impl Decoder {
    pub fn new(tables: DecodeTables) -> Self {
        let mut states = [TcpState::Unknown(0); 256];
        for (v, s) in states.iter_mut().enumerate() {
            *s = TcpState::Unknown(v as u8);
        }
        for &(v, s) in &tables.tcp_states {
            states[usize::from(v)] = s;
        }
        let hz = u64::from(tables.hz.max(1));
        Decoder { per_hz: DivU32::new(tables.hz), tables, hz, states }
    }

    pub fn tables(&self) -> &DecodeTables {
        &self.tables
    }

    /// Decodes one record as read from a ring buffer or a seq file (any alignment).
    #[inline]
    pub fn decode_bytes(&self, bytes: &[u8]) -> Result<Event, DecodeError> {
        if bytes.len() == RAW_ACK_SIZE {
            return decode_ack(bytes);
        }
        check_len(bytes)?;
        if bytes.as_ptr().align_offset(std::mem::align_of::<RawEvent>()) == 0 {
            // SAFETY: the slice holds exactly size_of::<RawEvent>() bytes (checked), the pointer is
            // aligned for RawEvent (checked), and RawEvent is plain integers and byte arrays, so
            // every bit pattern is a valid value. Ring buffer records are 8-byte aligned: this is
            // the usual path, and it reads the record where it lies instead of copying it first.
            self.decode(unsafe { &*bytes.as_ptr().cast::<RawEvent>() })
        } else {
            self.decode(&raw_from_bytes(bytes)?)
        }
    }

    /// Decodes one record.
    #[inline(always)]
    pub fn decode(&self, raw: &RawEvent) -> Result<Event, DecodeError> {
        let kind = EventKind::from_u8(raw.kind).ok_or(DecodeError::UnknownKind {
            kind: raw.kind,
            sk: raw.sk,
        })?;
        let addrs = self.addrs(raw, kind)?;
        let flags = raw.flags;
        let state = self.state(raw.state);
        let body = match kind {
            EventKind::Timer => EventBody::Timer(TimerFiring {
                state_before: state,
                state_after: self.state(raw.new_state),
                keepopen: flags & FLAG_KEEPOPEN != 0,
                dead: flags & FLAG_DEAD != 0,
                owned: flags & FLAG_OWNED != 0,
                probes_before: raw.probes_out,
                probes_after: raw.probes_out_after,
                packets_out: raw.packets_out,
                unsent: raw.unsent,
                idle_ms: self.jiffies_to_ms(raw.idle_jiffies),
                settings: self.settings(raw),
                err_after: raw.err,
                next_in_ms: self.timer_in_ms(raw),
            }),
            EventKind::Ack => EventBody::Ack {
                probes: raw.probes_out,
            },
            EventKind::ResetSent => EventBody::ResetSent {
                active: flags & FLAG_ACTIVE != 0,
                reason: (flags & FLAG_HAS_REASON != 0).then(|| self.reset_reason(raw.reason)),
                state,
            },
            EventKind::ResetReceived => EventBody::ResetReceived {
                state,
                times: self.times(raw),
            },
            EventKind::Error => EventBody::Error {
                errno: raw.err.saturating_abs(),
                state,
            },
            EventKind::State => EventBody::State {
                old: state,
                new: self.state(raw.new_state),
                settings: self.settings(raw),
                process: process(raw),
                err: raw.err.wrapping_abs(),
                times: self.times(raw),
            },
            EventKind::Setsockopt => EventBody::Setsockopt {
                option: sockopt(raw.level, raw.optname).ok_or(DecodeError::UnknownSockOpt {
                    level: raw.level,
                    optname: raw.optname,
                    sk: raw.sk,
                })?,
                value: raw.optval,
                state,
                process: process(raw).ok_or(DecodeError::MissingProcess { kind, sk: raw.sk })?,
                settings: self.settings(raw),
            },
            EventKind::Snapshot => EventBody::Snapshot {
                state,
                settings: self.settings(raw),
                probes_out: raw.probes_out,
                packets_out: raw.packets_out,
                unsent: raw.unsent,
            },
            EventKind::Destroy => EventBody::Destroy,
            EventKind::Owner => EventBody::Owner {
                process: process(raw).ok_or(DecodeError::MissingProcess { kind, sk: raw.sk })?,
            },
        };
        Ok(Event {
            ts_ns: raw.ts_ns,
            sk: raw.sk,
            netns: raw.netns,
            addrs,
            in_timer: flags & FLAG_IN_TIMER != 0,
            body,
        })
    }

    fn state(&self, v: u8) -> TcpState {
        self.states[usize::from(v)]
    }

    fn jiffies_to_ms(&self, jiffies: u32) -> u64 {
        // No overflow: a 32-bit count times 1000 fits in 42 bits.
        u64::from(jiffies) * 1000 / self.hz
    }

    fn jiffies64_to_ms(&self, jiffies: u64) -> u64 {
        match jiffies.checked_mul(1000) {
            Some(ms) => ms / self.hz,
            None => (u128::from(jiffies) * 1000 / u128::from(self.hz)) as u64,
        }
    }

    /// Time until `timer_expires` from `jiffies`, when the timer is pending. Jiffies wrap: the
    /// difference is taken modulo 2^64 and read as signed; an expiry already past gives 0.
    fn timer_in_ms(&self, raw: &RawEvent) -> Option<u64> {
        if raw.flags & FLAG_TIMER_PENDING == 0 {
            return None;
        }
        let delta = raw.timer_expires.wrapping_sub(raw.jiffies) as i64;
        Some(self.jiffies64_to_ms(delta.max(0) as u64))
    }

    fn settings(&self, raw: &RawEvent) -> SockSettings {
        let secs = |jiffies: u32| (jiffies != 0).then(|| self.per_hz.div(jiffies));
        SockSettings {
            keepalive: raw.flags & FLAG_KEEPOPEN != 0,
            idle_s: secs(raw.keepalive_time),
            intvl_s: secs(raw.keepalive_intvl),
            cnt: (raw.keepalive_probes != 0).then_some(u32::from(raw.keepalive_probes)),
            user_timeout_ms: raw.user_timeout_ms,
            idle_default_s: self.per_hz.div(raw.sysctl_time),
            intvl_default_s: self.per_hz.div(raw.sysctl_intvl),
            cnt_default: u32::from(raw.sysctl_probes),
        }
    }

    fn times(&self, raw: &RawEvent) -> SockTimes {
        let ms = |j: u32| self.jiffies_to_ms(j);
        SockTimes {
            since_sent_ms: ms(raw.since_sent_jiffies),
            since_data_ms: ms(raw.since_data_jiffies),
            since_ack_ms: ms(raw.since_ack_jiffies),
            retransmits: raw.retransmits,
            unacked: raw.unacked,
            retransmitting_ms: (raw.retransmitting_ms != u32::MAX).then_some(u64::from(raw.retransmitting_ms)),
            unread: (raw.unread != u32::MAX).then_some(raw.unread),
        }
    }

    fn reset_reason(&self, v: u32) -> String {
        match self.tables.reset_reasons.iter().find(|(n, _)| *n == v) {
            Some((_, name)) => name.clone(),
            None => format!("unknown_{v}"),
        }
    }

    /// Local and remote address; `None` while the socket has neither port (not bound, not
    /// connected), whatever its family field says.
    fn addrs(
        &self,
        raw: &RawEvent,
        kind: EventKind,
    ) -> Result<Option<(SocketAddr, SocketAddr)>, DecodeError> {
        if raw.sport == 0 && raw.dport == 0 {
            return Ok(None);
        }
        if raw.family == self.tables.af_inet {
            let v4 = |a: &[u8; 16]| Ipv4Addr::new(a[0], a[1], a[2], a[3]);
            Ok(Some((
                SocketAddr::new(v4(&raw.saddr).into(), raw.sport),
                SocketAddr::new(v4(&raw.daddr).into(), raw.dport),
            )))
        } else if raw.family == self.tables.af_inet6 {
            // v4-mapped addresses (::ffff:a.b.c.d) stay IPv6: that is what the socket is.
            let v6 = |a: &[u8; 16], port| {
                SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(*a), port, 0, 0))
            };
            Ok(Some((v6(&raw.saddr, raw.sport), v6(&raw.daddr, raw.dport))))
        } else {
            Err(DecodeError::UnknownFamily {
                family: raw.family,
                kind,
                sk: raw.sk,
            })
        }
    }
}

/// One record as read from a ring buffer or a seq file (any alignment), not yet decoded.
pub fn raw_from_bytes(bytes: &[u8]) -> Result<RawEvent, DecodeError> {
    check_len(bytes)?;
    // SAFETY: the slice holds exactly size_of::<RawEvent>() bytes, `read_unaligned` has no
    // alignment requirement, and RawEvent is plain integers and byte arrays, so every bit
    // pattern is a valid value.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<RawEvent>()) })
}

/// An answer's short record ([`RawAck`]).
fn decode_ack(bytes: &[u8]) -> Result<Event, DecodeError> {
    // SAFETY: the slice holds exactly size_of::<RawAck>() bytes (the caller checked), and RawAck
    // is plain integers, so every bit pattern is a valid value.
    let raw = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<RawAck>()) };
    if raw.kind != EventKind::Ack as u8 {
        return Err(DecodeError::UnknownKind { kind: raw.kind, sk: raw.sk });
    }
    Ok(Event {
        ts_ns: raw.ts_ns,
        sk: raw.sk,
        netns: raw.netns,
        addrs: None,
        in_timer: false,
        body: EventBody::Ack { probes: raw.probes_out },
    })
}

/// The socket address of a raw record (its `sk` field, at the same offset in both record sizes),
/// without copying the record: for the event loop's prefetch pass. `None` for a record of neither
/// length.
pub fn raw_sk(bytes: &[u8]) -> Option<u64> {
    if bytes.len() != RAW_ACK_SIZE {
        check_len(bytes).ok()?;
    }
    let at = std::mem::offset_of!(RawEvent, sk);
    Some(u64::from_ne_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

fn check_len(bytes: &[u8]) -> Result<(), DecodeError> {
    if bytes.len() != RAW_EVENT_SIZE {
        return Err(DecodeError::BadLength {
            got: bytes.len(),
            expected: RAW_EVENT_SIZE,
        });
    }
    Ok(())
}

/// The bytes of a record, as the kernel side writes them (the inverse of [`raw_from_bytes`]).
pub fn raw_to_bytes(raw: &RawEvent) -> Vec<u8> {
    // SAFETY: RawEvent is `#[repr(C)]` plain integers and byte arrays without padding; the slice
    // covers exactly the value.
    unsafe { std::slice::from_raw_parts((raw as *const RawEvent).cast::<u8>(), RAW_EVENT_SIZE) }.to_vec()
}

fn process(raw: &RawEvent) -> Option<Process> {
    (raw.flags & FLAG_PROCESS != 0).then_some(Process {
        pid: raw.pid,
        tid: raw.tid,
        comm: raw.comm,
        cgroup_id: raw.cgroup_id,
    })
}

fn sockopt(level: i32, optname: i32) -> Option<SockOpt> {
    Some(match (level, optname) {
        (SOL_SOCKET, SO_KEEPALIVE) => SockOpt::KeepAlive,
        (SOL_TCP, TCP_KEEPIDLE) => SockOpt::KeepIdle,
        (SOL_TCP, TCP_KEEPINTVL) => SockOpt::KeepIntvl,
        (SOL_TCP, TCP_KEEPCNT) => SockOpt::KeepCnt,
        (SOL_TCP, TCP_USER_TIMEOUT) => SockOpt::UserTimeout,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn raw_sk_reads_the_socket_field_only() {
        let mut raw = RawEvent::zeroed();
        raw.sk = 0xffff_8881_0000_1234;
        let bytes = raw_to_bytes(&raw);
        assert_eq!(super::raw_sk(&bytes), Some(0xffff_8881_0000_1234));
        assert_eq!(super::raw_sk(&bytes[1..]), None);
    }

    fn ack_bytes(ack: &RawAck) -> Vec<u8> {
        // SAFETY: RawAck is `#[repr(C)]` plain integers without padding.
        unsafe { std::slice::from_raw_parts((ack as *const RawAck).cast::<u8>(), RAW_ACK_SIZE) }.to_vec()
    }

    #[test]
    fn an_answers_short_record_decodes_as_the_full_one_did() {
        let ack = RawAck { ts_ns: 7_000, netns: 4026531840, probes_out: 2, kind: EventKind::Ack as u8, pad: [0; 2], sk: 0xffff_8881_0000_1234 };
        let bytes = ack_bytes(&ack);
        assert_eq!(super::raw_sk(&bytes), Some(0xffff_8881_0000_1234));
        let mut full = raw(EventKind::Ack);
        full.sport = 0;
        full.dport = 0;
        full.family = 0;
        full.ts_ns = 7_000;
        full.netns = 4026531840;
        full.probes_out = 2;
        full.sk = 0xffff_8881_0000_1234;
        let d = decoder();
        assert_eq!(d.decode_bytes(&bytes).unwrap(), d.decode(&full).unwrap());
        // Any other kind in a record of that length is refused, not taken for an answer.
        let odd = RawAck { kind: EventKind::Destroy as u8, ..ack };
        assert!(matches!(d.decode_bytes(&ack_bytes(&odd)), Err(DecodeError::UnknownKind { .. })));
        assert!(matches!(d.decode_bytes(&bytes[1..]), Err(DecodeError::BadLength { got: 23, .. })));
    }

    use super::*;
    use std::net::IpAddr;

    const HZ: u32 = 250;

    fn decoder() -> Decoder {
        Decoder::new(DecodeTables::linux_defaults())
    }

    fn raw(kind: EventKind) -> RawEvent {
        let mut r = RawEvent::zeroed();
        r.kind = kind as u8;
        r.ts_ns = 1_000;
        r.sk = 0xffff_8880_1234_5600;
        r.netns = 4026531840;
        r.family = 2;
        r.saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        r.daddr[..4].copy_from_slice(&[127, 0, 0, 2]);
        r.sport = 40000;
        r.dport = 8080;
        r
    }

    fn as_bytes(r: &RawEvent) -> Vec<u8> {
        raw_to_bytes(r)
    }

    #[test]
    fn division_by_hz_is_exact() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for d in [1u32, 2, 3, 7, 100, 250, 300, 1000, 1024, 65_537, u32::MAX - 1, u32::MAX] {
            let f = DivU32::new(d);
            let edges = [0u32, 1, d - 1, d, d.saturating_add(1), u32::MAX - 1, u32::MAX];
            for n in edges.into_iter().chain((0..20_000).map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u32 >> (x % 32)
            })) {
                assert_eq!(f.div(n), n / d, "{n} / {d}");
            }
        }
        assert_eq!(DivU32::new(0).div(7), 7, "HZ 0 reads as 1");
    }

    #[test]
    fn ipv4_addresses_and_ports() {
        let ev = decoder().decode(&raw(EventKind::Destroy)).unwrap();
        let (l, r) = ev.addrs.unwrap();
        assert_eq!(l, "127.0.0.1:40000".parse::<SocketAddr>().unwrap());
        assert_eq!(r, "127.0.0.2:8080".parse::<SocketAddr>().unwrap());
        assert_eq!(ev.sk, 0xffff_8880_1234_5600);
        assert_eq!(ev.netns, 4026531840);
        assert_eq!(ev.ts_ns, 1_000);
        assert!(!ev.in_timer);
        assert_eq!(ev.body, EventBody::Destroy);
    }

    #[test]
    fn ipv6_addresses_and_v4_mapped_stay_v6() {
        let mut r = raw(EventKind::Destroy);
        r.family = 10;
        r.saddr = Ipv6Addr::LOCALHOST.octets();
        r.daddr = "::ffff:127.0.0.1".parse::<Ipv6Addr>().unwrap().octets();
        let (l, rem) = decoder().decode(&r).unwrap().addrs.unwrap();
        assert_eq!(l, "[::1]:40000".parse::<SocketAddr>().unwrap());
        assert_eq!(rem.ip(), IpAddr::V6("::ffff:127.0.0.1".parse().unwrap()));
        assert_eq!(rem.port(), 8080);
    }

    #[test]
    fn no_ports_means_no_addresses_even_without_family() {
        let mut r = raw(EventKind::Destroy);
        r.sport = 0;
        r.dport = 0;
        r.family = 0;
        assert_eq!(decoder().decode(&r).unwrap().addrs, None);
        // A bound but unconnected socket has addresses (remote port 0).
        let mut r = raw(EventKind::Destroy);
        r.dport = 0;
        let (_, rem) = decoder().decode(&r).unwrap().addrs.unwrap();
        assert_eq!(rem.port(), 0);
    }

    #[test]
    fn unknown_family_with_ports_is_an_error() {
        let mut r = raw(EventKind::Ack);
        r.family = 1; // AF_UNIX
        assert_eq!(
            decoder().decode(&r),
            Err(DecodeError::UnknownFamily {
                family: 1,
                kind: EventKind::Ack,
                sk: r.sk
            })
        );
    }

    #[test]
    fn timer_jiffies_and_settings() {
        let mut r = raw(EventKind::Timer);
        r.flags = FLAG_KEEPOPEN | FLAG_TIMER_PENDING;
        r.state = 1;
        r.new_state = 1;
        r.probes_out = 1;
        r.probes_out_after = 2;
        r.idle_jiffies = 3 * HZ + 5; // 3.02 s
        r.jiffies = 1_000_000;
        r.timer_expires = 1_000_000 + 2 * u64::from(HZ);
        r.keepalive_time = 10 * HZ;
        r.keepalive_intvl = 0;
        r.keepalive_probes = 4;
        r.sysctl_time = 7200 * HZ;
        r.sysctl_intvl = 75 * HZ;
        r.sysctl_probes = 9;
        r.user_timeout_ms = 0;
        r.err = 0;
        let ev = decoder().decode(&r).unwrap();
        let EventBody::Timer(t) = ev.body else {
            panic!("not a timer: {ev:?}")
        };
        assert_eq!(t.state_before, TcpState::Established);
        assert_eq!(t.state_after, TcpState::Established);
        assert!(t.keepopen && !t.dead && !t.owned);
        assert_eq!((t.probes_before, t.probes_after), (1, 2));
        assert_eq!(t.idle_ms, 3020);
        assert_eq!(t.next_in_ms, Some(2000));
        assert_eq!(
            t.settings,
            SockSettings {
                keepalive: true,
                idle_s: Some(10),
                intvl_s: None,
                cnt: Some(4),
                user_timeout_ms: 0,
                idle_default_s: 7200,
                intvl_default_s: 75,
                cnt_default: 9,
            }
        );
        assert_eq!(t.settings.effective_intvl_s(), 75);
    }

    #[test]
    fn timer_not_pending_and_jiffies_wrap() {
        let d = decoder();
        let mut r = raw(EventKind::Timer);
        r.flags = FLAG_OWNED | FLAG_DEAD;
        r.state = 5;
        r.new_state = 99;
        r.err = 110;
        let EventBody::Timer(t) = d.decode(&r).unwrap().body else {
            panic!()
        };
        assert_eq!(t.next_in_ms, None);
        assert!(t.owned && t.dead && !t.keepopen);
        assert_eq!(t.state_before, TcpState::FinWait2);
        assert_eq!(t.state_after, TcpState::Unknown(99));
        assert_eq!(t.err_after, 110);
        assert!(!t.settings.keepalive);

        // Expiry just after a jiffies wrap.
        r.flags = FLAG_TIMER_PENDING;
        r.jiffies = u64::MAX - 9;
        r.timer_expires = 15; // 25 jiffies later
        let EventBody::Timer(t) = d.decode(&r).unwrap().body else {
            panic!()
        };
        assert_eq!(t.next_in_ms, Some(100));
        // Expiry already past: 0, not a huge number.
        r.jiffies = 100;
        r.timer_expires = 90;
        let EventBody::Timer(t) = d.decode(&r).unwrap().body else {
            panic!()
        };
        assert_eq!(t.next_in_ms, Some(0));
    }

    #[test]
    fn hz_other_than_250() {
        let mut tables = DecodeTables::linux_defaults();
        tables.hz = 1000;
        let d = Decoder::new(tables);
        let mut r = raw(EventKind::Snapshot);
        r.flags = FLAG_TIMER_PENDING | FLAG_KEEPOPEN;
        r.state = 1;
        r.jiffies = 5000;
        r.timer_expires = 5250;
        r.keepalive_time = 30_000;
        r.probes_out = 2;
        r.packets_out = 1;
        r.unsent = 100;
        r.user_timeout_ms = 5000;
        let EventBody::Snapshot {
            state,
            settings,
            probes_out,
            packets_out,
            unsent,
        } = d.decode(&r).unwrap().body
        else {
            panic!()
        };
        assert_eq!(state, TcpState::Established);
        assert_eq!(settings.idle_s, Some(30));
        assert_eq!(settings.user_timeout_ms, 5000);
        assert_eq!((probes_out, packets_out, unsent), (2, 1, 100));
    }

    #[test]
    fn setsockopt_options_and_process() {
        let d = decoder();
        let mut r = raw(EventKind::Setsockopt);
        r.sport = 0;
        r.dport = 0;
        r.state = 7;
        r.flags = FLAG_PROCESS;
        r.pid = 42;
        r.tid = 43;
        r.cgroup_id = 7;
        r.comm[..4].copy_from_slice(b"curl");
        // The namespace's sysctls travel with the option (a fresh namespace has no other event).
        r.sysctl_time = 7200 * 250;
        r.sysctl_intvl = 75 * 250;
        r.sysctl_probes = 9;
        for (level, name, opt) in [
            (1, 9, SockOpt::KeepAlive),
            (6, 4, SockOpt::KeepIdle),
            (6, 5, SockOpt::KeepIntvl),
            (6, 6, SockOpt::KeepCnt),
            (6, 18, SockOpt::UserTimeout),
        ] {
            r.level = level;
            r.optname = name;
            r.optval = 17;
            let ev = d.decode(&r).unwrap();
            assert_eq!(ev.addrs, None);
            let EventBody::Setsockopt {
                option,
                value,
                state,
                process,
                settings,
            } = ev.body
            else {
                panic!()
            };
            assert_eq!((option, value, state), (opt, 17, TcpState::Close));
            assert_eq!((settings.idle_default_s, settings.intvl_default_s, settings.cnt_default), (7200, 75, 9));
            assert_eq!((process.pid, process.tid, process.cgroup_id), (42, 43, 7));
            assert_eq!(process.comm_str(), "curl");
        }
        r.level = 6;
        r.optname = 1; // TCP_NODELAY
        assert_eq!(
            d.decode(&r),
            Err(DecodeError::UnknownSockOpt {
                level: 6,
                optname: 1,
                sk: r.sk
            })
        );
        r.level = 1;
        r.optname = 9;
        r.flags = 0;
        assert!(matches!(
            d.decode(&r),
            Err(DecodeError::MissingProcess { .. })
        ));
    }

    #[test]
    fn owner_carries_the_process_and_requires_it() {
        let d = decoder();
        let mut r = raw(EventKind::Owner);
        r.flags = FLAG_PROCESS | FLAG_KEEPOPEN;
        r.pid = 4242;
        r.tid = 4243;
        r.cgroup_id = 9;
        r.comm[..5].copy_from_slice(b"nginx");
        let ev = d.decode_bytes(&as_bytes(&r)).unwrap();
        assert_eq!(ev.sk, r.sk);
        assert_eq!(ev.addrs.unwrap().0, "127.0.0.1:40000".parse::<SocketAddr>().unwrap());
        let EventBody::Owner { process } = ev.body else {
            panic!("{:?}", ev.body)
        };
        assert_eq!((process.pid, process.tid, process.cgroup_id), (4242, 4243, 9));
        assert_eq!(process.comm_str(), "nginx");
        r.flags = FLAG_KEEPOPEN;
        assert_eq!(
            d.decode(&r),
            Err(DecodeError::MissingProcess {
                kind: EventKind::Owner,
                sk: r.sk
            })
        );
    }

    #[test]
    fn raw_bytes_round_trip_keeps_the_socket_inode() {
        let mut r = raw(EventKind::Snapshot);
        r.sock_ino = 0x1_0000_0042;
        let bytes = raw_to_bytes(&r);
        assert_eq!(bytes.len(), RAW_EVENT_SIZE);
        assert_eq!(raw_from_bytes(&bytes).unwrap(), r);
        assert_eq!(
            raw_from_bytes(&bytes[1..]),
            Err(DecodeError::BadLength {
                got: RAW_EVENT_SIZE - 1,
                expected: RAW_EVENT_SIZE
            })
        );
    }

    #[test]
    fn state_event_process_only_with_flag() {
        let d = decoder();
        let mut r = raw(EventKind::State);
        r.state = 2;
        r.new_state = 1;
        r.pid = 42; // garbage without FLAG_PROCESS
        let EventBody::State {
            old, new, process, ..
        } = d.decode(&r).unwrap().body
        else {
            panic!()
        };
        assert_eq!(
            (old, new, process),
            (TcpState::SynSent, TcpState::Established, None)
        );
        r.flags = FLAG_PROCESS;
        let EventBody::State { process, .. } = d.decode(&r).unwrap().body else {
            panic!()
        };
        assert_eq!(process.unwrap().pid, 42);
    }

    #[test]
    fn resets_errors_and_in_timer() {
        let d = decoder();
        let mut r = raw(EventKind::ResetSent);
        r.state = 1;
        r.flags = FLAG_HAS_REASON | FLAG_ACTIVE | FLAG_IN_TIMER;
        r.reason = 15;
        let ev = d.decode(&r).unwrap();
        assert!(ev.in_timer);
        assert_eq!(
            ev.body,
            EventBody::ResetSent {
                active: true,
                reason: Some("tcp_keepalive_timeout".into()),
                state: TcpState::Established
            }
        );
        r.reason = 77;
        let EventBody::ResetSent { reason, .. } = d.decode(&r).unwrap().body else {
            panic!()
        };
        assert_eq!(reason.as_deref(), Some("unknown_77"));
        r.flags = 0;
        assert_eq!(
            d.decode(&r).unwrap().body,
            EventBody::ResetSent {
                active: false,
                reason: None,
                state: TcpState::Established
            }
        );

        let mut r = raw(EventKind::Error);
        r.err = 110;
        r.state = 1;
        r.flags = FLAG_IN_TIMER;
        let ev = d.decode(&r).unwrap();
        assert!(ev.in_timer);
        assert_eq!(
            ev.body,
            EventBody::Error {
                errno: 110,
                state: TcpState::Established
            }
        );

        let mut r = raw(EventKind::ResetReceived);
        r.state = 8;
        r.since_sent_jiffies = 25; // 100 ms at HZ 250
        r.since_data_jiffies = 300;
        r.since_ack_jiffies = 50;
        r.unacked = 77;
        r.retransmits = 0;
        r.retransmitting_ms = u32::MAX;
        r.unread = 1;
        let times = SockTimes {
            since_sent_ms: 100,
            since_data_ms: 1200,
            since_ack_ms: 200,
            retransmits: 0,
            unacked: 77,
            retransmitting_ms: None,
            unread: Some(1),
        };
        assert_eq!(
            d.decode(&r).unwrap().body,
            EventBody::ResetReceived {
                state: TcpState::CloseWait,
                times,
            }
        );
        // A close carries the same facts; a retransmission in progress has its waiting time.
        let mut r = raw(EventKind::State);
        r.state = 1;
        r.new_state = 7;
        r.err = 110;
        r.retransmits = 3;
        r.retransmitting_ms = 2500;
        let EventBody::State { times, err, .. } = d.decode(&r).unwrap().body else {
            panic!()
        };
        assert_eq!((err, times.retransmits, times.retransmitting_ms), (110, 3, Some(2500)));

        let mut r = raw(EventKind::Ack);
        r.probes_out = 3;
        assert_eq!(d.decode(&r).unwrap().body, EventBody::Ack { probes: 3 });
    }

    #[test]
    fn unknown_kind() {
        let mut r = raw(EventKind::Ack);
        r.kind = 0;
        assert_eq!(
            decoder().decode(&r),
            Err(DecodeError::UnknownKind { kind: 0, sk: r.sk })
        );
        r.kind = 200;
        assert!(matches!(
            decoder().decode_bytes(&as_bytes(&r)),
            Err(DecodeError::UnknownKind { kind: 200, .. })
        ));
    }

    #[test]
    fn bytes_length_checked_and_alignment_free() {
        let d = decoder();
        let mut r = raw(EventKind::Error);
        r.err = 104;
        let bytes = as_bytes(&r);
        assert_eq!(bytes.len(), RAW_EVENT_SIZE);
        assert_eq!(
            d.decode_bytes(&bytes[..RAW_EVENT_SIZE - 1]),
            Err(DecodeError::BadLength {
                got: RAW_EVENT_SIZE - 1,
                expected: RAW_EVENT_SIZE
            })
        );
        assert!(matches!(
            d.decode_bytes(&[]),
            Err(DecodeError::BadLength { got: 0, .. })
        ));
        // Misaligned copy inside a larger buffer.
        let mut buf = vec![0u8; RAW_EVENT_SIZE + 3];
        buf[3..].copy_from_slice(&bytes);
        assert_eq!(d.decode_bytes(&buf[3..]).unwrap(), d.decode(&r).unwrap());
        assert!(matches!(
            d.decode_bytes(&buf),
            Err(DecodeError::BadLength { got, .. }) if got == RAW_EVENT_SIZE + 3
        ));
        let ev = d.decode_bytes(&bytes).unwrap();
        assert_eq!(
            ev.body,
            EventBody::Error {
                errno: 104,
                state: TcpState::Unknown(0)
            }
        );
    }

    #[test]
    fn tables_drive_state_numbering() {
        // A kernel whose enum numbering differs: the decoder follows the tables, not constants.
        let mut tables = DecodeTables::linux_defaults();
        tables.tcp_states = vec![(3, TcpState::Established), (1, TcpState::Close)];
        let d = Decoder::new(tables);
        let mut r = raw(EventKind::State);
        r.state = 1;
        r.new_state = 3;
        let EventBody::State { old, new, .. } = d.decode(&r).unwrap().body else {
            panic!()
        };
        assert_eq!((old, new), (TcpState::Close, TcpState::Established));
    }
}
