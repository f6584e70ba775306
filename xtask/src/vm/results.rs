//! Reading the guest's markers (see guest.rs for the protocol) and classifying each command.

use std::fmt;

use super::qemu::VmExit;

#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    pub passed: bool,
    /// Killed by the guest's per-command timeout.
    pub timed_out: bool,
    pub exit_code: i32,
    /// Guest uptime in seconds.
    pub at: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CommandRecord {
    pub name: String,
    pub started_at: f64,
    pub finished: Option<Finished>,
}

impl CommandRecord {
    pub fn duration(&self) -> Option<f64> {
        self.finished.as_ref().map(|f| f.at - self.started_at)
    }
}

/// Everything the guest reported, in the order it reported it. Times are guest uptimes (s).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct GuestReport {
    pub init_at: Option<f64>,
    pub ready_at: Option<f64>,
    pub done_at: Option<f64>,
    pub warnings: Vec<String>,
    /// (key, value) from `VMTEST-FEATURE key value...`
    pub features: Vec<(String, String)>,
    /// (command, line) from `VMTEST-DATA <command> <line>`: what a command reported for the host
    /// to parse (the line keeps its own leading spaces).
    pub data: Vec<(String, String)>,
    pub commands: Vec<CommandRecord>,
}

impl GuestReport {
    pub fn parse(text: &str) -> GuestReport {
        let mut report = GuestReport::default();
        for line in text.lines().map(str::trim) {
            let Some((marker, rest)) = line.split_once(' ') else {
                continue;
            };
            let words: Vec<&str> = rest.split_whitespace().collect();
            let time = |i: usize| words.get(i).and_then(|w| w.parse::<f64>().ok());
            match marker {
                "VMTEST-INIT" => report.init_at = time(0),
                "VMTEST-READY" => report.ready_at = time(0),
                "VMTEST-DONE" => report.done_at = time(0),
                "VMTEST-WARN" => report.warnings.push(rest.to_string()),
                "VMTEST-DATA" => {
                    let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
                    report.data.push((name.to_string(), text.to_string()));
                }
                "VMTEST-FEATURE" => {
                    if let Some((key, value)) = rest.split_once(' ') {
                        report
                            .features
                            .push((key.to_string(), value.trim().to_string()));
                    }
                }
                "VMTEST-START" => {
                    if let (Some(name), Some(at)) = (words.first(), time(1)) {
                        report.commands.push(CommandRecord {
                            name: name.to_string(),
                            started_at: at,
                            finished: None,
                        });
                    }
                }
                "VMTEST-RESULT" => {
                    let (Some(name), Some(word), Some(code), Some(at)) = (
                        words.first(),
                        words.get(1),
                        words.get(2).and_then(|c| c.parse::<i32>().ok()),
                        time(3),
                    ) else {
                        continue;
                    };
                    if let Some(record) = report
                        .commands
                        .iter_mut()
                        .rev()
                        .find(|c| c.name == *name && c.finished.is_none())
                    {
                        record.finished = Some(Finished {
                            passed: *word == "PASS" && code == 0,
                            timed_out: *word == "TIMEOUT",
                            exit_code: code,
                            at,
                        });
                    }
                }
                _ => {}
            }
        }
        report
    }

    pub fn feature(&self, key: &str) -> Option<&str> {
        self.features
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn features_named<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.features
            .iter()
            .filter(move |(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The `VMTEST-DATA` lines command `name` reported, in order.
    pub fn data_of<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.data
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, line)| line.as_str())
    }

    pub fn command(&self, name: &str) -> Option<&CommandRecord> {
        self.commands.iter().find(|c| c.name == name)
    }

    /// The verdict for one command, given how the VM ended.
    pub fn status(&self, name: &str, exit: VmExit) -> Status {
        match self.command(name) {
            Some(CommandRecord {
                finished: Some(f), ..
            }) if f.passed => Status::Pass,
            Some(CommandRecord {
                finished: Some(f), ..
            }) if f.timed_out => Status::Timeout,
            Some(CommandRecord {
                finished: Some(f), ..
            }) => Status::Fail(f.exit_code),
            Some(_) if exit == VmExit::TimedOut => Status::Timeout,
            Some(_) => Status::VmDied,
            None => Status::NotRun,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Pass,
    Fail(i32),
    /// Killed by the per-command timeout, or running when the VM was killed at its timeout.
    Timeout,
    /// Running when the VM ended by itself (kernel panic, poweroff from the command...).
    VmDied,
    /// Never started.
    NotRun,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Status::Pass => f.write_str("PASS"),
            Status::Fail(code) => write!(f, "FAIL({code})"),
            Status::Timeout => f.write_str("TIMEOUT"),
            Status::VmDied => f.write_str("VM-DIED"),
            Status::NotRun => f.write_str("NOT-RUN"),
        }
    }
}

/// The console output of one command: the lines between its START and RESULT markers (or to the
/// end of the log when it never finished).
pub fn command_output<'a>(console: &'a str, name: &str) -> Vec<&'a str> {
    let start = format!("VMTEST-START {name} ");
    let end = format!("VMTEST-RESULT {name} ");
    let lines: Vec<&str> = console.lines().map(|l| l.trim_end_matches('\r')).collect();
    let Some(first) = lines.iter().rposition(|l| l.starts_with(&start)) else {
        return Vec::new();
    };
    let last = lines[first..]
        .iter()
        .position(|l| l.starts_with(&end))
        .map_or(lines.len(), |i| first + i);
    lines[first + 1..last].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;
    use std::process::ExitStatus;

    const LOG: &str = "VMTEST-INIT 1.52\r\n\
        VMTEST-WARN mount -t securityfs /sys/kernel/security failed\r\n\
        VMTEST-FEATURE release 6.1.0-56-amd64\r\n\
        VMTEST-FEATURE btf yes\r\n\
        VMTEST-FEATURE function tcp_keepalive_timer symbol=yes ftrace=yes\r\n\
        VMTEST-FEATURE function tcp_write_wakeup symbol=clones:tcp_write_wakeup.isra.0 ftrace=no\r\n\
        VMTEST-READY 2.00\r\n\
        VMTEST-START smoke 2.01\r\n\
        VMTEST-RESULT smoke PASS 0 2.11\r\n\
        VMTEST-START net 2.12\r\n\
        VMTEST-RESULT net FAIL 1 5.12\r\n\
        VMTEST-START slow 5.13\r\n\
        VMTEST-RESULT slow TIMEOUT 137 8.13\r\n\
        VMTEST-START hang 8.14\r\n";

    #[test]
    fn markers_are_parsed() {
        let r = GuestReport::parse(LOG);
        assert_eq!(r.init_at, Some(1.52));
        assert_eq!(r.ready_at, Some(2.0));
        assert_eq!(r.done_at, None);
        assert_eq!(
            r.warnings,
            ["mount -t securityfs /sys/kernel/security failed"]
        );
        assert_eq!(r.feature("release"), Some("6.1.0-56-amd64"));
        assert_eq!(r.feature("btf"), Some("yes"));
        assert_eq!(r.features_named("function").count(), 2);
        assert_eq!(r.commands.len(), 4);
        assert!((r.command("net").unwrap().duration().unwrap() - 3.0).abs() < 1e-9);
        assert_eq!(r.command("hang").unwrap().duration(), None);
    }

    #[test]
    fn statuses_depend_on_markers_and_vm_exit() {
        let r = GuestReport::parse(LOG);
        let exited = VmExit::Exited(ExitStatus::from_raw(0));
        assert_eq!(r.status("smoke", exited), Status::Pass);
        assert_eq!(r.status("net", exited), Status::Fail(1));
        assert_eq!(r.status("slow", exited), Status::Timeout);
        assert_eq!(r.status("hang", VmExit::TimedOut), Status::Timeout);
        assert_eq!(r.status("hang", exited), Status::VmDied);
        assert_eq!(r.status("later", VmExit::TimedOut), Status::NotRun);
    }

    #[test]
    fn data_lines_keep_their_indentation() {
        let r = GuestReport::parse(
            "VMTEST-START check-kprobe 1.0\r\n\
             VMTEST-DATA check-kprobe keepalive_timer  kprobe     kprobe/x\r\n\
             VMTEST-DATA check-kprobe                  fentry     not used: y (z)\r\n\
             VMTEST-DATA check-kprobe\r\n\
             VMTEST-DATA other line\r\n\
             VMTEST-RESULT check-kprobe PASS 0 2.0\r\n",
        );
        assert_eq!(
            r.data_of("check-kprobe").collect::<Vec<_>>(),
            [
                "keepalive_timer  kprobe     kprobe/x",
                "                 fentry     not used: y (z)",
                ""
            ]
        );
        assert_eq!(r.data_of("other").collect::<Vec<_>>(), ["line"]);
    }

    #[test]
    fn pass_needs_exit_code_zero_and_garbage_is_ignored() {
        let r = GuestReport::parse("VMTEST-START a 1.0\nVMTEST-RESULT a PASS 3 2.0\nVMTEST-RESULT b\nnoise\nVMTEST-START\n");
        assert_eq!(r.status("a", VmExit::TimedOut), Status::Fail(3));
        assert_eq!(r.commands.len(), 1);
    }

    #[test]
    fn command_output_is_cut_between_markers() {
        let console = "boot\nVMTEST-START a 1\nline1\nline2\r\nVMTEST-RESULT a PASS 0 2\nVMTEST-START b 3\nb1\n";
        assert_eq!(command_output(console, "a"), ["line1", "line2"]);
        assert_eq!(command_output(console, "b"), ["b1"]);
        assert!(command_output(console, "c").is_empty());
    }
}
