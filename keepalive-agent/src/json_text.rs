//! Pieces of JSON text written straight into a byte buffer, shared by the two hand-written JSON
//! writers: `trace`'s record lines ([`crate::output::write_json_line`]) and `run`'s span lines
//! ([`crate::export::json::SpanWriter`]). Each writes the bytes serde_json writes for the same
//! value, without going through a serializer where nothing needs escaping.

use serde::Serialize;

use crate::clock::{Rfc3339, RFC3339_LEN};

/// An integer, through `itoa`.
#[inline]
pub fn int(buf: &mut Vec<u8>, i: impl itoa::Integer) {
    buf.extend_from_slice(itoa::Buffer::new().format(i).as_bytes());
}

/// A JSON string: copied between quotes when it holds nothing JSON escapes (control characters,
/// `"` and `\`; serde_json leaves every other byte as it is), else written by serde_json.
#[inline]
pub fn string(buf: &mut Vec<u8>, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        buf.push(b'"');
        buf.extend_from_slice(s.as_bytes());
        buf.push(b'"');
    } else {
        serde(buf, s);
    }
}

/// A JSON string the agent made itself from characters JSON never escapes (a time, an address,
/// one of its own names): copied between quotes without looking at it.
#[inline]
pub fn plain(buf: &mut Vec<u8>, s: &str) {
    debug_assert!(s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\'), "{s:?}");
    buf.reserve(s.len() + 2);
    buf.push(b'"');
    buf.extend_from_slice(s.as_bytes());
    buf.push(b'"');
}

/// Unix nanoseconds as an RFC 3339 string ([`Rfc3339`]).
#[inline]
pub fn time(buf: &mut Vec<u8>, unix_ns: i128) {
    let mut text = [0; RFC3339_LEN];
    match Rfc3339(unix_ns).write_ascii(&mut text) {
        Some(()) => {
            buf.push(b'"');
            buf.extend_from_slice(&text);
            buf.push(b'"');
        }
        None => serde(buf, &Rfc3339(unix_ns)),
    }
}

/// Any other value, through serde_json (floats, the rare string that needs escapes).
pub fn serde<T: Serialize + ?Sized>(buf: &mut Vec<u8>, v: &T) {
    // Writing into a Vec cannot fail, and the values written here always serialise.
    let _ = serde_json::to_writer(&mut *buf, v);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(f: impl FnOnce(&mut Vec<u8>)) -> String {
        let mut buf = Vec::new();
        f(&mut buf);
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn strings_and_times_are_what_serde_json_writes() {
        for s in ["", "plain", "caf\u{e9} \u{7f}", "quote \" here", "back\\slash", "tab\there", "nul\0", "\u{1f}"] {
            assert_eq!(written(|b| string(b, s)), serde_json::to_string(s).unwrap(), "{s:?}");
        }
        for t in [0, 1_700_000_000_123_456_789i128, -1, i128::from(i64::MAX) * 1_000_000_000] {
            assert_eq!(written(|b| time(b, t)), serde_json::to_string(&Rfc3339(t)).unwrap(), "{t}");
        }
        assert_eq!(written(|b| int(b, -42i64)), "-42");
    }
}
