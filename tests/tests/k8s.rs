//! Kubernetes and container attribution from real cgroups: the test creates, below its own cgroup,
//! cgroups named as the kubelet names them (systemd and cgroupfs drivers, each QoS class, the
//! containerd and CRI-O scopes), moves itself into one, connects, and the agent's JSON lines (and
//! `run`'s spans) carry the container id, the pod UID and the QoS class read from the cgroup path
//! alone.

use std::path::{Path, PathBuf};
use std::time::Duration;

use keepalive_tests::events::{is_conn, str_of};
use keepalive_tests::otlp::Span;
use keepalive_tests::tcp::{Client, Family, Keepalive, Server, ServerMode};
use keepalive_tests::{Agent, Env};

const WAIT: Duration = Duration::from_secs(20);

/// The tests move this (one) test process between cgroups: one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}
const UID: &str = "0b7c3a52-6f1e-4d8a-9c2b-1e2f3a4b5c6d";
const ID: &str = "3f4e5d6c7b8a99887766554433221100ffeeddccbbaa00112233445566778899";

/// A chain of cgroups below the test's own, holding the test process while it exists; dropping it
/// moves the process back to `home` and removes the chain, deepest first.
struct Nested {
    home: PathBuf,
    dirs: Vec<PathBuf>,
}

impl Nested {
    fn enter(home: &Path, relative: &str) -> Nested {
        let mut dirs = Vec::new();
        let mut dir = home.to_path_buf();
        for part in relative.split('/') {
            dir = dir.join(part);
            std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
            dirs.push(dir.clone());
        }
        let nested = Nested { home: home.to_path_buf(), dirs };
        std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string()).expect("moving the test process");
        nested
    }
}

impl Drop for Nested {
    fn drop(&mut self) {
        let _ = std::fs::write(self.home.join("cgroup.procs"), std::process::id().to_string());
        for dir in self.dirs.iter().rev() {
            for _ in 0..100 {
                match std::fs::remove_dir(dir) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => std::thread::sleep(Duration::from_millis(50)),
                    _ => break,
                }
            }
        }
    }
}

/// The first record of a connection made from the cgroup `relative` (below the test's) that has
/// the key `key`; the cgroup exists until the agent printed it (it resolves cgroups when printing).
fn record_from(env: &Env, agent: &Agent, server: &Server, relative: &str, key: &str) -> serde_json::Value {
    let nested = Nested::enter(env.cgroup.path(), relative);
    let client = Client::connect(&env.ns, server.addr(), &Keepalive::new(30, 5, 3)).unwrap();
    let (l, r) = (client.local(), client.remote());
    let rec = agent.wait_for(WAIT, |e| is_conn(e, l, r) && str_of(e, key).is_some());
    drop(client);
    drop(nested);
    rec.unwrap_or_else(|| panic!("{relative}: no record with `{key}` within {WAIT:?}:\n{:#?}", agent.events()))
}

#[test]
fn json_lines_carry_container_pod_and_qos_from_kubelet_cgroups() {
    let _serial = one_at_a_time();
    let env = Env::new();
    let server = Server::start(&env.ns, Family::V4, ServerMode::Echo).unwrap();
    let agent = Agent::start(&env, &[]);
    let u = UID.replace('-', "_");
    let cases = [
        // (cgroup below the test's, QoS class)
        (format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-{ID}.scope"), "Burstable"),
        (format!("kubepods.slice/kubepods-pod{u}.slice/crio-{ID}.scope"), "Guaranteed"),
        (format!("kubepods/besteffort/pod{UID}/{ID}"), "BestEffort"),
    ];
    for (cgroup, qos) in &cases {
        let rec = record_from(&env, &agent, &server, cgroup, "pod_uid");
        assert_eq!(str_of(&rec, "pod_uid"), Some(UID), "{cgroup}: {rec}");
        assert_eq!(str_of(&rec, "pod_qos"), Some(*qos), "{cgroup}: {rec}");
        assert_eq!(str_of(&rec, "container_id"), Some(ID), "{cgroup}: {rec}");
        assert!(str_of(&rec, "cgroup").is_some_and(|p| p.ends_with(cgroup.as_str())), "{cgroup}: {rec}");
    }
    // A cgroup that is not the kubelet's or a runtime's has none of these keys.
    let rec = record_from(&env, &agent, &server, "app.slice/web.service", "cgroup");
    assert!(str_of(&rec, "pod_uid").is_none() && str_of(&rec, "container_id").is_none(), "{rec}");
    agent.stop();
}

#[test]
fn spans_carry_container_pod_and_qos_from_kubelet_cgroups() {
    let _serial = one_at_a_time();
    let env = Env::new();
    let server = Server::start(&env.ns, Family::V4, ServerMode::Echo).unwrap();
    // `--spans all`: the connection is healthy; no endpoint, so spans are JSON lines on stdout.
    let agent = Agent::start_run(&env, &["--spans", "all"], &[]);
    let u = UID.replace('-', "_");
    let cases = [
        (format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-{ID}.scope"), Some("Burstable")),
        (format!("kubepods/besteffort/pod{UID}/{ID}"), Some("BestEffort")),
        ("app.slice/web.service".to_string(), None),
    ];
    let spans = |lines: &[serde_json::Value]| lines.iter().filter_map(|v| Span::from_json_line(v).ok()).collect::<Vec<_>>();
    for (cgroup, qos) in &cases {
        let nested = Nested::enter(env.cgroup.path(), cgroup);
        let client = Client::connect(&env.ns, server.addr(), &Keepalive::new(30, 5, 3)).unwrap();
        let (l, r) = (client.local(), client.remote());
        drop(client);
        // The connection span (the root span of its trace), delivered when the connection ends.
        let conn_span = |lines: &[serde_json::Value]| spans(lines).into_iter().find(|s| s.is_conn(l, r) && s.parent_span_id.is_none());
        let seen = agent.wait_until(WAIT, |lines| conn_span(lines).is_some());
        drop(nested);
        assert!(seen, "{cgroup}: no connection span within {WAIT:?}:\n{:#?}", agent.events());
        let s = conn_span(&agent.events()).unwrap();
        match qos {
            Some(qos) => {
                assert_eq!(s.attr_str("container.id"), Some(ID), "{cgroup}: {:?}", s.attrs);
                assert_eq!(s.attr_str("k8s.pod.uid"), Some(UID), "{cgroup}: {:?}", s.attrs);
                assert_eq!(s.attr_str("tcp.keepalive.pod.qos_class"), Some(*qos), "{cgroup}: {:?}", s.attrs);
            }
            // Not the kubelet's or a runtime's cgroup: none of these attributes.
            None => {
                assert!(s.attr_i64("tcp.keepalive.process.cgroup_id").is_some_and(|id| id > 0), "{cgroup}: {:?}", s.attrs);
                let keys = ["container.id", "k8s.pod.uid", "tcp.keepalive.pod.qos_class"];
                assert!(keys.iter().all(|k| s.attr(k).is_none()), "{cgroup}: {:?}", s.attrs);
            }
        }
    }
    agent.stop();
}
