//! The Kubernetes manifests in deploy/kubernetes/: every file validated against the Kubernetes
//! OpenAPI schemas by PyPI's `kubernetes-validate` (strict: unknown fields refused), for the oldest
//! Kubernetes version the manifests support and the newest the validator knows; then what a
//! schema cannot say: the DaemonSet's capabilities are the systemd unit's (packaging/capabilities),
//! the ConfigMap holds the packaged default configuration and the agent accepts it, the probes and
//! the scrape discovery point at the metrics port, and the Containerfile builds with the toolchain
//! of scripts/setup.sh.
//!
//! The validator lives in the test venv made by scripts/setup.sh (`setup_k8s_validate`); the YAML is
//! read through the same venv's Python (PyYAML, a dependency of the validator).

use std::path::{Path, PathBuf};
use std::process::Command;

use keepalive_tests::agent_binary;
use serde_json::Value;

/// Kubernetes versions validated against: the oldest supported (securityContext.appArmorProfile is
/// 1.30+) and the validator's newest.
const VERSIONS: &[&str] = &["1.30.0", "1.37.0"];
/// Kinds from CRDs, whose schemas the validator does not bundle (checked by hand below).
const CRD_KINDS: &[&str] = &["PodMonitor"];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

fn venv_bin(name: &str) -> PathBuf {
    let venv = std::env::var_os("KEEPALIVE_OTEL_VENV").map_or_else(|| PathBuf::from("/opt/keepalive/otel-venv"), PathBuf::from);
    let bin = venv.join("bin").join(name);
    assert!(bin.exists(), "{} is missing: run scripts/setup.sh (setup_k8s_validate)", bin.display());
    bin
}

fn manifests() -> Vec<PathBuf> {
    let dir = workspace().join("deploy/kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "expected the namespace, service account, config map, DaemonSet and PodMonitor: {files:?}");
    files
}

/// Every document of every manifest, as JSON.
fn documents() -> Vec<Value> {
    let script = "import json, sys, yaml\nprint(json.dumps([d for f in sys.argv[1:] for d in yaml.safe_load_all(open(f)) if d]))";
    let out = Command::new(venv_bin("python")).arg("-c").arg(script).args(manifests()).output().expect("running python");
    assert!(out.status.success(), "reading the manifests: {}", String::from_utf8_lossy(&out.stderr));
    match serde_json::from_slice(&out.stdout).expect("YAML as JSON") {
        Value::Array(docs) => docs,
        other => panic!("not a list: {other}"),
    }
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter().find(|d| d["kind"] == kind).unwrap_or_else(|| panic!("no {kind} in deploy/kubernetes"))
}

#[test]
fn manifests_validate_against_the_kubernetes_schemas() {
    let validator = venv_bin("kubernetes-validate");
    for version in VERSIONS {
        for file in manifests() {
            let out = Command::new(&validator).args(["--strict", "-k", version]).arg(&file).output().expect("running kubernetes-validate");
            let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            assert!(out.status.success(), "{} against {version}:\n{text}", file.display());
            // A missing schema is only a warning: allowed for CRD kinds alone (a misspelt core
            // kind must not pass that way).
            for line in text.lines().filter(|l| l.contains("Couldn't find schema")) {
                assert!(CRD_KINDS.iter().any(|k| line.contains(&format!("kind {k} "))), "{}: {line}", file.display());
            }
            assert!(text.contains("passed") || CRD_KINDS.iter().any(|k| text.contains(k)), "{}: {text}", file.display());
        }
    }
}

#[test]
fn daemonset_has_the_unit_capabilities_mounts_probes_and_node_name() {
    let docs = documents();
    let ds = kind(&docs, "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    let mut added: Vec<String> = sc["capabilities"]["add"].as_array().unwrap().iter().map(|v| format!("CAP_{}", v.as_str().unwrap())).collect();
    let caps = std::fs::read_to_string(workspace().join("packaging/capabilities")).unwrap();
    let mut unit: Vec<String> = caps.split_whitespace().map(str::to_string).collect();
    added.sort();
    unit.sort();
    assert_eq!(added, unit, "the DaemonSet's capabilities differ from packaging/capabilities");
    // Read-only host mounts of BTF, the cgroup tree and tracefs.
    for path in ["/sys/kernel/btf", "/sys/fs/cgroup", "/sys/kernel/tracing"] {
        let mount = c["volumeMounts"].as_array().unwrap().iter().find(|m| m["mountPath"] == path).unwrap_or_else(|| panic!("{path} not mounted"));
        assert_eq!(mount["readOnly"], true, "{path}");
        let volume = pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == mount["name"]).unwrap();
        assert_eq!(volume["hostPath"]["path"], path);
    }
    assert_eq!(pod["hostPID"], true);
    assert_eq!(pod["hostNetwork"], false);
    // Node name from the downward API.
    let node = c["env"].as_array().unwrap().iter().find(|e| e["name"] == "K8S_NODE_NAME").expect("K8S_NODE_NAME");
    assert_eq!(node["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName");
    // Metrics endpoint, probes and scrape annotations agree on the port.
    let args: Vec<&str> = c["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    assert!(args.windows(2).any(|w| w == ["--metrics-listen", "0.0.0.0:9464"]), "{args:?}");
    assert!(args.windows(2).any(|w| w == ["--config", "/etc/keepalive-agent/config.toml"]), "{args:?}");
    let port = c["ports"].as_array().unwrap().iter().find(|p| p["name"] == "metrics").expect("metrics port");
    assert_eq!(port["containerPort"], 9464);
    assert_eq!((&c["livenessProbe"]["httpGet"]["path"], &c["livenessProbe"]["httpGet"]["port"]), (&"/healthz".into(), &"metrics".into()));
    assert_eq!((&c["readinessProbe"]["httpGet"]["path"], &c["readinessProbe"]["httpGet"]["port"]), (&"/readyz".into(), &"metrics".into()));
    let annotations = &ds["spec"]["template"]["metadata"]["annotations"];
    assert_eq!((&annotations["prometheus.io/scrape"], &annotations["prometheus.io/port"]), (&"true".into(), &"9464".into()));
    assert!(c["resources"]["requests"]["memory"].is_string() && c["resources"]["limits"]["memory"].is_string());
    // The service account exists and the config map is the one mounted.
    assert_eq!(kind(&docs, "ServiceAccount")["metadata"]["name"], pod["serviceAccountName"]);
    let config = pod["volumes"].as_array().unwrap().iter().find(|v| v["configMap"].is_object()).expect("config volume");
    assert_eq!(config["configMap"]["name"], kind(&docs, "ConfigMap")["metadata"]["name"]);
}

#[test]
fn podmonitor_selects_the_agent_pods_metrics_port() {
    let docs = documents();
    let ds = kind(&docs, "DaemonSet");
    let pm = kind(&docs, "PodMonitor");
    assert_eq!(pm["apiVersion"], "monitoring.coreos.com/v1");
    let labels = ds["spec"]["template"]["metadata"]["labels"].as_object().unwrap();
    for (k, v) in pm["spec"]["selector"]["matchLabels"].as_object().expect("matchLabels") {
        assert_eq!(labels.get(k), Some(v), "PodMonitor selects {k}={v}, the pods do not carry it");
    }
    let endpoint = &pm["spec"]["podMetricsEndpoints"][0];
    assert_eq!((&endpoint["port"], &endpoint["path"]), (&"metrics".into(), &"/metrics".into()));
    assert_eq!(pm["metadata"]["namespace"], ds["metadata"]["namespace"]);
}

#[test]
fn configmap_holds_the_packaged_configuration_and_the_agent_accepts_it() {
    let docs = documents();
    let text = kind(&docs, "ConfigMap")["data"]["config.toml"].as_str().expect("config.toml").to_string();
    let packaged = std::fs::read_to_string(workspace().join("packaging/config.toml")).unwrap();
    assert_eq!(text, packaged, "deploy/kubernetes/configmap.yaml and packaging/config.toml differ");
    let file = std::env::temp_dir().join(format!("keepalive-configmap-{}.toml", std::process::id()));
    std::fs::write(&file, &text).unwrap();
    let out = Command::new(agent_binary()).arg("config").arg("--config").arg(&file).env("K8S_NODE_NAME", "node-a").output().unwrap();
    let _ = std::fs::remove_file(&file);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("resource_attributes.\"k8s.node.name\" = \"node-a\"  # env K8S_NODE_NAME"), "{stdout}");
}

#[test]
fn containerfile_uses_the_setup_toolchain() {
    let setup = std::fs::read_to_string(workspace().join("scripts/setup.sh")).unwrap();
    let containerfile = std::fs::read_to_string(workspace().join("deploy/Containerfile")).unwrap();
    let linker = setup.lines().find_map(|l| l.strip_prefix("BPF_LINKER_VERSION=")).expect("BPF_LINKER_VERSION in setup.sh");
    assert!(containerfile.contains(&format!("ARG BPF_LINKER_VERSION={linker}")), "bpf-linker {linker} of setup.sh");
    let llvm = setup.split_whitespace().find_map(|w| w.strip_prefix("llvm-")?.strip_suffix("-dev")).expect("llvm-N-dev in setup.sh");
    assert!(containerfile.contains(&format!("ARG LLVM_VERSION={llvm}")), "LLVM {llvm} of setup.sh");
    assert!(containerfile.contains("FROM debian:bookworm-slim"));
    assert!(containerfile.contains("rust-src"));
    // The eBPF nightly is pinned (the newest one moves to an LLVM bpf-linker cannot read) and is the
    // one the build uses.
    let nightly = containerfile.lines().find_map(|l| l.strip_prefix("ARG EBPF_NIGHTLY=")).expect("ARG EBPF_NIGHTLY= in the Containerfile");
    let date = nightly.strip_prefix("nightly-").unwrap_or_default();
    assert!(date.len() == 10 && date.split('-').count() == 3, "EBPF_NIGHTLY pins a dated nightly: {nightly}");
    assert!(containerfile.contains("KEEPALIVE_EBPF_TOOLCHAIN=${EBPF_NIGHTLY}"), "the build uses the pinned nightly");
}
