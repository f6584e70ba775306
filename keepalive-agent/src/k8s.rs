//! Container and Kubernetes attribution from a cgroup path, without an API server.
//!
//! The container runtimes and the kubelet name the cgroups they create after what runs in them, so
//! a process's cgroup v2 path alone gives its container id, and, under the kubelet, its pod's UID
//! and QoS class. [`parse_cgroup_path`] understands:
//!
//! | who | cgroup path (v2, relative to the mount) |
//! | --- | --- |
//! | kubelet, systemd driver | `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid, - as _>.slice/cri-containerd-<id>.scope` (also `crio-<id>.scope`, `docker-<id>.scope`; Guaranteed pods sit directly under `kubepods.slice` as `kubepods-pod<uid>.slice`) |
//! | kubelet, cgroupfs driver | `/kubepods/burstable/pod<uid>/<id>` (`/kubepods/pod<uid>/<id>` for Guaranteed, `besteffort` for BestEffort) |
//! | Docker | `/system.slice/docker-<id>.scope` (systemd driver), `/docker/<id>` (cgroupfs driver) |
//! | Podman | `/machine.slice/libpod-<id>.scope` (also below a user's `user@UID.service`), `/libpod_parent/libpod-<id>` (cgroupfs) |
//!
//! Any prefix before the kubelet's or the runtime's part is allowed (nested `kind` nodes put the
//! whole tree under `/kubelet.slice/kubelet-kubepods.slice/...` or a container's own cgroup), and so
//! are sub-cgroups below the container's (`.../libpod-<id>.scope/container`). Runtime helper
//! processes (`crio-conmon-<id>.scope`, `libpod-conmon-<id>.scope`) are not the container and get no
//! container id (their pod is still reported). Pure string parsing: no file system, no API server.
//!
//! The node name has no cgroup: the DaemonSet hands it in through the downward API
//! ([`NODE_NAME_VAR`], read by [`node_name`]).

use std::fmt;

/// Environment variable holding the Kubernetes node name (set by the DaemonSet from the downward
/// API, `spec.nodeName`); reported as the `k8s.node.name` resource attribute.
pub const NODE_NAME_VAR: &str = "K8S_NODE_NAME";

/// A pod's quality-of-service class (the kubelet puts each class in its own cgroup).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl QosClass {
    /// The name Kubernetes uses in `status.qosClass`.
    pub fn name(self) -> &'static str {
        match self {
            QosClass::Guaranteed => "Guaranteed",
            QosClass::Burstable => "Burstable",
            QosClass::BestEffort => "BestEffort",
        }
    }

    /// The class a kubelet cgroup name part stands for (`burstable`, `besteffort`); Guaranteed
    /// pods have no such part.
    fn from_part(part: &str) -> Option<QosClass> {
        match part {
            "burstable" => Some(QosClass::Burstable),
            "besteffort" => Some(QosClass::BestEffort),
            _ => None,
        }
    }
}

impl fmt::Display for QosClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The container runtime a cgroup name points to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    Containerd,
    CriO,
    Docker,
    Podman,
}

impl Runtime {
    /// Lower-case name (the semantic conventions' `container.runtime.name` values).
    pub fn name(self) -> &'static str {
        match self {
            Runtime::Containerd => "containerd",
            Runtime::CriO => "cri-o",
            Runtime::Docker => "docker",
            Runtime::Podman => "podman",
        }
    }
}

/// A Kubernetes pod, as the kubelet's cgroup names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    /// `metadata.uid`, with dashes (the systemd driver's underscores turned back).
    pub uid: String,
    /// The class the kubelet filed the pod under.
    pub qos: QosClass,
}

/// What a cgroup path says about the process in it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Attribution {
    /// 64 lower-case hex digits.
    pub container_id: Option<String>,
    /// The runtime, when its naming says so (a bare cgroupfs id under the kubelet does not).
    pub runtime: Option<Runtime>,
    /// The pod, when the path is below a kubelet pod cgroup.
    pub pod: Option<Pod>,
}

/// Container id, runtime, pod UID and QoS class from a cgroup v2 path (see the module docs for the
/// schemes). Nothing recognised gives an empty [`Attribution`].
pub fn parse_cgroup_path(path: &str) -> Attribution {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let found = (0..segments.len()).rev().find_map(|i| pod_at(&segments, i).map(|pod| (i, pod)));
    // The container is below the pod when there is one; the outermost match wins (sub-cgroups of
    // a container, such as crun's `container`, are the same container).
    let below = found.as_ref().map_or(0, |(i, _)| i + 1);
    let container = (below..segments.len()).find_map(|i| container_at(&segments, i));
    Attribution {
        container_id: container.as_ref().map(|(id, _)| id.clone()),
        runtime: container.and_then(|(_, rt)| rt),
        pod: found.map(|(_, pod)| pod),
    }
}

/// The pod whose cgroup is `segments[i]`: `...kubepods[-QOS]-pod<uid with _>.slice` (systemd
/// driver, any prefix such as `kubelet-`), or `pod<uid>` below `kubepods`, `kubepods/burstable` or
/// `kubepods/besteffort` (cgroupfs driver).
fn pod_at(segments: &[&str], i: usize) -> Option<Pod> {
    let seg = segments[i];
    let (qos, uid) = match seg.strip_suffix(".slice") {
        Some(name) => {
            let rest = name.split_once("kubepods-")?.1;
            match rest.strip_prefix("pod") {
                Some(uid) => (QosClass::Guaranteed, uid.replace('_', "-")),
                None => {
                    let (qos, uid) = rest.split_once("-pod")?;
                    (QosClass::from_part(qos)?, uid.replace('_', "-"))
                }
            }
        }
        None => {
            let uid = seg.strip_prefix("pod")?;
            let qos = match (i.checked_sub(2).map(|p| segments[p]), segments[i.checked_sub(1)?]) {
                (_, "kubepods") => QosClass::Guaranteed,
                (Some("kubepods"), parent) => QosClass::from_part(parent)?,
                _ => return None,
            };
            (qos, uid.to_string())
        }
    };
    Some(Pod { uid: pod_uid(&uid)?, qos })
}

/// A pod UID: a UUID (8-4-4-4-12 hex digits) or, for static pods, 32 hex digits (a hash).
fn pod_uid(s: &str) -> Option<String> {
    let hex = |p: &str, n: usize| p.len() == n && p.bytes().all(|b| b.is_ascii_hexdigit());
    let parts: Vec<&str> = s.split('-').collect();
    let uuid = parts.len() == 5 && parts.iter().zip([8, 4, 4, 4, 12]).all(|(p, n)| hex(p, n));
    (uuid || hex(s, 32)).then(|| s.to_ascii_lowercase())
}

/// The container whose cgroup is `segments[i]`: `<runtime prefix><id>[.scope]`, or a bare id
/// (cgroupfs drivers: `/docker/<id>`, `/kubepods/.../pod<uid>/<id>`). Helper processes' scopes
/// (`crio-conmon-<id>`, `libpod-conmon-<id>`) are not containers.
fn container_at(segments: &[&str], i: usize) -> Option<(String, Option<Runtime>)> {
    const PREFIXES: [(&str, Runtime); 4] = [
        ("cri-containerd-", Runtime::Containerd),
        ("crio-", Runtime::CriO),
        ("docker-", Runtime::Docker),
        ("libpod-", Runtime::Podman),
    ];
    let name = segments[i].strip_suffix(".scope").unwrap_or(segments[i]);
    let parent = i.checked_sub(1).map(|p| segments[p]);
    let (id, runtime) = PREFIXES
        .iter()
        .find_map(|(p, rt)| name.strip_prefix(p).map(|id| (id, Some(*rt))))
        .unwrap_or((name, (parent == Some("docker")).then_some(Runtime::Docker)));
    (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| (id.to_ascii_lowercase(), runtime))
}

/// The node name from [`NODE_NAME_VAR`] in `env` (a lookup): `None` when unset or empty, an error
/// naming the variable when it is not a Kubernetes node name (a DNS subdomain: lower-case letters,
/// digits, `-` and `.`, at most 253 characters, starting and ending alphanumeric).
pub fn node_name(env: &dyn Fn(&str) -> Option<String>) -> Result<Option<String>, String> {
    let Some(v) = env(NODE_NAME_VAR).map(|v| v.trim().to_string()).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let ok = v.len() <= 253
        && v.bytes().all(|b| alnum(b) || b == b'-' || b == b'.')
        && v.bytes().next().is_some_and(alnum)
        && v.bytes().last().is_some_and(alnum);
    if ok {
        Ok(Some(v))
    } else {
        Err(format!("{NODE_NAME_VAR}: `{v}` is not a Kubernetes node name (lower-case letters, digits, `-` and `.`)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f4e5d6c7b8a99887766554433221100ffeeddccbbaa00112233445566778899";
    const UID: &str = "0b7c3a52-6f1e-4d8a-9c2b-1e2f3a4b5c6d";

    fn pod(qos: QosClass) -> Option<Pod> {
        Some(Pod { uid: UID.to_string(), qos })
    }

    fn expect(path: &str, id: Option<&str>, runtime: Option<Runtime>, pod: Option<Pod>) {
        let a = parse_cgroup_path(path);
        assert_eq!(a, Attribution { container_id: id.map(str::to_string), runtime, pod }, "{path}");
    }

    #[test]
    fn kubelet_systemd_driver_every_class_and_runtime() {
        let u = UID.replace('-', "_");
        for (prefix, rt) in [("cri-containerd-", Runtime::Containerd), ("crio-", Runtime::CriO), ("docker-", Runtime::Docker)] {
            expect(
                &format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/{prefix}{ID}.scope"),
                Some(ID),
                Some(rt),
                pod(QosClass::Burstable),
            );
            expect(
                &format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/{prefix}{ID}.scope"),
                Some(ID),
                Some(rt),
                pod(QosClass::BestEffort),
            );
            expect(&format!("/kubepods.slice/kubepods-pod{u}.slice/{prefix}{ID}.scope"), Some(ID), Some(rt), pod(QosClass::Guaranteed));
        }
        // The pod's own cgroup (pause process, or a process moved there): pod without container.
        expect(&format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice"), None, None, pod(QosClass::Burstable));
        // CRI-O's conmon helper is not the container.
        expect(&format!("/kubepods.slice/kubepods-pod{u}.slice/crio-conmon-{ID}.scope"), None, None, pod(QosClass::Guaranteed));
        // Nested (kind): a prefix before the kubelet's tree, and a prefixed kubepods name.
        expect(
            &format!("/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{u}.slice/cri-containerd-{ID}.scope"),
            Some(ID),
            Some(Runtime::Containerd),
            pod(QosClass::BestEffort),
        );
    }

    #[test]
    fn kubelet_cgroupfs_driver_every_class() {
        expect(&format!("/kubepods/burstable/pod{UID}/{ID}"), Some(ID), None, pod(QosClass::Burstable));
        expect(&format!("/kubepods/besteffort/pod{UID}/{ID}"), Some(ID), None, pod(QosClass::BestEffort));
        expect(&format!("/kubepods/pod{UID}/{ID}"), Some(ID), None, pod(QosClass::Guaranteed));
        expect(&format!("/kubepods/burstable/pod{UID}"), None, None, pod(QosClass::Burstable));
        // Upper-case hex is normalised.
        expect(&format!("/kubepods/pod{}/{}", UID.to_uppercase(), ID.to_uppercase()), Some(ID), None, pod(QosClass::Guaranteed));
        // Static pods' UIDs are 32-hex-digit hashes.
        let hash = "6e2b1c3d4f5a69788796a5b4c3d2e1f0";
        let a = parse_cgroup_path(&format!("/kubepods/burstable/pod{hash}/{ID}"));
        assert_eq!(a.pod, Some(Pod { uid: hash.to_string(), qos: QosClass::Burstable }));
        // `pod...` directories elsewhere are not pods.
        assert_eq!(parse_cgroup_path(&format!("/system.slice/pod{UID}/{ID}")).pod, None);
        assert_eq!(parse_cgroup_path(&format!("/kubepods/guaranteed/pod{UID}")).pod, None);
    }

    #[test]
    fn docker_and_podman() {
        expect(&format!("/system.slice/docker-{ID}.scope"), Some(ID), Some(Runtime::Docker), None);
        expect(&format!("/docker/{ID}"), Some(ID), Some(Runtime::Docker), None);
        expect(&format!("/machine.slice/libpod-{ID}.scope"), Some(ID), Some(Runtime::Podman), None);
        // crun's sub-cgroup below the container's scope is the same container.
        expect(&format!("/machine.slice/libpod-{ID}.scope/container"), Some(ID), Some(Runtime::Podman), None);
        expect(
            &format!("/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope"),
            Some(ID),
            Some(Runtime::Podman),
            None,
        );
        expect(&format!("/libpod_parent/libpod-{ID}"), Some(ID), Some(Runtime::Podman), None);
        expect(&format!("/machine.slice/libpod-conmon-{ID}.scope"), None, None, None);
    }

    #[test]
    fn nothing_recognised() {
        for path in ["/", "", "/user.slice/user-0.slice/session-1.scope", "/docker/abc", "/system.slice/docker-12.scope", &format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podnot_a_uid.slice/cri-containerd-{ID}.scope")] {
            let a = parse_cgroup_path(path);
            assert_eq!(a.pod, None, "{path}");
            if !path.contains(ID) {
                assert_eq!(a, Attribution::default(), "{path}");
            }
        }
    }

    #[test]
    fn node_name_from_the_environment() {
        let env = |v: &'static str| move |n: &str| (n == NODE_NAME_VAR).then(|| v.to_string());
        assert_eq!(node_name(&env("node-1.example")), Ok(Some("node-1.example".into())));
        assert_eq!(node_name(&env("  ")), Ok(None));
        assert_eq!(node_name(&|_| None), Ok(None));
        for bad in ["Node1", "a,b", "-a", "a.", "a=b"] {
            assert!(node_name(&env(bad)).unwrap_err().starts_with("K8S_NODE_NAME: "), "{bad}");
        }
    }

    #[test]
    fn names() {
        assert_eq!(QosClass::BestEffort.to_string(), "BestEffort");
        assert_eq!(Runtime::CriO.name(), "cri-o");
    }
}
