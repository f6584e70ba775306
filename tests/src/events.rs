//! Reading the agent's JSON events (one object per line on stdout).
use std::net::SocketAddr;

use serde_json::Value;

use crate::tcp::fmt_addr;

/// The `event` key ("" when missing).
pub fn kind(e: &Value) -> &str {
    e.get("event").and_then(Value::as_str).unwrap_or("")
}

pub fn str_of<'a>(e: &'a Value, key: &str) -> Option<&'a str> {
    e.get(key).and_then(Value::as_str)
}

pub fn u64_of(e: &Value, key: &str) -> Option<u64> {
    e.get(key).and_then(Value::as_u64)
}

pub fn bool_of(e: &Value, key: &str) -> Option<bool> {
    e.get(key).and_then(Value::as_bool)
}

/// Whether `e` belongs to the connection with these local and remote addresses.
pub fn is_conn(e: &Value, local: SocketAddr, remote: SocketAddr) -> bool {
    str_of(e, "local") == Some(fmt_addr(local).as_str())
        && str_of(e, "remote") == Some(fmt_addr(remote).as_str())
}

/// The events of one connection, in order.
pub fn of_conn(events: &[Value], local: SocketAddr, remote: SocketAddr) -> Vec<Value> {
    events
        .iter()
        .filter(|e| is_conn(e, local, remote))
        .cloned()
        .collect()
}

/// Events of the given kind.
pub fn of_kind<'a>(events: &'a [Value], k: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| kind(e) == k).collect()
}

/// Index of the first event of kind `k` matching `pred`.
pub fn position(events: &[Value], k: &str, pred: impl Fn(&Value) -> bool) -> Option<usize> {
    events.iter().position(|e| kind(e) == k && pred(e))
}

/// Index of the last event of kind `k`.
pub fn last_position(events: &[Value], k: &str) -> Option<usize> {
    events.iter().rposition(|e| kind(e) == k)
}

/// Timestamp of an event in seconds since the Unix epoch; panics if `ts` is missing or malformed.
pub fn ts(e: &Value) -> f64 {
    let s = str_of(e, "ts").unwrap_or_else(|| panic!("event without ts: {e}"));
    parse_rfc3339(s).unwrap_or_else(|| panic!("ts is not RFC 3339: {s:?} in {e}"))
}

/// One event per line, for panic messages.
pub fn render(events: &[Value]) -> String {
    let mut s = String::new();
    for e in events {
        s.push_str("  ");
        s.push_str(&e.to_string());
        s.push('\n');
    }
    s
}

/// Parses an RFC 3339 timestamp (`2025-11-21T13:25:00.123456789Z`, `...+02:00`) into seconds since
/// the Unix epoch.
pub fn parse_rfc3339(s: &str) -> Option<f64> {
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        if t.bytes().all(|c| c.is_ascii_digit()) {
            t.parse().ok()
        } else {
            None
        }
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    let mut frac = 0.0;
    if b.get(i) == Some(&b'.') {
        let start = i + 1;
        i = start;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return None;
        }
        frac = format!("0.{}", &s[start..i]).parse().ok()?;
    }
    let offset = match &s[i..] {
        "Z" | "z" => 0,
        rest if rest.len() == 6
            && matches!(rest.as_bytes()[0], b'+' | b'-')
            && rest.as_bytes()[3] == b':' =>
        {
            let oh = num(i + 1..i + 3)?;
            let om = num(i + 4..i + 6)?;
            let o = oh * 3600 + om * 60;
            if rest.starts_with('-') {
                -o
            } else {
                o
            }
        }
        _ => return None,
    };
    let days = days_from_civil(y, mo, d);
    Some((days * 86400 + h * 3600 + mi * 60 + sec - offset) as f64 + frac)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0.0));
        assert_eq!(parse_rfc3339("2000-03-01T00:00:00Z"), Some(951868800.0));
        assert_eq!(parse_rfc3339("2025-11-21T13:25:00Z"), Some(1763731500.0));
        let t = parse_rfc3339("2025-11-21T13:25:00.25Z").unwrap();
        assert!((t - 1763731500.25).abs() < 1e-6);
        let t = parse_rfc3339("2025-11-21T13:25:00.123456789Z").unwrap();
        assert!((t - 1_763_731_500.123_457).abs() < 1e-5);
        assert_eq!(
            parse_rfc3339("2025-11-21T15:25:00+02:00"),
            Some(1763731500.0)
        );
        assert_eq!(
            parse_rfc3339("2025-11-21T11:25:00-02:00"),
            Some(1763731500.0)
        );
        assert_eq!(parse_rfc3339("2025-11-21 13:25:00"), None);
        assert_eq!(parse_rfc3339("2025-13-21T13:25:00Z"), None);
        assert_eq!(parse_rfc3339("2025-11-21T13:25:00.Z"), None);
        assert_eq!(parse_rfc3339("garbage"), None);
    }

    #[test]
    fn conn_filter() {
        let local: SocketAddr = "[::1]:40000".parse().unwrap();
        let remote: SocketAddr = "[::1]:5432".parse().unwrap();
        let evs: Vec<Value> = vec![
            serde_json::json!({"event": "probe", "local": "[::1]:40000", "remote": "[::1]:5432", "probe": 1}),
            serde_json::json!({"event": "probe", "local": "[::1]:5432", "remote": "[::1]:40000", "probe": 1}),
            serde_json::json!({"event": "ack", "local": "127.0.0.1:40000", "remote": "127.0.0.1:5432"}),
        ];
        let mine = of_conn(&evs, local, remote);
        assert_eq!(mine.len(), 1);
        assert_eq!(u64_of(&mine[0], "probe"), Some(1));
        assert_eq!(kind(&mine[0]), "probe");
    }
}
