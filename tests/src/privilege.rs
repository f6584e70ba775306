//! Running the agent as `nobody` with exactly a set of capabilities (ambient, inheritable and
//! bounding sets, util-linux `setpriv`), and the capability list the agent itself declares (the
//! table `keepalive-agent check` prints, so that the tests follow the agent's one list).
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context as _, Result};

/// One row of `check`'s capability table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Declared {
    /// `CAP_BPF`...
    pub name: String,
    /// `ok`, `MISSING` (required), `missing` (optional) or `unneeded` (not on this kernel).
    pub state: String,
    /// The agent refuses to start without it.
    pub required: bool,
    /// Kept after start-up.
    pub kept: bool,
}

/// The capabilities `keepalive-agent check` lists, read by running it as root (every one `ok`).
pub fn declared() -> Result<Vec<Declared>> {
    let out = Command::new(crate::agent_binary()).arg("check").output().context("running check")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!("check failed ({}): {text}{}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    parse_check(&text)
}

/// The rows of the table under the `CAPABILITY STATE NEEDED FOR` header.
pub fn parse_check(text: &str) -> Result<Vec<Declared>> {
    let mut lines = text.lines().skip_while(|l| !l.starts_with("CAPABILITY"));
    lines.next().ok_or_else(|| anyhow!("no CAPABILITY table in check's output:\n{text}"))?;
    let mut out = Vec::new();
    for l in lines.take_while(|l| !l.trim().is_empty()) {
        if l.starts_with(' ') {
            continue; // the cost line under a missing capability
        }
        let mut words = l.split_whitespace();
        let (Some(name), Some(state)) = (words.next(), words.next()) else { bail!("bad row {l:?}") };
        out.push(Declared {
            name: name.to_string(),
            state: state.to_string(),
            required: !l.contains("(optional)"),
            kept: l.ends_with("(kept after start-up)"),
        });
    }
    if out.is_empty() {
        bail!("empty CAPABILITY table:\n{text}");
    }
    Ok(out)
}

/// `setpriv` arguments running the next command as nobody:nogroup with exactly `caps` (names
/// such as `CAP_BPF`) in its ambient, inheritable, permitted, effective and bounding sets.
pub fn setpriv_args(caps: &[&str]) -> Vec<String> {
    let list: Vec<String> = std::iter::once("-all".to_string())
        .chain(caps.iter().map(|c| format!("+{}", c.trim_start_matches("CAP_").to_ascii_lowercase())))
        .collect();
    let list = list.join(",");
    vec![
        "setpriv".into(),
        "--reuid=nobody".into(),
        "--regid=nogroup".into(),
        "--clear-groups".into(),
        format!("--inh-caps={list}"),
        format!("--ambient-caps={list}"),
        format!("--bounding-set={list}"),
        "--".into(),
    ]
}

/// The agent binary at a path `nobody` can execute: [`crate::agent_binary`] when every directory
/// above it is searchable by others, else (a CI checkout may live under a private directory) a
/// hard link or, across file systems, a copy in a world-readable directory under the system's
/// temporary directory, made once per test process and left for the next run to replace.
pub fn agent_for_nobody() -> &'static Path {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match BIN.get_or_init(|| reachable_agent().map_err(|e| format!("{e:#}"))) {
        Ok(p) => p,
        Err(e) => panic!("cannot give nobody the agent binary: {e}"),
    }
}

fn reachable_agent() -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let bin = crate::agent_binary();
    let open_to_others = |p: &Path, bits: u32| std::fs::metadata(p).is_ok_and(|m| m.permissions().mode() & bits == bits);
    if open_to_others(bin, 0o005) && bin.ancestors().skip(1).all(|d| open_to_others(d, 0o001)) {
        return Ok(bin.to_path_buf());
    }
    let dir = std::env::temp_dir().join("keepalive-tests-bin");
    std::fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    let copy = dir.join(format!("keepalive-agent-{}", std::process::id()));
    let _ = std::fs::remove_file(&copy);
    if std::fs::hard_link(bin, &copy).is_err() {
        std::fs::copy(bin, &copy).with_context(|| format!("copying {} to {}", bin.display(), copy.display()))?;
    }
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755))?;
    Ok(copy)
}

/// Bit numbers of the capabilities the agent may name (linux/capability.h).
pub fn cap_number(name: &str) -> Option<u32> {
    Some(match name {
        "CAP_DAC_READ_SEARCH" => 2,
        "CAP_NET_ADMIN" => 12,
        "CAP_SYS_PTRACE" => 19,
        "CAP_SYS_ADMIN" => 21,
        "CAP_SYS_RESOURCE" => 24,
        "CAP_SYSLOG" => 34,
        "CAP_PERFMON" => 38,
        "CAP_BPF" => 39,
        _ => return None,
    })
}

/// The `CapXxx:` mask (`CapEff`, `CapPrm`...) of every thread of process `pid`.
pub fn thread_masks(pid: u32, field: &str) -> Result<Vec<(String, u64)>> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).context("listing the agent's threads")?.flatten() {
        let status = std::fs::read_to_string(t.path().join("status")).context("thread status")?;
        let comm = status.lines().find_map(|l| l.strip_prefix("Name:")).unwrap_or("?").trim().to_string();
        let mask = status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{field}:")))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .ok_or_else(|| anyhow!("no {field} in {}", t.path().display()))?;
        out.push((comm, mask));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_table() {
        let text = "kernel: 6.18\n\nCAPABILITY           STATE    NEEDED FOR\n\
            CAP_BPF              ok       loading (kept after start-up)\n\
            CAP_SYSLOG           MISSING  kallsyms (dropped after start-up)\n\
            \x20                             the agent cannot start: without it ...\n\
            CAP_SYS_ADMIN        ok       setns (optional) (kept after start-up)\n\nHZ: 250\n";
        let rows = parse_check(text).unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!((rows[0].name.as_str(), rows[0].required, rows[0].kept), ("CAP_BPF", true, true));
        assert_eq!((rows[1].state.as_str(), rows[1].kept), ("MISSING", false));
        assert!(!rows[2].required && rows[2].kept);
        assert!(parse_check("nothing").is_err());
        assert_eq!(setpriv_args(&["CAP_BPF", "CAP_SYS_ADMIN"])[4], "--inh-caps=-all,+bpf,+sys_admin");
    }
}
