//! Compact forms of what the engine keeps for every tracked connection: its addresses (38 bytes
//! instead of two 32-byte `SocketAddr`s) and keep-alive settings (23 bytes instead of 44). Each
//! unpacks to exactly the value packed, within the ranges the kernel's fields have.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use crate::event::SockSettings;

/// Local and remote address. IPv4 addresses use the first 4 bytes of each array. The IPv6 flow
/// label and scope id are not kept (the kernel events carry neither: they are always 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct PackedAddrs {
    local: [u8; 16],
    remote: [u8; 16],
    local_port: u16,
    remote_port: u16,
    v6: bool,
}

fn ip_bytes(a: &SocketAddr) -> [u8; 16] {
    match a {
        SocketAddr::V4(a) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&a.ip().octets());
            b
        }
        SocketAddr::V6(a) => a.ip().octets(),
    }
}

impl PackedAddrs {
    /// Packs a pair of the same family (a socket's two ends always are; a mixed pair keeps the
    /// local end's family).
    pub fn new(local: &SocketAddr, remote: &SocketAddr) -> Self {
        PackedAddrs {
            local: ip_bytes(local),
            remote: ip_bytes(remote),
            local_port: local.port(),
            remote_port: remote.port(),
            v6: local.is_ipv6(),
        }
    }

    fn one(&self, ip: &[u8; 16], port: u16) -> SocketAddr {
        if self.v6 {
            SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(*ip), port, 0, 0))
        } else {
            SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]), port))
        }
    }

    #[inline]
    pub fn local(&self) -> SocketAddr {
        self.one(&self.local, self.local_port)
    }

    #[inline]
    pub fn remote(&self) -> SocketAddr {
        self.one(&self.remote, self.remote_port)
    }
}

const SET_KEEPALIVE: u8 = 1 << 0;
const SET_IDLE: u8 = 1 << 1;
const SET_INTVL: u8 = 1 << 2;
const SET_CNT: u8 = 1 << 3;

/// [`SockSettings`] in 23 bytes. Probe counts are 8 bits, as in the kernel (`keepalive_probes`,
/// `sysctl_tcp_keepalive_probes`; `TCP_KEEPCNT` is at most 127); larger values saturate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct PackedSettings {
    idle_s: u32,
    intvl_s: u32,
    user_timeout_ms: u32,
    idle_default_s: u32,
    intvl_default_s: u32,
    cnt: u8,
    cnt_default: u8,
    /// `SET_*` bits: `keepalive`, and which of the options are set.
    bits: u8,
}

fn u8_of(v: u32) -> u8 {
    u8::try_from(v).unwrap_or(u8::MAX)
}

impl From<&SockSettings> for PackedSettings {
    #[inline]
    fn from(s: &SockSettings) -> Self {
        let bit = |on: bool, b: u8| if on { b } else { 0 };
        PackedSettings {
            idle_s: s.idle_s.unwrap_or(0),
            intvl_s: s.intvl_s.unwrap_or(0),
            user_timeout_ms: s.user_timeout_ms,
            idle_default_s: s.idle_default_s,
            intvl_default_s: s.intvl_default_s,
            cnt: u8_of(s.cnt.unwrap_or(0)),
            cnt_default: u8_of(s.cnt_default),
            bits: bit(s.keepalive, SET_KEEPALIVE)
                | bit(s.idle_s.is_some(), SET_IDLE)
                | bit(s.intvl_s.is_some(), SET_INTVL)
                | bit(s.cnt.is_some(), SET_CNT),
        }
    }
}

impl PackedSettings {
    #[inline]
    pub fn unpack(&self) -> SockSettings {
        let set = |b: u8| self.bits & b != 0;
        SockSettings {
            keepalive: set(SET_KEEPALIVE),
            idle_s: set(SET_IDLE).then_some(self.idle_s),
            intvl_s: set(SET_INTVL).then_some(self.intvl_s),
            cnt: set(SET_CNT).then_some(u32::from(self.cnt)),
            user_timeout_ms: self.user_timeout_ms,
            idle_default_s: self.idle_default_s,
            intvl_default_s: self.intvl_default_s,
            cnt_default: u32::from(self.cnt_default),
        }
    }

    /// `SO_KEEPALIVE`.
    #[inline]
    pub fn keepalive(&self) -> bool {
        self.bits & SET_KEEPALIVE != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip() {
        for (l, r) in [
            ("127.0.0.1:40000", "10.1.2.3:8080"),
            ("0.0.0.0:0", "0.0.0.0:0"),
            ("[::1]:40000", "[::ffff:127.0.0.1]:443"),
            ("[2001:db8::7]:1", "[fe80::1]:65535"),
        ] {
            let (l, r): (SocketAddr, SocketAddr) = (l.parse().unwrap(), r.parse().unwrap());
            let p = PackedAddrs::new(&l, &r);
            assert_eq!((p.local(), p.remote()), (l, r));
        }
    }

    #[test]
    fn settings_round_trip() {
        let base = SockSettings { idle_default_s: 7200, intvl_default_s: 75, cnt_default: 9, ..Default::default() };
        for s in [
            base,
            SockSettings { keepalive: true, idle_s: Some(1), intvl_s: Some(0), cnt: Some(127), ..base },
            SockSettings { keepalive: true, cnt: Some(0), user_timeout_ms: 5000, ..base },
            SockSettings { idle_s: Some(u32::MAX), intvl_s: Some(32767), cnt_default: 255, ..base },
        ] {
            let p = PackedSettings::from(&s);
            assert_eq!(p.unpack(), s);
            assert_eq!(p.keepalive(), s.keepalive);
        }
        assert!(std::mem::size_of::<PackedSettings>() <= 24);
        assert!(std::mem::size_of::<PackedAddrs>() <= 38);
    }
}
