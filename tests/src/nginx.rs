//! A real nginx (Debian's `nginx-light`) run by a test inside its network namespace, and `ss -tnp`
//! to see which process holds a socket.
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use crate::netns::NetNs;
use crate::tcp::fmt_addr;

/// Where Debian installs nginx.
pub const NGINX: &str = "/usr/sbin/nginx";

/// nginx in the foreground (`daemon off`), its master a child of the test (through `ip netns
/// exec`, which execs it); its configuration, pid file, logs and temp files in a directory of its
/// own. Stopped (SIGTERM, then SIGKILL) and the directory removed on drop.
pub struct Nginx {
    child: Child,
    dir: PathBuf,
    addr: SocketAddr,
}

impl Nginx {
    /// Starts nginx listening on `127.0.0.1:port` with `so_keepalive=<so_keepalive>` (e.g.
    /// `1s:1s:2`) and `workers` worker processes; waits until it accepts connections and every
    /// worker runs.
    pub fn start(ns: &NetNs, port: u16, so_keepalive: &str, workers: u32) -> Result<Nginx> {
        Nginx::start_with_timeout(ns, port, so_keepalive, workers, "300s")
    }

    /// Like [`Nginx::start`], with nginx's `keepalive_timeout` (e.g. `1s`): nginx closes a
    /// keep-alive connection idle that long.
    pub fn start_with_timeout(
        ns: &NetNs,
        port: u16,
        so_keepalive: &str,
        workers: u32,
        keepalive_timeout: &str,
    ) -> Result<Nginx> {
        if !Path::new(NGINX).exists() {
            bail!("{NGINX} not found: install nginx-light (scripts/setup.sh does)");
        }
        let dir = std::env::temp_dir().join(format!("ka-nginx-{}-{}", std::process::id(), ns.name()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, config(&dir, port, so_keepalive, workers, keepalive_timeout))?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns.name(), NGINX, "-c"])
            .arg(&conf)
            .arg("-p")
            .arg(&dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning nginx")?;
        let mut nginx = Nginx { child, dir, addr: SocketAddr::from(([127, 0, 0, 1], port)) };
        nginx.wait_ready(ns, workers as usize)?;
        Ok(nginx)
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The master process's pid.
    pub fn master_pid(&self) -> u32 {
        self.child.id()
    }

    /// The worker processes (children of the master), in pid order.
    pub fn worker_pids(&self) -> Vec<u32> {
        children_of(self.master_pid())
    }

    fn wait_ready(&mut self, ns: &NetNs, workers: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait()? {
                let log = std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default();
                bail!("nginx exited ({status}) before accepting connections:\n{log}");
            }
            let addr = self.addr;
            let up = ns.run(|| TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok());
            if up && self.worker_pids().len() == workers {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("nginx did not accept connections on {addr} with {workers} workers within 10 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        crate::terminate(&mut self.child, Duration::from_secs(5));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// nginx's configuration. `client_header_timeout` is long: tests hold accepted connections that
/// send nothing, and on a loaded machine may look at them after nginx's default 60 s.
fn config(dir: &Path, port: u16, so_keepalive: &str, workers: u32, keepalive_timeout: &str) -> String {
    let d = dir.display();
    format!(
        "daemon off;\n\
         master_process on;\n\
         worker_processes {workers};\n\
         pid {d}/nginx.pid;\n\
         error_log {d}/error.log info;\n\
         events {{ worker_connections 64; }}\n\
         http {{\n\
           access_log off;\n\
           client_body_temp_path {d}/body;\n\
           proxy_temp_path {d}/proxy;\n\
           fastcgi_temp_path {d}/fastcgi;\n\
           uwsgi_temp_path {d}/uwsgi;\n\
           scgi_temp_path {d}/scgi;\n\
           keepalive_timeout {keepalive_timeout};\n\
           client_header_timeout 600s;\n\
           server {{\n\
             listen 127.0.0.1:{port} so_keepalive={so_keepalive};\n\
             location / {{ return 200 \"ok\\n\"; }}\n\
           }}\n\
         }}\n"
    )
}

/// Pids whose parent is `ppid` (from `/proc/*/stat`), in pid order.
pub fn children_of(ppid: u32) -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir("/proc") else { return Vec::new() };
    let mut out: Vec<u32> = rd
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| parent_from_stat(&s))
                == Some(ppid)
        })
        .collect();
    out.sort_unstable();
    out
}

/// The parent pid in a `/proc/PID/stat` line (the field after `(comm) state`).
fn parent_from_stat(stat: &str) -> Option<u32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// The processes `ss -tnp` (run in `ns`) names for the TCP connection `local` → `remote`, as
/// (name, pid) pairs. Empty when ss lists the connection without processes; an error when ss does
/// not list it.
pub fn ss_processes(ns: &NetNs, local: SocketAddr, remote: SocketAddr) -> Result<Vec<(String, u32)>> {
    let out = ns.exec(&["ss", "-Htnp"])?;
    let (l, r) = (fmt_addr(local), fmt_addr(remote));
    let line = out
        .lines()
        .find(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            f.len() >= 5 && f[3] == l && f[4] == r
        })
        .with_context(|| format!("ss -tnp does not list {l} -> {r}:\n{out}"))?;
    Ok(parse_ss_users(line))
}

/// `users:(("nginx",pid=1234,fd=3),("nginx",pid=1235,fd=3))` → [("nginx", 1234), ("nginx", 1235)].
pub fn parse_ss_users(line: &str) -> Vec<(String, u32)> {
    let Some(users) = line.split("users:(").nth(1) else { return Vec::new() };
    users
        .split("(\"")
        .skip(1)
        .filter_map(|entry| {
            let (name, rest) = entry.split_once("\",")?;
            let pid = rest.strip_prefix("pid=")?.split(',').next()?.parse().ok()?;
            Some((name.to_string(), pid))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ss_users_and_stat_parent() {
        let line = "ESTAB 0 0 127.0.0.1:18080 127.0.0.1:45678 users:((\"nginx\",pid=1234,fd=3),(\"a b\",pid=7,fd=12))";
        assert_eq!(parse_ss_users(line), [("nginx".to_string(), 1234), ("a b".to_string(), 7)]);
        assert!(parse_ss_users("ESTAB 0 0 127.0.0.1:1 127.0.0.1:2").is_empty());
        assert_eq!(parent_from_stat("123 (nginx: worker) S 120 123 ..."), Some(120));
        assert_eq!(parent_from_stat("123 (a) b) R 9 1"), Some(9));
    }
}
