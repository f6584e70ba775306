//! Booting a kernel + initramfs in QEMU with TCG (KVM guests fail on the development machines),
//! with the console and the results port captured to files and a wall-clock timeout.

use std::fs::{self, File};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

const QEMU: &str = "qemu-system-x86_64";
const KERNEL_CMDLINE: &str = "console=ttyS0 panic=-1 quiet";

#[derive(Debug, Clone)]
pub struct VmConfig {
    pub memory_mib: u32,
    pub cpus: u32,
    pub timeout: Duration,
}

/// Where one boot reads and writes.
#[derive(Debug, Clone)]
pub struct VmFiles {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// ttyS0: kernel messages and command output.
    pub console_log: PathBuf,
    /// ttyS1: the init script's markers only.
    pub results_log: PathBuf,
    /// QEMU's own stderr.
    pub qemu_log: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmExit {
    /// QEMU exited by itself (guest powered off, or panicked with panic=-1 and -no-reboot).
    Exited(ExitStatus),
    /// Killed after the timeout.
    TimedOut,
}

#[derive(Debug, Clone, Copy)]
pub struct VmOutcome {
    pub exit: VmExit,
    pub elapsed: Duration,
}

/// Kills QEMU if we leave early (error, panic): no VM outlives xtask.
struct KillOnDrop(Option<Child>);

impl KillOnDrop {
    fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("child present until disarmed")
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn command_line(files: &VmFiles, config: &VmConfig) -> Command {
    let mut cmd = Command::new(QEMU);
    cmd.args(["-accel", "tcg", "-cpu", "max"])
        .args([
            "-smp",
            &config.cpus.to_string(),
            "-m",
            &config.memory_mib.to_string(),
        ])
        .args([
            "-nodefaults",
            "-display",
            "none",
            "-monitor",
            "none",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(&files.kernel)
        .arg("-initrd")
        .arg(&files.initrd)
        .args(["-append", KERNEL_CMDLINE])
        .arg("-chardev")
        .arg(file_chardev("console", &files.console_log))
        .args(["-serial", "chardev:console"])
        .arg("-chardev")
        .arg(file_chardev("results", &files.results_log))
        .args(["-serial", "chardev:results"]);
    cmd
}

/// `file,id=ID,path=PATH` with commas in the path doubled, as QEMU's option syntax requires.
fn file_chardev(id: &str, path: &Path) -> String {
    format!(
        "file,id={id},path={}",
        path.display().to_string().replace(',', ",,")
    )
}

pub fn boot(files: &VmFiles, config: &VmConfig) -> Result<VmOutcome> {
    for log in [&files.console_log, &files.results_log] {
        if log.exists() {
            fs::remove_file(log).with_context(|| format!("removing {}", log.display()))?;
        }
    }
    let stderr = File::create(&files.qemu_log)
        .with_context(|| format!("creating {}", files.qemu_log.display()))?;
    let mut cmd = command_line(files, config);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    // No VM outlives xtask, even when xtask is killed (KillOnDrop covers errors and panics).
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    log::debug!("{cmd:?}");

    let start = Instant::now();
    let mut guard =
        KillOnDrop(Some(cmd.spawn().with_context(|| {
            format!("starting {QEMU} (run scripts/setup.sh)")
        })?));
    let deadline = start + config.timeout;
    loop {
        if let Some(status) = guard.child().try_wait().context("waiting for QEMU")? {
            guard.0 = None;
            return Ok(VmOutcome {
                exit: VmExit::Exited(status),
                elapsed: start.elapsed(),
            });
        }
        if Instant::now() >= deadline {
            guard
                .child()
                .kill()
                .context("killing QEMU after the timeout")?;
            guard.child().wait().context("reaping QEMU")?;
            guard.0 = None;
            return Ok(VmOutcome {
                exit: VmExit::TimedOut,
                elapsed: start.elapsed(),
            });
        }
        thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chardev_paths_escape_commas() {
        assert_eq!(
            file_chardev("c", Path::new("/tmp/a,b/log")),
            "file,id=c,path=/tmp/a,,b/log"
        );
    }
}
