//! What runs inside the guest: the init script, the commands, and the built-in self-test.
//!
//! The init script (guest/init.sh) reports on the second serial port (ttyS1), one marker per
//! line, so kernel messages on the console (ttyS0) can never split a marker:
//!
//! ```text
//! VMTEST-INIT <uptime>                      init started
//! VMTEST-WARN <text>                        a set-up step failed (mount, insmod, lo)
//! VMTEST-FEATURE <key> <value...>           what this kernel supports
//! VMTEST-READY <uptime>                     set-up done, commands follow
//! VMTEST-START <name> <uptime>
//! VMTEST-RESULT <name> PASS|FAIL|TIMEOUT <exit code> <uptime>
//! VMTEST-DONE <uptime>                      all commands ran; powering off
//! VMTEST-DATA <name> <line>                 written by command <name> itself (see below)
//! ```
//!
//! Each marker but VMTEST-DATA is also echoed on the console so the console log reads as a whole.
//! A command that has something for the host to parse (the matrix commands: the `check` table, the
//! test's result line) writes it to /dev/ttyS1 itself as `VMTEST-DATA` lines, while init waits for
//! it: the console can interleave kernel messages with a command's output, the results port cannot.
//!
//! Commands run with /bin/sh, which is dash: Debian's busybox prefers its own applets over PATH,
//! in its shell and in the applets that start programs (`env`, `timeout`, `xargs`, `setsid`...).
//! So `ip` is iproute2's in a command line, but `timeout 5 ip ...` would run busybox's `ip`:
//! write `timeout 5 /usr/sbin/ip ...` there.

use anyhow::{bail, ensure, Result};

pub const INIT_SCRIPT: &str = include_str!("guest/init.sh");
const NETNS_NFT_SCRIPT: &str = include_str!("guest/netns-nft.sh");

/// The first smoke test: the guest runs the kernel we think it runs, and it has BTF.
const SMOKE_COMMAND: &str = "uname -r; ls /sys/kernel/btf/vmlinux";

/// Kernel functions whose presence in /proc/kallsyms and ftrace's available_filter_functions the
/// guest reports: the keep-alive hooks and the setsockopt paths that set keep-alive options.
pub const PROBED_FUNCTIONS: &[&str] = &[
    "tcp_keepalive_timer",
    "tcp_write_wakeup",
    "tcp_send_active_reset",
    "do_tcp_setsockopt",
    "sk_setsockopt",
    "sock_setsockopt",
    "tcp_set_keepalive",
    "tcp_sock_set_keepidle",
    "tcp_sock_set_keepintvl",
    "tcp_sock_set_keepcnt",
    "tcp_sock_set_user_timeout",
];

/// A shell command line run by the guest's busybox `sh`; PASS when it exits 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestCommand {
    pub name: String,
    pub script: String,
}

impl GuestCommand {
    pub fn new(name: &str, script: &str) -> Result<GuestCommand> {
        ensure!(
            !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)),
            "command name {name:?}: use letters, digits, '.', '_' and '-'"
        );
        ensure!(
            !script.trim().is_empty(),
            "command {name}: empty command line"
        );
        Ok(GuestCommand {
            name: name.to_string(),
            script: script.to_string(),
        })
    }

    /// `NAME=COMMAND` as given to `--run`.
    pub fn parse_named(value: &str) -> Result<GuestCommand> {
        match value.split_once('=') {
            Some((name, script)) => GuestCommand::new(name.trim(), script),
            None => bail!("--run {value:?}: expected NAME=COMMAND"),
        }
    }

    /// The file the guest runs with `sh`.
    pub fn file_contents(&self) -> String {
        format!(
            "#!/bin/sh\n# vm-test command {}\n{}\n",
            self.name, self.script
        )
    }
}

/// The built-in self-test: a smoke command and a network check (netns, loopback TCP with busybox
/// nc, an nft drop rule that must stop a connect, which proves the nftables modules load).
pub fn self_test() -> Vec<GuestCommand> {
    vec![
        GuestCommand::new("smoke", SMOKE_COMMAND).expect("valid built-in command"),
        GuestCommand::new("netns-nft", NETNS_NFT_SCRIPT).expect("valid built-in command"),
    ]
}

pub fn ensure_unique(commands: &[GuestCommand]) -> Result<()> {
    for (i, c) in commands.iter().enumerate() {
        ensure!(
            !commands[..i].iter().any(|o| o.name == c.name),
            "two commands are named {}",
            c.name
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_commands() {
        let c = GuestCommand::parse_named("agent-check=keepalive-agent check --json").unwrap();
        assert_eq!(c.name, "agent-check");
        assert_eq!(c.script, "keepalive-agent check --json");
        assert!(GuestCommand::parse_named("no equals sign").is_err());
        assert!(GuestCommand::parse_named("bad name=true").is_err());
        assert!(GuestCommand::parse_named("empty=  ").is_err());
    }

    #[test]
    fn duplicate_names_are_refused() {
        let mut commands = self_test();
        assert!(ensure_unique(&commands).is_ok());
        commands.push(GuestCommand::new("smoke", "true").unwrap());
        assert!(ensure_unique(&commands).is_err());
    }

    #[test]
    fn init_script_speaks_the_documented_markers() {
        for marker in [
            "VMTEST-INIT",
            "VMTEST-WARN",
            "VMTEST-FEATURE",
            "VMTEST-READY",
            "VMTEST-START",
            "VMTEST-RESULT",
            "VMTEST-DONE",
        ] {
            assert!(
                INIT_SCRIPT.contains(marker),
                "{marker} missing from init.sh"
            );
        }
    }
}
