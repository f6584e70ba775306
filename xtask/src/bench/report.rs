//! Results of each part (kept as JSON under target/bench) and the BENCHMARKS.md they make.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use super::sys::Machine;
use super::Part;

/// One target and what was measured against it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Verdict {
    pub what: String,
    pub target: String,
    pub measured: String,
    /// None: informational (no target).
    pub met: Option<bool>,
}

impl Verdict {
    pub fn new(what: impl Into<String>, target: impl Into<String>, measured: impl Into<String>, met: Option<bool>) -> Verdict {
        Verdict { what: what.into(), target: target.into(), measured: measured.into(), met }
    }
}

/// A part's results: its section of the report and its verdicts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Section {
    pub key: String,
    pub title: String,
    pub markdown: String,
    pub verdicts: Vec<Verdict>,
    /// Filled by [`Section::stamp`].
    #[serde(default)]
    pub measured_at: String,
    #[serde(default)]
    pub duration_s: f64,
    /// 1-, 5-, 15-minute load averages when the part started (before its own load).
    #[serde(default)]
    pub load_before: String,
    /// Share of the CPUs in use (by anything) in the 2 s before the part started.
    #[serde(default)]
    pub busy_before: f64,
    #[serde(default)]
    pub kernel: String,
    /// The code measured: commit, and whether the work tree had changes.
    #[serde(default)]
    pub code: String,
}

impl Section {
    pub fn new(part: Part, title: &str) -> Section {
        Section {
            key: part.key().to_string(),
            title: title.to_string(),
            markdown: String::new(),
            verdicts: Vec::new(),
            measured_at: String::new(),
            duration_s: 0.0,
            load_before: String::new(),
            busy_before: f64::NAN,
            kernel: String::new(),
            code: String::new(),
        }
    }

    /// Appends a line of markdown.
    pub fn line(&mut self, s: impl AsRef<str>) {
        self.markdown.push_str(s.as_ref());
        self.markdown.push('\n');
    }

    pub fn verdict(&mut self, v: Verdict) {
        self.verdicts.push(v);
    }

    pub fn stamp(&mut self, duration_s: f64, load_before: (f64, f64, f64), busy_before: f64) {
        self.busy_before = busy_before;
        self.measured_at = utc_now();
        self.duration_s = duration_s;
        let (l1, l5, l15) = load_before;
        self.load_before = format!("{l1:.2} {l5:.2} {l15:.2}");
        self.kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
        self.code = code_version();
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        let p = dir.join(format!("{}.json", self.key));
        std::fs::write(&p, serde_json::to_vec_pretty(self)?).with_context(|| p.display().to_string())
    }
}

/// The commit measured (read-only git queries), `+changes` when the work tree differs from it.
fn code_version() -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let Some(head) = git(&["rev-parse", "--short", "HEAD"]) else {
        return "unknown".into();
    };
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    if dirty {
        format!("{head}+changes")
    } else {
        head
    }
}

/// `YYYY-MM-DD HH:MM:SSZ` now.
pub fn utc_now() -> String {
    utc(SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) as i64)
}

/// `YYYY-MM-DD HH:MM:SSZ` of a Unix time.
fn utc(secs: i64) -> String {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Static analysis text kept with the bench code (profiles, causes, recommendations).
const NOTES: &str = include_str!("notes.md");

/// Where a results directory keeps the "before" results (`--baseline`).
pub const BASELINE_DIR: &str = "baseline";

/// Every part's saved section in `dir` (parts without results are left out).
fn load_sections(dir: &Path) -> Vec<Section> {
    let mut sections = Vec::new();
    for part in Part::ALL {
        let p = dir.join(format!("{}.json", part.key()));
        if let Ok(bytes) = std::fs::read(&p) {
            match serde_json::from_slice::<Section>(&bytes) {
                Ok(s) => sections.push(s),
                Err(e) => log::warn!("ignoring {}: {e}", p.display()),
            }
        }
    }
    sections
}

/// Copies the results in `from` (a previous run's results directory) into `results/baseline`,
/// replacing what was there: the "before" of the report until the next `--baseline`.
pub fn keep_baseline(results: &Path, from: &Path) -> Result<()> {
    let dest = results.join(BASELINE_DIR);
    if dest.exists() {
        std::fs::remove_dir_all(&dest).with_context(|| format!("removing {}", dest.display()))?;
    }
    std::fs::create_dir_all(&dest).with_context(|| format!("creating {}", dest.display()))?;
    let mut copied = 0;
    for part in Part::ALL {
        let name = format!("{}.json", part.key());
        if from.join(&name).is_file() {
            std::fs::copy(from.join(&name), dest.join(&name)).with_context(|| format!("copying {}", from.join(&name).display()))?;
            copied += 1;
        }
    }
    if copied == 0 {
        anyhow::bail!("--baseline {}: no part results (<part>.json) in it", from.display());
    }
    let _ = std::fs::copy(from.join("command"), dest.join("command"));
    Ok(())
}

/// The baseline's measure of the same part and name, if any.
fn before_of<'a>(before: &'a [Section], key: &str, what: &str) -> Option<&'a Verdict> {
    before.iter().find(|s| s.key == key)?.verdicts.iter().find(|v| v.what == what)
}

/// "Before → now" table of a section's measures, when the baseline has the part.
fn before_after(md: &mut String, s: &Section, before: &[Section]) {
    let Some(b) = before.iter().find(|b| b.key == s.key) else { return };
    let _ = writeln!(
        md,
        "Before and now (before: measured {} on Linux {}, code {}; CPUs {:.0} % busy, load average {}):\n",
        b.measured_at, b.kernel, b.code, b.busy_before, b.load_before
    );
    md.push_str("| Measure | Target | Before | Now |\n|---|---|---|---|\n");
    for v in &s.verdicts {
        let was = before_of(before, &s.key, &v.what).map_or("–", |w| w.measured.as_str());
        let _ = writeln!(md, "| {} | {} | {} | {} |", v.what, v.target, was, v.measured);
    }
    md.push('\n');
}

/// Writes BENCHMARKS.md from every part's saved results. Returns whether all targets were met.
pub fn write(out: &Path, results: &Path, machine: &Machine, command: &str, failed: &[(Part, String)]) -> Result<bool> {
    let sections = load_sections(results);
    let before = load_sections(&results.join(BASELINE_DIR));
    let before_command = std::fs::read_to_string(results.join(BASELINE_DIR).join("command")).unwrap_or_default();
    let mut md = String::new();
    md.push_str("# Benchmarks\n\n");
    md.push_str(
        "What the keepalive agent costs a host, and how far it scales, measured on the real kernel.\n\
         This file is generated by `cargo xtask bench` (code in `xtask/src/bench/`, engine benchmark in\n\
         `keepalive-agent/benches/engine.rs`); the analysis at the end comes from `xtask/src/bench/notes.md`.\n\n",
    );
    md.push_str("## Reproduce\n\n```sh\ncargo xtask bench                       # everything, about 15 minutes\n");
    md.push_str("cargo xtask bench --parts engine,kernel  # some parts; the others keep their last results\n");
    md.push_str("cargo xtask bench --connections 40000   # sizes and durations: cargo xtask bench --help\n");
    md.push_str("cargo xtask bench --parts audit          # one `keepalive-agent audit` of 100,000 sockets\n");
    md.push_str("cargo xtask bench --parts observers,hostload --agent OLD --results target/bench-before   # a previous binary\n");
    md.push_str("cargo xtask bench --parts observers,hostload --baseline target/bench-before   # now, with before columns\n```\n\n");
    let commands: Vec<&str> = command.lines().map(str::trim).filter(|c| !c.is_empty()).collect();
    match commands.as_slice() {
        [] => {}
        [only] => {
            let _ = writeln!(md, "Last command: `cargo xtask bench {only}`\n");
        }
        all => {
            md.push_str("Commands, in order (each later one measured its parts again; the other parts kept their results):\n\n");
            for c in all {
                let _ = writeln!(md, "- `cargo xtask bench {c}`");
            }
            md.push('\n');
        }
    }
    md.push_str("Needs root (BPF programs, network namespaces). Everything happens in network namespaces the bench creates\n\
                 (loopback only), the agent's setsockopt program is attached to a cgroup the bench creates, BPF run-time\n\
                 statistics are switched on with a `BPF_ENABLE_STATS` file descriptor (the `kernel.bpf_stats_enabled` sysctl\n\
                 is left as it was), nothing is pinned, and every namespace, cgroup and process is removed afterwards.\n\
                 The bench refuses to start when more than a quarter of the CPU time is in use (`--allow-busy` overrides);\n\
                 each part records how busy the machine was just before it started.\n\n");
    md.push_str("## Machine\n\n| | |\n|---|---|\n");
    let _ = writeln!(md, "| CPU | {} |", machine.cpu_model);
    let _ = writeln!(md, "| CPUs | {} |", machine.cpus);
    let _ = writeln!(md, "| Kernel | {} |", machine.kernel);
    let _ = writeln!(md, "| Memory | {} MiB |", machine.memory_mib);
    let _ = writeln!(md, "| Clock source | {} |", machine.clocksource);
    if let Some(hz) = machine.hz {
        let _ = writeln!(md, "| CONFIG_HZ | {hz} |");
    }
    md.push('\n');

    let with_before = !before.is_empty();
    if with_before {
        let _ = writeln!(md, "\"Before\" columns: the results kept with `--baseline` (command `cargo xtask bench {}`).\n", before_command.trim());
        md.push_str("## Summary\n\n| Part | Measure | Target | Before | Measured | |\n|---|---|---|---|---|---|\n");
    } else {
        md.push_str("## Summary\n\n| Part | Measure | Target | Measured | |\n|---|---|---|---|---|\n");
    }
    let mut all_met = failed.is_empty();
    for s in &sections {
        for v in &s.verdicts {
            let mark = match v.met {
                Some(true) => "met",
                Some(false) => {
                    all_met = false;
                    "**missed**"
                }
                None => "",
            };
            if with_before {
                let was = before_of(&before, &s.key, &v.what).map_or("–", |w| w.measured.as_str());
                let _ = writeln!(md, "| {} | {} | {} | {} | {} | {} |", s.key, v.what, v.target, was, v.measured, mark);
            } else {
                let _ = writeln!(md, "| {} | {} | {} | {} | {} |", s.key, v.what, v.target, v.measured, mark);
            }
        }
    }
    for (p, e) in failed {
        let before_cell = if with_before { " |" } else { "" };
        let _ = writeln!(md, "| {} | (part failed in the last run) |{before_cell} | {} | **failed** |", p.key(), e.replace('|', "/").replace('\n', " "));
    }
    md.push('\n');
    for part in Part::ALL {
        if !sections.iter().any(|s| s.key == part.key()) {
            let _ = writeln!(md, "Part `{}` has no results yet: run `cargo xtask bench --parts {}`.\n", part.key(), part.key());
        }
    }
    for s in &sections {
        let _ = writeln!(md, "## {}\n", s.title);
        let _ = writeln!(
            md,
            "_Measured {} on Linux {}, code {}, {:.0} s. Before it started: CPUs {:.0} % busy, load average {}._\n",
            s.measured_at, s.kernel, s.code, s.duration_s, s.busy_before, s.load_before
        );
        md.push_str(&s.markdown);
        md.push('\n');
        before_after(&mut md, s, &before);
    }
    md.push_str(NOTES);
    std::fs::write(out, md).with_context(|| out.display().to_string())?;
    Ok(all_met)
}

/// Mean and sample standard deviation.
pub fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mean = v.iter().sum::<f64>() / n;
    if v.len() < 2 {
        return (mean, 0.0);
    }
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

/// Two-sided 95 % Student t quantile for `df` degrees of freedom.
pub fn t95(df: usize) -> f64 {
    const T: [f64; 10] = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228];
    match df {
        0 => f64::NAN,
        1..=10 => T[df - 1],
        11..=20 => 2.1,
        21..=30 => 2.05,
        _ => 1.98,
    }
}

/// Human bytes.
pub fn bytes(n: f64) -> String {
    if n >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", n / 1024.0 / 1024.0)
    } else if n >= 1024.0 {
        format!("{:.1} KiB", n / 1024.0)
    } else {
        format!("{n:.0} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_sd() {
        let (m, sd) = mean_sd(&[1.0, 2.0, 3.0, 4.0]);
        assert!((m - 2.5).abs() < 1e-12);
        assert!((sd - 1.290_994_448_735_805_6).abs() < 1e-9);
        assert!(mean_sd(&[]).0.is_nan());
    }

    #[test]
    fn date_format() {
        assert_eq!(utc(0), "1970-01-01 00:00:00Z");
        assert_eq!(utc(1_700_000_000), "2023-11-14 22:13:20Z");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00Z");
        assert_eq!(utc_now().len(), 20);
    }

    #[test]
    fn baseline_measures_show_as_before() {
        let dir = std::env::temp_dir().join(format!("ka-bench-report-{}", std::process::id()));
        let old = dir.join("old");
        std::fs::create_dir_all(&old).unwrap();
        let mut s = Section::new(Part::Observers, "5. Observers");
        s.verdict(Verdict::new("trace: user+sys", "≤ 10 ms/s", "55 ms/s", Some(false)));
        s.stamp(1.0, (0.0, 0.0, 0.0), 0.0);
        s.save(&old).unwrap();
        s.verdicts[0] = Verdict::new("trace: user+sys", "≤ 10 ms/s", "8 ms/s", Some(true));
        s.save(&dir).unwrap();
        assert!(keep_baseline(&dir, &dir.join("nothing")).is_err());
        keep_baseline(&dir, &old).unwrap();
        let machine = Machine { cpu_model: "x".into(), cpus: 2, kernel: "k".into(), memory_mib: 1, clocksource: "c".into(), hz: None };
        let out = dir.join("out.md");
        assert!(write(&out, &dir, &machine, "", &[]).unwrap());
        let md = std::fs::read_to_string(&out).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(md.contains("| observers | trace: user+sys | ≤ 10 ms/s | 55 ms/s | 8 ms/s | met |"), "{md}");
        assert!(md.contains("| trace: user+sys | ≤ 10 ms/s | 55 ms/s | 8 ms/s |"), "{md}");
    }

    #[test]
    fn human_bytes() {
        assert_eq!(bytes(512.0), "512 B");
        assert_eq!(bytes(2048.0), "2.0 KiB");
        assert_eq!(bytes(3.0 * 1024.0 * 1024.0), "3.0 MiB");
    }
}
