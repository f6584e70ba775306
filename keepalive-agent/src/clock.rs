//! Kernel monotonic time → wall-clock time.
//!
//! Every kernel event carries `bpf_ktime_get_ns()`, i.e. CLOCK_MONOTONIC. The agent converts it with
//! an offset `REALTIME - MONOTONIC` measured in user space: it reads the two clocks in the order
//! MONOTONIC, REALTIME, MONOTONIC several times and keeps the sample with the narrowest bracket, so
//! the offset is known to within that bracket (typically well under a microsecond). The offset is
//! re-measured periodically ([`WallClock::refresh`]) so that NTP steps of the wall clock are
//! followed; converted times are then exact to within the bracket plus any wall-clock slew since the
//! last refresh.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Converts CLOCK_MONOTONIC nanoseconds to wall-clock time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WallClock {
    /// REALTIME - MONOTONIC, in nanoseconds.
    offset_ns: i128,
    /// Width of the bracket the offset was measured in (uncertainty), ns.
    uncertainty_ns: u64,
}

fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer to a timespec; clock ids are constants supported by Linux.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

/// Current CLOCK_MONOTONIC in nanoseconds (the clock of `bpf_ktime_get_ns`).
pub fn monotonic_now_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC) as u64
}

impl WallClock {
    /// Measures the offset now.
    pub fn measure() -> Self {
        let mut best = WallClock { offset_ns: 0, uncertainty_ns: u64::MAX };
        for _ in 0..16 {
            let m1 = clock_ns(libc::CLOCK_MONOTONIC);
            let r = clock_ns(libc::CLOCK_REALTIME);
            let m2 = clock_ns(libc::CLOCK_MONOTONIC);
            let width = (m2 - m1).max(0) as u64;
            if width < best.uncertainty_ns {
                best = WallClock { offset_ns: r - (m1 + m2) / 2, uncertainty_ns: width };
            }
        }
        best
    }

    /// A clock with a fixed offset (tests).
    pub fn with_offset_ns(offset_ns: i128) -> Self {
        WallClock { offset_ns, uncertainty_ns: 0 }
    }

    /// Re-measures the offset (call every few seconds).
    pub fn refresh(&mut self) {
        *self = Self::measure();
    }

    pub fn uncertainty_ns(&self) -> u64 {
        self.uncertainty_ns
    }

    /// Wall-clock nanoseconds since the Unix epoch for a monotonic timestamp.
    pub fn to_unix_ns(&self, mono_ns: u64) -> i128 {
        mono_ns as i128 + self.offset_ns
    }

    /// Wall-clock time for a monotonic timestamp.
    pub fn to_system_time(&self, mono_ns: u64) -> SystemTime {
        let ns = self.to_unix_ns(mono_ns);
        if ns >= 0 {
            UNIX_EPOCH + Duration::from_nanos(ns as u64)
        } else {
            UNIX_EPOCH
        }
    }
}

/// A Unix time in nanoseconds, displayed as RFC 3339 UTC with microseconds
/// (`2026-11-21T13:45:01.123456Z`), truncated (never rounded into the next second). Serialises as
/// that string without allocating.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rfc3339(pub i128);

/// Length of [`Rfc3339`]'s text: `YYYY-MM-DDTHH:MM:SS.ffffffZ`.
pub(crate) const RFC3339_LEN: usize = 27;

thread_local! {
    /// The second last formatted on this thread and its `YYYY-MM-DDTHH:MM:SS`: records come in time
    /// order, so consecutive ones share it and only their microseconds are formatted (the calendar
    /// conversion showed in `trace`'s profile).
    static SECOND: std::cell::Cell<Option<(i64, [u8; 19])>> = const { std::cell::Cell::new(None) };
}

impl Rfc3339 {
    /// The text, written into `buf`; `None` outside the years jiff formats (-9999..=9999) or
    /// before year 0 (a sign changes the length).
    pub(crate) fn write_to<'b>(&self, buf: &'b mut [u8; RFC3339_LEN]) -> Option<&'b str> {
        self.write_ascii(buf)?;
        std::str::from_utf8(buf).ok()
    }

    /// [`Self::write_to`] as bytes (ASCII), for writers that append bytes. The arithmetic is on
    /// `i64` nanoseconds (to 2262; later instants go to the `None` path): 128-bit division is a
    /// library call.
    pub(crate) fn write_ascii(&self, buf: &mut [u8; RFC3339_LEN]) -> Option<()> {
        let ns = i64::try_from(self.0).ok()?;
        let secs = ns.div_euclid(1_000_000_000);
        let mut micros = (ns.rem_euclid(1_000_000_000) / 1_000) as u32;
        let prefix = SECOND.with(|cell| match cell.get() {
            Some((s, p)) if s == secs => Some(p),
            _ => {
                let text = format!("{:.0}", jiff::Timestamp::from_second(secs).ok()?);
                let p: [u8; 19] = text.as_bytes().get(..19)?.try_into().ok()?;
                (text.len() == 20).then(|| cell.set(Some((secs, p))))?;
                Some(p)
            }
        })?;
        buf[..19].copy_from_slice(&prefix);
        buf[19] = b'.';
        for digit in buf[20..26].iter_mut().rev() {
            *digit = b'0' + (micros % 10) as u8;
            micros /= 10;
        }
        buf[26] = b'Z';
        Some(())
    }
}

impl std::fmt::Display for Rfc3339 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(text) = self.write_to(&mut [0; RFC3339_LEN]) {
            return f.write_str(text);
        }
        let ns = self.0 - self.0.rem_euclid(1_000);
        match jiff::Timestamp::from_nanosecond(ns) {
            Ok(t) => write!(f, "{t:.6}"),
            // Outside jiff's range (years -9999..=9999): the number, rather than nothing.
            Err(_) => write!(f, "{}", self.0),
        }
    }
}

impl serde::Serialize for Rfc3339 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.write_to(&mut [0; RFC3339_LEN]) {
            Some(text) => s.serialize_str(text),
            None => s.collect_str(self),
        }
    }
}

/// Formats Unix nanoseconds as RFC 3339 UTC with microseconds: `2026-11-21T13:45:01.123456Z`.
pub fn rfc3339(unix_ns: i128) -> String {
    Rfc3339(unix_ns).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000Z");
        // 2000-02-29T12:34:56.789012Z (leap day)
        assert_eq!(rfc3339(951_827_696_789_012_345), "2000-02-29T12:34:56.789012Z");
        assert_eq!(rfc3339(1_795_000_000_000_000_000), "2026-11-18T11:06:40.000000Z");
        assert_eq!(rfc3339(1_700_000_000_999_999_999), "2023-11-14T22:13:20.999999Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59.999999Z");
    }

    #[test]
    fn fast_text_is_jiffs() {
        let jiff_text = |ns: i128| format!("{:.6}", jiff::Timestamp::from_nanosecond(ns - ns.rem_euclid(1_000)).unwrap());
        // Across second boundaries both ways, before 1970, and far apart (the cached second changes).
        let mut ns: i128 = -3_000_000_123;
        while ns < 3_000_000_000 {
            assert_eq!(rfc3339(ns), jiff_text(ns), "{ns}");
            ns += 123_456_789;
        }
        for ns in [0, 1_795_000_000_999_999_999, 253_402_207_199_999_999_999, -62_135_596_800_000_000_000, 951_827_696_789_012_345] {
            assert_eq!(rfc3339(ns), jiff_text(ns), "{ns}");
        }
        // Before year 0 and outside jiff's range: the slow path, as before.
        assert_eq!(rfc3339(-62_167_219_200_000_000_001), jiff_text(-62_167_219_200_000_000_001));
        assert_eq!(rfc3339(i128::MAX), i128::MAX.to_string());
    }

    #[test]
    fn conversion_tracks_system_time() {
        let clock = WallClock::measure();
        let mono = monotonic_now_ns();
        let wall = clock.to_system_time(mono);
        let now = SystemTime::now();
        let diff = now.duration_since(wall).unwrap_or_else(|e| e.duration());
        assert!(diff < Duration::from_millis(50), "converted time off by {diff:?}");
        assert!(clock.uncertainty_ns() < 1_000_000);
    }

    #[test]
    fn fixed_offset() {
        let c = WallClock::with_offset_ns(1_000);
        assert_eq!(c.to_unix_ns(5), 1_005);
    }
}
