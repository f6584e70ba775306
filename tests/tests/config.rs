//! The configuration file (`run --config PATH`) with the real agent: a file alone drives `run`
//! (spans carry the file's resource); flags beat `OTEL_*` variables, which beat the file, which
//! beats the defaults, as `keepalive-agent config` reports value by value (header values redacted);
//! for the metrics push, the `OTEL_EXPORTER_OTLP_METRICS_*` variables beat the file's generic
//! `export.*` keys (protocol, headers, TLS files), proven by a real push to the receiver; an
//! unknown key or a wrong type stops `run` and `config` with the file, line and key, and a bad TLS
//! file the file names is reported with the file and key.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use keepalive_tests::otlp::{venv, Protocol, Receiver, Span};
use keepalive_tests::pki::{s, Pki};
use keepalive_tests::tcp::{Client, Family, Keepalive, Server, ServerMode};
use keepalive_tests::{agent_binary, Agent, Env};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);

/// A configuration file the test writes, removed on drop.
struct File(PathBuf);

impl File {
    fn new(name: &str, text: &str) -> File {
        let path = std::env::temp_dir().join(format!("keepalive-config-test-{}-{name}.toml", std::process::id()));
        std::fs::write(&path, text).unwrap();
        File(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for File {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The agent run to its end with `args`, in an environment without `OTEL_*`/`K8S_NODE_NAME`
/// variables but `envs`: (exit code, stdout, stderr).
fn agent(args: &[&str], envs: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut c = Command::new(agent_binary());
    for (k, _) in std::env::vars_os() {
        if k.to_str().is_some_and(|k| k.starts_with("OTEL_") || k == "K8S_NODE_NAME") {
            c.env_remove(k);
        }
    }
    c.args(args).envs(envs.iter().copied()).stdin(Stdio::null());
    let out = c.output().unwrap_or_else(|e| panic!("running {c:?}: {e}"));
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The `key = value  # source` line of `key` in `config` output (first one in file order).
fn line<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines().find(|l| l.starts_with(&format!("{key} = "))).unwrap_or_else(|| panic!("no `{key}` line:\n{out}"))
}

#[test]
fn run_takes_its_options_from_the_file() {
    let env = Env::new();
    let server = Server::start(&env.ns, Family::V4, ServerMode::Echo).unwrap();
    let file = File::new(
        "run",
        &format!(
            "[filter]\nnetns = \"{}\"\n[limits]\nmax_connections = 1000\n[export]\nservice_name = \"from-file\"\n\
             [export.resource_attributes]\nteam = \"file\"\n",
            env.ns.path().display()
        ),
    );
    // The namespace and cgroup flags come from the harness too (it never runs an agent unscoped);
    // the file's values are seen in the resource.
    // `--spans all`: the connection is healthy, and only its span carries the resource to check.
    let agent = Agent::start_run(&env, &["--config", file.path(), "--spans", "all"], &[("K8S_NODE_NAME", "node-7")]);
    assert!(agent.stderr_lines().iter().any(|l| l.contains(&format!("configuration file {}", file.path()))), "{:#?}", agent.stderr_lines());
    let client = Client::connect(&env.ns, server.addr(), &Keepalive::new(1, 1, 3)).unwrap();
    let (l, r) = (client.local(), client.remote());
    drop(client);
    let spans = |lines: &[Value]| lines.iter().filter_map(|v| Span::from_json_line(v).ok()).collect::<Vec<_>>();
    let seen = agent.wait_until(WAIT, |lines| spans(lines).iter().any(|s| s.is_conn(l, r)));
    assert!(seen, "no span of the connection within {WAIT:?}:\n{:#?}", agent.events());
    let lines = agent.stop();
    let all = spans(&lines);
    let s = all.iter().find(|s| s.is_conn(l, r)).unwrap();
    let res = |k: &str| s.resource.get(k).and_then(Value::as_str).map(str::to_string);
    assert_eq!(res("service.name").as_deref(), Some("from-file"), "{:?}", s.resource);
    assert_eq!(res("team").as_deref(), Some("file"), "{:?}", s.resource);
    assert_eq!(res("k8s.node.name").as_deref(), Some("node-7"), "{:?}", s.resource);
}

#[test]
fn flags_beat_environment_beats_file_beats_defaults() {
    let file = File::new(
        "precedence",
        "[limits]\nmax_connections = 1000\nshutdown_timeout = 2\n[export]\nendpoint = \"http://127.0.0.1:4318\"\n\
         queue_size = 100\nretry_max_s = 9\nservice_name = \"file-svc\"\n[export.headers]\nauthorization = \"Bearer file-secret\"\n",
    );
    let envs = [("OTEL_BSP_MAX_QUEUE_SIZE", "64"), ("OTEL_EXPORTER_OTLP_TIMEOUT", "1234"), ("OTEL_SERVICE_NAME", "env-svc")];
    let args = ["config", "--config", file.path(), "--max-connections", "10", "--otlp-header", "x-flag=flag-secret"];
    let (code, out, err) = agent(&args, &envs);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with(&format!("# effective configuration of `keepalive-agent run` (file: {})", file.path())), "{out}");
    assert_eq!(line(&out, "max_connections"), "max_connections = 10  # flag --max-connections");
    assert_eq!(line(&out, "shutdown_timeout"), "shutdown_timeout = 2.0  # file");
    assert_eq!(line(&out, "ringbuf_size"), "ringbuf_size = 8388608  # default");
    assert_eq!(line(&out, "endpoint"), "endpoint = \"http://127.0.0.1:4318/v1/traces\"  # file");
    assert_eq!(line(&out, "queue_size"), "queue_size = 64  # env OTEL_BSP_MAX_QUEUE_SIZE");
    assert_eq!(line(&out, "timeout_ms"), "timeout_ms = 1234  # env OTEL_EXPORTER_OTLP_TIMEOUT");
    assert_eq!(line(&out, "retry_max_s"), "retry_max_s = 9  # file");
    assert_eq!(line(&out, "service_name"), "service_name = \"env-svc\"  # env OTEL_SERVICE_NAME");
    assert_eq!(line(&out, "headers.\"authorization\""), "headers.\"authorization\" = \"<redacted>\"  # file");
    assert_eq!(line(&out, "headers.\"x-flag\""), "headers.\"x-flag\" = \"<redacted>\"  # flag --otlp-header");
    assert!(!out.contains("secret"), "a header value is printed:\n{out}");
    // The output is itself a valid configuration file (without the headers, which are redacted).
    let again: String = out.lines().filter(|l| !l.starts_with("headers.")).map(|l| format!("{l}\n")).collect();
    let again = File::new("again", &again);
    let (code, _, err) = agent(&["config", "--config", again.path()], &[]);
    assert_eq!(code, Some(0), "the printed configuration does not load back: {err}");
    // Without a file: every value is a default.
    let (code, out, err) = agent(&["config"], &[]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("(file: none)") && !out.contains("# file") && !out.contains("# env") && !out.contains("# flag"), "{out}");
}

#[test]
fn metrics_and_span_policy_come_from_the_file_under_flags_and_environment() {
    let file = File::new("metrics", "[export]\nspans = \"all\"\n[metrics]\nmax_series = 77\nexport_interval_ms = 500\npeer_labels = true\n");
    let (code, out, err) = agent(&["config", "--config", file.path()], &[]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(line(&out, "spans"), "spans = \"all\"  # file");
    assert_eq!(line(&out, "max_series"), "max_series = 77  # file");
    assert_eq!(line(&out, "export_interval_ms"), "export_interval_ms = 500  # file");
    assert_eq!(line(&out, "peer_labels"), "peer_labels = true  # file");
    assert_eq!(line(&out, "temporality"), "temporality = \"cumulative\"  # default");
    let args = ["config", "--config", file.path(), "--metrics-max-series", "88", "--spans", "problems"];
    let (code, out, err) = agent(&args, &[("OTEL_METRIC_EXPORT_INTERVAL", "900")]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(line(&out, "max_series"), "max_series = 88  # flag --metrics-max-series");
    assert_eq!(line(&out, "spans"), "spans = \"problems\"  # flag --spans");
    assert_eq!(line(&out, "export_interval_ms"), "export_interval_ms = 900  # env OTEL_METRIC_EXPORT_INTERVAL");
    assert_eq!(line(&out, "peer_labels"), "peer_labels = true  # file");
}

/// The `key = value  # source` line of `key` in the table `[table]` of `config` output.
fn table_line<'a>(out: &'a str, table: &str, key: &str) -> &'a str {
    let start = out.find(&format!("\n[{table}]\n")).unwrap_or_else(|| panic!("no [{table}] table:\n{out}"));
    let rest = &out[start + table.len() + 4..];
    line(&rest[..rest.find("\n[").unwrap_or(rest.len())], key)
}

/// A real metrics push: the file names a generic protocol (grpc), headers and a 1 ms timeout; the
/// `OTEL_EXPORTER_OTLP_METRICS_*` variables name HTTP, other headers and a sane timeout, and win:
/// the HTTP receiver gets the metrics with the variables' header.
#[test]
fn metrics_variables_beat_the_files_generic_export_keys() {
    venv();
    let env = Env::new();
    let receiver = Receiver::start(0, 0);
    let tag = format!("metrics-env-{}", std::process::id());
    let file = File::new(
        "metrics-precedence",
        "[export]\nprotocol = \"grpc\"\ntimeout_ms = 1\n[export.headers]\nx-keepalive-test = \"from-file\"\n\
         [metrics]\nexport_interval_ms = 300\n",
    );
    let endpoint = format!("{}/v1/metrics", receiver.endpoint(Protocol::HttpProtobuf));
    let header = format!("x-keepalive-test={tag}");
    let envs = [
        ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "http/protobuf"),
        ("OTEL_EXPORTER_OTLP_METRICS_HEADERS", header.as_str()),
        ("OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", "5000"),
    ];
    let (code, out, err) = agent(&["config", "--config", file.path()], &envs);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(table_line(&out, "metrics", "protocol"), "protocol = \"http/protobuf\"  # env OTEL_EXPORTER_OTLP_METRICS_PROTOCOL");
    let agent = Agent::start_run(&env, &["--config", file.path()], &envs);
    let got = receiver.wait_metrics(WAIT, |ms| !ms.is_empty());
    let stderr = agent.stderr_lines().join("\n");
    drop(agent);
    assert!(got, "no metrics pushed within {WAIT:?}\nreceiver: {}\nagent: {stderr}", receiver.stderr());
    let reqs = receiver.metric_requests();
    assert!(!reqs.is_empty());
    for r in &reqs {
        assert_eq!((r["protocol"].as_str(), r["headers"]["x-keepalive-test"].as_str()), (Some("http"), Some(tag.as_str())), "{r}");
    }
}

/// A metrics-specific key of the file beats the generic one; a TLS file named by the file is used
/// only under every variable of the signal (no error when both signals' variables name good ones),
/// and a bad one is reported naming the file and key, not the flag.
#[test]
fn metrics_keys_of_the_file_and_tls_files_rank_and_are_named() {
    let file = File::new(
        "metrics-specific",
        "[export]\nendpoint = \"http://127.0.0.1:9\"\nprotocol = \"grpc\"\n[metrics]\nprotocol = \"http/protobuf\"\n",
    );
    let push = [("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "http://127.0.0.1:9/v1/metrics")];
    let (code, out, err) = agent(&["config", "--config", file.path()], &push);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(table_line(&out, "metrics", "protocol"), "protocol = \"http/protobuf\"  # file");
    // The traces keep the generic one.
    assert_eq!(table_line(&out, "export", "protocol"), "protocol = \"grpc\"  # file");
    // A traces variable does not hide the file's generic protocol from the metrics.
    let generic = File::new("metrics-generic", "[export]\nprotocol = \"grpc\"\n");
    let traces_var = [push[0], ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")];
    let (code, out, err) = agent(&["config", "--config", generic.path()], &traces_var);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(table_line(&out, "metrics", "protocol"), "protocol = \"grpc\"  # file");

    let pki = Pki::generate().unwrap();
    let junk = pki.dir().join("junk.pem");
    std::fs::write(&junk, "-----BEGIN CERTIFICATE-----\n%%%\n-----END CERTIFICATE-----\n").unwrap();
    let file = File::new("tls-junk", &format!("[export]\ncertificate = \"{}\"\n", s(&junk)));
    let https = [("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "https://127.0.0.1:9/v1/metrics")];
    let (code, _, err) = agent(&["config", "--config", file.path()], &https);
    assert_eq!(code, Some(1), "{err}");
    let key = format!("{}: key `export.certificate`: ", file.path());
    assert!(err.contains(&key) && err.contains("bad PEM") && !err.contains("--otlp-certificate"), "{err}");
    // Each signal's own variable hides the file's bad value: nothing reads it.
    let mut both = https.to_vec();
    both.extend([("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", s(&pki.ca)), ("OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE", s(&pki.ca))]);
    let (code, out, err) = agent(&["config", "--config", file.path()], &both);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(line(&out, "certificate"), format!("certificate = \"{}\"  # env OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", s(&pki.ca)));
    // With only the traces' variable, the metrics push still reads the file's: refused, named.
    let (code, _, err) = agent(&["config", "--config", file.path()], &both[..2]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(&key), "{err}");
}

#[test]
fn bad_files_stop_the_agent_naming_file_line_and_key() {
    let env = Env::new();
    let cases = [
        ("unknown", "[limits]\nmax_connections = 5\nmax_conections = 5\n", ":3:1: key `limits.max_conections`: unknown field"),
        ("table", "# comment\n\n[exporter]\n", ":3:2: key `exporter`: unknown field `exporter`"),
        ("type", "[export]\nqueue_size = \"big\"\n", ":2:14: key `export.queue_size`: invalid type: string \"big\""),
        ("range", "[attach]\nringbuf_size = 4097\n", ":2:16: key `attach.ringbuf_size`: 4097 is not a power of two"),
        ("metrics_range", "[metrics]\nmax_series = 1\n", ":2:14: key `metrics.max_series`: 1 is out of range: must be 2 to 1000000 series"),
        ("syntax", "[limits\n", ":1:8: TOML syntax"),
    ];
    for (name, text, want) in cases {
        let file = File::new(name, text);
        for cmd in ["config", "run"] {
            let mut args = vec![cmd, "--config", file.path()];
            let cgroup = env.cgroup.path().to_str().unwrap().to_string();
            let netns = env.ns.path().to_str().unwrap().to_string();
            if cmd == "run" {
                // Scoped and bounded, should the file ever be accepted.
                args.extend(["--cgroup", &cgroup, "--netns", &netns, "--duration", "0"]);
            }
            let (code, _, err) = agent(&args, &[]);
            assert!(code.is_some_and(|c| c != 0), "{cmd} {name}: exit {code:?}\n{err}");
            assert!(err.contains(&format!("{}{want}", file.path())), "{cmd} {name}: stderr does not name `{want}`:\n{err}");
            assert!(!err.lines().any(|l| l.starts_with("ready")), "{cmd} {name}: the agent started:\n{err}");
        }
    }
    let (code, _, err) = agent(&["config", "--config", "/nonexistent/keepalive.toml"], &[]);
    assert!(code.is_some_and(|c| c != 0) && err.contains("/nonexistent/keepalive.toml"), "{err}");
}
