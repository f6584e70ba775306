//! Bad input stops the real agent at start-up: a non-zero exit, and an error that names the flag or
//! environment variable and says why. A forced `--attach` method the kernel refuses for the
//! keep-alive timer stops the agent with the kernel's reason instead of running without the timer.
//!
//! No connection is needed. Every run is scoped to the test's own network namespace and cgroup, so
//! that a regression accepting a value could not attach anything outside them; runs are bounded by
//! `--duration 0` where `--duration` is not the flag under test, and by a kill deadline.

use std::io::Read as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keepalive_tests::{agent_binary, Env};

/// Longest a rejected start may take (attaching programs before a forced method fails included).
const DEADLINE: Duration = Duration::from_secs(60);

/// How one agent run ended.
struct Exit {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Exit {
    /// Asserts a failed start whose stderr holds every one of `words`.
    fn assert_rejected(&self, what: &str, words: &[&str]) {
        assert!(
            self.code.is_some_and(|c| c != 0),
            "{what}: expected a non-zero exit, got {:?}\nstderr:\n{}",
            self.code,
            self.stderr
        );
        for w in words {
            assert!(self.stderr.contains(w), "{what}: stderr does not name `{w}`:\n{}", self.stderr);
        }
        assert!(!self.stderr.contains("panicked"), "{what}: the agent panicked:\n{}", self.stderr);
        assert!(!self.stderr.lines().any(|l| l.starts_with("ready")), "{what}: the agent started:\n{}", self.stderr);
    }
}

/// Runs the agent with `args` (after the subcommand `cmd`), and, when `scoped`, the test's cgroup
/// (and its namespace, for `trace` and `run`); `envs` on top of an environment without any
/// `OTEL_*` variable.
fn agent(env: &Env, cmd: &str, args: &[&str], envs: &[(&str, &str)], scoped: bool) -> Exit {
    let mut c = Command::new(agent_binary());
    c.arg(cmd);
    if scoped {
        c.arg("--cgroup").arg(env.cgroup.path());
        if cmd != "check" {
            c.arg("--netns").arg(env.ns.path());
        }
    }
    c.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("OTEL_") {
            c.env_remove(k);
        }
    }
    c.envs(envs.iter().copied());
    let mut child = c.spawn().unwrap_or_else(|e| panic!("starting {c:?}: {e}"));
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("waiting for the agent") {
            break s;
        }
        if started.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{c:?} still running after {DEADLINE:?}: the bad value was accepted");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    child.stdout.take().map(|mut o| o.read_to_string(&mut stdout));
    child.stderr.take().map(|mut e| e.read_to_string(&mut stderr));
    Exit { code: status.code(), stdout, stderr }
}

#[test]
fn bad_flags_are_rejected_naming_the_flag() {
    let env = Env::new();
    let plain_dir = std::env::temp_dir();
    let plain_dir = plain_dir.to_str().unwrap();
    // (subcommand, arguments, words the error must contain)
    let cases: &[(&str, &[&str], &[&str])] = &[
        ("trace", &["--max-connections", "0", "--duration", "0"], &["--max-connections", "1..=16777216"]),
        ("run", &["--max-connections", "99999999999", "--duration", "0"], &["--max-connections"]),
        ("trace", &["--duration", "-1"], &["--duration", "from 0 to 31536000"]),
        ("trace", &["--duration", "NaN"], &["--duration", "from 0 to 31536000"]),
        ("trace", &["--duration", "inf"], &["--duration"]),
        ("run", &["--duration", "1e12"], &["--duration"]),
        ("run", &["--shutdown-timeout", "-1", "--duration", "0"], &["--shutdown-timeout", "from 0 to 3600"]),
        ("run", &["--shutdown-timeout", "nan", "--duration", "0"], &["--shutdown-timeout"]),
        ("run", &["--shutdown-timeout", "1e30", "--duration", "0"], &["--shutdown-timeout"]),
        ("trace", &["--ringbuf-size", "5000", "--duration", "0"], &["--ringbuf-size", "power of two"]),
        ("check", &["--ringbuf-size", "2147483648"], &["--ringbuf-size"]),
        ("trace", &["--port", "0", "--duration", "0"], &["--port"]),
        ("trace", &["--pid", "0", "--duration", "0"], &["--pid"]),
        ("run", &["--otlp-queue-size", "0", "--duration", "0"], &["--otlp-queue-size"]),
        ("run", &["--otlp-batch-size", "0", "--duration", "0"], &["--otlp-batch-size"]),
        (
            "run",
            &["--otlp-queue-size", "100", "--otlp-batch-size", "101", "--duration", "0"],
            &["--otlp-batch-size", "--otlp-queue-size"],
        ),
        ("run", &["--otlp-timeout-ms", "0", "--duration", "0"], &["--otlp-timeout-ms"]),
        ("run", &["--otlp-batch-delay-ms", "99999999999", "--duration", "0"], &["--otlp-batch-delay-ms"]),
        ("run", &["--otlp-retry-max-s", "-1", "--duration", "0"], &["--otlp-retry-max-s"]),
        ("run", &["--max-span-events", "1", "--duration", "0"], &["--max-span-events"]),
        ("run", &["--otlp-endpoint", "foo", "--duration", "0"], &["--otlp-endpoint", "http:// or https://"]),
        ("run", &["--otlp-traces-endpoint", "http://", "--duration", "0"], &["--otlp-traces-endpoint"]),
        ("run", &["--otlp-metrics-endpoint", "ftp://x", "--duration", "0"], &["--otlp-metrics-endpoint", "http:// or https://"]),
        ("run", &["--metrics-listen", "localhost:9464", "--duration", "0"], &["--metrics-listen", "not an IP address and a port"]),
    ];
    for (cmd, args, words) in cases {
        let exit = agent(&env, cmd, args, &[], true);
        exit.assert_rejected(&format!("{cmd} {args:?}"), words);
        // A bad value of one flag is a usage error (exit 2); flags that disagree are checked with
        // the configuration file's and the environment's values (exit 1, as a bad file).
        let disagree = args.contains(&"--otlp-batch-size") && args.contains(&"--otlp-queue-size");
        if !disagree {
            assert_eq!(exit.code, Some(2), "{cmd} {args:?}: a bad flag is a usage error:\n{}", exit.stderr);
        }
    }
    // Paths (unscoped: the path under test replaces the test's own).
    let ns = env.ns.path().to_str().unwrap().to_string();
    let cases: &[(&str, Vec<&str>, Vec<&str>)] = &[
        ("trace", vec!["--cgroup", "/nonexistent", "--netns", &ns, "--duration", "0"], vec!["--cgroup", "/nonexistent"]),
        (
            "run",
            vec!["--cgroup", plain_dir, "--netns", &ns, "--duration", "0"],
            vec!["--cgroup", plain_dir, "not a cgroup v2 directory"],
        ),
        ("check", vec!["--cgroup", "/proc"], vec!["--cgroup", "/proc", "not a cgroup v2 directory"]),
        (
            "trace",
            vec!["--netns", "/proc/self/ns/uts", "--cgroup", env.cgroup.path().to_str().unwrap(), "--duration", "0"],
            vec!["--netns", "not a network namespace"],
        ),
    ];
    for (cmd, args, words) in cases {
        agent(&env, cmd, args, &[], false).assert_rejected(&format!("{cmd} {args:?}"), words);
    }
}

#[test]
fn bad_environment_is_rejected_naming_the_variable() {
    let env = Env::new();
    let cases: &[(&str, &str)] = &[
        ("OTEL_BSP_MAX_QUEUE_SIZE", "0"),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "-1"),
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "0"),
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "4096"),
        ("OTEL_BSP_SCHEDULE_DELAY", "soon"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "0"),
        ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "99999999999"),
        ("OTEL_SPAN_EVENT_COUNT_LIMIT", "0"),
        ("OTEL_EXPORTER_OTLP_COMPRESSION", "zstd"),
        ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "brotli"),
        ("OTEL_RESOURCE_ATTRIBUTES", "team=%zz"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "127.0.0.1:4318"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "carrier-pigeon"),
    ];
    for (var, value) in cases {
        // An endpoint makes every variable count (headers and protocol only matter with one).
        let mut envs = vec![(*var, *value)];
        if *var != "OTEL_EXPORTER_OTLP_ENDPOINT" {
            envs.push(("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9"));
        }
        agent(&env, "run", &["--duration", "0"], &envs, true).assert_rejected(&format!("{var}={value}"), &[var]);
    }
}

/// From `check` (auto) output: why fentry was not used for the keep-alive timer, if it was not.
fn fentry_refusal(check_stdout: &str) -> Option<String> {
    let mut in_timer = false;
    for line in check_stdout.lines() {
        if let Some(first) = line.split_whitespace().next().filter(|_| !line.starts_with(' ')) {
            in_timer = first == "keepalive_timer";
            continue;
        }
        let rest = line.trim_start();
        if in_timer && rest.starts_with("fentry") && rest.contains("not used:") {
            // "fentry     not used: fentry/... + fexit/... (REASON)"
            let reason = &rest[rest.find(" (")? + 2..];
            return Some(reason.strip_suffix(')').unwrap_or(reason).to_string());
        }
    }
    None
}

/// `--attach fentry` and `--attach kprobe`: where the kernel refuses the method for the keep-alive
/// timer, the agent stops (trace, run and check) naming the method, the hook and the kernel's
/// reason; where it allows it, the agent runs with the timer on that method. The expectation comes
/// from facts found independently: `check` under `auto` for fentry, the kprobe PMU for kprobes.
#[test]
fn forced_attach_method_the_kernel_refuses_stops_the_agent() {
    let env = Env::new();
    let auto = agent(&env, "check", &[], &[], true);
    assert_eq!(auto.code, Some(0), "check (auto) failed:\n{}{}", auto.stdout, auto.stderr);
    let kprobes = Path::new("/sys/bus/event_source/devices/kprobe").exists();
    let expectations = [
        ("fentry", fentry_refusal(&auto.stdout)),
        ("kprobe", (!kprobes).then(|| "this kernel has no kprobes (CONFIG_KPROBES is off)".to_string())),
    ];
    for (method, refusal) in expectations {
        for cmd in ["trace", "run"] {
            let out = agent(&env, cmd, &["--attach", method, "--duration", "0"], &[], true);
            let what = format!("{cmd} --attach {method}");
            match &refusal {
                Some(reason) => out.assert_rejected(
                    &what,
                    &[&format!("--attach {method}"), "keepalive_timer", reason.as_str()],
                ),
                None => {
                    assert_eq!(out.code, Some(0), "{what}: the kernel allows it, the agent must run:\n{}", out.stderr);
                    assert!(out.stderr.contains(&format!("hook keepalive_timer: {method} via")), "{what}:\n{}", out.stderr);
                }
            }
        }
        if let Some(reason) = &refusal {
            let out = agent(&env, "check", &["--attach", method], &[], true);
            assert_ne!(out.code, Some(0), "check --attach {method} must fail:\n{}", out.stdout);
            assert!(
                out.stdout.contains("cannot run here") && out.stdout.contains(reason.as_str()),
                "check --attach {method} must say why:\n{}",
                out.stdout
            );
        }
    }
}
