//! `keepalive-agent run` exporting over TLS (`https://` endpoints) to tests/otlp/receiver.py, which
//! serves TLS with Python's own stacks (`grpc.ssl_server_credentials`, an `ssl`-wrapped HTTP
//! server), with certificates the test generates (tests/src/pki.rs): server authentication over
//! gRPC and HTTP (CA from a flag or from the `OTEL_*` variables), mutual TLS, and refusals: a wrong
//! CA, an expired server certificate, a missing client certificate. A refusal leaves the agent
//! running, is logged with its cause, and is counted in the stop report (export errors, spans
//! failed), with nothing delivered. Root and the receiver venv (scripts/setup.sh) required.
use std::net::SocketAddr;
use std::time::Duration;

use keepalive_tests::otlp::{export_report, of_conn, render, venv, Protocol, Receiver};
use keepalive_tests::pki::{s, Pki, CLIENT_CN};
use keepalive_tests::tcp::{Client, Family, Keepalive, Server, ServerMode};
use keepalive_tests::{Agent, Env};

const WAIT: Duration = Duration::from_secs(20);

/// How the receiver serves TLS.
struct ServerTls<'a> {
    cert: &'a std::path::Path,
    key: &'a std::path::Path,
    /// Require client certificates signed by this CA.
    client_ca: Option<&'a std::path::Path>,
}

fn start_receiver(tls: &ServerTls) -> Receiver {
    let mut extra = vec!["--tls-cert", s(tls.cert), "--tls-key", s(tls.key)];
    if let Some(ca) = tls.client_ca {
        extra.extend(["--tls-client-ca", s(ca)]);
    }
    Receiver::try_start(0, 0, &extra).unwrap_or_else(|e| panic!("{e:#}"))
}

/// The test's namespace and cgroup, its certificates, and a receiver serving the expired server
/// certificate or the valid one, requiring a client certificate signed by the CA when `mtls`.
fn setup(expired: bool, mtls: bool) -> (Env, Pki, Receiver) {
    venv();
    let env = Env::new();
    let pki = Pki::generate().unwrap();
    let (cert, key) = if expired { (&pki.expired_cert, &pki.expired_key) } else { (&pki.server_cert, &pki.server_key) };
    let receiver = start_receiver(&ServerTls { cert, key, client_ca: mtls.then_some(pki.ca.as_path()) });
    (env, pki, receiver)
}

fn https_endpoint(r: &Receiver, p: Protocol) -> String {
    r.endpoint(p).replacen("http://", "https://", 1)
}

/// `run` flags for an export to `endpoint` over `protocol`, then `extra`.
fn flags(endpoint: &str, protocol: Protocol, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "--otlp-endpoint",
        endpoint,
        "--otlp-protocol",
        protocol.flag(),
        "--otlp-batch-delay-ms",
        "100",
        "--otlp-timeout-ms",
        "3000",
        "--otlp-retry-max-s",
        "2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// A healthy keep-alive connection (idle 1 s): its answered episodes are exported while it is open.
fn keepalive_connection(env: &Env) -> (Server, Client) {
    let server = Server::start(&env.ns, Family::V4, ServerMode::Hold).unwrap();
    let client = Client::connect(&env.ns, server.addr(), &Keepalive::new(1, 1, 3)).unwrap();
    (server, client)
}

/// Spans of the connection arrive; every request was accepted over `protocol` and, with mutual
/// TLS, came with the client certificate; the agent's stop report counts no failure.
fn expect_delivery(env: &Env, receiver: &Receiver, protocol: Protocol, agent_flags: &[String], envs: &[(&str, &str)], mtls: bool) {
    let args: Vec<&str> = agent_flags.iter().map(String::as_str).collect();
    let agent = Agent::start_run(env, &args, envs);
    let (_server, client) = keepalive_connection(env);
    let (l, r): (SocketAddr, SocketAddr) = (client.local(), client.remote());
    let arrived = receiver.wait_until(WAIT, |spans| !of_conn(spans, l, r).is_empty());
    let stderr_now = agent.stderr_lines().join("\n");
    assert!(arrived, "no span of the connection arrived over TLS within {WAIT:?}; agent:\n{stderr_now}\nreceiver:\n{}", receiver.stderr());
    drop(client);
    let (_, stderr) = agent.stop_full();
    let report = export_report(&stderr).unwrap();
    assert_eq!((report["export errors"], report["failed"], report["unsent"]), (0, 0, 0), "{report:?}\n{}", stderr.join("\n"));
    assert!(report["exported"] >= 1, "{report:?}");
    let reqs = receiver.requests();
    assert!(!reqs.is_empty());
    for q in &reqs {
        assert_eq!(q["protocol"].as_str(), Some(protocol.receiver_name()), "{q}");
        assert_eq!(q["accepted"], serde_json::Value::Bool(true), "{q}");
        let want = if mtls { Some(CLIENT_CN) } else { None };
        assert_eq!(q["peer_cn"].as_str(), want, "client certificate seen by the receiver: {q}");
    }
    let spans = receiver.spans();
    assert!(!of_conn(&spans, l, r).is_empty(), "{}", render(&spans));
}

/// The export is refused during the TLS handshake: the agent keeps running, logs the failure with
/// one of `causes` (words of rustls's reason), counts it, and the receiver gets nothing. A `permanent`
/// refusal (our verdict on the collector's certificate) is not retried: it does not heal by
/// retrying; others are retried within `--otlp-retry-max-s`.
fn expect_refusal(env: &Env, receiver: &Receiver, agent_flags: &[String], envs: &[(&str, &str)], causes: &[&str], permanent: bool) {
    let args: Vec<&str> = agent_flags.iter().map(String::as_str).collect();
    let agent = Agent::start_run(env, &args, envs);
    let (_server, client) = keepalive_connection(env);
    let deadline = std::time::Instant::now() + WAIT;
    let failed_line = loop {
        if let Some(l) = agent.stderr_lines().into_iter().find(|l| l.contains("OTLP export failed")) {
            break l;
        }
        assert!(std::time::Instant::now() < deadline, "no `OTLP export failed` line within {WAIT:?}:\n{}", agent.stderr_lines().join("\n"));
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(causes.iter().any(|c| failed_line.contains(c)), "the failure line names the cause ({causes:?}): {failed_line}");
    if permanent {
        assert!(failed_line.contains("not retrying"), "a certificate refusal is permanent: {failed_line}");
    }
    // More episodes end (one a second) and fail too; the agent lives on.
    std::thread::sleep(Duration::from_secs(4));
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", agent.pid())).expect("the agent is alive");
    let state = stat.rsplit_once(") ").map(|(_, r)| r.chars().next()).unwrap_or(None);
    assert!(matches!(state, Some('S' | 'R')), "agent state {state:?}");
    drop(client);
    let (_, stderr) = agent.stop_full();
    let report = export_report(&stderr).unwrap();
    assert!(report["export errors"] >= 2, "{report:?}");
    assert_eq!(report["exported"], 0, "{report:?}");
    if permanent {
        assert!(report["failed"] >= 2, "{report:?}");
        assert_eq!(report["retries"], 0, "{report:?}");
    } else {
        // Retried for --otlp-retry-max-s (2 s), then given up; the rest is unsent at the stop.
        assert!(report["failed"] + report["unsent"] >= 1 && report["retries"] >= 1, "{report:?}");
    }
    assert_eq!(receiver.span_count(), 0, "the receiver got spans from a refused connection");
    assert!(receiver.requests().is_empty(), "{:?}", receiver.requests());
}

#[test]
fn server_authentication_over_grpc() {
    let (env, pki, receiver) = setup(false, false);
    let f = flags(&https_endpoint(&receiver, Protocol::Grpc), Protocol::Grpc, &["--otlp-certificate", s(&pki.ca)]);
    expect_delivery(&env, &receiver, Protocol::Grpc, &f, &[], false);
}

#[test]
fn server_authentication_over_http_from_environment() {
    let (env, pki, receiver) = setup(false, false);
    let endpoint = https_endpoint(&receiver, Protocol::HttpProtobuf);
    let f = flags(&endpoint, Protocol::HttpProtobuf, &[]);
    // The traces-specific variable wins over the generic one (which names the wrong CA).
    let envs = [("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", s(&pki.ca)), ("OTEL_EXPORTER_OTLP_CERTIFICATE", s(&pki.other_ca))];
    expect_delivery(&env, &receiver, Protocol::HttpProtobuf, &f, &envs, false);
}

#[test]
fn mutual_tls_over_grpc() {
    let (env, pki, receiver) = setup(false, true);
    let f = flags(
        &https_endpoint(&receiver, Protocol::Grpc),
        Protocol::Grpc,
        &["--otlp-certificate", s(&pki.ca), "--otlp-client-certificate", s(&pki.client_cert), "--otlp-client-key", s(&pki.client_key)],
    );
    expect_delivery(&env, &receiver, Protocol::Grpc, &f, &[], true);
}

#[test]
fn mutual_tls_over_http_from_environment() {
    let (env, pki, receiver) = setup(false, true);
    let f = flags(&https_endpoint(&receiver, Protocol::HttpProtobuf), Protocol::HttpProtobuf, &[]);
    let envs = [
        ("OTEL_EXPORTER_OTLP_CERTIFICATE", s(&pki.ca)),
        ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", s(&pki.client_cert)),
        ("OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY", s(&pki.client_key)),
    ];
    expect_delivery(&env, &receiver, Protocol::HttpProtobuf, &f, &envs, true);
}

#[test]
fn wrong_ca_is_refused_over_grpc() {
    let (env, pki, receiver) = setup(false, false);
    let f = flags(&https_endpoint(&receiver, Protocol::Grpc), Protocol::Grpc, &["--otlp-certificate", s(&pki.other_ca)]);
    expect_refusal(&env, &receiver, &f, &[], &["invalid peer certificate: UnknownIssuer"], true);
}

#[test]
fn wrong_ca_is_refused_over_http() {
    let (env, pki, receiver) = setup(false, false);
    let f = flags(&https_endpoint(&receiver, Protocol::HttpProtobuf), Protocol::HttpProtobuf, &["--otlp-certificate", s(&pki.other_ca)]);
    expect_refusal(&env, &receiver, &f, &[], &["invalid peer certificate: UnknownIssuer"], true);
}

#[test]
fn expired_server_certificate_is_refused() {
    let (env, pki, receiver) = setup(true, false);
    let f = flags(&https_endpoint(&receiver, Protocol::HttpProtobuf), Protocol::HttpProtobuf, &["--otlp-certificate", s(&pki.ca)]);
    expect_refusal(&env, &receiver, &f, &[], &["invalid peer certificate: certificate expired"], true);
}

#[test]
fn missing_client_certificate_is_refused_by_the_collector() {
    let (env, pki, receiver) = setup(false, true);
    let f = flags(&https_endpoint(&receiver, Protocol::Grpc), Protocol::Grpc, &["--otlp-certificate", s(&pki.ca)]);
    // With TLS 1.3 the client's handshake is complete before the collector checks its certificate:
    // the refusal shows as a connection closed, reset or left hanging (with or without TLS
    // close_notify, as the race between the collector's close and our first request goes), which may
    // be transient, so it is retried.
    expect_refusal(&env, &receiver, &f, &[], &["close_notify", "connection closed", "reset by peer", "broken pipe", "received fatal alert", "Cancelled", "DeadlineExceeded", "imed out"], false);
}

/// Bad TLS input stops the agent at start-up with an error naming the flag or variable.
#[test]
fn bad_tls_files_are_refused_at_start_up() {
    let pki = Pki::generate().unwrap();
    let garbage = pki.dir().join("garbage.pem");
    std::fs::write(&garbage, "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n").unwrap();
    let run = |args: &[&str], envs: &[(&str, &str)]| {
        let out = std::process::Command::new(keepalive_tests::agent_binary())
            .env_remove("OTEL_EXPORTER_OTLP_CERTIFICATE")
            .envs(envs.iter().copied())
            .args(["run", "--otlp-endpoint", "https://127.0.0.1:9", "--duration", "0"])
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = run(&["--otlp-certificate", "/nonexistent/ca.pem"], &[]);
    assert!(e.contains("--otlp-certificate: cannot read /nonexistent/ca.pem"), "{e}");
    let e = run(&[], &[("OTEL_EXPORTER_OTLP_CERTIFICATE", s(&garbage))]);
    assert!(e.contains("OTEL_EXPORTER_OTLP_CERTIFICATE") && e.contains("bad PEM"), "{e}");
    let e = run(&["--otlp-certificate", s(&pki.server_key)], &[]);
    assert!(e.contains("--otlp-certificate") && e.contains("no PEM certificate"), "{e}");
    let e = run(&["--otlp-client-certificate", s(&pki.client_cert)], &[]);
    assert!(e.contains("--otlp-client-certificate") && e.contains("client key"), "{e}");
    let e = run(&["--otlp-client-certificate", s(&pki.client_cert), "--otlp-client-key", s(&pki.client_cert)], &[]);
    assert!(e.contains("--otlp-client-key") && e.contains("private key"), "{e}");
    let e = run(&["--otlp-client-certificate", s(&pki.client_cert), "--otlp-client-key", s(&pki.server_key)], &[]);
    assert!(e.contains("--otlp-client-key") && e.contains("does not go with"), "{e}");
    let e = run(&["--otlp-insecure"], &[]);
    assert!(e.contains("--otlp-insecure") && e.contains("plaintext"), "{e}");
}
