//! The kernel's tick rate, `CONFIG_HZ` (jiffies per second).
//!
//! Sources, in order: `/proc/config.gz`, `/boot/config-$(uname -r)`, and as a last resort a
//! measurement: the `jiffies:` line of `/proc/timer_list` read twice about 250 ms apart (interval
//! taken on CLOCK_MONOTONIC), snapped to the nearest usual value.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The `CONFIG_HZ` values Linux offers.
pub const HZ_CANDIDATES: [u32; 4] = [100, 250, 300, 1000];

/// How far apart the two `/proc/timer_list` reads are.
const MEASURE_INTERVAL: Duration = Duration::from_millis(250);

/// Largest relative distance between a measured rate and the value it snaps to.
const MAX_SNAP_ERROR: f64 = 0.10;

/// No source gave HZ.
#[derive(Debug, thiserror::Error)]
#[error("cannot determine the kernel's HZ: {}", tried.join("; "))]
pub struct HzError {
    /// Why each source failed, in the order they were tried.
    pub tried: Vec<String>,
}

/// Where to look for HZ.
#[derive(Clone, Debug)]
pub struct HzSources {
    /// Gzipped kernel config (`/proc/config.gz`).
    pub config_gz: PathBuf,
    /// Plain kernel config (`/boot/config-$(uname -r)`).
    pub boot_config: PathBuf,
    /// `/proc/timer_list`, for measuring.
    pub timer_list: PathBuf,
}

impl HzSources {
    /// The standard locations for kernel release `release` (`uname -r`).
    pub fn system(release: &str) -> Self {
        HzSources {
            config_gz: PathBuf::from("/proc/config.gz"),
            boot_config: PathBuf::from(format!("/boot/config-{release}")),
            timer_list: PathBuf::from("/proc/timer_list"),
        }
    }
}

/// `CONFIG_HZ` from kernel config text (`CONFIG_HZ=250`); `None` when absent or not a positive
/// number. `CONFIG_HZ_250=y` and the like are not the value and are ignored.
pub fn parse_config_hz(text: &str) -> Option<u32> {
    text.lines().find_map(|line| {
        let (key, value) = line.trim().split_once('=')?;
        if key.trim() != "CONFIG_HZ" {
            return None;
        }
        value.trim().trim_matches('"').parse::<u32>().ok().filter(|&hz| hz > 0)
    })
}

/// The global `jiffies:` value from `/proc/timer_list` text. Reading stops at the first such line,
/// so the caller can timestamp it right away. Per-CPU lines such as `.idle_jiffies` do not count.
pub fn parse_timer_list_jiffies<R: BufRead>(mut reader: R) -> io::Result<Option<u64>> {
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        if let Some(rest) = line.trim_start().strip_prefix("jiffies:") {
            return Ok(rest.trim().parse::<u64>().ok());
        }
    }
}

/// Snaps a measured rate (`jiffies_delta` jiffies in `elapsed_ns`) to the nearest of
/// [`HZ_CANDIDATES`]; an error when the rate is not within 10 % of any of them.
pub fn snap_hz(jiffies_delta: u64, elapsed_ns: u64) -> Result<u32, String> {
    if elapsed_ns == 0 {
        return Err("no time elapsed between the two jiffies reads".to_string());
    }
    let rate = jiffies_delta as f64 * 1e9 / elapsed_ns as f64;
    let nearest = HZ_CANDIDATES
        .iter()
        .copied()
        .min_by(|&a, &b| (rate - a as f64).abs().total_cmp(&(rate - b as f64).abs()))
        .expect("candidates are not empty");
    let error = (rate - nearest as f64).abs() / nearest as f64;
    if error > MAX_SNAP_ERROR {
        return Err(format!(
            "measured {rate:.1} jiffies/s ({jiffies_delta} jiffies in {elapsed_ns} ns), \
             not within 10% of any of {HZ_CANDIDATES:?}"
        ));
    }
    Ok(nearest)
}

fn hz_from_gz(path: &Path) -> Result<u32, String> {
    let file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut text = String::new();
    flate2::read::GzDecoder::new(file)
        .read_to_string(&mut text)
        .map_err(|e| format!("{}: cannot decompress: {e}", path.display()))?;
    parse_config_hz(&text).ok_or_else(|| format!("{}: no CONFIG_HZ line", path.display()))
}

fn hz_from_plain(path: &Path) -> Result<u32, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse_config_hz(&text).ok_or_else(|| format!("{}: no CONFIG_HZ line", path.display()))
}

/// One `jiffies:` read, with the CLOCK_MONOTONIC time just after it.
fn read_jiffies(path: &Path) -> Result<(u64, u64), String> {
    let file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let jiffies = parse_timer_list_jiffies(BufReader::new(file))
        .map_err(|e| format!("{}: {e}", path.display()))?
        .ok_or_else(|| format!("{}: no `jiffies:` line", path.display()))?;
    Ok((jiffies, crate::clock::monotonic_now_ns()))
}

fn hz_measured(path: &Path) -> Result<u32, String> {
    let (j1, t1) = read_jiffies(path)?;
    std::thread::sleep(MEASURE_INTERVAL);
    let (j2, t2) = read_jiffies(path)?;
    let delta =
        j2.checked_sub(j1).ok_or_else(|| format!("{}: jiffies went backwards ({j1} then {j2})", path.display()))?;
    snap_hz(delta, t2.saturating_sub(t1)).map_err(|e| format!("{}: {e}", path.display()))
}

/// One way of finding HZ: the value, or why it could not be had.
type Source = fn(&HzSources) -> Result<u32, String>;

/// HZ from the first source that gives it.
pub fn detect(sources: &HzSources) -> Result<u32, HzError> {
    let attempts: [(&str, Source); 3] = [
        ("kernel config", |s| hz_from_gz(&s.config_gz)),
        ("kernel config", |s| hz_from_plain(&s.boot_config)),
        ("measured", |s| hz_measured(&s.timer_list)),
    ];
    let mut tried = Vec::new();
    for (how, attempt) in attempts {
        match attempt(sources) {
            Ok(hz) => {
                log::debug!("HZ = {hz} ({how}; earlier sources: {tried:?})");
                return Ok(hz);
            }
            Err(why) => tried.push(why),
        }
    }
    Err(HzError { tried })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::{Cursor, Write};

    /// A directory under the system temp dir, removed on drop.
    pub(crate) struct TempDir(pub(crate) PathBuf);

    impl TempDir {
        pub(crate) fn new(tag: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("keepalive-hz-{tag}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const CONFIG: &str = "\
# CONFIG_HZ_PERIODIC is not set
# CONFIG_HZ_100 is not set
CONFIG_HZ_250=y
# CONFIG_HZ_300 is not set
CONFIG_HZ_FOO=1000
CONFIG_HZ=250
CONFIG_SCHED_HRTICK=y
";

    #[test]
    fn config_parsing() {
        assert_eq!(parse_config_hz(CONFIG), Some(250));
        assert_eq!(parse_config_hz("CONFIG_HZ_1000=y\nCONFIG_HZ=1000\n"), Some(1000));
        assert_eq!(parse_config_hz("CONFIG_HZ_1000=y\n# CONFIG_HZ is not set\n"), None);
        assert_eq!(parse_config_hz("CONFIG_HZ=abc\n"), None);
        assert_eq!(parse_config_hz("CONFIG_HZ=0\n"), None);
        assert_eq!(parse_config_hz(""), None);
    }

    #[test]
    fn timer_list_parsing() {
        let text = "\
Timer List Version: v0.10
cpu: 0
  .idle_jiffies   : 4295030404
  .last_jiffies   : 4295030406
jiffies: 4295030407
cpu: 1
jiffies: 4295030409
";
        assert_eq!(parse_timer_list_jiffies(Cursor::new(text)).unwrap(), Some(4295030407));
        assert_eq!(parse_timer_list_jiffies(Cursor::new("  .idle_jiffies : 5\n")).unwrap(), None);
        assert_eq!(parse_timer_list_jiffies(Cursor::new("jiffies: x\n")).unwrap(), None);
    }

    #[test]
    fn snapping() {
        // 250 ms windows, with a jiffy of quantisation either way.
        assert_eq!(snap_hz(62, 250_000_000), Ok(250));
        assert_eq!(snap_hz(63, 250_000_000), Ok(250));
        assert_eq!(snap_hz(75, 250_000_000), Ok(300));
        assert_eq!(snap_hz(24, 250_000_000), Ok(100));
        assert_eq!(snap_hz(26, 250_000_000), Ok(100));
        assert_eq!(snap_hz(251, 251_000_000), Ok(1000));
        // 500 jiffies/s is no Linux HZ.
        assert!(snap_hz(125, 250_000_000).is_err());
        assert!(snap_hz(10, 0).is_err());
    }

    #[test]
    fn sources_in_order() {
        let dir = TempDir::new("sources");
        let gz = dir.0.join("config.gz");
        let plain = dir.0.join("config");
        let missing = dir.0.join("missing");
        let mut enc = flate2::write::GzEncoder::new(File::create(&gz).unwrap(), flate2::Compression::fast());
        enc.write_all(b"CONFIG_HZ_300=y\nCONFIG_HZ=300\n").unwrap();
        enc.finish().unwrap();
        std::fs::write(&plain, "CONFIG_HZ=1000\n").unwrap();

        let src = |c: &Path, b: &Path, t: &Path| HzSources {
            config_gz: c.to_path_buf(),
            boot_config: b.to_path_buf(),
            timer_list: t.to_path_buf(),
        };
        assert_eq!(detect(&src(&gz, &plain, &missing)).unwrap(), 300);
        assert_eq!(detect(&src(&missing, &plain, &missing)).unwrap(), 1000);
        // A plain file is not gzip: falls through to the next source.
        assert_eq!(detect(&src(&plain, &plain, &missing)).unwrap(), 1000);
        let err = detect(&src(&missing, &missing, &missing)).unwrap_err();
        assert_eq!(err.tried.len(), 3, "{err}");
        assert!(err.to_string().contains(&missing.display().to_string()), "{err}");
    }

    /// The system's own sources; the measurement (root only: /proc/timer_list is 0400) must agree
    /// with the kernel config when both are available.
    #[test]
    fn system_hz_and_measurement_agree() {
        let release = crate::kernel::kernel_release().unwrap();
        let sys = HzSources::system(&release);
        let configured = hz_from_gz(&sys.config_gz).or_else(|_| hz_from_plain(&sys.boot_config));
        let measured = hz_measured(&sys.timer_list);
        match (&configured, &measured) {
            (Ok(c), Ok(m)) => assert_eq!(c, m, "config says {c}, measurement says {m}"),
            (Err(why), _) | (_, Err(why)) => eprintln!("partial check only: {why}"),
        }
        match (configured, measured) {
            (Err(_), Err(_)) => assert!(detect(&sys).is_err()),
            (Ok(hz), _) | (_, Ok(hz)) => assert_eq!(detect(&sys).unwrap(), hz),
        }
    }
}
