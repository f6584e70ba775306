//! Run count and run time of the agent's own BPF programs, read from `/proc/self/fdinfo` of their
//! program fds (`run_cnt`, `run_time_ns`, Linux 5.1+). The kernel counts them only while
//! `kernel.bpf_stats_enabled` is 1 (that costs every BPF program on the host two clock reads per
//! run, so the agent never turns it on itself).

use std::collections::HashMap;
use std::path::Path;

/// Whether `kernel.bpf_stats_enabled` is on.
pub fn stats_enabled() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").is_ok_and(|s| s.trim() == "1")
}

/// (prog id, run count, run time ns) from one fdinfo text, for a BPF program fd.
pub fn parse_fdinfo(text: &str) -> Option<(u32, u64, u64)> {
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    let id = u32::try_from(field("prog_id")?).ok()?;
    Some((id, field("run_cnt")?, field("run_time_ns")?))
}

/// (name, run count, run time ns) of each program of `names` (kernel program id → name) that this
/// process holds a file descriptor of, sorted by name.
pub fn program_stats(names: &HashMap<u32, String>) -> Vec<(String, u64, u64)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else { return out };
    for entry in dir.flatten() {
        let is_prog = std::fs::read_link(entry.path()).is_ok_and(|t| t == Path::new("anon_inode:bpf-prog"));
        if !is_prog {
            continue;
        }
        let info = Path::new("/proc/self/fdinfo").join(entry.file_name());
        let Some((id, runs, ns)) = std::fs::read_to_string(info).ok().as_deref().and_then(parse_fdinfo) else { continue };
        if let Some(name) = names.get(&id) {
            out.push((name.clone(), runs, ns));
        }
    }
    out.sort();
    out.dedup_by(|a, b| a.0 == b.0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fdinfo_of_a_program() {
        let text = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\nprog_type:\t26\nprog_jited:\t1\n\
                    prog_tag:\t3b185187f1855c4c\nmemlock:\t4096\nprog_id:\t812\nrun_time_ns:\t123456\nrun_cnt:\t42\n\
                    recursion_misses:\t0\nverified_insns:\t95\n";
        assert_eq!(parse_fdinfo(text), Some((812, 42, 123456)));
        assert_eq!(parse_fdinfo("pos:\t0\nflags:\t02\n"), None);
    }

    #[test]
    fn own_programs_only() {
        // This test process holds no BPF program: nothing, whatever the names say.
        let names = HashMap::from([(1, "x".to_string())]);
        assert!(program_stats(&names).is_empty());
    }
}
